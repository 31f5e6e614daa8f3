"""District evidence export: one camera's footage from a copy of an agent's store.

An agent keeps per camera sealed segments in ``<store>/<camera>/`` (see
:mod:`agent.segment`); only the district's and the receiver's age identities
open them. :func:`export_footage` selects the segments that overlap a time
range by their file names (no key needed for that), opens them one at a time,
checks that their sequence numbers follow on, and remuxes the packets whose
capture time is in the range (starting at the keyframe at or before its start)
into a regular MP4 with its index in front (seekable, plays anywhere). Nothing
is re-encoded: the bytes are the camera's own. Timestamps are the capture
times (90 kHz), so a hole shows as a jump in time, and the report names it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
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

__all__ = ["ExportReport", "Hole", "export_footage"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Hole:
    """Seqs ``first..last`` inside the export that no segment on the card holds.

    ``declared``: the agent restarted across the hole (the segments on either
    side come from different boots): the segment being written was lost, which
    the agent also declares to the receiver (``gap``, reason ``lost``).
    Otherwise nothing on the card explains it (deleted, evicted, never written).
    """

    first: int
    last: int
    declared: bool

    @property
    def frames(self) -> int:
        """How many frames the hole is."""
        return self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What :func:`export_footage` wrote."""

    camera: str
    out: Path
    segments: int
    frames: int
    first_seq: int
    last_seq: int
    #: Capture times (UTC) of the first and the last frame written.
    first_capture: datetime
    last_capture: datetime
    holes: tuple[Hole, ...]

    @property
    def complete(self) -> bool:
        """Whether every seq from the first to the last frame written is in the file."""
        return not self.holes


def _ns(when: datetime) -> int:
    if when.tzinfo is None:
        raise ExportError(f"time {when.isoformat()} has no timezone")
    return (when - _EPOCH) // timedelta(microseconds=1) * 1000


def _utc(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


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
        key=lambda item: item[0].first_seq,
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
    size = path.stat().st_size
    if size != name.size or size > MAX_SEALED_BYTES:
        raise BadSegmentError(f"segment {path}: {size} bytes, its name says {name.size}: torn")
    try:
        header, packets = open_segment(path.read_bytes(), [identity])
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


class _Writer:
    """Muxes packets into a regular MP4, pts from capture time (remux only)."""

    def __init__(self, path: Path, header: segment.SegmentHeader, first: EncodedPacket) -> None:
        template = first.payload if has_sps(first.payload) else header.extradata + first.payload
        try:
            with av.open(BytesIO(template), format="h264") as src:
                tpl = src.streams.video[0]
                self._out = av.open(
                    str(path), "w", format="mp4", options={"movflags": "+faststart"}
                )
                self._stream = self._out.add_stream_from_template(tpl)
        except av.FFmpegError as exc:
            raise ExportError(f"cannot read the H.264 stream of {header.camera}: {exc}") from exc
        self._stream.time_base = TIME_BASE
        self._out.metadata["creation_time"] = _utc(first.capture_ns).isoformat()
        self._stream.metadata["title"] = f"{header.camera} from seq {first.seq}"
        self._origin_ns = first.capture_ns
        self._last_pts = -1
        self._duration = round(90_000 / header.fps) if header.fps > 0 else 3000
        self.frames = 0

    def write(self, pkt: EncodedPacket) -> None:
        pts = ((pkt.capture_ns - self._origin_ns) * 9 + 50_000) // 100_000  # ns -> 90 kHz
        pts = max(pts, self._last_pts + 1)  # never backwards (a clock step on the agent)
        packet = av.Packet(pkt.payload)
        packet.stream = self._stream
        packet.time_base = TIME_BASE
        packet.pts = packet.dts = pts
        packet.duration = self._duration
        packet.is_keyframe = pkt.keyframe
        self._out.mux_one(packet)
        self._last_pts = pts
        self.frames += 1

    def close(self) -> None:
        self._out.close()


def _packets(
    chosen: list[tuple[segment.SegmentName, Path]], camera: str, identity: Any
) -> Iterator[tuple[segment.SegmentHeader, EncodedPacket]]:
    """The packets of the chosen segments in order, one segment in memory at a time."""
    for name, path in chosen:
        header, packets = _read(name, path, camera, identity)
        for pkt in packets:
            yield header, pkt


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
    The file starts at the keyframe at or before ``start``. Raises
    :class:`NoFootageError` (nothing in range), :class:`WrongIdentityError`,
    :class:`BadSegmentError` (corrupt or foreign segment) or
    :class:`ExportError`; ``out_mp4`` is never left half-written and never
    overwritten.
    """
    validate_camera_id(camera)
    start_ns, end_ns = _ns(start), _ns(end)
    if end_ns < start_ns:
        raise ExportError("the time range ends before it starts")
    if out_mp4.exists():
        raise ExportError(f"{out_mp4} exists; refusing to overwrite evidence")
    chosen = _select(Path(store_dir) / camera, start_ns, end_ns)
    partial = out_mp4.with_name(out_mp4.name + ".partial")
    writer: _Writer | None = None
    holes: list[Hole] = []
    written: list[tuple[segment.SegmentHeader, EncodedPacket]] = []  # the first and the last
    lead_in: list[tuple[segment.SegmentHeader, EncodedPacket]] = []  # keyframe .. start
    try:
        for item in _packets(chosen, camera, identity):
            pkt = item[1]
            if pkt.capture_ns > end_ns:
                break
            if pkt.capture_ns < start_ns:
                if pkt.keyframe:
                    lead_in = [item]
                elif lead_in:
                    lead_in.append(item)
                continue
            for h, queued in [*lead_in, item]:
                if writer is None:
                    if not queued.keyframe:
                        continue  # before the first keyframe nothing decodes
                    writer = _Writer(partial, h, queued)
                    written.append((h, queued))
                else:
                    last_h, last = written[-1]
                    if queued.seq > last.seq + 1:
                        holes.append(
                            Hole(last.seq + 1, queued.seq - 1, h.boot_id != last_h.boot_id)
                        )
                    written[1:] = [(h, queued)]
                writer.write(queued)
            lead_in = []
        if writer is None:
            raise NoFootageError("no keyframe in or before the time range: nothing to export")
        frames = writer.frames
        writer.close()
        writer = None
        os.replace(partial, out_mp4)
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    first_pkt, last_pkt = written[0][1], written[-1][1]
    return ExportReport(
        camera,
        out_mp4,
        len(chosen),
        frames,
        first_pkt.seq,
        last_pkt.seq,
        _utc(first_pkt.capture_ns),
        _utc(last_pkt.capture_ns),
        tuple(holes),
    )
