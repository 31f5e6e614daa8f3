"""The status LED next to a panic button: a silent, discreet confirmation.

Alyssa's Law asks that school panic alarms be silent, so the only feedback to
the person who pressed is light, and it must be readable at a glance without
drawing attention. Patterns are data (:data:`PATTERNS`), one row each:

==================  ========  ========  ===================================
pattern             on (s)    off (s)   meaning
==================  ========  ========  ===================================
``OFF``             --        --        dark: the agent is not running
``ARMED``           0.05      4.95      a blip every 5 s: working, discreet
``ALARM_PENDING``   0.1       0.1       fast flicker: pressed, police NOT
                                        reached yet (keep trying to get help)
``ALARM_DELIVERED`` steady    --        steady on: the police have the alarm
``FAULT``           1.0       1.0       slow blink: the device needs a
                                        technician (camera, disk, config)
==================  ========  ========  ===================================

The two alarm states differ as much as possible (flicker vs steady) because
that difference is what the principal needs to see. Blinking runs on
gpiozero's own background thread (``LED.blink(background=True)``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Self

from gpiozero import LED
from gpiozero.exc import GPIOZeroError

from hardware.errors import LedError

__all__ = ["PATTERNS", "LedPattern", "LedTiming", "StatusLed"]


class LedPattern(enum.Enum):
    """What the status LED says; see the table in the module docstring."""

    OFF = "off"
    ARMED = "armed"
    ALARM_PENDING = "alarm_pending"
    ALARM_DELIVERED = "alarm_delivered"
    FAULT = "fault"


@dataclass(frozen=True, slots=True)
class LedTiming:
    """How to drive the LED: ``blink(on_s, off_s)``, or steady when ``off_s`` is 0.

    ``on_s == 0`` means dark; ``off_s == 0`` (with ``on_s > 0``) means steady on.
    """

    on_s: float
    off_s: float

    def __post_init__(self) -> None:
        if self.on_s < 0 or self.off_s < 0:
            raise ValueError(f"LED times must be >= 0, got on={self.on_s} off={self.off_s}")

    @property
    def steady(self) -> bool | None:
        """True for steady on, False for dark, None for a blink."""
        if self.on_s == 0:
            return False
        if self.off_s == 0:
            return True
        return None


#: The default patterns (seconds). Read-only; pass another mapping to StatusLed to change them.
PATTERNS: Mapping[LedPattern, LedTiming] = MappingProxyType(
    {
        LedPattern.OFF: LedTiming(0.0, 0.0),
        LedPattern.ARMED: LedTiming(0.05, 4.95),
        LedPattern.ALARM_PENDING: LedTiming(0.1, 0.1),
        LedPattern.ALARM_DELIVERED: LedTiming(1.0, 0.0),
        LedPattern.FAULT: LedTiming(1.0, 1.0),
    }
)


class StatusLed:
    """A status LED on a GPIO pin showing one :class:`LedPattern` at a time.

    ``active_high=False`` for an LED wired between the pin and 3V3.
    ``patterns`` overrides the timing table (every pattern must be present).
    Starts dark. Thread-safe as far as gpiozero's LED is; call from one thread.
    """

    def __init__(
        self,
        pin: int | str,
        *,
        pin_factory: Any | None = None,
        active_high: bool = True,
        patterns: Mapping[LedPattern, LedTiming] = PATTERNS,
    ) -> None:
        missing = [p.name for p in LedPattern if p not in patterns]
        if missing:
            raise LedError(f"status LED on pin {pin!r}: no timing for {', '.join(missing)}")
        self._patterns = MappingProxyType(dict(patterns))
        self._pin_name = pin
        try:
            self._device = LED(
                pin, active_high=active_high, initial_value=False, pin_factory=pin_factory
            )
        except GPIOZeroError as exc:
            raise LedError(f"status LED on pin {pin!r}: {exc}") from exc
        self._pattern = LedPattern.OFF

    @property
    def pattern(self) -> LedPattern:
        """The pattern shown now."""
        return self._pattern

    @property
    def patterns(self) -> Mapping[LedPattern, LedTiming]:
        """The timing table in use."""
        return self._patterns

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return bool(self._device.closed)

    def show(self, pattern: LedPattern) -> None:
        """Switch to ``pattern`` (restarting it if already shown, so a blip comes at once)."""
        timing = self._patterns[pattern]
        steady = timing.steady
        if steady is None:
            self._device.blink(on_time=timing.on_s, off_time=timing.off_s, background=True)
        elif steady:
            self._device.on()
        else:
            self._device.off()
        self._pattern = pattern

    def close(self) -> None:
        """Stop blinking, turn the LED off and release the pin; idempotent."""
        if not self._device.closed:
            self._device.off()
        self._device.close()
        self._pattern = LedPattern.OFF

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StatusLed pin={self._pin_name!r} pattern={self._pattern.name}>"
