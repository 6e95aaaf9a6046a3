// The console's building blocks: making elements, calling the API, confirming changes, and the
// live events a screen listens to while it is shown. Text from the bridge is only ever set as
// text, never as markup.

const main = document.getElementById("main");

/// What the screens share with the page: who is signed in, and how to sign out or redraw.
export const state = { session: null, signedOut: () => {}, route: () => {} };

/// The live event listeners, and what undoes a screen's when it is left.
export const listeners = new Set();
let cleanups = [];

export function leaveScreen() {
  for (const f of cleanups) f();
  cleanups = [];
}

export function addCleanup(f) {
  cleanups.push(f);
}


export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function show(title, ...content) {
  document.title = `${title} · Fleet console`;
  actionStatus.textContent = "";
  main.replaceChildren(h("h1", {}, title), actionStatus, ...content);
  main.focus();
}

export function time(ms) {
  if (!ms) return "—";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function stateCell(state) {
  return h("span", { class: `state-${state}` }, state);
}

export function table(headers, rows, caption) {
  return h(
    "table",
    {},
    caption ? h("caption", { class: "muted" }, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))),
  );
}

export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

export function errorLine(e) {
  return h("p", { class: "error", role: "alert" }, e.message || String(e));
}

const actionStatus = h("p", { id: "action-status", role: "status", class: "muted" });

/// Carries out a change once the operator confirmed it, and says how it went.
export async function act(question, change) {
  if (!confirm(question)) return null;
  try {
    const answer = await change();
    actionStatus.className = "muted";
    actionStatus.textContent = `Done: ${question.replace(/\?$/, "")}.`;
    return answer;
  } catch (e) {
    actionStatus.className = "error";
    actionStatus.textContent = `Refused: ${e.message}`;
    return null;
  }
}


class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? `${body.code}: ${body.message}` : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

export async function api(method, path, body) {
  const headers = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method !== "GET" && state.session) headers["x-csrf-token"] = state.session.csrf;
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const value = text ? JSON.parse(text) : null;
  if (response.status === 401 && path !== "/console/session") {
    state.signedOut();
    throw new ApiError(401, value);
  }
  if (!response.ok) throw new ApiError(response.status, value);
  return value;
}

export const enc = encodeURIComponent;

/// Calls `f` with each live event until the screen changes.
export function onLive(f) {
  listeners.add(f);
  addCleanup(() => listeners.delete(f));
}
