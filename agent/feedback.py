"""Feedback at the button: the status LED's pattern and the buzzer's one chirp.

The LED says what the principal needs to know (``hardware/led.py`` has the table):
armed, a fault while idle, an alarm the police have not had yet, or one they have;
an alarm outranks a fault. The optional buzzer chirps once when the police have
the alarm (its first ack), never a continuous tone (DECISIONS.md, "Feedback at
the button").
"""

from __future__ import annotations

from collections.abc import Callable

from agent.uplink import SessionStream
from hardware.buzzer import StatusBuzzer
from hardware.led import LedPattern, StatusLed


def led_pattern(
    *, emergency: bool, faulty: Callable[[], bool], live: SessionStream | None
) -> LedPattern:
    """The pattern for the device's state: ``emergency`` open or not, ``faulty()`` (a
    camera down, an expired enrollment; asked only while idle), and the session
    streaming live (its first ack means the police have the alarm)."""
    if not emergency:  # (a continuous exterior share is no alarm)
        return LedPattern.FAULT if faulty() else LedPattern.ARMED
    if live is None or live.first_ack_mono_ns is None:
        return LedPattern.ALARM_PENDING
    return LedPattern.ALARM_DELIVERED


class StatusFeedback:
    """The status LED and the buzzer, either absent when the building has none."""

    def __init__(self) -> None:
        self.led: StatusLed | None = None
        self.buzzer: StatusBuzzer | None = None
        self.shown = LedPattern.OFF

    def show(self, pattern: LedPattern) -> None:
        """Show ``pattern`` (and chirp once as the police get the alarm)."""
        if pattern is self.shown:
            return  # showing it again would restart the blink
        if pattern is LedPattern.ALARM_DELIVERED and self.buzzer is not None:
            self.buzzer.chirp()
        self.shown = pattern
        if self.led is not None:
            self.led.show(pattern)

    def close(self) -> None:
        """Close the LED and the buzzer (their pins are released)."""
        if self.led is not None:
            self.led.close()
        if self.buzzer is not None:
            self.buzzer.close()
