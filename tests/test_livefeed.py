"""LiveFeed: init first, start at a keyframe, skip slow viewers, end cleanly."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.livefeed import LiveFeed, Subscription

INIT = b"INIT"


def frag(n: int, key: bool) -> bytes:
    return f"{'K' if key else 'P'}{n:04d}".encode()


def is_key(data: bytes) -> bool:
    return data.startswith(b"K")


def push(feed: LiveFeed, n: int, key: bool) -> bytes:
    data = frag(n, key)
    feed.media_fragment(data, key, n * 33_333)
    return data


def drain(sub: Subscription) -> list[bytes]:
    """Everything queued right now, without waiting."""
    out = []
    while (data := sub.get_nowait()) is not None:
        out.append(data)
    return out


async def take(sub: Subscription, n: int) -> list[bytes]:
    return [await asyncio.wait_for(anext(sub), 5) for _ in range(n)]


async def test_new_subscriber_gets_init_then_cached_gop() -> None:
    feed = LiveFeed()
    push(feed, 0, True)  # before the init segment: nothing to decode it with
    feed.init_segment(INIT)
    sent = [push(feed, i, i % 5 == 0) for i in range(1, 13)]
    async with feed.subscribe() as sub:
        assert await take(sub, 4) == [INIT, sent[9], sent[10], sent[11]]  # from keyframe 10
        later = push(feed, 13, False)
        assert await take(sub, 1) == [later]
        assert feed.subscriber_count == 1
    assert feed.subscriber_count == 0


async def test_subscriber_before_init_waits_for_init_and_keyframe() -> None:
    feed = LiveFeed()
    sub = feed.subscribe()
    waiting = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0)
    assert not waiting.done()
    feed.init_segment(INIT)
    assert await asyncio.wait_for(waiting, 5) == INIT
    push(feed, 0, False)  # no keyframe yet: not decodable, not sent
    key = push(feed, 1, True)
    assert await take(sub, 1) == [key]
    sub.close()


async def test_slow_subscriber_is_skipped_to_a_keyframe() -> None:
    feed = LiveFeed(max_queue_fragments=6)
    feed.init_segment(INIT)
    fast = feed.subscribe()
    slow = feed.subscribe()
    assert drain(slow) == [INIT]
    sent = []
    for i in range(36):  # keyframe every 8; the slow queue holds 6
        sent.append(push(feed, i, i % 8 == 0))
        assert len(fast._queue) <= 7
        drain(fast)  # the fast one keeps up
        assert len(slow._queue) <= 6
    got = drain(slow)
    assert slow.skips >= 1
    assert slow.dropped + len(got) == 36
    assert is_key(got[0])
    assert got == sent[sent.index(got[0]) :]  # contiguous from that keyframe to now
    fast.close()
    slow.close()


async def test_long_gop_is_not_cached_beyond_its_budget() -> None:
    feed = LiveFeed(max_gop_bytes=12)
    feed.init_segment(INIT)
    for i in range(4):
        push(feed, i, i == 0)  # 4 x 5 bytes > 12
    assert feed.cached_bytes <= 12
    sub = feed.subscribe()
    assert drain(sub) == [INIT]  # the cache was given up: wait for the next keyframe
    push(feed, 4, False)
    key = push(feed, 5, True)
    assert drain(sub) == [key]


async def test_close_ends_every_subscriber() -> None:
    feed = LiveFeed()
    feed.init_segment(INIT)
    first = push(feed, 0, True)
    sub = feed.subscribe()

    async def consume() -> list[bytes]:
        return [data async for data in sub]

    reader = asyncio.ensure_future(consume())
    await asyncio.sleep(0)
    feed.end_of_stream()
    assert await asyncio.wait_for(reader, 5) == [INIT, first]
    assert feed.closed
    assert feed.subscriber_count == 0
    late = feed.subscribe()
    assert [d async for d in late] == []


async def test_new_init_segment_restarts_subscribers() -> None:
    feed = LiveFeed()
    feed.init_segment(INIT)
    push(feed, 0, True)
    sub = feed.subscribe()
    feed.init_segment(INIT)  # the same init again changes nothing
    assert feed.subscriber_count == 1
    feed.init_segment(b"INIT2")
    assert [d async for d in sub] == [INIT, frag(0, True)]
    again = feed.subscribe()
    assert drain(again) == [b"INIT2"]
    again.close()


@settings(max_examples=80, deadline=None)
@given(
    steps=st.lists(st.tuples(st.booleans(), st.integers(1, 30), st.integers(0, 4)), max_size=120),
    max_items=st.integers(1, 8),
    max_bytes=st.integers(40, 200),
)
def test_any_schedule_keeps_bounds_and_decodability(
    steps: list[tuple[bool, int, int]], max_items: int, max_bytes: int
) -> None:
    """Whatever the ingest and viewer do, the viewer sees init, then runs starting at keyframes."""
    feed = LiveFeed(max_queue_fragments=max_items, max_queue_bytes=max_bytes)
    feed.init_segment(INIT)
    sub = feed.subscribe()
    sent: list[bytes] = []
    got: list[bytes] = []
    for n, (key, size, reads) in enumerate(steps):
        data = (b"K" if key else b"P") + n.to_bytes(4, "big") + b"." * size
        sent.append(data)
        feed.media_fragment(data, key, n)
        assert len(sub._queue) <= max_items + 1  # + the init segment, until taken
        assert sub.queued_bytes <= max_bytes + len(INIT)
        for _ in range(reads):
            if (taken := sub.get_nowait()) is not None:
                got.append(taken)
    got.extend(drain(sub))
    assert got[0] == INIT
    index = {d: i for i, d in enumerate(sent)}
    prev = None
    for data in got[1:]:
        i = index[data]
        if prev is None or i != prev + 1:
            assert is_key(data), "after a gap the viewer must restart at a keyframe"
        prev = i


@pytest.mark.parametrize("keyframe_first", [True, False])
async def test_gop_cache_starts_at_keyframe(keyframe_first: bool) -> None:
    feed = LiveFeed()
    feed.init_segment(INIT)
    push(feed, 0, keyframe_first)
    push(feed, 1, False)
    sub = feed.subscribe()
    expected = [INIT, frag(0, True), frag(1, False)] if keyframe_first else [INIT]
    assert drain(sub) == expected
    sub.close()
