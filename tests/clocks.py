"""The ``time`` module with its clocks moved, for tests of clocks that step or run off.

A Raspberry Pi has no real-time clock: its wall clock runs hours off until NTP steps
it. Patch a module's ``time`` with a :class:`ShiftedTime` (``monkeypatch.setattr(mod,
"time", ShiftedTime(...))``) and move ``wall_ns`` or ``mono_ns`` whenever the test
says the clock stepped; everything else is the real ``time`` module.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["ShiftedTime"]


class ShiftedTime:
    """``time`` with the wall clock ``wall_ns`` and the monotonic clock ``mono_ns`` on."""

    def __init__(self, *, wall_s: float = 0.0, mono_s: float = 0.0) -> None:
        self.wall_ns = int(wall_s * 1e9)
        self.mono_ns = int(mono_s * 1e9)

    def time_ns(self) -> int:
        return time.time_ns() + self.wall_ns

    def time(self) -> float:
        return self.time_ns() / 1e9

    def monotonic_ns(self) -> int:
        return time.monotonic_ns() + self.mono_ns

    def monotonic(self) -> float:
        return self.monotonic_ns() / 1e9

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)
