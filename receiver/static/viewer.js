// breakglass receiver: the police page. One page, three views chosen by the address:
//   #/                      the dashboard: emergencies (alarm), dispatch, buildings and
//                           devices, every session with its cameras
//   #/wall/SESSION          the live wall of one session
//   #/wall/SESSION/CAMERA   one camera of it, full size
// Plain ES modules, no build step, no external resources (the page's CSP forbids them).
// Live updates by polling /api/sessions and /v1/devices.

import { Alarm } from "./alarm.js";
import { DispatchPanel } from "./dispatch.js";
import { LivePlayer } from "./live.js";
import {
  ago, button, clock, el, errorText, getJson, isoSeconds, loadMe, post, showUser, until, when,
  wireLogout,
} from "./util.js";

const POLL_MS = 1500;
const DEVICES_POLL_MS = 1500;
const TICK_MS = 250;
const LATE_S = 1; // a behind-live figure above this is shown as late
const CLOCK_SLACK_S = 0.5; // capture clock ahead of ours by more: the clocks disagree
const CLOCK_SLACK_MAX_S = 30; // or behind by more than this beyond the buffer
// The device's own time is shown beside the receiver's when they are further apart: a
// Raspberry Pi's clock may be hours or days off until NTP syncs it.
const CLOCKS_APART_S = 5;
// How long a player link works (the receiver allows 60 s to 12 h).
const LINK_TTLS = [[3600, "1 hour"], [4 * 3600, "4 hours"], [12 * 3600, "12 hours"]];

const sessionViews = new Map(); // session id -> SessionView
const route = { session: null, camera: null };
// Closed sessions asked for per page ("Show older sessions" adds a page). Open ones
// always come.
const PAGE = 50;
const PAGE_MAX = 500;
const state = { sessions: [], devices: null, limit: PAGE, more: false };
const alarm = new Alarm(document.getElementById("sound"));
const dispatch = new DispatchPanel(document.getElementById("dispatch"));

// -- what a session is ------------------------------------------------------------------

function isShare(session) {
  const by = session.meta && session.meta.started_by;
  return Boolean(by && by.kind === "share");
}

function isEmergency(session) {
  return session.open && !isShare(session);
}

function buildingOf(session) {
  return (session.meta && session.meta.building) || session.device_id;
}

// When the emergency started, on the receiver's clock: when it opened the session.
function startedAt(session) {
  return session.opened_at;
}

// When it started on the device's own clock (the press, or the trigger): what its
// footage's capture times are on.
function deviceStartedAt(session) {
  const meta = session.meta || {};
  return typeof meta.started_at === "number" ? meta.started_at : session.opened_at;
}

// " (device clock: …)" after a receiver time, when the device's own differs from it.
function deviceClock(receiverTime, deviceTime) {
  if (typeof deviceTime !== "number" || !Number.isFinite(deviceTime)) return "";
  if (typeof receiverTime === "number" && Math.abs(deviceTime - receiverTime) <= CLOCKS_APART_S) return "";
  return ` (device clock: ${when(deviceTime)})`;
}

// Who or what started it: the button and its room, or the trigger's signer and reason.
function describeStart(meta) {
  const by = meta && typeof meta.started_by === "object" && meta.started_by ? meta.started_by : {};
  if (by.kind === "share") return "shared continuously (exterior cameras; no emergency)";
  if (by.kind === "button") {
    const where = by.location ? ` (${by.location})` : "";
    return `started by button '${by.button_id || "?"}'${where}`;
  }
  if (by.kind === "trigger") {
    const who = [by.label, by.via ? `via ${by.via}` : ""].filter(Boolean).join(", ");
    const why = by.reason ? `: ${by.reason}` : "";
    return `started by ${by.role || "remote"} trigger${who ? ` (${who})` : ""}${why}`;
  }
  if (by.kind) return `started by ${by.kind}${by.reason ? `: ${by.reason}` : ""}`;
  return "started";
}

// What the receiver could not take from the device's enrollment certificate: the device
// claimed something else (the session shows the certificate's building and zones; the
// claims are in meta.mismatches), or it has no certificate (meta.certified false: an
// allow-listed device's building is its own word). "" when neither, and for sessions
// recorded before the receiver said.
function certNote(session) {
  const meta = session.meta || {};
  const claims = Array.isArray(meta.mismatches) ? meta.mismatches : [];
  if (claims.length) {
    const said = claims.map((m) => {
      const cam = /^cameras\.(.+)\.zone$/.exec(String(m.field));
      const what = cam ? `camera ${cam[1]} zone` : String(m.field);
      const cert = m.certified === null ? "not in its certificate" : `certificate: ${m.certified}`;
      return `${what} ${m.claimed} (${cert})`;
    });
    return ` — DEVICE CLAIMED OTHERWISE, shown as certified: ${said.join("; ")}`;
  }
  return meta.certified === false ? " — building unverified (device not enrolled by certificate)" : "";
}

function alarmText(session) {
  const meta = session.meta || {};
  const at = clock(startedAt(session)) + deviceClock(startedAt(session), meta.started_at);
  if (isShare(session)) {
    return `Exterior cameras — building ${buildingOf(session)} — ${describeStart(meta)} since ${at}${certNote(session)}`;
  }
  return `EMERGENCY — building ${buildingOf(session)} — ${describeStart(meta)} at ${at}${certNote(session)}`;
}

// "complete", or what is missing, declared lost or could not be opened.
function completeness(cam) {
  const out = [cam.complete ? "complete" : `missing ${cam.missing_frames} frames`];
  // Where the device declared footage lost, not how many seqs: a restart skips the
  // rest of its block of 100,000 reserved numbers, and "199267 declared lost" read as
  // hours lost where a second or two was (what was being written when it stopped).
  const gaps = (cam.gaps || []).length;
  if (gaps) out.push(`declared lost in ${gaps} place${gaps > 1 ? "s" : ""} (by the device)`);
  const bad = (cam.bad_segments || []).length;
  if (bad) out.push(`${bad} unreadable segment${bad > 1 ? "s" : ""} or packet${bad > 1 ? "s" : ""}`);
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

// How long the hole between two parts lasts, on the capture clock; its seq count only
// when that says the same: a restart skips the rest of its block of 100,000 reserved
// numbers, and "88770 frames" read as an hour and a half lost where a second was.
function holeSpan(cam, part, next, hole) {
  const fps = cam.fps > 0 ? cam.fps : 15;
  if (typeof part.first_capture_us !== "number" || typeof next.first_capture_us !== "number") {
    return `${hole} frames`;
  }
  const seconds = Math.max(0, (next.first_capture_us - part.first_capture_us) / 1e6 - part.frames / fps);
  const span = seconds < 60 ? `${seconds.toFixed(1)} s` : `${(seconds / 60).toFixed(1)} min`;
  return hole <= Math.ceil(seconds * fps) + 1 ? `${span} (${hole} frames)` : span;
}

// The recorded parts on the capture clock: [{part, start, end}] in seconds since the epoch.
function timeline(cam) {
  const fps = cam.fps > 0 ? cam.fps : 15;
  return (cam.recordings || [])
    .filter((p) => typeof p.first_capture_us === "number")
    .map((p) => ({ part: p, start: p.first_capture_us / 1e6, end: p.first_capture_us / 1e6 + p.frames / fps }));
}

// When the emergency started (the press, or the trigger), on the agent's clock (the
// capture times' clock): seconds.
function pressTime(session) {
  const t = deviceStartedAt(session);
  return typeof t === "number" && Number.isFinite(t) ? t : null;
}

function signed(seconds) {
  return `${seconds < 0 ? "−" : "+"}${Math.abs(seconds).toFixed(1)} s`;
}

// -- one camera ---------------------------------------------------------------------------

class CameraTile {
  constructor(view, cam) {
    this.view = view;
    this.sessionId = view.id;
    this.id = cam.camera_id;
    this.cam = cam;
    this.player = null;
    this.root = el("article", "tile");
    this.root.dataset.camera = cam.camera_id;
    const head = el("div", "tile-head");
    this.badge = el("span", "badge");
    this.closeFull = button("Back to the wall ✕", "close-full", () => {
      location.hash = `#/wall/${this.sessionId}`;
    });
    head.append(el("span", "cam", cam.camera_id), el("span", `zone ${cam.zone}`, cam.zone), this.badge, this.closeFull);

    this.video = el("video", "live");
    this.video.muted = true;
    this.video.playsInline = true;
    this.video.setAttribute("aria-label", `live view of camera ${cam.camera_id}`);
    this.video.title = "Click: this camera alone, full size";
    this.video.addEventListener("click", () => this.toggleFull());

    this.stats = el("div", "stats");
    this.counts = el("span", "counts");
    this.behind = el("span", "behind");
    this.state = el("span", "state");
    this.stats.append(this.counts, " · ", this.behind, " · ", this.state);

    this.actions = el("div", "actions");
    this.recordedButton = button("Recorded", "recorded-toggle", () => this.toggleRecorded());
    this.recordedButton.setAttribute("aria-pressed", "false");
    this.hlsButton = button("Player link", "player-link", () => this.togglePlayerLink());
    this.hlsButton.setAttribute("aria-pressed", "false");
    this.hlsButton.title = "An HLS link to this camera's recording for VLC, ffplay or a video management system";
    this.links = el("span", "links");
    this.actions.append(this.recordedButton, this.hlsButton, this.links);

    this.hlsBox = el("div", "hls-box");
    this.hlsBox.hidden = true;
    this.hlsInput = el("input", "hls-url");
    this.hlsInput.readOnly = true;
    this.hlsInput.setAttribute("aria-label", `player link (HLS) of camera ${cam.camera_id}`);
    this.linkTtl = el("select", "link-ttl");
    this.linkTtl.setAttribute("aria-label", "how long the link works");
    for (const [seconds, label] of LINK_TTLS) {
      const option = el("option", null, label);
      option.value = String(seconds);
      this.linkTtl.append(option);
    }
    this.linkTtl.addEventListener("change", () => this.fetchPlayerLink());
    this.hlsNote = el("span", "note");
    this.hlsBox.append(this.hlsInput, this.linkTtl, this.hlsNote);

    this.recordedWrap = el("div", "recorded-wrap");
    this.recordedWrap.hidden = true;
    this.recorded = el("video", "recorded");
    this.recorded.controls = true;
    this.recorded.muted = true;
    this.recorded.preload = "metadata";
    this.scrubRow = el("div", "scrub-row");
    this.scrub = el("input", "scrub");
    this.scrub.type = "range";
    this.scrub.min = "0";
    this.scrub.step = "0.1";
    this.scrub.setAttribute("aria-label", `replay position of camera ${cam.camera_id}`);
    this.scrub.addEventListener("input", () => {
      this.dragging = true;
      this.showScrubLabel(this.t0 + Number(this.scrub.value));
    });
    this.scrub.addEventListener("change", () => {
      this.dragging = false;
      this.seekTo(this.t0 + Number(this.scrub.value));
    });
    this.scrubLabel = el("span", "scrub-label");
    this.prerollButton = button("From the start", "from-start", () => this.seekTo(this.t0));
    this.pressButton = button("At the alarm", "at-press", () => {
      const press = pressTime(this.view.session);
      if (press !== null) this.seekTo(press);
    });
    this.scrubRow.append(this.prerollButton, this.pressButton, this.scrub, this.scrubLabel);
    this.recordedNote = el("div", "note");
    this.recordedWrap.append(this.recorded, this.scrubRow, this.recordedNote);

    this.root.append(head, this.video, this.stats, this.actions, this.hlsBox, this.recordedWrap);
    this.t0 = 0;
    this.dragging = false;
  }

  update(cam, sessionOpen, visible) {
    this.cam = cam;
    const live = sessionOpen && cam.recording;
    // The session is open but the camera records nothing now: its device has not (re)connected
    // yet (a receiver restart, a link down). Not ended: the last picture stays.
    const waiting = sessionOpen && !cam.recording;
    this.badge.textContent = live ? "LIVE" : waiting ? "NO SIGNAL" : "ENDED";
    this.badge.className = `badge ${live ? "live" : waiting ? "wait" : "ended"}`;
    this.root.classList.toggle("ended", !sessionOpen);
    this.counts.textContent =
      `${cam.frames_durable} frames (pre-roll ${cam.preroll_frames}, live ${cam.live_frames}) · ` +
      completeness(cam);
    const play = live && visible;
    if (play && cam.mse_codec && !this.player) {
      this.player = new LivePlayer(this.video, cam.live_url, cam.mse_codec, {
        onState: (text, kind) => this.setState(text, kind),
        partOrigin: (seq) => this.partOrigin(seq),
      });
      this.player.start();
    } else if (play && !cam.mse_codec) {
      this.setState("waiting for video", "wait");
    } else if (!play && this.player && !(waiting && visible)) {
      this.player.stop();
      this.player = null;
    }
    if (waiting) this.setState("no signal: waiting for the device to reconnect", "wait");
    else if (!live) this.setState("recording ended", "ended");
    else if (!visible) this.setState("paused (another wall is open)", "wait");
    this.renderLinks(cam.recordings || []);
    this.updateScrubRange();
  }

  setState(text, kind) {
    if (this.state.textContent !== text) this.state.textContent = text;
    this.state.dataset.kind = kind || "";
  }

  // The first capture time (µs) of the part file that starts at `seq`.
  partOrigin(seq) {
    const part = (this.cam.recordings || []).find((r) => r.first_seq === seq);
    return part && typeof part.first_capture_us === "number" ? part.first_capture_us : null;
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

  toggleFull() {
    if (route.session === this.sessionId && route.camera === this.id) {
      location.hash = `#/wall/${this.sessionId}`;
    } else {
      location.hash = `#/wall/${this.sessionId}/${this.id}`;
    }
  }

  setFull(full) {
    this.root.classList.toggle("full", full);
    this.closeFull.hidden = !full;
  }

  togglePlayerLink() {
    const show = this.hlsBox.hidden;
    this.hlsBox.hidden = !show;
    this.hlsButton.setAttribute("aria-pressed", String(show));
    if (show) this.fetchPlayerLink();
  }

  // A player link: the HLS playlist with a token that works without a login, for this
  // camera only, until it expires (POST: the receiver logs who asked, and when it ends).
  async fetchPlayerLink() {
    this.hlsInput.value = "";
    this.hlsNote.textContent = "asking the receiver for a link…";
    this.hlsNote.classList.remove("error");
    const path = `/api/sessions/${encodeURIComponent(this.sessionId)}/cameras/${encodeURIComponent(this.id)}/player-link`;
    try {
      const res = await post(path, { ttl_s: Number(this.linkTtl.value) });
      if (!res.ok) throw new Error(await errorText(res));
      const link = await res.json();
      this.hlsInput.value = link.url;
      this.hlsInput.dataset.expires = String(link.expires_at);
      this.hlsInput.select();
      const note = `works until ${when(link.expires_at)} in VLC, ffplay or a video management system, ` +
        "without a login: whoever has it can watch this camera's recording until then (logged under your name)";
      try {
        await navigator.clipboard.writeText(link.url);
        this.hlsNote.textContent = `copied; ${note}`;
      } catch (err) {
        this.hlsNote.textContent = `press Ctrl+C to copy; ${note}`;
      }
    } catch (err) {
      this.hlsNote.textContent = `no link: ${err.message}`;
      this.hlsNote.classList.add("error");
    }
  }

  // -- replay of the recorded parts (pre-roll, then the rest) --------------------------

  toggleRecorded() {
    const show = this.recordedWrap.hidden;
    this.recordedWrap.hidden = !show;
    this.recordedButton.setAttribute("aria-pressed", String(show));
    const parts = this.cam.recordings || [];
    if (show && parts.length) {
      this.updateScrubRange();
      this.playPart(parts, 0);
      this.recorded.play().catch(() => {});
    } else if (!show) {
      this.recorded.pause();
      this.recorded.removeAttribute("src");
      this.recorded.load();
    }
  }

  // Parts play one after the other in sequence order, across runs: the pre-roll,
  // the footage from the press on, what backfill filled in after a skip, and any
  // part a restart began. A hole between two parts is named in the note.
  playPart(parts, i, offset) {
    const part = parts[i];
    // The frame count in the URL: the browser's media cache kept a growing part's old
    // length under its plain URL, and the replay stopped at it.
    const sep = part.url.includes("?") ? "&" : "?";
    this.recorded.src = `${part.url}${sep}frames=${part.frames}`;
    this.recorded.dataset.part = String(i);
    this.pendingOffset = offset > 0 ? offset : null;
    if (offset > 0) {
      this.recorded.addEventListener("loadedmetadata", () => {
        this.recorded.currentTime = offset;
        this.pendingOffset = null;
      }, { once: true });
    }
    this.recorded.onended = () => this.partEnded(i);
    const next = parts[i + 1];
    const hole = next ? next.first_seq - part.last_seq - 1 : 0;
    const after = hole > 0 ? `; then ${holeSpan(this.cam, part, next, hole)} not here (${holeKind(this.cam, part.last_seq + 1)})` : "";
    this.recordedNote.textContent = parts.length > 1
      ? `part ${i + 1} of ${parts.length}: ${partLabel(part, this.cam)}${after}` : "";
  }

  partEnded(i) {
    const parts = this.cam.recordings || [];
    if (i + 1 < parts.length) {
      this.playPart(parts, i + 1);
      this.recorded.play().catch(() => {});
    } else if (!this.cam.recording) {
      this.recordedNote.textContent = "end of the recording";
    } else {
      this.recordedNote.textContent = "end of the recording so far; the live view above is current";
    }
  }

  // The last part is still being written (the camera is live): once it holds more than
  // the player read, go on from where it stopped.
  followGrowingPart() {
    const v = this.recorded;
    const parts = this.cam.recordings || [];
    const i = Number(v.dataset.part);
    if (!v.ended || !this.cam.recording || i !== parts.length - 1) return;
    const fps = this.cam.fps > 0 ? this.cam.fps : 15;
    if (parts[i].frames / fps > v.duration + 0.5) {
      this.playPart(parts, i, v.currentTime);
      v.play().catch(() => {});
    }
  }

  updateScrubRange() {
    const line = timeline(this.cam);
    if (!line.length) {
      this.scrubRow.hidden = true;
      return;
    }
    this.scrubRow.hidden = false;
    this.pressButton.hidden = pressTime(this.view.session) === null || isShare(this.view.session);
    this.t0 = line[0].start;
    const end = Math.max(...line.map((x) => x.end));
    this.scrub.max = String(Math.max(0.1, end - this.t0).toFixed(1));
  }

  // Replay from capture time `t` (seconds since the epoch): the part that holds it.
  seekTo(t) {
    const line = timeline(this.cam);
    const parts = this.cam.recordings || [];
    if (!line.length) return;
    let k = 0;
    for (let j = 0; j < line.length; j += 1) if (line[j].start <= t) k = j;
    const offset = Math.max(0, Math.min(t, line[k].end) - line[k].start);
    if (this.recordedWrap.hidden) {
      this.recordedWrap.hidden = false;
      this.recordedButton.setAttribute("aria-pressed", "true");
    }
    this.playPart(parts, parts.indexOf(line[k].part), offset);
    this.recorded.play().catch(() => {});
  }

  // Where the replay is, on the capture clock (null if unknown).
  replayTime() {
    const i = Number(this.recorded.dataset.part);
    const part = (this.cam.recordings || [])[i];
    if (!part || typeof part.first_capture_us !== "number" || !this.recorded.currentSrc) return null;
    // While a part loads to resume at an offset, the player says 0: the offset is where it is.
    const at = this.pendingOffset !== null && this.pendingOffset !== undefined
      ? this.pendingOffset : this.recorded.currentTime;
    return part.first_capture_us / 1e6 + at;
  }

  showScrubLabel(t) {
    const press = isShare(this.view.session) ? null : pressTime(this.view.session);
    const rel = press === null ? "" : ` (${signed(t - press)} from the alarm${t < press ? ", pre-roll" : ""})`;
    this.scrubLabel.textContent = `${clock(t)}${rel}`;
  }

  tick() {
    const behind = this.player ? this.player.behindLive() : null;
    let seconds = null;
    let source = "";
    if (behind) {
      // The capture clock's figure if the agent's clock and this computer's seem to
      // agree (live footage is never from the future, nor much older than what waits
      // in the buffer: the live lane skips ahead rather than fall behind); else only
      // what is buffered.
      const c = behind.capture;
      const silent = this.player.silentFor() || 0; // a stall: the picture ages meanwhile
      if (c !== null && c > -CLOCK_SLACK_S && c < behind.buffer + silent + CLOCK_SLACK_MAX_S) {
        seconds = Math.max(0, behind.capture);
        source = "capture";
      } else {
        seconds = behind.buffer;
        source = "buffer";
      }
    }
    this.behind.dataset.seconds = seconds === null ? "" : seconds.toFixed(3);
    this.behind.dataset.source = source;
    this.behind.textContent = seconds === null
      ? "behind live: –"
      : `behind live: ${seconds.toFixed(seconds < 10 ? 2 : 0)} s`;
    if (behind) {
      const why = source === "capture" ? "from capture to the screen"
        : behind.capture === null ? "buffered (capture time not known yet)"
          : `buffered (the agent's clock differs from this computer's by ${behind.capture.toFixed(1)} s)`;
      this.behind.title = `${why}; ` +
        `buffered ahead ${behind.buffer.toFixed(2)} s; ` +
        `${this.player.jumps} jump(s) to live, ${this.player.stalls} stall(s)`;
      this.behind.dataset.jumps = String(this.player.jumps);
      this.behind.dataset.stalls = String(this.player.stalls);
      this.behind.dataset.restarts = String(this.player.restarts);
    }
    this.behind.classList.toggle("late", seconds !== null && seconds > LATE_S);
    if (this.player) this.player.tick();
    if (!this.recordedWrap.hidden && !this.dragging) {
      this.followGrowingPart();
      const t = this.replayTime();
      if (t !== null) {
        this.scrub.value = String((t - this.t0).toFixed(1));
        this.showScrubLabel(t);
      }
    }
  }

  destroy() {
    if (this.player) this.player.stop();
    this.player = null;
    this.root.remove();
  }
}

// -- one session --------------------------------------------------------------------------

class SessionView {
  constructor(session) {
    this.id = session.session_id;
    this.root = el("section", "session");
    this.root.dataset.session = this.id;
    const head = el("div", "session-head");
    this.title = el("h2", "session-title");
    this.sub = el("div", "session-sub");
    const actions = el("div", "session-actions");
    this.wallLink = el("a", "wall-link");
    this.exportButton = button("Export evidence", "export", () => this.exportEvidence());
    this.exportNote = el("span", "export-note");
    actions.append(this.wallLink, this.exportButton, this.exportNote);
    // A damaged recording (its session.json unreadable): why, in place of the cameras.
    this.damagedNote = el("p", "damaged-note");
    this.damagedNote.setAttribute("role", "alert");
    this.damagedNote.hidden = true;
    head.append(this.title, this.sub, this.damagedNote, actions);
    this.grid = el("div", "tiles");
    this.root.append(head, this.grid);
    this.tiles = new Map();
    this.session = session;
  }

  update(session) {
    this.session = session;
    const meta = session.meta || {};
    const visible = route.session === null || route.session === this.id;
    this.root.hidden = !visible;
    this.root.classList.toggle("open", isEmergency(session));
    this.root.classList.toggle("share", session.open && isShare(session));
    this.root.classList.toggle("damaged", Boolean(session.damaged));
    this.damagedNote.hidden = !session.damaged;
    this.exportButton.hidden = Boolean(session.damaged);
    const inWall = route.session === this.id;
    if (session.damaged) {
      // Nothing to play: say so, and why, instead of a player that cannot start.
      this.title.textContent = `Session ${session.session_id} — RECORDING DAMAGED`;
      this.sub.textContent = `session ${session.session_id} · folder last written ${when(session.opened_at)}`;
      this.damagedNote.textContent =
        `This recording cannot be played or exported here: ${session.damaged}. ` +
        "Its files are kept on the receiver as they are, for an administrator to repair.";
    } else {
      this.title.textContent = session.open
        ? alarmText(session)
        : `Session ${session.session_id} — building ${buildingOf(session)}${certNote(session)}`;
      const ended = session.open ? "open" : `ended ${when(session.closed_at)} (${session.close_reason || "closed"})`;
      const by = session.open ? "" : ` · ${describeStart(meta)}`;
      this.sub.textContent =
        `session ${session.session_id} · device ${session.device_id} · opened ${when(session.opened_at)} · ${ended}${by}`;
    }
    this.wallLink.textContent = inWall ? "← Dashboard" : session.open ? "Open the live wall" : "Open";
    this.wallLink.href = inWall ? "#/" : `#/wall/${this.id}`;
    const seen = new Set();
    for (const cam of session.cameras) {
      seen.add(cam.camera_id);
      let tile = this.tiles.get(cam.camera_id);
      if (!tile) {
        tile = new CameraTile(this, cam);
        this.tiles.set(cam.camera_id, tile);
        this.grid.append(tile.root);
      }
      tile.update(cam, session.open, visible);
      tile.setFull(inWall && route.camera === cam.camera_id);
    }
    for (const [id, tile] of this.tiles) {
      if (!seen.has(id)) {
        tile.destroy();
        this.tiles.delete(id);
      }
    }
    // The wall: as square a grid as the cameras allow.
    const n = Math.max(1, this.tiles.size);
    this.grid.style.setProperty("--cols", String(Math.ceil(Math.sqrt(n))));
  }

  // The evidence bundle (zip) of this session: POST, then a download from a blob URL.
  async exportEvidence() {
    this.exportButton.disabled = true;
    this.exportNote.textContent = "building the evidence bundle…";
    this.exportNote.classList.remove("error");
    try {
      const res = await post(`/v1/evidence/${encodeURIComponent(this.id)}`);
      if (!res.ok) throw new Error(await errorText(res));
      const blob = await res.blob();
      const disposition = res.headers.get("Content-Disposition") || "";
      const m = /filename="?([^";]+)"?/.exec(disposition);
      const name = m ? m[1] : `${this.id}-evidence.zip`;
      const url = URL.createObjectURL(blob);
      const a = el("a");
      a.href = url;
      a.download = name;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
      const sha = res.headers.get("X-Evidence-SHA256");
      this.exportNote.textContent = `downloaded ${name} (${(blob.size / 1e6).toFixed(1)} MB` +
        `${sha ? `, SHA-256 ${sha.slice(0, 16)}…` : ""})`;
    } catch (err) {
      this.exportNote.textContent = `export failed: ${err.message}`;
      this.exportNote.classList.add("error");
    } finally {
      this.exportButton.disabled = false;
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

// -- the alarm banner -------------------------------------------------------------------

const alarmItems = new Map(); // session id -> {root, line, ago, ack}

function renderAlarms(open) {
  const banner = document.getElementById("alarms");
  const seen = new Set();
  for (const s of open) {
    seen.add(s.session_id);
    let item = alarmItems.get(s.session_id);
    if (!item) {
      item = { root: el("div", "alarm") };
      item.root.dataset.session = s.session_id;
      item.line = el("p", "alarm-line");
      item.sub = el("p", "alarm-sub");
      item.ago = el("span", "ago");
      item.info = el("span", "info");
      item.sub.append(item.ago, item.info);
      const actions = el("div", "alarm-actions");
      item.watch = el("a", "watch", "Watch live");
      item.watch.href = `#/wall/${s.session_id}`;
      item.ack = button("Acknowledge", "ack", () => {
        alarm.acknowledge(s.session_id);
        renderAlarms(state.sessions.filter(isEmergency));
      });
      actions.append(item.watch, item.ack);
      item.root.append(item.line, item.sub, actions);
      alarmItems.set(s.session_id, item);
      banner.append(item.root);
    }
    item.session = s;
    item.line.textContent = alarmText(s);
    item.ago.textContent = `(${ago(startedAt(s))})`;
    const meta = s.meta || {};
    // The receiver's clock (the device's expiry moved by its clock's offset), the
    // device's own beside it when they differ.
    const expires = typeof s.expires_at === "number"
      ? ` · expires ${clock(s.expires_at)}${deviceClock(s.expires_at, meta.expires_at)}`
      : "";
    item.info.textContent = ` · session ${s.session_id} · device ${s.device_id} · ${s.cameras.length} camera(s)${expires}`;
    const acked = alarm.isAcked(s.session_id);
    item.root.classList.toggle("acked", acked);
    item.ack.disabled = acked;
    item.ack.textContent = acked ? "Acknowledged (muted here)" : "Acknowledge";
  }
  for (const [id, item] of alarmItems) {
    if (!seen.has(id)) {
      item.root.remove();
      alarmItems.delete(id);
    }
  }
  banner.hidden = open.length === 0;
  alarm.update(open.map((s) => ({ id: s.session_id, building: buildingOf(s) })));
}

function tickAlarms() {
  for (const item of alarmItems.values()) {
    item.ago.textContent = `(${ago(startedAt(item.session))})`;
  }
}

// -- sessions -----------------------------------------------------------------------------

function order(sessions) {
  const rank = (s) => (isEmergency(s) ? 0 : s.open ? 1 : 2);
  return sessions.map((s, i) => [s, i]).sort((a, b) => rank(a[0]) - rank(b[0]) || a[1] - b[1]).map((x) => x[0]);
}

function renderSessions(sessions) {
  state.sessions = sessions;
  const main = document.getElementById("sessions");
  const empty = document.getElementById("empty");
  const seen = new Set();
  const sorted = order(sessions);
  for (const session of sorted) {
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
  // Move nodes only when the order changed, so playing videos are not disturbed.
  const wanted = sorted.map((s) => sessionViews.get(s.session_id).root);
  const current = Array.from(main.querySelectorAll(":scope > section.session"));
  if (wanted.length !== current.length || wanted.some((node, i) => node !== current[i])) {
    main.append(...wanted);
  }
  if (route.session !== null && !sessionViews.has(route.session)) {
    empty.textContent = `No session ${route.session} on this receiver.`;
    empty.hidden = false;
  } else {
    empty.textContent = "No emergency sessions recorded.";
    empty.hidden = sessions.length > 0;
  }
  renderAlarms(sessions.filter(isEmergency));
  if (state.devices) renderDevices(state.devices);
}

// -- buildings and devices ------------------------------------------------------------------

function deviceState(d) {
  return d.offline ? "OFFLINE" : d.connected ? "online" : "disconnected";
}

// When the device's enrollment expires, for its line in the device list: [text, class], or
// null if unknown. Past it the receiver refuses the device: an emergency at its school no
// longer reaches this receiver. Within 30 days it is a warning.
function enrollmentNote(e) {
  if (!e || !e.expires_at) return null;
  const exp = isoSeconds(e.expires_at);
  if (e.refused) {
    return [`REFUSED: ENROLLMENT EXPIRED ${when(exp)} (last refused ${ago(isoSeconds(e.refused.at))})`, "expired"];
  }
  if (e.expired) return [`ENROLLMENT EXPIRED ${when(exp)}: refused when it reconnects`, "expired"];
  if (e.expires_soon) return [`ENROLLMENT EXPIRES ${when(exp)} (${until(exp)})`, "expiring"];
  return [`enrolled until ${when(exp)}`, ""];
}

// The offline alarm, the recording failures and the expired enrollments (red banner, one
// line per device) and the buildings with their devices. A device whose footage the receiver
// cannot record (its disk full or failing) keeps reconnecting, so it is never offline: it
// has a line of its own.
function renderDevices(devices) {
  state.devices = devices;
  const banner = document.getElementById("device-alarms");
  const list = document.getElementById("devices");
  const offline = devices.filter((d) => d.offline);
  const failing = devices.filter((d) => d.recording_failing);
  const stalled = devices.filter((d) => d.footage_stalled_since);
  const expired = devices.filter((d) => d.enrollment && d.enrollment.expired);
  banner.replaceChildren(
    ...offline.map((d) => el(
      "p", "alarm-line",
      `DEVICE OFFLINE — ${d.device} (building ${d.building || "?"}) — ` +
      `last heard ${when(isoSeconds(d.last_heard))} (${ago(isoSeconds(d.last_heard))})`,
    )),
    ...failing.map((d) => el(
      "p", "alarm-line recording-failing",
      `RECORDING FAILING — ${d.device} (building ${d.building || "?"}) — since ` +
      `${when(isoSeconds(d.recording_failing.since))} ` +
      `(${ago(isoSeconds(d.recording_failing.since))}): ${d.recording_failing.error}`,
    )),
    ...stalled.map((d) => el(
      "p", "alarm-line recording-failing",
      `NO FOOTAGE — ${d.device} (building ${d.building || "?"}) — connected, but nothing ` +
      `of session ${d.session} recorded since ${when(isoSeconds(d.footage_stalled_since))} ` +
      `(${ago(isoSeconds(d.footage_stalled_since))})`,
    )),
    ...expired.map((d) => el(
      "p", "alarm-line enrollment-expired",
      `ENROLLMENT EXPIRED — ${d.device} (building ${d.building || "?"}) — expired ` +
      `${when(isoSeconds(d.enrollment.expires_at))}` + (d.enrollment.refused
        ? `, refused ${ago(isoSeconds(d.enrollment.refused.at))}: an emergency there no ` +
          "longer reaches this receiver until the device is enrolled again"
        : ": the receiver refuses it when it next connects; enroll it again"),
    )),
  );
  banner.hidden = offline.length + failing.length + stalled.length + expired.length === 0;

  const buildings = new Map();
  for (const d of devices) {
    const id = d.building || "unknown building";
    if (!buildings.has(id)) buildings.set(id, []);
    buildings.get(id).push(d);
  }
  const cards = [];
  for (const [id, devs] of [...buildings].sort((a, b) => a[0].localeCompare(b[0]))) {
    const card = el("div", "building");
    card.dataset.building = id;
    const head = el("div", "building-head");
    const emergency = state.sessions.find((s) => isEmergency(s) && buildingOf(s) === id);
    const share = state.sessions.find((s) => s.open && isShare(s) && buildingOf(s) === id);
    const status = emergency ? "EMERGENCY" : share ? "exterior cameras shared" : "no emergency";
    card.classList.toggle("emergency", Boolean(emergency));
    const statusNode = emergency ? el("a", "building-state", status) : el("span", "building-state", status);
    if (emergency) statusNode.href = `#/wall/${emergency.session_id}`;
    head.append(el("span", "building-name", id), statusNode);
    const ul = el("ul", "device-list");
    for (const d of devs) {
      const cls = d.offline ? "offline" : d.connected ? "connected" : "quiet";
      const li = el("li", `device ${cls}`);
      li.dataset.device = d.device;
      const heard = isoSeconds(d.last_heard);
      li.append(
        el("span", "dot"),
        el("span", "device-name", d.device),
        ` · ${deviceState(d)} since ${when(isoSeconds(d.since))}`,
        el("span", "heard", ` · last heard ${when(heard)} (${ago(heard)})`),
      );
      if (d.recording_failing) li.append(el("span", "failing", " · RECORDING FAILING"));
      if (d.footage_stalled_since) li.append(el("span", "failing", " · NO FOOTAGE"));
      const enrolled = enrollmentNote(d.enrollment);
      if (enrolled) li.append(" · ", el("span", `enrollment ${enrolled[1]}`.trim(), enrolled[0]));
      // No certificate on its connection: its building is what its sessions claimed.
      if (d.building && !d.building_verified) li.append(" · ", el("span", "unverified", "building unverified (not enrolled)"));
      li.title = d.session ? `session ${d.session}` : "no session";
      ul.append(li);
    }
    card.append(head, ul);
    cards.push(card);
  }
  list.replaceChildren(...cards);
  list.hidden = devices.length === 0;
  alarm.update(undefined, offline.length);
  // Dispatch goes only to devices certified for the building; one that only claims it is
  // counted apart (the receiver lists it as not_certified and sends it nothing).
  dispatch.setBuildings([...buildings]
    .filter(([id]) => id !== "unknown building")
    .map(([id, devs]) => {
      const certified = devs.filter((d) => d.building_verified);
      const online = certified.filter((d) => d.connected).length;
      return { id, devices: certified.length, online, unverified: devs.length - certified.length };
    }));
}

// -- the address: dashboard, wall, one camera -----------------------------------------------

function parseRoute() {
  const m = /^#\/wall\/([^/]+)(?:\/([^/]+))?$/.exec(location.hash);
  route.session = m ? decodeURIComponent(m[1]) : null;
  route.camera = m && m[2] ? decodeURIComponent(m[2]) : null;
  document.body.classList.toggle("wall", route.session !== null);
  document.body.classList.toggle("single", route.camera !== null);
}

window.addEventListener("hashchange", () => {
  parseRoute();
  renderSessions(state.sessions);
  if (route.session !== null && !sessionViews.has(route.session)) pollNow(); // an older one
  window.scrollTo(0, 0);
});

document.addEventListener("keydown", (ev) => {
  if (ev.key !== "Escape" || route.session === null) return;
  location.hash = route.camera !== null ? `#/wall/${route.session}` : "#/";
});

// -- polling --------------------------------------------------------------------------------

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

async function fetchSessions() {
  // The API gives at most PAGE_MAX closed sessions an answer: past that, follow `next`.
  const sessions = [];
  let url = `/api/sessions?limit=${Math.min(state.limit, PAGE_MAX)}`;
  let closed = 0;
  for (;;) {
    const res = await getJson(url);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const body = await res.json();
    sessions.push(...body.sessions);
    closed += body.sessions.filter((s) => !s.open).length;
    state.more = body.next !== null;
    if (!state.more || closed >= state.limit) break;
    const rest = Math.min(state.limit - closed, PAGE_MAX);
    url = `/api/sessions?limit=${rest}&before=${encodeURIComponent(body.next)}`;
  }
  // A link to a session older than the pages shown: that one session too.
  if (route.session !== null && !sessions.some((s) => s.session_id === route.session)) {
    const one = await getJson(`/api/sessions/${encodeURIComponent(route.session)}`);
    if (one.ok) sessions.push(await one.json());
    else if (one.status !== 400 && one.status !== 404) throw new Error(`HTTP ${one.status}`);
  }
  return sessions;
}

let pollTimer = null;
let polling = false;
let pollAgain = false;

async function poll() {
  polling = true;
  try {
    renderSessions(await fetchSessions());
    document.getElementById("older").hidden = !state.more;
    setStatus(`updated ${clock(Date.now() / 1000)}`, false);
  } catch (err) {
    setStatus(`receiver unreachable (${err.message}); retrying…`, true);
  } finally {
    polling = false;
    if (pollAgain) {
      pollAgain = false;
      poll();
    } else {
      pollTimer = setTimeout(poll, POLL_MS);
    }
  }
}

function pollNow() {
  if (polling) {
    pollAgain = true;
    return;
  }
  clearTimeout(pollTimer);
  poll();
}

document.getElementById("older").addEventListener("click", () => {
  state.limit += PAGE;
  pollNow();
});

async function pollDevices() {
  let again = true;
  try {
    const res = await getJson("/v1/devices");
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

wireLogout();

let ticks = 0;
setInterval(() => {
  for (const view of sessionViews.values()) view.tick();
  ticks += 1;
  if (ticks % 4 === 0) tickAlarms();
}, TICK_MS);

parseRoute();
loadMe()
  .then(() => {
    showUser();
    dispatch.show();
  })
  .catch((err) => setStatus(`receiver unreachable (${err.message}); retrying…`, true));
poll();
pollDevices();
