"""The footage hash chain: per camera, every packet chained in sequence order, signed.

Theory of operation
-------------------
Each camera's packets are chained as they are numbered (in seq order, on the
agent, before any lane or the store sees them), so the chain does not depend
on how or in which order the packets later reach the receiver::

    link(seq) = SHA-256(b"breakglass-chain-v1\\0" || link(seq - 1) ||
                        u64 BE seq || i64 BE capture time (UTC µs) || u8 flags ||
                        digest(payload))

``flags`` bit 0 is the keyframe flag (nothing session-relative: the pre-roll
flag of the wire is not chained). The first packet an agent numbers after it
starts chains from :data:`GENESIS` (32 zero bytes): a restart begins a new chain.

``digest(payload)`` must be recomputable from the receiver's MP4, whose
samples hold the access unit length-prefixed (AVCC) rather than with start
codes (Annex-B), so it is taken over a form both recover exactly: the NAL
units of the access unit in order, each without its start code and without
trailing zero bytes (a NAL unit never ends in 0x00; trailing zeros are the
stream's padding), each prefixed with its length as u32 BE, then SHA-256 of
that concatenation (:func:`payload_digest` for Annex-B, :func:`sample_digest`
for an MP4 sample). Empty units are skipped, bytes before the first start code
are not part of any unit. For the usual MP4 sample (4-byte lengths, no
padding) this is simply SHA-256 of the sample's bytes. MJPEG, and an H.264
payload without any start code, are hashed as they are.

A **checkpoint** signs a range ``first..last`` of one camera: the link before
it (``prev``) and the link of ``last`` (``head``), with the device key, over
``b"breakglass-chain-checkpoint\\0" + canonical JSON {camera, device, first,
head, kid, last, prev, v}`` (hashes in lowercase hex). It carries the chained
fields of every packet in its range (``entries``: capture time, flags,
digest), so it can be checked on its own (fold ``entries`` from ``prev``:
:func:`check`) and footage can be checked against it packet by packet.
:class:`CameraChain` cuts one at every keyframe, every :data:`CHECKPOINT_EVERY`
packets (so at most about a second of footage is ever unsigned), at the end of
a session (:meth:`CameraChain.cut`) and for any range it still knows
(:meth:`CameraChain.span`: a sealed segment's own range). Signing is per
checkpoint, never per packet; hashing a packet costs a few microseconds.

This module is part of the wire format (the ``chain`` message and the segment
header carry checkpoints), so the receiver and the evidence verifier import it
as they import :mod:`agent.protocol`. Sans-IO: the signing key is passed in,
no clocks, no files.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent import protocol as p
from agent.messages import MAX_FPS
from provisioning.documents import DocumentError, b64url_decode
from provisioning.keys import kid as key_id
from provisioning.keys import verify as verify_signature

GENESIS: Final = bytes(32)
LINK_CONTEXT: Final = b"breakglass-chain-v1\x00"
CHECKPOINT_CONTEXT: Final = b"breakglass-chain-checkpoint\x00"
#: seq, capture time (µs), flags: the chained fields besides the payload digest.
_LINK_FIELDS: Final = struct.Struct(">QqB")
#: One packed entry: capture time (µs), flags, payload digest.
ENTRY: Final = struct.Struct("<qB32s")
FLAG_KEYFRAME: Final = 0x01
#: A checkpoint is cut at least this often (packets), besides every keyframe.
CHECKPOINT_EVERY: Final = 30
_START: Final = b"\x00\x00\x01"
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_KID: Final = re.compile(r"[0-9a-f]{16}")


# -- hashing ------------------------------------------------------------------------------


def payload_digest(codec: str, payload: bytes) -> bytes:
    """The chained digest of one access unit as the camera delivered it (Annex-B H.264)."""
    if codec != "h264":
        return hashlib.sha256(payload).digest()
    # One C-level split finds every start code (about as fast as hashing the bytes; a
    # find() loop costs twice that). NAL units never hold 00 00 01 (emulation prevention).
    units = payload.split(_START)
    if len(units) == 1:
        return hashlib.sha256(payload).digest()
    h = hashlib.sha256()
    for unit in units[1:]:  # what precedes the first start code is no unit
        unit = unit.rstrip(b"\x00")  # the zero of a 4-byte start code, or padding
        if unit:
            h.update(len(unit).to_bytes(4, "big"))
            h.update(unit)
    return h.digest()


def sample_digest(sample: bytes, length_size: int = 4) -> bytes | None:
    """The chained digest of one MP4 (AVCC) sample; ``None`` if it is not well formed."""
    if length_size not in (1, 2, 4):
        return None
    h = hashlib.sha256()
    view = memoryview(sample)
    pos, size = 0, len(sample)
    while pos < size:
        if pos + length_size > size:
            return None
        n = int.from_bytes(view[pos : pos + length_size], "big")
        begin, pos = pos + length_size, pos + length_size + n
        if pos > size:
            return None
        end = pos
        while end > begin and sample[end - 1] == 0:
            end -= 1
        if end > begin:
            h.update((end - begin).to_bytes(4, "big"))
            h.update(view[begin:end])
    return h.digest()


def link(prev: bytes, seq: int, capture_us: int, flags: int, digest: bytes) -> bytes:
    """The chain value after packet ``seq``."""
    return hashlib.sha256(
        LINK_CONTEXT + prev + _LINK_FIELDS.pack(seq, capture_us, flags) + digest
    ).digest()


def fold(prev: bytes, first: int, entries: bytes) -> bytes:
    """The chain value after the packed ``entries`` of seqs ``first, first + 1, ...``."""
    value = prev
    for i, (capture_us, flags, digest) in enumerate(ENTRY.iter_unpack(entries)):
        value = link(value, first + i, capture_us, flags, digest)
    return value


# -- checkpoints ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The device's signature over seqs ``first..last`` of one camera's chain.

    ``entries`` are the packed :data:`ENTRY` records of ``first..last`` (empty
    when they travel elsewhere: a sealed segment's own records).
    """

    device: str
    camera: str
    first: int
    last: int
    prev: bytes
    head: bytes
    kid: str
    sig: bytes
    entries: bytes = b""

    @property
    def count(self) -> int:
        """Packets covered."""
        return self.last - self.first + 1

    def entry(self, seq: int) -> tuple[int, int, bytes]:
        """``(capture_us, flags, digest)`` of ``seq`` (within the range, entries present)."""
        return ENTRY.unpack_from(self.entries, (seq - self.first) * ENTRY.size)

    def iter_entries(self) -> Iterator[tuple[int, tuple[int, int, bytes]]]:
        """``(seq, (capture_us, flags, digest))`` for every entry, in order."""
        for i, fields in enumerate(ENTRY.iter_unpack(self.entries)):
            yield self.first + i, fields


def signed_bytes(
    device: str, camera: str, first: int, last: int, prev: bytes, head: bytes, kid: str
) -> bytes:
    """The bytes a checkpoint's signature covers."""
    body = {
        "camera": camera,
        "device": device,
        "first": first,
        "head": head.hex(),
        "kid": kid,
        "last": last,
        "prev": prev.hex(),
        "v": 1,
    }
    return CHECKPOINT_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(
    key: Ed25519PrivateKey,
    device: str,
    camera: str,
    first: int,
    prev: bytes,
    entries: bytes,
) -> Checkpoint:
    """A checkpoint over ``entries`` (seqs from ``first``), chained from ``prev``."""
    if not entries or len(entries) % ENTRY.size:
        raise ValueError("a checkpoint needs whole entries, at least one")
    last = first + len(entries) // ENTRY.size - 1
    head = fold(prev, first, entries)
    kid = key_id(key.public_key())
    sig = key.sign(signed_bytes(device, camera, first, last, prev, head, kid))
    return Checkpoint(device, camera, first, last, prev, head, kid, sig, bytes(entries))


def check(cp: Checkpoint, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """``None`` if ``cp`` is signed by one of ``keys`` (by kid) and its entries fold to
    its head; else the reason code: ``unknown_key``, ``bad_signature``, ``bad_chain``."""
    key = keys.get(cp.kid)
    if key is None:
        return "unknown_key"
    message = signed_bytes(cp.device, cp.camera, cp.first, cp.last, cp.prev, cp.head, cp.kid)
    if not verify_signature(key, cp.sig, message):
        return "bad_signature"
    if len(cp.entries) != cp.count * ENTRY.size or fold(cp.prev, cp.first, cp.entries) != cp.head:
        return "bad_chain"
    return None


def pack_entries(entries: list[tuple[int, int, bytes]]) -> bytes:
    """Pack ``(capture_us, flags, digest)`` triples."""
    return b"".join(ENTRY.pack(c, f, d) for c, f, d in entries)


# -- wire and file forms ----------------------------------------------------------------------


def to_wire(cp: Checkpoint, session: str, camera_index: int) -> p.Chain:
    """The ``chain`` message of ``cp`` in a session that has its camera at ``camera_index``."""
    return p.Chain(
        session,
        camera_index,
        cp.first,
        cp.last,
        cp.prev.hex(),
        cp.head.hex(),
        cp.kid,
        p.b64url(cp.sig),
        tuple((c, f, d.hex()) for _, (c, f, d) in cp.iter_entries()),
    )


def from_wire(event: p.Chain, device: str, camera: str) -> Checkpoint:
    """A received ``chain`` message as a checkpoint (fields already validated by the protocol)."""
    entries = pack_entries([(c, f, bytes.fromhex(d)) for c, f, d in event.entries])
    return Checkpoint(
        device,
        camera,
        event.first,
        event.last,
        bytes.fromhex(event.prev),
        bytes.fromhex(event.head),
        event.kid,
        p.unb64url(event.sig, what="chain.sig"),
        entries,
    )


def claim_json(cp: Checkpoint) -> dict[str, Any]:
    """A checkpoint without its entries, as a sealed segment's header carries it."""
    return {
        "device": cp.device,
        "first": cp.first,
        "last": cp.last,
        "prev": cp.prev.hex(),
        "head": cp.head.hex(),
        "kid": cp.kid,
        "sig": p.b64url(cp.sig),
    }


def from_claim(claim: Mapping[str, Any], camera: str, entries: bytes) -> Checkpoint:
    """A segment header's checkpoint with the entries computed from the segment's packets.

    Raises ValueError for a malformed claim.
    """
    obj = dict(claim)
    return _checkpoint(
        {**obj, "camera": camera, "entries": []}, entries=entries, where="segment chain"
    )


def record_json(cp: Checkpoint) -> dict[str, Any]:
    """A checkpoint with its entries as JSON (the receiver's files, evidence bundles)."""
    return {
        **claim_json(cp),
        "camera": cp.camera,
        "entries": [[c, f, d.hex()] for _, (c, f, d) in cp.iter_entries()],
    }


def from_record(obj: Any) -> Checkpoint:
    """The checkpoint of :func:`record_json`; ValueError if malformed (nothing is trusted)."""
    if not isinstance(obj, dict):
        raise ValueError("checkpoint: not an object")
    return _checkpoint(obj, entries=None, where="checkpoint")


def _checkpoint(obj: Mapping[str, Any], *, entries: bytes | None, where: str) -> Checkpoint:
    def field(name: str, kind: type) -> Any:
        value = obj.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: {name} missing or of the wrong type")
        return value

    first, last = field("first", int), field("last", int)
    if not 0 <= first <= last < 2**63:
        raise ValueError(f"{where}: seq range {first}..{last} out of order or range")
    hashes = {}
    for name in ("prev", "head"):
        text = field(name, str)
        if not _HEX64.fullmatch(text):
            raise ValueError(f"{where}: {name} is not 64 lowercase hex digits")
        hashes[name] = bytes.fromhex(text)
    kid = field("kid", str)
    if not _KID.fullmatch(kid):
        raise ValueError(f"{where}: kid is not 16 lowercase hex digits")
    try:
        sig = b64url_decode(field("sig", str), what="sig")
    except DocumentError as exc:
        raise ValueError(f"{where}: sig is not base64url") from exc
    if len(sig) != 64:
        raise ValueError(f"{where}: sig is not an Ed25519 signature")
    if entries is None:
        raw = field("entries", list)
        packed: list[tuple[int, int, bytes]] = []
        for item in raw:
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item[:2])
                or not isinstance(item[2], str)
                or not _HEX64.fullmatch(item[2])
                or not -(2**63) <= item[0] < 2**63
                or item[1] not in (0, FLAG_KEYFRAME)
            ):
                raise ValueError(f"{where}: entry {len(packed)} malformed")
            packed.append((item[0], item[1], bytes.fromhex(item[2])))
        entries = pack_entries(packed)
    device, camera = field("device", str), field("camera", str)
    return Checkpoint(
        device, camera, first, last, hashes["prev"], hashes["head"], kid, sig, entries
    )


# -- the running chain of one camera ----------------------------------------------------------


class CameraChain:
    """One camera's chain on the agent: feed every numbered packet, get checkpoints.

    Keeps the open range (since the last checkpoint) and the recent
    checkpoints (those made in the last ``keep_us`` on the monotonic clock, and
    at most that long at :data:`agent.messages.MAX_FPS`, for a session's
    pre-roll and for sealed segments' ranges). A packet whose seq does not
    follow the last one closes the open range first; the chain continues over
    the jump. Kept by capture time, a step of the device's clock forward (NTP)
    dropped every checkpoint at once: the segments being sealed then could not
    be signed, nor a session's pre-roll.
    """

    def __init__(
        self,
        device: str,
        camera: str,
        signer: Ed25519PrivateKey,
        *,
        every: int = CHECKPOINT_EVERY,
        keep_us: int = 120_000_000,
        mono_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if not 1 <= every <= p.MAX_CHAIN_ENTRIES:
            raise ValueError(f"every must be 1..{p.MAX_CHAIN_ENTRIES}, not {every}")
        self.device, self.camera = device, camera
        self._signer = signer
        self._every = every
        self._keep_us = keep_us
        self._mono_ns = mono_ns
        #: At most this many entries in :attr:`recent` (a file replayed at full speed).
        self._max_kept = max(every, int(keep_us / 1e6 * MAX_FPS))
        self.head = GENESIS
        self.last_seq: int | None = None
        self._open_first = 0
        self._open_prev = GENESIS
        self._open = bytearray()
        self.recent: deque[Checkpoint] = deque()
        #: When each of :attr:`recent` was made (monotonic ns), and their entries in all.
        self._made: deque[int] = deque()
        self._kept = 0

    def add(self, seq: int, capture_us: int, keyframe: bool, digest: bytes) -> list[Checkpoint]:
        """Chain one packet; the checkpoints this closes (at a keyframe, or every ``every``)."""
        made: list[Checkpoint] = []
        if self._open and (keyframe or seq != (self.last_seq or 0) + 1):
            made.append(self._close())
        if not self._open:
            self._open_first, self._open_prev = seq, self.head
        flags = FLAG_KEYFRAME if keyframe else 0
        self._open += ENTRY.pack(capture_us, flags, digest)
        self.head = link(self.head, seq, capture_us, flags, digest)
        self.last_seq = seq
        if len(self._open) >= self._every * ENTRY.size:
            made.append(self._close())
        return made

    def _close(self, upto: int | None = None) -> Checkpoint:
        """Sign the open range (up to seq ``upto``); the rest stays open."""
        n = len(self._open) // ENTRY.size
        take = n if upto is None else upto - self._open_first + 1
        entries = bytes(self._open[: take * ENTRY.size])
        cp = sign(
            self._signer, self.device, self.camera, self._open_first, self._open_prev, entries
        )
        del self._open[: take * ENTRY.size]
        self._open_first, self._open_prev = cp.last + 1, cp.head
        self._remember(cp)
        return cp

    def _remember(self, cp: Checkpoint) -> None:
        now = self._mono_ns()
        self.recent.append(cp)
        self._made.append(now)
        self._kept += cp.count
        oldest = now - self._keep_us * 1000
        while len(self.recent) > 1 and (self._made[0] < oldest or self._kept > self._max_kept):
            self._kept -= self.recent.popleft().count
            self._made.popleft()

    def since(self, seq: int) -> list[Checkpoint]:
        """Recent checkpoints that cover ``seq`` or anything after it."""
        return [cp for cp in self.recent if cp.last >= seq]

    def cut(self, end: int) -> list[Checkpoint]:
        """A checkpoint ending exactly at ``end`` (a session's last seq), unless one does."""
        if self.last_seq is None:
            return []
        if self._open and self._open_first <= end <= self.last_seq:
            return [self._close(upto=end)]
        if any(cp.last == end for cp in self.recent):
            return []
        for cp in self.recent:
            if cp.first <= end < cp.last:
                entries = cp.entries[: (end - cp.first + 1) * ENTRY.size]
                return [sign(self._signer, self.device, self.camera, cp.first, cp.prev, entries)]
        return []

    def span(self, first: int, last: int) -> Checkpoint | None:
        """A checkpoint over exactly ``first..last`` without entries (a sealed segment's
        range: its records are the entries), if the chain still knows both ends."""
        prev, head = self._link_before(first), self._link_before(last + 1)
        if prev is None or head is None:
            return None
        kid = key_id(self._signer.public_key())
        sig = self._signer.sign(
            signed_bytes(self.device, self.camera, first, last, prev, head, kid)
        )
        return Checkpoint(self.device, self.camera, first, last, prev, head, kid, sig)

    def _link_before(self, seq: int) -> bytes | None:
        """The chain value before ``seq`` (after ``seq - 1``), from what is still held."""
        if self.last_seq is not None and seq == self.last_seq + 1:
            return self.head
        ranges = [(cp.first, cp.prev, cp.entries) for cp in self.recent]
        if self._open:
            ranges.append((self._open_first, self._open_prev, bytes(self._open)))
        for first, prev, entries in ranges:
            count = len(entries) // ENTRY.size
            if first <= seq <= first + count:
                return fold(prev, first, entries[: (seq - first) * ENTRY.size])
        return None


class Chains:
    """Every camera's :class:`CameraChain` of one device (created on a camera's first packet)."""

    def __init__(
        self,
        device: str,
        signer: Ed25519PrivateKey,
        *,
        every: int = CHECKPOINT_EVERY,
        keep_us: int = 120_000_000,
        mono_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.device = device
        self._signer = signer
        self._every, self._keep_us, self._mono_ns = every, keep_us, mono_ns
        self.cameras: dict[str, CameraChain] = {}

    def chain(self, camera: str) -> CameraChain:
        """The camera's chain."""
        found = self.cameras.get(camera)
        if found is None:
            found = self.cameras[camera] = CameraChain(
                self.device,
                camera,
                self._signer,
                every=self._every,
                keep_us=self._keep_us,
                mono_ns=self._mono_ns,
            )
        return found

    def add(
        self, camera: str, seq: int, capture_us: int, keyframe: bool, codec: str, payload: bytes
    ) -> list[Checkpoint]:
        """Chain one packet of ``camera``; the checkpoints it closes."""
        return self.chain(camera).add(seq, capture_us, keyframe, payload_digest(codec, payload))

    def since(self, camera: str, seq: int) -> list[Checkpoint]:
        """Recent checkpoints of ``camera`` covering ``seq`` or later."""
        found = self.cameras.get(camera)
        return [] if found is None else found.since(seq)

    def cut(self, camera: str, end: int) -> list[Checkpoint]:
        """A checkpoint of ``camera`` ending at ``end``, unless one does."""
        found = self.cameras.get(camera)
        return [] if found is None else found.cut(end)

    def span(self, camera: str, first: int, last: int) -> Checkpoint | None:
        """A checkpoint over exactly ``first..last`` of ``camera``, if still known."""
        found = self.cameras.get(camera)
        return None if found is None else found.span(first, last)
