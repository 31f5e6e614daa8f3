// breakglass receiver: change one's own password (POST /v1/me/password). The receiver checks
// the current password like a login (wrong ones count toward the lockout) and ends every
// session of the account on success, so the user logs in again.

import { loadMe, me, post, say, showUser, wireLogout } from "./util.js";

const MESSAGES = {
  wrong_password: "The current password is wrong.",
  locked: "Too many wrong passwords: your name is locked for a while.",
  rate_limited: "Too many wrong passwords from this computer: wait a few minutes.",
  same_password: "The new password must differ from the current one.",
  malformed: "Fill in every field.",
};

const form = document.getElementById("password-form");
const message = document.getElementById("message");
const field = (id) => document.getElementById(id);

async function refused(res) {
  let body = {};
  try { body = await res.json(); } catch (err) { body = { error: `HTTP ${res.status}` }; }
  const text = MESSAGES[body.error] || (body.detail ? `${body.detail}.` : `Refused (${body.error}).`);
  const wait = body.retry_after_s ? ` Try again in ${Math.ceil(body.retry_after_s / 60)} min.` : "";
  say(message, text + wait, true);
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault(); // never a real form submission (the page's CSP forbids it too)
  const current = field("current").value;
  const fresh = field("new").value;
  if (!current || !fresh) return say(message, MESSAGES.malformed, true);
  if (fresh !== field("again").value) return say(message, "The two new passwords differ.", true);
  const submit = field("change");
  submit.disabled = true;
  say(message, "Checking…", false);
  try {
    const res = await post("/v1/me/password", { current, new: fresh });
    if (res.ok) {
      form.hidden = true;
      say(message, "", false);
      field("done").hidden = false;
      field("logout").hidden = true; // the session has ended already
      field("relogin").focus();
      return;
    }
    await refused(res);
    field("current").value = "";
    field("current").focus();
  } catch (err) {
    say(message, `Receiver unreachable: ${err.message}`, true);
  } finally {
    submit.disabled = false;
  }
});

wireLogout();
loadMe()
  .then(() => {
    showUser();
    field("password-user").value = me.user; // for password managers
  })
  .catch((err) => say(message, `Receiver unreachable: ${err.message}`, true));
