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
