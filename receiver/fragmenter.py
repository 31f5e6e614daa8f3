"""The fragments of a recording's part file: byte for byte what FFmpeg's mov muxer writes.

A part file is fragmented MP4 with one H.264 track and one fragment per
frame, as FFmpeg's ``mp4`` muxer writes it with ``movflags``
``frag_every_frame+empty_moov+default_base_moof`` (the part's init segment,
``ftyp`` + ``moov``, still comes from that muxer: :func:`receiver.run`).
Muxing each frame through PyAV cost the receiver about 130 µs of its event
loop per frame (a packet object, the muxer, three writes through a Python
file object and a box parser to find out what was written); this sans-IO
writer does the same in a few struct packs and hands back one buffer per
fragment, so the receiver knows each fragment without parsing it.

What FFmpeg writes, and so what this writes (``tests/test_fragmenter.py``
compares the two byte for byte, the closing ``mfra`` included):

- A frame's fragment is written when the next frame arrives, with its
  duration = the next decode time - its own (or, for the last frame, at
  :meth:`Fragmenter.finish`, its own packet duration).
- ``moof``: ``mfhd`` (sequence 1, 2, ...), ``traf``: ``tfhd`` (track 1,
  default-base-is-moof, the sample's duration, size and the non-sync flags
  ``0x01010000`` as defaults), ``tfdt`` (version 1, the decode time),
  ``trun`` (one sample, its data offset; a keyframe carries first-sample
  flags ``0x02000000``). Then ``mdat`` with the frame in AVCC form (each NAL
  unit behind a 4-byte length, as ``ff_nal_parse_units`` converts Annex B).
- At the end, ``mfra``: a ``tfra`` entry (decode time, ``moof`` offset) for
  every fragment, then ``mfro``.
"""

from __future__ import annotations

import re
import struct
from array import array

import numpy as np

from receiver.fmp4 import FRAGMENT_FIELDS

__all__ = ["Fragmenter", "avcc_from_annex_b"]

#: Fragments :attr:`Fragmenter.written` keeps for the recording index at most (it takes
#: them about twice a second); beyond, the oldest go and the index reads the file instead.
#: A camera catching up at full rate makes 6,000-7,000 a second (4,096 were cut every
#: round, and reading them back cost the index's thread a sixth of the loop's CPU);
#: 16,384 take 0.9 MiB.
MAX_WRITTEN = 16384
#: Where a fragment's 64-bit tfdt decode time is: moof, mfhd, traf and tfhd headers.
_TFDT_TIME_AT = 8 + 16 + 8 + 28 + 12

_find_starts = re.compile(b"\x00\x00\x01").finditer
_NON_SYNC_FLAGS = 0x01010000  # sample_depends_on = 1, sample_is_non_sync_sample
_SYNC_FLAGS = 0x02000000  # sample_depends_on = 2 (an IDR)
_TFHD_FLAGS = 0x020038  # default-base-is-moof, default duration, size and flags present
_MAX_DURATION = 0xFFFFFFFF
_MOOF_KEY = 104  # moof of a keyframe's fragment: its trun carries first-sample flags
_MOOF = 100
# moof(mfhd, traf(tfhd, tfdt, trun)) and the mdat header, in one pack: moof, mfhd header,
# version+flags, sequence; traf, tfhd...; tfdt; trun (a keyframe's has first-sample
# flags); mdat.
_MOOF_HEAD = ">I4sI4sII" + "I4sI4sIIIII" + "I4sIQ"
_HEAD_KEY = struct.Struct(_MOOF_HEAD + "I4sIIiI" + "I4s")
_HEAD = struct.Struct(_MOOF_HEAD + "I4sIIi" + "I4s")
#: A tfra entry: decode time, moof offset, traf, trun and sample number (each 1).
_TFRA_ENTRY = np.dtype([("time", ">u8"), ("offset", ">u8"), ("numbers", "u1", (3,))])


def avcc_from_annex_b(data: bytes) -> list[bytes | memoryview]:
    """An Annex-B access unit as AVCC: ``[length, unit, length, unit, ...]``.

    The same units FFmpeg's ``ff_nal_parse_units`` finds: bytes before the
    first start code are dropped, a unit starts past its start code's ``01``
    and ends where the next start code (with at most one zero byte in front of
    it: ``ff_nal_find_startcode``) begins. This scan is the fragmenter's main
    cost: ``re``'s literal search finds the start codes about a third faster
    than a ``bytes.find`` per unit (14 against 19 µs for a 17 KB frame of three
    slices), and start codes cannot overlap, so it finds the same ones.
    """
    view = memoryview(data)
    out: list[bytes | memoryview] = []
    pos = -1  # where the current unit starts; -1 before the first start code
    for code in _find_starts(data):
        start = code.start()
        if pos >= 0:
            unit_end = start - 1 if start > pos and data[start - 1] == 0 else start
            out.append((unit_end - pos).to_bytes(4, "big"))
            out.append(view[pos:unit_end])
        pos = start + 3
    if 0 <= pos < len(data):
        out.append((len(data) - pos).to_bytes(4, "big"))
        out.append(view[pos:])
    return out


class Fragmenter:
    """Turns a part's frames into its fragments; the caller writes them, in order.

    ``position`` is the part file's size before the first fragment (the
    init segment's length): ``mfra`` refers to fragments by file offset.
    """

    def __init__(self, position: int) -> None:
        self._position = position
        self._sequence = 0
        self._held: tuple[int, int, bool, list[bytes | memoryview], int] | None = None
        #: (decode time, moof offset) of every fragment written, for ``mfra``.
        self._index = array("q")
        #: The fragments written and not yet taken (:meth:`take`), from the part's
        #: frame :attr:`written_from` on: the recording index need not read them back.
        #: Flat, :data:`receiver.fmp4.FRAGMENT_FIELDS` values per fragment (a few C
        #: appends per frame, and the index stores the array as it is).
        self.written = array("q")
        self.written_from = 0

    def add(self, dts: int, duration: int, keyframe: bool, annex_b: bytes) -> bytes | None:
        """Take the next frame; return the previous frame's fragment, now complete.

        ``dts`` must increase; ``duration`` is this frame's own packet duration,
        used only if it turns out to be the last.
        """
        units = avcc_from_annex_b(annex_b)
        size = sum(map(len, units))
        out = None
        if self._held is not None:  # a sample's duration has 32 bits (the caller cuts a
            # part at a capture-time jump long before: this only keeps a bug from raising)
            out = self._fragment(self._held, min(dts - self._held[0], _MAX_DURATION))
        self._held = (dts, duration, keyframe, units, size)
        return out

    def finish(self) -> tuple[bytes | None, bytes]:
        """The last frame's fragment (None if no frame is held), and the closing ``mfra``."""
        last = None if self._held is None else self._fragment(self._held, self._held[1])
        self._held = None
        mfra = self._mfra()
        self._index = array("q")  # the part is done; only :attr:`written` is still taken
        return last, mfra

    def _fragment(
        self, held: tuple[int, int, bool, list[bytes | memoryview], int], duration: int
    ) -> bytes:
        dts, _, keyframe, units, size = held
        self._sequence += 1
        moof = _MOOF_KEY if keyframe else _MOOF
        traf = moof - 24
        trun = traf - 56
        if keyframe:
            head = _HEAD_KEY.pack(
                moof, b"moof", 16, b"mfhd", 0, self._sequence,
                traf, b"traf", 28, b"tfhd", _TFHD_FLAGS, 1, duration, size, _NON_SYNC_FLAGS,
                20, b"tfdt", 0x01000000, dts,
                trun, b"trun", 5, 1, moof + 8, _SYNC_FLAGS, size + 8, b"mdat",
            )  # fmt: skip
        else:
            head = _HEAD.pack(
                moof, b"moof", 16, b"mfhd", 0, self._sequence,
                traf, b"traf", 28, b"tfhd", _TFHD_FLAGS, 1, duration, size, _NON_SYNC_FLAGS,
                20, b"tfdt", 0x01000000, dts,
                trun, b"trun", 1, 1, moof + 8, size + 8, b"mdat",
            )  # fmt: skip
        position = self._position
        self._index.extend((dts, position))
        data = b"".join([head, *units])
        size = len(data)
        # FragmentInfo's fields: offset, size, samples, decode time, duration, keyframe,
        # where the decode time is.
        self.written.extend((position, size, 1, dts, duration, keyframe, position + _TFDT_TIME_AT))
        if len(self.written) > MAX_WRITTEN * FRAGMENT_FIELDS:
            drop = len(self.written) // FRAGMENT_FIELDS - MAX_WRITTEN // 2
            del self.written[: drop * FRAGMENT_FIELDS]
            self.written_from += drop
        self._position = position + size
        return data

    def take(self, frames: int) -> tuple[int, array[int]]:
        """The written fragments of the part's frames before ``frames`` (say, the durable
        ones, flat as :attr:`written`), and the frame number of the first; they are not
        kept any longer."""
        n = max(0, min(len(self.written) // FRAGMENT_FIELDS, frames - self.written_from))
        start, taken = self.written_from, self.written[: n * FRAGMENT_FIELDS]
        del self.written[: n * FRAGMENT_FIELDS]
        self.written_from += n
        return start, taken

    def _mfra(self) -> bytes:
        # One numpy pass, not a pack per fragment: an hour's part has 108,000 of them,
        # and this runs on the event loop when the part closes.
        pairs = np.frombuffer(self._index, dtype=np.int64).reshape(-1, 2)
        table = np.empty(len(pairs), dtype=_TFRA_ENTRY)
        table["time"], table["offset"], table["numbers"] = pairs[:, 0], pairs[:, 1], 1
        tfra_size = 24 + table.nbytes
        head = struct.pack(">I4sI4sIIII", 8 + tfra_size + 16, b"mfra", tfra_size, b"tfra",
                           0x01000000, 1, 0, len(table))  # fmt: skip
        return head + table.tobytes() + struct.pack(">I4sII", 16, b"mfro", 0, 8 + tfra_size + 16)
