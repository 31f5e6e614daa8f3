"""PreRoll properties: starts at a keyframe, bounded, keeps the newest packet."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.preroll import PreRoll
from hardware import EncodedPacket

SECOND = 1_000_000_000


def packet(seq: int, t_ns: int, key: bool, size: int) -> EncodedPacket:
    return EncodedPacket("cam", seq, t_ns, t_ns, key, "h264", bytes(size))


streams = st.lists(
    st.tuples(st.booleans(), st.integers(1, 2000), st.integers(1, SECOND // 2)),
    min_size=1,
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(streams, st.floats(0, 5), st.integers(1000, 200_000))
def test_preroll_properties(
    stream: list[tuple[bool, int, int]], seconds: float, max_bytes: int
) -> None:
    ring = PreRoll(seconds, max_bytes)
    t = 0
    gop_start: int | None = None  # index of the newest keyframe in `pushed`
    pushed: list[EncodedPacket] = []
    for seq, (key, size, gap) in enumerate(stream):
        t += gap
        pkt = packet(seq, t, key, size)
        pushed.append(pkt)
        if key:
            gop_start = seq
        ring.push(pkt)
        snap = ring.snapshot()
        # starts at a keyframe (or is empty), contiguous, bounded in bytes
        assert not snap or snap[0].keyframe
        assert (
            [p.seq for p in snap] == list(range(snap[0].seq, snap[0].seq + len(snap)))
            if snap
            else True
        )
        assert sum(len(p.payload) for p in snap) <= max_bytes
        assert ring.bytes == sum(len(p.payload) for p in snap)
        # never loses the newest packet, unless its whole GOP cannot fit
        if gop_start is not None and sum(len(p.payload) for p in pushed[gop_start:]) <= max_bytes:
            assert snap and snap[-1] is pkt
        # time bound: it keeps the latest keyframe at or before newest - window, no older one
        if snap:
            keys_after_first = [p for p in snap[1:] if p.keyframe]
            for k in keys_after_first[:1]:
                assert t - k.capture_ns < seconds * 1e9


def test_window_spans_at_least_the_preroll_when_history_allows() -> None:
    ring = PreRoll(2.0, 10**9)
    for i in range(100):  # 10 fps, keyframe every 10 packets
        ring.push(packet(i, i * SECOND // 10, i % 10 == 0, 100))
    snap = ring.snapshot()
    assert snap[0].keyframe
    span = snap[-1].capture_ns - snap[0].capture_ns
    assert 2 * SECOND <= span < 3 * SECOND


def test_waits_for_a_keyframe_after_an_oversized_gop() -> None:
    ring = PreRoll(30, 1000)
    ring.push(packet(0, 0, True, 600))
    ring.push(packet(1, 1, False, 600))  # GOP now 1200 > 1000: dropped whole
    assert ring.snapshot() == []
    ring.push(packet(2, 2, False, 10))  # not decodable alone
    assert ring.snapshot() == []
    ring.push(packet(3, 3, True, 10))
    assert [p.seq for p in ring.snapshot()] == [3]


def test_a_snapshot_at_a_press_holds_only_the_window_before_it() -> None:
    """The ring is trimmed when a packet arrives: a camera that stopped sending 40 s
    before a press still held what it sent last, and sent it as 44 s old pre-roll
    (interior footage from before the window the agreement allows). A snapshot taken
    with the press's monotonic time holds only the window before it."""
    ring = PreRoll(30, 1 << 30)
    for i in range(300):  # 10 s at 30 fps, a keyframe a second
        ring.push(packet(i, i * SECOND // 30, i % 30 == 0, 100))
    last = 299 * SECOND // 30
    assert ring.snapshot(last + 40 * SECOND) == []  # down for 40 s: nothing of it
    held = ring.snapshot(last + 25 * SECOND)  # window from 5 s into it: its GOP on
    assert held[0].seq == 120 and held[0].keyframe and held[-1].seq == 299
    assert ring.snapshot(last) == ring.snapshot()  # all of it is within the window


def test_a_snapshot_skips_a_gop_that_ended_before_the_window() -> None:
    """A camera down for a minute comes back: the GOP it sent last before going down
    spans no part of the window, and is not sent with the new keyframe."""
    ring = PreRoll(30, 1 << 30)
    for i in range(60):
        ring.push(packet(i, i * SECOND // 30, i % 30 == 0, 100))
    back = 60 * SECOND  # a minute later
    for i in range(60, 70):
        ring.push(packet(i, back + (i - 60) * SECOND // 30, i == 60, 100))
    held = ring.snapshot(back + SECOND)
    assert [p.seq for p in held] == list(range(60, 70))
