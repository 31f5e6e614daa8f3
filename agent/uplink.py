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
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import chain as hash_chain
from agent import protocol as p
from agent.audit_feed import AuditFeed
from agent.changes import Changes
from agent.errors import UplinkRefused
from agent.live_lane import LIVE_LAG_S, Goodput, LiveLane, fill_fits
from agent.segment import parse_recipient
from agent.store import Pin, SegmentStore, StoredSegment
from hardware import EncodedPacket
from provisioning.tls import fingerprint_digest

log = logging.getLogger(__name__)

#: RAM packets the fill lane may have in flight beyond a camera's last ack.
BACKLOG_WINDOW = 64
#: Sealed segments the fill lane may have in flight per camera (keeps a slow link full).
SEGMENT_WINDOW = 2
#: Seconds before the fill lane reads again a segment it could not read (EIO, EMFILE).
SEGMENT_RETRY_S = 5.0
#: Chain checkpoints kept per camera of a session until the receiver has them (over an
#: hour at one a second); beyond it the oldest go (sealed segments carry their own).
MAX_PENDING_CHECKPOINTS = 4096
#: Exterior shares (a session an hour) queued for a receiver away; older ones are given
#: up (a week: their footage aged out of the store days before, at the default 72 h).
MAX_OWED_SHARES = 168

# Codes after which retrying soon is pointless: the receiver does not know us (or our
# enrollment does not do: refused, expired, superseded, revoked).
FATAL_CODES = frozenset({"unknown_device", "bad_signature", "revoked"})


@dataclass(slots=True)
class SessionStream:
    """What one session still owes the receiver.

    ``ram`` holds, per camera index, the session's packets still in memory and
    not acknowledged (pre-roll and live), bounded by the client's
    ``unacked_max_bytes`` (all sessions together): when it is full the oldest go
    (other sessions' first), and backfill reads
    them from the sealed store instead. ``end_seq`` is each camera's last seq
    once the session ended (``None`` while it streams).
    """

    open: p.SessionOpen
    ram: list[deque[EncodedPacket]]
    acked: list[int]
    holds: list[tuple[tuple[int, int], ...]]
    #: Per camera index: the last seq captured before the press (flagged pre-roll).
    preroll_end: list[int]
    end_seq: list[int | None]
    last_pushed: list[int]
    pins: list[Pin]
    close_reason: str | None = None
    close_sent: bool = False
    ram_bytes: int = 0
    first_ack_mono_ns: int | None = None
    skipped: int = 0
    gaps: int = 0
    #: Whether a session_open went out on any connection yet (live starts at the press).
    opened: bool = False
    #: Per camera index: the device's chain checkpoints of this session's footage that the
    #: receiver has not answered yet (oldest first), and how many of them went out on
    #: the current connection.
    chain: list[deque[hash_chain.Checkpoint]] = field(default_factory=list)
    chain_sent: list[int] = field(default_factory=list)
    #: Per camera index: ranges of sealed segments the receiver could not record, to be
    #: declared lost (ascending; until acknowledged), and how many went out on the
    #: current plan.
    unrecorded: list[list[tuple[int, int]]] = field(default_factory=list)
    unrecorded_sent: list[int] = field(default_factory=list)
    #: A building's continuous exterior share, not an emergency (nothing pinned).
    share: bool = False

    @property
    def id(self) -> str:
        """Session id."""
        return self.open.session

    def settled(self) -> bool:
        """Closed, the close sent, every camera acknowledged to its end and every
        chain checkpoint answered."""
        return (
            self.close_sent
            and all(
                end is None or acked >= end
                for acked, end in zip(self.acked, self.end_seq, strict=True)
            )
            and not any(self.chain)
        )

    def held(self, camera: int, seq: int) -> bool:
        """Whether the receiver already holds ``seq`` of ``camera``."""
        return seq <= self.acked[camera] or any(f <= seq <= t for f, t in self.holds[camera])

    def newest(self, camera: int) -> int:
        """The highest seq of ``camera`` the receiver holds."""
        holds = self.holds[camera]
        return max(self.acked[camera], holds[-1][1] if holds else -1)

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
class _SentSegment:
    """A sealed segment the fill lane sent on this connection, until the receiver holds
    its first owed seq or shows that it got past it without recording it."""

    #: The first seq of it the receiver lacked when it was sent, and its last seq.
    first: int
    last: int
    file: str
    #: Whether the fill lane sent ``last + 1`` after it (the receiver lacked it then).
    followed: bool = False


@dataclass(slots=True)
class _Lane:
    """One camera's plan on the current connection."""

    #: Seq the live lane starts at (None: at the next keyframe that arrives).
    live_from: int | None
    #: Ranges (first, last) the fill lane still has to send, ascending; last None: open.
    todo: list[list[int | None]]
    #: Fill items sent and not acknowledged: (last seq, True for a sealed segment, bytes).
    inflight: deque[tuple[int, bool, int]] = field(default_factory=deque)
    #: time.monotonic() before which the fill lane sends nothing (a segment it could
    #: not read: tried again after a pause, not in a loop).
    paused_until: float = 0.0
    #: Sealed segments chosen, by first seq: the first seq the receiver lacked then.
    owed_from: dict[int, int] = field(default_factory=dict)
    #: Sealed segments sent whose outcome is not known yet (oldest first).
    unproven: list[_SentSegment] = field(default_factory=list)
    #: What the receiver held of this camera before this plan's footage reached it: the
    #: first ack after the ``session_open`` (the receiver acks it before it reads on).
    before: tuple[int, tuple[tuple[int, int], ...]] | None = None


@dataclass(slots=True)
class UplinkStats:
    """Counters for status, metrics and benchmarks."""

    connects: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    packets_sent: int = 0
    bytes_sent: int = 0
    segments_sent: int = 0
    segment_bytes_sent: int = 0
    #: Sealed segments the receiver got and did not record (their range declared lost).
    segments_unrecorded: int = 0
    live_skips: int = 0
    gaps_declared: int = 0
    checkpoints_sent: int = 0
    checkpoints_acked: int = 0
    checkpoints_refused: int = 0
    last_error: str | None = None


#: How long the reader may take, after the writer failed, to read what the receiver sent
#: before it closed (its ``error``, say ``revoked``, arrives ahead of the close).
READER_DRAIN_S = 1.0


async def connection_outcome(
    reader: asyncio.Task[None], writer: asyncio.Task[None], drain_s: float = READER_DRAIN_S
) -> None:
    """Wait until the connection's reader or writer ends; raise why it ended.

    The reader's reason goes first: when the receiver refuses the device it sends an
    ``error`` and closes, and the writer's next send may fail on the closed socket before
    the reader has read that ``error``. So a failed writer gives the reader ``drain_s`` to
    reach the frames already received (a closed socket ends the reader at once), and a
    refusal it reads wins over the writer's broken pipe.
    """
    done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
    if reader not in done and writer.exception() is not None:
        await asyncio.wait({reader}, timeout=drain_s)
    if reader.done():
        reader.result()
    writer.result()


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
        store: SegmentStore | None = None,
        heartbeat_s: float = 5.0,
        reconnect_max_s: float = 10.0,
        unacked_max_bytes: int = 64 * 1024 * 1024,
        live_lag_s: float = LIVE_LAG_S,
        on_trigger: Callable[[Mapping[str, Any]], tuple[int, Mapping[str, Any]]] | None = None,
        on_change: Callable[[], None] | None = None,
        audit_feed: AuditFeed | None = None,
        audit_head: Callable[[], int] | None = None,
        enrollment: Mapping[str, Any] | None = None,
        on_access_head: Callable[[int, str], None] | None = None,
        sealed_to: Iterable[str] = (),
    ) -> None:
        self.url = url
        self.origin = origin
        self._fingerprint = aiohttp.Fingerprint(fingerprint_digest(pin))
        self.device_id = device_id
        self._key = device_key
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.reconnect_max_s = reconnect_max_s
        self.unacked_max_bytes = unacked_max_bytes
        self._on_trigger = on_trigger
        self._on_change = on_change
        #: Told the receiver's access-log head ``(n, hash)`` (to anchor it in the trail).
        self._on_access_head = on_access_head
        self.enrollment = enrollment
        #: The age recipients the store seals to (``[store] recipients``), as age spells
        #: them (the config takes upper case and spaces around them, as age does).
        self.sealed_to = frozenset(
            str(parse_recipient(r, where="store.recipients")) for r in sealed_to
        )
        #: Why the receiver cannot open this device's sealed segments (its welcome names
        #: its recipients and the store seals to none of them), or None: a fault.
        self.sealing_fault: str | None = None
        #: The audit trail shipped to the receiver: what it holds, what is on the way.
        self._audit_feed = audit_feed
        self._audit_head = audit_head
        self.audit_acked = 0
        self._audit_inflight = False
        #: The receiver took nothing of the last batch (its copy holds another trail: a
        #: device replaced under the same id, or a trail edited): not sent again on this
        #: connection (sent at once, it looped, and the receiver stored each as a fork).
        self._audit_refused = False
        #: Control messages for the writer to send first (answers to pushed triggers).
        self._control: deque[p.Event] = deque()
        self.streams: deque[SessionStream] = deque()
        #: Sessions whose every packet and close the receiver acknowledged.
        self.settled_ids: set[str] = set()
        self.connected = False
        self.stats = UplinkStats()
        #: The link's measured goodput (live and fill deliveries).
        self._goodput = Goodput()
        #: The live lane of this connection: packets sent first, and those in flight.
        self._live = LiveLane(live_lag_s, self._goodput)
        #: Per camera of the head session: where live starts and what the fill lane owes.
        self._lanes: list[_Lane] = []
        self._rr = 0
        self._wake = asyncio.Event()
        self._conn: p.Uplink | None = None
        self._opened_on_conn: str | None = None
        self._progress = Changes()

    # -- API for the agent --------------------------------------------------

    def start_session(
        self,
        open_: p.SessionOpen,
        preroll: Mapping[int, Iterable[EncodedPacket]],
        *,
        acked: Mapping[int, int] | None = None,
        end_seq: Mapping[int, int] | None = None,
        emergency: bool = True,
    ) -> SessionStream:
        """Queue a session: its ``session_open``, then its footage (oldest first).

        ``preroll`` is what RAM holds of it now. A session resumed after a restart
        passes what was acknowledged before (``acked``), and ``end_seq`` if it has
        ended: the rest comes from the sealed store. A live emergency goes first and
        pins its footage in the store until acknowledged; a building's continuous
        exterior share (``emergency=False``) does neither.
        """
        cams = range(len(open_.cameras))
        queues = [deque(preroll.get(cam, ())) for cam in cams]
        done = acked or {}
        ends = end_seq or {}
        stream = SessionStream(
            open_,
            queues,
            [max(done.get(c.index, -1), c.first_seq - 1) for c in open_.cameras],
            [() for _ in cams],
            [
                q[-1].seq if q else c.first_seq - 1
                for q, c in zip(queues, open_.cameras, strict=True)
            ],
            [ends.get(cam) for cam in cams],
            [
                q[-1].seq if q else c.first_seq - 1
                for q, c in zip(queues, open_.cameras, strict=True)
            ],
            [],
        )
        stream.chain = [deque() for _ in cams]
        stream.chain_sent = [0 for _ in cams]
        stream.unrecorded = [[] for _ in cams]
        stream.unrecorded_sent = [0 for _ in cams]
        if self.store is not None and emergency:
            for cam, c in enumerate(open_.cameras):
                held = Pin(c.id, c.first_seq, ends.get(cam), stream.acked[cam])
                stream.pins.append(held)
                self.store.add_pin(held)
        stream.ram_bytes = sum(len(pkt.payload) for q in queues for pkt in q)
        stream.share = not emergency
        if end_seq is None and emergency:
            # A live emergency goes before sessions still delivering old footage: its
            # session_open preempts theirs on the connection; they resume after it.
            self.streams.appendleft(stream)
        else:
            self.streams.append(stream)
        if stream.share:
            self._give_up_old_shares()
        self._wake.set()
        return stream

    def _give_up_old_shares(self) -> None:
        """Keep at most :data:`MAX_OWED_SHARES` shares queued: the oldest go (audited).

        A receiver away for weeks with a share rotating hourly queued a session an
        hour; past about 1,100 the saved list of owed sessions outgrew its read
        limit and a restart set it aside, emergencies and all. A share's footage
        (exterior, never pinned) has aged out of the store long before.
        """
        shares = [s for s in self.streams if s.share]
        for old in shares[: max(0, len(shares) - MAX_OWED_SHARES)]:
            log.warning("share %s given up: more than %d shares owed", old.id, MAX_OWED_SHARES)
            self._audit("share_given_up", session=old.id, owed_shares=len(shares))
            self._remove(old)

    def add_camera(
        self, stream: SessionStream, desc: p.CameraDesc, preroll: Iterable[EncodedPacket]
    ) -> None:
        """Add a camera to a session still streaming (it had no footage when the session
        opened), at the next index: the others keep theirs. ``preroll`` is what RAM holds
        of it (all of it captured after the press); the session is opened again with it.
        Every per-camera list of :class:`SessionStream` grows by one here, as
        :meth:`start_session` makes them.
        """
        if desc.index != len(stream.open.cameras) or stream.close_reason is not None:
            raise ValueError(f"session {stream.id}: cannot add camera {desc.id} at {desc.index}")
        queue = deque(preroll)
        stream.open = replace(stream.open, cameras=(*stream.open.cameras, desc))
        stream.ram.append(queue)
        stream.ram_bytes += sum(len(pkt.payload) for pkt in queue)
        stream.acked.append(desc.first_seq - 1)
        stream.holds.append(())
        stream.preroll_end.append(desc.first_seq - 1)  # nothing of it is from before the press
        stream.end_seq.append(None)
        stream.last_pushed.append(queue[-1].seq if queue else desc.first_seq - 1)
        stream.chain.append(deque())
        stream.chain_sent.append(0)
        stream.unrecorded.append([])
        stream.unrecorded_sent.append(0)
        if self.store is not None and stream.pins:  # an emergency pins every camera's footage
            held = Pin(desc.id, desc.first_seq, None, desc.first_seq - 1)
            stream.pins.append(held)
            self.store.add_pin(held)
        if stream is self._head():
            self._opened_on_conn = None  # session_open again, with the camera
        self._wake.set()

    def push(self, stream: SessionStream, camera: int, packet: EncodedPacket) -> None:
        """Queue one live packet of an open session."""
        stream.ram[camera].append(packet)
        stream.ram_bytes += len(packet.payload)
        stream.last_pushed[camera] = packet.seq
        if stream is self._head() and self._opened_on_conn == stream.id:
            lane = self._lanes[camera]
            if lane.live_from is None and packet.keyframe:
                lane.live_from = packet.seq  # live (re)starts here; the fill lane ends below
                if lane.todo and lane.todo[-1][1] is None:
                    lane.todo[-1][1] = packet.seq - 1
            if lane.live_from is not None:
                if packet.keyframe:
                    self._skip_if_behind(stream, camera, packet)
                self._live.queue.append((camera, packet))
        self._within_budget(stream)
        self._wake.set()

    def _within_budget(self, pushing: SessionStream) -> None:
        """Keep the RAM of every stream together within ``unacked_max_bytes``: the other
        streams' (ended shares or emergencies waiting for the receiver) go first, then the
        oldest of ``pushing``. One budget, not one per session: with the receiver away and
        an exterior share rotating hourly, a budget per session grew by one every hour."""
        excess = sum(s.ram_bytes for s in self.streams) - self.unacked_max_bytes
        if excess <= 0:  # the usual case, once per packet: nothing to build
            return
        for stream in [*(s for s in self.streams if s is not pushing), pushing]:
            while excess > 0 and any(stream.ram):
                before = stream.ram_bytes
                self._forget_oldest(stream)
                excess -= before - stream.ram_bytes
            if excess <= 0:
                return

    def add_checkpoint(
        self, cp: hash_chain.Checkpoint, stream: SessionStream | None = None
    ) -> None:
        """Queue a chain checkpoint for every session (or only ``stream``) whose range of
        its camera it touches; it goes out beside the footage, before the close."""
        for target in self.streams if stream is None else (stream,):
            for desc in target.open.cameras:
                end = target.end_seq[desc.index]
                if (
                    desc.id != cp.camera
                    or cp.last < desc.first_seq
                    or (end is not None and cp.first > end)
                ):
                    continue
                queue = target.chain[desc.index]
                queue.append(cp)
                if len(queue) > MAX_PENDING_CHECKPOINTS:
                    queue.popleft()
                    target.chain_sent[desc.index] = max(0, target.chain_sent[desc.index] - 1)
                    log.warning(
                        "session %s camera %s: too many chain checkpoints unanswered; "
                        "the oldest is dropped",
                        target.id,
                        desc.id,
                    )
        self._wake.set()

    def end_session(self, session_id: str, reason: str) -> None:
        """Mark a session closed; ``session_close`` follows its last packet (a camera's
        end given to :meth:`start_session`, for a session resumed after it ended, stays)."""
        for stream in self.streams:
            if stream.id == session_id and stream.close_reason is None:
                stream.close_reason = reason
                stream.end_seq = [
                    pushed if end is None else end
                    for end, pushed in zip(stream.end_seq, stream.last_pushed, strict=True)
                ]
                for pin, end in zip(stream.pins, stream.end_seq, strict=False):
                    pin.last = end
                if stream is self._head():
                    # Open it again with its end: sealed segments carry footage past the
                    # end, and the receiver must know where the emergency stopped.
                    self._opened_on_conn = None
        self._wake.set()

    def extend_session(self, session_id: str, expires_at: float) -> None:
        """A session's expiry moved: the receiver learns it with the session opened again."""
        for stream in self.streams:
            if stream.id == session_id and stream.close_reason is None:
                stream.open = replace(stream.open, expires_at=expires_at)
                if stream is self._head():
                    self._opened_on_conn = None
        self._wake.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked on every ack and connection change."""
        await self._progress.wait_until(predicate)

    async def wait_settled(self, session_id: str) -> None:
        """Wait until the receiver acknowledged every packet and the close of a session."""
        await self.wait_until(lambda: self.stream(session_id) is None)

    def stream(self, session_id: str) -> SessionStream | None:
        """The stream of a session still owed to the receiver."""
        return next((s for s in self.streams if s.id == session_id), None)

    def audit_recorded(self) -> None:
        """The audit trail grew: ship it now rather than at the next heartbeat."""
        self._wake.set()

    def segment_sealed(self) -> None:
        """A segment reached the store: the fill lane may have something to send."""
        self._wake.set()

    def _remove(self, stream: SessionStream) -> None:
        self.streams.remove(stream)
        self.settled_ids.add(stream.id)
        if self.store is not None:
            for pin in stream.pins:
                self.store.remove_pin(pin)
        self._progress.notify()
        self._wake.set()

    # -- bookkeeping --------------------------------------------------------

    def _skip_if_behind(self, stream: SessionStream, camera: int, keyframe: EncodedPacket) -> None:
        # The link is slower than the cameras (agent.live_lane): live restarts at this
        # keyframe; the fill lane sends the skipped range later.
        first = self._live.skip(camera, keyframe, stream.newest, time.monotonic_ns())
        if first is None:
            return
        self._lanes[camera].todo.append([first, keyframe.seq - 1])
        self._lanes[camera].todo.sort(key=lambda r: r[0] or 0)
        stream.skipped += keyframe.seq - first
        self.stats.live_skips += 1
        log.info(
            "uplink slower than camera %s: live skips %d packets to seq %d (backfill follows)",
            stream.open.cameras[camera].id,
            keyframe.seq - first,
            keyframe.seq,
        )

    def _forget_oldest(self, stream: SessionStream) -> None:
        # RAM is a cache: what is dropped here is in the sealed store (or the segment
        # being filled), and the fill lane reads it from there when it is needed.
        cam = min(
            (i for i, q in enumerate(stream.ram) if q), key=lambda i: stream.ram[i][0].mono_ns
        )
        stream.ram_bytes -= len(stream.ram[cam].popleft().payload)

    def _head(self) -> SessionStream | None:
        return self.streams[0] if self.streams else None

    def _on_ack(self, ack: p.Ack) -> None:
        stream = self.stream(ack.session)
        if stream is None or not 0 <= ack.camera < len(stream.ram):
            return
        cam = ack.camera
        if stream.id == self._opened_on_conn and cam < len(self._lanes):
            lane = self._lanes[cam]
            if lane.before is None:
                lane.before = (ack.seq, ack.holds)
        if ack.seq > stream.acked[cam] or ack.holds != stream.holds[cam]:
            stream.acked[cam] = max(stream.acked[cam], ack.seq)
            stream.holds[cam] = ack.holds
            if cam < len(stream.pins):
                stream.pins[cam].acked, stream.pins[cam].holds = stream.acked[cam], ack.holds
            queue = stream.ram[cam]
            while queue and queue[0].seq <= stream.acked[cam]:
                stream.ram_bytes -= len(queue.popleft().payload)
            if stream.id == self._opened_on_conn and cam < len(self._lanes):
                # Only the lanes planned for this session (the head may have changed and
                # not been planned yet, or the connection is new: no lanes of its own).
                inflight = self._lanes[cam].inflight
                while inflight and stream.held(cam, inflight[0][0]):
                    self._goodput.count(inflight.popleft()[2], time.monotonic_ns())
                self._check_unproven(stream, cam)
            declared = stream.unrecorded[cam]
            while declared and declared[0][1] <= stream.acked[cam]:  # recorded: done with
                declared.pop(0)
                stream.unrecorded_sent[cam] = max(0, stream.unrecorded_sent[cam] - 1)
            self._progress.notify()
            self._wake.set()  # the fill window moved
            if stream.first_ack_mono_ns is None:
                stream.first_ack_mono_ns = time.monotonic_ns()
                self._changed()
        if stream.settled():
            self._remove(stream)

    def _filled(self, stream: SessionStream, cam: int, owed: int) -> None:
        """The fill lane just sent footage of ``cam`` from ``owed`` on (the receiver
        lacked it): it follows the sealed segment sent before it that ends at ``owed - 1``."""
        if cam >= len(self._lanes) or stream.id != self._opened_on_conn:
            return
        for sent in self._lanes[cam].unproven:
            if sent.last + 1 == owed:
                sent.followed = True

    def _check_unproven(self, stream: SessionStream, cam: int) -> None:
        """Declare lost what the receiver demonstrably did not record of a sealed segment.

        The receiver records a camera's messages in the order they came, and a run's
        frames become durable in order. Recorded, the segment's owed seqs and the seq
        after its last, sent next by the fill lane, would be one run: that one durable
        and the segment's first owed seq not means the receiver got past the segment
        without recording it (it could not open it: bit rot on the card, say). Sent
        again, it would be refused again, and the acks (cumulative) would never pass
        it: the session would never settle, and every session behind it would wait.
        Its range, up to what the receiver does hold, is declared lost. Nothing here
        depends on time, so a slow link cannot cause it. (Footage of other runs, live
        say, is no proof: runs are made durable each by its own fsync, in no order.)
        Nor is ``last + 1`` held before this plan's footage reached the receiver (live
        footage of an earlier connection, whose acks this agent never got): that run
        holds it whether or not the segment was recorded. What the receiver held then
        is its first ack after the ``session_open``; until it comes nothing is judged.
        """
        lane = self._lanes[cam]
        if lane.before is None:
            return
        acked_before, holds_before = lane.before
        for sent in list(lane.unproven):
            if stream.held(cam, sent.first):
                lane.unproven.remove(sent)  # recorded
                continue
            if not (sent.followed and stream.held(cam, sent.last + 1)):
                continue
            after = sent.last + 1
            if after <= acked_before or any(f <= after <= t for f, t in holds_before):
                continue  # no proof: it may still be recorded, or stay owed
            lane.unproven.remove(sent)
            above = [f for f, _ in stream.holds[cam] if f > sent.first]
            last = min([sent.last, *(f - 1 for f in above)])
            end = stream.end_seq[cam]
            if end is not None:
                last = min(last, end)
            declared = stream.unrecorded[cam]
            if last < sent.first or any(f <= sent.first <= t for f, t in declared):
                continue
            declared.append((sent.first, last))
            declared.sort()
            camera = stream.open.cameras[cam].id
            log.error(
                "session %s camera %s: the receiver did not record sealed segment %s "
                "(seqs %d..%d; it could not open it?); declared lost",
                stream.id, camera, sent.file, sent.first, last,
            )  # fmt: skip
            stream.gaps += 1
            self.stats.gaps_declared += 1
            self.stats.segments_unrecorded += 1
            self._audit(
                "segment_unrecorded",
                session=stream.id,
                camera=camera,
                file=sent.file,
                first_seq=sent.first,
                last_seq=last,
            )
            if stream.close_sent:
                # Closed before this was known: open it again to declare it.
                stream.close_sent = False
                if stream is self._head():
                    self._opened_on_conn = None
            self._wake.set()

    def _next_unrecorded(self, stream: SessionStream) -> p.Gap | None:
        """The next range the receiver could not record, to declare lost on this plan."""
        for cam, ranges in enumerate(stream.unrecorded):
            sent = stream.unrecorded_sent[cam]
            if sent < len(ranges):
                stream.unrecorded_sent[cam] = sent + 1
                first, last = ranges[sent]
                return p.Gap(stream.id, cam, first, last, "lost")
        return None

    def _on_chain_ack(self, ack: p.ChainAck) -> None:
        stream = self.stream(ack.session)
        if stream is None or not 0 <= ack.camera < len(stream.chain):
            return
        queue = stream.chain[ack.camera]
        for i, cp in enumerate(queue):
            if (cp.first, cp.last) == (ack.first, ack.last):
                del queue[i]
                if i < stream.chain_sent[ack.camera]:
                    stream.chain_sent[ack.camera] -= 1
                break
        if ack.result == "ok":
            self.stats.checkpoints_acked += 1
        else:
            self.stats.checkpoints_refused += 1
            log.error(
                "receiver refused the chain checkpoint of session %s camera %s seqs %d..%d: %s",
                ack.session,
                stream.open.cameras[ack.camera].id,
                ack.first,
                ack.last,
                ack.result,
            )
        self._progress.notify()
        if stream.settled():
            self._remove(stream)

    def _next_checkpoint(self, stream: SessionStream) -> p.Chain | None:
        """The next chain checkpoint of ``stream`` not sent on this connection yet.

        A camera's checkpoints wait until the receiver holds one of its frames from
        after the press (or its footage ended): the pre-roll's, one a second or so, all
        come at the press, and the receiver's work on them held up that first frame
        (trigger_to_live_frame p99 200-260 ms; 80 ms without them).
        """
        for cam, queue in enumerate(stream.chain):
            sent = stream.chain_sent[cam]
            waiting = stream.newest(cam) <= stream.preroll_end[cam] and stream.end_seq[cam] is None
            if sent < len(queue) and not waiting:
                stream.chain_sent[cam] = sent + 1
                return hash_chain.to_wire(queue[sent], stream.id, cam)
        return None

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
                    if exc.code in FATAL_CODES or exc.code.startswith("enrollment_"):
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
                except Exception as exc:  # a bug of ours: never the end of the uplink
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("uplink to %s failed unexpectedly", self.url)
                    delay = self.reconnect_max_s
                    self._changed()
                finally:
                    if self.connected:
                        self.connected = False
                        self._changed()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter only
                delay = min(delay * 2, self.reconnect_max_s)

    async def _connect_once(self, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(
            self.url,
            ssl=self._fingerprint,
            max_msg_size=p.MAX_CONTROL_BYTES,
            autoping=True,
            headers={p.FEATURES_HEADER: p.WELCOME_RECIPIENTS},
        ) as ws:
            conn = p.Uplink(p.Role.AGENT)
            welcome = await self._handshake(ws, conn)
            self._conn = conn
            self.connected = True
            self.stats.connects += 1
            self._resume(welcome)
            self._check_sealing(welcome.recipients)
            self._changed()
            log.info("uplink connected to %s", self.url)
            reader = asyncio.create_task(
                self._reader(ws, conn, welcome.heartbeat_s), name="uplink-reader"
            )
            # The receiver cuts a device it has not heard from in three of its heartbeats:
            # never beat slower than it asks, whatever this device's own setting.
            beat_s = min(self.heartbeat_s, welcome.heartbeat_s)
            if beat_s < self.heartbeat_s:
                log.info(
                    "heartbeat every %.3g s, as the receiver asks (uplink.heartbeat_s is %.3g)",
                    beat_s, self.heartbeat_s,
                )  # fmt: skip
            writer = asyncio.create_task(self._writer(ws, conn, beat_s), name="uplink-writer")
            try:
                await connection_outcome(reader, writer)
            finally:
                for task in (reader, writer):
                    task.cancel()
                # The other task may have failed too (a closing transport): retrieved here.
                # Not by suppressing CancelledError around awaiting them: a cancellation of
                # this task (the agent stopping) landing then was swallowed, and the uplink
                # reconnected and ran on, so the agent never finished stopping.
                await asyncio.gather(reader, writer, return_exceptions=True)
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
        await ws.send_str(_text(conn.send(p.Hello(self.device_id, p.b64url(sig), self.enrollment))))
        event = await self._receive(ws, conn, 10)
        if isinstance(event, p.Error):
            raise UplinkRefused(event.code, event.detail)
        assert isinstance(event, p.Welcome)
        return event

    def _check_sealing(self, receiver: tuple[str, ...]) -> None:
        """Whether the receiver can open what the store seals (a fault if not; audited
        when it becomes so, and when it is mended). Its welcome names the recipients of
        its identities; a receiver from before that (or without an identity) names none:
        nothing to check, and a fault from another receiver's welcome does not stand."""
        if not receiver:
            if self.sealing_fault is not None:
                self.sealing_fault = None
                log.warning("the receiver names no age recipients: sealing not checked")
            return
        if any(r in self.sealed_to for r in receiver):
            if self.sealing_fault is not None:
                self.sealing_fault = None
                log.warning("the receiver can open this device's sealed segments again")
                self._audit("store_sealing_mended", receiver_recipients=list(receiver))
            return
        fault = (
            f"[store] recipients ({len(self.sealed_to)}) do not include the receiver's "
            f"({', '.join(receiver)}): footage it must fetch from the store after an "
            "outage or a restart cannot be opened there; add the receiver's recipient "
            "(breakglass receiver serve prints it)"
        )
        if fault != self.sealing_fault:
            self.sealing_fault = fault
            log.error("%s", fault)
            self._audit(
                "store_not_sealed_to_receiver",
                receiver_recipients=list(receiver),
                store_recipients=sorted(self.sealed_to),
            )

    def _audit(self, event: str, **fields: Any) -> None:
        """An entry in the device's audit trail (through the store's; none without one)."""
        if self.store is not None:
            self.store.audit.record_soon(event, **fields)

    def _resume(self, welcome: p.Welcome) -> None:
        """Forget what the receiver already holds; plan the rest again on session_open."""
        for stream in list(self.streams):
            for cam, seq in welcome.acked.get(stream.id, {}).items():
                index = next((c.index for c in stream.open.cameras if c.id == cam), None)
                if index is not None:
                    self._on_ack(p.Ack(stream.id, index, seq))
            stream.close_sent = False
            stream.chain_sent = [0 for _ in stream.chain]  # unanswered ones go again
        self._live.clear()
        self._lanes = []
        self.audit_acked = min(welcome.audit_n, self._trail_head())
        self._audit_inflight = False
        self._audit_refused = False
        self._control.clear()  # answers for the old connection's receiver-side requests

    def _plan(self, stream: SessionStream) -> p.SessionOpen:
        """Plan this connection's lanes for ``stream``; returns the session_open to send.

        Live starts at the newest keyframe RAM holds beyond the acknowledged seq (at the
        press GOP on first open), or at the next keyframe to arrive; everything owed
        below it is the fill lane's: RAM packets (a window at a time), sealed
        segments from the store, or a declared gap for what exists nowhere.
        """
        first_open, stream.opened = not stream.opened, True
        stream.unrecorded_sent = [0 for _ in stream.unrecorded]  # declared again, in order
        self._live.inflight.clear()
        self._lanes, tails = [], []
        cameras = list(stream.open.cameras)
        for cam, ram in enumerate(stream.ram):
            desc, acked = cameras[cam], stream.acked[cam]
            end = stream.end_seq[cam]
            live_from: int | None
            if end is not None:  # ended: no live lane, fill up to the end
                lane = _Lane(None, [[acked + 1, end]] if end > acked else [])
                live_from = end + 1
            else:
                # A camera with nothing in RAM (resumed while it is still down) goes live
                # at its next keyframe; until then the fill lane sends what is stored.
                live_from = desc.live_seq if first_open and desc.live_seq > acked and ram else None
                if live_from is None:
                    key = next((k for k in reversed(ram) if k.keyframe and k.seq > acked), None)
                    live_from = None if key is None else key.seq
                lane = _Lane(
                    live_from,
                    [[acked + 1, None if live_from is None else live_from - 1]],
                )
                if live_from is not None:
                    tails.append([(cam, pkt) for pkt in ram if pkt.seq >= live_from])
            lane.todo = [r for r in lane.todo if r[1] is None or r[0] <= r[1]]  # type: ignore[operator]
            self._lanes.append(lane)
            shown = live_from if live_from is not None else max(acked + 1, desc.first_seq)
            cameras[cam] = replace(desc, live_seq=max(desc.first_seq, shown), end_seq=end)
        self._live.queue = deque(heapq.merge(*tails, key=lambda item: item[1].mono_ns))
        stream.open = replace(stream.open, cameras=tuple(cameras))
        return stream.open

    def _fill_item(
        self, stream: SessionStream
    ) -> tuple[int, EncodedPacket | StoredSegment | p.Gap] | None:
        """The next thing the fill lane may send now, round-robin over cameras."""
        n = len(self._lanes)
        for k in range(n):
            cam = (self._rr + k) % n
            item = self._fill_one(stream, cam)
            if item is not None:
                self._rr = (cam + 1) % n
                return cam, item
        return None

    def _fill_one(
        self, stream: SessionStream, cam: int
    ) -> EncodedPacket | StoredSegment | p.Gap | None:
        lane = self._lanes[cam]
        if lane.paused_until > time.monotonic():
            return None
        while lane.todo:
            first, last = lane.todo[0]
            assert first is not None
            seq = max(first, stream.acked[cam] + 1)
            for held_first, held_last in stream.holds[cam]:  # never resend what it holds
                if held_first <= seq <= held_last:
                    seq = held_last + 1
            for bad_first, bad_last in stream.unrecorded[cam]:  # nor what it cannot record
                if bad_first <= seq <= bad_last:
                    seq = bad_last + 1
            if last is not None and seq > last:
                lane.todo.pop(0)
                continue
            lane.todo[0][0] = seq
            ram = stream.ram[cam]
            live = stream.end_seq[cam] is None
            if ram and ram[0].seq <= seq <= ram[-1].seq:
                if lane.inflight and seq - stream.acked[cam] > BACKLOG_WINDOW:
                    return None
                pkt = ram[seq - ram[0].seq]
                if pkt.seq != seq:  # RAM holds more than one run (after a restart)
                    pkt = next((x for x in ram if x.seq == seq), pkt)
                if pkt.seq == seq:
                    if live and not self._fill_fits(len(pkt.payload)):
                        return None
                    lane.todo[0][0] = seq + 1
                    lane.inflight.append((seq, False, len(pkt.payload)))
                    return pkt
            seg, unsealed = (None, None)
            if self.store is not None:
                seg, unsealed = self.store.locate(stream.open.cameras[cam].id, seq)
            if seg is not None and seg.first_seq <= seq:
                if sum(1 for _, sealed, _ in lane.inflight if sealed) >= SEGMENT_WINDOW:
                    return None
                if live and not self._fill_fits(seg.name.size):
                    return None
                lane.todo[0][0] = seg.last_seq + 1
                lane.inflight.append((seg.last_seq, True, seg.name.size))
                lane.owed_from[seg.first_seq] = seq
                return seg
            # Nowhere yet: wait for the segment being filled, or declare what is gone.
            later = [
                seq2
                for seq2 in (
                    None if seg is None else seg.first_seq,
                    unsealed,
                    ram[0].seq if ram else None,
                )
                if seq2 is not None
            ]
            if not later or min(later) <= seq:
                return None
            resume = min(later)
            if ram and resume == ram[0].seq and not ram[0].keyframe:
                # What follows a hole must start at a keyframe (the receiver cannot decode,
                # so does not record, a run that starts mid-GOP): the hole takes the rest
                # of that GOP too.
                key = next((x.seq for x in ram if x.keyframe), None)
                if key is None:
                    return None
                resume = key
            upto = resume - 1 if last is None else min(resume - 1, last)
            lane.todo[0][0] = upto + 1
            return p.Gap(stream.id, cam, seq, upto, "lost")
        return None

    async def _reader(
        self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink, heartbeat_s: float
    ) -> None:
        while True:
            event = await self._receive(ws, conn, heartbeat_s * 3)
            if isinstance(event, p.Ack):
                self._on_ack(event)
            elif isinstance(event, p.ChainAck):
                self._on_chain_ack(event)
            elif isinstance(event, p.Trigger):
                body: Mapping[str, Any]
                if self._on_trigger is None:
                    status, body = 403, {"error": "unknown_key", "detail": "triggers are off"}
                else:
                    status, body = self._on_trigger(event.envelope)
                self._control.append(p.TriggerResult(event.ref, status, body))
                self._wake.set()
            elif isinstance(event, p.AuditAck):
                self._on_audit_ack(event)
            elif isinstance(event, p.AccessHead):
                if self._on_access_head is not None:
                    self._on_access_head(event.n, event.hash)
            elif isinstance(event, p.Error):
                raise UplinkRefused(event.code, event.detail)

    async def _writer(
        self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink, beat_s: float
    ) -> None:
        next_beat = 0.0
        while True:
            while self._control:
                await ws.send_str(_text(conn.send(self._control.popleft())))
            await self._ship_audit(ws, conn)
            stream = self._head()
            if stream is not None and self._opened_on_conn != stream.id:
                await ws.send_str(_text(conn.send(self._plan(stream))))
                self._opened_on_conn = stream.id
            while stream is not None and stream is self._head():
                declared = self._next_unrecorded(stream)
                if declared is not None:  # small, and what waits behind it depends on it
                    await ws.send_str(_text(conn.send(declared)))
                    continue
                if self._live.queue:
                    if self._live.behind(stream.newest, time.monotonic_ns()):
                        break  # wait for acks; meanwhile live may skip to a keyframe
                    cam, pkt = self._live.queue.popleft()
                    await self._send_packet(ws, conn, stream, cam, pkt)
                    self._live.sent(cam, pkt, time.monotonic_ns())
                    continue
                if self._live.in_flight(stream.newest, time.monotonic_ns()):
                    break  # backfill only uses the link while no live packet awaits its ack
                checkpoint = self._next_checkpoint(stream)
                if checkpoint is not None:  # small: ahead of the fill lane's footage
                    await ws.send_str(_text(conn.send(checkpoint)))
                    self.stats.checkpoints_sent += 1
                    continue
                item = self._fill_item(stream)
                if item is None:
                    break
                cam, what = item
                if isinstance(what, EncodedPacket):
                    await self._send_packet(ws, conn, stream, cam, what)
                    self._filled(stream, cam, what.seq)
                elif isinstance(what, p.Gap):
                    log.error(
                        "session %s camera %s: seqs %d..%d exist nowhere any more; declared lost",
                        stream.id, stream.open.cameras[cam].id, what.first, what.last,
                    )  # fmt: skip
                    stream.gaps += 1
                    self.stats.gaps_declared += 1
                    await ws.send_str(_text(conn.send(what)))
                else:
                    await self._send_segment(ws, conn, cam, what)
            drained = (
                not self._live.queue
                and not any(lane.todo for lane in self._lanes)
                and (
                    stream is None
                    or (
                        all(
                            sent >= len(q)
                            for sent, q in zip(stream.chain_sent, stream.chain, strict=True)
                        )
                        and all(
                            sent >= len(r)
                            for sent, r in zip(
                                stream.unrecorded_sent, stream.unrecorded, strict=True
                            )
                        )
                    )
                )
            )
            if (
                drained
                and stream is not None
                and stream is self._head()
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
                next_beat = now + beat_s
            self._wake.clear()
            if self._head() is not stream or (
                self._live.queue
                and not self._live.behind(
                    None if stream is None else stream.newest, time.monotonic_ns()
                )
            ):
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_beat - now)):  # no task per wait
                    await self._wake.wait()

    def _on_audit_ack(self, ack: p.AuditAck) -> None:
        # Never beyond what this device has: a receiver that claims more would stop the
        # trail from being shipped.
        if self._audit_inflight and ack.n <= self.audit_acked and not self._audit_refused:
            self._audit_refused = True
            log.error(
                "the receiver holds another audit trail for this device (it took none of"
                " entries %d on): not sent again until the next connection",
                self.audit_acked + 1,
            )
        self.audit_acked = max(self.audit_acked, min(ack.n, self._trail_head()))
        self._audit_inflight = False
        self._progress.notify()
        self._wake.set()

    def _trail_head(self) -> int:
        """The last entry of this device's audit trail (0 without a trail)."""
        return 0 if self._audit_head is None else self._audit_head()

    async def _ship_audit(self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink) -> None:
        """Send the next batch of audit entries the receiver lacks (one batch in flight)."""
        feed, head = self._audit_feed, self._audit_head
        if (
            feed is None
            or head is None
            or self._audit_inflight
            or self._audit_refused
            or head() <= self.audit_acked
        ):
            return
        first, lines = await asyncio.to_thread(feed.after, self.audit_acked)
        if lines:
            await ws.send_str(_text(conn.send(p.AuditEntries(first, lines))))
            self._audit_inflight = True

    def _fill_fits(self, nbytes: int) -> bool:
        """Whether backfill of ``nbytes`` more stays within the live session's budget."""
        inflight = sum(n for lane in self._lanes for _, _, n in lane.inflight)
        return fill_fits(self._goodput.rate(time.monotonic_ns()), inflight, nbytes)

    async def _send_packet(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        conn: p.Uplink,
        stream: SessionStream,
        cam: int,
        pkt: EncodedPacket,
    ) -> None:
        await ws.send_bytes(_binary(conn.send(stream.media(cam, pkt))))
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(pkt.payload)

    async def _send_segment(
        self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink, cam: int, seg: StoredSegment
    ) -> None:
        try:
            sealed = await asyncio.to_thread(SegmentStore.read, seg)
        except OSError as exc:
            # Gone (evicted meanwhile, or deleted): the store forgets it, and the lane
            # sends what else holds its range or declares it lost. Unreadable for now
            # (EIO, EMFILE): its range is owed again, tried after a pause.
            log.warning("segment %s could not be read for sending: %s", seg.path.name, exc)
            lane = self._lanes[cam]
            if isinstance(exc, FileNotFoundError):
                if self.store is not None:
                    self.store.forget(seg, f"{type(exc).__name__}: {exc}")
            else:
                lane.paused_until = time.monotonic() + SEGMENT_RETRY_S
            lane.owed_from.pop(seg.first_seq, None)
            with contextlib.suppress(ValueError):
                lane.inflight.remove((seg.last_seq, True, seg.name.size))
            lane.todo.append([seg.first_seq, seg.last_seq])
            lane.todo.sort(key=lambda r: r[0] or 0)
            return
        media = p.Media(
            p.MediaKind.BACKFILL_SEALED,
            cam,
            seg.first_seq,
            seg.name.start_ms * 1000,
            True,
            False,
            sealed,
        )
        await ws.send_bytes(_binary(conn.send(media)))
        self.stats.segments_sent += 1
        self.stats.segment_bytes_sent += len(sealed)
        stream = self._head()
        if stream is None or cam >= len(self._lanes):
            return
        lane = self._lanes[cam]
        owed = lane.owed_from.pop(seg.first_seq, seg.first_seq)
        self._filled(stream, cam, owed)
        end = stream.end_seq[cam]
        if min(seg.last_seq, seg.last_seq if end is None else end) > owed:
            # Two owed seqs at least: the first is durable once the second is written. (A
            # lone one is the last frame of its run, durable only when the next comes.)
            lane.unproven.append(_SentSegment(owed, seg.last_seq, seg.path.name))


def _text(wire: str | bytes) -> str:
    assert isinstance(wire, str)  # control events always serialize to text
    return wire


def _binary(wire: str | bytes) -> bytes:
    assert isinstance(wire, bytes)  # media always serializes to bytes
    return wire
