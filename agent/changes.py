"""Wake waiters when something changed; each re-checks its own condition.

Tests, the demo and benchmarks wait on conditions ("the receiver acknowledged
seq N", "a session is open") with this instead of sleeping and polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Changes:
    """A broadcast "something changed" signal for code on one event loop."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake every waiter."""
        self._event.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, re-checking after every change."""
        # No await between the check, the clear and the wait: no wake-up is lost.
        while not predicate():
            self._event.clear()
            await self._event.wait()
