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

Three modules: the messages and limits (:mod:`agent.messages`), their encoding
(:mod:`agent.wire`) and, here, the state of one connection (:class:`Uplink`: the
handshake, which side may send what, the open session). This module re-exports
the other two; the rest of the code imports only this one.
"""

from __future__ import annotations

from typing import Final

from agent.messages import (
    FEATURES_HEADER,
    FLAG_KEYFRAME,
    FLAG_PREROLL,
    MAX_AUDIT_LINES,
    MAX_CAMERAS,
    MAX_CHAIN_ENTRIES,
    MAX_CONTROL_BYTES,
    MAX_HOLDS,
    MAX_PAYLOAD_BYTES,
    MEDIA_HEADER,
    VERSION,
    WELCOME_RECIPIENTS,
    AccessHead,
    Ack,
    AuditAck,
    AuditEntries,
    CameraDesc,
    Chain,
    ChainAck,
    Challenge,
    Error,
    Event,
    Gap,
    Heartbeat,
    Hello,
    LocalProtocolError,
    Media,
    MediaKind,
    Phase,
    ProtocolError,
    RemoteProtocolError,
    Role,
    SessionClose,
    SessionOpen,
    Trigger,
    TriggerResult,
    Welcome,
    b64url,
    hello_signed_bytes,
    unb64url,
)
from agent.wire import decode_control, decode_media, encode, encode_control

__all__ = [
    "FEATURES_HEADER",
    "FLAG_KEYFRAME",
    "FLAG_PREROLL",
    "MAX_AUDIT_LINES",
    "MAX_CAMERAS",
    "MAX_CHAIN_ENTRIES",
    "MAX_CONTROL_BYTES",
    "MAX_HOLDS",
    "MAX_PAYLOAD_BYTES",
    "MEDIA_HEADER",
    "VERSION",
    "WELCOME_RECIPIENTS",
    "AccessHead",
    "Ack",
    "AuditAck",
    "AuditEntries",
    "CameraDesc",
    "Chain",
    "ChainAck",
    "Challenge",
    "Error",
    "Event",
    "Gap",
    "Heartbeat",
    "Hello",
    "LocalProtocolError",
    "Media",
    "MediaKind",
    "Phase",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "SessionClose",
    "SessionOpen",
    "Trigger",
    "TriggerResult",
    "Uplink",
    "Welcome",
    "b64url",
    "decode_control",
    "decode_media",
    "encode",
    "encode_control",
    "hello_signed_bytes",
    "unb64url",
]

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
            event: Event = decode_control(message)
        else:  # bytes() of bytes is the same object: no copy
            event = decode_media(bytes(message))
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
        wire = encode(event)
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
