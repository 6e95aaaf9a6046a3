// The console's screens: each reads what it shows from the admin API, draws it, and redraws
// the parts that live events change while it is shown.

import {
  act, addCleanup, api, enc, errorLine, facts, h, onLive, show, state, stateCell, table, time,
} from "/console/lib.js";

/// Where the device is connected now, or since when and how it is not.
function presence(d) {
  const p = d.presence;
  if (!p) return "—";
  const on = [p.mqtt ? "MQTT" : null, p.data ? "data channel" : null].filter(Boolean);
  if (on.length) return `online (${on.join(", ")})`;
  if (p.left_at) return `offline since ${time(p.left_at)} (${p.left === "mqtt" ? "MQTT" : "data channel"} closed)`;
  return "not seen since the bridge started";
}

/// A line chart of the minutes' completion times (p50 and p95), drawn as SVG.
function latencyChart(minutes) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    return el;
  };
  const points = minutes.filter((m) => m.latency_p95_ms !== null);
  if (points.length === 0) {
    return h("p", { class: "muted", id: "latency-chart" }, "No job has succeeded in the last hour.");
  }
  const [width, height, pad] = [720, 220, 40];
  const now = Date.now();
  const x = (t) => pad + ((t - (now - 3_600_000)) / 3_600_000) * (width - 2 * pad);
  const top = Math.max(...points.map((m) => m.latency_p95_ms), 1);
  const y = (v) => height - pad - (v / top) * (height - 2 * pad);
  const chart = svg("svg", {
    id: "latency-chart",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `Submission to completion time per minute over the last hour; highest p95 ${top} ms`,
    class: "chart",
  });
  chart.append(
    svg("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, class: "axis" }),
    svg("line", { x1: pad, y1: pad, x2: pad, y2: height - pad, class: "axis" }),
  );
  for (const [key, cls] of [["latency_p95_ms", "p95"], ["latency_p50_ms", "p50"]]) {
    const d = points.map((m, i) => `${i ? "L" : "M"}${x(m.start + 30_000).toFixed(1)},${y(m[key]).toFixed(1)}`);
    chart.append(svg("path", { d: d.join(" "), class: `series ${cls}` }));
    for (const m of points) {
      chart.append(svg("circle", { cx: x(m.start + 30_000), cy: y(m[key]), r: 3, class: `dot ${cls}` }));
    }
  }
  const label = (text, attrs) => {
    const t = svg("text", attrs);
    t.textContent = text;
    return t;
  };
  chart.append(
    label(`${top} ms`, { x: 4, y: pad, class: "tick" }),
    label("0", { x: 24, y: height - pad, class: "tick" }),
    label("an hour ago", { x: pad, y: height - 12, class: "tick" }),
    label("now", { x: width - pad - 20, y: height - 12, class: "tick" }),
  );
  return h("figure", {}, chart, h("figcaption", { class: "muted" },
    "Submission to completion, per minute: p95 (dashed) and p50 (solid)"));
}

export async function overview() {
  const box = h("div", { id: "overview" });
  const card = (label, n) => h("div", { class: "card" }, h("span", { class: "n" }, n), label);
  const draw = async () => {
    const fleet = await api("GET", "/v1/fleet");
    const transitions = new Map();
    for (const m of fleet.minutes) {
      for (const [state, n] of Object.entries(m.transitions)) {
        transitions.set(state, (transitions.get(state) || 0) + n);
      }
    }
    box.replaceChildren(
      h(
        "div",
        { class: "cards", id: "device-counts" },
        card("devices", fleet.devices),
        card("online", fleet.online),
        card("offline", Math.max(0, fleet.active - fleet.online)),
        card("on MQTT", fleet.online_mqtt),
        card("on the data channel", fleet.online_data),
        card("registering", fleet.registering),
        card("disabled", fleet.disabled),
        card("invalidated", fleet.invalidated),
      ),
      h("h2", {}, "Jobs in the last hour"),
      h(
        "div",
        { class: "cards", id: "job-counts" },
        transitions.size
          ? [...transitions.entries()].map(([state, n]) => card(`→ ${state}`, n))
          : h("p", { class: "muted" }, "No job changed state in the last hour."),
        Object.entries(fleet.open_jobs).map(([state, n]) => card(`open, ${state}`, n)),
      ),
      h("h2", {}, "Submission to completion"),
      latencyChart(fleet.minutes),
      h("h2", {}, "Devices by customer and model"),
      table(
        ["Customer", "Model", "Devices"],
        fleet.groups.map((g) => [
          h("a", { href: `#/devices?q=${enc(g.customer)}` }, g.customer),
          g.model,
          g.devices,
        ]),
      ),
    );
  };
  await draw();
  // Redrawn at most every 2 s while events come in.
  let pending = null;
  onLive(() => {
    if (pending) return;
    pending = setTimeout(() => {
      pending = null;
      draw().catch(() => {});
    }, 2000);
  });
  addCleanup(() => clearTimeout(pending));
  show("Overview", box);
}

const PAGE = 50;

export async function deviceList() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const search = h("input", { id: "search", type: "search", value: params.get("q") || "" });
  const condition = h(
    "select",
    { id: "condition" },
    ["any", "active", "registering", "disabled", "invalidated"].map((c) =>
      h("option", { value: c }, c),
    ),
  );
  // The cursors of the pages shown so far: the bridge answers a page after a device.
  let cursors = [null];
  const results = h("div", { id: "device-results" });
  let drawn = 0;
  const draw = async () => {
    const mine = ++drawn;
    const query = new URLSearchParams({ limit: String(PAGE + 1) });
    if (search.value.trim()) query.set("q", search.value.trim());
    if (condition.value !== "any") query.set("condition", condition.value);
    const after = cursors[cursors.length - 1];
    if (after) query.set("after", after);
    const page = await api("GET", `/v1/devices?${query}`);
    if (mine !== drawn) return; // a newer search is on its way
    const more = page.length > PAGE;
    const shown = page.slice(0, PAGE);
    results.replaceChildren(
      table(
        ["Device", "Serial", "Model", "Customer", "Condition", "Connection", "Last status"],
        shown.map((d) => [
          h("a", { href: `#/devices/${enc(d.device_id)}` }, d.device_id),
          d.serial,
          d.model,
          d.customer,
          d.condition,
          presence(d),
          d.last_status_at ? time(d.last_status_at) : "—",
        ]),
        `Page ${cursors.length}: ${shown.length} devices${more ? ", more after" : ""}`,
      ),
      h(
        "div",
        { class: "toolbar" },
        h("button", { type: "button", class: "secondary", disabled: cursors.length === 1,
          onclick: () => { cursors.pop(); draw(); } }, "Previous page"),
        h("button", { type: "button", class: "secondary", disabled: !more,
          onclick: () => { cursors.push(shown[shown.length - 1].device_id); draw(); } },
          "Next page"),
      ),
    );
  };
  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { cursors = [null]; draw(); }, 250);
  });
  condition.addEventListener("change", () => { cursors = [null]; draw(); });
  await draw();
  show(
    "Devices",
    h(
      "div",
      { class: "toolbar" },
      h("label", { for: "search" }, "Search id, serial, model or customer", search),
      h("label", { for: "condition" }, "Condition", condition),
    ),
    results,
  );
}

function endpoints(e) {
  if (!e) return "—";
  return `data ${(e.data || []).join(", ") || "—"}; MQTT ${(e.mqtt || []).join(", ") || "none"}`;
}

function reported(r) {
  const report = r.report || r;
  const using = `in use: data ${report.data_in_use || "—"}, MQTT ${report.mqtt_in_use || "—"}`;
  return `revision ${report.revision}: ${endpoints(report.endpoints)}; ${using}${r.at ? ` (at ${time(r.at)})` : ""}`;
}

function jobRows(jobs) {
  return jobs.map((j) => [
    h("a", { href: `#/jobs/${enc(j.job_id)}` }, j.job_id),
    stateCell(j.state),
    time(j.created_at),
    `${j.attempt} of ${j.max_attempts}`,
    j.submitted_by || "—",
    j.outcome || "",
  ]);
}

const JOB_HEADERS = ["Job", "State", "Submitted", "Attempts", "By", "Outcome"];

export async function devicePage(id) {
  const path = `/v1/devices/${enc(id)}`;
  const [device, requests, contracts, settings] = await Promise.all([
    api("GET", path),
    api("GET", `${path}/requests?order=newest&limit=50`),
    api("GET", `${path}/contracts`),
    api("GET", `${path}/settings`),
  ]);
  // The newest jobs a page at a time: a long history is never loaded whole.
  const jobsBox = h("div", { id: "device-jobs" });
  let jobs = [];
  let older = false;
  const fetchJobs = (after) =>
    api("GET", `${path}/jobs?order=newest&limit=${PAGE + 1}${after ? `&after=${enc(after)}` : ""}`);
  const drawJobs = () => {
    const caption = older
      ? `The newest ${jobs.length} jobs; older ones below`
      : `${jobs.length} ${jobs.length === 1 ? "job" : "jobs"}, the newest first`;
    jobsBox.replaceChildren(table(JOB_HEADERS, jobRows(jobs), caption));
    if (older) {
      jobsBox.append(
        h("button", { type: "button", class: "secondary", id: "older-jobs", onclick: async () => {
          const page = await fetchJobs(jobs[jobs.length - 1].job_id);
          older = page.length > PAGE;
          jobs = jobs.concat(page.slice(0, PAGE));
          drawJobs();
        } }, "Older jobs"),
      );
    }
  };
  // The newest page, read again after a transition: its jobs replace what is shown of them,
  // and new ones go on top; older pages already read stay.
  const firstJobs = async () => {
    const page = await fetchJobs(null);
    const top = page.slice(0, PAGE);
    if (jobs.length === 0) {
      older = page.length > PAGE;
      jobs = top;
    } else {
      const known = new Set(jobs.map((j) => j.job_id));
      const fresh = new Map(top.map((j) => [j.job_id, j]));
      jobs = top.filter((j) => !known.has(j.job_id)).concat(jobs.map((j) => fresh.get(j.job_id) || j));
    }
    drawJobs();
  };
  await firstJobs();
  onLive((e) => {
    if (e.payload.device_id === id && e.payload.event === "job_transition") firstJobs();
  });
  const actions = h("div", { class: "toolbar" });
  if (state.session.role === "admin" && !device.disabled) {
    actions.append(
      h("button", { type: "button", class: "secondary", id: "poll-now", onclick: () =>
        act(`Make ${id} poll now?`, () =>
          api("POST", `/v1/customers/${enc(device.customer)}/poll-now`, { devices: [id] })),
      }, "Poll now"),
      h("button", { type: "button", class: "danger", id: "disable", onclick: () =>
        act(`Disable ${id}? It is refused everywhere from now on.`, () =>
          api("POST", `${path}/disable`)).then((done) => done && state.route()),
      }, "Disable device"),
    );
    const name = h("input", { id: "instruction-name", name: "name", autocomplete: "off" });
    const params = h("input", { id: "instruction-params", name: "params", autocomplete: "off",
      placeholder: "key=value, key=value" });
    const form = h("form", { class: "toolbar", id: "instruction" },
      h("label", { for: "instruction-name" }, "Instruction", name),
      h("label", { for: "instruction-params" }, "Parameters", params),
      h("button", { type: "submit", class: "secondary" }, "Send instruction"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const body = { name: name.value.trim(), params: {} };
      for (const pair of params.value.split(",")) {
        const [k, ...v] = pair.split("=");
        if (k.trim()) body.params[k.trim()] = v.join("=").trim();
      }
      act(`Send "${body.name}" to ${id}?`, () => api("POST", `${path}/instructions`, body));
    });
    actions.append(form);
  }
  show(
    `Device ${device.serial}`,
    actions,
    facts([
      ["Id", device.device_id],
      ["Model", device.model],
      ["Customer", device.customer],
      ["Destination / time zone", `${device.destination} / ${device.time_zone}`],
      ["Registered", time(device.registered_at)],
      ["Registration completed", time(device.registration_completed_at)],
      ["Condition", device.condition],
      ["Connection", presence(device)],
      ["Owner", device.owner_id || "—"],
      ["Owner check", device.owner_check ? JSON.stringify(device.owner_check) : "—"],
      ["Invalidated", device.invalidated ? device.invalidated.reason : "—"],
      ["Consent", device.consent ? (device.consent.granted ? "granted" : "withheld") : "not reported"],
      ["Last status", device.last_status ? `${JSON.stringify(device.last_status)} at ${time(device.last_status_at)}` : "—"],
      ["Feed", `newest ${device.feed_newest}, acknowledged ${device.feed_acked}`],
      ["Requests delivered", device.requests_delivered],
    ]),
    h("h2", {}, "Jobs"),
    jobsBox,
    h("h2", {}, "Settings"),
    facts([
      ["Desired", settings.desired
        ? `revision ${settings.desired.revision}: ${endpoints(settings.desired.settings.endpoints)}, set by ${settings.desired.set_by} at ${time(settings.desired.set_at)}`
        : "the factory settings"],
      ["Reported", settings.reported ? reported(settings.reported) : "—"],
      ["Applied", settings.applied ? "yes" : "not yet"],
    ]),
    h("h2", {}, "Contracts"),
    table(
      ["Service", "Application", "Outline", "Changed", "Activated"],
      contracts.map((c) => [
        c.service_id,
        c.application_id || "canceled",
        c.outline,
        time(c.changed_at),
        time(c.activated_at),
      ]),
    ),
    h("h2", {}, "Outbox requests, newest first"),
    table(
      ["No", "Request", "Made", "Received"],
      requests.map((r) => [r.no, JSON.stringify(r.body), time(r.made_at), time(r.received_at)]),
    ),
  );
}

export async function jobPage(id) {
  const path = `/v1/jobs/${enc(id)}`;
  const box = h("div", { id: "job" });
  const draw = async () => {
    const job = await api("GET", path);
    const actions = h("div", { class: "toolbar" });
    const open = ["queued", "delivered", "in_progress"].includes(job.state);
    if (state.session.role === "admin" && open) {
      actions.append(
        h("button", { type: "button", class: "danger", id: "cancel", onclick: () =>
          act(`Cancel job ${id}?`, () =>
            api("POST", `${path}/cancel`, { reason: "canceled from the console" })).then(draw),
        }, "Cancel job"),
      );
    }
    if (state.session.role === "admin" && job.state === "queued") {
      const to = h("input", { id: "move-to", name: "to", autocomplete: "off" });
      const form = h("form", { class: "toolbar", id: "move" },
        h("label", { for: "move-to" }, "Move to device", to),
        h("button", { type: "submit", class: "secondary" }, "Move job"));
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        act(`Move job ${id} to ${to.value.trim()}?`, () =>
          api("POST", `${path}/move`, { to: to.value.trim() })).then(draw);
      });
      actions.append(form);
    }
    box.replaceChildren(
      actions,
      facts([
        ["State", h("span", { id: "job-state", class: `state-${job.state}` }, job.state)],
        ["Device", h("a", { href: `#/devices/${enc(job.device_id)}` }, job.device_id)],
        ["Submitted", `${time(job.created_at)} by ${job.submitted_by || "—"}`],
        ["Expires if not started", time(job.expires_at)],
        ["Attempts", `${job.attempt} of ${job.max_attempts}`],
        ["Payload", `${job.payload_len} bytes, ${job.content_type}`],
        ["Outcome", job.outcome || "—"],
      ]),
      h("h2", {}, "Transitions"),
      h(
        "ol",
        { class: "timeline" },
        job.history.map((t) =>
          h("li", {}, time(t.at), " ", t.from ? `${t.from} → ` : "", stateCell(t.to),
            ` (attempt ${t.attempt})`, t.reason ? ` — ${t.reason}` : ""),
        ),
      ),
    );
  };
  await draw();
  onLive((e) => {
    if (e.payload.job_id === id) draw();
  });
  show(`Job ${id}`, box);
}

export async function applicationsPage() {
  const box = h("div", { id: "applications" });
  const draw = async () => {
    const apps = await api("GET", "/v1/applications");
    box.replaceChildren(
      ...(apps.length ? [] : [h("p", { class: "muted" }, "No application yet.")]),
      ...apps.flatMap((a) => [
        h("h2", {}, `${a.service_id} for ${a.customer}`),
        facts([
          ["Application", a.application_id],
          ["Made", time(a.created_at)],
          ["Codes expire", time(a.expires_at)],
          ["Progress", `${a.registered} registered, ${a.failed} failed, ${a.pending} pending${a.settled ? " (settled)" : ""}`],
        ]),
        table(
          ["Device", "Model", "Where it stands", "Instruction taken", "Refused attempts"],
          a.devices.map((d) => [
            h("a", { href: `#/devices/${enc(d.device_id)}` }, d.device_id),
            d.model,
            d.state === "registered"
              ? `registered at ${time(d.at)}`
              : d.state === "failed"
                ? `failed: ${d.reason}`
                : d.state,
            time(d.taken_at),
            (d.refusals || []).length,
          ]),
        ),
      ]),
    );
  };
  await draw();
  onLive((e) => {
    if (e.payload.application_id) draw().catch(() => {});
  });
  show("Applications", box);
}

function heldState(s) {
  if (s.state === "released") return `released to ${s.device_id} at ${time(s.at)}`;
  if (s.state === "expired") return `expired at ${time(s.at)}`;
  return "held";
}

export async function heldPage() {
  const users = await api("GET", "/v1/users");
  const box = h("div", { id: "held" });
  if (users.length === 0) box.append(h("p", { class: "muted" }, "No user of held printing yet."));
  for (const u of users) {
    const jobs = await api("GET", `/v1/users/${enc(u.user_id)}/held-jobs`);
    box.append(
      h("h2", {}, `${u.name} (${u.user_id})`),
      table(
        ["Job", "Title", "Submitted", "Expires", "Where it stands"],
        jobs.map((j) => [
          j.state.state === "released"
            ? h("a", { href: `#/jobs/${enc(j.job_id)}` }, j.job_id)
            : j.job_id,
          j.title,
          time(j.created_at),
          time(j.expires_at),
          heldState(j.state),
        ]),
        jobs.length ? null : "Nothing held",
      ),
    );
  }
  show("Held print jobs", box);
}

/** How a recorded action was answered; none: the bridge stopped before it answered. */
function answer(status) {
  if (status === null || status === undefined) {
    return "no answer (the bridge stopped)";
  }
  return status < 300 ? `${status} done` : `${status} refused`;
}

export async function actionsPage() {
  const actions = await api("GET", "/console/actions");
  show(
    "Console actions",
    h("p", { class: "muted" }, "Every change asked for through the console, newest first: the newest 1,000, kept on the bridge's disk for the retention its configuration sets."),
    table(
      ["When", "By", "Request", "Answer"],
      actions.map((a) => [time(a.at), a.by, `${a.method} ${a.path}`, answer(a.status)]),
    ),
  );
}

const MAX_SHOWN = 500;

export async function eventsPage() {
  const shown = [];
  const held = [];
  let paused = false;
  const filter = h("input", { id: "event-filter", type: "search" });
  const list = h("ol", { id: "event-list", class: "events", reversed: true, "aria-live": "polite" });
  const pause = h("button", { type: "button", id: "pause", class: "secondary" }, "Pause");
  const count = h("span", { class: "muted", id: "held" });
  const matches = (e) => {
    const q = filter.value.trim().toLowerCase();
    return !q || e.topic.toLowerCase().includes(q) || JSON.stringify(e.payload).toLowerCase().includes(q);
  };
  const line = (e) =>
    h("li", {}, time(e.payload.at || Date.now()), " ", h("strong", {}, e.topic), " ",
      JSON.stringify(e.payload));
  const draw = () => {
    list.replaceChildren(...shown.filter(matches).slice(0, MAX_SHOWN).map(line));
    count.textContent = paused ? `${held.length} new events held while paused` : "";
  };
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) shown.unshift(...held.splice(0).reverse());
    shown.length = Math.min(shown.length, 10 * MAX_SHOWN);
    draw();
  });
  filter.addEventListener("input", draw);
  onLive((e) => {
    if (paused) held.push(e);
    else {
      shown.unshift(e);
      shown.length = Math.min(shown.length, 10 * MAX_SHOWN);
    }
    draw();
  });
  show(
    "Live events",
    h("div", { class: "toolbar" }, h("label", { for: "event-filter" }, "Filter", filter), pause, count),
    list,
  );
}
