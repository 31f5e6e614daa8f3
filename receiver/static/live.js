// Low-latency live video: fragmented MP4 from the receiver's WebSocket into Media Source
// Extensions. The socket (GET /v1/live/{session}/{camera}) sends the init segment, the
// fragments since the last keyframe, then one fragment per frame as the camera's footage
// becomes durable at the receiver.
//
// Latency is kept low three ways: the MediaSource is a live one (duration +Infinity, so
// Chromium renders with a short queue), the playhead is pushed back to the live edge
// when it falls behind (a seek beyond JUMP_BEHIND_S, a slightly faster rate beyond
// CATCH_UP_S), and old buffer is removed. A player that loses its socket, its decoder
// or falls too far behind starts over by itself, with a growing pause between tries.

const MSE = window.ManagedMediaSource || window.MediaSource;

export const JUMP_BEHIND_S = 1.0; // further behind the buffered end than this: seek
export const LIVE_EDGE_S = 0.15; // where a seek lands, before the buffered end
// Behind more than CATCH_UP_S: play a little faster until back under CAUGHT_UP_S. A
// shorter buffer stalls more often on a busy machine (measured on loopback at 15 fps:
// 0.2 s gave 0.21 s behind live with a stall a second, 0.3 s gave 0.30 s with one in
// five seconds).
const CATCH_UP_S = 0.25;
// A new view first gets the footage since the last keyframe (up to a GOP) in a burst;
// while that lands, seek to the edge as soon as it is more than this behind.
const STARTUP_MS = 3000;
const STARTUP_JUMP_S = 0.3;
const CAUGHT_UP_S = 0.15;
const CATCH_UP_RATE = 1.1;
const KEEP_BEHIND_S = 2; // buffer kept behind the playhead; older data is removed
const TRIM_EVERY_S = 5; // remove old data once this much lies behind the playhead
const MAX_QUEUE = 300; // unappended messages before the player starts over
const RETRY_FIRST_MS = 300;
const RETRY_MAX_MS = 5000;
const SILENT_S = 4; // no fragment for this long: say so

// -- a little MP4 reading: what the init segment tells about the capture clock -----------

function* boxes(view, start, end) {
  let off = start;
  while (off + 8 <= end) {
    let size = view.getUint32(off);
    const type = String.fromCharCode(
      view.getUint8(off + 4), view.getUint8(off + 5), view.getUint8(off + 6), view.getUint8(off + 7),
    );
    let header = 8;
    if (size === 1 && off + 16 <= end) {
      size = Number(view.getBigUint64(off + 8));
      header = 16;
    } else if (size === 0) {
      size = end - off;
    }
    if (size < header || off + size > end) return;
    yield { type, start: off + header, end: off + size };
    off += size;
  }
}

function child(view, box, type) {
  for (const b of boxes(view, box.start, box.end)) if (b.type === type) return b;
  return null;
}

// From an init segment (ftyp + moov): the first seq of the part file it starts (the
// receiver names each track "<camera> from seq N") and the track's timescale.
// The receiver's decode times are capture times since the part's first frame, so the
// part's first capture time (from /api/sessions) plus the media time is a frame's
// capture time.
export function parseInit(buffer) {
  const view = new DataView(buffer);
  const out = { firstSeq: null, timescale: null };
  const moov = Array.from(boxes(view, 0, view.byteLength)).find((b) => b.type === "moov");
  if (!moov) return out;
  const trak = child(view, moov, "trak");
  if (!trak) return out;
  const mdhd = child(view, child(view, trak, "mdia") || trak, "mdhd");
  if (mdhd) {
    const version = view.getUint8(mdhd.start);
    out.timescale = view.getUint32(mdhd.start + (version === 1 ? 20 : 12));
  }
  const udta = child(view, trak, "udta");
  const name = udta && child(view, udta, "name");
  if (name) {
    const text = new TextDecoder().decode(new Uint8Array(buffer, name.start, name.end - name.start));
    const m = / from seq (\d+)\s*\0?$/.exec(text);
    if (m) out.firstSeq = Number(m[1]);
  }
  return out;
}

// One live <video> fed from one camera's socket.
export class LivePlayer {
  // partOrigin(firstSeq): the first capture time (µs) of the part file starting at that
  // seq, or null while unknown. onState(text, kind): what to tell the officer.
  constructor(video, url, codec, { onState, partOrigin }) {
    this.video = video;
    this.url = url;
    this.mime = `video/mp4; codecs="${codec}"`;
    this.onState = onState || (() => {});
    this.partOrigin = partOrigin || (() => null);
    this.queue = [];
    this.stopped = false;
    this.retryMs = RETRY_FIRST_MS;
    this.retryTimer = null;
    this.ws = null;
    this.sb = null;
    this.ms = null;
    this.init = null; // what the current init segment says
    this.lastData = 0; // performance.now() of the last fragment
    this.fragments = 0; // appended since the last (re)start
    this.startedAt = performance.now();
    this.restarts = 0;
    this.jumps = 0; // seeks to the live edge
    this.stalls = 0; // times the picture waited for data
    this.onWaiting = () => { this.stalls += 1; };
    video.addEventListener("waiting", this.onWaiting);
  }

  start() {
    if (!MSE) return this.onState("this browser has no Media Source Extensions", "error");
    if (!MSE.isTypeSupported(this.mime)) return this.onState(`cannot play ${this.mime}`, "error");
    this.queue = [];
    this.sb = null;
    this.init = null;
    this.fragments = 0;
    this.startedAt = performance.now();
    this.ms = new MSE();
    this.video.disableRemotePlayback = true; // needed by ManagedMediaSource
    this.video.src = URL.createObjectURL(this.ms);
    this.ms.addEventListener("sourceopen", () => this.sourceOpen(), { once: true });
    this.onState(this.restarts ? "reconnecting…" : "connecting…", "wait");
  }

  sourceOpen() {
    if (this.stopped || !this.ms) return;
    URL.revokeObjectURL(this.video.src);
    try {
      this.sb = this.ms.addSourceBuffer(this.mime);
      this.ms.duration = Infinity; // a live stream: Chromium renders with a short queue
    } catch (err) {
      return this.restart(`cannot open the decoder (${err.name})`);
    }
    this.sb.mode = "segments";
    this.sb.addEventListener("updateend", () => this.afterUpdate());
    this.sb.addEventListener("error", () => this.restart("decoder error"));
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${this.url}`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => this.onState("waiting for video…", "wait");
    ws.onmessage = (ev) => {
      if (this.ws !== ws || !(ev.data instanceof ArrayBuffer)) return;
      if (this.init === null) this.init = parseInit(ev.data);
      this.lastData = performance.now();
      this.queue.push(ev.data);
      if (this.queue.length > MAX_QUEUE) return this.restart("fell behind");
      this.pump();
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      // The receiver cut the view for its login (4401: ended; 4403: the role no longer
      // allows footage): retrying cannot help, so say why and stop.
      if (ev.code === 4401 || ev.code === 4403) {
        this.stop();
        this.onState(ev.reason || "your login no longer allows watching", "error");
        if (ev.code === 4401) location.assign("/login");
        return;
      }
      this.restart("disconnected");
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
    if (!this.sb) return;
    if (this.video.buffered.length) {
      this.fragments += 1;
      if (this.fragments === 2) {
        this.retryMs = RETRY_FIRST_MS; // video flows again: the next failure retries fast
        this.onState("live", "live");
      }
    }
    this.keepUp();
    if (!this.trim(false)) this.pump();
  }

  // Stay near the live edge: seek when far behind (or stuck before a hole), else nudge
  // the rate up a little until caught up.
  keepUp() {
    const v = this.video;
    const b = v.buffered;
    if (b.length === 0) return;
    const last = b.length - 1;
    const end = b.end(last);
    const behind = end - v.currentTime;
    const starting = performance.now() - this.startedAt < STARTUP_MS;
    if (behind > (starting ? STARTUP_JUMP_S : JUMP_BEHIND_S) || v.currentTime < b.start(last)) {
      v.currentTime = Math.max(b.start(last), end - LIVE_EDGE_S);
      v.playbackRate = 1;
      this.jumps += 1;
    } else if (behind > CATCH_UP_S) {
      v.playbackRate = CATCH_UP_RATE;
    } else if (behind < CAUGHT_UP_S) {
      v.playbackRate = 1;
    }
    if (v.paused) v.play().catch(() => {});
  }

  // Remove old buffer so memory stays bounded; true if a removal started.
  trim(force) {
    const sb = this.sb;
    const b = this.video.buffered;
    if (!sb || sb.updating || b.length === 0) return false;
    const start = b.start(0);
    const now = this.video.currentTime;
    const keep = force ? 0.5 : KEEP_BEHIND_S;
    if (!force && now - start < TRIM_EVERY_S) return false;
    if (now - keep <= start) return false;
    sb.remove(start, now - keep);
    return true;
  }

  // How far behind live the picture is, in seconds: {capture, buffer}. `capture` is now
  // minus the capture time of the frame on screen (the real figure: it includes the
  // camera, the uplink and the receiver; it needs the agent's and this computer's clocks
  // to agree), null while the part's first capture time is unknown; `buffer` is how much
  // received video waits to be shown.
  behindLive() {
    const v = this.video;
    const b = v.buffered;
    if (!this.sb || b.length === 0 || this.fragments < 2) return null;
    const buffer = Math.max(0, b.end(b.length - 1) - v.currentTime);
    let capture = null;
    if (this.init && this.init.firstSeq !== null) {
      const originUs = this.partOrigin(this.init.firstSeq);
      if (typeof originUs === "number") capture = Date.now() / 1000 - (originUs / 1e6 + v.currentTime);
    }
    return { capture, buffer };
  }

  // Seconds since the last fragment arrived (null before the first).
  silentFor() {
    return this.lastData ? (performance.now() - this.lastData) / 1000 : null;
  }

  tick() {
    const silent = this.silentFor();
    if (this.ws && this.fragments >= 2 && silent !== null && silent > SILENT_S) {
      this.onState(`no video for ${Math.round(silent)} s`, "wait");
    } else if (this.fragments >= 2) {
      this.onState("live", "live");
    }
  }

  restart(why) {
    this.teardown();
    if (this.stopped) return;
    this.restarts += 1;
    const wait = this.retryMs;
    this.onState(`${why}; reconnecting in ${(wait / 1000).toFixed(1)} s…`, "wait");
    this.retryTimer = setTimeout(() => this.start(), wait);
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
  }

  teardown() {
    clearTimeout(this.retryTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close();
    this.sb = null;
    this.ms = null;
    this.queue = [];
    this.lastData = 0;
    this.video.playbackRate = 1;
    this.video.removeAttribute("src");
    this.video.load();
  }

  stop() {
    this.stopped = true;
    this.video.removeEventListener("waiting", this.onWaiting);
    this.teardown();
  }
}
