// breakglass receiver viewer: session list, live view (MSE over WebSocket), recordings.
// Plain JavaScript, no build step, no external resources (the page's CSP forbids them).
"use strict";

const POLL_MS = 1500;
const DEVICES_POLL_MS = 3000;
const JUMP_BEHIND_S = 0.5; // further behind live than this: seek to the live edge
const LIVE_EDGE_S = 0.1;
const KEEP_BEHIND_S = 10; // buffer kept behind the playhead; older data is removed
const TRIM_AFTER_S = 30;
const MAX_QUEUE = 300; // unappended messages before the player starts over
const MSE = window.ManagedMediaSource || window.MediaSource;

const sessionViews = new Map(); // session id -> SessionView
const me = { user: null, role: null, csrf: null }; // who is logged in (GET /v1/me)
const alerts = { emergency: false, offline: 0 }; // what the page title announces

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(seconds) {
  if (typeof seconds !== "number") return "?";
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function describeStart(meta) {
  const by = meta && typeof meta.started_by === "object" && meta.started_by ? meta.started_by : {};
  if (by.kind === "share") return "shared continuously (exterior cameras; no emergency)";
  if (by.kind === "button") {
    const where = by.location ? ` (${by.location})` : "";
    return `started by button '${by.button_id || "?"}'${where}`;
  }
  if (by.kind) {
    const why = by.reason ? `: ${by.reason}` : "";
    return `started by ${by.kind}${why}`;
  }
  return "started";
}

function alarmText(session) {
  const meta = session.meta || {};
  const building = meta.building || session.device_id;
  const at = clock(typeof meta.started_at === "number" ? meta.started_at : session.opened_at);
  if (meta.started_by && meta.started_by.kind === "share") {
    return `Exterior cameras — building ${building} — ${describeStart(meta)} since ${at}`;
  }
  return `EMERGENCY — building ${building} — ${describeStart(meta)} at ${at}`;
}

// "complete", or what is missing, declared lost or could not be opened.
function completeness(cam) {
  const out = [cam.complete ? "complete" : `missing ${cam.missing_frames} frames`];
  const declared = (cam.gaps || []).reduce((n, g) => n + g.last - g.first + 1, 0);
  if (declared) out.push(`${declared} declared lost`);
  const bad = (cam.bad_segments || []).length;
  if (bad) out.push(`${bad} unreadable segment${bad > 1 ? "s" : ""}`);
  return out.join(", ");
}

// What a part holds: its sequence numbers, and whether before or after the press.
function partLabel(rec, cam) {
  const live = cam.first_live_seq;
  let what = "";
  if (typeof live === "number") {
    if (rec.last_seq < live) what = " pre-roll";
    else if (rec.first_seq < live) what = " press";
  }
  return `${rec.first_seq}–${rec.last_seq}${what}`;
}

// Why the frame `seq` is not recorded: declared lost by the device, or missing.
function holeKind(cam, seq) {
  const gap = (cam.gaps || []).find((g) => g.first <= seq && seq <= g.last);
  return gap ? `declared ${gap.reason}` : "missing";
}

// One live <video> fed through Media Source Extensions from the camera's WebSocket.
class LivePlayer {
  constructor(video, url, codec, onState) {
    this.video = video;
    this.url = url;
    this.mime = `video/mp4; codecs="${codec}"`;
    this.onState = onState;
    this.queue = [];
    this.stopped = false;
    this.retryMs = 500;
    this.retryTimer = null;
    this.ws = null;
    this.sb = null;
    this.ms = null;
  }

  start() {
    if (!MSE) return this.onState("this browser has no Media Source Extensions");
    if (!MSE.isTypeSupported(this.mime)) return this.onState(`cannot play ${this.mime}`);
    this.queue = [];
    this.sb = null;
    this.ms = new MSE();
    this.video.disableRemotePlayback = true; // needed by ManagedMediaSource
    this.video.src = URL.createObjectURL(this.ms);
    this.ms.addEventListener("sourceopen", () => this.sourceOpen(), { once: true });
    this.onState("connecting…");
  }

  sourceOpen() {
    if (this.stopped) return;
    URL.revokeObjectURL(this.video.src);
    this.sb = this.ms.addSourceBuffer(this.mime);
    this.sb.mode = "segments";
    this.sb.addEventListener("updateend", () => this.afterUpdate());
    this.sb.addEventListener("error", () => this.restart("decoder error"));
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${this.url}`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      this.retryMs = 500;
      this.onState("live");
    };
    ws.onmessage = (ev) => {
      if (!(ev.data instanceof ArrayBuffer)) return;
      this.queue.push(ev.data);
      if (this.queue.length > MAX_QUEUE) return this.restart("fell behind");
      this.pump();
    };
    ws.onclose = () => {
      if (this.ws === ws) this.restart("disconnected");
    };
    this.ws = ws;
  }

  pump() {
    const sb = this.sb;
    if (!sb || sb.updating || this.queue.length === 0) return;
    try {
      sb.appendBuffer(this.queue[0]);
      this.queue.shift();
    } catch (err) {
      if (err.name === "QuotaExceededError") this.trim(true);
      else this.restart(`append failed: ${err.name}`);
    }
  }

  afterUpdate() {
    this.jumpToLive();
    if (!this.trim(false)) this.pump();
  }

  jumpToLive() {
    const b = this.video.buffered;
    if (b.length === 0) return;
    const end = b.end(b.length - 1);
    if (end - this.video.currentTime > JUMP_BEHIND_S) {
      this.video.currentTime = Math.max(b.start(b.length - 1), end - LIVE_EDGE_S);
    }
    if (this.video.paused) this.video.play().catch(() => {});
  }

  // Remove old buffer so memory stays bounded; returns true if a removal started.
  trim(force) {
    const sb = this.sb;
    const b = this.video.buffered;
    if (!sb || sb.updating || b.length === 0) return false;
    const start = b.start(0);
    const now = this.video.currentTime;
    const keep = force ? 1 : KEEP_BEHIND_S;
    if (!force && now - start < TRIM_AFTER_S) return false;
    if (now - keep <= start) return false;
    sb.remove(start, now - keep);
    return true;
  }

  behindLive() {
    const b = this.video.buffered;
    if (!this.sb || b.length === 0) return null;
    return Math.max(0, b.end(b.length - 1) - this.video.currentTime);
  }

  restart(why) {
    this.teardown();
    if (this.stopped) return;
    this.onState(`${why}; reconnecting…`);
    this.retryTimer = setTimeout(() => this.start(), this.retryMs);
    this.retryMs = Math.min(this.retryMs * 2, 5000);
  }

  teardown() {
    clearTimeout(this.retryTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close();
    this.sb = null;
    this.ms = null;
    this.queue = [];
    this.video.removeAttribute("src");
    this.video.load();
  }

  stop() {
    this.stopped = true;
    this.teardown();
  }
}

// One camera of one session: live video, counters, recorded parts.
class CameraTile {
  constructor(sessionId, cam) {
    this.id = cam.camera_id;
    this.root = el("article", "tile");
    const head = el("div", "tile-head");
    head.append(el("span", "cam", cam.camera_id), el("span", `zone ${cam.zone}`, cam.zone));
    this.badge = el("span", "badge");
    head.append(this.badge);
    this.video = el("video", "live");
    this.video.muted = true;
    this.video.autoplay = true;
    this.video.playsInline = true;
    this.video.setAttribute("aria-label", `live view of camera ${cam.camera_id}`);
    this.stats = el("div", "stats");
    this.counts = el("span");
    this.behind = el("span", "behind");
    this.state = el("span");
    this.stats.append(this.counts, " · ", this.behind, " · ", this.state);
    this.actions = el("div", "actions");
    this.recordedButton = el("button", null, "Recorded");
    this.recordedButton.type = "button";
    this.recordedButton.setAttribute("aria-pressed", "false");
    this.recordedButton.addEventListener("click", () => this.toggleRecorded());
    this.links = el("span");
    this.actions.append(this.recordedButton, this.links);
    this.recordedWrap = el("div", "recorded-wrap");
    this.recordedWrap.hidden = true;
    this.recorded = el("video");
    this.recorded.controls = true;
    this.recorded.preload = "metadata";
    this.recordedNote = el("div", "note");
    this.recordedWrap.append(this.recorded, this.recordedNote);
    this.root.append(head, this.video, this.stats, this.actions, this.recordedWrap);
    this.player = null;
    this.cam = cam;
    this.sessionId = sessionId;
  }

  update(cam, sessionOpen) {
    this.cam = cam;
    const live = sessionOpen && cam.recording;
    this.badge.textContent = live ? "LIVE" : "ENDED";
    this.badge.className = `badge ${live ? "live" : "ended"}`;
    this.counts.textContent =
      `${cam.frames_durable} frames (pre-roll ${cam.preroll_frames}, live ${cam.live_frames}) · ` +
      completeness(cam);
    if (live && cam.mse_codec && !this.player) {
      this.player = new LivePlayer(this.video, cam.live_url, cam.mse_codec, (s) => {
        this.state.textContent = s;
      });
      this.player.start();
    } else if (live && !cam.mse_codec) {
      this.state.textContent = "waiting for video";
    } else if (!live && this.player) {
      this.player.stop();
      this.player = null;
    }
    if (!live) this.state.textContent = "recording ended";
    this.renderLinks(cam.recordings || []);
  }

  renderLinks(recordings) {
    const key = recordings.map((r) => `${r.url}:${r.frames}`).join(" ");
    if (key === this.linksKey) return;
    this.linksKey = key;
    this.links.replaceChildren();
    recordings.forEach((rec) => {
      const label = recordings.length > 1 ? partLabel(rec, this.cam) : "download";
      const a = el("a", null, label);
      a.href = rec.url;
      a.download = `${this.sessionId}-${rec.file}`;
      this.links.append(" ", a);
    });
  }

  toggleRecorded() {
    const show = this.recordedWrap.hidden;
    this.recordedWrap.hidden = !show;
    this.recordedButton.setAttribute("aria-pressed", String(show));
    const parts = this.cam.recordings || [];
    if (show && parts.length) {
      this.playPart(parts, 0);
    } else if (!show) {
      this.recorded.pause();
      this.recorded.removeAttribute("src");
      this.recorded.load();
    }
  }

  // Parts play one after the other in sequence order, across runs: the pre-roll,
  // the footage from the press on, what backfill filled in after a skip, and any
  // part a restart began. A hole between two parts is named in the note.
  playPart(parts, i) {
    const part = parts[i];
    this.recorded.src = part.url;
    this.recorded.dataset.part = String(i);
    this.recorded.onended = i + 1 < parts.length ? () => {
      this.playPart(parts, i + 1);
      this.recorded.play().catch(() => {});
    } : null;
    const next = parts[i + 1];
    const hole = next ? next.first_seq - part.last_seq - 1 : 0;
    const after = hole > 0 ? `; then ${hole} frames not here (${holeKind(this.cam, part.last_seq + 1)})` : "";
    this.recordedNote.textContent = parts.length > 1
      ? `part ${i + 1} of ${parts.length}: ${partLabel(part, this.cam)}${after}` : "";
  }

  tick() {
    const behind = this.player ? this.player.behindLive() : null;
    this.behind.textContent = behind === null ? "behind live: –" : `behind live: ${behind.toFixed(1)} s`;
    this.behind.classList.toggle("late", behind !== null && behind > 1);
  }

  destroy() {
    if (this.player) this.player.stop();
    this.player = null;
    this.root.remove();
  }
}

class SessionView {
  constructor(session) {
    this.id = session.session_id;
    this.root = el("section", "session");
    const head = el("div", "session-head");
    this.title = el("h2", "session-title");
    this.sub = el("div", "session-sub");
    head.append(this.title, this.sub);
    this.grid = el("div", "tiles");
    this.root.append(head, this.grid);
    this.tiles = new Map();
  }

  update(session) {
    const meta = session.meta || {};
    this.root.classList.toggle("open", session.open);
    this.title.textContent = session.open
      ? alarmText(session)
      : `Session ${session.session_id} — building ${meta.building || session.device_id}`;
    const ended = session.open ? "open" : `ended ${clock(session.closed_at)} (${session.close_reason || "closed"})`;
    this.sub.textContent =
      `session ${session.session_id} · device ${session.device_id} · opened ${clock(session.opened_at)} · ${ended}`;
    const seen = new Set();
    for (const cam of session.cameras) {
      seen.add(cam.camera_id);
      let tile = this.tiles.get(cam.camera_id);
      if (!tile) {
        tile = new CameraTile(session.session_id, cam);
        this.tiles.set(cam.camera_id, tile);
        this.grid.append(tile.root);
      }
      tile.update(cam, session.open);
    }
    for (const [id, tile] of this.tiles) {
      if (!seen.has(id)) {
        tile.destroy();
        this.tiles.delete(id);
      }
    }
  }

  tick() {
    for (const tile of this.tiles.values()) tile.tick();
  }

  destroy() {
    for (const tile of this.tiles.values()) tile.destroy();
    this.root.remove();
  }
}

function render(sessions) {
  const main = document.getElementById("sessions");
  const alarms = document.getElementById("alarms");
  document.getElementById("empty").hidden = sessions.length > 0;
  const seen = new Set();
  for (const session of sessions) {
    seen.add(session.session_id);
    let view = sessionViews.get(session.session_id);
    if (!view) {
      view = new SessionView(session);
      sessionViews.set(session.session_id, view);
    }
    view.update(session);
  }
  for (const [id, view] of sessionViews) {
    if (!seen.has(id)) {
      view.destroy();
      sessionViews.delete(id);
    }
  }
  // Keep the server's order (newest first); move nodes only when it changed,
  // so playing videos are not disturbed.
  const wanted = sessions.map((s) => sessionViews.get(s.session_id).root);
  const current = Array.from(main.querySelectorAll(":scope > section.session"));
  if (wanted.length !== current.length || wanted.some((node, i) => node !== current[i])) {
    main.append(...wanted);
  }
  const isShare = (s) => s.meta && s.meta.started_by && s.meta.started_by.kind === "share";
  const open = sessions.filter((s) => s.open && !isShare(s));
  alarms.replaceChildren(...open.map((s) => el("p", "alarm-line", alarmText(s))));
  alarms.hidden = open.length === 0;
  alerts.emergency = open.length > 0;
  updateTitle();
}

function updateTitle() {
  if (alerts.emergency) document.title = "● EMERGENCY — breakglass receiver";
  else if (alerts.offline) document.title = `● ${alerts.offline} DEVICE(S) OFFLINE — breakglass receiver`;
  else document.title = "breakglass receiver";
}

// An ISO-8601 time as the local time of day, with the date when it is not today.
function when(iso) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "?";
  const d = new Date(t);
  const time = d.toLocaleTimeString([], { hour12: false });
  return d.toDateString() === new Date().toDateString() ? time : `${d.toLocaleDateString()} ${time}`;
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (Number.isNaN(s)) return "";
  if (s < 120) return `${Math.round(s)} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

// The offline alarm (red banner, one line per device) and one chip per device.
function renderDevices(devices) {
  const banner = document.getElementById("device-alarms");
  const list = document.getElementById("devices");
  const offline = devices.filter((d) => d.offline);
  banner.replaceChildren(...offline.map((d) => el(
    "p", "alarm-line",
    `DEVICE OFFLINE — ${d.device} (building ${d.building || "?"}) — ` +
    `last heard ${when(d.last_heard)} (${ago(d.last_heard)})`,
  )));
  banner.hidden = offline.length === 0;
  list.replaceChildren(...devices.map((d) => {
    const state = d.offline ? "OFFLINE" : d.connected ? "connected" : "disconnected";
    const chip = el("span", `device ${d.offline ? "offline" : d.connected ? "connected" : "quiet"}`,
      `${d.device} · ${d.building || "?"} · ${state} since ${when(d.since)}`);
    chip.title = `last heard ${when(d.last_heard)}${d.session ? ` · session ${d.session}` : ""}`;
    return chip;
  }));
  list.hidden = devices.length === 0;
  alerts.offline = offline.length;
  updateTitle();
}

// The session ended (logout elsewhere, expiry, account disabled): back to the login page.
function checkLoggedIn(res) {
  if (res.status === 401) {
    location.assign("/login");
    throw new Error("logged out");
  }
}

// Requests that change state carry the session's CSRF token (the server refuses them without).
async function post(url) {
  const res = await fetch(url, {
    method: "POST",
    headers: { "X-CSRF-Token": me.csrf || "" },
    credentials: "same-origin",
    cache: "no-store",
  });
  checkLoggedIn(res);
  return res;
}

async function loadMe() {
  const res = await fetch("/v1/me", { cache: "no-store", credentials: "same-origin" });
  checkLoggedIn(res);
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  const body = await res.json();
  me.user = body.user;
  me.role = body.role;
  me.csrf = body.csrf_token;
  document.getElementById("user").textContent = `${me.user} (${me.role})`;
}

document.getElementById("logout").addEventListener("click", async () => {
  try {
    await post("/logout");
  } finally {
    location.assign("/login");
  }
});

async function pollDevices() {
  let again = true;
  try {
    const res = await fetch("/v1/devices", { cache: "no-store" });
    checkLoggedIn(res);
    if (res.status === 404) {
      again = false; // a viewer without device presence: nothing to show
      return;
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    renderDevices((await res.json()).devices);
  } catch (err) {
    setStatus(`receiver unreachable (${err.message}); retrying…`, true);
  } finally {
    if (again) setTimeout(pollDevices, DEVICES_POLL_MS);
  }
}

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

async function poll() {
  try {
    const res = await fetch("/api/sessions", { cache: "no-store" });
    checkLoggedIn(res);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const body = await res.json();
    render(body.sessions);
    setStatus(`updated ${clock(Date.now() / 1000)}`, false);
  } catch (err) {
    setStatus(`receiver unreachable (${err.message}); retrying…`, true);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

setInterval(() => {
  for (const view of sessionViews.values()) view.tick();
}, 500);
loadMe().catch((err) => setStatus(`receiver unreachable (${err.message}); retrying…`, true));
poll();
pollDevices();
