// The glass benchmark's probe, injected into the receiver's real viewer page before its
// own scripts run (Playwright's init script: not subject to the page's CSP). It only
// watches: it stamps (performance.now()) what the page's live player does with one
// camera's feed, and what the video element presents; the page itself is unchanged.
//
// - every message of a /v1/live/ WebSocket as it reaches the page (a listener added in
//   the constructor runs before the page's onmessage): init segment (its mdhd timescale
//   and the first seq of its part file) or fragment (its tfdt baseMediaDecodeTime);
// - every SourceBuffer.appendBuffer (its tfdt) and the updateend that finished it;
// - every frame the <video class="live"> presents (requestVideoFrameCallback: mediaTime,
//   expectedDisplayTime, presentationTime), with the buffered end at that moment;
// - the element's waiting/seeking/playing events.
//
// Every list is bounded (LIMITS, prepended by the benchmark, which wraps this file in a
// strict-mode function); window.__glass holds them.
const glass = { ws: [], appends: [], frames: [], events: [], video: null };
Object.defineProperty(window, "__glass", { value: glass });

// The body [start, end) of the box at `path` (first match at each level), or null.
function findBox(view, start, end, path) {
  let pos = start;
  while (pos + 8 <= end) {
    let size = view.getUint32(pos);
    let head = 8;
    const type = String.fromCharCode(
      view.getUint8(pos + 4), view.getUint8(pos + 5), view.getUint8(pos + 6), view.getUint8(pos + 7));
    if (size === 1) {
      size = Number(view.getBigUint64(pos + 8));
      head = 16;
    }
    if (size < head || pos + size > end) return null;
    if (type === path[0]) {
      return path.length === 1 ? [pos + head, pos + size] : findBox(view, pos + head, pos + size, path.slice(1));
    }
    pos += size;
  }
  return null;
}

// {kind: "init", timescale} | {kind: "frag", decode} | {kind: "other"} for one message.
function describe(buffer) {
  const view = new DataView(buffer);
  const mdhd = findBox(view, 0, view.byteLength, ["moov", "trak", "mdia", "mdhd"]);
  if (mdhd) {
    const v1 = view.getUint8(mdhd[0]) === 1;
    // The receiver names the track "<camera> from seq N" after its part file's first seq.
    const name = /from seq (\d+)/.exec(new TextDecoder("latin1").decode(buffer));
    return {
      kind: "init",
      timescale: view.getUint32(mdhd[0] + (v1 ? 20 : 12)),
      firstSeq: name ? Number(name[1]) : null,
    };
  }
  const tfdt = findBox(view, 0, view.byteLength, ["moof", "traf", "tfdt"]);
  if (tfdt) {
    const v1 = view.getUint8(tfdt[0]) === 1;
    const decode = v1 ? Number(view.getBigUint64(tfdt[0] + 4)) : view.getUint32(tfdt[0] + 4);
    return { kind: "frag", decode };
  }
  return { kind: "other" };
}

function push(list, limit, item) {
  if (list.length < limit) list.push(item);
}

const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    if (!String(url).includes("/v1/live/")) return;
    this.addEventListener("message", (ev) => {
      const t = performance.now();
      if (!(ev.data instanceof ArrayBuffer)) return;
      push(glass.ws, LIMITS.ws, Object.assign({ t, bytes: ev.data.byteLength }, describe(ev.data)));
    });
  }
};

const nativeAppend = SourceBuffer.prototype.appendBuffer;
SourceBuffer.prototype.appendBuffer = function (data) {
  const entry = Object.assign({ t: performance.now(), done: null }, describe(data));
  push(glass.appends, LIMITS.appends, entry);
  this.addEventListener("updateend", () => { entry.done = performance.now(); }, { once: true });
  return nativeAppend.call(this, data);
};

function watch(video) {
  glass.video = video;
  for (const type of ["waiting", "seeking", "seeked", "playing", "stalled"]) {
    video.addEventListener(type, () => {
      const b = video.buffered;
      push(glass.events, LIMITS.events, {
        t: performance.now(), type, current: video.currentTime,
        end: b.length ? b.end(b.length - 1) : null, ready: video.readyState,
      });
    });
  }
  const onFrame = (now, md) => {
    if (glass.frames.length >= LIMITS.frames) return;
    const b = video.buffered;
    glass.frames.push({
      now,
      media: md.mediaTime,
      expected: md.expectedDisplayTime,
      submitted: md.presentationTime,
      presented: md.presentedFrames,
      end: b.length ? b.end(b.length - 1) : null,
      current: video.currentTime,
    });
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

// The viewer makes its live <video> when its session poll finds the camera live (any
// <video> playing a MediaSource, should the page stop calling it "live").
let looks = 0;
const finder = setInterval(() => {
  const video = document.querySelector("video.live")
    || Array.from(document.querySelectorAll("video")).find((v) => v.src.startsWith("blob:"));
  if (video) watch(video);
  if (video || ++looks >= LIMITS.looks) clearInterval(finder);
}, 20);
