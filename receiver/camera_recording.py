"""One camera's durable recording inside an emergency session (remux only).

Theory of operation. Each appended Annex-B access unit is muxed by PyAV's
mov muxer into a fragmented MP4 (one fragment per frame) that is written
straight to the part file through :class:`_PartWriter`. The writer also
splits the byte stream into boxes, so we learn which samples are in complete
fragments on the file descriptor: FFmpeg emits a frame's fragment only when
the next frame is muxed (or at close), and we never assume that but count
``trun`` samples. Samples are gapless per camera, so the n-th sample of a
part has sequence number ``part.first_seq + n``. :meth:`CameraRecording.flush`
fsyncs in a worker thread (one fsync in flight; callers arriving meanwhile
share the next one) and only then moves ``durable_seq`` forward: that is the
sequence number the ingest may acknowledge.

PyAV cannot append to an existing fMP4, so after a restart, a write failure
or a re-opened session the camera continues in a new part file
(``<camera>.mp4``, ``<camera>.1.mp4``, ...), listed in ``session.json`` before
it gets any data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

import av
from av.container import OutputContainer
from av.video.stream import VideoStream

from receiver.errors import (
    BitstreamError,
    InvalidPacketError,
    MissingSpsError,
    NotKeyframeError,
    RecordingClosedError,
    RecordingFailedError,
    SequenceGapError,
)
from receiver.fmp4 import Fragment, FragmentSplitter, InitSegment, scan_file
from receiver.h264 import annex_b_from_avcc, has_sps, mse_codec_string, parameter_sets
from receiver.livefeed import LiveFeed

__all__ = ["CameraRecording", "FragmentListener", "PartInfo", "TrackInfo"]

_LOG = logging.getLogger(__name__)

#: MP4 time base of every recording: the 90 kHz clock of MPEG video.
TIME_BASE = Fraction(1, 90_000)
_MUX_OPTIONS = {
    "movflags": "frag_every_frame+empty_moov+default_base_moof",
    "flush_packets": "1",
}


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
    #: Sequence number of the first packet the session will carry.
    first_seq: int


@dataclass(slots=True)
class PartInfo:
    """One part file of a camera, as recorded in ``session.json``."""

    file: str
    first_seq: int
    #: Capture time (UTC µs) of the part's first sample: its pts 0.
    first_capture_us: int | None = None


class FragmentListener(Protocol):
    """Receives a camera's fMP4 output as it is written (the live feed)."""

    def init_segment(self, data: bytes) -> None:
        """``ftyp`` + ``moov`` of the current part; sent before any fragment."""

    def media_fragment(self, data: bytes, keyframe: bool, capture_us: int) -> None:
        """One ``moof`` + ``mdat``; ``keyframe`` and ``capture_us`` of its first sample."""

    def end_of_stream(self) -> None:
        """The recording was closed; no more data will come."""


@dataclass(frozen=True, slots=True)
class _Sample:
    seq: int
    keyframe: bool
    capture_us: int


class _PartWriter:
    """File-like sink for PyAV: writes to the part file and splits boxes.

    It has no ``seek``, so the muxer treats it as a non-seekable stream.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._splitter = FragmentSplitter()
        self.units: list[InitSegment | Fragment] = []

    def detach(self) -> None:
        """Refuse further writes (the fd may be closed and its number reused)."""
        self._fd = None

    def write(self, data: bytes) -> int:
        """Write all of ``data`` to the file, then parse it into boxes."""
        if self._fd is None:
            raise OSError("part file is detached")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.units.extend(self._splitter.feed(data))
        return len(data)


#: How long bookkeeping changes wait before session.json is rewritten.
METADATA_DELAY_S = 1.0


def _open_part_file(path: Path, sync_dir: bool) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    if sync_dir:  # the new name must survive a power cut, not only its data
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return fd


def _scan_part(path: Path, repair: bool) -> tuple[int, bytes | None]:
    """Samples in complete fragments and the avcC; with ``repair`` cut a torn tail."""
    try:
        with open(path, "r+b" if repair else "rb") as f:
            result = scan_file(f)
            if repair:
                if result.torn:
                    _LOG.warning(
                        "%s: truncating torn tail %d -> %d bytes",
                        path,
                        result.file_size,
                        result.valid_end,
                    )
                    f.truncate(result.valid_end)
                # Whatever survived a crash in the page cache becomes durable now,
                # before we report it as acknowledged.
                os.fsync(f.fileno())
            return result.samples, result.avcc
    except FileNotFoundError:
        return 0, None


class CameraRecording:
    """The durable recording of one camera of one session.

    Created by :class:`receiver.recording.SessionRecording`; use
    :meth:`append`, :meth:`flush` and :meth:`add_listener`.
    """

    def __init__(
        self,
        track: TrackInfo,
        directory: Path,
        parts: list[PartInfo],
        *,
        first_live_seq: int | None,
        mark_dirty: Callable[[], None],
        save_metadata: Callable[[], Coroutine[Any, Any, None]],
        mono_ns: Callable[[], int],
        stem: str | None = None,
    ) -> None:
        self.track = track
        #: File name stem of the part files: the camera id, or ``<id>.preroll``.
        self.stem = stem or track.camera_id
        self._dir = directory
        self.parts = parts
        self.first_live_seq = first_live_seq
        self._mark_dirty = mark_dirty
        self._save_metadata = save_metadata
        self._mono_ns = mono_ns
        self._listeners: list[FragmentListener] = []
        #: The live feed fed by this camera while it is writable (None before).
        self.live: LiveFeed | None = None
        self._param_sets = b""
        self.mse_codec: str | None = None
        with contextlib.suppress(MissingSpsError):  # extradata may be empty or unusable
            self._param_sets = parameter_sets(track.extradata).annex_b()
            self.mse_codec = mse_codec_string(track.extradata)
        self._fd: int | None = None
        self._writer: _PartWriter | None = None
        self._out: OutputContainer | None = None
        self._stream: VideoStream | None = None
        self._init: bytes | None = None
        self._pending: deque[_Sample] = deque()
        self._prior_frames = 0  # durable frames in parts before the current one
        self._part_written = 0  # samples of the current part in complete fragments on the fd
        self._part_durable = 0  # ... of which an fsync completed
        self._last_seq = track.first_seq - 1
        self._origin_us = 0
        self._last_pts = -1
        self._fsync_task: asyncio.Task[None] | None = None
        self._meta_task: asyncio.Task[None] | None = None
        self._writable = False
        self._failure: BaseException | None = None
        #: Packets whose capture time did not increase (pts bumped by one tick).
        self.timestamp_fixups = 0
        #: Resent packets that were already recorded, ignored.
        self.duplicates = 0
        #: ``mono_ns()`` when the first fsync covering a sample (a live sample) completed.
        self.first_durable_mono_ns: int | None = None
        self.first_live_durable_mono_ns: int | None = None

    # -- state -----------------------------------------------------------

    @property
    def camera_id(self) -> str:
        """The camera's id."""
        return self.track.camera_id

    @property
    def writable(self) -> bool:
        """Whether :meth:`append` accepts packets (open, not closed or failed)."""
        return self._writable and self._failure is None

    @property
    def has_unflushed(self) -> bool:
        """Whether complete fragments were written that no fsync covers yet.

        The sample muxed last is normally not among them: FFmpeg writes its
        fragment only with the next packet or at :meth:`close`.
        """
        return self._part_written > self._part_durable

    @property
    def has_open_file(self) -> bool:
        """Whether a part file is open (writable, or failed and not yet released)."""
        return self._fd is not None

    @property
    def durable_seq(self) -> int:
        """Highest sequence number on disk after an fsync (``first_seq - 1`` if none)."""
        if not self.parts:
            return self.track.first_seq - 1
        return self.parts[-1].first_seq + self._part_durable - 1

    @property
    def last_seq(self) -> int:
        """Highest sequence number appended (muxed, maybe not yet durable)."""
        return self._last_seq

    @property
    def frames_durable(self) -> int:
        """Frames on disk after an fsync, over all part files."""
        return self._prior_frames + self._part_durable

    @property
    def preroll_frames(self) -> int:
        """Durable frames from before the trigger (the prefix before ``first_live_seq``)."""
        last_preroll = self.durable_seq
        if self.first_live_seq is not None:
            last_preroll = min(last_preroll, self.first_live_seq - 1)
        return max(0, min(self.frames_durable, last_preroll - self.track.first_seq + 1))

    @property
    def live_frames(self) -> int:
        """Durable frames captured after the trigger."""
        return self.frames_durable - self.preroll_frames

    @property
    def init_segment(self) -> bytes | None:
        """The current part's init segment, once the first packet was muxed."""
        return self._init

    def part_path(self, part: PartInfo) -> Path:
        """Absolute path of one of this camera's part files."""
        return self._dir / part.file

    def add_listener(self, listener: FragmentListener) -> Callable[[], None]:
        """Send fragments to ``listener`` from now on; returns the unsubscribe.

        If the init segment is already known it is delivered at once.
        """
        self._listeners.append(listener)
        if self._init is not None:
            listener.init_segment(self._init)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    # -- opening ---------------------------------------------------------

    async def _scan(self, repair: bool) -> None:
        """Count durable samples of all parts on disk; with ``repair`` cut torn tails."""
        self._prior_frames = 0
        self._part_durable = self._part_written = 0
        for i, part in enumerate(self.parts):
            samples, avcc = await asyncio.to_thread(_scan_part, self._dir / part.file, repair)
            if avcc is not None:
                with contextlib.suppress(MissingSpsError):
                    self._param_sets = annex_b_from_avcc(avcc)
                    self.mse_codec = self.mse_codec or mse_codec_string(avcc)
            if i < len(self.parts) - 1:
                self._prior_frames += samples
            else:
                self._part_durable = self._part_written = samples
        self._last_seq = self.durable_seq

    def _plan_part(self) -> None:
        """Choose the part file to write next (after :meth:`_scan` with repair)."""
        if self.parts and self._part_durable == 0:
            return  # the last part holds nothing: rewrite it from the start
        self._prior_frames += self._part_durable
        first_seq = self.durable_seq + 1
        n = len(self.parts)
        name = f"{self.stem}.mp4" if n == 0 else f"{self.stem}.{n}.mp4"
        self.parts.append(PartInfo(name, first_seq))
        self._part_durable = self._part_written = 0

    async def _open_part(self, *, sync_dir: bool = True) -> None:
        """Create the planned part file and accept packets.

        The part must be listed in session.json before it gets data; with
        ``sync_dir=False`` the caller saves session.json next, whose folder
        fsync makes the new file's name durable too (one fsync for all parts).
        """
        path = self._dir / self.parts[-1].file
        self._fd = await asyncio.to_thread(_open_part_file, path, sync_dir)
        self._writer = _PartWriter(self._fd)
        self._out = self._stream = self._init = None
        self._pending.clear()
        self._failure = None
        self._writable = True
        if self.live is None or self.live.closed:
            self.live = LiveFeed()
            self.add_listener(self.live)

    # -- appending -------------------------------------------------------

    def append(
        self, seq: int, capture_us: int, keyframe: bool, preroll: bool, payload: bytes
    ) -> None:
        """Remux one Annex-B access unit into the recording.

        A ``seq`` at or below the last appended one is a resend and is
        ignored; a skipped ``seq`` raises :class:`SequenceGapError`. The
        session's first packet must be a keyframe (:class:`NotKeyframeError`).
        """
        self._raise_if_failed()
        if not self._writable:
            raise RecordingClosedError(f"camera {self.camera_id!r}: recording is closed")
        if seq <= self._last_seq:
            self.duplicates += 1
            return
        if seq != self._last_seq + 1:
            raise SequenceGapError(self.camera_id, self._last_seq + 1, seq)
        if not payload:
            raise InvalidPacketError(f"camera {self.camera_id!r}: empty payload at seq {seq}")
        if self._out is None:
            self._start_muxer(seq, capture_us, keyframe, payload)
        assert self._out is not None
        assert self._stream is not None
        if self.mse_codec is None and keyframe:
            with contextlib.suppress(MissingSpsError):
                self.mse_codec = mse_codec_string(payload)
        pts = ((capture_us - self._origin_us) * 9 + 50) // 100  # µs -> 90 kHz, rounded
        if pts <= self._last_pts:
            pts = self._last_pts + 1
            self.timestamp_fixups += 1
        packet = av.Packet(payload)
        packet.stream = self._stream
        packet.time_base = TIME_BASE
        packet.pts = packet.dts = pts
        if self._last_pts < 0:
            packet.duration = round(90_000 / self.track.fps) if self.track.fps > 0 else 3000
        else:
            packet.duration = pts - self._last_pts
        packet.is_keyframe = keyframe
        try:
            self._out.mux_one(packet)
        except Exception as exc:
            self._fail(exc)
            raise RecordingFailedError(
                f"camera {self.camera_id!r}: muxing seq {seq} failed: {exc}"
            ) from exc
        self._last_seq = seq
        self._last_pts = pts
        self._pending.append(_Sample(seq, keyframe, capture_us))
        if not preroll and self.first_live_seq is None:
            self.first_live_seq = seq
            self._mark_dirty()
        self._dispatch()

    def _start_muxer(self, seq: int, capture_us: int, keyframe: bool, payload: bytes) -> None:
        if not keyframe and seq == self.track.first_seq:
            raise NotKeyframeError(
                f"camera {self.camera_id!r}: the first packet (seq {seq}) must be a keyframe"
            )
        template = payload if has_sps(payload) else self._param_sets + payload
        if not has_sps(template):
            raise MissingSpsError(
                f"camera {self.camera_id!r}: no SPS in seq {seq} nor in the track extradata"
            )
        try:
            with av.open(BytesIO(template), format="h264") as src:
                tpl = src.streams.video[0]
                if tpl.codec_context.width <= 0:
                    raise BitstreamError(f"camera {self.camera_id!r}: unreadable SPS")
                assert self._writer is not None
                out = av.open(self._writer, "w", format="mp4", options=_MUX_OPTIONS)
                stream = out.add_stream_from_template(tpl)
        except av.FFmpegError as exc:
            raise BitstreamError(
                f"camera {self.camera_id!r}: cannot read H.264 at seq {seq}: {exc}"
            ) from exc
        stream.time_base = TIME_BASE
        created = datetime.fromtimestamp(capture_us / 1e6, UTC)
        out.metadata["creation_time"] = created.isoformat(timespec="microseconds")
        stream.metadata["title"] = f"{self.camera_id} from seq {seq}"
        self._out, self._stream = out, stream
        self._origin_us = capture_us
        self._last_pts = -1
        self.parts[-1].first_capture_us = capture_us
        self._mark_dirty()

    def _dispatch(self) -> None:
        """Account for the units the writer completed and pass them to listeners."""
        assert self._writer is not None
        units, self._writer.units = self._writer.units, []
        for unit in units:
            if isinstance(unit, InitSegment):
                self._init = unit.data
                self._notify_init(unit.data)
                continue
            if unit.sample_count < 1 or unit.sample_count > len(self._pending):
                self._fail(AssertionError("fragment sample count out of step with appends"))
                raise RecordingFailedError(
                    f"camera {self.camera_id!r}: fragment with {unit.sample_count} samples, "
                    f"{len(self._pending)} pending"
                )
            first = self._pending[0]
            for _ in range(unit.sample_count):
                self._pending.popleft()
            self._part_written += unit.sample_count
            self._notify_fragment(unit.data, first.keyframe, first.capture_us)

    def _notify_init(self, data: bytes) -> None:
        self._notify(lambda listener: listener.init_segment(data))

    def _notify_fragment(self, data: bytes, keyframe: bool, capture_us: int) -> None:
        self._notify(lambda listener: listener.media_fragment(data, keyframe, capture_us))

    def _notify(self, call: Callable[[FragmentListener], None]) -> None:
        for listener in list(self._listeners):
            try:
                call(listener)
            except Exception:
                _LOG.exception("camera %r: fragment listener failed; removed", self.camera_id)
                with contextlib.suppress(ValueError):
                    self._listeners.remove(listener)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RecordingFailedError(
                f"camera {self.camera_id!r}: recording failed: {self._failure!r}; "
                "re-open the session to continue in a new part file"
            ) from self._failure

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._release_muxer()

    def _release_muxer(self) -> None:
        if self._writer is not None:
            self._writer.detach()
        out, self._out, self._stream = self._out, None, None
        if out is not None:
            with contextlib.suppress(Exception):
                out.close()

    # -- durability ------------------------------------------------------

    async def flush(self) -> int:
        """Make everything written so far durable; return :attr:`durable_seq`.

        Group commit: one fsync runs at a time; callers that arrive while it
        runs wait for it and then share one more fsync covering their data.
        Returns once the data written before the call is durable. Raises
        :class:`RecordingFailedError` once writing or an fsync has failed.
        """
        self._raise_if_failed()
        target = self._part_written
        while self._part_durable < target:
            task = self._fsync_task
            if task is None:
                task = asyncio.create_task(
                    self._fsync_once(), name=f"fsync {self._dir.name}/{self.camera_id}"
                )
                task.add_done_callback(_retrieve)
                self._fsync_task = task
            await asyncio.shield(task)
        return self.durable_seq

    async def _fsync_once(self) -> None:
        try:
            target = self._part_written
            # The part list was saved before the part got data. What changes later
            # (first_live_seq, the part's first capture time) is bookkeeping, not
            # footage: it is saved beside the data fsync, never in front of an ack.
            self._save_metadata_soon()
            fd = self._fd
            if fd is None:
                raise RecordingFailedError(f"camera {self.camera_id!r}: part file already closed")
            try:
                await asyncio.to_thread(os.fsync, fd)
            except OSError as exc:
                # After a failed fsync the kernel may have dropped the dirty pages:
                # never fsync this file again and call it durable.
                self._fail(exc)
                raise RecordingFailedError(
                    f"camera {self.camera_id!r}: fsync failed: {exc}"
                ) from exc
            self._commit(target)
        finally:
            self._fsync_task = None

    def _save_metadata_soon(self) -> None:
        # Debounced: the first seconds of a session are when acks matter most, and
        # its session.json rewrites (two fsyncs each) would compete with the data's.
        if self._meta_task is None or self._meta_task.done():
            self._meta_task = asyncio.create_task(self._save_metadata_later(), name="session.json")
            self._meta_task.add_done_callback(_retrieve)

    async def _save_metadata_later(self) -> None:
        await asyncio.sleep(METADATA_DELAY_S)
        await self._save_metadata()

    def _commit(self, target: int) -> None:
        if target <= self._part_durable:
            return
        self._part_durable = target
        now = self._mono_ns()
        if self.first_durable_mono_ns is None:
            self.first_durable_mono_ns = now
        live = self.first_live_seq
        if live is not None and self.durable_seq >= live:
            self.first_live_durable_mono_ns = self.first_live_durable_mono_ns or now

    async def skip_to(self, first_seq: int) -> None:
        """The device declares every seq before ``first_seq`` lost: go on in a new part there.

        An agent that restarts mid-emergency loses what was only in its RAM and
        numbers on from a reserved block. The current part is finished, and a
        new part (listed in ``session.json`` before it gets data) starts at
        ``first_seq``; the hole is visible as the difference between the parts'
        first sequence numbers and their sample counts.
        """
        if first_seq <= self._last_seq + 1:
            return
        _LOG.warning(
            "camera %r: device declared seqs %d..%d lost; new part from %d",
            self.camera_id,
            self._last_seq + 1,
            first_seq - 1,
            first_seq,
        )
        await self.close()
        self._raise_if_failed()
        if self.parts and self._part_durable == 0:
            self.parts[-1] = PartInfo(self.parts[-1].file, first_seq)  # empty: reuse it
        else:
            self._prior_frames += self._part_durable
            n = len(self.parts)
            name = f"{self.stem}.mp4" if n == 0 else f"{self.stem}.{n}.mp4"
            self.parts.append(PartInfo(name, first_seq))
        self._part_durable = self._part_written = 0
        self._last_seq = first_seq - 1
        self._last_pts = -1
        self._mark_dirty()
        await self._save_metadata()
        await self._open_part()

    async def close(self) -> None:
        """Finish the part file (its last fragment), fsync it and stop accepting packets.

        Afterwards ``durable_seq == last_seq`` unless writing had failed.
        """
        if self._fd is None:
            self._writable = False
            return
        self._writable = False
        if self._out is not None and self._failure is None:
            try:
                self._out.close()  # flushes the delayed last fragment and writes mfra
                self._out = self._stream = None
                self._dispatch()
            except Exception as exc:
                _LOG.exception("camera %r: finishing the part failed", self.camera_id)
                self._fail(exc)
        self._release_muxer()
        try:
            if self._failure is None:
                await self.flush()
            elif (task := self._fsync_task) is not None:
                with contextlib.suppress(RecordingFailedError):
                    await asyncio.shield(task)  # never close the fd under a running fsync
        finally:
            fd, self._fd = self._fd, None
            if fd is not None:
                await asyncio.to_thread(os.close, fd)
            self._notify(lambda lst: lst.end_of_stream())
            self._listeners.clear()
        if self._meta_task is not None:
            self._meta_task.cancel()  # saved right here instead
        await self._save_metadata()  # bookkeeping saved beside the fsyncs is on disk too


def _retrieve(task: asyncio.Task[None]) -> None:
    # Waiters may all have been cancelled; the error is logged, never silently lost.
    if not task.cancelled() and (exc := task.exception()) is not None:
        _LOG.error("fsync failed: %r", exc)
