// breakglass receiver: the admins' accounts page. Lists the accounts (GET /v1/users) and
// changes them through the admin API (POST /v1/users, /v1/users/NAME/disable|enable|role|
// password), each POST with the session's CSRF token (util.post). The receiver refuses an
// admin disabling or demoting themselves, and any change that leaves no enabled admin.

import {
  button, el, errorText, getJson, loadMe, me, post, say, showUser, when, wireLogout,
} from "./util.js";

const ROLES = ["officer", "dispatcher", "admin"];
const message = document.getElementById("message");
const tbody = document.getElementById("users");

function fillRoles(select, value) {
  for (const role of ROLES) {
    const opt = el("option", null, role);
    opt.value = role;
    select.append(opt);
  }
  select.value = value;
  return select;
}

// POST, then say what happened and list the accounts again; whether it was done.
async function change(url, body, done) {
  try {
    const res = await post(url, body);
    if (!res.ok) {
      say(message, await errorText(res), true);
      return false;
    }
    say(message, done, false);
    return true;
  } catch (err) {
    say(message, `Receiver unreachable: ${err.message}`, true);
    return false;
  } finally {
    await refresh();
  }
}

function stateText(u) {
  const parts = [u.disabled ? "disabled" : "enabled"];
  if (u.locked_until) parts.push(`locked until ${when(u.locked_until)}`);
  return parts.join(", ");
}

function passwordForm(u, actions) {
  const form = el("form", "set-password");
  form.noValidate = true;
  const input = el("input");
  input.type = "password";
  input.autocomplete = "new-password";
  input.maxLength = 1024;
  input.placeholder = `new password for ${u.name}`;
  input.setAttribute("aria-label", `new password for ${u.name}`);
  const save = el("button", null, "Set");
  save.type = "submit";
  form.append(input, save, button("Cancel", null, () => form.remove()));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    save.disabled = true;
    const url = `/v1/users/${encodeURIComponent(u.name)}/password`;
    await change(url, { password: input.value }, `New password set for ${u.name}; their sessions have ended.`);
  });
  actions.append(form);
  input.focus();
}

function row(u) {
  const self = u.name === me.user;
  const tr = el("tr", u.disabled ? "disabled" : "");
  tr.dataset.name = u.name;
  const name = el("td");
  name.append(el("span", "name", u.name));
  if (self) name.append(el("span", "you", " (you)"));
  const role = fillRoles(el("select"), u.role);
  role.setAttribute("aria-label", `role of ${u.name}`);
  role.disabled = self; // the receiver refuses an admin demoting themselves
  role.addEventListener("change", () => {
    const url = `/v1/users/${encodeURIComponent(u.name)}/role`;
    change(url, { role: role.value }, `${u.name} is now ${role.value}.`);
  });
  const roleCell = el("td");
  roleCell.append(role);
  const state = el("td", u.locked_until ? "state locked" : "state", stateText(u));
  const last = el("td", "last-login", u.last_login ? when(u.last_login) : "never");
  const actions = el("div", "actions");
  const verb = u.disabled ? "enable" : "disable";
  const toggle = button(u.disabled ? "Enable" : "Disable", verb, () => {
    const url = `/v1/users/${encodeURIComponent(u.name)}/${verb}`;
    change(url, undefined, `${u.name} ${verb}d${verb === "disable" ? "; their sessions have ended" : ""}.`);
  });
  toggle.disabled = self;
  if (self) {
    const own = el("a", "button", "Change password");
    own.href = "/password";
    actions.append(toggle, own);
  } else {
    const setPassword = button("Set password…", "set-password", () => {
      if (!actions.querySelector("form")) passwordForm(u, actions);
    });
    actions.append(toggle, setPassword);
  }
  const actionCell = el("td");
  actionCell.append(actions);
  tr.append(name, roleCell, state, last, actionCell);
  return tr;
}

async function refresh() {
  try {
    const res = await getJson("/v1/users");
    if (!res.ok) {
      say(message, await errorText(res), true);
      return;
    }
    const { users } = await res.json();
    tbody.replaceChildren(...users.map(row));
  } catch (err) {
    say(message, `Receiver unreachable: ${err.message}`, true);
  }
}

const addForm = document.getElementById("add-form");
const addRole = fillRoles(document.getElementById("add-role"), "officer");
addForm.addEventListener("submit", async (ev) => {
  ev.preventDefault(); // never a real form submission (the page's CSP forbids it too)
  const name = document.getElementById("add-name").value.trim();
  const password = document.getElementById("add-password");
  const role = addRole.value;
  if (!name || !password.value) return say(message, "Enter a name and a password.", true);
  const added = await change("/v1/users", { name, role, password: password.value },
    `Added ${name} (${role}).`);
  if (added) addForm.reset();
  else password.value = "";
});

wireLogout();
loadMe()
  .then(() => {
    showUser();
    return refresh();
  })
  .catch((err) => say(message, `Receiver unreachable: ${err.message}`, true));
