"""Uplink wire protocol, version 1: a sans-IO core shared by agent and receiver.

Theory of operation
-------------------
The agent opens a WebSocket over TLS to ``wss://RECEIVER/v1/uplink`` and keeps
it open. WebSocket framing is the transport's job (aiohttp); this module sees
whole messages: a text message is one JSON control message, a binary message
is one media packet. It never touches a socket, a clock or a file: the shells
feed it what arrived (:meth:`Uplink.receive`) and ask it for what to send
(:meth:`Uplink.send`), in the style of h11.

Handshake (receiver speaks first)::

    receiver -> Challenge(nonce)
    agent    -> Hello(device, enrollment, sig = Ed25519(nonce || origin))
    receiver -> Welcome(acked)       (or Error + close)

After the handshake either side may send ``Heartbeat`` and ``Error``; the
agent sends ``SessionOpen``, ``Media`` and ``SessionClose``; the receiver sends
``Ack`` (cumulative: every sequence number up to ``seq`` of that camera in
that session is durable; ``holds`` lists durable ranges beyond it, so that
the agent does not resend them) and ``Trigger`` (a remote trigger envelope,
which the agent verifies and answers with ``TriggerResult``). The agent ships
its audit trail with ``AuditEntries`` (whole lines, in order); the receiver
answers ``AuditAck`` once they are durable. The receiver tells the agent the
head of its own access log (who logged in, who watched what) with
``AccessHead``; the agent anchors it in its signed trail, so the district can
later check that the access log the police hand over was not rewritten.
The agent sends ``Gap`` when footage of a session is lost for good (the
segment being written when the agent was killed, or evicted from a full disk):
the receiver records the hole and acknowledges past it.
The agent sends ``Chain``, a checkpoint of a camera's footage hash chain
(:mod:`agent.chain`) signed by the device key, for the footage of the session;
the receiver checks and stores it and answers ``ChainAck`` once it is durable
(``result`` ``ok``), or with the reason it refused it (``bad_signature``,
``unknown_key``, ``bad_chain``): a refused checkpoint never stops the footage.

Two lanes of media: ``LIVE`` carries one access unit per message; a
``BACKFILL_SEALED`` message carries one whole sealed segment file of the
agent's store (:mod:`agent.segment`, age-encrypted to the receiver), with the
segment's first seq and first capture time in the header. The receiver opens
it with its age identity and records what it does not hold yet.

Media header (little-endian, 25 bytes) followed by the payload::

    version u8 | kind u8 | camera index u16 | seq u64 | capture time i64 us |
    flags u8 (bit0 keyframe, bit1 pre-roll) | payload length u32

Every message is size-checked before it is parsed. A violation raises
:class:`RemoteProtocolError` (the peer's fault: close with its ``code``) or
:class:`LocalProtocolError` (our own caller's bug).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

VERSION: Final = 1
MEDIA_HEADER: Final = struct.Struct("<BBHQqBI")
MAX_CONTROL_BYTES: Final = 64 * 1024
MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024
#: Durable ranges beyond the cumulative ack that one ``ack`` may list.
MAX_HOLDS: Final = 64
#: Packets one ``chain`` message may cover (each entry is about 90 bytes of JSON).
MAX_CHAIN_ENTRIES: Final = 256
MAX_CAMERAS: Final = 64
FLAG_KEYFRAME: Final = 0x01
FLAG_PREROLL: Final = 0x02


class ProtocolError(Exception):
    """A message broke the uplink protocol. ``code`` is a stable reason code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class RemoteProtocolError(ProtocolError, ValueError):
    """The peer sent something invalid: answer with ``Error(code)`` and close."""


class LocalProtocolError(ProtocolError, RuntimeError):
    """Our own side tried to send something out of order or invalid."""


class Role(enum.Enum):
    """Which end of the uplink this protocol object speaks for."""

    AGENT = "agent"
    RECEIVER = "receiver"


class MediaKind(enum.IntEnum):
    """Which lane a media message travels in."""

    LIVE = 0
    BACKFILL_SEALED = 1


class Phase(enum.Enum):
    """Handshake progress of one connection."""

    CHALLENGE = "challenge"  # waiting for (agent) / about to send (receiver) the challenge
    HELLO = "hello"  # challenge out, hello not yet through
    WELCOME = "welcome"  # hello through, welcome not yet through
    READY = "ready"
    CLOSED = "closed"


def b64url(data: bytes) -> str:
    """Unpadded base64url, as DESIGN.md uses everywhere."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str, *, what: str) -> bytes:
    """Decode unpadded base64url; a bad value is the peer's fault."""
    if not isinstance(text, str) or len(text) > 4 * MAX_CONTROL_BYTES:
        raise RemoteProtocolError("malformed", f"{what}: expected base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise RemoteProtocolError("malformed", f"{what}: not base64url") from exc


def hello_signed_bytes(nonce: str, origin: str) -> bytes:
    """The bytes the agent signs to answer a challenge: nonce || receiver origin."""
    return unb64url(nonce, what="challenge.nonce") + origin.encode("utf-8")


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """Receiver -> agent: prove possession of the device key over this nonce."""

    nonce: str


@dataclass(frozen=True, slots=True)
class Hello:
    """Agent -> receiver: who the device is and the signature over the challenge.

    ``enrollment`` is the enrollment certificate envelope, or ``None`` while a
    receiver still trusts devices by an allow-list of public keys.
    """

    device: str
    sig: str
    enrollment: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Welcome:
    """Receiver -> agent: accepted; last acknowledged seq per session and camera id."""

    acked: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    heartbeat_s: float = 5.0
    #: The last entry of this device's audit trail the receiver holds (0: none).
    audit_n: int = 0


@dataclass(frozen=True, slots=True)
class CameraDesc:
    """One camera of a session, as the receiver needs it to record and play."""

    index: int
    id: str
    zone: str
    codec: str
    width: int
    height: int
    fps: float
    extradata: bytes
    #: First seq of the session: the oldest pre-roll packet.
    first_seq: int
    #: First seq of the live lane: the keyframe that starts the GOP the press fell in.
    #: Seqs before it are older pre-roll, sent beside live footage, never in front of it.
    live_seq: int
    #: Last seq of the session once it ended (None while it streams). Sealed segments
    #: hold whole seconds of footage: the receiver records none outside first..end.
    end_seq: int | None = None


@dataclass(frozen=True, slots=True)
class SessionOpen:
    """Agent -> receiver: an emergency session starts (or resumes after reconnect)."""

    session: str
    building: str
    started_by: Mapping[str, Any]
    started_at: float
    expires_at: float
    cameras: tuple[CameraDesc, ...]


@dataclass(slots=True)
class Media:
    """One encoded access unit of one camera of the open session.

    Not frozen, unlike the other events: a frozen dataclass's ``__init__`` sets each
    field through ``object.__setattr__`` (1.9 µs here, 0.5 µs plain), and the receiver
    builds one per frame on its event loop. Treat it as immutable all the same.
    """

    kind: MediaKind
    camera: int
    seq: int
    capture_us: int
    keyframe: bool
    preroll: bool
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """Receiver -> agent: every seq <= ``seq`` of ``camera`` in ``session`` is durable.

    ``seq`` is -1 only to carry ``holds`` while seq 0 itself is not durable yet.
    ``holds``: further durable ranges ``(first, last)`` (inclusive, ascending, all
    above ``seq + 1``): footage the live lane delivered beyond a hole that
    backfill has not closed yet. The agent need not send them again.
    """

    session: str
    camera: int
    seq: int
    holds: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Gap:
    """Agent -> receiver: seqs ``first..last`` of a camera will never come.

    ``reason``: ``lost`` (not yet sealed when the agent stopped) or ``evicted``
    (deleted from a full disk before the receiver had it). The receiver records
    the hole as declared, so the recording says exactly what is missing.
    """

    session: str
    camera: int
    first: int
    last: int
    reason: str


@dataclass(frozen=True, slots=True)
class Chain:
    """Agent -> receiver: a signed checkpoint of one camera's footage hash chain.

    Covers seqs ``first..last``; ``prev`` and ``head`` are the chain values
    before ``first`` and after ``last`` (lowercase hex), ``sig`` the device's
    Ed25519 signature (base64url), ``kid`` its key id. ``entries`` are, per seq
    from ``first`` on, ``(capture_us, flags, payload digest hex)``: what the chain
    folds besides the seq (:mod:`agent.chain`).
    """

    session: str
    camera: int
    first: int
    last: int
    prev: str
    head: str
    kid: str
    sig: str
    entries: tuple[tuple[int, int, str], ...]


@dataclass(frozen=True, slots=True)
class ChainAck:
    """Receiver -> agent: the checkpoint ``first..last`` of a camera is durable (``result``
    ``ok``) or was refused (``result`` is the reason code). Either way it is done with."""

    session: str
    camera: int
    first: int
    last: int
    result: str


@dataclass(frozen=True, slots=True)
class SessionClose:
    """Agent -> receiver: the session ended (``reason``: expired, ended, ...)."""

    session: str
    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Either side: still here. ``t`` is the sender's wall clock (UTC seconds)."""

    t: float


@dataclass(frozen=True, slots=True)
class Trigger:
    """Receiver -> agent: a signed remote trigger envelope, verified by the agent.

    ``ref`` is the receiver's name for this request; the agent's
    :class:`TriggerResult` repeats it.
    """

    envelope: Mapping[str, Any]
    ref: str


@dataclass(frozen=True, slots=True)
class TriggerResult:
    """Agent -> receiver: what a pushed trigger did, as the Local API would answer it."""

    ref: str
    status: int
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntries:
    """Agent -> receiver: whole audit trail lines, in order, the first being entry ``first``."""

    first: int
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuditAck:
    """Receiver -> agent: audit entries up to ``n`` are durable on the receiver."""

    n: int


@dataclass(frozen=True, slots=True)
class AccessHead:
    """Receiver -> agent: the receiver's access log holds entries 1..``n``, the last
    one's hash ``hash`` (64 lowercase hex; :mod:`receiver.access_log`)."""

    n: int
    hash: str


@dataclass(frozen=True, slots=True)
class Error:
    """Either side: a stable reason code and a human-readable detail."""

    code: str
    detail: str = ""


Event = (
    Challenge
    | Hello
    | Welcome
    | SessionOpen
    | Media
    | Ack
    | Gap
    | Chain
    | ChainAck
    | SessionClose
    | Heartbeat
    | Trigger
    | TriggerResult
    | AuditEntries
    | AuditAck
    | AccessHead
    | Error
)

_FROM_AGENT: Final = (
    Hello,
    SessionOpen,
    Media,
    Gap,
    Chain,
    SessionClose,
    Heartbeat,
    TriggerResult,
    AuditEntries,
    Error,
)
_FROM_RECEIVER: Final = (
    Challenge,
    Welcome,
    Ack,
    ChainAck,
    Heartbeat,
    Trigger,
    AuditAck,
    AccessHead,
    Error,
)
_HASH_HEX: Final = re.compile(r"[0-9a-f]{64}")
#: Audit lines per message (each line is at most 16 KiB; the message at most 64 KiB).
MAX_AUDIT_LINES: Final = 256


# --- JSON field checking ----------------------------------------------------


def _expect(
    obj: Mapping[str, Any], where: str, fields: Mapping[str, type | tuple[type, ...]]
) -> None:
    unknown = set(obj) - set(fields) - {"type"}
    if unknown:
        raise RemoteProtocolError("malformed", f"{where}: unknown field(s) {sorted(unknown)}")
    for name, kind in fields.items():
        if name not in obj:
            raise RemoteProtocolError("malformed", f"{where}.{name}: missing")
        value = obj[name]
        # bool is an int in Python; never accept it where a number is meant.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise RemoteProtocolError("malformed", f"{where}.{name}: wrong type")
        if not isinstance(value, kind):
            raise RemoteProtocolError("malformed", f"{where}.{name}: wrong type")


def _text(value: str, where: str, limit: int = 256) -> str:
    if not value or len(value) > limit or not value.isprintable():
        raise RemoteProtocolError("malformed", f"{where}: empty, too long or unprintable")
    return value


def _seq(value: int, where: str) -> int:
    if not 0 <= value < 2**63:
        raise RemoteProtocolError("malformed", f"{where}: out of range")
    return value


def _camera_desc(obj: Any, where: str) -> CameraDesc:
    if not isinstance(obj, dict):
        raise RemoteProtocolError("malformed", f"{where}: expected an object")
    obj = {"end_seq": None, **obj}  # optional: absent while the session streams
    _expect(
        obj,
        where,
        {
            "index": int,
            "id": str,
            "zone": str,
            "codec": str,
            "width": int,
            "height": int,
            "fps": (int, float),
            "extradata": str,
            "first_seq": int,
            "live_seq": int,
            "end_seq": (int, type(None)),
        },
    )
    if obj["zone"] not in ("exterior", "interior"):
        raise RemoteProtocolError("malformed", f"{where}.zone: must be exterior or interior")
    if obj["codec"] not in ("h264", "mjpeg"):
        raise RemoteProtocolError("malformed", f"{where}.codec: unsupported")
    if not (0 < obj["width"] <= 8192 and 0 < obj["height"] <= 8192 and 0 < obj["fps"] <= 240):
        raise RemoteProtocolError("malformed", f"{where}: width/height/fps out of range")
    if not obj["first_seq"] <= obj["live_seq"]:
        raise RemoteProtocolError("malformed", f"{where}: live_seq before first_seq")
    return CameraDesc(
        index=obj["index"],
        id=_text(obj["id"], f"{where}.id", 64),
        zone=obj["zone"],
        codec=obj["codec"],
        width=obj["width"],
        height=obj["height"],
        fps=float(obj["fps"]),
        extradata=unb64url(obj["extradata"], what=f"{where}.extradata"),
        first_seq=_seq(obj["first_seq"], f"{where}.first_seq"),
        live_seq=_seq(obj["live_seq"], f"{where}.live_seq"),
        end_seq=None if obj["end_seq"] is None else _seq(obj["end_seq"], f"{where}.end_seq"),
    )


def _holds(value: Any, acked: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or len(value) > MAX_HOLDS:
        raise RemoteProtocolError("malformed", f"ack.holds: a list of at most {MAX_HOLDS} ranges")
    holds: list[tuple[int, int]] = []
    floor = acked + 1
    for i, item in enumerate(value):
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            raise RemoteProtocolError("malformed", f"ack.holds[{i}]: expected [first, last]")
        first, last = _seq(item[0], f"ack.holds[{i}]"), _seq(item[1], f"ack.holds[{i}]")
        if not floor < first <= last:
            raise RemoteProtocolError("malformed", f"ack.holds[{i}]: not ascending above seq")
        holds.append((first, last))
        floor = last + 1
    return tuple(holds)


def _hex64(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise RemoteProtocolError("malformed", f"{where}: expected 64 lowercase hex digits")
    return value


def _chain(obj: dict[str, Any]) -> Chain:
    fields = {
        "session": str,
        "camera": int,
        "first": int,
        "last": int,
        "prev": str,
        "head": str,
        "kid": str,
        "sig": str,
        "entries": list,
    }
    _expect(obj, "chain", fields)
    first, last = _seq(obj["first"], "chain.first"), _seq(obj["last"], "chain.last")
    entries = obj["entries"]
    if first > last or len(entries) != last - first + 1:
        raise RemoteProtocolError("malformed", "chain: entries must cover first..last exactly")
    if len(entries) > MAX_CHAIN_ENTRIES:
        raise RemoteProtocolError("malformed", f"chain: more than {MAX_CHAIN_ENTRIES} entries")
    kid = obj["kid"]
    if len(kid) != 16 or kid.strip("0123456789abcdef"):
        raise RemoteProtocolError("malformed", "chain.kid: expected 16 lowercase hex digits")
    if len(unb64url(obj["sig"], what="chain.sig")) != 64:
        raise RemoteProtocolError("malformed", "chain.sig: not an Ed25519 signature")
    parsed: list[tuple[int, int, str]] = []
    for i, item in enumerate(entries):
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item[:2])
            or not -(2**63) <= item[0] < 2**63
            or item[1] not in (0, 1)
        ):
            raise RemoteProtocolError(
                "malformed", f"chain.entries[{i}]: expected [capture_us, flags, digest]"
            )
        parsed.append((item[0], item[1], _hex64(item[2], f"chain.entries[{i}]")))
    return Chain(
        _text(obj["session"], "chain.session", 64),
        obj["camera"],
        first,
        last,
        _hex64(obj["prev"], "chain.prev"),
        _hex64(obj["head"], "chain.head"),
        kid,
        obj["sig"],
        tuple(parsed),
    )


def _parse_control(text: str) -> Event:
    if len(text) > MAX_CONTROL_BYTES:
        raise RemoteProtocolError("too_large", f"control message over {MAX_CONTROL_BYTES} bytes")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RemoteProtocolError("malformed", f"control message is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise RemoteProtocolError("malformed", "control message needs a string 'type'")
    kind = obj["type"]
    if kind == "challenge":
        _expect(obj, kind, {"nonce": str})
        if len(unb64url(obj["nonce"], what="challenge.nonce")) < 16:
            raise RemoteProtocolError("malformed", "challenge.nonce: shorter than 128 bit")
        return Challenge(obj["nonce"])
    if kind == "hello":
        _expect(obj, kind, {"device": str, "sig": str, "enrollment": (dict, type(None))})
        return Hello(_text(obj["device"], "hello.device", 64), obj["sig"], obj["enrollment"])
    if kind == "welcome":
        _expect(obj, kind, {"acked": dict, "heartbeat_s": (int, float), "audit_n": int})
        acked: dict[str, dict[str, int]] = {}
        for sid, cams in obj["acked"].items():
            if not isinstance(cams, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in cams.values()
            ):
                raise RemoteProtocolError(
                    "malformed", f"welcome.acked.{sid}: expected {{camera: seq}}"
                )
            acked[sid] = dict(cams)
        if not 0.1 <= obj["heartbeat_s"] <= 3600:
            raise RemoteProtocolError("malformed", "welcome.heartbeat_s: out of range")
        return Welcome(acked, float(obj["heartbeat_s"]), _seq(obj["audit_n"], "welcome.audit_n"))
    if kind == "session_open":
        _expect(
            obj,
            kind,
            {
                "session": str,
                "building": str,
                "started_by": dict,
                "started_at": (int, float),
                "expires_at": (int, float),
                "cameras": list,
            },
        )
        if not 0 < len(obj["cameras"]) <= MAX_CAMERAS:
            raise RemoteProtocolError("malformed", f"session_open.cameras: 1..{MAX_CAMERAS} needed")
        cameras = tuple(
            _camera_desc(c, f"session_open.cameras[{i}]") for i, c in enumerate(obj["cameras"])
        )
        if [c.index for c in cameras] != list(range(len(cameras))):
            raise RemoteProtocolError("malformed", "session_open.cameras: index must be 0..n-1")
        return SessionOpen(
            _text(obj["session"], "session_open.session", 64),
            _text(obj["building"], "session_open.building", 64),
            obj["started_by"],
            float(obj["started_at"]),
            float(obj["expires_at"]),
            cameras,
        )
    if kind == "ack":
        holds_json = obj.pop("holds", [])
        _expect(obj, kind, {"session": str, "camera": int, "seq": int})
        # -1: nothing durable yet from seq 0 on, but holds beyond it may be listed.
        seq = -1 if obj["seq"] == -1 else _seq(obj["seq"], "ack.seq")
        return Ack(obj["session"], obj["camera"], seq, _holds(holds_json, seq))
    if kind == "gap":
        fields = {"session": str, "camera": int, "first": int, "last": int, "reason": str}
        _expect(obj, kind, fields)
        first, last = _seq(obj["first"], "gap.first"), _seq(obj["last"], "gap.last")
        if first > last:
            raise RemoteProtocolError("malformed", "gap: first after last")
        if obj["reason"] not in ("lost", "evicted"):
            raise RemoteProtocolError("malformed", "gap.reason: must be lost or evicted")
        return Gap(obj["session"], obj["camera"], first, last, obj["reason"])
    if kind == "chain":
        return _chain(obj)
    if kind == "chain_ack":
        fields = {"session": str, "camera": int, "first": int, "last": int, "result": str}
        _expect(obj, kind, fields)
        first, last = _seq(obj["first"], "chain_ack.first"), _seq(obj["last"], "chain_ack.last")
        if first > last:
            raise RemoteProtocolError("malformed", "chain_ack: first after last")
        return ChainAck(
            obj["session"], obj["camera"], first, last, _text(obj["result"], "chain_ack.result", 64)
        )
    if kind == "session_close":
        _expect(obj, kind, {"session": str, "reason": str})
        return SessionClose(obj["session"], _text(obj["reason"], "session_close.reason"))
    if kind == "heartbeat":
        _expect(obj, kind, {"t": (int, float)})
        return Heartbeat(float(obj["t"]))
    if kind == "trigger":
        _expect(obj, kind, {"envelope": dict, "ref": str})
        return Trigger(obj["envelope"], _text(obj["ref"], "trigger.ref", 64))
    if kind == "trigger_result":
        _expect(obj, kind, {"ref": str, "status": int, "body": dict})
        if not 100 <= obj["status"] <= 599:
            raise RemoteProtocolError("malformed", "trigger_result.status: not an HTTP status")
        return TriggerResult(
            _text(obj["ref"], "trigger_result.ref", 64), obj["status"], obj["body"]
        )
    if kind == "audit":
        _expect(obj, kind, {"first": int, "lines": list})
        lines = obj["lines"]
        if not 0 < len(lines) <= MAX_AUDIT_LINES or not all(isinstance(x, str) for x in lines):
            raise RemoteProtocolError("malformed", f"audit.lines: 1..{MAX_AUDIT_LINES} strings")
        return AuditEntries(_seq(obj["first"], "audit.first"), tuple(lines))
    if kind == "audit_ack":
        _expect(obj, kind, {"n": int})
        return AuditAck(_seq(obj["n"], "audit_ack.n"))
    if kind == "access_head":
        _expect(obj, kind, {"n": int, "hash": str})
        if not _HASH_HEX.fullmatch(obj["hash"]):
            raise RemoteProtocolError("malformed", "access_head.hash: 64 lowercase hex digits")
        return AccessHead(_seq(obj["n"], "access_head.n"), obj["hash"])
    if kind == "error":
        _expect(obj, kind, {"code": str, "detail": str})
        return Error(_text(obj["code"], "error.code", 64), obj["detail"][:1024])
    raise RemoteProtocolError("malformed", f"unknown control message type {kind[:32]!r}")


def _serialize(event: Event) -> str | bytes:
    if isinstance(event, Media):
        if len(event.payload) > MAX_PAYLOAD_BYTES:
            raise LocalProtocolError("too_large", f"media payload over {MAX_PAYLOAD_BYTES} bytes")
        flags = (FLAG_KEYFRAME if event.keyframe else 0) | (FLAG_PREROLL if event.preroll else 0)
        header = MEDIA_HEADER.pack(
            VERSION,
            event.kind,
            event.camera,
            event.seq,
            event.capture_us,
            flags,
            len(event.payload),
        )
        return header + event.payload
    body: dict[str, Any]
    if isinstance(event, Challenge):
        body = {"type": "challenge", "nonce": event.nonce}
    elif isinstance(event, Hello):
        body = {"type": "hello", "device": event.device, "sig": event.sig}
        body["enrollment"] = dict(event.enrollment) if event.enrollment is not None else None
    elif isinstance(event, Welcome):
        acked = {s: dict(c) for s, c in event.acked.items()}
        body = {
            "type": "welcome",
            "acked": acked,
            "heartbeat_s": event.heartbeat_s,
            "audit_n": event.audit_n,
        }
    elif isinstance(event, SessionOpen):
        body = {
            "type": "session_open",
            "session": event.session,
            "building": event.building,
            "started_by": dict(event.started_by),
            "started_at": event.started_at,
            "expires_at": event.expires_at,
            "cameras": [
                {
                    "index": c.index,
                    "id": c.id,
                    "zone": c.zone,
                    "codec": c.codec,
                    "width": c.width,
                    "height": c.height,
                    "fps": c.fps,
                    "extradata": b64url(c.extradata),
                    "first_seq": c.first_seq,
                    "live_seq": c.live_seq,
                    "end_seq": c.end_seq,
                }
                for c in event.cameras
            ],
        }
    elif isinstance(event, Ack):
        body = {"type": "ack", "session": event.session, "camera": event.camera, "seq": event.seq}
        if event.holds:
            body["holds"] = [list(h) for h in event.holds]
    elif isinstance(event, Gap):
        body = {
            "type": "gap",
            "session": event.session,
            "camera": event.camera,
            "first": event.first,
            "last": event.last,
            "reason": event.reason,
        }
    elif isinstance(event, Chain):
        body = {
            "type": "chain",
            "session": event.session,
            "camera": event.camera,
            "first": event.first,
            "last": event.last,
            "prev": event.prev,
            "head": event.head,
            "kid": event.kid,
            "sig": event.sig,
            "entries": [list(e) for e in event.entries],
        }
    elif isinstance(event, ChainAck):
        body = {
            "type": "chain_ack",
            "session": event.session,
            "camera": event.camera,
            "first": event.first,
            "last": event.last,
            "result": event.result,
        }
    elif isinstance(event, SessionClose):
        body = {"type": "session_close", "session": event.session, "reason": event.reason}
    elif isinstance(event, Heartbeat):
        body = {"type": "heartbeat", "t": event.t}
    elif isinstance(event, Trigger):
        body = {"type": "trigger", "envelope": dict(event.envelope), "ref": event.ref}
    elif isinstance(event, TriggerResult):
        body = {
            "type": "trigger_result",
            "ref": event.ref,
            "status": event.status,
            "body": dict(event.body),
        }
    elif isinstance(event, AuditEntries):
        body = {"type": "audit", "first": event.first, "lines": list(event.lines)}
    elif isinstance(event, AuditAck):
        body = {"type": "audit_ack", "n": event.n}
    elif isinstance(event, AccessHead):
        body = {"type": "access_head", "n": event.n, "hash": event.hash}
    else:
        body = {"type": "error", "code": event.code, "detail": event.detail}
    text = json.dumps(body, separators=(",", ":"))
    if len(text) > MAX_CONTROL_BYTES:
        raise LocalProtocolError("too_large", f"{body['type']} over {MAX_CONTROL_BYTES} bytes")
    return text


def encode_control(event: Event) -> str:
    """One control event as its JSON text (also how the agent persists a session_open)."""
    if isinstance(event, Media):
        raise LocalProtocolError("unexpected", "media is binary")
    wire = _serialize(event)
    assert isinstance(wire, str)
    return wire


def decode_control(text: str) -> Event:
    """Parse one control message (validated exactly as from the wire)."""
    return _parse_control(text)


_MEDIA_KINDS = {kind.value: kind for kind in MediaKind}


def _parse_media(data: bytes) -> Media:
    if len(data) < MEDIA_HEADER.size:
        raise RemoteProtocolError("malformed", "media message shorter than its header")
    version, kind, camera, seq, capture_us, flags, length = MEDIA_HEADER.unpack_from(data)
    if version != VERSION:
        raise RemoteProtocolError(
            "bad_version", f"media header version {version}, expected {VERSION}"
        )
    media_kind = _MEDIA_KINDS.get(kind)
    if media_kind is None:
        raise RemoteProtocolError("malformed", f"media kind {kind} unknown")
    if flags & ~(FLAG_KEYFRAME | FLAG_PREROLL):
        raise RemoteProtocolError("malformed", f"media flags {flags:#x} has unknown bits")
    if length > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError("too_large", f"media payload over {MAX_PAYLOAD_BYTES} bytes")
    if length != len(data) - MEDIA_HEADER.size:
        raise RemoteProtocolError("malformed", "media payload length does not match the message")
    return Media(
        media_kind,
        camera,
        _seq(seq, "media.seq"),
        capture_us,
        bool(flags & FLAG_KEYFRAME),
        bool(flags & FLAG_PREROLL),
        data[MEDIA_HEADER.size :],
    )


class Uplink:
    """One end of one uplink connection: validates order, parses and serializes.

    >>> agent, receiver = Uplink(Role.AGENT), Uplink(Role.RECEIVER)
    >>> agent.receive(receiver.send(Challenge("AAAAAAAAAAAAAAAAAAAAAA")))
    Challenge(nonce='AAAAAAAAAAAAAAAAAAAAAA')
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self.phase = Phase.CHALLENGE
        #: Id and camera count of the session the agent has open on this connection.
        self.session: str | None = None
        self.camera_count = 0

    # -- incoming --

    def receive(self, message: str | bytes) -> Event:
        """Parse one whole WebSocket message from the peer and advance the state."""
        if self.phase is Phase.CLOSED:
            raise RemoteProtocolError("closed", "message after the connection was closed")
        if isinstance(message, str):
            event: Event = _parse_control(message)
        else:  # bytes() of bytes is the same object: no copy
            event = _parse_media(bytes(message))
        allowed = _FROM_RECEIVER if self.role is Role.AGENT else _FROM_AGENT
        if not isinstance(event, allowed):
            raise RemoteProtocolError("unexpected", f"{type(event).__name__} from the wrong side")
        self._advance(event, remote=True)
        return event

    # -- outgoing --

    def send(self, event: Event) -> str | bytes:
        """Serialize one event to send; a text or a binary WebSocket message."""
        if self.phase is Phase.CLOSED:
            raise LocalProtocolError("closed", "send after the connection was closed")
        allowed = _FROM_AGENT if self.role is Role.AGENT else _FROM_RECEIVER
        if not isinstance(event, allowed):
            raise LocalProtocolError(
                "unexpected", f"{self.role.value} cannot send {type(event).__name__}"
            )
        wire = _serialize(event)
        self._advance(event, remote=False)
        return wire

    def close(self) -> None:
        """Mark the connection closed: nothing more is sent or accepted."""
        self.phase = Phase.CLOSED

    # -- the state table --

    def _fail(self, remote: bool, code: str, detail: str) -> ProtocolError:
        return (RemoteProtocolError if remote else LocalProtocolError)(code, detail)

    def _advance(self, event: Event, *, remote: bool) -> None:
        if type(event) is Media and self.phase is Phase.READY:  # the hot path, checked first
            if self.session is None:
                raise self._fail(remote, "no_session", "media without an open session")
            if event.camera >= self.camera_count:
                raise self._fail(
                    remote, "unknown_camera", f"camera index {event.camera} not in session"
                )
            return
        name = type(event).__name__
        if isinstance(event, Error):
            return  # an error is allowed in every phase; the shell closes after it
        if isinstance(event, Challenge):
            if self.phase is not Phase.CHALLENGE:
                raise self._fail(remote, "unexpected", "challenge after the handshake began")
            self.phase = Phase.HELLO
        elif isinstance(event, Hello):
            if self.phase is not Phase.HELLO:
                raise self._fail(remote, "unexpected", "hello before a challenge or twice")
            self.phase = Phase.WELCOME
        elif isinstance(event, Welcome):
            if self.phase is not Phase.WELCOME:
                raise self._fail(remote, "unexpected", "welcome before hello or twice")
            self.phase = Phase.READY
        elif self.phase is not Phase.READY:
            raise self._fail(remote, "unexpected", f"{name} before the handshake completed")
        elif isinstance(event, SessionOpen):
            self.session = event.session
            self.camera_count = len(event.cameras)
        elif isinstance(event, Gap | Chain):
            if event.session != self.session or event.camera >= self.camera_count:
                what = "gap" if isinstance(event, Gap) else "chain"
                raise self._fail(remote, "unknown_camera", f"{what} for a camera not in session")
        elif isinstance(event, SessionClose):
            if event.session != self.session:
                raise self._fail(remote, "unknown_session", "session_close for a session not open")
            self.session = None
            self.camera_count = 0
        elif (
            isinstance(event, Ack | ChainAck)
            and event.session == self.session
            and event.camera >= self.camera_count
        ):
            raise self._fail(remote, "unknown_camera", f"ack for camera index {event.camera}")
