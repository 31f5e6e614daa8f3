// breakglass receiver viewer: small shared helpers (DOM, times, the login and its CSRF token).
// An ES module; no build step, no external resources (the page's CSP forbids them).

// Who is logged in (GET /v1/me): name, role and the CSRF token every POST carries.
export const me = { user: null, role: null, csrf: null };

const ROLES = ["officer", "dispatcher", "admin"]; // each includes the ones before it

export function roleAtLeast(role) {
  return ROLES.indexOf(me.role) >= ROLES.indexOf(role) && ROLES.includes(me.role);
}

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function button(text, className, onClick) {
  const b = el("button", className, text);
  b.type = "button";
  if (onClick) b.addEventListener("click", onClick);
  return b;
}

// Seconds since the epoch as the local time of day ("?" if unknown).
export function clock(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "?";
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

// Seconds since the epoch as the local time, with the date when it is not today.
export function when(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "?";
  const d = new Date(seconds * 1000);
  const time = d.toLocaleTimeString([], { hour12: false });
  return d.toDateString() === new Date().toDateString() ? time : `${d.toLocaleDateString()} ${time}`;
}

// How long ago, in words ("12 s ago").
export function ago(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 120) return `${Math.round(s)} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

// How long from now, in words ("in 12 days"); a time already passed as ago() says it.
export function until(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  const s = seconds - Date.now() / 1000;
  if (s <= 0) return ago(seconds);
  if (s < 120) return `in ${Math.round(s)} s`;
  if (s < 7200) return `in ${Math.round(s / 60)} min`;
  if (s < 172800) return `in ${(s / 3600).toFixed(1)} h`;
  return `in ${Math.round(s / 86400)} days`;
}

// An ISO-8601 time as seconds since the epoch (NaN if unreadable).
export function isoSeconds(iso) {
  return typeof iso === "string" ? Date.parse(iso) / 1000 : NaN;
}

// The session ended (logout elsewhere, expiry, account disabled): back to the login page.
export function checkLoggedIn(res) {
  if (res.status === 401) {
    location.assign("/login");
    throw new Error("logged out");
  }
}

// A poll that hangs (a receiver wedged, a connection dead without a reset) must fail,
// or the page goes on showing "updated" and no new alarm.
const FETCH_TIMEOUT_MS = 5000;

export async function getJson(url) {
  const res = await fetch(url, {
    cache: "no-store",
    credentials: "same-origin",
    signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
  });
  checkLoggedIn(res);
  return res;
}

// A state change: the session's CSRF token in X-CSRF-Token (the server refuses it without);
// `body`, if given, goes as JSON. The browser adds the Origin header itself.
export async function post(url, body) {
  const headers = { "X-CSRF-Token": me.csrf || "" };
  const init = { method: "POST", headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(url, init);
  checkLoggedIn(res);
  return res;
}

// The JSON error of a refused request, as one line ("forbidden: this needs ...").
export async function errorText(res) {
  try {
    const body = await res.json();
    if (body && body.error) return body.detail ? `${body.error}: ${body.detail}` : body.error;
  } catch (err) {
    // not JSON: fall through
  }
  return `HTTP ${res.status}`;
}

export async function loadMe() {
  const res = await getJson("/v1/me");
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  const body = await res.json();
  me.user = body.user;
  me.role = body.role;
  me.csrf = body.csrf_token;
  return me;
}

// The header of a logged-in page: the Log out button now; who is logged in, and the Accounts
// link for admins (the server refuses the rest anyway), once `loadMe` has answered.
export function wireLogout() {
  document.getElementById("logout").addEventListener("click", async () => {
    try {
      await post("/logout");
    } finally {
      location.assign("/login");
    }
  });
}

export function showUser() {
  document.getElementById("user").textContent = `${me.user} (${me.role})`;
  const accounts = document.getElementById("accounts-link");
  if (accounts) accounts.hidden = !roleAtLeast("admin");
}

// A status line under a form: `isError` colours it.
export function say(node, text, isError) {
  node.textContent = text;
  node.classList.toggle("error", Boolean(isError));
}
