"""Live fan-out of one camera's fMP4 fragments to viewers (pure asyncio).

A :class:`LiveFeed` is a :class:`receiver.recording.FragmentListener`: the
camera's recording hands it the init segment and every fragment as written.
It keeps the init segment and the fragments since the last keyframe (the GOP
cache, bounded in bytes), so a new viewer starts decoding at a keyframe at
once. Each subscriber has a bounded queue; a subscriber that falls behind is
skipped forward to the next keyframe, so the ingest never waits for a viewer
and memory never grows with a slow one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType

__all__ = ["LiveFeed", "Subscription"]


class Subscription:
    """One viewer's stream: init segment, cached GOP, then new fragments.

    An async iterator of ``bytes`` and an async context manager (leaving it
    unsubscribes). Iteration ends when the feed closes or restarts with a new
    init segment (the viewer should then subscribe again).
    """

    def __init__(self, feed: LiveFeed, max_bytes: int, max_items: int) -> None:
        self._feed = feed
        self._max_bytes = max_bytes
        self._max_items = max_items
        self._queue: deque[bytes] = deque()
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._skipping = False
        self._init_queued: bytes | None = None  # the init segment, until it is taken
        #: Fragments dropped because this subscriber was too slow.
        self.dropped = 0
        #: Times this subscriber was skipped forward to a keyframe.
        self.skips = 0

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self.get_nowait()
        assert data is not None
        return data

    def get_nowait(self) -> bytes | None:
        """The next queued message, or None if nothing is queued right now."""
        if not self._queue:
            return None
        data = self._queue.popleft()
        self._bytes -= len(data)
        if data is self._init_queued:
            self._init_queued = None
        return data

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for this subscriber."""
        return self._bytes

    def close(self) -> None:
        """Unsubscribe; queued data is still delivered, then iteration ends."""
        if not self._closed:
            self._closed = True
            self._feed._subscribers.discard(self)
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _put_init(self, data: bytes) -> None:
        self._init_queued = data
        self._put(data)

    def _put(self, data: bytes) -> None:
        self._queue.append(data)
        self._bytes += len(data)
        self._wake()

    def _offer(self, data: bytes, keyframe: bool) -> None:
        """Queue one fragment, or skip forward if this subscriber is behind."""
        if self._skipping and not keyframe:
            self.dropped += 1
            return
        init = self._init_queued
        fragments = len(self._queue) - (init is not None)
        if fragments and (
            self._bytes + len(data) > self._max_bytes or fragments >= self._max_items
        ):
            # Too slow: drop the queued fragments (an init segment not yet
            # taken stays) and resume at the next keyframe.
            self.dropped += fragments
            self._queue.clear()
            self._bytes = 0
            if init is not None:
                self._put(init)
            self.skips += 1
            if not keyframe:
                self.dropped += 1
                self._skipping = True
                return
        self._skipping = False
        self._put(data)


class LiveFeed:
    """Live fragments of one camera, fanned out to any number of subscribers."""

    def __init__(
        self,
        *,
        max_gop_bytes: int = 4 << 20,
        max_queue_bytes: int = 8 << 20,
        max_queue_fragments: int = 300,
    ) -> None:
        self._max_gop_bytes = max_gop_bytes
        self._max_queue_bytes = max_queue_bytes
        self._max_queue_fragments = max_queue_fragments
        self._init: bytes | None = None
        self._gop: list[bytes] = []
        self._gop_bytes = 0
        self._gop_valid = False  # the cache starts at a keyframe
        self._subscribers: set[Subscription] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether the feed has ended."""
        return self._closed

    @property
    def subscriber_count(self) -> int:
        """Number of current subscribers."""
        return len(self._subscribers)

    @property
    def cached_bytes(self) -> int:
        """Bytes held in the GOP cache."""
        return self._gop_bytes

    def subscribe(self) -> Subscription:
        """Start a subscription (use ``async with feed.subscribe() as sub``).

        It yields the init segment (waiting for it if not known yet), the
        fragments cached since the last keyframe, then new fragments. On a
        closed feed the subscription is empty.
        """
        sub = Subscription(self, self._max_queue_bytes, self._max_queue_fragments)
        if self._closed:
            sub._closed = True
            return sub
        self._subscribers.add(sub)
        if self._init is not None:
            sub._put_init(self._init)
            if self._gop_valid:
                for frag in self._gop:
                    sub._put(frag)
            else:
                sub._skipping = True
        return sub

    # -- FragmentListener -------------------------------------------------

    def init_segment(self, data: bytes) -> None:
        """Set the init segment; a different one ends current subscribers."""
        if self._closed or data == self._init:
            return
        if self._init is not None:
            for sub in list(self._subscribers):
                sub.close()  # their decoders need the new init: they resubscribe
        self._init = data
        self._gop.clear()
        self._gop_bytes = 0
        self._gop_valid = False
        for sub in self._subscribers:
            sub._put_init(data)
            sub._skipping = True

    def media_fragment(self, data: bytes, keyframe: bool, capture_us: int) -> None:
        """Cache and fan out one fragment (``capture_us`` is not needed here)."""
        if self._closed or self._init is None:
            return
        if keyframe:
            self._gop.clear()
            self._gop_bytes = 0
            self._gop_valid = True
        if self._gop_valid:
            if self._gop_bytes + len(data) > self._max_gop_bytes:
                # A GOP this long is not worth caching: new viewers wait for a keyframe.
                self._gop.clear()
                self._gop_bytes = 0
                self._gop_valid = False
            else:
                self._gop.append(data)
                self._gop_bytes += len(data)
        for sub in self._subscribers:
            sub._offer(data, keyframe)

    def end_of_stream(self) -> None:
        """The recording ended: close the feed."""
        self.close()

    def close(self) -> None:
        """End every subscription (after its queued data) and drop the cache."""
        self._closed = True
        self._gop.clear()
        self._gop_bytes = 0
        for sub in list(self._subscribers):
            sub.close()
