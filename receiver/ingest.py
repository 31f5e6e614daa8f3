"""The uplink endpoint: authenticate devices, record their sessions, ack durably.

One WebSocket per device at ``/v1/uplink``. The receiver speaks first with a
random challenge; the device answers with its id and an Ed25519 signature
over ``nonce || origin``. Until enrollment certificates exist, a device is
trusted when its public key is on the allow-list (``DATA/devices/<id>.pub``).

Media go straight into the session's :class:`CameraRecording` (remux only).
Acks are sent per camera only after an fsync covers the packet (group commit:
one fsync in flight per camera, the next one covers all that arrived
meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import protocol as p
from provisioning.errors import KeyFileError
from provisioning.keys import load_public_key, verify
from receiver.errors import ReceiverError, SequenceGapError
from receiver.recording import CameraRecording, RecordingStore, SessionRecording, TrackInfo

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
HEARTBEAT_S = 5.0


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
    sessions: list[str] = field(default_factory=list)


class _CameraIngest:
    """One camera of one session on one connection: route, fsync, ack.

    Seqs below the camera's ``live_seq`` are older pre-roll and go to its own
    recording, so live footage is remuxed and made durable without waiting
    for the pre-roll burst. The ack is cumulative over both: the pre-roll's
    durable seq until it is complete, then the live one.
    """

    def __init__(
        self,
        session_id: str,
        desc: p.CameraDesc,
        live: CameraRecording,
        preroll: CameraRecording | None,
        send_ack: Callable[[str, int, int], None],
    ) -> None:
        self.session_id = session_id
        self.index = desc.index
        self.live_seq = desc.live_seq
        self.live = live
        self.preroll = preroll
        self._send_ack = send_ack
        self._flusher: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.acked = self.durable_seq

    @property
    def durable_seq(self) -> int:
        """Every seq of this camera up to this one is durable."""
        if self.preroll is not None and self.preroll.durable_seq < self.live_seq - 1:
            return self.preroll.durable_seq
        return self.live.durable_seq

    def append(self, media: p.Media) -> None:
        if media.seq >= self.live_seq:
            self.live.append(
                media.seq, media.capture_us, media.keyframe, media.preroll, media.payload
            )
        elif self.preroll is not None and self.preroll.writable:
            self.preroll.append(media.seq, media.capture_us, media.keyframe, True, media.payload)
            if media.seq == self.live_seq - 1:  # the pre-roll is whole: finish its file
                self._closing = asyncio.create_task(self.preroll.close(), name="close-preroll")
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"flush-{self.live.camera_id}")

    def _unflushed(self) -> bool:
        return self.live.has_unflushed or (self.preroll is not None and self.preroll.has_unflushed)

    async def _flush(self) -> None:
        while True:
            if self._closing is not None:
                await self._closing
            await asyncio.gather(
                self.live.flush(), *([self.preroll.flush()] if self.preroll is not None else [])
            )
            durable = self.durable_seq
            if durable > self.acked:
                self.acked = durable
                self._send_ack(self.session_id, self.index, durable)
            if not self._unflushed():
                return

    async def settle(self) -> None:
        """Wait for the flusher; used before closing."""
        for task in (self._closing, self._flusher):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class IngestServer:
    """Holds the recordings and device status; handles ``/v1/uplink``."""

    def __init__(self, store: RecordingStore, allow: AllowList, origins: list[str]) -> None:
        self.store = store
        self.allow = allow
        self.origins = origins
        self.devices: dict[str, DeviceStatus] = {}
        self.refused: dict[str, int] = {}
        self._connections: dict[str, web.WebSocketResponse] = {}

    def _refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler of ``GET /v1/uplink``."""
        ws = web.WebSocketResponse(
            max_msg_size=p.MEDIA_HEADER.size + p.MAX_PAYLOAD_BYTES, autoping=True
        )
        await ws.prepare(request)
        conn = p.Uplink(p.Role.RECEIVER)
        peer = request.remote or "?"
        try:
            device = await self._handshake(ws, conn)
        except (p.ProtocolError, TimeoutError, ConnectionError) as exc:
            code = exc.code if isinstance(exc, p.ProtocolError) else "handshake_failed"
            self._refuse(code)
            log.warning("uplink from %s refused: %s", peer, exc)
            await self._send_error(ws, conn, code, str(exc))
            return ws
        old = self._connections.get(device)
        if old is not None:
            await old.close(
                code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"replaced by a new connection"
            )
        self._connections[device] = ws
        status = self.devices.setdefault(device, DeviceStatus(device))
        status.connected, status.last_seen = True, time.time()
        log.info("device %s connected from %s", device, peer)
        try:
            await self._serve(ws, conn, device, status)
        except p.ProtocolError as exc:
            log.warning("device %s broke the protocol: %s", device, exc)
            await self._send_error(ws, conn, exc.code, exc.detail)
        except ReceiverError as exc:
            log.error("device %s: cannot record: %s", device, exc)
            await self._send_error(ws, conn, "recording_failed", str(exc))
        finally:
            if self._connections.get(device) is ws:
                del self._connections[device]
                status.connected = False
        return ws

    async def _send_error(
        self, ws: web.WebSocketResponse, conn: p.Uplink, code: str, detail: str
    ) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError, p.ProtocolError):
            await ws.send_str(str(conn.send(p.Error(code, detail[:512]))))
        await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=code.encode()[:120])

    async def _receive(
        self, ws: web.WebSocketResponse, conn: p.Uplink, within: float
    ) -> p.Event | None:
        msg = await ws.receive(timeout=within)
        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return conn.receive(msg.data)
        if msg.type is aiohttp.WSMsgType.ERROR:
            raise p.RemoteProtocolError("transport", f"websocket error: {ws.exception()}")
        return None  # closed

    async def _handshake(self, ws: web.WebSocketResponse, conn: p.Uplink) -> str:
        nonce = p.b64url(secrets.token_bytes(32))
        await ws.send_str(str(conn.send(p.Challenge(nonce))))
        event = await self._receive(ws, conn, HANDSHAKE_TIMEOUT_S)
        if not isinstance(event, p.Hello):
            raise p.RemoteProtocolError("unexpected", "expected hello")
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
        await ws.send_str(str(conn.send(p.Welcome(acked, HEARTBEAT_S))))
        return event.device

    async def _serve(
        self, ws: web.WebSocketResponse, conn: p.Uplink, device: str, status: DeviceStatus
    ) -> None:
        cameras: list[_CameraIngest] = []
        session: SessionRecording | None = None
        next_beat = time.monotonic() + HEARTBEAT_S

        def send_ack(session_id: str, index: int, seq: int) -> None:
            if not ws.closed:
                task = asyncio.ensure_future(
                    ws.send_str(str(conn.send(p.Ack(session_id, index, seq))))
                )
                task.add_done_callback(_ignore_closed)

        while True:
            timeout = max(0.05, next_beat - time.monotonic())
            try:
                event = await self._receive(ws, conn, timeout)
            except TimeoutError:
                if time.time() - status.last_seen > 3 * HEARTBEAT_S:
                    raise p.RemoteProtocolError(
                        "timeout", "nothing heard for three heartbeats"
                    ) from None
                await ws.send_str(str(conn.send(p.Heartbeat(time.time()))))
                next_beat = time.monotonic() + HEARTBEAT_S
                continue
            if event is None:
                break
            status.last_seen = time.time()
            if isinstance(event, p.Media):
                cam = cameras[event.camera]
                try:
                    cam.append(event)
                except SequenceGapError as exc:
                    raise p.RemoteProtocolError("sequence_gap", str(exc)) from exc
                # A burst (the pre-roll) arrives already buffered, and reading it never
                # suspends: yield so the fsyncs and acks run beside the remuxing, not after.
                await asyncio.sleep(0)
            elif isinstance(event, p.SessionOpen):
                session = await self._open(device, event)
                if event.session not in status.sessions:
                    status.sessions.append(event.session)
                cameras = [
                    _CameraIngest(
                        event.session,
                        c,
                        session.camera(c.id),
                        self._preroll(session, c),
                        send_ack,
                    )
                    for c in event.cameras
                ]
                for cam in cameras:  # tell a resuming agent what is already safe
                    if cam.acked >= 0:
                        send_ack(event.session, cam.index, cam.acked)
            elif isinstance(event, p.SessionClose):
                if session is not None:
                    for cam in cameras:
                        await cam.settle()
                    await session.close(event.reason)
                    for cam in cameras:
                        if cam.durable_seq > cam.acked:
                            cam.acked = cam.durable_seq
                            send_ack(event.session, cam.index, cam.acked)
                    log.warning("session %s of %s closed: %s", event.session, device, event.reason)
                session, cameras = None, []
            elif isinstance(event, p.Error):
                log.warning("device %s reports %s: %s", device, event.code, event.detail)

    async def _open(self, device: str, event: p.SessionOpen) -> SessionRecording:
        def track(c: p.CameraDesc, first_seq: int) -> TrackInfo:
            return TrackInfo(
                c.id, c.zone, c.codec, c.width, c.height, c.fps, c.extradata, first_seq
            )

        known = next((s for s in self.store.open_sessions() if s.session_id == event.session), None)
        prerolls = [
            track(c, c.first_seq)
            for c in event.cameras
            if c.first_seq < c.live_seq
            # a pre-roll already whole on disk is not opened again (no empty new part)
            and not (
                known is not None
                and c.id in known.prerolls
                and known.prerolls[c.id].durable_seq >= c.live_seq - 1
            )
        ]
        meta: dict[str, object] = {
            "building": event.building,
            "started_by": dict(event.started_by),
            "started_at": event.started_at,
            "expires_at": event.expires_at,
        }
        log.warning(
            "EMERGENCY session %s from %s (building %s)", event.session, device, event.building
        )
        tracks = [track(c, c.live_seq) for c in event.cameras]
        return await self.store.open_session(event.session, device, meta, tracks, prerolls)

    @staticmethod
    def _preroll(session: SessionRecording, desc: p.CameraDesc) -> CameraRecording | None:
        pre = session.prerolls.get(desc.id)
        if desc.first_seq >= desc.live_seq or pre is None or not pre.writable:
            return None
        return pre


def _ignore_closed(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("ack not sent: %s", task.exception())
