"""The uplink's messages: what agent and receiver say to each other, and its limits.

One frozen dataclass per message (``Media`` is the exception, for speed; see its
docstring), the limits every message is checked against, and the errors a broken
message raises. How they travel (JSON text or the binary media header) is
:mod:`agent.wire`; in which order, and from which side, :mod:`agent.protocol`,
which re-exports all of this: callers use ``agent.protocol``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

VERSION: Final = 1
MEDIA_HEADER: Final = struct.Struct("<BBHQqBI")
MAX_CONTROL_BYTES: Final = 64 * 1024
MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024
#: The upgrade request's header in which an agent names the optional fields it takes
#: (comma-separated); a receiver sends such a field only to an agent that names it, so
#: agents from before a field are never sent what their strict decoder refuses.
FEATURES_HEADER: Final = "Breakglass-Features"
#: ``welcome.recipients``: the receiver's age recipients (docs/DECISIONS.md).
WELCOME_RECIPIENTS: Final = "welcome-recipients"
#: Durable ranges beyond the cumulative ack that one ``ack`` may list.
MAX_HOLDS: Final = 64
#: Packets one ``chain`` message may cover (each entry is about 90 bytes of JSON).
MAX_CHAIN_ENTRIES: Final = 256
MAX_CAMERAS: Final = 64
#: A camera's width and height, and frame rate, as a ``session_open`` may describe them.
MAX_SIDE: Final = 8192
MAX_FPS: Final = 240.0
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
    #: The age recipients of the identities the receiver opens sealed segments with
    #: (an optional field beside DESIGN.md's; empty from a receiver before it): a device
    #: whose store seals to none of them raises a fault, since the footage it must
    #: fetch after an outage would be refused (docs/DECISIONS.md).
    recipients: tuple[str, ...] = ()


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


#: Audit lines per message (each line is at most 16 KiB; the message at most 64 KiB).
MAX_AUDIT_LINES: Final = 256
