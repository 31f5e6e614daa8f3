"""Benchmark ``glass``: capture time to the frame presented in Chromium, on loopback.

Issue #6: "``glass_to_browser_p95_ms``: capture time -> frame presented in
Chromium on loopback. Target <= 300 ms." The method, in one run:

- **Processes.** The real receiver (``breakglass receiver serve`` on
  127.0.0.1, a child: :func:`tests.bench.common.receiver_process`) and the
  real agent (:mod:`tests.bench.glass_agent`, a child) with one synthetic
  640x480 camera at 30 fps (rendered and encoded live by libx264; every
  packet carries its UTC capture time, ``time.time_ns()`` taken before the
  frame is rendered). The agent presses its button (gpiozero's mock pin)
  and streams the emergency live over TLS.
- **The browser.** Debian's Chromium (headless, the args of RECIPES.md,
  :mod:`tests.browser`) logs in through the receiver's real login page
  (``POST /login``, an officer account made in the receiver's DATA) and
  opens the **real viewer page** (``/``, its scripts unchanged): it
  finds the session by its own poll and plays the camera's live feed
  (``/v1/live/{session}/{camera}``: fMP4 init, then one fragment per frame,
  appended to a ``SourceBuffer``). A probe (``glass_probe.js``, injected as
  an init script, outside the page's CSP) only watches: each WebSocket
  message's arrival and ``tfdt``, each ``appendBuffer`` and its
  ``updateend``, and each frame the ``<video>`` presents
  (``requestVideoFrameCallback``: ``mediaTime``, ``expectedDisplayTime``).
- **Capture time of a presented frame.** The receiver muxes each frame at
  ``pts = (capture_us - origin_us) * 90 kHz`` (:mod:`receiver.run`; the
  origin is the part's first sample, ``first_capture_us`` in
  ``/api/sessions``), so ``mediaTime`` (= ``tfdt`` / timescale, matched
  exactly against the fragments received) gives the frame's capture time.
  Browser times are ``performance.timeOrigin + t``, corrected by the offset
  between that clock and ``time.time_ns()`` measured through Playwright
  (the sample with the shortest round trip; its error is at most half of it,
  both logged).
- **Views.** A live view's lag is mostly set when it opens: a new viewer gets
  the fragments cached since the last keyframe (0 to 1 s of video at once)
  and the page jumps towards the live edge as they come, so where it lands
  depends on the phase of the GOP at the join. The full run therefore opens
  ``VIEWS`` views one after the other (a new page each, at a random phase),
  each counting ``FRAMES / VIEWS`` frames after ``WARMUP`` frames (the burst
  and the jump): 5 s each, long enough to see the page catch up after a late
  start; smoke mode one view, 30 frames after 15.
- **Figures.** p50 and p95 over the counted frames of every view of
  ``expectedDisplayTime - capture`` (target <= 300 ms for the p95).
- **Peer** (the same frames, the same run): capture -> the fragment's
  arrival at the page's WebSocket ``onmessage``. That is the floor for any
  player in this page, whatever it does: nothing can show a frame before its
  bytes are there (it holds agent, uplink, the receiver's remux and its
  one-frame muxer hold, the fan-out and loopback TLS). The ratio is what
  MSE (append, decode, the playback buffer, composition) adds on top. A bare
  loopback WebSocket round trip would say little: the page gets each
  fragment about a millisecond after a Python client of the same feed does.

The log breaks each frame's time down: capture -> arrival (and the same
fragment's arrival at a second, Python viewer of the feed: the pipeline
without any browser), arrival -> append done, append done -> shown, the
playback buffer ahead of the shown frame, the page's seeks and stalls,
Chromium's dropped frames. In a full run one more view (the "edge" view, not
in the figures) has the benchmark itself seek to 1 ms before the buffered end
once the burst is in: what Chromium's MSE pipeline holds by itself, the
page's live-edge policy left aside.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from breakglass.demo import write_agent_config
from receiver.accounts import AccountStore, Role
from receiver.fmp4 import InitInfo, moof_timing, parse_init
from tests.bench.common import (
    Figure,
    child,
    figure,
    make_temp_dir,
    percentile,
    receiver_process,
)
from tests.browser import CHROMIUM, chromium, log_in_page
from tests.logins import FAST, add_account, client_for, log_in

BENCH = "glass"
FPS = 30
CAMERA = ("front-door", "exterior")
PREROLL_S = 5
#: Live views opened one after the other (each joins at a random phase of the GOP).
VIEWS = 4
#: Presented frames of each view not counted (the cached GOP, the jump to the live edge).
WARMUP = 30
#: Presented frames counted, over all views: 5 s of each, long enough to see the page
#: catch up (it plays 10 % fast while behind) after a late start.
FRAMES = 600
#: The extra "edge" view (full runs only, logged, not a figure): frames let settle after
#: the benchmark's seek to the buffered end, then frames counted. What Chromium's MSE
#: pipeline holds by itself, the page's live-edge policy left aside.
EDGE_SETTLE = 30
EDGE_FRAMES = 90
#: Fragments the Python tap records at most (about 10 minutes at 30 fps).
TAP_LIMIT = 18_000
OFFICER = "bench-officer"
PROBE = Path(__file__).with_name("glass_probe.js")
CLOCK_SAMPLES = 30

log = logging.getLogger("bench.glass")

_SESSION_RE = re.compile(r"^session (\S+)$")
_COLLECT_JS = """() => {
  const g = window.__glass;
  const q = g.video ? g.video.getVideoPlaybackQuality() : null;
  return {origin: performance.timeOrigin, ws: g.ws, appends: g.appends, frames: g.frames,
          events: g.events,
          quality: q && {total: q.totalVideoFrames, dropped: q.droppedVideoFrames}};
}"""
_STATE_JS = """() => {
  const g = window.__glass;
  const v = document.querySelector('video.live');
  return {ws: g?.ws.length, appends: g?.appends.length, frames: g?.frames.length,
          events: g?.events.slice(-10), watched: Boolean(g?.video), video: v && {
            ready: v.readyState, paused: v.paused, t: v.currentTime, error: v.error?.code,
            buffered: Array.from({length: v.buffered.length},
                                 (_, i) => [v.buffered.start(i), v.buffered.end(i)])},
          tile: v?.closest('.tile')?.textContent?.slice(0, 300),
          status: document.getElementById('status')?.textContent};
}"""
_SEEK_JS = """() => {
  const g = window.__glass;
  const b = g.video.buffered;
  g.video.currentTime = b.end(b.length - 1) - 0.001;
  return g.frames.length;
}"""
_SESSIONS_JS = """async () => {
  const r = await fetch('/api/sessions', {cache: 'no-store'});
  if (!r.ok) throw new Error(`/api/sessions: HTTP ${r.status}`);
  return await r.json();
}"""


def probe_script(frames: int) -> str:
    """The probe with its bounds, as a strict-mode function run before the page's scripts."""
    limits = {"frames": frames, "ws": 4 * frames + 600, "appends": 4 * frames + 600}
    limits |= {"events": 1000, "looks": 3000}
    return (
        f'(() => {{\n"use strict";\nconst LIMITS = {json.dumps(limits)};\n{PROBE.read_text()}}})();'
    )


@dataclass(frozen=True, slots=True)
class FrameTiming:
    """One presented frame, every time in ms of the host's UTC clock."""

    capture: float
    #: Its fragment's arrival at the page's WebSocket listener.
    arrived: float
    #: The ``updateend`` of the ``appendBuffer`` that carried it.
    appended: float | None
    #: ``expectedDisplayTime``: when Chromium expects it on the glass.
    shown: float
    #: ``presentationTime``: when Chromium handed it to the compositor.
    submitted: float
    #: Seconds of media buffered ahead of it when it was presented.
    ahead_s: float | None
    #: The capture time of the frame after it (its fragment's muxer hold ends then).
    next_capture: float | None
    #: Its fragment's arrival at the benchmark's own Python client of the same feed.
    tapped: float | None = None


def _latest_before(times: dict[int, list[float]], decode: int, limit: float) -> float | None:
    """The latest of ``times[decode]`` not after ``limit`` (a restart re-sends a GOP)."""
    stamps = times.get(decode)
    if not stamps:
        return None
    i = bisect.bisect_right(stamps, limit)
    return stamps[i - 1] if i else None


def frame_timings(
    data: dict[str, Any], origin_us: int, offset_ms: float, tapped: dict[int, float] | None = None
) -> list[FrameTiming]:
    """Match every presented frame to its fragment; times on the host's clock (sans-IO).

    ``data`` is what the probe collected, ``origin_us`` the live part's first
    capture time, ``offset_ms`` the browser's wall clock minus the host's,
    ``tapped`` the Python client's arrivals by ``tfdt``.
    Raises if a presented frame has no fragment (the mapping would be wrong).
    """
    base = float(data["origin"]) - offset_ms  # page time -> host UTC ms
    inits = [m for m in data["ws"] if m["kind"] == "init"]
    if not inits:
        raise RuntimeError("the page got no init segment")
    timescale = int(inits[-1]["timescale"])
    if any(int(m["timescale"]) != timescale for m in inits):
        raise RuntimeError("init segments with different timescales")
    arrivals: dict[int, list[float]] = {}
    for m in data["ws"]:
        if m["kind"] == "frag":
            arrivals.setdefault(int(m["decode"]), []).append(base + m["t"])
    appended: dict[int, list[float]] = {}
    for a in data["appends"]:
        if a["kind"] == "frag" and a["done"] is not None:
            appended.setdefault(int(a["decode"]), []).append(base + a["done"])
    decodes = sorted(arrivals)

    def capture_ms(decode: int) -> float:
        return (origin_us + decode * 1e6 / timescale) / 1e3

    out = []
    for f in data["frames"]:
        shown = base + f["expected"]
        want = round(f["media"] * timescale)
        i = bisect.bisect_left(decodes, want - 1)
        if i >= len(decodes) or abs(decodes[i] - want) > 1:
            raise RuntimeError(f"a frame at mediaTime {f['media']} matches no fragment received")
        decode = decodes[i]
        arrived = _latest_before(arrivals, decode, shown)
        if arrived is None:
            raise RuntimeError(f"the frame at mediaTime {f['media']} was shown before it arrived")
        nxt = decodes[i + 1] if i + 1 < len(decodes) else None
        out.append(
            FrameTiming(
                capture=capture_ms(decode),
                arrived=arrived,
                appended=_latest_before(appended, decode, shown),
                shown=shown,
                submitted=base + f["submitted"],
                ahead_s=None if f["end"] is None else f["end"] - f["media"],
                next_capture=None if nxt is None else capture_ms(nxt),
                tapped=None if tapped is None else tapped.get(decode),
            )
        )
    return out


async def clock_offset(page: Any) -> tuple[float, float]:
    """(browser UTC ms - host UTC ms, round trip ms) of the shortest of a few round trips."""
    best: tuple[float, float] | None = None
    for _ in range(CLOCK_SAMPLES):
        t0 = time.time_ns()
        browser_ms = float(await page.evaluate("performance.timeOrigin + performance.now()"))
        t1 = time.time_ns()
        rtt = (t1 - t0) / 1e6
        if best is None or rtt < best[1]:
            best = (browser_ms - (t0 + t1) / 2e6, rtt)
    assert best is not None
    return best


async def tap(url: str, fingerprint: str, path: str, out: dict[int, float]) -> None:
    """A second viewer of the same feed, in Python: each fragment's arrival (host UTC ms).

    ``out`` maps each fragment's ``tfdt`` to when aiohttp handed it over (the first
    time: a GOP cache seen again is not an arrival). Ends when the feed does, after
    ``TAP_LIMIT`` fragments, or when cancelled.
    """
    async with client_for(url, fingerprint) as http:
        await log_in(http, url, OFFICER)
        async with http.ws_connect(url + path.lstrip("/")) as ws:
            init: InitInfo | None = None
            for _ in range(TAP_LIMIT):
                msg = await ws.receive()
                now_ms = time.time_ns() / 1e6
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    return
                data: bytes = msg.data
                if data[4:8] == b"ftyp":
                    init = parse_init(data)
                elif data[4:8] == b"moof" and init is not None:
                    timing = moof_timing(data[: int.from_bytes(data[:4], "big")], init)
                    if timing.decode_time is not None:
                        out.setdefault(timing.decode_time, now_ms)


async def wait_frames(page: Any, count: int, timeout: float) -> None:
    """Wait (bounded) until the probe has ``count`` presented frames."""
    seen = 0
    try:
        async with asyncio.timeout(timeout):
            while seen < count:
                await asyncio.sleep(0.25)  # real time must pass: the video plays at 1x
                seen = int(await page.evaluate("window.__glass ? window.__glass.frames.length : 0"))
    except TimeoutError:
        state = await page.evaluate(_STATE_JS)
        raise RuntimeError(
            f"Chromium presented {seen} of {count} frames in {timeout:.0f} s; page: {state}"
        ) from None


def part_origin(sessions: dict[str, Any], session_id: str, camera: str, first_seq: int) -> int:
    """``first_capture_us`` of the camera's part file that starts at ``first_seq``."""
    for s in sessions["sessions"]:
        if s["session_id"] != session_id:
            continue
        for cam in s["cameras"]:
            if cam["camera_id"] != camera:
                continue
            for part in cam["recordings"]:
                if part["first_seq"] == first_seq and part["first_capture_us"] is not None:
                    return int(part["first_capture_us"])
    raise RuntimeError(f"/api/sessions: no part of {session_id}/{camera} from seq {first_seq}")


@dataclass(frozen=True, slots=True)
class View:
    """One live view: a page opened on the viewer, what the probe saw, the clock offset."""

    data: dict[str, Any]
    sessions: dict[str, Any]
    offset_ms: float
    rtt_ms: float
    #: The first frame presented after the benchmark's own seek to the live edge, if any.
    seek_index: int | None = None

    def underflows(self, first_frame: int) -> int:
        """Stalls (``waiting`` not caused by a seek) from the ``first_frame``-th frame on."""
        frames = self.data["frames"]
        if first_frame >= len(frames):
            return 0
        since = frames[first_frame]["now"]
        events = self.data["events"]
        return sum(
            1
            for i, e in enumerate(events)
            if e["type"] == "waiting"
            and e["t"] >= since
            and (i == 0 or events[i - 1]["type"] != "seeking")
        )

    def timings(
        self, session_id: str, camera: str, tapped: dict[int, float] | None = None
    ) -> list[FrameTiming]:
        """Every presented frame of this view (see :func:`frame_timings`)."""
        inits = [m for m in self.data["ws"] if m["kind"] == "init"]
        if not inits or inits[-1]["firstSeq"] is None:
            raise RuntimeError("the page got no init segment naming its part file")
        if len({m["firstSeq"] for m in inits}) > 1:
            raise RuntimeError("the live feed changed part file during the view")
        origin = part_origin(self.sessions, session_id, camera, int(inits[-1]["firstSeq"]))
        return frame_timings(self.data, origin, self.offset_ms, tapped)


async def watch(
    context: Any, url: str, frames: int, timeout: float, seek_after: int | None = None
) -> View:
    """Open the viewer in a new page (logged in already) until ``frames`` were presented.

    With ``seek_after``: once that many frames were presented, seek the video to
    1 ms before its buffered end (the page's own policy left aside), then
    collect ``frames`` more; :attr:`View.seek_index` is the first frame after it.
    """
    page = await context.new_page()
    try:
        page.on("pageerror", lambda exc: log.warning("page error: %s", exc))
        await page.goto(url)
        seek_index = None
        if seek_after is not None:
            await wait_frames(page, seek_after, timeout)
            seek_index = int(await page.evaluate(_SEEK_JS))
            frames += seek_index
        await wait_frames(page, frames, timeout)
        offset_ms, rtt_ms = await clock_offset(page)
        data: dict[str, Any] = await page.evaluate(_COLLECT_JS)
        sessions: dict[str, Any] = await page.evaluate(_SESSIONS_JS)
    finally:
        await page.close()
    return View(data, sessions, offset_ms, rtt_ms, seek_index)


def _ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 50):.1f} / p95 {percentile(values, 95):.1f} ms"


def _report(
    frames: list[FrameTiming], views: list[dict[str, Any]], warm: list[FrameTiming]
) -> None:
    """Log where each frame's time goes (the figures come from ``frames``)."""
    to_ws = [f.arrived - f.capture for f in frames]
    hold_free = [f.arrived - f.next_capture for f in frames if f.next_capture is not None]
    appended = [f for f in frames if f.appended is not None]
    append = [f.appended - f.arrived for f in appended if f.appended is not None]
    buffered = [f.shown - f.appended for f in appended if f.appended is not None]
    ahead = [1000 * f.ahead_s for f in frames if f.ahead_s is not None]
    submit = [f.shown - f.submitted for f in frames]
    log.info("capture -> WebSocket message: %s", _ms(to_ws))
    if hold_free:
        log.info(
            "  of which after the next frame's capture (the muxer holds a fragment until the "
            "next frame arrives): %s",
            _ms(hold_free),
        )
    tapped = [f for f in frames if f.tapped is not None]
    if tapped:
        log.info(
            "  capture -> the same fragment at a Python client of the feed (no browser): %s; "
            "browser message - Python client: %s",
            _ms([f.tapped - f.capture for f in tapped if f.tapped is not None]),
            _ms([f.arrived - f.tapped for f in tapped if f.tapped is not None]),
        )
    if append:
        log.info("message -> appendBuffer done: %s", _ms(append))
        log.info("append done -> expected on glass: %s", _ms(buffered))
    if ahead:
        log.info("media buffered ahead of the presented frame: %s", _ms(ahead))
    log.info("presentationTime -> expectedDisplayTime: %s", _ms(submit))
    if warm:
        log.info(
            "warm-up (%d frames, not counted): capture -> shown %s",
            len(warm),
            _ms([f.shown - f.capture for f in warm]),
        )
    kinds: dict[str, int] = {}
    total = dropped = gaps = 0
    for data in views:
        for e in data["events"]:
            kinds[e["type"]] = kinds.get(e["type"], 0) + 1
        quality = data.get("quality") or {}
        total += int(quality.get("total") or 0)
        dropped += int(quality.get("dropped") or 0)
        counts = [f["presented"] for f in data["frames"]]
        gaps += counts[-1] - counts[0] + 1 - len(counts) if counts else 0
    log.info(
        "video events %s; Chromium frames total %d, dropped %d; frames never called back %d",
        kinds,
        total,
        dropped,
        gaps,
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """How much to watch: views, frames each (warm-up, then counted), the edge view."""

    views: int
    warmup: int
    per_view: int
    edge: bool

    @property
    def view_budget_s(self) -> float:
        """Time allowed for one view (the page, the login, a slow start), generous."""
        return 30 + 3 * (self.warmup + max(self.per_view, EDGE_SETTLE + EDGE_FRAMES)) / FPS


@dataclass(frozen=True, slots=True)
class Watched:
    """What :func:`measure` saw."""

    session_id: str
    views: list[View]
    #: The edge view (the benchmark's own seek to the live edge), if planned.
    edge: View | None
    #: The Python tap's arrival (host UTC ms) of each fragment, by ``tfdt``.
    tapped: dict[int, float]


async def measure(plan: Plan) -> Watched:
    """Receiver, agent, Chromium (and the Python tap): the views of one live camera."""
    views: list[View] = []
    edge: View | None = None
    tapped: dict[int, float] = {}
    with make_temp_dir(BENCH) as tmp_name:
        tmp = Path(tmp_name)
        async with receiver_process(tmp / "receiver") as rx:
            config = write_agent_config(
                tmp / "agent", rx, fps=FPS, preroll_s=PREROLL_S, cameras=[CAMERA]
            )
            with AccountStore(rx.data_dir / "accounts.sqlite", params=FAST) as accounts:
                await add_account(accounts, OFFICER, Role.OFFICER)
            argv = [sys.executable, "-m", "tests.bench.glass_agent", "--config", str(config)]
            argv += ["--max-s", f"{120 + (plan.views + 1) * (plan.view_budget_s + 1):.0f}"]
            async with child("agent", argv) as agent, chromium() as browser:
                session_id = (await agent.wait_line(_SESSION_RE, timeout=60)).group(1)
                log.info("agent pid %d streams session %s", agent.pid, session_id)
                live = f"/v1/live/{session_id}/{CAMERA[0]}"
                tapper = asyncio.create_task(tap(rx.url, rx.fingerprint, live, tapped), name="tap")
                context = await browser.new_context(ignore_https_errors=True)  # self-signed
                try:
                    limit = plan.warmup + max(plan.per_view, EDGE_SETTLE + EDGE_FRAMES + 60)
                    await context.add_init_script(script=probe_script(limit))
                    login = await context.new_page()
                    await log_in_page(login, rx.url, OFFICER)  # POST /login: the cookie
                    await login.close()
                    for i in range(plan.views):
                        # Join at any phase of the camera's 1 s GOP: a new viewer starts
                        # with the fragments cached since the last keyframe.
                        await asyncio.sleep(random.uniform(0, 1))
                        want = plan.warmup + plan.per_view
                        views.append(await watch(context, rx.url, want, plan.view_budget_s))
                        times = views[-1].timings(session_id, CAMERA[0], tapped)
                        times = times[plan.warmup : plan.warmup + plan.per_view]
                        half = len(times) // 2
                        log.info(
                            "view %d/%d: capture -> shown %s (first half p50 %.1f, second "
                            "half p50 %.1f ms); buffered ahead %s; stalls %d",
                            i + 1,
                            plan.views,
                            _ms([f.shown - f.capture for f in times]),
                            percentile([f.shown - f.capture for f in times[:half]], 50),
                            percentile([f.shown - f.capture for f in times[half:]], 50),
                            _ms([1e3 * f.ahead_s for f in times if f.ahead_s is not None]),
                            views[-1].underflows(plan.warmup),
                        )
                    if plan.edge:
                        want = EDGE_SETTLE + EDGE_FRAMES
                        edge = await watch(
                            context, rx.url, want, plan.view_budget_s, seek_after=plan.warmup
                        )
                finally:
                    await context.close()
                    tapper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await tapper
    return Watched(session_id, views, edge, tapped)


def _log_edge(edge: View, session_id: str, warmup: int) -> None:
    assert edge.seek_index is not None
    first = edge.seek_index + EDGE_SETTLE
    times = edge.timings(session_id, CAMERA[0])[first : first + EDGE_FRAMES]
    log.info(
        "edge view (one seek to 1 ms before the buffered end after %d frames; counted from "
        "%d frames later): capture -> shown %s; buffered ahead %s; capture -> message %s; "
        "stalls %d (each leaves the picture later: the page re-seeks only far behind)",
        warmup,
        EDGE_SETTLE,
        _ms([f.shown - f.capture for f in times]),
        _ms([1e3 * f.ahead_s for f in times if f.ahead_s is not None]),
        _ms([f.arrived - f.capture for f in times]),
        edge.underflows(first),
    )


async def run(smoke: bool) -> list[Figure]:
    """Watch one live camera in Chromium ``VIEWS`` times; two figures (p50, p95) and the peer."""
    if CHROMIUM is None:
        raise RuntimeError("needs chromium (apt-get install chromium)")
    plan = Plan(1, 15, 30, False) if smoke else Plan(VIEWS, WARMUP, FRAMES // VIEWS, True)
    watched = await measure(plan)
    session_id, views, edge = watched.session_id, watched.views, watched.edge
    warm: list[FrameTiming] = []
    frames: list[FrameTiming] = []
    for view in views:
        log.info(
            "browser clock - host clock: %+.2f ms (round trip %.2f ms; corrected)",
            view.offset_ms,
            view.rtt_ms,
        )
        timings = view.timings(session_id, CAMERA[0], watched.tapped)
        warm += timings[: plan.warmup]
        frames += timings[plan.warmup : plan.warmup + plan.per_view]
    glass = [f.shown - f.capture for f in frames]
    to_ws = [f.arrived - f.capture for f in frames]
    if min(to_ws) <= 0 or max(glass) > 10_000:
        raise RuntimeError(
            f"capture times do not fit (capture -> message {min(to_ws):.1f} ms, "
            f"-> shown {max(glass):.1f} ms): wrong origin or clock"
        )
    log.info(
        "%d frames in %d views: capture -> shown p50 %.1f ms, p95 %.1f ms, max %.1f ms",
        len(glass),
        len(views),
        percentile(glass, 50),
        percentile(glass, 95),
        max(glass),
    )
    _report(frames, [v.data for v in views], warm)
    if edge is not None:
        _log_edge(edge, session_id, plan.warmup)
    return [
        figure(
            BENCH,
            "glass_to_browser_p50_ms",
            percentile(glass, 50),
            "ms",
            "capture_to_ws_message_p50_ms",
            percentile(to_ws, 50),
        ),
        figure(
            BENCH,
            "glass_to_browser_p95_ms",
            percentile(glass, 95),
            "ms",
            "capture_to_ws_message_p95_ms",
            percentile(to_ws, 95),
        ),
    ]
