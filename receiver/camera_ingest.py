"""One camera of the open session on one connection: order, record, ack.

Split from :mod:`receiver.ingest` (the connection) so that each stays small.
It also keeps the device's footage hash chain (:mod:`agent.chain`): a
``chain`` message is checked (signature by the connection's device key,
entries folding to its head) and written to the session's custody log
(:mod:`receiver.custody`), then answered with ``chain_ack`` (``ok`` or the
refusal code; a refusal is logged and recorded, and the footage goes on).
A sealed segment's own checkpoint is checked against its packets and made
durable before any of its packets is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent import chain, segment
from agent import protocol as p
from hardware import EncodedPacket
from receiver.camera_recording import CameraRecording, Outcome
from receiver.custody import CustodyLog, CustodyRecord, DeviceKey
from receiver.errors import (
    BadSegmentError,
    BitstreamError,
    InvalidPacketError,
    ReceiverError,
    WrongIdentityError,
)
from receiver.sealed import open_segment

__all__ = ["MAX_QUEUED_BYTES", "CameraIngest"]

log = logging.getLogger(__name__)

#: Bytes a camera may have waiting (behind a segment being opened) before the
#: connection stops reading, so a flood of segments is held back by TCP, not RAM.
MAX_QUEUED_BYTES = 64 * 1024 * 1024
#: A camera's live packets that cannot be recorded are logged at most this often.
BAD_FOOTAGE_LOG_EVERY_S = 60.0


class CameraIngest:
    """One camera of the open session on one connection: record in order, fsync, ack.

    A camera's messages are recorded in the order they arrived. A live packet
    is recorded at once when nothing of its camera waits (no task, no await:
    the first byte stays fast); otherwise, and for sealed segments, declared
    gaps and packets that need a new part file, it queues behind what waits,
    and one worker task per camera works the queue. A sealed segment is opened
    in a worker thread, so other cameras and the acks go on meanwhile; a later
    packet of the same camera waits for it, because the agent sent them in that
    order (a packet that overtook the segment before it might fit no run yet and
    be dropped, or start a run the segment would have continued).

    Acks are cumulative plus ``holds`` and sent whenever either changes (group
    commit: one flusher per camera, the next fsync covers all that arrived).
    """

    def __init__(
        self,
        device: str,
        session_id: str,
        desc: p.CameraDesc,
        camera: CameraRecording,
        send_ack: Callable[[p.Ack | p.ChainAck], None],
        identities: list[Any],
        fail: Callable[[BaseException], None],
        *,
        custody: CustodyLog | None = None,
        device_key: DeviceKey | None = None,
        on_refused: Callable[[str], None] | None = None,
        on_recorded: Callable[[], None] | None = None,
    ) -> None:
        self.device = device
        self.session_id = session_id
        self.index = desc.index
        #: The session's range of this camera: sealed segments hold whole seconds, and
        #: nothing from before the pre-roll or after the end of the emergency is recorded.
        self.first_seq, self.end_seq = desc.first_seq, desc.end_seq
        self.camera = camera
        self._send_ack = send_ack
        self._identities = identities
        self._fail = fail
        self._queue: deque[tuple[p.Media | p.Gap, int]] = deque()
        self._queued_bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._worker: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        # What the agent knows we hold: nothing beyond the first seq until we say so.
        self._sent: tuple[int, tuple[tuple[int, int], ...]] | None = None  # none yet
        #: The session's checkpoint files and the key the device signs them with.
        self._custody = custody
        self._device_key = device_key
        self._on_refused = on_refused
        #: Called when an fsync made more footage durable and it was acknowledged.
        self._on_recorded = on_recorded
        self._checkpoints: list[CustodyRecord] = []
        #: Checkpoints received, not checked yet (with the time they came).
        self._unchecked: list[tuple[chain.Checkpoint, float]] = []
        self._custodian: asyncio.Task[None] | None = None
        self._bad_logged_at, self._bad_since_log = -math.inf, 0

    # -- intake ----------------------------------------------------------

    def media(self, media: p.Media) -> None:
        """Record (or queue) one media message of this camera."""
        if media.kind is p.MediaKind.LIVE and not self._queue:
            done = self.camera.append_nowait(
                media.seq,
                media.capture_us,
                media.keyframe,
                media.payload,
                preroll=media.preroll,
                live=True,
                defer_init=True,
            )
            if done is not None:
                if done is Outcome.APPENDED:
                    self._kick()
                return
        self._put(media, len(media.payload))

    def gap(self, gap: p.Gap) -> None:
        """Record a declared gap, in order with the media around it."""
        self._put(gap, 0)

    def checkpoint(self, event: p.Chain) -> None:
        """Queue a chain checkpoint: checked and stored durably off the loop, then
        answered with ``chain_ack``."""
        cp = chain.from_wire(event, self.device, self.camera.camera_id)
        self._unchecked.append((cp, time.time()))
        if self._custodian is None or self._custodian.done():
            self._custodian = asyncio.create_task(
                self._store_checkpoints(), name=f"custody {self.session_id}/{self.camera.camera_id}"
            )

    def _check(self, cp: chain.Checkpoint) -> str:
        key = self._device_key
        if cp.device != self.device:
            return "wrong_device"
        if key is None:
            return "unknown_key"
        return chain.check(cp, {key.kid: key.key}) or "ok"

    def _keep(self, record: CustodyRecord) -> None:
        if not record.ok:
            self._report_refused(record)
        self._checkpoints.append(record)

    def _report_refused(self, record: CustodyRecord) -> None:
        cp = record.checkpoint
        log.error(
            "device %s session %s camera %s: chain checkpoint %d..%d (%s) refused: %s",
            self.device, self.session_id, cp.camera, cp.first, cp.last, record.source,
            record.result,
        )  # fmt: skip
        if self._on_refused is not None:
            self._on_refused(record.result)

    def _check_all(self, unchecked: list[tuple[chain.Checkpoint, float]]) -> list[CustodyRecord]:
        # A worker thread: a session's start brings a checkpoint per second of pre-roll per
        # camera, and checking them on the loop held up the first live frames behind them.
        return [CustodyRecord(cp, "uplink", self._check(cp), at) for cp, at in unchecked]

    async def _store_checkpoints(self) -> None:
        try:
            while self._unchecked or self._checkpoints:
                unchecked, self._unchecked = self._unchecked, []
                if unchecked:
                    for record in await asyncio.to_thread(self._check_all, unchecked):
                        self._keep(record)
                batch, self._checkpoints = self._checkpoints, []
                if self._custody is not None and batch:
                    await asyncio.to_thread(self._custody.write, batch, self._device_key)
                for record in batch:
                    cp = record.checkpoint
                    self._send_ack(
                        p.ChainAck(self.session_id, self.index, cp.first, cp.last, record.result)
                    )
        except Exception as exc:  # our disk: the device keeps them and sends them again
            self._fail(exc)

    async def _segment_checkpoint(
        self, header: segment.SegmentHeader, packets: list[EncodedPacket]
    ) -> None:
        """Check a sealed segment's checkpoint against its packets and store it durably."""
        custody = self._custody
        if header.chain is None or custody is None:
            return
        try:
            cp = await asyncio.to_thread(_segment_claim, header, packets, self.camera.camera_id)
        except ValueError as exc:
            log.error(
                "device %s session %s camera %s: sealed segment from seq %d has a malformed "
                "chain checkpoint: %s",
                self.device, self.session_id, self.camera.camera_id, header.first_seq, exc,
            )  # fmt: skip
            if self._on_refused is not None:
                self._on_refused("malformed")
            return
        result = self._check(cp)
        if result == "ok" and (cp.first, cp.last) != (header.first_seq, header.last_seq):
            result = "bad_chain"  # it must cover exactly the segment it is in
        record = CustodyRecord(cp, "segment", result, time.time())
        if not record.ok:
            self._report_refused(record)
        await asyncio.to_thread(custody.write, [record], self._device_key)

    @property
    def has_room(self) -> bool:
        """Whether the queue and the unwritten fragments are below their bounds (else
        stop reading: backpressure)."""
        return self._room.is_set() and not self.camera.backlogged

    async def room(self) -> None:
        """Wait until the queue and the unwritten fragments are below their bounds again."""
        await self._room.wait()
        while self.camera.backlogged:
            await self.camera.flush()  # writes them (raises if the recording failed)

    def _put(self, item: p.Media | p.Gap, size: int) -> None:
        self._queue.append((item, size))
        self._queued_bytes += size
        if self._queued_bytes > MAX_QUEUED_BYTES:
            self._room.clear()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(
                self._work(), name=f"ingest {self.session_id}/{self.camera.camera_id}"
            )

    async def _work(self) -> None:
        try:
            while self._queue:
                item, size = self._queue[0]
                try:
                    await self._record(item)
                finally:
                    self._queue.popleft()
                    self._queued_bytes -= size
                    if self._queued_bytes <= MAX_QUEUED_BYTES:
                        self._room.set()
                self._kick()
        except Exception as exc:
            self._queue.clear()
            self._queued_bytes = 0
            self._room.set()
            self._fail(exc)

    async def _record(self, item: p.Media | p.Gap) -> None:
        if isinstance(item, p.Gap):
            await self.camera.declare_gap(item.first, item.last, item.reason)
        elif item.kind is p.MediaKind.LIVE:
            try:
                await self.camera.append(
                    item.seq,
                    item.capture_us,
                    item.keyframe,
                    item.payload,
                    preroll=item.preroll,
                    live=True,
                )
            except (BitstreamError, InvalidPacketError) as exc:
                # A packet no part can start with (one camera sending garbage): this
                # camera's footage, not our disk. Recorded as bad footage; its GOP is
                # dropped; the device's other cameras and the connection go on.
                self._bad_live_packet(item, exc)
        else:
            await self._backfill(item)

    async def _backfill(self, media: p.Media) -> None:
        cam = self.camera
        at = media.seq  # the first seq of it not recorded (should it fail)
        try:
            if not self._identities:
                raise BadSegmentError("this receiver has no age identity")
            header, packets = await asyncio.to_thread(open_segment, media.payload, self._identities)
            if header.camera != cam.camera_id:
                raise BadSegmentError(f"segment of camera {header.camera[:64]!r}")
            if header.first_seq != media.seq or header.codec != cam.track.codec:
                raise BadSegmentError(
                    f"segment holds {header.codec} seqs {header.first_seq}..{header.last_seq}, "
                    f"not what its media header says"
                )
            # Its checkpoint is durable before any of its footage can be acknowledged.
            await self._segment_checkpoint(header, packets)
            inside = [
                pkt
                for pkt in packets
                if self.first_seq <= pkt.seq and (self.end_seq is None or pkt.seq <= self.end_seq)
            ]
            for i, pkt in enumerate(inside):
                at = pkt.seq
                await cam.append(pkt.seq, pkt.capture_ns // 1000, pkt.keyframe, pkt.payload)
                if i % 16 == 15:
                    await asyncio.sleep(0)  # let fsyncs, acks and other cameras run
        except (BadSegmentError, BitstreamError, InvalidPacketError) as exc:
            # The device's footage, not our disk: say so, keep the connection, go on.
            log.error(
                "device %s session %s camera %s: sealed segment seqs %d..? not recorded: %s%s",
                self.device,
                self.session_id,
                cam.camera_id,
                media.seq,
                exc,
                " (the device's [store] recipients lack this receiver's; the district's "
                "identity opens it from the device's card: breakglass footage export)"
                if isinstance(exc, WrongIdentityError)
                else "",
            )
            cam.bad_segment(media.seq, media.capture_us, str(exc)[:256])
            # What it would have continued is complete as far as it goes: its last frame
            # is made durable, so the ack reaches the seq before it and the device, which
            # knows where the segment ends, sees exactly what was not recorded (it declares
            # that lost once footage it sent after the segment is acknowledged).
            await cam.finish_before(max(at, self.first_seq))

    def _bad_live_packet(self, media: p.Media, exc: Exception) -> None:
        """A live packet no part can start with: kept in ``session.json`` (with the bad
        segments: footage of the device's that cannot be recorded), not acknowledged, and
        logged at most once a minute per camera (a camera sending garbage fails at every
        keyframe)."""
        now = time.monotonic()
        self._bad_since_log += 1
        if now - self._bad_logged_at >= BAD_FOOTAGE_LOG_EVERY_S:
            log.error(
                "device %s session %s camera %s: live packet seq %d not recorded: %s%s",
                self.device, self.session_id, self.camera.camera_id, media.seq, exc,
                f" ({self._bad_since_log} not recorded since the last such line)"
                if self._bad_since_log > 1 else "",
            )  # fmt: skip
            self._bad_logged_at, self._bad_since_log = now, 0
        self.camera.bad_segment(media.seq, media.capture_us, f"live packet: {exc}"[:256])

    # -- durability and acks ---------------------------------------------

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(
                self._flush(), name=f"flush {self.session_id}/{self.camera.camera_id}"
            )

    async def _flush(self) -> None:
        try:
            while True:
                await self.camera.flush()
                if self.ack() and self._on_recorded is not None:
                    self._on_recorded()
                if not self.camera.has_unflushed:
                    return
        except ReceiverError as exc:
            self._fail(exc)

    def ack(self) -> bool:
        """Send an ack if the cumulative seq or the holds changed since the last one, and
        the first time in any case (at the ``session_open``: the device learns what this
        receiver held before it reads on); whether one was sent."""
        state = self.camera.ack_state(p.MAX_HOLDS)
        if state != self._sent:
            self._sent = state
            self._send_ack(p.Ack(self.session_id, self.index, state[0], state[1]))
            return True
        return False

    async def settle(self) -> None:
        """Wait until everything queued is recorded and flushed (before a close)."""
        while self._worker is not None and not self._worker.done():
            await asyncio.wait([self._worker])
        while self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])
        while self._custodian is not None and not self._custodian.done():
            await asyncio.wait([self._custodian])

    async def stop(self) -> None:
        """Stop working at once (the receiver shuts down)."""
        running = (self._worker, self._flusher, self._custodian)
        tasks = [t for t in running if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _segment_claim(
    header: segment.SegmentHeader, packets: list[EncodedPacket], camera: str
) -> chain.Checkpoint:
    """A segment's checkpoint with its entries computed from its packets (CPU: a thread)."""
    assert header.chain is not None
    entries = chain.pack_entries(
        [
            (
                pkt.capture_ns // 1000,
                chain.FLAG_KEYFRAME if pkt.keyframe else 0,
                chain.payload_digest(header.codec, pkt.payload),
            )
            for pkt in packets
        ]
    )
    return chain.from_claim(header.chain, camera, entries)
