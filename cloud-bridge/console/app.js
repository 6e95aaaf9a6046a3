// The operator console: one page, its screens chosen by the address's #fragment. Everything it
// shows comes from the admin API (`/v1/...`, with the session cookie) and the live event
// stream (`/console/events`).

import { api, errorLine, h, leaveScreen, listeners, show, state } from "/console/lib.js";
import {
  actionsPage, applicationsPage, deviceList, devicePage, eventsPage, heldPage, jobPage, overview,
} from "/console/screens.js";

const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signOutButton = document.getElementById("sign-out");

let live = null;


function startLive() {
  if (live) return;
  live = new EventSource("/console/events");
  live.addEventListener("ops", (e) => {
    const event = JSON.parse(e.data);
    for (const f of listeners) f(event);
  });
  live.addEventListener("missed", (e) => {
    for (const f of listeners) f({ topic: "console/missed", payload: { missed: Number(e.data) } });
  });
}

function stopLive() {
  if (live) live.close();
  live = null;
}



function signedIn(s) {
  state.session = s;
  nav.hidden = false;
  signOutButton.hidden = false;
  who.textContent = s.role === "admin" ? "Signed in as admin" : `Signed in as ${s.ops_id} (read only)`;
  startLive();
  route();
}

function signedOut() {
  state.session = null;
  stopLive();
  nav.hidden = true;
  signOutButton.hidden = true;
  who.textContent = "";
  signInScreen();
}

signOutButton.addEventListener("click", async () => {
  try {
    await api("DELETE", "/console/session");
  } finally {
    signedOut();
  }
});

function signInScreen(message) {
  const mode = h(
    "select",
    { id: "mode", name: "mode" },
    h("option", { value: "admin" }, "Admin token"),
    h("option", { value: "ops" }, "Ops login"),
  );
  const token = h("input", { id: "token", name: "token", type: "password", autocomplete: "off" });
  const opsId = h("input", { id: "ops-id", name: "ops_id", autocomplete: "username" });
  const password = h("input", {
    id: "password",
    name: "password",
    type: "password",
    autocomplete: "current-password",
  });
  const adminFields = h("div", {}, h("label", { for: "token" }, "Admin token", token));
  const opsFields = h(
    "div",
    { hidden: true },
    h("label", { for: "ops-id" }, "Ops login id", opsId),
    h("label", { for: "password" }, "Password", password),
  );
  mode.addEventListener("change", () => {
    adminFields.hidden = mode.value !== "admin";
    opsFields.hidden = mode.value !== "ops";
  });
  const status = h("p", { role: "alert", class: "error" }, message || "");
  const form = h(
    "form",
    { class: "stack", id: "sign-in" },
    h("label", { for: "mode" }, "Sign in with", mode),
    adminFields,
    opsFields,
    h("button", { type: "submit" }, "Sign in"),
    status,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body =
      mode.value === "admin"
        ? { token: token.value }
        : { ops_id: opsId.value.trim(), password: password.value };
    try {
      signedIn(await api("POST", "/console/session", body));
    } catch (err) {
      status.textContent = err.status === 401 ? "Those credentials were refused." : err.message;
    }
  });
  show("Sign in", form);
}



const routes = [
  [/^$/, overview],
  [/^devices$/, deviceList],
  [/^devices\/([^/]+)$/, devicePage],
  [/^jobs\/([^/]+)$/, jobPage],
  [/^events$/, eventsPage],
  [/^applications$/, applicationsPage],
  [/^held$/, heldPage],
  [/^actions$/, actionsPage],
];

function route() {
  leaveScreen();
  if (!state.session) return signInScreen();
  const path = decodeURIComponent(location.hash.replace(/^#\/?/, "").split("?")[0]);
  for (const a of nav.querySelectorAll("a")) {
    const here = a.getAttribute("href") === `#/${path.split("/")[0]}`;
    if (here) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  for (const [pattern, screen] of routes) {
    const m = path.match(pattern);
    if (m) {
      screen(...m.slice(1)).catch((e) => show("Something went wrong", errorLine(e)));
      return;
    }
  }
  show("Not found", h("p", {}, "No such screen. ", h("a", { href: "#/" }, "Overview")));
}

window.addEventListener("hashchange", route);


state.signedOut = signedOut;
state.route = route;
api("GET", "/console/session").then(signedIn, () => signedOut());
