"""StatusLed on gpiozero's MockFactory: each pattern drives the pin as its table says."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPin

from hardware import PATTERNS, LedError, LedPattern, LedTiming, StatusLed

PIN = 27


class SignallingPin(MockPin):  # type: ignore[misc]
    """gpiozero's MockPin that also lets a test wait for state changes (no sleeping)."""

    def __init__(self, factory: MockFactory, info: Any) -> None:
        self.changed = threading.Condition()
        super().__init__(factory, info)

    def _change_state(self, value: bool) -> bool:
        changed: bool = super()._change_state(value)
        if changed:
            with self.changed:
                self.changed.notify_all()
        return changed

    def wait_for_states(self, count: int, timeout: float = 10) -> bool:
        """Wait until the pin's ``states`` history holds ``count`` entries."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.states) >= count, timeout)


def shown(led: StatusLed) -> LedPattern:
    """``led.pattern``, read through a call so that mypy does not keep an old narrowing."""
    return led.pattern


@pytest.fixture
def pin(mock_factory: MockFactory) -> SignallingPin:
    made: SignallingPin = mock_factory.pin(PIN, pin_class=SignallingPin)
    return made


def test_default_table_is_complete_and_distinct() -> None:
    assert set(PATTERNS) == set(LedPattern)
    assert len(set(PATTERNS.values())) == len(LedPattern)
    assert PATTERNS[LedPattern.OFF].steady is False
    assert PATTERNS[LedPattern.ALARM_DELIVERED].steady is True
    armed = PATTERNS[LedPattern.ARMED]
    # Discreet: a blip of at most 0.1 s about every 5 s.
    assert armed.on_s <= 0.1
    assert armed.on_s + armed.off_s == pytest.approx(5.0)
    pending = PATTERNS[LedPattern.ALARM_PENDING]
    assert pending.steady is None
    assert 1 / (pending.on_s + pending.off_s) >= 2  # a fast blink, unlike any other
    assert PATTERNS[LedPattern.FAULT].steady is None


def test_starts_dark(mock_factory: MockFactory, pin: SignallingPin) -> None:
    with StatusLed(PIN, pin_factory=mock_factory) as led:
        assert led.pattern is LedPattern.OFF
        assert pin.state is False


@pytest.mark.parametrize(("active_high", "lit"), [(True, True), (False, False)])
def test_steady_patterns(
    mock_factory: MockFactory, pin: SignallingPin, active_high: bool, lit: bool
) -> None:
    with StatusLed(PIN, pin_factory=mock_factory, active_high=active_high) as led:
        led.show(LedPattern.ALARM_DELIVERED)
        assert led.pattern is LedPattern.ALARM_DELIVERED
        assert pin.state is lit
        led.show(LedPattern.OFF)
        assert shown(led) is LedPattern.OFF
        assert pin.state is not lit


@pytest.mark.parametrize(
    ("pattern", "cycles"),
    [(LedPattern.ARMED, 1), (LedPattern.ALARM_PENDING, 2), (LedPattern.FAULT, 1)],
)
def test_blink_patterns_follow_the_table(
    mock_factory: MockFactory, pin: SignallingPin, pattern: LedPattern, cycles: int
) -> None:
    timing = PATTERNS[pattern]
    # The initial state, then on and off once per cycle, timed by the table.
    expected = [(0.0, False)]
    for _ in range(cycles):
        expected += [(timing.off_s if len(expected) > 1 else 0.0, True), (timing.on_s, False)]
    with StatusLed(PIN, pin_factory=mock_factory) as led:
        pin.clear_states()
        led.show(pattern)
        assert led.pattern is pattern
        assert pin.wait_for_states(len(expected))
    pin.assert_states_and_times(expected)


def test_switching_patterns_stops_the_blink(mock_factory: MockFactory, pin: SignallingPin) -> None:
    with StatusLed(PIN, pin_factory=mock_factory) as led:
        led.show(LedPattern.ALARM_PENDING)
        assert pin.wait_for_states(3)
        led.show(LedPattern.ALARM_DELIVERED)
        assert pin.state is True
        # gpiozero joined the blink thread: nothing toggles the pin any more.
        before = len(pin.states)
        assert not pin.wait_for_states(before + 1, timeout=0.3)
        assert pin.state is True


def test_close_releases_the_pin(mock_factory: MockFactory, pin: SignallingPin) -> None:
    led = StatusLed(PIN, pin_factory=mock_factory)
    with pytest.raises(LedError, match=str(PIN)):
        StatusLed(PIN, pin_factory=mock_factory)
    led.show(LedPattern.FAULT)
    led.close()
    assert led.closed
    assert shown(led) is LedPattern.OFF
    led.close()  # idempotent
    with StatusLed(PIN, pin_factory=mock_factory) as again:
        again.show(LedPattern.ALARM_DELIVERED)
        assert pin.state is True


def test_bad_setup_names_the_pin(mock_factory: MockFactory) -> None:
    with pytest.raises(LedError, match="GPIO99") as info:
        StatusLed("GPIO99", pin_factory=mock_factory)
    assert isinstance(info.value, ValueError)
    partial = {LedPattern.OFF: LedTiming(0, 0)}
    with pytest.raises(LedError, match="ARMED"):
        StatusLed(PIN, pin_factory=mock_factory, patterns=partial)


def test_timing_rejects_negative_times() -> None:
    with pytest.raises(ValueError, match="on=-1"):
        LedTiming(-1, 1)
