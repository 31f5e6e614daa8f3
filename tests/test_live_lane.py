"""The live lane's rules on a made-up clock (agent.live_lane): when live is behind,
what the link delivers, when live skips to a keyframe, how much backfill may fly.

The end-to-end behaviour (a throttled link, a network cut) is in
tests/test_store_and_forward.py; here each rule is pinned down at its edges.
"""

from __future__ import annotations

import pytest

from agent.live_lane import (
    FILL_BUDGET_S,
    FILL_MIN_BYTES,
    GOODPUT_MIN_SPAN_S,
    GOODPUT_WINDOW_S,
    Goodput,
    LiveLane,
    fill_fits,
)
from hardware import EncodedPacket

S = 1_000_000_000  # ns
FRAME_NS = 40_000_000  # 25 frames a second


def packet(
    seq: int, *, size: int = 1000, keyframe: bool = False, camera: str = "c"
) -> EncodedPacket:
    return EncodedPacket(camera, seq, seq * FRAME_NS, seq * FRAME_NS, keyframe, "h264", bytes(size))


class Held:
    """What the receiver holds, per camera index (``SessionStream.newest``)."""

    def __init__(self) -> None:
        self.newest: dict[int, int] = {}

    def __call__(self, camera: int) -> int:
        return self.newest.get(camera, -1)


def test_goodput_is_measured_over_the_window_and_forgets_what_is_older() -> None:
    goodput = Goodput()
    assert goodput.rate(0) == 0.0
    goodput.count(100_000, 10 * S)
    # A window not yet full counts at least GOODPUT_MIN_SPAN_S: no burst looks infinite.
    assert goodput.rate(10 * S) == pytest.approx(100_000 / GOODPUT_MIN_SPAN_S)
    goodput.count(100_000, 11 * S)
    assert goodput.rate(11 * S) == pytest.approx(200_000 / 1.0)
    assert goodput.rate(12 * S) == pytest.approx(200_000 / GOODPUT_WINDOW_S)
    # The first delivery leaves the window; the second one, a second old, is all that
    # counts, over the second it spans.
    assert goodput.rate(12 * S + 1) == pytest.approx(100_000 / 1.0)
    assert goodput.rate(13 * S + 1) == 0.0


def test_a_live_packet_waits_from_when_its_successor_was_sent() -> None:
    """The receiver's muxer writes a frame when the next one of its run arrives, so a
    lone packet in flight is not late, however old."""
    lane, held = LiveLane(1.0, Goodput()), Held()
    lane.sent(0, packet(10), 0)
    assert lane.waiting_since(held, 5 * S) is None
    assert not lane.in_flight(held, 5 * S)
    assert not lane.behind(held, 5 * S)
    lane.sent(0, packet(11), 6 * S)
    assert lane.waiting_since(held, 6 * S) == 6 * S
    assert not lane.behind(held, 7 * S)  # waited exactly lag_s: not yet
    assert lane.behind(held, 7 * S + 1)
    held.newest[0] = 10  # delivered: counted into the goodput, off the lane
    assert lane.waiting_since(held, 7 * S + 1) is None
    assert [p.seq for _, p, _ in lane.inflight] == [11]
    assert lane.goodput.rate(7 * S + 1) > 0


def test_packets_of_different_cameras_do_not_make_each_other_wait() -> None:
    lane, held = LiveLane(1.0, Goodput()), Held()
    lane.sent(0, packet(10), 0)
    lane.sent(1, packet(11), S // 10)  # seq 11 of another camera: not a successor
    assert lane.waiting_since(held, 5 * S) is None
    lane.sent(1, packet(12), S // 5)
    assert lane.waiting_since(held, 5 * S) == S // 5


def test_a_packet_that_cannot_be_held_yet_does_not_keep_others_in_flight() -> None:
    """Live skipped camera 1 past seq 153 (the link stalled): its 152 stays undelivered
    until backfill sends 153. Camera 0's 153 and 154, sent after it and delivered, were
    kept in flight behind it, and 154 "waited" for ever: live never sent again, nor did
    backfill (it waits while live does), until the session ended (a review's flood of
    idle connections froze a live emergency for 11 minutes)."""
    lane, held = LiveLane(1.0, Goodput()), Held()
    lane.sent(1, packet(152), 0)
    for seq in (153, 154, 155):
        lane.sent(0, packet(seq), seq * S // 100)
    held.newest.update({0: 154, 1: 151})
    assert lane.waiting_since(held, 10 * S) is None  # 155 waits for 156; 152 for 153
    assert [(cam, p.seq) for cam, p, _ in lane.inflight] == [(1, 152), (0, 155)]
    assert not lane.behind(held, 10 * S)
    assert not lane.in_flight(held, 10 * S)  # backfill may send 153 of camera 1 now
    assert lane.goodput.rate(10 * S) > 0  # 153 and 154 counted as delivered


def test_no_session_at_the_head_counts_everything_in_flight_as_delivered() -> None:
    lane = LiveLane(1.0, Goodput())
    lane.sent(0, packet(1), 0)
    lane.sent(0, packet(2), 0)
    assert lane.waiting_since(None, S) is None
    assert not lane.inflight


def test_live_is_behind_when_what_is_in_flight_takes_lag_s_to_deliver() -> None:
    """The backlog rule predicts the lag before any packet has waited lag_s."""
    goodput = Goodput()
    goodput.count(50_000, 0)  # the link delivered 50 kB over GOODPUT_MIN_SPAN_S: 100 kB/s
    lane, held = LiveLane(1.0, goodput), Held()
    lane.sent(0, packet(1, size=60_000), 0)
    lane.sent(0, packet(2, size=30_000), 0)
    assert lane.backlog_s(0, queued=False) == pytest.approx(0.9)
    assert not lane.behind(held, 0)
    lane.sent(0, packet(3, size=20_000), 0)
    assert lane.backlog_s(0, queued=False) == pytest.approx(1.1)
    assert lane.behind(held, 0)
    lane.queue.append((0, packet(4, size=10_000)))
    assert lane.backlog_s(0) == pytest.approx(1.2)  # the queue counts unless told not to


def test_live_skips_at_a_keyframe_once_its_queue_is_lag_s_old() -> None:
    lane, held = LiveLane(1.0, Goodput()), Held()
    for seq in range(1, 25):
        lane.queue.append((0, packet(seq)))
        lane.queue.append((1, packet(seq, camera="d")))
    early = packet(25, keyframe=True)  # 24 frames after seq 1: under a second
    assert lane.skip(0, early, held, early.mono_ns) is None
    late = packet(26, keyframe=True)  # 25 frames: a second after seq 1
    assert lane.skip(0, late, held, late.mono_ns) == 1
    assert {cam for cam, _ in lane.queue} == {1}  # the other camera keeps its queue
    assert len(lane.queue) == 24
    assert lane.skip(0, late, held, late.mono_ns) is None  # nothing of camera 0 is queued


def test_live_skips_at_any_keyframe_while_behind() -> None:
    lane, held = LiveLane(1.0, Goodput()), Held()
    lane.sent(0, packet(1), 0)
    lane.sent(0, packet(2), 0)
    lane.queue.append((0, packet(3)))
    key = packet(4, keyframe=True)
    assert lane.skip(0, key, held, S) is None  # in flight for exactly lag_s
    assert lane.skip(0, key, held, S + 1) == 3
    assert not lane.queue


def test_lane_clear_forgets_the_connection() -> None:
    lane = LiveLane(1.0, Goodput())
    lane.queue.append((0, packet(1)))
    lane.sent(0, packet(0), 0)
    lane.clear()
    assert not lane.queue and not lane.inflight


def test_backfill_in_flight_stays_within_the_budget_while_live() -> None:
    assert fill_fits(0.0, 0, 10 * 1024 * 1024)  # one item always moves
    assert fill_fits(0.0, FILL_MIN_BYTES - 1000, 1000)
    assert not fill_fits(0.0, FILL_MIN_BYTES - 1000, 1001)
    rate = 1_000_000.0
    budget = rate * FILL_BUDGET_S
    assert budget > FILL_MIN_BYTES
    assert fill_fits(rate, 1, int(budget) - 1)
    assert not fill_fits(rate, 1, int(budget))
