"""One run of a camera's recording: consecutive seqs remuxed into part file(s).

Theory of operation. A run starts at a keyframe and takes the camera's
packets strictly in sequence order. Each part file is a fragmented MP4 (one
fragment per frame) as FFmpeg's mov muxer writes it: PyAV writes the init
segment from the first keyframe's parameter sets, and
:class:`receiver.fragmenter.Fragmenter` each frame's fragment, byte for byte
what the muxer wrote (it did, until its cost per frame bounded the ingest
rate), written straight to the part file through :class:`PartWriter`. A
frame's fragment is complete when the next frame arrives (its duration is
the gap to it) or at close. Samples are gapless within a run, so the n-th
sample of a part has sequence number ``part.first_seq + n``.

Durability. The loop only makes the bytes; they wait in a queue, each with
the part's frame and byte counts once it is written. :meth:`Run.flush` starts
the fsync's task (one per run; callers arriving meanwhile wait for the next
round that covers their data): in a worker thread, a round takes what waits,
writes it (one writev) and fsyncs, and only then hands the counts of its last
item back to the loop, which counts those samples as durable. While more
waits, the thread goes on with the next round at once (for up to
``ROUNDS_FOR_S``): going back through the loop between rounds (its burst of
messages runs a few ms between yields) left the disk idle a third of the time
and, past ``MAX_UNWRITTEN_BYTES``, stopped reading the connection. Rounds of
a part start at least ``COMMIT_GAP_S`` apart.

A part is never appended to once closed, so after a restart, a write failure,
a re-opened session, new parameter sets (:meth:`Run.new_stream`) or a jump in
capture time (:meth:`Run.time_jump`: the device's clock stepped) a run
continues in a new part file, named after its
first sequence number (``<camera>.<first_seq>.mp4``) and listed in
``session.json`` before it gets any data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time
from array import array
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from fractions import Fraction
from io import BytesIO
from pathlib import Path
from typing import Protocol

import av

from receiver.errors import (
    BitstreamError,
    InvalidPacketError,
    MissingSpsError,
    NotKeyframeError,
    RecordingClosedError,
    RecordingError,
    RecordingFailedError,
)
from receiver.fmp4 import avcc_from_moov
from receiver.fragmenter import Fragmenter
from receiver.h264 import ParameterSets, has_sps, leading_parameter_sets, parameter_sets
from receiver.parts import (
    PartInfo,
    PartWriter,
    cut_failed_part,
    cut_part,
    open_part_file,
    scan_part,
)
from receiver.summaries import part_file

__all__ = [
    "MUX_OPTIONS",
    "TIME_BASE",
    "FragmentListener",
    "PartInfo",
    "Run",
    "RunHost",
    "capture_jump",
    "init_segment",
    "make_part_init",
]

_LOG = logging.getLogger(__name__)

#: A part's fsyncs start at least this far apart. At full ingest rate frames arrive
#: every few hundred µs, about an fsync's time: group commit alone then ran an fsync,
#: a thread hand-off and an ack per frame or two. A camera at 30 fps never waits.
COMMIT_GAP_S = 0.005
#: Fragments wait in memory for the fsync's thread to write them; beyond this the
#: camera stops taking packets until they are written (its connection is not read).
MAX_UNWRITTEN_BYTES = 4 << 20
#: The fsync's thread starts no more rounds after this long and goes back to the pool
#: (shared with the other cameras, the index, ``session.json`` saves, sealed segments);
#: the fsync's task asks for a thread again at once if more waits.
ROUNDS_FOR_S = 0.1

#: Page cache granularity (:meth:`Run._drop_cached`).
_PAGE = mmap.PAGESIZE

#: MP4 time base of every recording: the 90 kHz clock of MPEG video.
TIME_BASE = Fraction(1, 90_000)
#: A frame captured this much later than the one before it (µs), or this much earlier,
#: begins a new part (:meth:`Run.time_jump`): the device's clock stepped (a Pi without a
#: real-time clock syncing over NTP), or the camera stalled. Within a part, media time
#: follows capture time: a step of hours made one frame last hours (and one of over
#: 13.26 h overflowed its 32-bit sample duration and cut the device's connection).
MAX_FRAME_GAP_US = 10_000_000
MAX_FRAME_BACK_US = 1_000_000


def capture_jump(last_us: int, capture_us: int) -> bool:
    """Whether a frame captured at ``capture_us`` after one captured at ``last_us`` jumps
    by more than :data:`MAX_FRAME_GAP_US` forward or :data:`MAX_FRAME_BACK_US` back."""
    step = capture_us - last_us
    return step > MAX_FRAME_GAP_US or -step > MAX_FRAME_BACK_US


#: The mov muxer's options the part files are written with (its init segment, and what
#: :class:`Fragmenter` reproduces).
MUX_OPTIONS = {
    "movflags": "frag_every_frame+empty_moov+default_base_moof",
    "flush_packets": "1",
}


class FragmentListener(Protocol):
    """Receives a recording's fMP4 output as it is written (the live feed)."""

    def init_segment(self, data: bytes) -> None:
        """``ftyp`` + ``moov`` of the current part; sent before any fragment."""

    def media_fragment(self, data: bytes, keyframe: bool, capture_us: int) -> None:
        """One ``moof`` + ``mdat``; ``keyframe`` and ``capture_us`` of its first sample."""

    def end_of_stream(self) -> None:
        """The recording was closed; no more data will come."""


class RunHost(Protocol):
    """What a run needs from the camera recording it belongs to."""

    @property
    def camera_id(self) -> str:
        """The camera's id (part file names, logs)."""

    @property
    def fps(self) -> float:
        """Announced frame rate (the duration of a part's first sample)."""

    def parameter_sets(self) -> bytes:
        """Annex-B SPS/PPS to put in front of a part's first packet when it has none."""

    def learn_parameter_sets(self, data: bytes) -> None:
        """A keyframe with in-band SPS, or a stored ``avcC`` record, was seen."""

    def mark_dirty(self) -> None:
        """Bookkeeping in ``session.json`` changed."""

    def save_metadata_soon(self) -> None:
        """Save ``session.json`` a little later, never in front of an ack."""

    def committed(self, run: Run) -> None:
        """An fsync made more of ``run`` durable."""


class Run:
    """A contiguous range of one camera's seqs, written in order into its part file(s).

    Created by :class:`receiver.camera_recording.CameraRecording`, which routes
    each packet to the run whose next seq it is.
    """

    def __init__(self, host: RunHost, directory: Path, parts: list[PartInfo]) -> None:
        if not parts:
            raise ValueError("a run needs at least one part")
        self._host = host
        self._dir = directory
        #: The run's part files in seq order; the last one is the one written.
        self.parts = parts
        self._listener: FragmentListener | None = None
        self._fd: int | None = None
        self._writer: PartWriter | None = None
        #: Bytes made on the loop for the fsync's thread to write, each with the part's
        #: complete fragments and bytes made once it is written (appended on the loop,
        #: taken in the thread: a deque's append and popleft are atomic).
        self._unwritten: deque[tuple[bytes, int, int]] = deque()
        #: Bytes made for the current part (on the loop), taken by the fsync's thread
        #: (written there only), and covered by an fsync (on the loop).
        self._made = self._taken = self._synced = 0
        #: The part's bytes before this offset are out of the page cache (the fsync's thread).
        self._uncached_to = 0
        #: Callers of :meth:`flush` wait on this for the next round (None: nobody waits).
        self._round: asyncio.Future[None] | None = None
        self._fragmenter: Fragmenter | None = None
        #: The current part's fragmenter, kept after the part is finished: the index
        #: takes the last fragments it listed.
        self._listing: Fragmenter | None = None
        self._init: bytes | None = None
        #: The SPS and PPS the current part's init segment describes.
        self._sets: ParameterSets | None = None
        #: (keyframe, capture time) of each frame whose fragment waits for the next frame.
        self._pending: deque[tuple[bool, int]] = deque()
        self._part_written = 0  # samples of the last part in complete fragments on the fd
        self._last_seq = self.durable_seq
        self._origin_us = 0
        self._last_pts = -1
        self._last_capture_us = 0
        self._fsync_task: asyncio.Task[None] | None = None
        #: ``time.monotonic()`` when the last round started (written by its thread).
        self._fsync_started = -COMMIT_GAP_S
        self._writable = False
        self._failure: BaseException | None = None
        #: Whether torn tails were cut since this run was read from disk.
        self.repaired = False
        #: Whether the next part opened is the rewrite of one holding no complete fragment.
        self._rewrite = False
        #: Packets whose capture time did not increase (pts bumped by one tick).
        self.timestamp_fixups = 0

    # -- state -----------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The run's first seq (a keyframe)."""
        return self.parts[0].first_seq

    @property
    def durable_seq(self) -> int:
        """Highest seq on disk after an fsync (``first_seq - 1`` if none)."""
        return self.parts[-1].last_seq

    @property
    def last_seq(self) -> int:
        """Highest seq appended (muxed, maybe not yet durable)."""
        return self._last_seq

    @property
    def next_seq(self) -> int:
        """The only seq this run accepts next."""
        return self._last_seq + 1

    @property
    def frames_durable(self) -> int:
        """Durable frames over all part files."""
        return sum(p.frames for p in self.parts)

    @property
    def writable(self) -> bool:
        """Whether :meth:`append` accepts packets (a part is open, nothing failed)."""
        return self._writable and self._failure is None

    @property
    def failed(self) -> bool:
        """Whether writing or an fsync failed (re-open the session to recover)."""
        return self._failure is not None

    @property
    def has_unflushed(self) -> bool:
        """Whether complete fragments were made that no fsync covers yet."""
        return self._part_written > self.parts[-1].frames or self._synced < self._made

    @property
    def backlogged(self) -> bool:
        """Whether more than ``MAX_UNWRITTEN_BYTES`` wait for the writer thread."""
        return self._made - self._taken > MAX_UNWRITTEN_BYTES

    @property
    def has_open_file(self) -> bool:
        """Whether a part file is open (writable, or failed and not yet released)."""
        return self._fd is not None

    @property
    def _part_path(self) -> Path:
        """The file of the part written now (the run's last)."""
        return self._dir / self.parts[-1].file

    @property
    def init_segment(self) -> bytes | None:
        """The current part's init segment, once the first packet was muxed."""
        return self._init

    @property
    def needs_init(self) -> bool:
        """Whether the next packet begins the part file (its init segment comes first)."""
        return self._fragmenter is None and self._writable and self._failure is None

    def new_stream(self, keyframe: bytes) -> bool:
        """Whether ``keyframe`` carries parameter sets other than the current part's (a
        camera set to another size or profile): it must begin a part of its own, whose
        init segment describes them (players that read only the init need it)."""
        if self._sets is None or self._fragmenter is None:
            return False
        sets = leading_parameter_sets(keyframe)
        return sets.sps is not None and sets != self._sets

    def time_jump(self, capture_us: int) -> bool:
        """Whether a frame captured at ``capture_us`` must begin a part of its own: the
        capture time jumps from the part's last frame, forward by more than
        :data:`MAX_FRAME_GAP_US` or back by more than :data:`MAX_FRAME_BACK_US`."""
        if self._fragmenter is None or self._last_pts < 0:
            return False
        return capture_jump(self._last_capture_us, capture_us)

    def capture_step_s(self, capture_us: int) -> float:
        """How far (s) ``capture_us`` is from the capture time of the part's last frame."""
        return (capture_us - self._last_capture_us) / 1e6

    def held(self) -> list[tuple[int, int]]:
        """The durable seq ranges of this run, one per part that holds any."""
        return [(p.first_seq, p.last_seq) for p in self.parts if p.frames]

    def take_written(self) -> tuple[bytes | None, int, array[int]]:
        """The current part's durable fragments written since the last take (flat, as
        :attr:`Fragmenter.written`), the part's frame number of the first, and its init
        segment: for the recording index, which then need not read the file back."""
        if self._listing is None:
            return None, 0, array("q")
        start, taken = self._listing.take(self.parts[-1].frames)
        return self._init, start, taken

    def attach(self, listener: FragmentListener | None) -> None:
        """Send this run's fragments to ``listener`` (None: to nobody).

        A known init segment is delivered at once.
        """
        self._listener = listener
        if listener is not None and self._init is not None:
            listener.init_segment(self._init)

    # -- opening ---------------------------------------------------------

    async def _scan(self, repair: bool) -> None:
        """Count durable samples of every part on disk; with ``repair`` cut torn tails."""
        for part in self.parts:
            samples, avcc = await asyncio.to_thread(scan_part, self._dir / part.file, repair)
            part.frames = samples
            if avcc is not None:
                self._host.learn_parameter_sets(avcc)
        self._part_written = self.parts[-1].frames
        self._last_seq = self.durable_seq
        self.repaired = self.repaired or repair

    async def repair(self) -> None:
        """Release the part (a failed one too) and re-read the run from disk, torn tails cut.

        After a failed write or fsync, the last part is first cut to what the last good
        fsync covered: what came after may sit in the page cache, never to reach the disk
        (Linux reports a failed fsync once and drops its pages' error), and a scan would
        count it as durable.
        """
        failed, covered, last = self._failure is not None, self._synced, self.parts[-1].file
        await self.close()
        if failed:
            await asyncio.to_thread(cut_part, self._dir / last, covered)
        await self._scan(repair=True)
        self._failure = None

    def _plan_part(self) -> None:
        """Choose the part file to write next (after :meth:`_scan` with repair)."""
        last = self.parts[-1]
        if last.frames == 0:
            last.first_capture_us = None  # it holds nothing: rewrite it from the start
            self._rewrite = True
        else:
            seq = self.durable_seq + 1
            self.parts.append(PartInfo(part_file(self._host.camera_id, seq), seq))
        self._part_written = 0
        self._last_seq = self.durable_seq

    async def _open_part(self, *, sync_dir: bool = True) -> None:
        """Create the planned part file and accept packets.

        The part must be listed in session.json before it gets data; with
        ``sync_dir=False`` the caller saves session.json next, whose folder
        fsync makes the new file's name durable too (one fsync for all parts).
        """
        path = self._dir / self.parts[-1].file
        self._fd = await asyncio.to_thread(open_part_file, path, sync_dir, rewrite=self._rewrite)
        self._rewrite = False
        self._writer = PartWriter(self._fd)
        self._unwritten.clear()
        self._made = self._taken = self._synced = self._uncached_to = 0
        self._fragmenter = self._listing = self._init = None
        self._pending.clear()
        self._failure = None
        self._writable = True

    # -- appending -------------------------------------------------------

    def append(self, seq: int, capture_us: int, keyframe: bool, payload: bytes) -> None:
        """Remux one Annex-B access unit; ``seq`` must be :attr:`next_seq`."""
        if self._failure is not None:
            self._raise_if_failed()
        if not self._writable:
            raise RecordingClosedError(
                f"camera {self._host.camera_id!r}: run from seq {self.first_seq} is closed"
            )
        if seq != self._last_seq + 1:  # the camera routes; a bug, not the device's fault
            raise RecordingError(
                f"camera {self._host.camera_id!r}: run expects seq {self.next_seq}, got {seq}"
            )
        if not payload:
            raise self._empty(seq)
        if self._fragmenter is None:
            self._start_part(seq, capture_us, keyframe, payload)
        assert self._fragmenter is not None
        if keyframe:
            self._host.learn_parameter_sets(payload)
        pts = ((capture_us - self._origin_us) * 9 + 50) // 100  # µs -> 90 kHz, rounded
        if pts <= self._last_pts:
            pts = self._last_pts + 1
            self.timestamp_fixups += 1
        if self._last_pts < 0:
            fps = self._host.fps
            duration = round(90_000 / fps) if fps > 0 else 3000
        else:
            duration = pts - self._last_pts
        fragment = self._fragmenter.add(pts, duration, keyframe, payload)
        if fragment is not None:  # the previous frame's; a failure takes this one nowhere
            self._write_fragment(fragment)
        self._last_seq = seq
        self._last_pts = pts
        self._last_capture_us = capture_us
        self._pending.append((keyframe, capture_us))

    async def start_part(
        self, seq: int, capture_us: int, keyframe: bool, payload: bytes, init: bytes | None = None
    ) -> None:
        """Begin the part with the init segment made from its first packet (``seq``, which
        :meth:`append` then takes) in a worker thread (:func:`make_part_init`), or with
        ``init`` made so already. Raises what :meth:`append` would for that packet."""
        if init is None:
            init = await make_part_init(
                self._host, seq, capture_us, keyframe, payload, self.first_seq
            )
        if self.needs_init:  # else it closed or failed meanwhile: append will say so
            self._begin_part(init, capture_us)

    def _start_part(self, seq: int, capture_us: int, keyframe: bool, payload: bytes) -> None:
        template = _init_template(self._host, seq, keyframe, payload, self.first_seq)
        self._begin_part(_make_init(self._host.camera_id, template, seq, capture_us), capture_us)

    def _empty(self, seq: int) -> InvalidPacketError:
        return _empty(self._host.camera_id, seq)

    def _begin_part(self, init: bytes, capture_us: int) -> None:
        self._write(init)
        self._init = init
        avcc = avcc_from_moov(init)
        try:
            self._sets = None if avcc is None else parameter_sets(avcc)
        except MissingSpsError:
            self._sets = None
        self._fragmenter = self._listing = Fragmenter(len(init))
        self._origin_us = capture_us
        self._last_pts = -1
        self.parts[-1].first_capture_us = capture_us
        self._host.mark_dirty()
        self._notify_init(init)

    def _write(self, data: bytes) -> None:
        # Written to the file by the fsync's thread, with what comes meanwhile (one
        # writev): a write per frame on the loop cost a fifth of its time at full rate.
        self._made += len(data)
        self._unwritten.append((data, self._part_written, self._made))

    def _write_fragment(self, data: bytes) -> None:
        """Queue the oldest pending frame's fragment and pass it to the listener."""
        self._part_written += 1
        self._write(data)
        keyframe, capture_us = self._pending.popleft()
        if self._listener is not None:
            self._notify(lambda listener: listener.media_fragment(data, keyframe, capture_us))

    def _notify_init(self, data: bytes) -> None:
        self._notify(lambda listener: listener.init_segment(data))

    def _notify(self, call: Callable[[FragmentListener], None]) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            call(listener)
        except Exception:
            _LOG.exception("camera %r: fragment listener failed; removed", self._host.camera_id)
            self._listener = None

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RecordingFailedError(
                f"camera {self._host.camera_id!r}: recording failed: {self._failure!r}; "
                "re-open the session to continue in a new part file"
            ) from self._failure

    def _fail(self, exc: BaseException) -> None:
        # last_seq stays: until repaired, no new run may start among the seqs written
        # here (the repair may find them on disk after all).
        self._failure = exc
        self._release_muxer()

    def _release_muxer(self) -> None:
        if self._writer is not None:
            self._writer.detach()
        self._fragmenter = None

    # -- durability ------------------------------------------------------

    async def flush(self) -> int:
        """Make everything written so far durable; return :attr:`durable_seq`.

        Group commit: one fsync runs at a time, and the next starts no sooner
        than ``COMMIT_GAP_S`` after it; callers that arrive meanwhile wait and
        then share one more fsync covering their data.
        Raises :class:`RecordingFailedError` once writing or an fsync has failed.
        """
        self._raise_if_failed()
        target, made = self._part_written, self._made
        while self.parts[-1].frames < target or self._synced < made:
            if self._fsync_task is None:
                task = asyncio.create_task(
                    self._fsync_rounds(), name=f"fsync {self._dir.name}/{self.parts[-1].file}"
                )
                task.add_done_callback(_retrieve)
                self._fsync_task = task
            if self._round is None:
                self._round = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._round)  # raises what ended the fsync's task
        return self.durable_seq

    async def _fsync_rounds(self) -> None:
        """The fsync's task: rounds in a worker thread, each after the commit gap, until
        nothing waits; its failure is every waiting caller's."""
        try:
            fd, writer = self._fd, self._writer
            if fd is None or writer is None:
                raise RecordingFailedError(
                    f"camera {self._host.camera_id!r}: part file already closed"
                )
            loop = asyncio.get_running_loop()
            while True:
                gap = self._fsync_started + COMMIT_GAP_S - time.monotonic()
                if gap > 0:
                    await asyncio.sleep(gap)  # what arrives meanwhile shares this fsync
                if not self._unwritten:
                    return
                # The part list was saved before the part got data. What changes later
                # (the part's first capture time, the first live seq) is bookkeeping,
                # not footage: it is saved beside the data fsync, never in front of an ack.
                self._host.save_metadata_soon()
                try:
                    await asyncio.to_thread(self._sync_rounds, writer, fd, loop)
                except OSError as exc:
                    # A failed write may have left a torn tail; after a failed fsync the
                    # kernel may have dropped the dirty pages (they read back from the
                    # page cache, but never reach the disk): never fsync this file again
                    # and call it durable. The file is cut to what the last good fsync
                    # covered now, before its descriptor is released, so that a scan
                    # (the re-open, or a restart before it) finds only durable frames.
                    self._fail(exc)
                    cut = asyncio.ensure_future(
                        asyncio.to_thread(cut_failed_part, fd, self._synced, self._part_path)
                    )
                    cancelled = False
                    while not cut.done():  # cancelled too: never close the fd under the cut
                        try:
                            await asyncio.wait({cut})
                        except asyncio.CancelledError:
                            cancelled = True
                    if cancelled:
                        raise asyncio.CancelledError from exc
                    raise RecordingFailedError(
                        f"camera {self._host.camera_id!r}: writing or fsync failed: {exc}"
                    ) from exc
        except BaseException as exc:  # a cancellation too: the waiters see it, as before
            self._fsync_task = None
            self._wake_flushers(exc)
            raise
        finally:
            if self._fsync_task is not None:
                self._fsync_task = None
                self._wake_flushers()

    def _sync_rounds(self, writer: PartWriter, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        """The fsync's thread: write what waits and fsync it, while more waits."""
        until = time.monotonic() + ROUNDS_FOR_S
        while self._unwritten:
            started = time.monotonic()
            self._fsync_started = started
            chunks: list[bytes] = []
            frames = made = 0
            with contextlib.suppress(IndexError):
                while True:
                    data, frames, made = self._unwritten.popleft()
                    chunks.append(data)
            self._taken = made
            writer.write(chunks)
            os.fsync(fd)
            self._drop_cached(fd, made)
            loop.call_soon_threadsafe(self._synced_to, frames, made)
            now = time.monotonic()
            if now - started < COMMIT_GAP_S or now >= until:
                return  # the next round starts from the loop (after the gap)

    def _drop_cached(self, fd: int, made: int) -> None:
        """The fsync's thread: take the part's durable bytes out of the page cache.

        Footage is written once and read back rarely (the live feed is served from
        memory), so cached pages only grow the page cache. Kept, they made each
        byte written cost 3-4 times the CPU once a few GB had passed (a fresh page
        of memory per page written): the ingest rate fell by a fifth over a
        receiver's first minutes. Only whole pages go; the last, partial one next
        time.
        """
        start = self._uncached_to
        if made > start:
            with contextlib.suppress(OSError):  # advice only: the data is durable anyway
                os.posix_fadvise(fd, start, made - start, os.POSIX_FADV_DONTNEED)
            self._uncached_to = made - made % _PAGE

    def _synced_to(self, frames: int, made: int) -> None:
        """On the loop: an fsync covered the part's first ``frames`` and ``made`` bytes."""
        self._synced = max(self._synced, made)
        if frames > self.parts[-1].frames:
            self.parts[-1].frames = frames
            self._host.committed(self)
        self._wake_flushers()

    def _wake_flushers(self, error: BaseException | None = None) -> None:
        fut, self._round = self._round, None
        if fut is None or fut.done():
            return
        if error is None:
            fut.set_result(None)
        elif isinstance(error, asyncio.CancelledError):
            fut.cancel()
        else:
            fut.set_exception(error)

    async def close(self) -> None:
        """Finish the part file (its last fragment), fsync it and stop accepting packets.

        Afterwards ``durable_seq == last_seq`` unless writing had failed.
        """
        self._writable = False
        if self._fd is None:
            return
        if self._fragmenter is not None and self._failure is None:
            last, mfra = self._fragmenter.finish()  # the held last frame's fragment, then mfra
            self._fragmenter = None
            if last is not None:
                self._write_fragment(last)
            self._write(mfra)
        try:
            if self._failure is None:
                await self.flush()
        finally:
            if (task := self._fsync_task) is not None:
                with contextlib.suppress(RecordingFailedError):
                    await asyncio.shield(task)  # never close the fd under a running fsync
            self._release_muxer()
            self._unwritten.clear()
            self._taken = self._made
            fd, self._fd = self._fd, None
            if fd is not None:
                await asyncio.to_thread(os.close, fd)
            self._listener = None


def _retrieve(task: asyncio.Task[None]) -> None:
    # Waiters may all have been cancelled; the error is logged, never silently lost.
    if not task.cancelled() and (exc := task.exception()) is not None:
        _LOG.error("fsync failed: %r", exc)


async def make_part_init(
    host: RunHost, seq: int, capture_us: int, keyframe: bool, payload: bytes, run_first_seq: int
) -> bytes:
    """The init segment of a part that starts at packet ``seq`` (of a run starting at
    ``run_first_seq``), made in a worker thread: PyAV probes the packet, which took
    10-17 ms of the event loop for a 1080p keyframe, for every camera of every session
    that starts. Raises :class:`InvalidPacketError` or :class:`BitstreamError` for a
    packet no part can start with."""
    template = _init_template(host, seq, keyframe, payload, run_first_seq)
    return await asyncio.to_thread(_make_init, host.camera_id, template, seq, capture_us)


def _init_template(
    host: RunHost, seq: int, keyframe: bool, payload: bytes, run_first_seq: int
) -> bytes:
    """Check a part's first packet; the template its init segment is made from."""
    cam = host.camera_id
    if not payload:  # the SPS alone would make no init segment
        raise _empty(cam, seq)
    if not keyframe and seq == run_first_seq:
        raise NotKeyframeError(f"camera {cam!r}: a run must start at a keyframe (seq {seq})")
    template = payload
    if not has_sps(payload):
        if payload.startswith(b"\x00\x00\x00\x01"):
            # Behind the PPS, a 3-byte start code: FFmpeg counts the first zero of a
            # 4-byte one into the PPS of the avcC it writes, unlike the run's.
            payload = payload[1:]
        template = host.parameter_sets() + payload
    if not has_sps(template):
        raise MissingSpsError(f"camera {cam!r}: no SPS in seq {seq} nor in the track extradata")
    return template


def _make_init(cam: str, template: bytes, seq: int, capture_us: int) -> bytes:
    """A part's init segment (safe in a worker thread)."""
    try:
        return init_segment(template, capture_us, f"{cam} from seq {seq}")
    except BitstreamError as exc:
        raise BitstreamError(f"camera {cam!r}: cannot read H.264 at seq {seq}: {exc}") from exc


def _empty(cam: str, seq: int) -> InvalidPacketError:
    return InvalidPacketError(f"camera {cam!r}: empty payload at seq {seq}")


def init_segment(template: bytes, capture_us: int, title: str) -> bytes:
    """A part's init segment (``ftyp`` + ``moov``) from a keyframe with its SPS and PPS.

    Written by FFmpeg's mov muxer with :data:`MUX_OPTIONS`; raises
    :class:`BitstreamError` if the parameter sets cannot be read.
    """
    sink = BytesIO()
    try:
        with av.open(BytesIO(template), format="h264") as src:
            tpl = src.streams.video[0]
            if tpl.codec_context.width <= 0:
                raise BitstreamError("unreadable SPS")
            out = av.open(sink, "w", format="mp4", options=MUX_OPTIONS)
            try:
                stream = out.add_stream_from_template(tpl)
                stream.time_base = TIME_BASE
                created = datetime.fromtimestamp(capture_us / 1e6, UTC)
                out.metadata["creation_time"] = created.isoformat(timespec="microseconds")
                stream.metadata["title"] = title
                out.start_encoding()
                return sink.getvalue()
            finally:
                with contextlib.suppress(Exception):
                    out.close()
    except av.FFmpegError as exc:
        raise BitstreamError(str(exc)) from exc
