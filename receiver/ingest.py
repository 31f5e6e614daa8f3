"""The uplink endpoint: authenticate devices, record their sessions, ack durably.

One WebSocket per device at ``/v1/uplink``. The receiver speaks first with a
random challenge; the device answers with its id and an Ed25519 signature
over ``nonce || origin``. Until enrollment certificates exist, a device is
trusted when its public key is on the allow-list (``DATA/devices/<id>.pub``).

Media go straight into the session's :class:`CameraRecording` (remux only);
sealed segments of the backfill lane are opened with the receiver's age
identity off the event loop and recorded packet by packet, in order with the
camera's other messages. Acks are sent per camera only after an fsync covers
the packets (group commit: one fsync in flight per run, the next one covers
all that arrived meanwhile): cumulative, plus the durable ranges beyond it.

The device's signed footage hash chain (``chain`` messages, and the
checkpoints inside sealed segments) is checked with the key the device
proved at hello and kept beside each session's recording
(:mod:`receiver.custody`): the evidence export's chain of custody. A
checkpoint that does not verify is refused with its code in ``chain_ack``,
logged and recorded as refused; the connection and the footage go on.

Each heartbeat measures the device's clock (:class:`receiver.device_clock.DeviceClocks`:
its offset from the receiver's, per connection, and each open session's): dispatch
signs triggers in the device's time, and the page shows times on the receiver's.
A re-opened session's new expiry (an extension) replaces the one recorded.

Every message from an accepted device counts as hearing from it
(:class:`receiver.presence.Presence`: last heard, the offline alarm). A
failure to record its footage (our disk full or failing, a damaged
recording: ``error`` ``recording_failed`` or ``corrupt_recording``) is
reported there too, until an fsync makes its footage durable again.
Revocation: the district's revocation list (``DATA/revocations.json``) is
read at every hello with a certificate, and :meth:`IngestServer.check_revocations`
re-reads it when the file changed (the receiver calls it every few seconds and
after every hello). A connected device whose enrollment the newest list
revokes is sent ``error`` ``revoked`` and its uplink is closed, the same way a
refused handshake closes: what it sent is recorded and acked data stays
durable; unacked data stays with the device. Devices accepted by the
allow-list (no certificate) are not subject to revocation lists, as at hello.

What a device says of a session is held to its certificate
(:func:`receiver.device_trust.certify_open`): a session of a certified device is
recorded, shown and told to the listeners (the district's webhook) with the
certificate's building and camera zones; what it claimed otherwise is logged as a
warning and kept in the session's ``meta["mismatches"]``, never a reason to refuse an
emergency. A share carrying a camera the certificate does not list as exterior is
refused (``error`` ``zone_forbidden``). ``meta["certified"]`` says which it was: false
for a device accepted by the allow-list, whose building and zones are its own word.

What one device may send is bounded (:class:`UplinkLimits`): heartbeats,
``session_open`` and other control messages each at a rate (beyond it:
``error`` ``rate_limited``, one log line, the uplink closes), what it leaves
unread (``too_slow``), and how many uplinks may be in their handshake at once
(503 ``busy``). Media are held back by TCP, not rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import protocol as p
from agent.connection_slots import address_group
from provisioning.age_keys import recipient_of
from provisioning.enrollment import Enrollment, Revocations
from provisioning.errors import KeyFileError
from provisioning.keys import load_public_key, verify
from receiver.audit_copy import AuditCopies
from receiver.camera_ingest import CameraIngest
from receiver.custody import CustodyLog, DeviceKey
from receiver.device_clock import DeviceClocks, plausible
from receiver.device_trust import DeviceTrust, certify_open
from receiver.errors import CorruptRecordingError, ReceiverError
from receiver.limits import LogThrottle, Rate, TokenBucket
from receiver.presence import Presence
from receiver.recording import RecordingStore, SessionRecording, TrackInfo

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
HEARTBEAT_S = 5.0
#: A device's open session this old may be closed as abandoned to make room for a new one;
#: and one whose device has been silent this long is closed as abandoned.
ABANDONED_AFTER_S = 24 * 3600.0
#: A device is told the access log's head at most this often (each telling becomes an
#: entry of its audit trail), and only when the log grew.
ACCESS_HEAD_EVERY_S = 60.0
#: A connection reading a burst (buffered messages never suspend a read) lets the rest of
#: the loop run at least this often: the fsyncs and acks, and the other connections.
YIELD_EVERY_S = 0.002
#: How long sending ``error`` and closing may take before the connection is dropped.
ERROR_SEND_S = 5.0
_HEARTBEATS = Rate(per_s=1.0, burst=10)
_OPENS = Rate(per_s=2.0, burst=64)
_CONTROL = Rate(per_s=500.0, burst=2000)


@dataclass(frozen=True, slots=True)
class UplinkLimits:
    """What one device's uplink may send and leave unread before it is cut.

    A device over a rate gets ``error`` ``rate_limited`` and its uplink closes
    (one log line); one that leaves more than ``max_unsent_bytes`` of the
    receiver's messages unread (acks, heartbeats) gets ``too_slow``. Media have
    no rate: an agent catching up after an outage sends far faster than its
    cameras, and TCP's backpressure bounds what a device costs (the receiver
    reads a message only when it has room for it, and yields after each one).
    Uplinks still in their handshake are bounded too (each may send a message of
    up to 16 MiB before it is parsed): beyond them ``GET /v1/uplink`` answers 503
    ``busy``.
    """

    #: The agent sends one every few seconds.
    heartbeats: Rate = _HEARTBEATS
    #: Each ``session_open`` opens (or reopens) a recording on disk.
    opens: Rate = _OPENS
    #: Every other control message (chain checkpoints come about once a second per
    #: camera live, and much faster when a device catches up).
    control: Rate = _CONTROL
    max_unsent_bytes: int = 1024 * 1024
    #: Sessions of one device open at once (live, or owed and not closed yet): each
    #: holds files open; an agent has one emergency and a few owed after an outage.
    max_open_sessions: int = 64
    max_handshakes: int = 32
    #: Per address group: an IPv4 address, an IPv6 /64
    #: (:func:`agent.connection_slots.address_group`).
    max_handshakes_per_address: int = 4


class _Budget:
    """One connection's token buckets (the caller passes the time in)."""

    def __init__(self, limits: UplinkLimits, now: float) -> None:
        self.heartbeats = TokenBucket(limits.heartbeats, now)
        self.opens = TokenBucket(limits.opens, now)
        self.control = TokenBucket(limits.control, now)

    def admit(self, event: p.Event, now: float) -> None:
        """Raise ``rate_limited`` if ``event`` is one too many of its kind."""
        if isinstance(event, p.Media):
            return
        if isinstance(event, p.Heartbeat):
            bucket, what = self.heartbeats, "heartbeats"
        elif isinstance(event, p.SessionOpen):
            bucket, what = self.opens, "session_open messages"
        else:
            bucket, what = self.control, "control messages"
        if not bucket.take(now):
            rate = bucket.rate
            raise p.RemoteProtocolError(
                "rate_limited", f"{what} faster than {rate.per_s:g}/s (burst {rate.burst})"
            )


class AllowList:
    """Device public keys trusted by this receiver: ``DIR/<device-id>.pub``.

    Read on every handshake (a few small files), so adding or removing a
    device takes effect without a restart.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def key(self, device_id: str) -> Ed25519PublicKey | None:
        """The device's public key, or ``None`` if it is not allowed."""
        if not device_id.replace("-", "").replace("_", "").isalnum() or len(device_id) > 64:
            return None
        path = self.directory / f"{device_id}.pub"
        try:
            return load_public_key(path)
        except KeyFileError:
            return None


@dataclass(slots=True)
class DeviceStatus:
    """What the receiver knows of one device's connection."""

    device: str
    connected: bool = False
    last_seen: float = 0.0


class IngestServer:
    """Holds the recordings and device status; handles ``/v1/uplink``."""

    def __init__(
        self,
        store: RecordingStore,
        allow: AllowList,
        origins: list[str],
        identities: list[Any] | None = None,
        audits: AuditCopies | None = None,
        trust: DeviceTrust | None = None,
        presence: Presence | None = None,
        limits: UplinkLimits | None = None,
        clocks: DeviceClocks | None = None,
    ) -> None:
        self.store = store
        #: Each connected device's clock as its heartbeats tell it (and each open session's).
        self.clocks = clocks if clocks is not None else DeviceClocks()
        #: What one device may send (rates, unread bytes, handshakes at once).
        self.limits = limits or UplinkLimits()
        #: Uplinks in their handshake now, per client address.
        self._handshaking: Counter[str] = Counter()
        self._throttle = LogThrottle(log)
        #: Last heard and offline alarm per device.
        self.presence = presence if presence is not None else Presence()
        #: The district authority's enrollments (``None``: the allow-list only).
        self.trust = trust
        #: This receiver's TLS pin: an enrollment must name it.
        self.fingerprint = ""
        #: Copies of the devices' audit trails (``None``: not kept).
        self.audits = audits
        self.allow = allow
        self.origins = origins
        #: age identities (pyrage X25519) that open the devices' sealed segments.
        self.identities: list[Any] = list(identities or [])
        self.devices: dict[str, DeviceStatus] = {}
        self.refused: dict[str, int] = {}
        #: Chain checkpoints refused, by reason code.
        self.chain_refused: dict[str, int] = {}
        #: Each session's custody log (one per session folder, shared by connections).
        self._custody: dict[Path, CustodyLog] = {}
        self._connections: dict[str, web.WebSocketResponse] = {}
        self._uplinks: dict[str, p.Uplink] = {}
        #: Uplinks being closed for a revocation (two checks may overlap: one drop each).
        self._dropping: set[web.WebSocketResponse] = set()
        #: The verified enrollment of each connected device that presented one.
        self._enrollments: dict[str, Enrollment] = {}
        #: Told of every session opened or closed on an uplink (the district's webhook):
        #: ``(device, event)``; an open after a reconnect (a resume) is told again.
        self.session_listeners: list[Callable[[str, p.SessionOpen | p.SessionClose], None]] = []
        #: The revocation list whose devices were last forgotten by ``presence``.
        self._applied: Revocations | None = None
        self._trigger_results: dict[str, asyncio.Future[p.TriggerResult]] = {}
        #: The access log's durable head ``(n, hash)``, told to every device to anchor in
        #: its signed audit trail (``None``: no access log).
        self.access_head: Callable[[], tuple[int, str]] | None = None

    async def push_trigger(
        self, device: str, envelope: dict[str, Any], *, timeout_s: float = 10.0
    ) -> p.TriggerResult:
        """Push a signed trigger to a connected device; its answer (as its Local API's).

        Raises ``LookupError`` when the device is not connected and ``TimeoutError``
        when it does not answer in time (the trigger may still have taken effect).
        """
        ws, conn = self._connections.get(device), self._uplinks.get(device)
        if ws is None or conn is None or ws.closed:
            raise LookupError(f"device {device} is not connected")
        ref = secrets.token_urlsafe(12)
        answer: asyncio.Future[p.TriggerResult] = asyncio.get_running_loop().create_future()
        self._trigger_results[ref] = answer
        try:
            async with asyncio.timeout(timeout_s):  # the send too: a device that does not read
                try:
                    await ws.send_str(str(conn.send(p.Trigger(envelope, ref))))
                except (ConnectionError, RuntimeError) as exc:  # its connection is going
                    raise LookupError(f"device {device} is not connected: {exc}") from exc
                return await answer
        finally:
            self._trigger_results.pop(ref, None)

    def _refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def _busy(self, peer: str, group: str) -> web.Response | None:
        """503 ``busy`` if ``peer`` (of address ``group``) may not start one more handshake."""
        limits, busy = self.limits, self._handshaking
        if busy[group] < limits.max_handshakes_per_address and busy.total() < limits.max_handshakes:
            return None
        self._refuse("busy")
        self._throttle.log(
            logging.WARNING, ("busy", peer),
            "uplink from %s refused: too many handshakes in progress", peer,
        )  # fmt: skip
        body = {"error": "busy", "detail": "too many uplink handshakes in progress; retry"}
        return web.json_response(body, status=503, headers={"Retry-After": "5"})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler of ``GET /v1/uplink``."""
        peer = request.remote or "?"
        # Counted per address group (an IPv6 /64), as the connection slots count: one
        # host's prefix holds 2^64 addresses.
        group = address_group(request.remote or "")
        busy = self._busy(peer, group)
        if busy is not None:
            return busy
        self._handshaking[group] += 1
        try:
            ws = web.WebSocketResponse(
                max_msg_size=p.MEDIA_HEADER.size + p.MAX_PAYLOAD_BYTES, autoping=True
            )
            await ws.prepare(request)
            conn = p.Uplink(p.Role.RECEIVER)
            try:
                features = request.headers.get(p.FEATURES_HEADER, "")[:256]
                device, enrollment, device_key = await self._handshake(ws, conn, features)
            except (p.ProtocolError, TimeoutError, ConnectionError) as exc:
                code = exc.code if isinstance(exc, p.ProtocolError) else "handshake_failed"
                if isinstance(exc, TimeoutError):  # str() of it is empty
                    why = f"no hello within {HANDSHAKE_TIMEOUT_S:g} s of the challenge"
                else:
                    why = str(exc) or type(exc).__name__
                self._refuse(code)
                log.warning("uplink from %s refused: %s", peer, why)
                await self._send_error(ws, conn, code, why)
                await self.check_revocations()  # the hello may have read a newer list
                return ws
        finally:
            self._handshaking[group] -= 1
            if self._handshaking[group] <= 0:
                del self._handshaking[group]
        old = self._connections.get(device)
        if old is not None:
            await old.close(
                code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"replaced by a new connection"
            )
        self._connections[device] = ws
        self._uplinks[device] = conn
        if enrollment is not None:
            self._enrollments[device] = enrollment
        else:
            self._enrollments.pop(device, None)
        self.clocks.connected(device)  # measured again on this connection
        status = self.devices.setdefault(device, DeviceStatus(device))
        status.connected, status.last_seen = True, time.time()
        self.presence.connected(device, building=enrollment.building if enrollment else None)
        log.info("device %s connected from %s", device, peer)
        # A newer list read by this hello (or by one racing with it) drops whoever it revokes.
        await self.check_revocations()
        try:
            await self._serve(ws, conn, device, status, device_key, enrollment, request.transport)
        except p.ProtocolError as exc:
            log.warning("device %s broke the protocol: %s", device, exc)
            await self._send_error(ws, conn, exc.code, exc.detail)
        except ReceiverError as exc:
            log.error("device %s: cannot record: %s", device, exc)
            # A damaged recording says so (the device keeps its footage and retries later);
            # everything else of ours is a failed recording.
            code = exc.code if isinstance(exc, CorruptRecordingError) else "recording_failed"
            self.presence.recording_failed(device, f"{code}: {exc}")
            await self._send_error(ws, conn, code, str(exc))
        except ConnectionError:
            raise
        except OSError as exc:  # our disk (full, failing), from wherever it was not mapped
            log.error("device %s: cannot record: %r", device, exc)
            self.presence.recording_failed(device, f"recording_failed: {exc!r}")
            await self._send_error(ws, conn, "recording_failed", repr(exc))
        finally:
            if self._connections.get(device) is ws:
                del self._connections[device]
                self._uplinks.pop(device, None)
                self._enrollments.pop(device, None)
                self.clocks.disconnected(device)
                status.connected = False
                self.presence.disconnected(device)
        return ws

    async def check_revocations(self) -> None:
        """Re-read the revocation list if its file changed; drop the devices it revokes.

        Each connected device whose enrollment the newest list revokes gets
        ``error`` ``revoked`` and its uplink closes (logged); revoked devices
        are no longer watched for the offline alarm. An older list never
        replaces a newer one (:class:`DeviceTrust`).
        """
        if self.trust is None:
            return
        try:
            revocations = await asyncio.to_thread(self.trust.refresh)
        except OSError as exc:
            log.error("revocation list not re-read: %s", exc)
            return
        if revocations is None:
            return
        why = f"revoked (list v{revocations.version})"
        if revocations is not self._applied:
            self._applied = revocations
            # Connected ones are dropped below, or stay (allow-listed: no certificate to revoke).
            self.presence.forget(
                [d for d in revocations.devices if d not in self._connections], why
            )
        drops = []
        for device, enrollment in list(self._enrollments.items()):
            ws, conn = self._connections.get(device), self._uplinks.get(device)
            if ws is None or conn is None or ws.closed or ws in self._dropping:
                continue
            if not revocations.revoked(enrollment):
                continue
            log.warning(
                "device %s is revoked (revocation list v%d): closing its uplink",
                device,
                revocations.version,
            )
            self._refuse("revoked")
            self.presence.forget([device], why)
            self._dropping.add(ws)
            drops.append(self._drop(ws, conn, device))
        await asyncio.gather(*drops)

    async def _drop(self, ws: web.WebSocketResponse, conn: p.Uplink, device: str) -> None:
        try:
            await self._send_error(ws, conn, "revoked", f"device {device} is revoked")
        finally:
            self._dropping.discard(ws)

    @property
    def enrollments(self) -> Mapping[str, Enrollment]:
        """The enrollment each connected device's connection was accepted with (a device
        accepted by the allow-list is not in it)."""
        return MappingProxyType(self._enrollments)

    async def close_all(self) -> None:
        """Close every device's uplink (the receiver shuts down): each with ``going away``
        (1001), so its handler records what came and ends, and the device connects again
        later. Not closing them held the shutdown for aiohttp's whole ``shutdown_timeout``,
        then cancelled the handlers mid-recording."""
        sockets = [ws for ws in self._connections.values() if not ws.closed]
        await asyncio.gather(
            *(_close_within(ws, aiohttp.WSCloseCode.GOING_AWAY, b"receiver shutting down")
              for ws in sockets),
        )  # fmt: skip

    async def close_abandoned(self) -> list[str]:
        """Close (``abandoned``) every open session whose device is not connected and has
        been silent for :data:`ABANDONED_AFTER_S`, counted from the session's opening at
        the earliest; the ids closed.

        Its emergency ended on the device long before (an hour, unless extended), but a
        device that never came back (destroyed, reflashed, replaced) left it open here:
        on the police dashboard as an emergency under way, for good. One that does come
        back with it opens it again (a closed session resumes) and closes it itself.
        """
        if self.presence is None:
            return []
        now, closed = self.clocks.clock(), []
        for session in self.store.open_sessions():
            device = self.presence.devices.get(session.device_id)
            if device is not None and device.connected:
                continue
            heard = max(session.opened_at, 0.0 if device is None else device.last_heard)
            if now - heard < ABANDONED_AFTER_S:
                continue
            days = (now - heard) / 86400
            await self._abandon(session, "its device has been silent for over a day",
                                f"its device silent {days:.1f} days")  # fmt: skip
            closed.append(session.session_id)
        return closed

    async def _abandon(self, session: SessionRecording, why: str, detail: str) -> None:
        """Close ``session`` as abandoned (``why`` in its reason, ``detail`` in the log);
        the district is told. Its device may open it again (a closed session resumes)."""
        reason = f"abandoned: {why}"
        await session.close(reason)
        log.warning(
            "session %s of %s closed as abandoned (%s)",
            session.session_id, session.device_id, detail,
        )  # fmt: skip
        self._tell(session.device_id, p.SessionClose(session.session_id, reason))

    async def watch_abandoned(self, every_s: float) -> None:
        """:meth:`close_abandoned` every ``every_s`` seconds, until cancelled."""
        while True:
            try:
                await self.close_abandoned()
            except (ReceiverError, OSError) as exc:  # one that cannot close now: next round
                log.error("closing abandoned sessions failed: %s", exc)
            await asyncio.sleep(every_s)

    async def watch_revocations(self, every_s: float) -> None:
        """:meth:`check_revocations` every ``every_s`` seconds, until cancelled."""
        while True:
            await self.check_revocations()
            await asyncio.sleep(every_s)

    async def _send_error(
        self, ws: web.WebSocketResponse, conn: p.Uplink, code: str, detail: str
    ) -> None:
        # Bounded: a peer that reads nothing would hold the send and the close forever
        # (cancelled, aiohttp closes the transport; TLS gives up after tls_shutdown_s).
        try:
            async with asyncio.timeout(ERROR_SEND_S):
                with contextlib.suppress(ConnectionError, RuntimeError, p.ProtocolError):
                    await ws.send_str(str(conn.send(p.Error(code, detail[:512]))))
                await ws.close(
                    code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=code.encode()[:120]
                )
        except TimeoutError:
            log.info("uplink closed without its error %s being read", code)

    def _check_reading(self, transport: asyncio.Transport | None) -> None:
        """Raise ``too_slow`` if the device leaves too much of what we send unread."""
        if transport is None or transport.is_closing():
            return  # the loop ends at its next receive
        unsent = transport.get_write_buffer_size()
        if unsent > self.limits.max_unsent_bytes:
            raise p.RemoteProtocolError(
                "too_slow", f"{unsent} bytes of acks and heartbeats left unread"
            )

    async def _beat(
        self, ws: web.WebSocketResponse, conn: p.Uplink, transport: asyncio.Transport | None
    ) -> None:
        self._check_reading(transport)
        await _send_within(ws, conn, p.Heartbeat(time.time()))

    async def _tell_access_head(
        self, ws: web.WebSocketResponse, conn: p.Uplink, told: tuple[int, float]
    ) -> tuple[int, float]:
        """Tell the device the access log's head if it grew, at most every
        :data:`ACCESS_HEAD_EVERY_S`; returns what was last told, and when."""
        if self.access_head is None:
            return told
        n, digest = self.access_head()
        now = time.monotonic()
        if n <= told[0] or now - told[1] < ACCESS_HEAD_EVERY_S:
            return told
        await _send_within(ws, conn, p.AccessHead(n, digest))
        return n, now

    async def _receive(
        self, ws: web.WebSocketResponse, conn: p.Uplink, within: float | None
    ) -> p.Event | None:
        return _event(ws, conn, await ws.receive(timeout=within))

    async def _handshake(
        self, ws: web.WebSocketResponse, conn: p.Uplink, features: str = ""
    ) -> tuple[str, Enrollment | None, DeviceKey]:
        """The device id, its verified enrollment if it presented one, and its key;
        ``features``: the optional fields the device takes (its upgrade request's)."""
        nonce = p.b64url(secrets.token_bytes(32))
        await ws.send_str(str(conn.send(p.Challenge(nonce))))
        event = await self._receive(ws, conn, HANDSHAKE_TIMEOUT_S)
        if not isinstance(event, p.Hello):
            raise p.RemoteProtocolError("unexpected", "expected hello")
        enrollment: Enrollment | None = None
        if event.enrollment is not None and self.trust is not None:
            enrollment = await asyncio.to_thread(
                self.trust.check,
                event.device,
                event.enrollment,
                now=time.time(),
                own_pin=self.fingerprint,
            )
            key: Ed25519PublicKey | None = enrollment.device_key
        else:
            key = self.allow.key(event.device)
        if key is None:
            raise p.RemoteProtocolError(
                "unknown_device", f"device {event.device!r} is not enrolled here"
            )
        sig = p.unb64url(event.sig, what="hello.sig")
        if not any(
            verify(key, sig, p.hello_signed_bytes(nonce, origin)) for origin in self.origins
        ):
            raise p.RemoteProtocolError("bad_signature", "hello signature does not verify")
        acked = {
            s.session_id: s.durable_by_camera()
            for s in self.store.open_sessions()
            if s.device_id == event.device
        }
        audit_n = 0
        if self.audits is not None:
            audit_n = await asyncio.to_thread(self.audits.last_n, event.device)
        recipients = self.welcome_recipients(features)
        await ws.send_str(str(conn.send(p.Welcome(acked, HEARTBEAT_S, audit_n, recipients))))
        cert = None if enrollment is None else enrollment.envelope
        return event.device, enrollment, DeviceKey(event.device, key, cert)

    def welcome_recipients(self, features: str) -> tuple[str, ...]:
        """What a welcome names of the identities that open sealed segments here (the
        device checks that its store seals to one of them): their recipients, if the
        device's upgrade request named the field among its ``features``
        (:data:`agent.protocol.FEATURES_HEADER`); none for an agent from before it,
        whose decoder would refuse the welcome."""
        if p.WELCOME_RECIPIENTS not in (f.strip() for f in features.split(",")):
            return ()
        return tuple(recipient_of(identity) for identity in self.identities)

    def custody(self, session_dir: Path) -> CustodyLog:
        """The custody log of a session's recording (one per folder)."""
        found = self._custody.get(session_dir)
        if found is None:
            found = self._custody[session_dir] = CustodyLog(session_dir)
        return found

    def _chain_refused(self, code: str) -> None:
        self.chain_refused[code] = self.chain_refused.get(code, 0) + 1

    async def _serve(
        self,
        ws: web.WebSocketResponse,
        conn: p.Uplink,
        device: str,
        status: DeviceStatus,
        device_key: DeviceKey,
        enrollment: Enrollment | None,
        transport: asyncio.Transport | None,
    ) -> None:
        cameras: list[CameraIngest] = []
        pending: set[asyncio.Future[None]] = set()
        budget = _Budget(self.limits, time.monotonic())
        loop = asyncio.get_running_loop()
        yielded = loop.time()

        def send(event: p.Ack | p.ChainAck | p.Heartbeat | p.AuditAck) -> None:
            if not ws.closed:
                task = asyncio.ensure_future(ws.send_str(str(conn.send(event))))
                pending.add(task)
                task.add_done_callback(pending.discard)
                task.add_done_callback(_ignore_closed)

        def fail(exc: BaseException) -> None:
            # A camera's worker or flusher failed (our disk, or the device's bitstream):
            # end the connection as a failure in the loop itself would.
            if ws.closed or any(not f.done() for f in failing):
                return
            log.error("device %s: cannot record: %s", device, exc)
            self.presence.recording_failed(device, f"recording_failed: {exc}")
            failing.append(
                asyncio.ensure_future(self._send_error(ws, conn, "recording_failed", str(exc)))
            )

        def recorded() -> None:
            self.presence.recording_works(device)

        async def keepalive() -> None:
            # Heartbeats, and the end of a device gone quiet or not reading what we send,
            # on a task of their own: a timeout around every receive cost a tenth of the
            # loop at full rate. Its error closes the socket; the loop then ends.
            told = (0, -math.inf)  # the access-log head last told, and when
            while not ws.closed:
                await asyncio.sleep(HEARTBEAT_S)
                try:
                    if time.time() - status.last_seen > 3 * HEARTBEAT_S:
                        raise p.RemoteProtocolError("timeout", "nothing heard for three heartbeats")
                    await self._beat(ws, conn, transport)
                    told = await self._tell_access_head(ws, conn, told)
                except p.ProtocolError as exc:
                    if not ws.closed:
                        log.warning("device %s broke the protocol: %s", device, exc)
                        await self._send_error(ws, conn, exc.code, exc.detail)
                    return
                except (ConnectionError, RuntimeError):
                    return  # the connection is going; the loop ends with it

        failing: list[asyncio.Future[None]] = []
        beats = asyncio.create_task(keepalive(), name=f"keepalive {device}")
        try:
            while True:
                msg = await ws.receive()  # not through _receive: a coroutine less per frame
                if msg.type is aiohttp.WSMsgType.BINARY:
                    event: p.Event | None = conn.receive(msg.data)
                else:
                    event = _event(ws, conn, msg)
                if event is None:
                    break
                if type(event) is p.Media:  # the hot path
                    cam = cameras[event.camera]
                    cam.media(event)
                    if not cam.has_room:  # segments pile up faster than they open
                        await cam.room()
                    # A burst (the pre-roll) arrives already buffered, and reading it never
                    # suspends: yield so the fsyncs and acks run beside the recording, not
                    # after. Every few ms, not per frame (a loop round per frame cost as
                    # much as recording it); so is the bookkeeping of what was heard.
                    if loop.time() - yielded > YIELD_EVERY_S:
                        self._check_reading(transport)
                        status.last_seen = time.time()
                        self.presence.heard(device)
                        await asyncio.sleep(0)
                        yielded = loop.time()
                    continue
                budget.admit(event, time.monotonic())
                self._check_reading(transport)
                status.last_seen = time.time()
                self.presence.heard(device)
                await asyncio.sleep(0)  # a burst of control messages never suspends either
                if isinstance(event, p.Heartbeat):
                    if self._connections.get(device) is ws:  # not one replaced meanwhile
                        self.clocks.heard(device, event.t)
                elif isinstance(event, p.Gap):
                    cameras[event.camera].gap(event)
                elif isinstance(event, p.Chain):
                    cameras[event.camera].checkpoint(event)
                elif isinstance(event, p.SessionOpen):
                    for cam in cameras:
                        await cam.settle()
                    await self._make_room(device, event.session)
                    # The certificate's building and zones from here on (a share with a
                    # camera not certified exterior is refused: zone_forbidden).
                    event, mismatches = certify_open(enrollment, event)
                    session = await self._open(device, event, enrollment, mismatches)
                    self.presence.session(device, event.session, building=event.building)
                    self.clocks.session_opened(device, event.session, event.expires_at)
                    self._tell(device, event)
                    cameras = [
                        CameraIngest(
                            device,
                            event.session,
                            c,
                            session.camera(c.id),
                            send,
                            self.identities,
                            fail,
                            custody=self.custody(session.directory),
                            device_key=device_key,
                            on_refused=self._chain_refused,
                            on_recorded=recorded,
                        )
                        for c in event.cameras
                    ]
                    for cam in cameras:  # tell a resuming agent what is already safe
                        cam.ack()
                elif isinstance(event, p.SessionClose):
                    await self._close(device, event, cameras)
                    cameras = []
                    self.presence.session(device, None)
                    self.clocks.session_closed(event.session)
                    self._tell(device, event)
                elif isinstance(event, p.AuditEntries):
                    if self.audits is not None:
                        held = await asyncio.to_thread(
                            self.audits.append, device, event.first, event.lines
                        )
                        send(p.AuditAck(held))
                elif isinstance(event, p.TriggerResult):
                    answer = self._trigger_results.get(event.ref)
                    if answer is not None and not answer.done():
                        answer.set_result(event)
                elif isinstance(event, p.Error):  # the device closes after it (DESIGN.md)
                    log.warning("device %s reports %s: %s", device, event.code, event.detail)
                    break
            for cam in cameras:  # the device went away: record what it sent
                await cam.settle()
        except BaseException:
            await asyncio.gather(*(cam.stop() for cam in cameras))
            raise
        finally:
            beats.cancel()
            await asyncio.gather(beats, *failing, return_exceptions=True)

    async def _make_room(self, device: str, opening: str) -> None:
        """Raise ``too_many_sessions`` if ``device`` may not open one more session.

        At the limit, the device's oldest session opened over :data:`ABANDONED_AFTER_S`
        ago is closed first (``abandoned``): a device whose state was lost (reflashed, its
        owed sessions set aside) never closes what it had open, and 64 such sessions
        refused its next emergency. A device that does come back with it opens it again
        (a closed session resumes) and closes it itself."""
        mine = sorted(
            (s for s in self.store.open_sessions() if s.device_id == device),
            key=lambda s: s.opened_at,
        )
        held = [s for s in mine if s.session_id != opening]
        if len(held) < self.limits.max_open_sessions:
            return
        now = self.clocks.clock()
        stale = [s for s in held if now - s.opened_at > ABANDONED_AFTER_S]
        if not stale:
            raise p.RemoteProtocolError(
                "too_many_sessions",
                f"{len(held)} sessions of this device are open; close one first",
            )
        oldest = stale[0]
        days = (now - oldest.opened_at) / 86400
        await self._abandon(oldest, "its device opened another at the limit of open sessions",
                            f"opened {days:.1f} days ago")  # fmt: skip

    def _tell(self, device: str, event: p.SessionOpen | p.SessionClose) -> None:
        for listener in self.session_listeners:
            try:
                listener(device, event)
            except Exception:  # a listener's bug must not cut the device off
                log.exception("session listener failed on %s of %s", event.session, device)

    async def _close(self, device: str, event: p.SessionClose, cameras: list[CameraIngest]) -> None:
        if not cameras:
            return
        for cam in cameras:
            await cam.settle()
        session = self.store.get(event.session)
        await session.close(event.reason)
        for cam in cameras:
            cam.ack()  # the last frame of every run is durable now
        # A closed session's custody log is let go (one per session held for the
        # receiver's lifetime grew by a session an hour with a share); a checkpoint that
        # comes later opens it again from its files.
        if (custody := self._custody.pop(session.directory, None)) is not None:
            custody.forget()
        log.warning("session %s of %s closed: %s", event.session, device, event.reason)

    async def _open(
        self,
        device: str,
        event: p.SessionOpen,
        enrollment: Enrollment | None,
        mismatches: list[dict[str, str | None]],
    ) -> SessionRecording:
        """Open (or resume) the session's recording. ``event`` has the certificate's
        building and zones already; ``mismatches`` is what the device claimed otherwise."""
        meta: dict[str, object] = {
            "building": event.building,
            "certified": enrollment is not None,
            "started_by": dict(event.started_by),
            "started_at": event.started_at,
            "expires_at": event.expires_at,
        }
        if mismatches:
            meta["mismatches"] = mismatches
            log.warning(
                "device %s claims in session %s what its enrollment certificate (v%d) does "
                "not say; recorded as certified: %s",
                device, event.session, enrollment.version if enrollment else 0,
                "; ".join(
                    f"{m['field']} claimed {m['claimed']!r}, certified "
                    + ("(not listed)" if m["certified"] is None else repr(m["certified"]))
                    for m in mismatches
                ),
            )  # fmt: skip
        known = next((s for s in self.store.open_sessions() if s.session_id == event.session), None)
        if known is not None:
            log.info("session %s of %s opened again (resume or end)", event.session, device)
            expires = event.expires_at
            if (
                known.device_id == device
                and plausible(expires)
                and known.meta.get("expires_at") != expires
            ):
                # Extended: the device opens it again with its new expiry (on its clock).
                # The open below saves it; the rest of what the device said first stands.
                log.info(
                    "session %s of %s now expires at %.0f (device clock)",
                    event.session, device, event.expires_at,
                )  # fmt: skip
                known.meta["expires_at"] = event.expires_at
            if known.device_id == device and mismatches:
                # Kept with the rest of what the device said (a camera that joined late).
                held = known.meta.get("mismatches")
                listed = list(held) if isinstance(held, list) else []
                listed += [m for m in mismatches if m not in listed]
                known.meta["mismatches"] = listed
        elif event.started_by.get("kind") == "share":
            log.info(
                "exterior share %s from %s (building %s)", event.session, device, event.building
            )
        else:
            log.warning(
                "EMERGENCY session %s from %s (building %s)", event.session, device, event.building
            )
        tracks = [
            TrackInfo(
                c.id,
                c.zone,
                c.codec,
                c.width,
                c.height,
                c.fps,
                c.extradata,
                c.first_seq,
                c.live_seq,
            )
            for c in event.cameras
        ]
        return await self.store.open_session(event.session, device, meta, tracks)


def _event(ws: web.WebSocketResponse, conn: p.Uplink, msg: aiohttp.WSMessage) -> p.Event | None:
    """The protocol event of a WebSocket message (None: the socket closed)."""
    if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
        return conn.receive(msg.data)
    if msg.type is aiohttp.WSMsgType.ERROR:
        raise p.RemoteProtocolError("transport", f"websocket error: {ws.exception()}")
    return None  # closed


async def _close_within(ws: web.WebSocketResponse, code: int, message: bytes) -> None:
    """Close ``ws``; a peer that does not answer the close in a heartbeat is cut."""
    with contextlib.suppress(ConnectionError, RuntimeError):
        try:
            async with asyncio.timeout(HEARTBEAT_S):
                await ws.close(code=code, message=message)
        except TimeoutError:
            log.warning("an uplink did not answer its close in %.0f s: cut", HEARTBEAT_S)


def _ignore_closed(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("ack not sent: %s", task.exception())


async def _send_within(
    ws: web.WebSocketResponse, conn: p.Uplink, event: p.Heartbeat | p.AccessHead
) -> None:
    """Send a keepalive message; a device that does not take it in a heartbeat is too slow."""
    try:
        async with asyncio.timeout(HEARTBEAT_S):
            await ws.send_str(str(conn.send(event)))
    except TimeoutError:
        what = type(event).__name__
        raise p.RemoteProtocolError("too_slow", f"{what} could not be sent in time") from None
