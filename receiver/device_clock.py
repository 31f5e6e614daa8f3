"""Each connected device's clock, as its heartbeats tell it.

A Raspberry Pi has no real-time clock: after a power cut it runs on the time
``fake-hwclock`` last saved (or on 1970) until NTP steps it, by hours or days,
at any moment. The receiver never takes that clock for its own times, but it
must speak it where the device judges by it: a device checks a trigger's
``iat``/``exp`` against its own clock (±60 s, :data:`provisioning.triggers.SKEW_S`),
and states its session's start and expiry on it.

Every heartbeat of a device carries its wall clock (``Heartbeat.t``; the agent
sends one when it connects and every few seconds after). For each connected
device :class:`DeviceClocks` keeps the latest **offset** (the device's time
minus the receiver's when the heartbeat arrived) and when it was measured, per
connection: a new connection (often a reboot, a new clock) starts unmeasured.
The offset is a little behind the truth by the heartbeat's time in transit
(behind footage in the device's send queue, on a slow link); a trigger's
window (120 s of lifetime, 60 s of skew) leaves minutes for that.

How stale may it be? Its age says nothing: a crystal drifts by milliseconds an
hour, and a step (NTP, or ``fake-hwclock`` restoring) can come a second after
the last heartbeat. So dispatch uses the newest reading of the connection,
whatever its age, and treats the device's own answer as the test: a refusal
for the clock (``not_yet_valid``, ``expired``: checked before the nonce is
spent, so the trigger did nothing) is signed once more with a reading that
arrived after the refused trigger was sent (:meth:`DeviceClocks.next_reading`,
:mod:`receiver.dispatch`).

Bounded input: a heartbeat's time is the device's word. One that is not a
finite number from 1970 to 9999 (a trigger's times must fit its integer
fields; a Pi with no saved time at all boots in 1970, which is a reading) is
ignored, counted in :attr:`DeviceClocks.ignored` and logged once a minute per
device; the reading before it stands. Heartbeats are rate-limited by the
uplink (:class:`receiver.ingest.UplinkLimits`).

A session's expiry on the receiver's clock: the device counts the time left on
its monotonic clock from when the expiry was set (the start, an extension), so
its expiry is converted with the offset measured then, not a later one. Each
open session keeps the offset measured when its ``session_open`` brought a new
expiry (or by the first heartbeat after it, on a connection not measured yet);
the same expiry sent again (a reconnect, a resume) keeps it. In memory only:
after a receiver restart the device's first heartbeat measures it again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from receiver.limits import LogThrottle

log = logging.getLogger(__name__)

#: The earliest device time that is a reading (a Pi with no saved time boots in 1970).
MIN_DEVICE_TIME: Final = 0.0
#: The latest: 9999-12-31T23:59:59Z (beyond it no date prints; a trigger's times fit).
MAX_DEVICE_TIME: Final = 253_402_300_799.0
#: How long dispatch waits for a new reading after a refusal for the clock: two of the
#: agent's heartbeats at its default ``[uplink] heartbeat_s`` of 5 s (the receiver drops
#: a device it heard nothing from for three of its own, 15 s).
REMEASURE_S: Final = 10.0
#: Open sessions whose offset is kept (each is forgotten when it closes).
MAX_SESSIONS: Final = 4096
#: Times on two clocks closer than this are shown as one (the page, the access log).
APART_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class ClockReading:
    """One measurement of a device's clock."""

    #: The device's clock minus the receiver's (seconds; negative: the device is behind).
    offset_s: float
    #: The receiver's wall clock when the heartbeat arrived.
    at: float
    #: The receiver's monotonic clock then (to tell newer readings from older ones).
    mono: float

    def device_time(self, now: float) -> float:
        """What the device's clock reads when the receiver's reads ``now``."""
        return now + self.offset_s


@dataclass(slots=True)
class _SessionClock:
    device: str
    expires_at: float
    offset_s: float | None  # None: not measured since the expiry was set


def plausible(t: object) -> bool:
    """Whether ``t`` can be a device's wall clock reading (see the module docstring)."""
    return (
        isinstance(t, int | float)
        and not isinstance(t, bool)
        and math.isfinite(t)
        and MIN_DEVICE_TIME <= t <= MAX_DEVICE_TIME
    )


class DeviceClocks:
    """The latest reading of each connected device's clock, and each open session's.

    ``clock`` is the receiver's wall clock (the one dispatch signs with and the
    page shows), ``mono`` its monotonic clock. Call from the event loop.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.mono = mono
        #: Heartbeat times ignored as implausible (all devices).
        self.ignored = 0
        self._readings: dict[str, ClockReading] = {}
        self._sessions: OrderedDict[str, _SessionClock] = OrderedDict()
        self._changed: dict[str, asyncio.Event] = {}
        self._throttle = LogThrottle(log)

    # -- the uplink's events ----------------------------------------------------------

    def connected(self, device: str) -> None:
        """A new connection of ``device``: not measured on it yet."""
        self._readings.pop(device, None)

    def disconnected(self, device: str) -> None:
        """``device``'s connection ended (its sessions keep their offsets)."""
        self._readings.pop(device, None)

    def heard(self, device: str, t: float) -> ClockReading | None:
        """A heartbeat of ``device`` saying its clock reads ``t``; the new reading, or
        None if ``t`` is not a plausible time (ignored)."""
        if not plausible(t):
            self.ignored += 1
            self._throttle.log(
                logging.WARNING, ("implausible", device),
                "device %s: heartbeat time %r ignored (not a time from 1970 to 9999)",
                device, t,
            )  # fmt: skip
            return None
        now = self.clock()
        reading = ClockReading(t - now, now, self.mono())
        self._readings[device] = reading
        for entry in self._sessions.values():
            if entry.device == device and entry.offset_s is None:
                entry.offset_s = reading.offset_s
        changed = self._changed.pop(device, None)
        if changed is not None:
            changed.set()
        return reading

    def session_opened(self, device: str, session: str, expires_at: float) -> None:
        """``device`` opened ``session`` (or opened it again) with this expiry (its clock)."""
        known = self._sessions.get(session)
        if (
            known is not None
            and known.device == device
            and known.expires_at == expires_at
            and known.offset_s is not None
        ):
            return  # a resume: the expiry, and the offset that converts it, stand
        reading = self._readings.get(device)
        self._sessions.pop(session, None)
        self._sessions[session] = _SessionClock(
            device, expires_at, None if reading is None else reading.offset_s
        )
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)

    def session_closed(self, session: str) -> None:
        """``session`` ended: its expiry no longer matters."""
        self._sessions.pop(session, None)

    # -- what the others ask -------------------------------------------------------------

    def reading(self, device: str) -> ClockReading | None:
        """The newest reading of ``device``'s clock on its connection (None: none yet)."""
        return self._readings.get(device)

    async def next_reading(
        self, device: str, *, after: float, within: float
    ) -> ClockReading | None:
        """The newest reading of ``device`` if it was measured after ``after`` (the
        receiver's monotonic clock), else the next one, waiting up to ``within`` seconds
        for it; None if none came."""
        try:
            async with asyncio.timeout(within):
                while True:
                    reading = self._readings.get(device)
                    if reading is not None and reading.mono > after:
                        return reading
                    await self._changed.setdefault(device, asyncio.Event()).wait()
        except TimeoutError:
            return None

    def session_offset(self, session: str) -> float | None:
        """The device's clock offset that converts ``session``'s expiry (None: unknown)."""
        entry = self._sessions.get(session)
        return None if entry is None else entry.offset_s


def receiver_expiry(
    meta: Mapping[str, object], opened_at: float, offset_s: float | None
) -> float | None:
    """When a session expires on the receiver's clock: the device's expiry (``meta``'s
    ``expires_at``) moved by the device's ``offset_s``; with no offset measured, the
    session's length on the device's clock (``expires_at - started_at``) from when the
    receiver opened it. None if the device stated no expiry."""
    expires, started = meta.get("expires_at"), meta.get("started_at")
    if not plausible(expires):
        return None
    assert isinstance(expires, int | float)
    if offset_s is not None:
        return float(expires) - offset_s
    if not plausible(started):
        return None
    assert isinstance(started, int | float)
    return opened_at + float(expires) - float(started)
