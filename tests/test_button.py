"""PanicButton on gpiozero's MockFactory, and the pure Debouncer."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from gpiozero.pins.mock import MockFactory
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hardware import ButtonError, Debouncer, PanicButton, PressEvent, loop_callback

PIN = 17


class FakeClock:
    """A settable clock for the debouncer (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_button(
    factory: MockFactory, events: list[PressEvent], clock: FakeClock, **kwargs: object
) -> PanicButton:
    return PanicButton(
        PIN,
        on_press=events.append,
        pin_factory=factory,
        clock=clock,
        button_id="front-office",
        location="Room 101",
        **kwargs,  # type: ignore[arg-type]
    )


def test_one_press_reports_one_event(mock_factory: MockFactory) -> None:
    events: list[PressEvent] = []
    pin = mock_factory.pin(PIN)
    before_mono, before_wall = time.monotonic_ns(), time.time_ns()
    with make_button(mock_factory, events, FakeClock()) as button:
        assert not button.is_pressed
        pin.drive_low()
        assert button.is_pressed
    assert len(events) == 1
    [event] = events
    assert (event.button_id, event.location) == ("front-office", "Room 101")
    assert before_mono <= event.mono_ns <= time.monotonic_ns()
    assert before_wall <= event.wall_ns <= time.time_ns()


def test_bouncy_press_reports_once(mock_factory: MockFactory) -> None:
    events: list[PressEvent] = []
    clock = FakeClock()
    pin = mock_factory.pin(PIN)
    with make_button(mock_factory, events, clock, debounce_s=0.05):
        for dt, press in [(0, True), (0.004, False), (0.003, True), (0.01, False), (0.01, True)]:
            clock.now += dt
            pin.drive_low() if press else pin.drive_high()
    assert len(events) == 1


def test_press_release_press_reports_two(mock_factory: MockFactory) -> None:
    events: list[PressEvent] = []
    clock = FakeClock()
    pin = mock_factory.pin(PIN)
    with make_button(mock_factory, events, clock, debounce_s=0.05):
        pin.drive_low()
        clock.now += 0.2
        pin.drive_high()
        clock.now += 0.2
        pin.drive_low()
    assert len(events) == 2


def test_tap_shorter_than_debounce_does_not_swallow_the_next_press(
    mock_factory: MockFactory,
) -> None:
    events: list[PressEvent] = []
    clock = FakeClock()
    pin = mock_factory.pin(PIN)
    with make_button(mock_factory, events, clock, debounce_s=0.05):
        pin.drive_low()
        clock.now += 0.01  # released inside the debounce window
        pin.drive_high()
        clock.now += 3
        pin.drive_low()
    assert len(events) == 2


def test_button_held_at_start_must_be_released_first(mock_factory: MockFactory) -> None:
    events: list[PressEvent] = []
    clock = FakeClock()
    pin = mock_factory.pin(PIN)
    pin.drive_low()  # stuck, or held while the agent boots
    with make_button(mock_factory, events, clock):
        assert events == []
        clock.now += 1
        pin.drive_high()
        clock.now += 1
        pin.drive_low()
    assert len(events) == 1


def test_hold_time_ignores_taps_and_reports_a_hold(mock_factory: MockFactory) -> None:
    events: list[PressEvent] = []
    reported = threading.Event()
    clock = FakeClock()
    pin = mock_factory.pin(PIN)

    def on_press(event: PressEvent) -> None:
        events.append(event)
        reported.set()

    with PanicButton(PIN, on_press=on_press, pin_factory=mock_factory, hold_time=0.05, clock=clock):
        pin.drive_low()
        pin.drive_high()
        assert events == []
        clock.now += 1
        pin.drive_low()
        assert reported.wait(5)
        pin.drive_high()
    assert len(events) == 1


def test_handler_error_is_logged_and_the_button_stays_armed(
    mock_factory: MockFactory, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[PressEvent] = []
    clock = FakeClock()
    pin = mock_factory.pin(PIN)

    def flaky(event: PressEvent) -> None:
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("handler broke")

    with (
        caplog.at_level(logging.ERROR, logger="hardware.button"),
        PanicButton(PIN, on_press=flaky, pin_factory=mock_factory, clock=clock),
    ):
        pin.drive_low()
        clock.now += 1
        pin.drive_high()
        clock.now += 1
        pin.drive_low()
    assert len(calls) == 2
    assert "handler broke" in caplog.text


async def test_loop_callback_runs_the_handler_on_the_loop(mock_factory: MockFactory) -> None:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[tuple[PressEvent, int]] = loop.create_future()
    pin = mock_factory.pin(PIN)

    def on_loop(event: PressEvent) -> None:
        got.set_result((event, threading.get_ident()))

    with PanicButton(PIN, on_press=loop_callback(loop, on_loop), pin_factory=mock_factory):
        # gpiozero calls back on its own thread; with MockFactory, the one driving the pin.
        presser = threading.Thread(target=pin.drive_low, name="presser")
        presser.start()
        event, thread_id = await asyncio.wait_for(got, 5)
        await asyncio.to_thread(presser.join)
    assert event.button_id == "button"
    assert thread_id == threading.get_ident()


def test_close_releases_the_pin(mock_factory: MockFactory) -> None:
    button = PanicButton(PIN, on_press=lambda e: None, pin_factory=mock_factory)
    with pytest.raises(ButtonError, match="17"):
        PanicButton(PIN, on_press=lambda e: None, pin_factory=mock_factory)
    button.close()
    assert button.closed
    button.close()  # idempotent
    with PanicButton(PIN, on_press=lambda e: None, pin_factory=mock_factory) as again:
        assert not again.closed


@pytest.mark.parametrize(
    ("pin", "kwargs", "match"),
    [
        ("GPIO99", {}, "GPIO99"),
        (PIN, {"hold_time": -1}, "hold_time"),
        (PIN, {"debounce_s": -0.1}, "debounce_s"),
    ],
)
def test_bad_arguments(
    mock_factory: MockFactory, pin: int | str, kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(ButtonError, match=match) as info:
        PanicButton(pin, on_press=lambda e: None, pin_factory=mock_factory, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


# --- Debouncer properties ---

# Times are whole ticks of 1/1024 s, so sums and comparisons are exact in binary
# floating point and edges land exactly on window boundaries often.
TICK = 1 / 1024
edges = st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=300)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(debounce_ticks=st.sampled_from([0, 10, 50, 100]), steps=edges)
@example(debounce_ticks=50, steps=[(True, 0), (False, 10), (True, 300)])  # a short tap
@example(
    # release accepted, a press inside its window, then a release and a press
    # each a full window apart: the last press must be reported.
    debounce_ticks=50,
    steps=[(True, 0), (False, 100), (True, 10), (False, 50), (True, 50)],
)
def test_debouncer_properties(debounce_ticks: int, steps: list[tuple[bool, int]]) -> None:
    debounce_s = debounce_ticks * TICK
    debouncer = Debouncer(debounce_s)
    now = 0.0
    history: list[tuple[bool, float]] = []
    reports: list[float] = []
    released_since_report = True
    for pressed, ticks in steps:
        now += ticks * TICK
        reported = debouncer.edge(pressed, now)
        if reported:
            assert pressed
            # Never a report without a release edge since the last one ...
            assert released_since_report
            # ... and never two reports within the debounce time (in fact 2x).
            if reports:
                assert now - reports[-1] >= 2 * debounce_s
            reports.append(now)
            released_since_report = False
        elif not pressed:
            released_since_report = True
        if pressed and not reported:
            # Liveness: the first press, and a press after a real release, are reported.
            assert history, "the first press edge must be reported"
            previous, t_previous = history[-1]
            t_before = history[-2][1] if len(history) > 1 else float("-inf")
            t_last_press = max((t for p, t in history if p), default=float("-inf"))
            after_release = not previous and now - t_previous >= debounce_s
            assert not (after_release and t_previous - t_before >= debounce_s), (
                "a press after a settled release must be reported"
            )
            assert not (after_release and now - t_last_press >= 2 * debounce_s), (
                "a press after a short tap must be reported"
            )
        history.append((pressed, now))


def test_debouncer_rejects_negative_time() -> None:
    with pytest.raises(ValueError, match="debounce_s"):
        Debouncer(-1)
