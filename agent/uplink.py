"""The uplink client: one outbound, pinned-TLS WebSocket to the police receiver.

The agent keeps this control connection open while idle (heartbeats), so an
emergency starts streaming with no new handshake, and remote triggers reach a
device behind NAT. Everything sent for a session is kept until the receiver
acknowledged it durable; after a reconnect the agent resumes from the
receiver's last acknowledged sequence numbers (``Welcome.acked``).

The protocol rules live in :mod:`agent.protocol`; this is only the asyncio
shell: connect, handshake, a reader task, a writer task, reconnect with
exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from agent.changes import Changes
from agent.errors import UplinkRefused
from hardware import EncodedPacket
from provisioning.tls import fingerprint_digest

log = logging.getLogger(__name__)

#: Backlog packets a camera may have in flight beyond the receiver's last ack.
BACKLOG_WINDOW = 64

# Codes after which retrying soon is pointless: the receiver does not know us.
FATAL_CODES = frozenset({"unknown_device", "bad_signature"})


@dataclass(slots=True)
class SessionStream:
    """What one session still owes the receiver."""

    open: p.SessionOpen
    #: Per camera index: packets sent or to send, not yet acknowledged, in seq order.
    unacked: list[deque[EncodedPacket]]
    acked: list[int]
    #: Per camera index: the last seq captured before the press (flagged pre-roll).
    preroll_end: list[int]
    close_reason: str | None = None
    close_sent: bool = False
    unacked_bytes: int = 0
    dropped: int = 0
    first_ack_mono_ns: int | None = None

    @property
    def id(self) -> str:
        """Session id."""
        return self.open.session

    def settled(self) -> bool:
        """Closed, the close sent, and every packet acknowledged."""
        return self.close_sent and not any(self.unacked)

    def media(self, camera: int, pkt: EncodedPacket) -> p.Media:
        """The wire event of one packet of this session."""
        return p.Media(
            p.MediaKind.LIVE,
            camera,
            pkt.seq,
            pkt.capture_ns // 1000,
            pkt.keyframe,
            pkt.seq <= self.preroll_end[camera],
            pkt.payload,
        )


@dataclass(slots=True)
class UplinkStats:
    """Counters for status, metrics and benchmarks."""

    connects: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    packets_sent: int = 0
    bytes_sent: int = 0
    last_error: str | None = None


class UplinkClient:
    """Keeps the connection to the receiver and streams sessions over it."""

    def __init__(
        self,
        *,
        url: str,
        origin: str,
        pin: str,
        device_id: str,
        device_key: Ed25519PrivateKey,
        heartbeat_s: float = 5.0,
        reconnect_max_s: float = 10.0,
        unacked_max_bytes: int = 256 * 1024 * 1024,
        on_trigger: Callable[[Mapping[str, Any]], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.origin = origin
        self._fingerprint = aiohttp.Fingerprint(fingerprint_digest(pin))
        self.device_id = device_id
        self._key = device_key
        self.heartbeat_s = heartbeat_s
        self.reconnect_max_s = reconnect_max_s
        self.unacked_max_bytes = unacked_max_bytes
        self._on_trigger = on_trigger
        self._on_change = on_change
        self.streams: deque[SessionStream] = deque()
        self.connected = False
        self.stats = UplinkStats()
        #: What this connection still has to send: the live lane (camera index, packet)
        #: goes first; the backlog per camera (older pre-roll, resends below the live
        #: lane) uses what is left, a window at a time.
        self._live: deque[tuple[int, EncodedPacket]] = deque()
        self._backlog: list[deque[EncodedPacket]] = []
        self._wake = asyncio.Event()
        self._conn: p.Uplink | None = None
        self._opened_on_conn: str | None = None
        self._progress = Changes()

    # -- API for the agent --------------------------------------------------

    def start_session(
        self, open_: p.SessionOpen, preroll: Mapping[int, Iterable[EncodedPacket]]
    ) -> SessionStream:
        """Queue a new session: its ``session_open``, then the pre-roll (oldest first)."""
        cams = range(len(open_.cameras))
        queues = [deque(preroll.get(cam, ())) for cam in cams]
        stream = SessionStream(
            open_,
            queues,
            [c.first_seq - 1 for c in open_.cameras],
            [
                q[-1].seq if q else c.first_seq - 1
                for q, c in zip(queues, open_.cameras, strict=True)
            ],
        )
        stream.unacked_bytes = sum(len(pkt.payload) for q in queues for pkt in q)
        self.streams.append(stream)
        self._wake.set()
        return stream

    def push(self, stream: SessionStream, camera: int, packet: EncodedPacket) -> None:
        """Queue one live packet of an open session."""
        stream.unacked[camera].append(packet)
        stream.unacked_bytes += len(packet.payload)
        if stream is self._head() and self._opened_on_conn == stream.id:
            self._live.append((camera, packet))
        if stream.unacked_bytes > self.unacked_max_bytes:
            self._drop_oldest(stream)
        self._wake.set()

    def end_session(self, session_id: str, reason: str) -> None:
        """Mark a session closed; ``session_close`` follows its last packet."""
        for stream in self.streams:
            if stream.id == session_id and stream.close_reason is None:
                stream.close_reason = reason
        self._wake.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked on every ack and connection change."""
        await self._progress.wait_until(predicate)

    async def wait_settled(self, session_id: str) -> None:
        """Wait until the receiver acknowledged every packet and the close of a session."""
        await self.wait_until(lambda: self.stream(session_id) is None)

    def _remove(self, stream: SessionStream) -> None:
        self.streams.remove(stream)
        self._progress.notify()
        self._wake.set()

    def stream(self, session_id: str) -> SessionStream | None:
        """The stream of a session still owed to the receiver."""
        return next((s for s in self.streams if s.id == session_id), None)

    # -- bookkeeping --------------------------------------------------------

    def _drop_oldest(self, stream: SessionStream) -> None:
        # Memory is the only buffer until the sealed disk store exists: drop the oldest
        # unacknowledged packets rather than exhaust RAM, say so, and declare the hole:
        # the session is opened again with each camera starting at what it still holds
        # (from a keyframe, so it stays decodable), which the receiver records as a gap.
        before = stream.dropped
        while stream.unacked_bytes > self.unacked_max_bytes:
            cam = min(
                (i for i, q in enumerate(stream.unacked) if q),
                key=lambda i: stream.unacked[i][0].mono_ns,
            )
            queue = stream.unacked[cam]
            lost = queue.popleft()
            stream.unacked_bytes -= len(lost.payload)
            stream.dropped += 1
            while queue and not queue[0].keyframe:  # never resume mid-GOP
                lost = queue.popleft()
                stream.unacked_bytes -= len(lost.payload)
                stream.dropped += 1
            start = queue[0].seq if queue else lost.seq + 1
            desc = stream.open.cameras[cam]
            cameras = list(stream.open.cameras)
            cameras[cam] = replace(desc, first_seq=start, live_seq=max(start, desc.live_seq))
            stream.open = replace(stream.open, cameras=tuple(cameras))
            stream.acked[cam] = max(stream.acked[cam], start - 1)
            if stream is self._head():
                self._opened_on_conn = None  # send the new session_open, then resend
        if before == 0 or before // 1000 != stream.dropped // 1000:
            log.error(
                "uplink buffer full: dropped %d unacknowledged packets of %s so far",
                stream.dropped,
                stream.id,
            )

    def _head(self) -> SessionStream | None:
        return self.streams[0] if self.streams else None

    def _on_ack(self, ack: p.Ack) -> None:
        stream = self.stream(ack.session)
        if stream is None or not 0 <= ack.camera < len(stream.unacked):
            return
        if ack.seq > stream.acked[ack.camera]:
            stream.acked[ack.camera] = ack.seq
            queue = stream.unacked[ack.camera]
            while queue and queue[0].seq <= ack.seq:
                stream.unacked_bytes -= len(queue.popleft().payload)
            self._progress.notify()
            self._wake.set()  # the backlog window moved
            if stream.first_ack_mono_ns is None:
                stream.first_ack_mono_ns = time.monotonic_ns()
                self._changed()
        if stream.settled():
            self._remove(stream)

    def _changed(self) -> None:
        self._progress.notify()
        if self._on_change is not None:
            self._on_change()

    # -- connection loop ----------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff until cancelled."""
        delay = 0.2
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                try:
                    await self._connect_once(http)
                    delay = 0.2
                except UplinkRefused as exc:
                    self.stats.refusals[exc.code] = self.stats.refusals.get(exc.code, 0) + 1
                    self.stats.last_error = str(exc)
                    log.error("%s", exc)
                    if exc.code in FATAL_CODES:
                        delay = self.reconnect_max_s
                    self._changed()
                except aiohttp.ServerFingerprintMismatch as exc:
                    got = "sha256:" + exc.got.hex()
                    self.stats.last_error = (
                        f"TLS fingerprint mismatch: the receiver presented {got}"
                    )
                    log.error(
                        "uplink to %s refused: %s (not the pinned one)",
                        self.url,
                        self.stats.last_error,
                    )
                    self._changed()
                except (aiohttp.ClientError, OSError, TimeoutError, p.ProtocolError) as exc:
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("uplink to %s failed: %s", self.url, self.stats.last_error)
                    self._changed()
                finally:
                    if self.connected:
                        self.connected = False
                        self._changed()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter only
                delay = min(delay * 2, self.reconnect_max_s)

    async def _connect_once(self, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(
            self.url, ssl=self._fingerprint, max_msg_size=p.MAX_CONTROL_BYTES, autoping=True
        ) as ws:
            conn = p.Uplink(p.Role.AGENT)
            welcome = await self._handshake(ws, conn)
            self._conn = conn
            self.connected = True
            self.stats.connects += 1
            self._resume(welcome)
            self._changed()
            log.info("uplink connected to %s", self.url)
            reader = asyncio.create_task(
                self._reader(ws, conn, welcome.heartbeat_s), name="uplink-reader"
            )
            writer = asyncio.create_task(self._writer(ws, conn), name="uplink-writer")
            try:
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                for task in (reader, writer):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                self._conn = None
                self._opened_on_conn = None

    async def _receive(
        self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink, within: float
    ) -> p.Event:
        msg = await ws.receive(timeout=within)
        if msg.type is aiohttp.WSMsgType.TEXT:
            return conn.receive(msg.data)
        if msg.type is aiohttp.WSMsgType.BINARY:
            return conn.receive(msg.data)
        raise ConnectionError(f"uplink closed by the receiver ({msg.type.name} {ws.close_code})")

    async def _handshake(self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink) -> p.Welcome:
        event = await self._receive(ws, conn, 10)
        if isinstance(event, p.Error):
            raise UplinkRefused(event.code, event.detail)
        assert isinstance(event, p.Challenge)  # the protocol allows nothing else here
        sig = self._key.sign(p.hello_signed_bytes(event.nonce, self.origin))
        await ws.send_str(_text(conn.send(p.Hello(self.device_id, p.b64url(sig), None))))
        event = await self._receive(ws, conn, 10)
        if isinstance(event, p.Error):
            raise UplinkRefused(event.code, event.detail)
        assert isinstance(event, p.Welcome)
        return event

    def _resume(self, welcome: p.Welcome) -> None:
        """Forget what the receiver already holds; queue the rest again."""
        for stream in list(self.streams):
            for cam, seq in welcome.acked.get(stream.id, {}).items():
                index = next((c.index for c in stream.open.cameras if c.id == cam), None)
                if index is not None:
                    self._on_ack(p.Ack(stream.id, index, seq))
            stream.close_sent = False
        self._live.clear()
        self._backlog = []

    def _refill(self, stream: SessionStream) -> None:
        """Queue everything unacknowledged again: below each camera's live seq as
        backlog, from it on as the live lane (merged across cameras in capture order)."""
        self._backlog, tails = [], []
        for cam, queue in enumerate(stream.unacked):
            split = (
                max(0, min(len(queue), stream.open.cameras[cam].live_seq - queue[0].seq))
                if queue
                else 0
            )
            self._backlog.append(deque(itertools.islice(queue, split)))
            tails.append([(cam, pkt) for pkt in itertools.islice(queue, split, None)])
        self._live = deque(heapq.merge(*tails, key=lambda item: item[1].mono_ns))

    def _next_item(self, stream: SessionStream | None) -> tuple[int, EncodedPacket] | None:
        if self._live:
            return self._live.popleft()
        if stream is None:
            return None
        # The oldest backlog packet of a camera that has fewer than BACKLOG_WINDOW
        # packets in flight: a live packet never queues behind a long backlog.
        best: int | None = None
        for cam, queue in enumerate(self._backlog):
            if (
                queue
                and queue[0].seq - stream.acked[cam] <= BACKLOG_WINDOW
                and (best is None or queue[0].mono_ns < self._backlog[best][0].mono_ns)
            ):
                best = cam
        return None if best is None else (best, self._backlog[best].popleft())

    async def _reader(
        self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink, heartbeat_s: float
    ) -> None:
        while True:
            event = await self._receive(ws, conn, heartbeat_s * 3)
            if isinstance(event, p.Ack):
                self._on_ack(event)
            elif isinstance(event, p.Trigger) and self._on_trigger is not None:
                self._on_trigger(event.envelope)
            elif isinstance(event, p.Error):
                raise UplinkRefused(event.code, event.detail)

    async def _writer(self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink) -> None:
        next_beat = 0.0
        while True:
            stream = self._head()
            if stream is not None and self._opened_on_conn != stream.id:
                await ws.send_str(_text(conn.send(stream.open)))
                self._opened_on_conn = stream.id
                self._refill(stream)
            while stream is not None and (item := self._next_item(stream)) is not None:
                cam, pkt = item
                await ws.send_bytes(_binary(conn.send(stream.media(cam, pkt))))
                self.stats.packets_sent += 1
                self.stats.bytes_sent += len(pkt.payload)
            drained = not self._live and not any(self._backlog)
            if (
                drained
                and stream is not None
                and stream.close_reason is not None
                and not stream.close_sent
            ):
                await ws.send_str(_text(conn.send(p.SessionClose(stream.id, stream.close_reason))))
                stream.close_sent = True
                if stream.settled():
                    self._remove(stream)
                    continue
            now = time.monotonic()
            if now >= next_beat:
                await ws.send_str(_text(conn.send(p.Heartbeat(time.time()))))
                next_beat = now + self.heartbeat_s
            self._wake.clear()
            if self._live or (self._head() is not stream):
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_beat - now)):  # no task per wait
                    await self._wake.wait()


def _text(wire: str | bytes) -> str:
    assert isinstance(wire, str)  # control events always serialize to text
    return wire


def _binary(wire: str | bytes) -> bytes:
    assert isinstance(wire, bytes)  # media always serializes to bytes
    return wire
