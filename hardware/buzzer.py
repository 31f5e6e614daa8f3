"""An optional buzzer: audible confirmation, only where a building configures one.

Panic alarms are silent by default (Alyssa's Law): the status LED is the
feedback. Some buildings want an audible chirp at the button anyway (a front
office, not a classroom); :class:`StatusBuzzer` gives short chirps on
gpiozero's own background thread and never a continuous tone.
"""

from __future__ import annotations

from typing import Any

from gpiozero import Buzzer
from gpiozero.exc import GPIOZeroError

from hardware.errors import BuzzerError

CHIRP_S = 0.08


class StatusBuzzer:
    """A buzzer on a GPIO pin that chirps ``n`` times on request."""

    def __init__(self, pin: int | str, *, pin_factory: Any | None = None) -> None:
        try:
            self._device = Buzzer(pin, initial_value=False, pin_factory=pin_factory)
        except GPIOZeroError as exc:
            raise BuzzerError(f"buzzer on pin {pin!r}: {exc}") from exc
        self.chirps = 0

    def chirp(self, n: int = 1) -> None:
        """``n`` short chirps, in the background."""
        self.chirps += n
        self._device.beep(on_time=CHIRP_S, off_time=CHIRP_S, n=n, background=True)

    def close(self) -> None:
        """Silence and release the pin."""
        self._device.close()
