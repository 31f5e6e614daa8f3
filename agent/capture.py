"""Capture fan-out: each camera's packets, numbered, to the pre-roll and the sinks.

One task per camera iterates its source. A packet gets its per-camera
sequence number here (gapless within a run, never reused across restarts),
goes into the camera's :class:`PreRoll`, then to every subscribed sink (the
uplink while a session streams). Sinks are plain callables run on the event
loop; they must not block. A failing camera is restarted with backoff and
never takes the other cameras or the button down.

While nobody watches live, sources that can hold packets on their thread
(:meth:`hardware._bridge.ThreadedSource.set_handoff`) hand them over in batches
of ``idle_handoff_s`` (one event-loop wake-up per batch instead of per frame:
the agent's largest CPU cost per stream when idle); :meth:`Capture.set_live`
switches every camera to packet-by-packet hand-off for an emergency's live lane
and back.

A watchdog marks a camera ``fault`` when no packet arrived for its
``watchdog_s`` (a camera that hangs without an error, a cut cable), audits
it, and audits the recovery when packets flow again.

Each camera's keyframe interval is measured (:class:`KeyframeWatch`): a press sends
the pre-roll from a keyframe, so up to one interval more than ``preroll_s`` (with
``preroll_s = 0``, nothing from before the press, and nothing until the camera's next
keyframe). An IP camera keeps its own GOP, often 4-10 s: when its interval is longer
than :func:`keyframe_limit_s` allows, twice in a row, the agent says so once per camera
and run, in the log and the audit trail (``camera_keyframe_interval``), and the
camera's :class:`CameraState` keeps it (``keyframe_interval_s``, ``keyframe_too_long``).

A camera sending frames out of presentation order (H.264 B-frames, which the
agent records with wrong frame timing: :mod:`agent.camera_watch`) is in fault
(``reorders_frames``; logged and audited as ``camera_reorders_frames``) until it
has sent none for :data:`~agent.camera_watch.REORDER_CLEAR_S` (``camera_frames_in_order``);
its footage is still recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from agent.audit import AuditLog
from agent.camera_watch import KeyframeWatch, ReorderWatch, keyframe_limit_s
from agent.preroll import PreRoll
from agent.statefile import SequenceReservations
from hardware import CameraSource, EncodedPacket, StreamInfo

log = logging.getLogger(__name__)

Sink = Callable[[EncodedPacket], None]


@dataclass(slots=True)
class CameraState:
    """Health of one camera as the status API reports it."""

    packets: int = 0
    healthy: bool = False
    last_error: str | None = None
    fault: bool = False
    last_packet_mono: float = 0.0
    #: The camera's keyframe interval as last measured (seconds; None: not yet).
    keyframe_interval_s: float | None = None
    #: Its keyframe interval was found longer than the pre-roll allows for (said once).
    keyframe_too_long: bool = False
    #: It sends frames out of presentation order (B-frames): recorded, but mistimed.
    reorders_frames: bool = False


class RetryingSource:
    """A camera whose source could not be created yet (picamera2 missing, a busy device).

    Its ``packets()`` tries to create the real source each time the capture
    task (re)starts it, so the error is reported with the camera's backoff and
    the camera recovers by itself once the cause is fixed; the other cameras
    and the buttons never notice.
    """

    def __init__(
        self,
        camera_id: str,
        factory: Callable[[], CameraSource],
        first_error: Exception,
        fallback: StreamInfo,
    ) -> None:
        self._id = camera_id
        self._factory = factory
        self._error: Exception | None = first_error
        self._fallback = fallback
        self._real: CameraSource | None = None
        self._handoff_s: float | None = None

    @property
    def camera_id(self) -> str:
        """The camera's id."""
        return self._id

    @property
    def info(self) -> StreamInfo:
        """The real source's stream info once it exists."""
        return self._real.info if self._real is not None else self._fallback

    def set_handoff(self, seconds: float) -> None:
        """Pass the hand-off latency on to the real source (now, and once it exists)."""
        self._handoff_s = seconds
        handoff = getattr(self._real, "set_handoff", None)
        if callable(handoff):
            handoff(seconds)

    def force_keyframe(self) -> bool:
        """Pass a keyframe request on to the real source, if it exists and can."""
        force = getattr(self._real, "force_keyframe", None)
        return bool(force()) if callable(force) else False

    async def packets(self) -> AsyncIterator[EncodedPacket]:
        """The real source's packets; raises the creation error until it can be created."""
        if self._real is None:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self._real = self._factory()
            if self._handoff_s is not None:
                self.set_handoff(self._handoff_s)
        async for packet in self._real.packets():
            yield packet

    async def aclose(self) -> None:
        """Close the real source, if any."""
        if self._real is not None:
            await self._real.aclose()


class Capture:
    """Runs every camera and fans its packets out."""

    def __init__(
        self,
        sources: dict[str, CameraSource],
        seqs: SequenceReservations,
        *,
        preroll_s: float,
        preroll_max_bytes: int,
        restart_max_s: float = 10.0,
        idle_handoff_s: float = 0.0,
        watchdog_s: Mapping[str, float] | None = None,
        audit: AuditLog | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.sources = sources
        self.watchdog_s = {cam: (watchdog_s or {}).get(cam, 5.0) for cam in sources}
        self.audit = audit
        self._on_change = on_change
        self.seqs = seqs
        self.preroll_s = preroll_s
        self.prerolls = {cam: PreRoll(preroll_s, preroll_max_bytes) for cam in sources}
        limit = keyframe_limit_s(preroll_s)
        self.keyframes = {cam: KeyframeWatch(limit) for cam in sources}
        self.reorders = {cam: ReorderWatch() for cam in sources}
        self.state = {cam: CameraState() for cam in sources}
        self.restart_max_s = restart_max_s
        self.idle_handoff_s = idle_handoff_s
        self._live = False
        self._sinks: list[Sink] = []
        self.sink_errors = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._first_packet = {cam: asyncio.Event() for cam in sources}

    def subscribe(self, sink: Sink) -> Callable[[], None]:
        """Add a sink; returns the function that removes it."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink)

    async def wait_packets(self, per_camera: int) -> None:
        """Wait until every camera delivered ``per_camera`` more packets (tests, benchmarks)."""
        start = {cam: state.packets for cam, state in self.state.items()}
        done = asyncio.Event()

        def sink(_: EncodedPacket) -> None:
            if all(self.state[c].packets - n >= per_camera for c, n in start.items()):
                done.set()

        unsubscribe = self.subscribe(sink)
        try:
            await done.wait()
        finally:
            unsubscribe()

    async def wait_ready(self, camera: str) -> None:
        """Wait until ``camera`` produced its first packet (its stream info is known)."""
        await self._first_packet[camera].wait()

    def set_live(self, live: bool) -> None:
        """Every packet handed over at once (``True``: a live lane streams) or batched."""
        self._live = live
        for source in self.sources.values():
            handoff = getattr(source, "set_handoff", None)
            if callable(handoff):
                handoff(0.0 if live else self.idle_handoff_s)

    def start(self) -> None:
        """Start one named task per camera."""
        self.set_live(self._live)
        now = time.monotonic()
        for cam in self.sources:
            self.state[cam].last_packet_mono = now  # the watchdog counts from the start
            self._tasks.append(asyncio.create_task(self._run(cam), name=f"capture-{cam}"))
        if self.sources:
            self._tasks.append(asyncio.create_task(self._watchdog(), name="capture-watchdog"))

    async def aclose(self) -> None:
        """Stop the capture tasks and close the sources."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for source in self.sources.values():
            await source.aclose()

    async def _run(self, cam: str) -> None:
        source, state, delay = self.sources[cam], self.state[cam], 0.5
        preroll, ready, deliver = self.prerolls[cam], self._first_packet[cam], self._deliver
        while True:
            try:
                async for packet in source.packets():
                    deliver(cam, packet, state, preroll, ready)
                    delay = 0.5
                raise ConnectionError("source ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a camera must never take the agent down
                self.keyframes[cam].reset()
                self.reorders[cam].restart()
                state.healthy = False
                state.last_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "camera %s failed (%s); restarting in %.1f s", cam, state.last_error, delay
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.restart_max_s)

    async def _watchdog(self) -> None:
        period = max(0.1, min(self.watchdog_s.values()) / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for cam, state in self.state.items():
                silent = now - state.last_packet_mono
                if not state.fault and silent > self.watchdog_s[cam]:
                    state.fault, state.healthy = True, False
                    # A source that retries by itself (an IP camera) says why it is silent.
                    said = getattr(self.sources.get(cam), "last_error", None)
                    if said is not None:
                        state.last_error = str(said)[:300]
                    log.error("camera %s: no packet for %.1f s: fault", cam, silent)
                    if self.audit is not None:
                        self.audit.record_soon(
                            "camera_fault",
                            camera=cam,
                            silent_s=round(silent, 1),
                            error=state.last_error,
                        )
                    if self._on_change is not None:
                        self._on_change()

    def _frames_reordered(self, cam: str, state: CameraState, reordered: bool) -> None:
        """``cam`` began (``reordered``) or stopped sending frames out of order: say so."""
        state.reorders_frames = reordered
        if reordered:
            log.error(
                "camera %s sends frames out of presentation order (B-frames): recorded, but "
                "with wrong frame timing, and players drop frames of it; set its H.264 "
                "encoder without B-frames (Baseline profile, or B-frames 0): fault",
                cam,
            )
        else:
            log.warning("camera %s sends its frames in order again", cam)
        if self.audit is not None:
            event = "camera_reorders_frames" if reordered else "camera_frames_in_order"
            self.audit.record_soon(event, camera=cam)
        if self._on_change is not None:
            self._on_change()

    def _keyframes_too_far_apart(self, cam: str, interval_s: float) -> None:
        """Say once that ``cam``'s keyframes are further apart than the pre-roll allows for:
        the district must know a press sends more than ``preroll_s`` of it."""
        self.state[cam].keyframe_too_long = True
        if self.preroll_s:
            effect = (
                f"a press sends up to {self.preroll_s + interval_s:.1f} s of it from before "
                f"the press where preroll_s is {self.preroll_s:g}"
            )
        else:
            effect = f"a press streams it from its next keyframe, up to {interval_s:.1f} s after"
        log.warning(
            "camera %s sends a keyframe every %.1f s: %s; set its keyframe interval (GOP) to 1-2 s",
            cam,
            interval_s,
            effect,
        )
        if self.audit is not None:
            self.audit.record_soon(
                "camera_keyframe_interval",
                camera=cam,
                interval_s=round(interval_s, 2),
                preroll_s=self.preroll_s,
            )

    def _deliver(
        self,
        cam: str,
        packet: EncodedPacket,
        state: CameraState,
        preroll: PreRoll,
        ready: asyncio.Event,
    ) -> None:
        packet = packet.numbered(self.seqs.next(cam))
        state.packets += 1
        state.healthy = True
        state.last_packet_mono = time.monotonic()
        if state.fault:
            state.fault = False
            log.warning("camera %s recovered", cam)
            if self.audit is not None:
                self.audit.record_soon("camera_recovered", camera=cam)
            if self._on_change is not None:
                self._on_change()
        preroll.push(packet)
        watch = self.keyframes[cam]
        if watch.packet(packet.mono_ns, packet.keyframe) is not None:
            self._keyframes_too_far_apart(cam, watch.interval_s or 0.0)
        if packet.keyframe:
            state.keyframe_interval_s = watch.interval_s
        order = self.reorders[cam]
        reordered = order.packet(packet.source_ts_ns, packet.keyframe, packet.mono_ns)
        if reordered != state.reorders_frames and (reordered or order.mended()):
            self._frames_reordered(cam, state, reordered)
        if not ready.is_set():
            ready.set()
        for sink in self._sinks:
            try:
                sink(packet)
            except Exception:  # a sink's bug must not stop the camera or the other sinks
                self.sink_errors += 1
                if self.sink_errors in (1, 10, 100) or self.sink_errors % 1000 == 0:
                    log.exception(
                        "sink failed on %s seq %d (%d so far)", cam, packet.seq, self.sink_errors
                    )
