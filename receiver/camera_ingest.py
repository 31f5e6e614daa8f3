"""One camera of the open session on one connection: order, record, ack.

Split from :mod:`receiver.ingest` (the connection) so that each stays small.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from agent import protocol as p
from receiver.camera_recording import CameraRecording, Outcome
from receiver.errors import BadSegmentError, BitstreamError, InvalidPacketError, ReceiverError
from receiver.sealed import open_segment

__all__ = ["MAX_QUEUED_BYTES", "CameraIngest"]

log = logging.getLogger(__name__)

#: Bytes a camera may have waiting (behind a segment being opened) before the
#: connection stops reading, so a flood of segments is held back by TCP, not RAM.
MAX_QUEUED_BYTES = 64 * 1024 * 1024


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
        send_ack: Callable[[p.Ack], None],
        identities: list[Any],
        fail: Callable[[BaseException], None],
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
        self._sent: tuple[int, tuple[tuple[int, int], ...]] = (camera.track.first_seq - 1, ())

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
            )
            if done is not None:
                if done is Outcome.APPENDED:
                    self._kick()
                return
        self._put(media, len(media.payload))

    def gap(self, gap: p.Gap) -> None:
        """Record a declared gap, in order with the media around it."""
        self._put(gap, 0)

    @property
    def has_room(self) -> bool:
        """Whether the queue is below its bound (else stop reading: backpressure)."""
        return self._room.is_set()

    async def room(self) -> None:
        """Wait until the queue is below its bound again."""
        await self._room.wait()

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
            await self.camera.append(
                item.seq,
                item.capture_us,
                item.keyframe,
                item.payload,
                preroll=item.preroll,
                live=True,
            )
        else:
            await self._backfill(item)

    async def _backfill(self, media: p.Media) -> None:
        cam = self.camera
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
            inside = [
                pkt
                for pkt in packets
                if self.first_seq <= pkt.seq and (self.end_seq is None or pkt.seq <= self.end_seq)
            ]
            for i, pkt in enumerate(inside):
                await cam.append(pkt.seq, pkt.capture_ns // 1000, pkt.keyframe, pkt.payload)
                if i % 16 == 15:
                    await asyncio.sleep(0)  # let fsyncs, acks and other cameras run
        except (BadSegmentError, BitstreamError, InvalidPacketError) as exc:
            # The device's footage, not our disk: say so, keep the connection, go on.
            log.error(
                "device %s session %s camera %s: sealed segment seqs %d..? not recorded: %s",
                self.device,
                self.session_id,
                cam.camera_id,
                media.seq,
                exc,
            )
            cam.bad_segment(media.seq, media.capture_us, str(exc)[:256])

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
                self.ack()
                if not self.camera.has_unflushed:
                    return
        except ReceiverError as exc:
            self._fail(exc)

    def ack(self) -> None:
        """Send an ack if the cumulative seq or the holds changed since the last one."""
        state = self.camera.ack_state(p.MAX_HOLDS)
        # seq -1 (nothing from seq 0 on is durable yet) is sent only to carry holds.
        if state != self._sent and (state[0] >= 0 or state[1]):
            self._sent = state
            self._send_ack(p.Ack(self.session_id, self.index, state[0], state[1]))

    async def settle(self) -> None:
        """Wait until everything queued is recorded and flushed (before a close)."""
        while self._worker is not None and not self._worker.done():
            await asyncio.wait([self._worker])
        while self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])

    async def stop(self) -> None:
        """Stop working at once (the receiver shuts down)."""
        tasks = [t for t in (self._worker, self._flusher) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
