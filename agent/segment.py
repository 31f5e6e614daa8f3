"""The sealed segment: a few seconds of one camera, encrypted with age.

This module is part of the wire format (the uplink's backfill lane carries
sealed segments as they lie on disk), so the receiver and the district's
export tool import it too. It is pure code: bytes in, bytes out.

A segment file is an age v1 file (X25519 recipients: the district's and the
receiver's), so ``age -d -i district.key SEGMENT`` opens it with the standard
CLI. Its plaintext::

    b"BGSEG1\\n" | header length u32 LE | header (UTF-8 JSON) | records

The header names the camera and its stream (codec, size, fps, SPS/PPS as
base64url), the first and last sequence number, the packet count, and the
segment's time anchors: for its first and last packet the UTC capture time,
the agent's monotonic clock and the boot it belongs to, and the source's own
timestamp, and (``chain``, optional) the device's signed checkpoint of its
camera's footage hash chain over exactly this segment's seqs, without entries:
the records are the entries (:func:`agent.chain.claim_json`). Each record is
``seq u64 | capture_ns i64 | source_ts_ns i64 (-1: none) | flags u8 (bit0
keyframe) | length u32 | payload`` (little-endian).
Sequence numbers inside a segment are consecutive.

The file name carries what retention, the index and export need without
opening the file, which the device cannot do anyway:
``<first_seq>-<last_seq>-<start_ms>-<end_ms>-<size>.age`` (seqs zero-padded
to 16 digits, UTC capture milliseconds, the file's size in bytes). The size
lets a start-up scan find a truncated file with one ``stat``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import pyrage

from hardware import EncodedPacket

MAGIC: Final = b"BGSEG1\n"
_HEADER_LEN: Final = struct.Struct("<I")
RECORD: Final = struct.Struct("<QqqBI")
MAX_HEADER_BYTES: Final = 64 * 1024
#: A segment's plaintext never exceeds this (the uplink frame limit is 16 MiB).
MAX_SEGMENT_BYTES: Final = 12 * 1024 * 1024
SUFFIX: Final = ".age"
NAME_RE: Final = re.compile(r"^(\d{1,19})-(\d{1,19})-(\d{1,15})-(\d{1,15})-(\d{1,12})\.age$")


class SegmentError(ValueError):
    """A segment is malformed, foreign or cannot be opened (the message says which)."""


@dataclass(frozen=True, slots=True)
class Anchor:
    """Where one packet sits on every clock the agent knows."""

    capture_ns: int
    mono_ns: int
    source_ts_ns: int | None


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """What a segment holds, in its plaintext header."""

    camera: str
    codec: str
    width: int
    height: int
    fps: float
    extradata: bytes
    first_seq: int
    last_seq: int
    count: int
    boot_id: str
    first: Anchor
    last: Anchor
    #: The device's checkpoint over first_seq..last_seq (agent.chain), if it signed one.
    chain: Mapping[str, Any] | None = None
    #: The agent run (process start) that wrote it; None in segments from before the field.
    #: Seqs skipped between two runs were reserved and never used (an agent restart).
    run: str | None = None


@dataclass(frozen=True, slots=True)
class SegmentName:
    """What a sealed segment's file name says."""

    first_seq: int
    last_seq: int
    start_ms: int
    end_ms: int
    size: int

    @property
    def filename(self) -> str:
        """The file name for these fields."""
        return (
            f"{self.first_seq:016d}-{self.last_seq:016d}-"
            f"{self.start_ms}-{self.end_ms}-{self.size}{SUFFIX}"
        )

    @classmethod
    def parse(cls, filename: str) -> SegmentName | None:
        """The fields of a segment file name; ``None`` if it is not one."""
        m = NAME_RE.fullmatch(filename)  # $ alone would accept a trailing newline
        if m is None:
            return None
        first, last, start, end, size = (int(g) for g in m.groups())
        if first > last or start > end:
            return None
        return cls(first, last, start, end, size)


@dataclass(frozen=True, slots=True)
class StreamDesc:
    """The stream a segment's packets belong to (from the camera's StreamInfo)."""

    codec: str
    width: int
    height: int
    fps: float
    extradata: bytes


def encode(
    packets: Sequence[EncodedPacket],
    stream: StreamDesc,
    boot_id: str,
    *,
    chain: Mapping[str, Any] | None = None,
    run: str | None = None,
) -> tuple[SegmentHeader, bytes]:
    """The plaintext of a segment of consecutive ``packets`` of one camera.

    ``chain``: the device's checkpoint over exactly these packets, if any; ``run``: the
    agent run writing it.
    """
    if not packets:
        raise SegmentError("a segment needs at least one packet")
    first, last = packets[0], packets[-1]
    if any(p.seq != first.seq + i or p.camera != first.camera for i, p in enumerate(packets)):
        raise SegmentError(f"camera {first.camera}: not consecutive packets of one camera")
    header = SegmentHeader(
        first.camera,
        stream.codec,
        stream.width,
        stream.height,
        stream.fps,
        stream.extradata,
        first.seq,
        last.seq,
        len(packets),
        boot_id,
        Anchor(first.capture_ns, first.mono_ns, first.source_ts_ns),
        Anchor(last.capture_ns, last.mono_ns, last.source_ts_ns),
        None if chain is None else dict(chain),
        run,
    )
    head = json.dumps(_header_json(header), sort_keys=True, separators=(",", ":")).encode()
    parts = [MAGIC, _HEADER_LEN.pack(len(head)), head]
    for pkt in packets:
        ts = -1 if pkt.source_ts_ns is None else pkt.source_ts_ns
        parts.append(
            RECORD.pack(pkt.seq, pkt.capture_ns, ts, 1 if pkt.keyframe else 0, len(pkt.payload))
        )
        parts.append(pkt.payload)
    return header, b"".join(parts)


def decode(plaintext: bytes) -> tuple[SegmentHeader, list[EncodedPacket]]:
    """Header and packets of a segment's plaintext; :class:`SegmentError` if malformed."""
    if len(plaintext) > MAX_SEGMENT_BYTES + MAX_HEADER_BYTES:
        raise SegmentError("segment larger than the limit")
    if not plaintext.startswith(MAGIC):
        raise SegmentError("not a breakglass segment (bad magic)")
    pos = len(MAGIC)
    if len(plaintext) < pos + _HEADER_LEN.size:
        raise SegmentError("segment truncated in its header")
    (head_len,) = _HEADER_LEN.unpack_from(plaintext, pos)
    pos += _HEADER_LEN.size
    if head_len > MAX_HEADER_BYTES or pos + head_len > len(plaintext):
        raise SegmentError("segment header length out of range")
    try:
        header = _header_from_json(json.loads(plaintext[pos : pos + head_len]))
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise SegmentError(f"segment header malformed: {exc}") from exc
    pos += head_len
    packets: list[EncodedPacket] = []
    codec: Any = header.codec
    while pos < len(plaintext):
        if pos + RECORD.size > len(plaintext):
            raise SegmentError("segment truncated in a record header")
        seq, capture_ns, ts, flags, length = RECORD.unpack_from(plaintext, pos)
        pos += RECORD.size
        if pos + length > len(plaintext):
            raise SegmentError(f"segment truncated in the payload of seq {seq}")
        if seq != header.first_seq + len(packets):
            raise SegmentError(f"segment seq {seq} out of order")
        packets.append(
            EncodedPacket(
                header.camera,
                seq,
                capture_ns,
                0,
                bool(flags & 1),
                codec,
                plaintext[pos : pos + length],
                None if ts < 0 else ts,
            )
        )
        pos += length
    if len(packets) != header.count or (packets and packets[-1].seq != header.last_seq):
        raise SegmentError("segment holds fewer packets than its header says")
    return header, packets


def seal(plaintext: bytes, recipients: Iterable[pyrage.x25519.Recipient]) -> bytes:
    """Encrypt a segment to every recipient (age v1, X25519)."""
    return bytes(pyrage.encrypt(plaintext, list(recipients)))


class WriteAll(Protocol):
    """Where :func:`seal_into` writes: ``write`` writes all it is given, or raises."""

    def write(self, data: bytes, /) -> int: ...


def seal_into(
    plaintext: bytes, recipients: Iterable[pyrage.x25519.Recipient], out: WriteAll
) -> None:
    """Encrypt like :func:`seal`, streaming the age file into ``out`` (64 KiB writes).

    The same file as :func:`seal` makes, without a sealed copy in memory: the
    segment writer saves two copies of each segment and their page faults
    (about half its CPU time). ``out.write`` must write everything or raise:
    pyrage aborts the process on a short write, and reports the writer's
    exception as :class:`pyrage.EncryptError` text (keep the error in ``out``
    if its type matters). pyrage before 1.2 has no streaming call: there the
    sealed bytes are made whole and written at once.
    """
    encrypt_io = getattr(pyrage, "encrypt_io", None)
    if encrypt_io is None:
        out.write(seal(plaintext, recipients))
        return
    encrypt_io(io.BytesIO(plaintext), out, list(recipients))


def sealed_size_bound(plaintext_size: int, recipients: int) -> int:
    """At least the size of the age file :func:`seal` makes of ``plaintext_size`` bytes.

    age adds a header (one stanza per recipient, and a random "grease" stanza
    rage adds), a 16-byte nonce and a 16-byte tag per 64 KiB chunk. For room
    on a full disk, before the exact size is known.
    """
    chunks = max(1, -(-plaintext_size // 65536))
    return plaintext_size + 16 * chunks + 16 + 1024 + 128 * recipients


def unseal(sealed: bytes, identities: Iterable[pyrage.x25519.Identity]) -> bytes:
    """Decrypt a sealed segment; :class:`SegmentError` if no identity opens it or it is corrupt."""
    try:
        return bytes(pyrage.decrypt(sealed, list(identities)))
    except pyrage.DecryptError as exc:
        raise SegmentError(f"cannot open sealed segment: {exc}") from exc


def parse_recipient(text: str, *, where: str) -> pyrage.x25519.Recipient:
    """An age X25519 recipient (``age1...``); :class:`SegmentError` naming ``where`` if bad."""
    try:
        return pyrage.x25519.Recipient.from_str(text.strip())
    except (pyrage.RecipientError, ValueError) as exc:
        raise SegmentError(f"{where}: not an age X25519 recipient (age1...)") from exc


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _anchor_json(a: Anchor) -> dict[str, Any]:
    return {"capture_ns": a.capture_ns, "mono_ns": a.mono_ns, "source_ts_ns": a.source_ts_ns}


def _anchor(obj: Any) -> Anchor:
    ts = obj["source_ts_ns"]
    return Anchor(int(obj["capture_ns"]), int(obj["mono_ns"]), None if ts is None else int(ts))


def _header_json(h: SegmentHeader) -> dict[str, Any]:
    extra: dict[str, Any] = {} if h.chain is None else {"chain": dict(h.chain)}
    if h.run is not None:
        extra["run"] = h.run
    return {
        **extra,
        "v": 1,
        "camera": h.camera,
        "codec": h.codec,
        "width": h.width,
        "height": h.height,
        "fps": h.fps,
        "extradata": _b64(h.extradata),
        "first_seq": h.first_seq,
        "last_seq": h.last_seq,
        "count": h.count,
        "boot_id": h.boot_id,
        "anchors": {"first": _anchor_json(h.first), "last": _anchor_json(h.last)},
    }


def _header_from_json(obj: Any) -> SegmentHeader:
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise ValueError("unknown segment header version")
    if obj["codec"] not in ("h264", "mjpeg"):
        raise ValueError(f"codec {obj['codec']!r} unsupported")
    chain = obj.get("chain")
    if chain is not None and not isinstance(chain, dict):
        raise ValueError("segment header chain is not an object")
    run = obj.get("run")
    if run is not None and not (isinstance(run, str) and 0 < len(run) <= 64):
        raise ValueError("segment header run is not a short string")
    return SegmentHeader(
        str(obj["camera"]),
        obj["codec"],
        int(obj["width"]),
        int(obj["height"]),
        float(obj["fps"]),
        _unb64(str(obj["extradata"])),
        int(obj["first_seq"]),
        int(obj["last_seq"]),
        int(obj["count"]),
        str(obj["boot_id"]),
        _anchor(obj["anchors"]["first"]),
        _anchor(obj["anchors"]["last"]),
        chain,
        run,
    )
