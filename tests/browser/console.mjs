// The operator console in a real browser (Debian's Chromium, headless, driven by Playwright),
// against a live bridge that tests/tests/browser.rs starts with simulated devices. It signs in
// with the keyboard, finds a device, watches a job go from queued to succeeded on its page
// without reloading, cancels a queued job, sees live events arrive (and wait while paused),
// and checks that a read-only ops login is refused a change. Every screen is checked with
// axe-core (labels, contrast, roles) and saved as a screenshot.
//
// Environment: CONSOLE_URL, ADMIN_TOKEN, OPS_ID, OPS_PASSWORD, LIVE_DEVICE and LIVE_SERIAL (a
// device that runs jobs, slowly), IDLE_DEVICE (a registered device that is offline: its jobs
// stay queued), SCREENSHOTS (a folder), CHROMIUM (default /usr/bin/chromium).

import { readFileSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const url = env("CONSOLE_URL");
const origin = new URL(url).origin;
const adminToken = env("ADMIN_TOKEN");
const liveDevice = env("LIVE_DEVICE");
const liveSerial = env("LIVE_SERIAL");
const idleDevice = env("IDLE_DEVICE");
const shots = env("SCREENSHOTS");
mkdirSync(shots, { recursive: true });

const require = createRequire(import.meta.url);
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

const WAIT = { timeout: 20_000 };

function check(condition, message) {
  if (!condition) throw new Error(message);
}

/// Calls the admin API as a cloud component would (with the admin token, not the browser).
async function admin(method, path, body) {
  const response = await fetch(origin + path, {
    method,
    headers: { authorization: `Bearer ${adminToken}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  check(response.ok, `${method} ${path}: ${response.status} ${text}`);
  return JSON.parse(text);
}

const submit = (device, text) =>
  admin("POST", `/v1/devices/${device}/jobs`, { payload: text, content_type: "text/plain" });

/// axe-core's findings on the page as it is now: none of impact serious or critical.
async function accessible(page, screen) {
  await page.evaluate(axeSource);
  const result = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ["violations"] });
    return r.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      nodes: v.nodes.map((n) => n.target.join(" ")).slice(0, 3),
    }));
  });
  const bad = result.filter((v) => v.impact === "serious" || v.impact === "critical");
  check(bad.length === 0, `${screen}: accessibility violations ${JSON.stringify(bad)}`);
  console.log(`${screen}: no serious accessibility violation (${result.length} minor)`);
}

async function screenshot(page, name) {
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("response", (r) => {
    const signedOut = r.status() === 401 && r.url().endsWith("/console/session");
    if (r.status() >= 400 && !signedOut) problems.push(`${r.status()} from ${r.url()}`);
  });
  page.on("dialog", (d) => d.accept());

  // Sign in with the keyboard only: Tab to the token, type it, Enter.
  await page.goto(url);
  await page.getByRole("heading", { name: "Sign in" }).waitFor(WAIT);
  await accessible(page, "sign-in");
  await screenshot(page, "sign-in");
  let tabs = 0;
  while (!(await page.evaluate(() => document.activeElement?.id === "token"))) {
    check(++tabs <= 10, "the token field is not reachable with Tab");
    await page.keyboard.press("Tab");
  }
  await page.keyboard.type(adminToken);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Overview" }).waitFor(WAIT);
  check(
    (await page.locator("#device-counts .card").first().innerText()).includes("devices"),
    "the overview counts devices",
  );
  await accessible(page, "overview");

  // Find the device by its serial.
  await page.getByRole("link", { name: "Devices" }).click();
  await page.getByLabel("Search id, serial, model or customer").fill(liveSerial);
  const row = page.locator("#device-results tbody tr");
  await page
    .waitForFunction(
      (serial) => {
        const rows = document.querySelectorAll("#device-results tbody tr");
        return rows.length === 1 && rows[0].textContent.includes(serial);
      },
      liveSerial,
      WAIT,
    )
    .catch(async () => {
      throw new Error(`the search for ${liveSerial} shows ${await row.count()} devices`);
    });
  await accessible(page, "devices");
  await screenshot(page, "devices");
  await page.getByRole("link", { name: liveDevice }).click();
  await page.getByRole("heading", { name: `Device ${liveSerial}` }).waitFor(WAIT);

  // A job submitted now appears on the device page, and its own page follows it to the end,
  // without the page being loaded again.
  await page.evaluate(() => {
    window.notReloaded = true;
  });
  const job = await submit(liveDevice, "watched from the console");
  const link = page.getByRole("link", { name: job.job_id });
  await link.waitFor(WAIT);
  await link.click();
  const state = page.locator("#job-state");
  await state.waitFor(WAIT);
  const first = await state.innerText();
  check(first !== "succeeded", `the job was already done when its page opened (${first})`);
  await page.waitForFunction(
    () => document.getElementById("job-state")?.textContent === "succeeded",
    null,
    WAIT,
  );
  check(await page.evaluate(() => window.notReloaded === true), "the page was reloaded");
  console.log(`job ${job.job_id}: ${first} → succeeded on its page, live`);
  await accessible(page, "job");
  await screenshot(page, "job");
  await page.getByRole("link", { name: liveDevice }).click();
  await page.getByRole("heading", { name: `Device ${liveSerial}` }).waitFor(WAIT);
  check(!(await page.locator("#device-jobs").innerText()).includes("null"), "stray text on the device page");
  await accessible(page, "device");
  await screenshot(page, "device");

  // Cancel a queued job (the device is offline), confirmed in the dialog.
  const queued = await submit(idleDevice, "to be canceled");
  await page.goto(`${url}#/jobs/${queued.job_id}`);
  await page.getByRole("button", { name: "Cancel job" }).click();
  await page.waitForFunction(
    () => document.getElementById("job-state")?.textContent === "canceled",
    null,
    WAIT,
  );
  const canceled = await admin("GET", `/v1/jobs/${queued.job_id}`);
  check(canceled.state === "canceled", `the bridge says ${canceled.state}`);

  // Move a queued job to the device that prints: it is done there.
  const stuck = await submit(idleDevice, "to be moved");
  await page.goto(`${url}#/jobs/${stuck.job_id}`);
  await page.getByLabel("Move to device").fill(liveDevice);
  await page.getByRole("button", { name: "Move job" }).click();
  await page.getByRole("link", { name: liveDevice }).waitFor(WAIT);
  await page.waitForFunction(
    () => document.getElementById("job-state")?.textContent === "succeeded",
    null,
    WAIT,
  );

  // An instruction and a poll-now for the offline device, from its page.
  await page.goto(`${url}#/devices/${idleDevice}`);
  await page.getByLabel("Instruction").fill("reboot");
  await page.getByLabel("Parameters").fill("at=now");
  await page.getByRole("button", { name: "Send instruction" }).click();
  await page.getByText(`Done: Send "reboot" to ${idleDevice}.`).waitFor(WAIT);
  const box = await admin("GET", `/v1/devices/${idleDevice}/instructions`);
  check(box.some((i) => i.body?.name === "reboot" || JSON.stringify(i).includes("reboot")),
    `the mailbox holds ${JSON.stringify(box)}`);
  await page.getByRole("button", { name: "Poll now" }).click();
  await page.getByText(`Done: Make ${idleDevice} poll now.`).waitFor(WAIT);

  // Live events arrive; while paused they are held, not lost.
  await page.getByRole("link", { name: "Live events" }).click();
  await page.getByRole("heading", { name: "Live events" }).waitFor(WAIT);
  const list = page.locator("#event-list");
  const seen = await submit(idleDevice, "an event to see");
  await list.getByText(seen.job_id).first().waitFor(WAIT);
  await page.getByRole("button", { name: "Pause" }).click();
  const held = await submit(idleDevice, "an event held while paused");
  await page.getByText("1 new events held while paused").waitFor(WAIT);
  check((await list.getByText(held.job_id).count()) === 0, "a paused list took a new event");
  await page.getByRole("button", { name: "Resume" }).click();
  await list.getByText(held.job_id).first().waitFor(WAIT);
  await accessible(page, "events");
  await screenshot(page, "events");

  // Applications with each device's progress; users' held jobs and where they stand.
  await page.getByRole("link", { name: "Applications" }).click();
  await page.getByRole("heading", { name: "toner for acme" }).waitFor(WAIT);
  check((await page.locator("#applications tbody tr").count()) === 1, "one device applied for");
  await accessible(page, "applications");
  await screenshot(page, "applications");
  await page.getByRole("link", { name: "Held print jobs" }).click();
  await page.getByText("quarterly report").waitFor(WAIT);
  await accessible(page, "held");
  await screenshot(page, "held");

  // The console's own record of what was changed through it.
  await page.getByRole("link", { name: "Actions" }).click();
  await page.getByText(`POST /v1/jobs/${queued.job_id}/cancel`).waitFor(WAIT);
  await accessible(page, "actions");

  // The overview again, now with a job done: its completion time is on the chart.
  await page.getByRole("link", { name: "Overview" }).click();
  await page.locator("svg#latency-chart").waitFor(WAIT);
  await accessible(page, "overview with a chart");
  await screenshot(page, "overview");
  check(problems.length === 0, problems.join("\n"));

  // A read-only ops login sees the job but gets no cancel, and the bridge refuses one.
  const opsContext = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const ops = await opsContext.newPage();
  await ops.goto(url);
  await ops.getByLabel("Sign in with").selectOption("ops");
  await ops.getByLabel("Ops login id").fill(env("OPS_ID"));
  await ops.getByLabel("Password").fill(env("OPS_PASSWORD"));
  await ops.getByRole("button", { name: "Sign in" }).click();
  await ops.getByText("(read only)").waitFor(WAIT);
  await ops.goto(`${url}#/jobs/${held.job_id}`);
  await ops.locator("#job-state").waitFor(WAIT);
  check((await ops.getByRole("button", { name: "Cancel job" }).count()) === 0, "ops got a cancel");
  const refused = await ops.evaluate(async (id) => {
    const s = await (await fetch("/console/session")).json();
    const r = await fetch(`/v1/jobs/${id}/cancel`, {
      method: "POST",
      headers: { "x-csrf-token": s.csrf },
    });
    return r.status;
  }, held.job_id);
  check(refused === 403, `the bridge answered an ops cancel with ${refused}`);
  const still = await admin("GET", `/v1/jobs/${held.job_id}`);
  check(still.state === "queued", `the job is ${still.state} after the refused cancel`);
  await screenshot(ops, "ops-read-only");
  console.log("console: every browser check passed");
} finally {
  await browser.close();
}
