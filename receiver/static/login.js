// breakglass receiver: the login form. Works without this script too (a plain form POST);
// with it, errors show in place. No inline script: the page's CSP forbids it.
"use strict";

const MESSAGES = {
  invalid_credentials: "Wrong name or password.",
  locked: "Too many failed attempts from this network: this name is locked here for a while.",
  rate_limited: "Too many failed attempts from this computer: wait a few minutes.",
  bad_origin: "The request did not come from this receiver's page.",
  malformed: "Enter a name and a password.",
};

function show(code, retry) {
  const text = MESSAGES[code] || `Login failed (${code}).`;
  const wait = retry ? ` Try again in ${Math.ceil(retry / 60)} min.` : "";
  document.getElementById("message").textContent = text + wait;
}

const form = document.getElementById("login");
// Anyone can send an officer a link to /login?error=...: only our own codes are shown from
// it, never its text (a "this receiver moved, log in at ..." would be read as ours).
const fromUrl = new URLSearchParams(location.search).get("error");
if (fromUrl) {
  if (Object.hasOwn(MESSAGES, fromUrl)) show(fromUrl);
  else document.getElementById("message").textContent = "Login failed.";
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const button = document.getElementById("submit");
  button.disabled = true;
  document.getElementById("message").textContent = "";
  try {
    const res = await fetch("/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        name: document.getElementById("name").value.trim(),
        password: document.getElementById("password").value,
      }),
      credentials: "same-origin",
      cache: "no-store",
    });
    if (res.ok) {
      location.replace("/");
      return;
    }
    let body = {};
    try { body = await res.json(); } catch (err) { body = { error: `HTTP ${res.status}` }; }
    show(body.error || `HTTP ${res.status}`, body.retry_after_s);
    document.getElementById("password").value = "";
    document.getElementById("password").focus();
  } catch (err) {
    show(`receiver unreachable: ${err.message}`);
  } finally {
    button.disabled = false;
  }
});
