"""The live lane's rules, without I/O: is live behind, what does the link deliver.

One connection of the uplink sends a session's newest packets first (the live
lane) and fills in what the receiver lacks behind them (the fill lane). On a link
slower than the cameras, socket buffers could hold minutes of video, so the rules
here measure the link by the receiver's acknowledgements instead:

- a live packet is *delivered* once the receiver holds it; until then it is in
  flight, and the oldest one in flight says how far behind live is;
- delivered bytes over the last :data:`GOODPUT_WINDOW_S` are the link's goodput;
  what is in flight (and queued) divided by it predicts the lag before it happens;
- live is *behind* when either passes ``lag_s``: the uplink then stops feeding the
  socket, and at the next keyframe of a camera whose queue is that old it skips the
  queue (:meth:`LiveLane.skip`); the fill lane sends the skipped range later;
- while a session is live, backfill in flight stays within what the link delivers
  in :data:`FILL_BUDGET_S` (:func:`fill_fits`).

Times are passed in (``time.monotonic_ns()`` values), so the rules are tested with
any clock; :class:`agent.uplink.UplinkClient` is the asyncio shell around them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from hardware import EncodedPacket

__all__ = [
    "FILL_BUDGET_S",
    "FILL_MIN_BYTES",
    "GOODPUT_MIN_SPAN_S",
    "GOODPUT_WINDOW_S",
    "LIVE_LAG_S",
    "Goodput",
    "LiveLane",
    "fill_fits",
]

#: Live packets of a camera may queue this long before live skips to the next keyframe.
LIVE_LAG_S = 1.0
#: While a session is live, backfill in flight is kept to what the link delivers in this
#: long (measured from acks), so it never queues seconds of video in front of live.
FILL_BUDGET_S = 0.25
FILL_MIN_BYTES = 32 * 1024
GOODPUT_WINDOW_S = 2.0
GOODPUT_MIN_SPAN_S = 0.5

_NS = 1_000_000_000

#: The newest seq the receiver holds of a camera (by index), contiguously from the
#: start: ``SessionStream.newest``; None when no session is at the head.
Newest = Callable[[int], int] | None


class Goodput:
    """Bytes the receiver acknowledged over the last :data:`GOODPUT_WINDOW_S`."""

    def __init__(self) -> None:
        self._delivered: deque[tuple[int, int]] = deque()  # (now_ns, bytes)
        self._bytes = 0  # the sum over _delivered

    def count(self, nbytes: int, now_ns: int) -> None:
        """``nbytes`` were delivered at ``now_ns``."""
        self._delivered.append((now_ns, nbytes))
        self._bytes += nbytes
        self._forget(now_ns)

    def rate(self, now_ns: int) -> float:
        """Bytes per second delivered over the window (0.0: nothing measured)."""
        self._forget(now_ns)
        if not self._delivered:
            return 0.0
        # A window not yet full (a new connection) is measured over what it spans.
        spanned = (now_ns - self._delivered[0][0]) / _NS
        return self._bytes / min(GOODPUT_WINDOW_S, max(GOODPUT_MIN_SPAN_S, spanned))

    def _forget(self, now_ns: int) -> None:
        oldest = now_ns - GOODPUT_WINDOW_S * _NS
        while self._delivered and self._delivered[0][0] < oldest:
            self._bytes -= self._delivered.popleft()[1]


class LiveLane:
    """One connection's live packets: queued (sent before anything else) and in flight."""

    def __init__(self, lag_s: float, goodput: Goodput) -> None:
        self.lag_s = lag_s
        self.goodput = goodput
        #: (camera index, packet), oldest capture first.
        self.queue: deque[tuple[int, EncodedPacket]] = deque()
        #: Sent and not yet held by the receiver: (camera, packet, ``now_ns`` when sent).
        self.inflight: deque[tuple[int, EncodedPacket, int]] = deque()

    def clear(self) -> None:
        """A new connection: nothing queued, nothing in flight."""
        self.queue.clear()
        self.inflight.clear()

    def sent(self, camera: int, packet: EncodedPacket, now_ns: int) -> None:
        """``packet`` (taken from :attr:`queue`) went out at ``now_ns``."""
        self.inflight.append((camera, packet, now_ns))

    def waiting_since(self, newest: Newest, now_ns: int) -> int | None:
        """Since when the longest-waiting live packet awaits delivery (None: none waits).

        Counts what the receiver now holds as delivered (:attr:`goodput`) first:
        wherever it is in flight, not only at the head. A camera's packet the receiver
        cannot hold yet (its successor was skipped: it waits for backfill) may stay in
        flight for long; taken from the head only, it kept every other camera's packets
        behind it in flight, delivered or not, and one of them "waited" for ever: live
        stopped, and so did backfill, until the session ended (found by a review).
        """
        inflight = self.inflight
        if inflight and any(newest is None or newest(cam) >= pkt.seq for cam, pkt, _ in inflight):
            kept: deque[tuple[int, EncodedPacket, int]] = deque()
            for item in inflight:
                if newest is None or newest(item[0]) >= item[1].seq:
                    self.goodput.count(len(item[1].payload), now_ns)
                else:
                    kept.append(item)
            self.inflight = inflight = kept
        # The receiver's muxer writes a frame only when the next one of its run arrives
        # (DECISIONS.md): a packet can be acknowledged, and so waits, from the moment its
        # successor was sent.
        previous: dict[int, EncodedPacket] = {}
        since: int | None = None
        for cam, pkt, sent_ns in inflight:
            before = previous.get(cam)
            if before is not None and before.seq + 1 == pkt.seq:
                since = sent_ns if since is None else min(since, sent_ns)
            previous[cam] = pkt
        return since

    def in_flight(self, newest: Newest, now_ns: int) -> bool:
        """Whether a live packet sent on this connection awaits delivery."""
        return self.waiting_since(newest, now_ns) is not None

    def behind(self, newest: Newest, now_ns: int) -> bool:
        """Whether live is behind: a packet has waited ``lag_s``, or what is in flight
        takes that long to deliver at the goodput."""
        since = self.waiting_since(newest, now_ns)
        if since is None:
            return False
        waited = now_ns - since > self.lag_s * _NS
        return waited or self.backlog_s(now_ns, queued=False) > self.lag_s

    def backlog_s(self, now_ns: int, *, queued: bool = True) -> float:
        """How long the live bytes in flight (and ``queued``) take to deliver at the goodput.

        Predicts the lag before it happens: on a link slower than the cameras the
        socket buffers fill and the queue grows a little every GOP, long before the
        oldest packet has waited ``lag_s``. 0.0 while nothing is measured (then the
        age rule decides).
        """
        goodput = self.goodput.rate(now_ns)
        if goodput == 0:
            return 0.0
        backlog = sum(len(pkt.payload) for _, pkt, _ in self.inflight)
        if queued:
            backlog += sum(len(pkt.payload) for _, pkt in self.queue)
        return backlog / goodput

    def skip(self, camera: int, keyframe: EncodedPacket, newest: Newest, now_ns: int) -> int | None:
        """At ``keyframe`` of ``camera`` (not queued yet): drop the camera's queue if live is
        behind or its oldest queued packet is ``lag_s`` older than the keyframe; returns
        the first seq dropped (the fill lane owes it up to the keyframe), or None."""
        oldest = next((pkt for cam, pkt in self.queue if cam == camera), None)
        if oldest is None or (
            keyframe.mono_ns - oldest.mono_ns < self.lag_s * _NS
            and not self.behind(newest, now_ns)
            and self.backlog_s(now_ns) < self.lag_s
        ):
            return None
        self.queue = deque(item for item in self.queue if item[0] != camera)
        return oldest.seq


def fill_fits(goodput: float, inflight: int, nbytes: int) -> bool:
    """Whether backfill of ``nbytes`` more, with ``inflight`` bytes of it in flight, stays
    within a live session's budget at ``goodput`` bytes per second."""
    if inflight == 0:
        return True  # one item at a time always moves (the link kept up with live)
    return inflight + nbytes <= max(FILL_MIN_BYTES, goodput * FILL_BUDGET_S)
