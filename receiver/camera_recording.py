"""One camera's recording in an emergency session: runs, declared gaps, bad segments.

Theory of operation. Footage of a camera can arrive out of order: the live
lane skips ahead when the uplink is slower than the camera, older pre-roll
and skipped footage arrive later (as packets or sealed segments), and a
resend after a reconnect repeats what is already here. The recording is a
set of **runs** (:class:`receiver.run.Run`), each a contiguous range of seqs
written in order into its own part file(s), started at a keyframe. A packet
goes to the run whose next seq it is; a seq a run already holds is a
duplicate and dropped; a keyframe that fits no run starts a new run; a
non-keyframe that fits no run is dropped (the agent resends from a
keyframe-aligned segment). A run that reaches the first seq of the next run,
or a range the device declared lost (:meth:`CameraRecording.declare_gap`), is
complete: its file is finished, so its last frame becomes durable.

What is durable is a set of seq ranges; with the declared gaps it gives the
cumulative ack (every seq from the session's first seq on is durable or
declared) and the ``holds`` beyond it (:mod:`receiver.seqranges`). The live
feed follows the run of the newest live packet.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver import seqranges
from receiver.errors import MissingSpsError, RecordingClosedError
from receiver.h264 import (
    annex_b_from_avcc,
    leading_parameter_sets,
    mse_codec_string,
    parameter_sets,
)
from receiver.livefeed import LiveFeed
from receiver.run import FragmentListener, PartInfo, Run, make_part_init
from receiver.summaries import BadSegment, DeclaredGap, part_file

__all__ = ["UNREADABLE", "CameraRecording", "Outcome", "TrackInfo"]

_LOG = logging.getLogger(__name__)

#: The reason recorded for a declared gap that begins where a sealed segment began that
#: could not be opened or recorded here (the device declares it ``lost``).
UNREADABLE = "unreadable"
#: Bad segments remembered per camera (a broken device must not grow session.json forever).
MAX_BAD_SEGMENTS = 256


@dataclass(frozen=True, slots=True)
class TrackInfo:
    """One camera of a session as announced by ``session_open``."""

    camera_id: str
    zone: str
    codec: str
    width: int
    height: int
    fps: float
    #: Codec extradata: Annex-B SPS/PPS (may be empty if only in-band).
    extradata: bytes
    #: The session's first seq of this camera (its oldest pre-roll packet).
    first_seq: int
    #: Where the live lane starts on this connection (``None``: at ``first_seq``).
    live_seq: int | None = None


class Outcome(enum.Enum):
    """What :meth:`CameraRecording.append` did with a packet."""

    APPENDED = "appended"
    DUPLICATE = "duplicate"
    DROPPED = "dropped"


class _Route(enum.Enum):
    APPEND = 1
    NEW_RUN = 2
    DUPLICATE = 3
    DROP = 4


class _Fanout:
    """Forwards the feed run's output to the camera's listeners (the live feed)."""

    def __init__(self) -> None:
        self.listeners: list[FragmentListener] = []
        self.init: bytes | None = None

    def _each(self, call: Callable[[FragmentListener], None]) -> None:
        for listener in list(self.listeners):
            try:
                call(listener)
            except Exception:
                _LOG.exception("fragment listener failed; removed")
                with contextlib.suppress(ValueError):
                    self.listeners.remove(listener)

    def init_segment(self, data: bytes) -> None:
        self.init = data
        self._each(lambda listener: listener.init_segment(data))

    def media_fragment(self, data: bytes, keyframe: bool, capture_us: int) -> None:
        self._each(lambda listener: listener.media_fragment(data, keyframe, capture_us))

    def end_of_stream(self) -> None:
        self._each(lambda listener: listener.end_of_stream())
        self.listeners.clear()
        self.init = None


class CameraRecording:
    """The durable recording of one camera of one session.

    Created by :class:`receiver.recording.SessionRecording`; use
    :meth:`append`, :meth:`flush`, :meth:`declare_gap` and :meth:`add_listener`.
    """

    def __init__(
        self,
        track: TrackInfo,
        directory: Path,
        *,
        first_live_seq: int | None,
        mark_dirty: Callable[[], None],
        save_soon: Callable[[], None],
        save: Callable[[], Coroutine[Any, Any, None]],
        mono_ns: Callable[[], int],
    ) -> None:
        self.track = track
        self._dir = directory
        #: Runs in seq order; they never overlap.
        self.runs: list[Run] = []
        #: Ranges the device declared lost, in the order declared.
        self.gaps: list[DeclaredGap] = []
        #: Sealed segments of this camera that could not be recorded.
        self.bad_segments: list[BadSegment] = []
        #: The first seq flagged as captured after the press (None until one arrived).
        self.first_live_seq = first_live_seq
        self._mark_dirty = mark_dirty
        self._save_soon = save_soon
        self._save = save
        self._mono_ns = mono_ns
        self._gap_ranges: list[tuple[int, int]] = []
        self._fanout = _Fanout()
        self._feed_run: Run | None = None
        self._live_max = -1
        #: The live feed while the camera is writable (None before).
        self.live: LiveFeed | None = None
        self._param_sets = b""
        self.mse_codec: str | None = None
        with contextlib.suppress(MissingSpsError):  # extradata may be empty or unusable
            self._param_sets = parameter_sets(track.extradata).annex_b()
            self.mse_codec = mse_codec_string(track.extradata)
        self._active = False
        self._lock = asyncio.Lock()  # held while runs or part files are added
        self._closing: set[asyncio.Task[None]] = set()
        #: Packets already held (resends), dropped.
        self.duplicates = 0
        #: Non-keyframes that fit no run (and packets before the session), dropped.
        self.dropped = 0
        #: ``mono_ns()`` when the first fsync covering a sample (a live sample) completed.
        self.first_durable_mono_ns: int | None = None
        self.first_live_durable_mono_ns: int | None = None
        #: Called on the loop when an fsync made frames durable or a run finished (the index).
        self.on_durable: Callable[[], None] | None = None

    # -- RunHost ---------------------------------------------------------

    @property
    def camera_id(self) -> str:
        """The camera's id."""
        return self.track.camera_id

    @property
    def fps(self) -> float:
        """The announced frame rate."""
        return self.track.fps

    def parameter_sets(self) -> bytes:
        """Annex-B SPS/PPS known for this camera (from extradata or a keyframe)."""
        return self._param_sets

    def learn_parameter_sets(self, data: bytes) -> None:
        """Remember SPS/PPS from a keyframe or an ``avcC`` record: the latest win (a part
        begun mid-GOP gets the camera's current ones)."""
        with contextlib.suppress(MissingSpsError):
            if data[:1] == b"\x01":  # avcC record, not Annex-B
                sets = annex_b_from_avcc(data)
            else:
                found = leading_parameter_sets(data)
                if found.sps is None:
                    return  # no SPS in front of its slices: nothing new
                sets = found.annex_b()
            if sets != self._param_sets or not self.mse_codec:
                self.mse_codec = mse_codec_string(sets)
                self._param_sets = sets

    def mark_dirty(self) -> None:
        """Bookkeeping changed (saved later)."""
        self._mark_dirty()

    def save_metadata_soon(self) -> None:
        """Save ``session.json`` a little later."""
        self._save_soon()

    def committed(self, run: Run) -> None:
        """Stamp the first durable (live) sample for the latency figures."""
        now = self._mono_ns()
        if self.first_durable_mono_ns is None:
            self.first_durable_mono_ns = now
        live = self.first_live_seq
        if self.first_live_durable_mono_ns is None and live is not None and run.durable_seq >= live:
            self.first_live_durable_mono_ns = now
        if self.on_durable is not None:
            self.on_durable()

    # -- state -----------------------------------------------------------

    @property
    def writable(self) -> bool:
        """Whether the camera takes packets (its session is open here)."""
        return self._active

    @property
    def backlogged(self) -> bool:
        """Whether a run holds more unwritten bytes than it may (:attr:`Run.backlogged`)."""
        return any(r.backlogged for r in self.runs)

    @property
    def has_unflushed(self) -> bool:
        """Whether written data (or a finishing run) awaits an fsync."""
        return bool(self._closing) or any(r.has_unflushed for r in self.runs)

    @property
    def has_open_file(self) -> bool:
        """Whether any run has a part file open."""
        return any(r.has_open_file for r in self.runs)

    def held(self) -> list[tuple[int, int]]:
        """Durable seq ranges, merged."""
        return seqranges.merge(rng for run in self.runs for rng in run.held())

    @property
    def durable_seq(self) -> int:
        """Every seq from the session's first one up to this is durable or declared lost."""
        return seqranges.cumulative(self.track.first_seq, [*self.held(), *self._gap_ranges])

    def ack_state(self, limit: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        """The cumulative ack and the durable ranges beyond it (at most ``limit``)."""
        held = self.held()
        acked = seqranges.cumulative(self.track.first_seq, [*held, *self._gap_ranges])
        return acked, seqranges.holds_after(acked, held, limit)

    @property
    def frames_durable(self) -> int:
        """Durable frames over all runs."""
        return sum(r.frames_durable for r in self.runs)

    @property
    def preroll_frames(self) -> int:
        """Durable frames captured before the press (before ``first_live_seq``)."""
        if self.first_live_seq is None:
            return self.frames_durable
        return seqranges.count_below(self.held(), self.first_live_seq)

    def add_listener(self, listener: FragmentListener) -> Callable[[], None]:
        """Send the live run's fragments to ``listener``; returns the unsubscribe."""
        self._fanout.listeners.append(listener)
        if self._fanout.init is not None:
            listener.init_segment(self._fanout.init)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._fanout.listeners.remove(listener)

        return remove

    # -- routing ---------------------------------------------------------

    def _index(self, seq: int) -> int:
        """Index of the run with the greatest first seq <= ``seq`` (-1 if none)."""
        runs = self.runs
        if runs and runs[-1].first_seq <= seq:  # the newest run: where live footage goes
            return len(runs) - 1
        return bisect.bisect_right(runs, seq, key=lambda r: r.first_seq) - 1

    def _route(self, seq: int, keyframe: bool) -> tuple[_Route, Run | None]:
        if seq < self.track.first_seq:
            return _Route.DROP, None
        i = self._index(seq)
        if i >= 0:
            run = self.runs[i]
            if seq <= run.last_seq:
                return _Route.DUPLICATE, run
            # An empty run is only a placeholder until its keyframe arrives.
            if seq == run.next_seq and (keyframe or run.last_seq >= run.first_seq):
                return _Route.APPEND, run
        return (_Route.NEW_RUN if keyframe else _Route.DROP), None

    def _complete(self, run: Run) -> bool:
        """Whether ``run`` reached the next run or a range declared lost."""
        seq = run.next_seq
        if run is self.runs[-1] and not self._gap_ranges:  # live footage: the newest run
            return False
        i = self._index(seq)
        if i >= 0 and self.runs[i] is not run:
            return True
        if not self._gap_ranges:
            return False
        j = bisect.bisect_right(self._gap_ranges, (seq, seq)) - 1
        candidates = self._gap_ranges[max(j, 0) : j + 2]
        return any(first <= seq <= last for first, last in candidates)

    def append_nowait(
        self,
        seq: int,
        capture_us: int,
        keyframe: bool,
        payload: bytes,
        *,
        preroll: bool | None = None,
        live: bool = False,
        defer_init: bool = False,
    ) -> Outcome | None:
        """Record a packet if that needs no new part file; else None (use :meth:`append`).

        ``preroll``: the packet's pre-roll flag (None: unknown, as in a sealed
        segment); ``live``: it came in the live lane (the live feed follows it);
        ``defer_init``: None also for a packet that begins a part file (its init
        segment is then made off the loop by :meth:`append`).
        Raises :class:`RecordingFailedError` for a run whose writing failed.
        """
        if not self._active:
            raise RecordingClosedError(f"camera {self.camera_id!r}: recording is closed")
        if self._lock.locked():
            return None
        route, run = self._route(seq, keyframe)
        if route is _Route.APPEND and run is not None and run.writable:
            if (
                (defer_init and run.needs_init)
                or (keyframe and run.new_stream(payload))
                or run.time_jump(capture_us)
            ):
                return None
            self._write(run, seq, capture_us, keyframe, payload, preroll, live)
            return Outcome.APPENDED
        if route is _Route.APPEND and run is not None and run.failed:
            run.append(seq, capture_us, keyframe, payload)  # raises RecordingFailedError
        return self._count(route, seq)

    async def append(
        self,
        seq: int,
        capture_us: int,
        keyframe: bool,
        payload: bytes,
        *,
        preroll: bool | None = None,
        live: bool = False,
    ) -> Outcome:
        """Record a packet, starting a run or a part file if needed (see :meth:`append_nowait`);
        a part's init segment is made in a worker thread."""
        done = self.append_nowait(
            seq, capture_us, keyframe, payload, preroll=preroll, live=live, defer_init=True
        )
        if done is not None:
            return done
        async with self._lock:
            route, run = self._route(seq, keyframe)  # again: runs may have changed meanwhile
            init = None
            if route is _Route.NEW_RUN:
                # Made before the run exists: a keyframe no part can start with (a camera
                # sending garbage) raises here and leaves no empty run and part file behind,
                # keyframe after keyframe.
                init = await make_part_init(self, seq, capture_us, keyframe, payload, seq)
                run = await self._new_run(seq)
            elif route is _Route.APPEND and run is not None and not run.writable:
                if run.failed:
                    run.append(seq, capture_us, keyframe, payload)  # raises
                await self._reopen(run)
            elif (
                route is _Route.APPEND and run is not None and keyframe and run.new_stream(payload)
            ):
                # New parameter sets (a camera set to another size or profile): a part of
                # their own, begun by this keyframe (its init checked before the cut).
                init = await make_part_init(self, seq, capture_us, keyframe, payload, seq)
                await self._next_part(run)
            elif route is _Route.APPEND and run is not None and run.time_jump(capture_us):
                # The device's clock stepped (or the camera stalled): a part of its own,
                # whose media time starts again from this frame's capture time.
                _LOG.warning(
                    "camera %r: seq %d captured %+.1f s from the one before: a new part",
                    self.camera_id,
                    seq,
                    run.capture_step_s(capture_us),
                )
                await self._next_part(run)
            elif route is not _Route.APPEND:
                return self._count(route, seq) or Outcome.DROPPED
            assert run is not None
            if run.needs_init:
                await run.start_part(seq, capture_us, keyframe, payload, init)
            self._write(run, seq, capture_us, keyframe, payload, preroll, live)
            return Outcome.APPENDED

    def _count(self, route: _Route, seq: int) -> Outcome | None:
        if route is _Route.DUPLICATE:
            self.duplicates += 1
            return Outcome.DUPLICATE
        if route is _Route.DROP:
            self.dropped += 1
            _LOG.debug(
                "camera %r: seq %d fits no run and is no keyframe: dropped", self.camera_id, seq
            )
            return Outcome.DROPPED
        return None

    def _write(
        self,
        run: Run,
        seq: int,
        capture_us: int,
        keyframe: bool,
        payload: bytes,
        preroll: bool | None,
        live: bool,
    ) -> None:
        if live and seq > self._live_max:
            self._live_max = seq
            if run is not self._feed_run:  # live moved on (skipped ahead): so does the feed
                if self._feed_run is not None:
                    self._feed_run.attach(None)
                self._feed_run = run
                run.attach(self._fanout)
        run.append(seq, capture_us, keyframe, payload)
        if preroll is False and (self.first_live_seq is None or seq < self.first_live_seq):
            self.first_live_seq = seq
            self._mark_dirty()
        if self._complete(run):
            self._finish(run)

    def _finish(self, run: Run) -> None:
        """Finish a complete run's file in the background (its last frame becomes durable)."""
        if run is self._feed_run:
            run.attach(None)
            self._feed_run = None
        task = asyncio.create_task(run.close(), name=f"finish {self.camera_id}.{run.first_seq}")
        self._closing.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if self.on_durable is not None:  # its last frame is durable and it grows no more
            self.on_durable()
        # A failed finish leaves the run failed; the next flush or append reports it.
        if not task.cancelled() and (exc := task.exception()) is not None:
            _LOG.error("camera %r: finishing a run failed: %r", self.camera_id, exc)

    async def _new_run(self, seq: int) -> Run:
        run = Run(self, self._dir, [PartInfo(part_file(self.camera_id, seq), seq)])
        run.repaired = True
        self.runs.insert(self._index(seq) + 1, run)
        try:
            await run._open_part(sync_dir=False)
            await self._save()  # listed (and its name made durable) before it gets data
        except BaseException:
            self.runs.remove(run)
            await run.close()
            raise
        _LOG.info("camera %r: new run from seq %d", self.camera_id, seq)
        return run

    async def _next_part(self, run: Run) -> None:
        """Finish ``run``'s part file and go on in a new one (listed before it gets data)."""
        feeding = run is self._feed_run
        await run.close()
        run._plan_part()
        await run._open_part(sync_dir=False)
        await self._list_part(run)
        if feeding:
            run.attach(self._fanout)  # the live feed follows, to the new init segment
        _LOG.info("camera %r: new part from seq %d", self.camera_id, run.next_seq)

    async def _reopen(self, run: Run) -> None:
        if not run.repaired:
            await run.repair()
        run._plan_part()
        await run._open_part(sync_dir=False)
        await self._list_part(run)

    async def _list_part(self, run: Run) -> None:
        """List ``run``'s new part in ``session.json`` before it gets data; if that cannot
        be saved the run fails (footage acked into a part no listing names would be lost
        to a restart) until a re-open plans the part again."""
        try:
            await self._save()
        except BaseException as exc:
            run._fail(exc)
            raise

    # -- declared gaps and bad segments ----------------------------------

    async def declare_gap(self, first: int, last: int, reason: str) -> None:
        """The device says seqs ``first..last`` will never come: record it durably (with
        the reason :meth:`unreadable` gives).

        ``session.json`` is saved before this returns, so an ack that moves past
        the gap never outlives the record of why. Seqs of the range this receiver
        already recorded (they came before the declaration) are not gaps: a device
        may judge wrongly what it never saw acknowledged.
        """
        why = self.unreadable(first, reason)
        recorded = [(r.first_seq, r.last_seq) for r in self.runs if r.last_seq >= r.first_seq]
        pieces = seqranges.missing(first, last, recorded)
        gaps = [g for f, t in pieces if (g := DeclaredGap(f, t, why)) not in self.gaps]
        if not gaps:
            return
        _LOG.warning(
            "camera %r: device declares seqs %d..%d %s%s", self.camera_id, first, last, reason,
            "" if pieces == [(first, last)] else f" (recorded: all but {pieces})",
        )  # fmt: skip
        self.gaps.extend(gaps)
        try:
            await self._save()  # first: acks move past the gap only once it is on disk
        except BaseException:
            for gap in gaps:
                self.gaps.remove(gap)
            raise
        self._gaps_changed()

    def _gaps_changed(self) -> None:
        self._gap_ranges = seqranges.merge((g.first, g.last) for g in self.gaps)
        for run in self.runs:
            if run.writable and self._complete(run):
                self._finish(run)

    def unreadable(self, first: int, reason: str) -> str:
        """The reason to record for a gap the device declares from ``first``: ``reason``,
        unless a sealed segment from there arrived and could not be recorded (the device
        cannot tell why its footage was never acknowledged; this receiver can)."""
        if reason == "lost" and any(
            max(bad.first_seq, self.track.first_seq) == first
            and not bad.error.startswith("live packet:")
            for bad in self.bad_segments
        ):
            return UNREADABLE
        return reason

    async def finish_before(self, seq: int) -> None:
        """Footage from ``seq`` could not be recorded (a sealed segment that cannot be
        opened): finish the run it would have continued, so that run's last frame becomes
        durable and the ack reaches ``seq - 1`` now rather than never (a run's last frame
        is written when the next one arrives, and this one's next may never come). A
        packet that does continue the run later opens it again, in a new part: so the
        run is finished before this returns, not in the background (a part still being
        finished looks empty, and would be planned again under its own name)."""
        async with self._lock:
            i = self._index(seq - 1)
            run = self.runs[i] if i >= 0 else None
            if run is None or not run.writable or run.next_seq != seq:
                return
            if run is self._feed_run:
                run.attach(None)
                self._feed_run = None
            await run.close()  # raises if its writing failed (our disk: as an append would)
        if self.on_durable is not None:  # its last frame is durable
            self.on_durable()

    def bad_segment(self, first_seq: int, capture_us: int, error: str) -> None:
        """Record footage that could not be recorded (saved with the next save): a sealed
        segment, or a live packet no part can start with."""
        for bad in self.bad_segments:
            if bad.first_seq == first_seq:
                bad.count += 1
                bad.error = error
                break
        else:
            if len(self.bad_segments) >= MAX_BAD_SEGMENTS:
                return
            self.bad_segments.append(BadSegment(first_seq, capture_us, error))
        self._mark_dirty()
        self._save_soon()

    # -- durability and lifecycle ------------------------------------------

    async def flush(self) -> int:
        """Make everything written durable, finish complete runs; return :attr:`durable_seq`.

        Raises :class:`RecordingFailedError` while a run's writing has failed.
        """
        await asyncio.gather(
            *(r.flush() for r in self.runs if r.has_unflushed or r.failed), *list(self._closing)
        )
        return self.durable_seq

    async def close(self) -> list[str]:
        """Finish every run (file, fsync) and end the live feed; returns part files to delete.

        Parts that never got a frame are taken out of the run list; the caller
        deletes their files once ``session.json`` no longer lists them.
        """
        self._active = False
        await asyncio.gather(*list(self._closing), return_exceptions=True)
        for run in self.runs:
            try:
                await run.close()
            except Exception:
                _LOG.exception("camera %r: finishing run %d failed", self.camera_id, run.first_seq)
        self._feed_run = None
        self._fanout.end_of_stream()
        if self.live is not None:
            self.live.close()
        return self._prune()

    def _prune(self) -> list[str]:
        gone: list[str] = []
        kept: list[Run] = []
        for run in self.runs:
            if run.failed:
                kept.append(run)
                continue
            while len(run.parts) > 1 and run.parts[-1].frames == 0:
                gone.append(run.parts.pop().file)
            if run.frames_durable == 0:
                gone.extend(p.file for p in run.parts)
            else:
                kept.append(run)
        self.runs = kept
        if gone:
            self._mark_dirty()
        return gone

    async def _prepare(self, track: TrackInfo) -> list[Run]:
        """Make the camera writable for a ``session_open``; returns runs needing a part file.

        Call with the camera's lock held. Runs read from disk are repaired (torn
        tails cut) and failed runs recovered; the runs that will take the first
        packets get their part files planned here, so they are created and
        listed at once, before any data.
        """
        if track.first_seq > self.track.first_seq:
            # An older agent announces a later first seq to say the rest is lost: declared
            # once (it says so again on every session_open), never over what is declared.
            covered = [*((r.first_seq, r.last_seq) for r in self.runs), *self._gap_ranges]
            lost = seqranges.missing(self.track.first_seq, track.first_seq - 1, covered)
            if lost:
                self.gaps += [DeclaredGap(first, last, "lost") for first, last in lost]
                self._gaps_changed()
        for run in self.runs:
            if run.failed or not (run.repaired or run.writable):
                await run.repair()
        self._active = True
        if self.live is None or self.live.closed:
            self.live = LiveFeed()
            self.add_listener(self.live)
        self._live_max = -1
        live_seq = track.first_seq if track.live_seq is None else track.live_seq
        planned: list[Run] = []
        # Where footage will arrive first: the session's first seq, the live lane's first
        # seq, and (when resuming) the seq after the cumulative ack. Their runs get part
        # files now; new runs are made for the first two only (known keyframes).
        starts = {self.track.first_seq: True, max(live_seq, self.track.first_seq): True}
        starts.setdefault(self.durable_seq + 1, False)
        for seq, may_start in sorted(starts.items()):
            route, found = self._route(seq, True)
            if route is _Route.NEW_RUN and may_start:
                run = Run(self, self._dir, [PartInfo(part_file(self.camera_id, seq), seq)])
                run.repaired = True
                self.runs.insert(self._index(seq) + 1, run)
                planned.append(run)
            elif route is _Route.APPEND and found is not None and not found.writable:
                found._plan_part()
                planned.append(found)
        return planned

    # -- views ---------------------------------------------------------------

    def covered(self) -> list[tuple[int, int]]:
        """Seq ranges durable or declared lost, merged."""
        return seqranges.merge([*self.held(), *self._gap_ranges])

    def restore(
        self, runs: list[list[PartInfo]], gaps: list[DeclaredGap], bad: list[BadSegment]
    ) -> None:
        """Runs, declared gaps and bad segments read back from ``session.json``."""
        self.runs = sorted((Run(self, self._dir, p) for p in runs), key=lambda r: r.first_seq)
        self.gaps = list(gaps)
        self._gap_ranges = seqranges.merge((g.first, g.last) for g in self.gaps)
        self.bad_segments = list(bad)
