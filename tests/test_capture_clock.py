"""Capture times and the pre-roll when the Pi's wall clock steps (NTP, a stale boot clock).

A Raspberry Pi has no real-time clock: NTP steps its clock forward after a stale boot,
and back when a clock that ran ahead is corrected (or a spoofed NTP reply sets it back).
Found by a review (s6, u1): after a step back of 10 minutes the RAM pre-roll, trimmed
by capture (wall) time, stopped trimming until the clock caught up, so a press sent 54 s
of interior footage from before it where ``preroll_s`` allows 30; and the capture clock
froze every capture time at the last one before the step for the length of the step,
so the receiver recorded 10 minutes of frames with one timestamp.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from itertools import pairwise
from typing import Any

import pytest

from agent.preroll import PreRoll
from hardware import EncodedPacket, SyntheticCamera, synthetic
from hardware._clock import ArrivalClock

SECOND = 1_000_000_000
T0 = 1_800_000_000 * SECOND  # the wall clock at the first frame
FRAME = SECOND // 10  # 10 fps


def packet(i: int, capture_ns: int, mono_ns: int, gop: int = 10) -> EncodedPacket:
    return EncodedPacket("hall", i, capture_ns, mono_ns, i % gop == 0, "h264", bytes(100))


# --- the pre-roll holds preroll_s of real time ---


@pytest.mark.parametrize("step_s", [-600, 7200])
def test_the_preroll_holds_its_seconds_of_real_time_whatever_the_wall_clock_does(
    step_s: int,
) -> None:
    """Trimmed by the monotonic time each packet carries: a step back no longer keeps
    minutes of footage from before a press, nor a step forward cut it to one GOP."""
    ring = PreRoll(3.0, 10**9)
    for i in range(300):  # 30 s at 10 fps, a keyframe a second; the clock steps at 20 s
        wall = T0 + i * FRAME + (step_s * SECOND if i >= 200 else 0)
        ring.push(packet(i, wall, 5 * SECOND + i * FRAME))
        snap = ring.snapshot()
        span = snap[-1].mono_ns - snap[0].mono_ns
        assert snap[0].keyframe
        # The shortest keyframe-aligned run that covers the window (a GOP is 1 s).
        assert span < 4 * SECOND, (i, span / SECOND)
        if i >= 40:
            assert span >= 3 * SECOND, (i, span / SECOND)


# --- capture times across a step back: increasing, spaced, converging ---


def test_a_step_back_keeps_capture_times_apart_and_meets_the_wall_clock_again() -> None:
    """u1: the clock steps back 600 s at frame 10 of a 10 fps camera. Capture times
    used to freeze for 600 s (6,000 frames with one timestamp); now they keep the
    source's spacing, running 10 % slow until they meet the wall clock (100 minutes)."""
    clock = ArrivalClock()
    step = 600 * SECOND
    stamps, walls = [], []
    for i in range(70_000):
        src = i * FRAME
        wall = T0 + src + 5_000_000 - (step if i >= 10 else 0)
        stamps.append(clock.capture_ns(src, wall))
        walls.append(wall)  # what the anchor gives (every packet is 5 ms late)
    gaps = [b - a for a, b in pairwise(stamps)]
    assert gaps[:9] == [FRAME] * 9
    assert min(gaps) > 0  # never one timestamp twice, never back
    assert gaps[10:20] == [FRAME * 9 // 10] * 10  # 10 % slow while ahead of the wall clock
    assert max(gaps) <= FRAME  # never faster than the source
    ahead = [s - w for s, w in zip(stamps, walls, strict=True)]
    assert max(ahead) <= step
    met = next(i for i, a in enumerate(ahead) if i > 10 and a <= 0)
    assert 59_000 < met < 61_000  # 600 s at 10 % a second: 6,000 s, 60,000 frames
    assert all(a == 0 for a in ahead[met:])  # from then on the wall clock's time again
    assert gaps[-1] == FRAME


@pytest.mark.parametrize("step_ns", [120 * SECOND, SECOND // 2])
def test_without_source_timestamps_the_spacing_comes_from_the_monotonic_clock(
    step_ns: int,
) -> None:
    """A source without its own timestamps (the synthetic camera) is stamped with its
    arrival time; after a step back the monotonic clock gives the spacing (and tells a
    step of half a second from jitter)."""
    clock = ArrivalClock()
    monos = [7 * SECOND + i * FRAME + (3_000_000 if i % 2 else 0) for i in range(40)]  # jitter
    out = [
        clock.capture_ns(None, T0 + mono - (step_ns if i >= 20 else 0), mono)
        for i, mono in enumerate(monos)
    ]
    assert out[:20] == [T0 + mono for mono in monos[:20]]
    gaps = [b - a for a, b in pairwise(out)]
    assert min(gaps) > 0
    for i in range(19, 39):  # both still ahead of the wall clock (half a second: for 5 s)
        assert gaps[i] == pytest.approx((monos[i + 1] - monos[i]) * 0.9, abs=1)


def test_a_step_forward_is_followed_at_once() -> None:
    """A stale boot clock set right: capture times must say UTC as soon as they can."""
    clock = ArrivalClock()
    day = 86_400 * SECOND
    first = clock.capture_ns(0, T0, 0)
    later = clock.capture_ns(FRAME, T0 + FRAME + day, FRAME)
    assert (first, later) == (T0, T0 + FRAME + day)
    assert clock.capture_ns(None, T0 + 2 * FRAME + day, 2 * FRAME) == T0 + 2 * FRAME + day


def test_a_source_that_jumps_ahead_while_behind_does_not_run_ahead_of_real_time() -> None:
    """Behind the clock after a step back, the spacing is the source's, but never more
    than the monotonic clock says passed (a camera whose timestamps jumped)."""
    clock = ArrivalClock()
    clock.capture_ns(0, T0, 0)
    behind = clock.capture_ns(FRAME, T0 + FRAME - 60 * SECOND, FRAME)
    assert behind == T0 + FRAME * 9 // 10
    jumped = clock.capture_ns(3600 * SECOND, T0 + 2 * FRAME - 60 * SECOND, 2 * FRAME)
    assert jumped - behind <= (FRAME + SECOND) * 9 // 10  # the mono gap + max_lag, slewed


# --- the synthetic camera (the demo's, and the tests') follows the same rule ---


class SteppedTime:
    """The ``time`` module, with a wall clock ``ahead_ns`` ahead until NTP sets it right
    after ``calls`` readings (the synthetic camera reads it once a frame)."""

    def __init__(self, ahead_ns: int, calls: int) -> None:
        self.ahead_ns, self.calls = ahead_ns, calls

    def time_ns(self) -> int:
        self.calls -= 1
        return time.time_ns() + (self.ahead_ns if self.calls >= 0 else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_the_synthetic_camera_keeps_its_frames_apart_across_a_step_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(synthetic, "time", SteppedTime(600 * SECOND, calls=10))
    packets: list[EncodedPacket] = []
    async with (
        SyntheticCamera("hall", fps=30, width=160, height=120) as cam,
        aclosing(cam.packets()) as stream,
    ):
        async for p in stream:
            packets.append(p)
            if len(packets) == 25:
                break
    captures = [p.capture_ns for p in packets]
    gaps = [b - a for a, b in pairwise(captures)]
    monos = [p.mono_ns for p in packets]
    mono_gaps = [b - a for a, b in pairwise(monos)]
    assert min(gaps) > 0, gaps  # increasing, and no two frames share a timestamp
    # Frame 10 was captured after the step: from then on 10 % slow, on the monotonic clock.
    for gap, mono_gap in zip(gaps[9:], mono_gaps[9:], strict=True):
        assert gap == pytest.approx(mono_gap * 0.9, abs=1000)
