"""District evidence export: one camera's footage from a copy of an agent's store.

An agent keeps per camera sealed segments in ``<store>/<camera>/`` (see
:mod:`agent.segment`); only the district's and the receiver's age identities
open them. :func:`export_footage` selects the segments that overlap a time
range by their file names (no key needed for that), opens them one at a time,
checks that their sequence numbers follow on, and remuxes the packets whose
capture time is in the range (starting at the keyframe at or before its start)
into regular MP4s with their index in front (seekable, play anywhere). Nothing
is re-encoded: the bytes are the camera's own. Timestamps are the capture
times (90 kHz), so a hole shows as a jump in time, and the report names it.

One MP4 describes one stream. Where the stream changes in the range (another
codec, size or SPS/PPS: the camera was reconfigured; the agent starts a new
segment then), the file is closed and the footage goes on in the next one:
``F.mp4``, ``F-2.mp4``, ``F-3.mp4`` ... (:func:`part_path`). The report names
every file with its seqs.

What the card holds is checked, never smoothed over: a seq held twice with the
same bytes (a segment copied twice) is written once and counted; held twice
with different bytes it is a :class:`SegmentConflictError` naming both files.
A segment that cannot be opened (corrupt, torn, foreign, not sealed to the
identity) is skipped and named in the report with its seqs, the rest is
exported; only if nothing could be read is its error raised.

The files are written to unique temporary files next to the output, fsynced,
and published with :func:`os.link` (which fails rather than replace a file),
all of them or none: an existing file is never overwritten, and no partial file
is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import av

from agent import segment
from hardware import EncodedPacket
from receiver.errors import (
    BadSegmentError,
    ExportError,
    NoFootageError,
    WrongIdentityError,
)
from receiver.h264 import has_sps
from receiver.run import TIME_BASE
from receiver.sealed import MAX_SEALED_BYTES, open_segment
from receiver.summaries import validate_camera_id

__all__ = [
    "ExportFile",
    "ExportReport",
    "Hole",
    "SegmentConflictError",
    "UnreadableSegment",
    "export_footage",
    "part_path",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: What one MP4 describes: codec, width, height, extradata (SPS/PPS) of the segment header.
_Desc = tuple[str, int, int, bytes]


class SegmentConflictError(ExportError):
    """Two segment files on the card hold different footage under the same seq."""

    code = "segment_conflict"


@dataclass(frozen=True, slots=True)
class Hole:
    """Seqs ``first..last`` inside the export that no segment on the card holds.

    ``declared``: the agent restarted across the hole (the segments on either
    side come from different runs, or boots for segments from before runs were
    written down): most of its seqs were reserved and never used (numbering
    goes on from the next block after a restart), and only what the agent was
    writing then was lost, which it also declares to the receiver (``gap``,
    reason ``lost``): its size is :attr:`seconds`, not its seqs.
    ``unreadable``: segment files on the card that hold (by their names) seqs
    of the hole but could not be opened (see :attr:`ExportReport.unreadable`).
    Otherwise nothing on the card explains it (deleted, evicted, never written).
    """

    first: int
    last: int
    declared: bool
    unreadable: tuple[Path, ...] = ()
    #: Capture time from the frame before the hole to the frame after it, in seconds.
    seconds: float = field(default=0.0, compare=False)

    @property
    def frames(self) -> int:
        """How many frames the hole is."""
        return self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class UnreadableSegment:
    """A segment file in the range that could not be opened; it was skipped.

    ``first_seq``/``last_seq`` are what its file name says. ``covered``: every
    one of those seqs was read from another file on the card (a second copy),
    so nothing is missing because of it.
    """

    path: Path
    first_seq: int
    last_seq: int
    reason: str
    covered: bool


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One MP4 written: consecutive footage of one stream description."""

    path: Path
    first_seq: int
    last_seq: int
    frames: int
    #: Bytes of the published file.
    size: int
    codec: str
    width: int
    height: int
    first_capture: datetime
    last_capture: datetime


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What :func:`export_footage` wrote."""

    camera: str
    #: The first file written (the ``out_mp4`` asked for); :attr:`files` names them all.
    out: Path
    #: Segment files chosen for the range (opened or not).
    segments: int
    frames: int
    first_seq: int
    last_seq: int
    #: Capture times (UTC) of the first and the last frame written.
    first_capture: datetime
    last_capture: datetime
    holes: tuple[Hole, ...]
    #: Every file written, in order: more than one where the stream changed.
    files: tuple[ExportFile, ...] = ()
    #: Frames on the card twice with identical bytes (a duplicated segment): written once.
    duplicates: int = 0
    #: The files those second copies were read from.
    duplicate_segments: tuple[Path, ...] = ()
    #: Segment files in the range that could not be opened, skipped.
    unreadable: tuple[UnreadableSegment, ...] = ()
    #: Runs of seqs on the card and in the range not written because no keyframe of
    #: their stream came before them (nothing would decode them).
    undecodable: tuple[tuple[int, int], ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every seq from the first to the last frame written is in the files,
        and every segment of the range on the card could be read (or had a copy)."""
        return not self.holes and not self.undecodable and all(u.covered for u in self.unreadable)


def part_path(out: Path, index: int) -> Path:
    """The ``index``-th file (from 1) of an export to ``out``: ``F.mp4``, ``F-2.mp4`` ..."""
    if index < 1:
        raise ValueError(f"file index from 1, got {index}")
    return out if index == 1 else out.with_name(f"{out.stem}-{index}{out.suffix}")


def _ns(when: datetime) -> int:
    if when.tzinfo is None:
        raise ExportError(f"time {when.isoformat()} has no timezone")
    return (when - _EPOCH) // timedelta(microseconds=1) * 1000


def _utc(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def _desc(header: segment.SegmentHeader) -> _Desc:
    return (header.codec, header.width, header.height, header.extradata)


def _check_free(out: Path) -> None:
    """Refuse early (before any decryption) if ``out`` or a later file of it exists."""
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} is not a folder: nowhere to write {out.name}")
    later = re.compile(re.escape(out.stem) + r"-(?:[2-9]|[1-9][0-9]+)" + re.escape(out.suffix))
    taken = sorted(n for n in os.listdir(out.parent) if n == out.name or later.fullmatch(n))
    if taken:
        raise ExportError(
            f"{out.parent / taken[0]} exists; refusing to overwrite evidence "
            f"(an export to {out.name} may also write {part_path(out, 2).name}, "
            f"{part_path(out, 3).name} ...)"
        )


def _select(folder: Path, start_ns: int, end_ns: int) -> list[tuple[segment.SegmentName, Path]]:
    """The segments to open, in seq order: those overlapping the range, and the one
    before the first if that one starts after ``start`` and follows on from it (its
    keyframe is then the one at or before ``start``)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        try:
            cameras = sorted(e.name for e in os.scandir(folder.parent) if e.is_dir())
        except OSError:
            cameras = []
        held = f"; the store has {', '.join(cameras)}" if cameras else ""
        raise NoFootageError(f"no segments of this camera in {folder}{held}") from None
    named = sorted(
        ((name, Path(e.path)) for e in entries if (name := segment.SegmentName.parse(e.name))),
        key=lambda item: (item[0].first_seq, item[0].last_seq, item[1].name),
    )
    start_ms, end_ms = start_ns // 1_000_000, -(-end_ns // 1_000_000)
    hits = [i for i, (n, _) in enumerate(named) if n.end_ms >= start_ms and n.start_ms <= end_ms]
    if not hits:
        held = (
            f"; it holds {_utc(named[0][0].start_ms * 1_000_000).isoformat()} to "
            f"{_utc(named[-1][0].end_ms * 1_000_000).isoformat()}"
            if named
            else "; it holds none"
        )
        raise NoFootageError(f"no segment in {folder} overlaps the time range{held}")
    first, last = hits[0], hits[-1]
    if first > 0 and named[first][0].start_ms * 1_000_000 > start_ns:
        before = named[first - 1][0]
        if before.last_seq + 1 == named[first][0].first_seq:
            first -= 1
    return named[first : last + 1]


def _read(
    name: segment.SegmentName, path: Path, camera: str, identity: Any
) -> tuple[segment.SegmentHeader, list[EncodedPacket]]:
    try:
        size = path.stat().st_size
        sealed = path.read_bytes() if size == name.size and size <= MAX_SEALED_BYTES else b""
    except OSError as exc:
        raise BadSegmentError(f"segment {path} cannot be read: {exc.strerror}") from exc
    if size != name.size or size > MAX_SEALED_BYTES:
        raise BadSegmentError(f"segment {path}: {size} bytes, its name says {name.size}: torn")
    try:
        header, packets = open_segment(sealed, [identity])
    except WrongIdentityError:
        raise WrongIdentityError(
            f"segment {path} is not sealed to this identity (wrong identity for this footage)"
        ) from None
    except BadSegmentError as exc:
        raise BadSegmentError(f"segment {path} is corrupt: {exc}") from exc
    if (header.camera, header.first_seq, header.last_seq) != (
        camera,
        name.first_seq,
        name.last_seq,
    ):
        raise BadSegmentError(
            f"segment {path} holds camera {header.camera!r} seqs "
            f"{header.first_seq}..{header.last_seq}: not what its name and folder say"
        )
    return header, packets


#: The longest gap between two frames one file holds (90 kHz ticks): an MP4 sample's
#: duration has 32 bits. Holes shorter than that show as jumps in time, as they were.
_MAX_SAMPLE_TICKS = 2**31
#: A frame captured more than this before the one before it begins a new file.
_MAX_BACK_NS = 1_000_000_000


class _Writer:
    """Muxes packets of one stream description into a regular MP4, pts from capture time
    (remux only)."""

    def __init__(
        self, path: Path, final: Path, header: segment.SegmentHeader, first: EncodedPacket
    ) -> None:
        template = first.payload if has_sps(first.payload) else header.extradata + first.payload
        try:
            with av.open(BytesIO(template), format="h264") as src:
                tpl = src.streams.video[0]
                width, height = tpl.codec_context.width, tpl.codec_context.height
                self._out = av.open(
                    str(path), "w", format="mp4", options={"movflags": "+faststart"}
                )
                self._stream = self._out.add_stream_from_template(tpl)
        except av.FFmpegError as exc:
            raise ExportError(f"cannot read the H.264 stream of {header.camera}: {exc}") from exc
        self._stream.time_base = TIME_BASE
        self._out.metadata["creation_time"] = _utc(first.capture_ns).isoformat()
        self._stream.metadata["title"] = f"{header.camera} from seq {first.seq}"
        self.path, self.final = path, final
        self.desc = _desc(header)
        self.codec, self.width, self.height = header.codec, int(width), int(height)
        self._origin_ns = first.capture_ns
        self._last_pts = -1
        self.frames = 0
        self.first = self.last = first

    def clock_stepped(self, pkt: EncodedPacket) -> bool:
        """Whether ``pkt`` was captured so long after the last frame that no MP4 sample
        duration holds the gap (over 13 h: the muxer refuses it), or more than a second
        before it: the agent's clock stepped, and ``pkt`` must begin another file."""
        step_ns = pkt.capture_ns - self.last.capture_ns
        return step_ns * 9 // 100_000 > _MAX_SAMPLE_TICKS or -step_ns > _MAX_BACK_NS

    def write(self, header: segment.SegmentHeader, pkt: EncodedPacket) -> None:
        pts = ((pkt.capture_ns - self._origin_ns) * 9 + 50_000) // 100_000  # ns -> 90 kHz
        pts = max(pts, self._last_pts + 1)  # never backwards (small clock jitter)
        packet = av.Packet(pkt.payload)
        packet.stream = self._stream
        packet.time_base = TIME_BASE
        packet.pts = packet.dts = pts
        packet.duration = round(90_000 / header.fps) if header.fps > 0 else 3000
        packet.is_keyframe = pkt.keyframe
        self._out.mux_one(packet)
        self._last_pts = pts
        self.frames += 1
        self.last = pkt

    def close(self) -> None:
        self._out.close()


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # no folder handles here (Windows): nothing to sync
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot sync a folder; the files themselves are synced.
        if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


#: link() errors that mean "no hard links on this file system" (FAT/exFAT USB sticks: EPERM).
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})


def _publish_one(tmp: Path, final: Path) -> None:
    """Give the finished ``tmp`` the name ``final``; :class:`ExportError` if it is taken."""
    try:
        try:
            os.link(tmp, final)
            return
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
        # No hard links here: claim the name (O_EXCL fails if it exists), then
        # replace our own empty claim with the finished file.
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.replace(tmp, final)
    except FileExistsError:
        raise ExportError(f"{final} exists; refusing to overwrite evidence") from None


class _Export:
    """One export in progress: the files being written, and what the card held."""

    def __init__(self, out: Path, start_ns: int, end_ns: int) -> None:
        self.out, self.start_ns, self.end_ns = out, start_ns, end_ns
        self.writer: _Writer | None = None
        self.parts: list[_Writer] = []  # closed
        self.temps: list[Path] = []
        # seq -> (digest of the record, file it came from), for the seqs a later segment
        # may hold again (from the first seq of the segment being read).
        self.seen: OrderedDict[int, tuple[bytes, Path]] = OrderedDict()
        self.read_runs: list[list[int]] = []  # seqs read, as [first, last] runs
        self.duplicates = 0
        self.duplicate_files: dict[Path, None] = {}
        self.unreadable: list[tuple[segment.SegmentName, Path, BadSegmentError]] = []
        self.gaps: list[tuple[int, int, bool, float]] = []
        self.undecodable: list[list[int]] = []
        #: The last frame accounted: its segment's boot and run, its seq and capture time.
        self.prev: tuple[str, str | None, int, int] | None = None
        self.lead_in: list[tuple[segment.SegmentHeader, EncodedPacket]] = []

    # -- reading ----------------------------------------------------------------------

    def run(self, chosen: list[tuple[segment.SegmentName, Path]], camera: str, ident: Any) -> None:
        for name, path in chosen:
            while self.seen and next(iter(self.seen)) < name.first_seq:
                self.seen.popitem(last=False)
            try:
                header, packets = _read(name, path, camera, ident)
            except BadSegmentError as exc:
                self.unreadable.append((name, path, exc))
                continue
            for pkt in packets:
                if not self._first_time(path, pkt):
                    continue
                if not self.start_ns <= pkt.capture_ns <= self.end_ns:
                    # Out of the range, not missing: no hole is said for it. Every chosen
                    # segment is read to its end: after the agent's clock stepped back,
                    # later seqs were captured in the range again (review s2).
                    self.prev = (header.boot_id, header.run, pkt.seq, pkt.capture_ns)
                    if pkt.capture_ns < self.start_ns:
                        self._lead(header, pkt)
                    else:
                        self.lead_in = []
                    continue
                for h, queued in [*self.lead_in, (header, pkt)]:
                    self._account(h, queued)
                self.lead_in = []

    def _first_time(self, path: Path, pkt: EncodedPacket) -> bool:
        """Whether ``pkt`` is new; False for a repeat of a seq with identical bytes."""
        digest = hashlib.sha256(b"%d|%d|" % (pkt.capture_ns, pkt.keyframe))
        digest.update(pkt.payload)
        record = digest.digest()
        held = self.seen.get(pkt.seq)
        if held is not None:
            if held[0] != record:
                raise SegmentConflictError(
                    f"seq {pkt.seq} is held with different footage by {held[1]} and {path}: "
                    "two recordings under the same seqs; not choosing one. Export from a copy "
                    "of the store that holds only one of them"
                )
            self.duplicates += 1
            self.duplicate_files[path] = None
            return False
        self.seen[pkt.seq] = (record, path)
        if self.read_runs and self.read_runs[-1][1] + 1 == pkt.seq:
            self.read_runs[-1][1] = pkt.seq
        else:
            self.read_runs.append([pkt.seq, pkt.seq])
        return True

    def _lead(self, header: segment.SegmentHeader, pkt: EncodedPacket) -> None:
        """Keep the packets from the last keyframe before the start (written with the first
        frame in range), of one stream description."""
        if pkt.keyframe:
            self.lead_in = [(header, pkt)]
        elif self.lead_in and _desc(self.lead_in[0][0]) == _desc(header):
            self.lead_in.append((header, pkt))
        else:
            self.lead_in = []

    def _account(self, header: segment.SegmentHeader, pkt: EncodedPacket) -> None:
        """One frame of the export, in seq order: write it, or note why not."""
        if self.prev is not None and pkt.seq > self.prev[2] + 1:
            boot, run, seq, capture_ns = self.prev
            restarted = header.boot_id != boot or header.run != run
            self.gaps.append((seq + 1, pkt.seq - 1, restarted, (pkt.capture_ns - capture_ns) / 1e9))
        self.prev = (header.boot_id, header.run, pkt.seq, pkt.capture_ns)
        mid_gop = False
        if self.writer is not None and (
            self.writer.desc != _desc(header) or self.writer.clock_stepped(pkt)
        ):
            # The stream changed, or the agent's clock stepped (a step back, or one forward
            # that no MP4 sample duration holds): this file is done, the next begins; after
            # a step, with this frame even if it is no keyframe (its GOP decodes from the
            # keyframe in the file before).
            mid_gop = self.writer.desc == _desc(header)
            self.writer.close()
            self.parts.append(self.writer)
            self.writer = None
        if self.writer is None:
            if not pkt.keyframe and not mid_gop:  # nothing decodes it
                if self.undecodable and self.undecodable[-1][1] + 1 == pkt.seq:
                    self.undecodable[-1][1] = pkt.seq
                else:
                    self.undecodable.append([pkt.seq, pkt.seq])
                return
            final = part_path(self.out, len(self.parts) + 1)
            fd, name = tempfile.mkstemp(
                prefix=f"{final.name}.", suffix=".partial", dir=self.out.parent
            )
            os.close(fd)
            self.temps.append(Path(name))
            self.writer = _Writer(Path(name), final, header, pkt)
        self.writer.write(header, pkt)

    # -- finishing ----------------------------------------------------------------------

    def publish(self) -> list[ExportFile]:
        """Close the last file, sync them all and give them their names (all or none)."""
        if self.writer is not None:
            self.writer.close()
            self.parts.append(self.writer)
            self.writer = None
        if not self.parts:
            if self.unreadable:
                raise self.unreadable[0][2]
            raise NoFootageError("no keyframe in or before the time range: nothing to export")
        files = []
        for part in self.parts:
            _fsync(part.path)
            st = part.path.stat()
            files.append((part, (st.st_dev, st.st_ino), st.st_size))
        published: list[tuple[Path, tuple[int, int]]] = []
        try:
            for part, ident, _ in files:
                _publish_one(part.path, part.final)
                published.append((part.final, ident))
        except BaseException:
            for final, ident in published:  # ours (same inode): take them back
                with contextlib.suppress(OSError):
                    st = final.stat()
                    if (st.st_dev, st.st_ino) == ident:
                        final.unlink()
            raise
        self.discard()
        _fsync(self.out.parent, directory=True)
        return [
            ExportFile(
                part.final,
                part.first.seq,
                part.last.seq,
                part.frames,
                size,
                part.codec,
                part.width,
                part.height,
                _utc(part.first.capture_ns),
                _utc(part.last.capture_ns),
            )
            for part, _, size in files
        ]

    def discard(self) -> None:
        """Close what is open and remove the temporary files."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
        for tmp in self.temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.temps = []

    def _unreadable_in(self, first: int, last: int) -> tuple[Path, ...]:
        return tuple(
            p for n, p, _ in self.unreadable if n.first_seq <= last and n.last_seq >= first
        )

    def _covered(self, first: int, last: int) -> bool:
        return any(a <= first and last <= b for a, b in self.read_runs)

    def report(self, camera: str, segments: int, files: Iterable[ExportFile]) -> ExportReport:
        written = tuple(files)
        return ExportReport(
            camera,
            self.out,
            segments,
            sum(f.frames for f in written),
            written[0].first_seq,
            written[-1].last_seq,
            written[0].first_capture,
            written[-1].last_capture,
            tuple(Hole(a, b, d, self._unreadable_in(a, b), seconds=t) for a, b, d, t in self.gaps),
            written,
            self.duplicates,
            tuple(self.duplicate_files),
            tuple(
                UnreadableSegment(
                    p, n.first_seq, n.last_seq, str(e), self._covered(n.first_seq, n.last_seq)
                )
                for n, p, e in self.unreadable
            ),
            tuple((a, b) for a, b in self.undecodable),
        )


def export_footage(
    store_dir: Path,
    identity: Any,
    camera: str,
    start: datetime,
    end: datetime,
    out_mp4: Path,
) -> ExportReport:
    """Write ``camera``'s footage captured in ``[start, end]`` to ``out_mp4`` (remux only).

    ``store_dir`` is a copy of an agent's segment store, ``identity`` a pyrage
    X25519 identity (the district's), ``start``/``end`` timezone-aware times.
    The file starts at the keyframe at or before ``start``. Where the stream
    changes in the range the footage goes on in ``part_path(out_mp4, 2)``, 3
    ... (``F-2.mp4``); the report's ``files`` names each. Segments that cannot
    be opened are skipped and reported (``unreadable``). Raises
    :class:`NoFootageError` (nothing in range), :class:`WrongIdentityError` or
    :class:`BadSegmentError` (no segment of the range could be read: the
    first one's error), :class:`SegmentConflictError` (two versions of a seq)
    or :class:`ExportError` (for one an output name that exists: checked for
    ``out_mp4`` and every ``F-N.mp4`` before reading, and again when
    publishing). No output file is ever overwritten, and on any error none is
    left, half-written or not.
    """
    validate_camera_id(camera)
    start_ns, end_ns = _ns(start), _ns(end)
    if end_ns < start_ns:
        raise ExportError("the time range ends before it starts")
    out = Path(out_mp4)
    _check_free(out)
    chosen = _select(Path(store_dir) / camera, start_ns, end_ns)
    job = _Export(out, start_ns, end_ns)
    try:
        job.run(chosen, camera, identity)
        files = job.publish()
    finally:
        job.discard()
    return job.report(camera, len(chosen), files)
