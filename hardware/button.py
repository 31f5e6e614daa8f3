"""The physical panic button, on gpiozero, with our own debouncing.

gpiozero's ``bounce_time`` is left off: its behaviour differs between pin
backends, and its ``MockFactory`` does not simulate it at all, so we could not
test it. Instead every edge goes through :class:`Debouncer`, a pure class
(time is passed in) that reports a press on its leading edge, at once.

Threads: gpiozero calls back on its own threads (edge detection, the hold
timer); with ``MockFactory`` synchronously in whichever thread drives the pin.
Without a ``hold_time`` the pin is a plain ``DigitalInputDevice``, not a
``Button``: gpiozero's ``Button`` always starts a hold thread that wakes ten
times a second to poll, for ever, even with no hold wanted (on the agent it
was a third of the idle wakes besides the cameras').
:class:`PanicButton` therefore never touches asyncio; the agent wraps its
handler with :func:`loop_callback`, the one bridge onto the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from gpiozero import Button, DigitalInputDevice
from gpiozero.exc import GPIOZeroError

from hardware.errors import ButtonError

__all__ = ["Debouncer", "PanicButton", "PressEvent", "loop_callback"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PressEvent:
    """One reported press of a panic button.

    ``mono_ns`` is ``time.monotonic_ns()`` and ``wall_ns`` ``time.time_ns()``
    (UTC) at the moment the press was accepted.
    """

    button_id: str
    location: str
    mono_ns: int
    wall_ns: int


class Debouncer:
    """Leading-edge debouncing of one contact, as a pure state machine.

    Feed every raw edge to :meth:`edge`. The first press edge is reported at
    once (the alarm must not wait for the contact to settle). After an
    accepted edge, every edge within ``debounce_s`` is contact bounce and is
    ignored, and a release must be accepted before the next press can be.

    If bouncing ended released (a tap shorter than ``debounce_s``), the
    release is taken as settled when the window closed, the moment the next
    edge shows it lasted: a short tap cannot swallow the next real press.
    A press that begins inside the window after an accepted release is taken
    as bounce of that release, even if held; the press before it was
    reported at least ``2 * debounce_s`` earlier, so nothing is lost that
    matters to an alarm. (Reporting it would need a timer at the window's
    end; this class stays pure.)

    Guarantees, whatever the edges: two reports are at least
    ``2 * debounce_s`` apart and a release edge lies between them; the first
    press is reported (unless built ``pressed=True``: a stuck or held
    contact must be released first); a press is reported if it comes at
    least ``debounce_s`` after a release edge and either that release came
    at least ``debounce_s`` after the edge before it, or the press comes at
    least ``2 * debounce_s`` after the previous press edge.
    """

    __slots__ = ("_accepted", "_accepted_at", "_debounce_s", "_raw")

    def __init__(self, debounce_s: float, *, pressed: bool = False) -> None:
        if debounce_s < 0:
            raise ValueError(f"debounce_s must be >= 0, got {debounce_s}")
        self._debounce_s = debounce_s
        self._accepted = pressed  # the debounced level
        self._raw = pressed  # the level of the last raw edge seen
        self._accepted_at: float | None = None  # no window open yet

    @property
    def pressed(self) -> bool:
        """The debounced level as of the last edge."""
        return self._accepted

    def edge(self, pressed: bool, now: float) -> bool:
        """Record a raw edge to ``pressed`` at ``now`` (seconds); True if it is a new press."""
        at = self._accepted_at
        if at is not None and now - at < self._debounce_s:
            self._raw = pressed
            return False
        if at is not None and self._accepted and not self._raw:
            # A release seen inside the last window held until it closed.
            self._accepted = False
            self._accepted_at = at = at + self._debounce_s
            if now - at < self._debounce_s:
                self._raw = pressed
                return False
        self._raw = pressed
        if pressed == self._accepted:
            return False
        self._accepted = pressed
        self._accepted_at = now
        return pressed


class PanicButton:
    """A panic button on a GPIO pin that calls ``on_press`` once per real press.

    ``pin`` is any gpiozero pin name (``17``, ``"GPIO17"``, ``"BOARD11"``).
    With ``pull_up`` (the default) the button connects the pin to ground.
    ``hold_time > 0`` reports a press only once it was held that long (a guard
    against brushing the button); the debouncing still decides what counts
    as a new press. ``clock`` (seconds) times the debouncing only; events
    carry the real monotonic and wall clocks.

    ``on_press`` runs on a gpiozero thread and must be quick and thread-safe
    (see :func:`loop_callback`); an exception from it is logged and never
    disarms the button. A button already pressed when this object is created
    is not reported (it may be stuck); it must be released first.
    """

    def __init__(
        self,
        pin: int | str,
        *,
        on_press: Callable[[PressEvent], None],
        pin_factory: Any | None = None,
        pull_up: bool = True,
        hold_time: float = 0.0,
        debounce_s: float = 0.05,
        button_id: str = "button",
        location: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        name = f"panic button {button_id!r} on pin {pin!r}"
        if hold_time < 0:
            raise ButtonError(f"{name}: hold_time must be >= 0, got {hold_time}")
        if debounce_s < 0:
            raise ButtonError(f"{name}: debounce_s must be >= 0, got {debounce_s}")
        self._name = name
        self._on_press = on_press
        self._button_id = button_id
        self._location = location
        self._clock = clock
        self._hold = hold_time > 0
        self._lock = threading.Lock()  # edge and hold callbacks come on different threads
        self._awaiting_hold = False
        try:
            if self._hold:
                self._device: DigitalInputDevice = Button(
                    pin,
                    pull_up=pull_up,
                    bounce_time=None,
                    hold_time=hold_time,
                    pin_factory=pin_factory,
                )
            else:  # no hold thread polling ten times a second (see the module docstring)
                self._device = DigitalInputDevice(
                    pin, pull_up=pull_up, bounce_time=None, pin_factory=pin_factory
                )
        except GPIOZeroError as exc:
            raise ButtonError(f"{name}: {exc}") from exc
        self._debouncer = Debouncer(debounce_s, pressed=bool(self._device.is_active))
        self._device.when_activated = self._pressed
        self._device.when_deactivated = self._released
        if self._hold:
            self._device.when_held = self._held

    @property
    def button_id(self) -> str:
        """The id given at construction."""
        return self._button_id

    @property
    def location(self) -> str:
        """Where the button is (a room), as given at construction."""
        return self._location

    @property
    def is_pressed(self) -> bool:
        """The raw level of the contact now (not debounced)."""
        return bool(self._device.is_active)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return bool(self._device.closed)

    def close(self) -> None:
        """Release the GPIO pin; idempotent.

        Blocking: with ``hold_time`` set and the button pressed, gpiozero's
        hold thread may take up to ``hold_time`` to stop (call it off the loop).
        """
        self._device.close()

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
        return f"<PanicButton {self._name}{' closed' if self.closed else ''}>"

    # --- gpiozero callbacks (gpiozero threads) ---

    def _pressed(self) -> None:
        with self._lock:
            accepted = self._debouncer.edge(True, self._clock())
            if accepted and self._hold:
                self._awaiting_hold = True
                accepted = False
        if accepted:
            self._report()

    def _released(self) -> None:
        with self._lock:
            self._debouncer.edge(False, self._clock())
            if not self._debouncer.pressed:
                self._awaiting_hold = False

    def _held(self) -> None:
        with self._lock:
            report, self._awaiting_hold = self._awaiting_hold, False
        if report:
            self._report()

    def _report(self) -> None:
        event = PressEvent(self._button_id, self._location, time.monotonic_ns(), time.time_ns())
        _log.info("%s: press reported", self._name)
        try:
            self._on_press(event)
        except Exception:
            # Raising into gpiozero's thread could kill edge detection: log, stay armed.
            _log.exception("%s: on_press handler failed", self._name)


def loop_callback(
    loop: asyncio.AbstractEventLoop, fn: Callable[[PressEvent], object]
) -> Callable[[PressEvent], None]:
    """Wrap ``fn`` so that a gpiozero thread can call it: ``fn`` then runs on ``loop``.

    The returned callable only does ``loop.call_soon_threadsafe(fn, event)``.
    If the loop is already closed (shutdown), the press is logged as lost.
    """

    def callback(event: PressEvent) -> None:
        try:
            loop.call_soon_threadsafe(fn, event)
        except RuntimeError:
            _log.error("press of button %r lost: the event loop is closed", event.button_id)

    return callback
