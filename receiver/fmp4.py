"""Fragmented-MP4 box framing, sans-IO.

:class:`FragmentSplitter` turns the byte stream a muxer writes into an init
segment (``ftyp`` + ``moov``) and media fragments (``moof`` + ``mdat``), each
with its sample count read from ``moof/traf/trun``. :func:`scan_file` walks
the top-level box headers of a stored file (reading only headers and the
small ``moof``/``moov`` boxes), counts the samples of complete fragments and
tells where the valid part ends, so a torn tail can be cut off.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

__all__ = [
    "Fragment",
    "FragmentSplitter",
    "InitSegment",
    "ScanResult",
    "avcc_from_moov",
    "moof_sample_count",
    "scan_file",
]

_MAX_META_BOX = 16 << 20  # a moov or moof bigger than this is not ours: treat as corrupt


@dataclass(frozen=True, slots=True)
class InitSegment:
    """``ftyp`` + ``moov``: what a decoder needs before any fragment."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Fragment:
    """One ``moof`` + ``mdat`` pair holding ``sample_count`` samples."""

    data: bytes
    sample_count: int


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


class FragmentSplitter:
    """Splits a muxer's output byte stream into init segment and fragments.

    Feed every written chunk to :meth:`feed`; it returns the units completed
    by that chunk, in order. Other top-level boxes (``mfra`` at the end,
    ``free``) are passed over.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._ftyp: bytes | None = None
        self._moof: bytes | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not yet form a complete unit."""
        return len(self._buf) + len(self._moof or b"") + len(self._ftyp or b"")

    def feed(self, data: bytes | bytearray | memoryview) -> list[InitSegment | Fragment]:
        """Add written bytes; return the init segment/fragments they complete."""
        self._buf += data
        out: list[InitSegment | Fragment] = []
        pos = 0
        while True:
            hdr = _header(self._buf, pos)
            if hdr is None or len(self._buf) - pos < hdr[0]:
                break
            size, kind, _ = hdr
            box = bytes(self._buf[pos : pos + size])
            pos += size
            if kind == b"ftyp":
                self._ftyp = box
            elif kind == b"moov":
                out.append(InitSegment((self._ftyp or b"") + box))
                self._ftyp = None
            elif kind == b"moof":
                self._moof = box
            elif kind == b"mdat" and self._moof is not None:
                out.append(Fragment(self._moof + box, moof_sample_count(self._moof)))
                self._moof = None
        del self._buf[:pos]
        return out


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
