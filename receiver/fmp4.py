"""Fragmented-MP4 box framing, sans-IO.

:func:`scan_file` walks the top-level box headers of a stored file (reading
only headers and the small ``moof``/``moov`` boxes), counts the samples of
complete fragments and tells where the valid part ends, so a torn tail can
be cut off. (The fragments themselves are written by
:mod:`receiver.fragmenter`.)

For playback by byte range (HLS), :func:`read_init` reads what an init
segment says (size, timescale, creation time, ``trex`` defaults) and
:func:`read_fragments` lists the fragments of a stored file with their
offsets, decode times, durations and keyframe flags (:func:`moof_timing`
reads one ``moof``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

__all__ = [
    "FRAGMENT_FIELDS",
    "FragmentInfo",
    "FragmentScan",
    "InitInfo",
    "MoofTiming",
    "ScanResult",
    "avcc_from_moov",
    "moof_sample_count",
    "moof_timing",
    "parse_init",
    "read_fragments",
    "read_init",
    "scan_file",
]

_MAX_META_BOX = 16 << 20  # a moov or moof bigger than this is not ours: treat as corrupt
#: read_fragments reads forward this much at a time, and parses the boxes from memory
#: (a read per box header cost the recording index most of its time: one per frame).
_READ_CHUNK = 1 << 20


def _header(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, bytes, int] | None:
    """``(box_size, box_type, header_size)`` at ``pos``, or None if incomplete.

    Raises ValueError for sizes no valid box has (0 = "to end of file" is
    never written by a fragmenting muxer, so it is treated as corrupt too).
    """
    if len(buf) - pos < 8:
        return None
    size, kind = struct.unpack_from(">I4s", buf, pos)
    head = 8
    if size == 1:
        if len(buf) - pos < 16:
            return None
        (size,) = struct.unpack_from(">Q", buf, pos + 8)
        head = 16
    if size < head:
        raise ValueError(f"invalid MP4 box size {size} for {kind!r}")
    return size, bytes(kind), head


def _children(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """``(type, payload_start, box_end)`` of the boxes in ``data[start:end]``."""
    out: list[tuple[bytes, int, int]] = []
    view = memoryview(data)[:end]
    pos = start
    while pos < end:
        hdr = _header(view, pos)
        if hdr is None:
            raise ValueError("truncated child box")
        size, kind, head = hdr
        if pos + size > end:
            raise ValueError(f"child box {kind!r} overruns its parent")
        out.append((kind, pos + head, pos + size))
        pos += size
    return out


def moof_sample_count(moof: bytes) -> int:
    """Total ``sample_count`` of all ``trun`` boxes in a complete ``moof`` box."""
    hdr = _header(moof, 0)
    if hdr is None or hdr[1] != b"moof" or hdr[0] != len(moof):
        raise ValueError("not a complete moof box")
    total = 0
    for kind, start, end in _children(moof, hdr[2], len(moof)):
        if kind != b"traf":
            continue
        for child, cstart, cend in _children(moof, start, end):
            if child == b"trun":
                if cend - cstart < 8:
                    raise ValueError("truncated trun box")
                (count,) = struct.unpack_from(">I", moof, cstart + 4)  # after version+flags
                total += count
    return total


def avcc_from_moov(moov: bytes) -> bytes | None:
    """The payload of the first ``avcC`` box inside a ``moov`` box, if any.

    Found by searching for the box type rather than walking the sample
    description, which is enough for the single-track files we write.
    """
    at = moov.find(b"avcC")
    if at < 4:
        return None
    (size,) = struct.unpack_from(">I", moov, at - 4)
    end = at - 4 + size
    if size < 8 or end > len(moov):
        return None
    return moov[at + 4 : end]


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What :func:`scan_file` found in a stored fragmented MP4."""

    #: Offset just past the last complete unit; everything after it is torn.
    valid_end: int
    #: Size of the file as found.
    file_size: int
    #: Whether a complete init segment (``ftyp`` + ``moov``) is present.
    has_init: bool
    #: Complete ``moof`` + ``mdat`` pairs, and the samples they hold.
    fragments: int
    samples: int
    #: The ``avcC`` record of the init segment (H.264 SPS/PPS), if found.
    avcc: bytes | None

    @property
    def torn(self) -> bool:
        """Whether bytes after the last complete unit must be truncated."""
        return self.valid_end != self.file_size


def scan_file(f: BinaryIO) -> ScanResult:
    """Walk the top-level boxes of an fMP4 file by their headers (blocking I/O).

    Only ``moov`` and ``moof`` are read whole (they are small); ``mdat``
    payloads are skipped with seeks. A file without a complete init segment
    is entirely invalid (``valid_end == 0``).
    """
    size = f.seek(0, os.SEEK_END)
    pos = 0
    valid_end = 0
    has_init = False
    fragments = samples = 0
    avcc: bytes | None = None
    pending_moof: int | None = None  # sample count of a moof awaiting its mdat
    while True:
        f.seek(pos)
        head = f.read(16)
        try:
            hdr = _header(head, 0)
        except ValueError:
            break
        if hdr is None or pos + hdr[0] > size:
            break
        box_size, kind, _ = hdr
        if kind in (b"moov", b"moof"):
            if box_size > _MAX_META_BOX:
                break
            f.seek(pos)
            box = f.read(box_size)
            try:
                count = moof_sample_count(box) if kind == b"moof" else 0
            except ValueError:
                break
            if kind == b"moov":
                has_init = True
                avcc = avcc_from_moov(box)
                valid_end = pos + box_size
            else:
                pending_moof = count
        elif kind == b"mdat" and pending_moof is not None:
            fragments += 1
            samples += pending_moof
            pending_moof = None
            valid_end = pos + box_size
        elif has_init and pending_moof is None:
            valid_end = pos + box_size  # a complete trailing box such as mfra
        pos += box_size
    return ScanResult(valid_end, size, has_init, fragments, samples, avcc)


# -- timing, for playback by byte range ------------------------------------

#: Seconds from 1904-01-01 (MP4 times) to 1970-01-01 (Unix times).
_MP4_EPOCH_OFFSET_S = 2_082_844_800
#: ``sample_is_non_sync_sample`` in ISO/IEC 14496-12 sample flags.
_NON_SYNC = 0x0001_0000


@dataclass(frozen=True, slots=True)
class InitInfo:
    """What an init segment (``ftyp`` + ``moov`` at the start of a file) says."""

    #: Bytes from the start of the file to the end of ``moov``.
    size: int
    #: Media timescale (ticks per second) of the first track (``mdhd``).
    timescale: int
    #: ``mvhd`` creation time as Unix µs (whole seconds in the file), or None if unset.
    created_us: int | None
    #: ``trex`` defaults, used where ``tfhd`` and ``trun`` give none.
    default_duration: int = 0
    default_flags: int = 0


@dataclass(frozen=True, slots=True)
class MoofTiming:
    """The timing of one ``moof`` (its first track fragment)."""

    samples: int
    #: ``baseMediaDecodeTime`` (``tfdt``), or None when the fragment has none.
    decode_time: int | None
    #: Sum of the sample durations, in the track's timescale.
    duration: int
    #: Decode time of the last sample minus that of the first.
    last_sample_offset: int
    #: Whether the first sample is a sync sample (a keyframe).
    keyframe: bool
    #: Offset in the ``moof`` of a 64-bit ``baseMediaDecodeTime`` (-1: absent or 32-bit).
    decode_time_at: int


@dataclass(frozen=True, slots=True)
class FragmentInfo:
    """One ``moof`` + ``mdat`` of a stored file: where it is and what it holds."""

    offset: int
    size: int
    samples: int
    #: Decode time of its first sample, in the track's timescale.
    decode_time: int
    duration: int
    keyframe: bool
    #: File offset of the 64-bit ``baseMediaDecodeTime`` (-1: absent or 32-bit).
    decode_time_at: int

    @property
    def end(self) -> int:
        """The offset just past the fragment."""
        return self.offset + self.size


#: Values per fragment where fragments are kept flat in an ``array("q")`` (the
#: fragmenter's list for the recording index, the index's rows): :class:`FragmentInfo`'s
#: fields in order, the keyframe flag as 0 or 1.
FRAGMENT_FIELDS = 7


@dataclass(frozen=True, slots=True)
class FragmentScan:
    """What :func:`read_fragments` found."""

    fragments: list[FragmentInfo]
    #: Offset just past the last fragment listed (the start offset if none).
    end: int
    #: Decode time of the last sample listed (None if no fragment was listed).
    last_sample_time: int | None


def _u32(buf: bytes, pos: int, end: int) -> int:
    if pos + 4 > end:
        raise ValueError("truncated box")
    value: int = struct.unpack_from(">I", buf, pos)[0]
    return value


def _u64(buf: bytes, pos: int, end: int) -> int:
    if pos + 8 > end:
        raise ValueError("truncated box")
    value: int = struct.unpack_from(">Q", buf, pos)[0]
    return value


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    """``(payload_start, box_end)`` of the first ``kind`` box in ``data[start:end]``."""
    for child, cstart, cend in _children(data, start, end):
        if child == kind:
            return cstart, cend
    return None


def _path(data: bytes, start: int, end: int, *kinds: bytes) -> tuple[int, int] | None:
    span: tuple[int, int] | None = (start, end)
    for kind in kinds:
        if span is None:
            return None
        span = _child(data, span[0], span[1], kind)
    return span


def parse_init(data: bytes) -> InitInfo:
    """Read an init segment (the bytes from the file's start to the end of ``moov``).

    Raises ValueError if it holds no ``moov`` with a track's ``mdhd``.
    """
    moov = _path(data, 0, len(data), b"moov")
    if moov is None:
        raise ValueError("no moov box")
    mdhd = _path(data, moov[0], moov[1], b"trak", b"mdia", b"mdhd")
    if mdhd is None:
        raise ValueError("no trak/mdia/mdhd box")
    version = data[mdhd[0]]
    timescale = _u32(data, mdhd[0] + (20 if version == 1 else 12), mdhd[1])
    if timescale <= 0:
        raise ValueError("mdhd timescale is 0")
    created_us: int | None = None
    mvhd = _child(data, moov[0], moov[1], b"mvhd")
    if mvhd is not None:
        read = _u64 if data[mvhd[0]] == 1 else _u32
        created = read(data, mvhd[0] + 4, mvhd[1])
        if created:
            created_us = (created - _MP4_EPOCH_OFFSET_S) * 1_000_000
    default_duration = default_flags = 0
    trex = _path(data, moov[0], moov[1], b"mvex", b"trex")
    if trex is not None:  # version/flags, track_ID, description index, duration, size, flags
        default_duration = _u32(data, trex[0] + 12, trex[1])
        default_flags = _u32(data, trex[0] + 20, trex[1])
    return InitInfo(moov[1], timescale, created_us, default_duration, default_flags)


def moof_timing(moof: bytes, init: InitInfo) -> MoofTiming:
    """Samples, decode time, duration and keyframe flag of a complete ``moof``.

    Timing is read from the first ``traf`` (our files have one track); the
    sample count covers every ``traf``, as :func:`moof_sample_count`.
    Raises ValueError for a malformed box.
    """
    hdr = _header(moof, 0)
    if hdr is None or hdr[1] != b"moof" or hdr[0] != len(moof):
        raise ValueError("not a complete moof box")
    trafs = [(s, e) for kind, s, e in _children(moof, hdr[2], len(moof)) if kind == b"traf"]
    if not trafs:
        raise ValueError("moof without traf")
    samples = moof_sample_count(moof)
    start, end = trafs[0]
    tfhd = _child(moof, start, end, b"tfhd")
    if tfhd is None:
        raise ValueError("traf without tfhd")
    tf_flags = _u32(moof, tfhd[0], tfhd[1]) & 0xFFFFFF
    pos = tfhd[0] + 8  # version/flags, track_ID
    pos += 8 if tf_flags & 0x01 else 0  # base_data_offset
    pos += 4 if tf_flags & 0x02 else 0  # sample_description_index
    default_duration = init.default_duration
    if tf_flags & 0x08:
        default_duration = _u32(moof, pos, tfhd[1])
        pos += 4
    pos += 4 if tf_flags & 0x10 else 0  # default_sample_size
    default_flags = init.default_flags
    if tf_flags & 0x20:
        default_flags = _u32(moof, pos, tfhd[1])
    decode_time: int | None = None
    decode_time_at = -1
    tfdt = _child(moof, start, end, b"tfdt")
    if tfdt is not None:
        if moof[tfdt[0]] == 1:
            decode_time = _u64(moof, tfdt[0] + 4, tfdt[1])
            decode_time_at = tfdt[0] + 4
        else:
            decode_time = _u32(moof, tfdt[0] + 4, tfdt[1])
    durations: list[int] = []
    first_flags: int | None = None
    for kind, cstart, cend in _children(moof, start, end):
        if kind != b"trun":
            continue
        tr_flags = _u32(moof, cstart, cend) & 0xFFFFFF
        count = _u32(moof, cstart + 4, cend)
        pos = cstart + 8 + (4 if tr_flags & 0x001 else 0)  # data_offset
        run_first_flags: int | None = None
        if tr_flags & 0x004:
            run_first_flags = _u32(moof, pos, cend)
            pos += 4
        per_sample = 4 * bin(tr_flags & 0xF00).count("1")
        if pos + count * per_sample > cend:
            raise ValueError("trun sample table overruns its box")
        if not tr_flags & 0x100 and not tr_flags & 0x400:
            durations.extend([default_duration] * count)
            if count and first_flags is None:
                first_flags = default_flags if run_first_flags is None else run_first_flags
            continue
        for i in range(count):
            duration = default_duration
            flags = default_flags
            if tr_flags & 0x100:
                duration = _u32(moof, pos, cend)
                pos += 4
            if tr_flags & 0x200:
                pos += 4
            if tr_flags & 0x400:
                flags = _u32(moof, pos, cend)
                pos += 4
            if tr_flags & 0x800:
                pos += 4
            if i == 0 and run_first_flags is not None:
                flags = run_first_flags
            if first_flags is None:
                first_flags = flags
            durations.append(duration)
    total = sum(durations)
    return MoofTiming(
        samples=samples,
        decode_time=decode_time,
        duration=total,
        last_sample_offset=total - durations[-1] if durations else 0,
        keyframe=first_flags is not None and not first_flags & _NON_SYNC,
        decode_time_at=decode_time_at,
    )


def read_init(f: BinaryIO) -> InitInfo | None:
    """The init segment at the start of a stored file, or None if it is incomplete.

    Blocking I/O. Boxes before ``moov`` (``ftyp``, ``free``) are skipped by header.
    """
    size = f.seek(0, os.SEEK_END)
    pos = 0
    while True:
        f.seek(pos)
        try:
            hdr = _header(f.read(16), 0)
        except ValueError:
            return None
        if hdr is None or pos + hdr[0] > size:
            return None
        if hdr[1] == b"moov":
            if hdr[0] > _MAX_META_BOX:
                return None
            f.seek(0)
            try:
                return parse_init(f.read(pos + hdr[0]))
            except ValueError:
                return None
        if hdr[1] in (b"moof", b"mdat"):
            return None
        pos += hdr[0]


def read_fragments(f: BinaryIO, pos: int, max_samples: int, init: InitInfo) -> FragmentScan:
    """List complete fragments from offset ``pos`` (a box boundary), at most ``max_samples``.

    Blocking I/O: reads the ``moof`` boxes and only the headers of ``mdat``.
    Stops early, without error, at a torn or unreadable box, so the caller
    compares the samples found with those it expected. A fragment without
    ``tfdt`` continues the decode time of the one before it.
    """
    size = f.seek(0, os.SEEK_END)
    window = _Window(f)
    start = pos
    out: list[FragmentInfo] = []
    taken = 0
    last_sample: int | None = None
    next_time = 0
    pending: tuple[int, MoofTiming] | None = None  # a moof awaiting its mdat
    while taken < max_samples:
        buf, at = window.get(pos, 16)
        try:
            hdr = _header(buf, at)
        except ValueError:
            break
        if hdr is None or pos + hdr[0] > size:
            break
        box_size, kind, _ = hdr
        if kind == b"moof":
            if box_size > _MAX_META_BOX:
                break
            buf, at = window.get(pos, box_size)
            try:
                pending = (pos, moof_timing(buf[at : at + box_size], init))
            except ValueError:
                break
        elif kind == b"mdat" and pending is not None:
            at, timing = pending
            pending = None
            if taken + timing.samples > max_samples:
                break
            decode_time = next_time if timing.decode_time is None else timing.decode_time
            dt_at = -1 if timing.decode_time_at < 0 else at + timing.decode_time_at
            out.append(
                FragmentInfo(
                    at,
                    pos + box_size - at,
                    timing.samples,
                    decode_time,
                    timing.duration,
                    timing.keyframe,
                    dt_at,
                )
            )
            taken += timing.samples
            next_time = decode_time + timing.duration
            last_sample = decode_time + timing.last_sample_offset
        elif pending is None and kind in (b"ftyp", b"moov"):
            break  # a second init: not a file we wrote
        pos += box_size
    end = out[-1].end if out else start
    return FragmentScan(out, end, last_sample)


class _Window:
    """A file read forward in large chunks, so that boxes are parsed from memory."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._buf = b""
        self._at = 0

    def get(self, pos: int, n: int) -> tuple[bytes, int]:
        """A buffer holding the file's bytes ``pos..pos+n`` (fewer at its end), and where
        ``pos`` is in it."""
        if pos < self._at or pos + n > self._at + len(self._buf):
            self._f.seek(pos)
            self._buf = self._f.read(max(_READ_CHUNK, n))
            self._at = pos
        return self._buf, pos - self._at
