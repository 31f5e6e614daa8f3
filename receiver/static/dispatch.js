// The dispatch panel (dispatchers and admins): start, extend or end an emergency for a
// building. The receiver signs the trigger with its dispatch key and pushes it to each
// connected device of the building (POST /v1/dispatch); each device's answer is shown.

import { el, errorText, post, roleAtLeast } from "./util.js";

const ACTIONS = {
  start: "Start an emergency",
  extend: "Extend the emergency",
  end: "End the emergency (all clear)",
};
const MAX_REASON = 200;

function statusText(d) {
  if (d.status === 0) return "not delivered";
  if (d.status >= 200 && d.status < 300) return `${d.status} accepted`;
  return `${d.status} refused`;
}

export class DispatchPanel {
  constructor(root) {
    this.root = root;
    this.buildings = [];
    this.pending = null; // the request waiting for confirmation
    this.form = root.querySelector("#dispatch-form");
    this.building = root.querySelector("#dispatch-building");
    this.action = root.querySelector("#dispatch-action");
    this.reason = root.querySelector("#dispatch-reason");
    this.message = root.querySelector("#dispatch-message");
    this.confirmBox = root.querySelector("#dispatch-confirm");
    this.confirmText = root.querySelector("#dispatch-confirm-text");
    this.sendButton = root.querySelector("#dispatch-send");
    this.result = root.querySelector("#dispatch-result");
    for (const [value, label] of Object.entries(ACTIONS)) {
      const opt = el("option", null, label);
      opt.value = value;
      this.action.append(opt);
    }
    this.form.addEventListener("submit", (ev) => {
      ev.preventDefault(); // never a real form submission (the page's CSP forbids it too)
      this.review();
    });
    this.sendButton.addEventListener("click", () => this.send());
    root.querySelector("#dispatch-cancel").addEventListener("click", () => this.cancel());
    this.form.addEventListener("input", () => this.cancel());
  }

  // Shown to dispatchers and admins only (the server checks the role again).
  show() {
    this.root.hidden = !roleAtLeast("dispatcher");
  }

  // The buildings to choose from: {id, online, devices, unverified} from the devices list
  // (devices: those certified for the building; unverified: those that only claim it).
  setBuildings(buildings) {
    const key = buildings.map((b) => `${b.id}:${b.online}/${b.devices}/${b.unverified || 0}`).join(",");
    if (key === this.buildingsKey) return;
    this.buildingsKey = key;
    const chosen = this.building.value;
    const placeholder = el("option", null, buildings.length ? "choose a building…" : "no building known yet");
    placeholder.value = "";
    const options = buildings.map((b) => {
      const unverified = b.unverified ? `; ${b.unverified} unverified, sent nothing` : "";
      const opt = el("option", null, `${b.id} (${b.online} of ${b.devices} device${b.devices === 1 ? "" : "s"} online${unverified})`);
      opt.value = b.id;
      return opt;
    });
    this.building.replaceChildren(placeholder, ...options);
    if (buildings.some((b) => b.id === chosen)) this.building.value = chosen;
  }

  say(text, isError) {
    this.message.textContent = text;
    this.message.classList.toggle("error", Boolean(isError));
  }

  review() {
    const building = this.building.value;
    const action = this.action.value;
    const reason = this.reason.value.trim();
    if (!building) return this.say("Choose a building.", true);
    if (!reason) return this.say("A reason is required (the threat, e.g. \u201c911 call: intruder reported\u201d).", true);
    if (reason.length > MAX_REASON) return this.say(`The reason is at most ${MAX_REASON} characters.`, true);
    this.say("");
    this.pending = { building, action, reason };
    this.confirmText.textContent =
      `${ACTIONS[action]} for building ${building}? Reason: \u201c${reason}\u201d. ` +
      "The receiver signs a dispatch trigger and sends it to the building's connected devices; " +
      "it is recorded with your name.";
    this.confirmBox.hidden = false;
    this.sendButton.focus();
  }

  cancel() {
    this.pending = null;
    this.confirmBox.hidden = true;
  }

  async send() {
    const request = this.pending;
    if (!request) return;
    this.cancel();
    this.sendButton.disabled = true;
    this.say(`Sending \u201c${request.action}\u201d to ${request.building}\u2026`);
    this.result.replaceChildren();
    try {
      const res = await post("/v1/dispatch", request);
      if (!res.ok) {
        this.say(`Refused: ${await errorText(res)}`, true);
        return;
      }
      const body = await res.json();
      const deliveries = Array.isArray(body.deliveries) ? body.deliveries : [];
      this.renderResult(request, deliveries);
      const ok = deliveries.filter((d) => d.status >= 200 && d.status < 300).length;
      const n = deliveries.length;
      this.say(`${ACTIONS[request.action]} for ${request.building}: ${ok} of ${n} device(s) accepted.`, ok === 0);
      if (ok) this.reason.value = "";
    } catch (err) {
      this.say(`Not sent: ${err.message}`, true);
    } finally {
      this.sendButton.disabled = false;
    }
  }

  renderResult(request, deliveries) {
    const table = el("table", "deliveries");
    const head = el("tr");
    for (const h of ["device", "result", "session / error"]) head.append(el("th", null, h));
    table.append(head);
    for (const d of deliveries) {
      const ok = d.status >= 200 && d.status < 300;
      const row = el("tr", ok ? "ok" : "refused");
      row.dataset.device = d.device;
      const detail = ok
        ? (d.session ? `session ${d.session}` : "")
        : [d.error, d.detail].filter(Boolean).join(": ");
      row.append(el("td", null, d.device), el("td", "status", statusText(d)), el("td", "detail", detail));
      table.append(row);
    }
    if (!deliveries.length) {
      const row = el("tr", "refused");
      const cell = el("td", null, "no device answered");
      cell.colSpan = 3;
      row.append(cell);
      table.append(row);
    }
    this.result.replaceChildren(table);
  }
}
