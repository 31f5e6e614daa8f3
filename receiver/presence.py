"""Which devices the receiver has heard from, and the alarm for those gone quiet.

Theory of operation
-------------------
Every device that passed the uplink handshake has a :class:`DevicePresence`:
when the receiver last heard from it (the hello, a heartbeat or any other
message), whether it is connected now, its building (from its enrollment
certificate, else from the sessions it opens) and the session open on its
connection, if any. The protocol carries no device state (armed, fault)
beyond that, so none is shown.

A building is **verified** (``building_verified``) only when it came from the
enrollment certificate the device's current connection was accepted with
(:meth:`Presence.connected` with a ``building``). A session's claim never sets
or changes a verified building; for a device accepted by the allow-list (no
certificate) the first claim sets it, unverified: the device's own word, shown
as such, and never a reason to send it the building's dispatch triggers
(:meth:`receiver.server.Receiver.devices_of` takes certified connections only).
A device that connects without a certificate keeps the building it had, marked
unverified.

A device heard from before and silent for ``offline_after_s`` (default
300 s) is *offline*. :meth:`Presence.check` raises the alarm once per
transition: one warning when a device goes offline, one info line when it is
heard again. The receiver calls it every few seconds from a background task
and before answering ``GET /v1/devices``, so the answer is never stale. Time
is the injected ``clock`` (wall seconds, ``time.time`` by default): tests
move it instead of waiting.

Restarts: the last-heard times and buildings are kept in
``DATA/presence.json`` (written whole to a temporary file, fsynced, then
renamed over the old one; at most every ``save_every_s`` seconds while
something changed, and once more at shutdown). After a restart no device is
connected; a device that never comes back is still reported offline once
its silence, counted from before the restart, passes ``offline_after_s``.
The first check after a restart warns again about each device already
offline, so a new log starts with the alarms in force. A device revoked by
the district is forgotten (:meth:`Presence.forget`): its silence is expected
and raises no alarm.

A device whose footage the receiver cannot record (its disk full or failing,
a damaged recording) keeps it and reconnects every few seconds, so it never
goes offline: the uplink reports each failure (:meth:`Presence.recording_failed`)
and each acknowledgement (:meth:`Presence.recording_works`), and the device's
entry says since when its recording fails and why (``recording_failing``),
logged once per transition. Not kept across restarts.

A device connected with a session open whose footage has not become durable
for :data:`FOOTAGE_STALL_S` (nothing arrives, or nothing can be recorded) is
in an alarm of its own, ``footage_stalled_since`` (logged once per
transition, cleared by the next footage recorded): connected and online said
all was well while an emergency's footage had stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.statefile import write_atomic
from receiver.errors import InvalidSettingError

__all__ = [
    "MIN_OFFLINE_AFTER_S",
    "OFFLINE_AFTER_S",
    "DevicePresence",
    "Presence",
    "iso_utc",
    "validate_offline_after",
]

log = logging.getLogger(__name__)

#: Default silence after which a device is offline (seconds).
OFFLINE_AFTER_S = 300.0
#: A connected device's open session with no footage made durable for this long raises
#: its own alarm (``footage_stalled_since``): connected and online said all was well
#: while an emergency's live footage had stopped (a review found a stall of 11 minutes).
FOOTAGE_STALL_S = 30.0
#: Three of the receiver's heartbeats (``receiver.ingest.HEARTBEAT_S``): a shorter
#: threshold would raise the alarm for devices that are merely idle.
MIN_OFFLINE_AFTER_S = 15.0
#: The presence file is rewritten at most this often while something changed.
SAVE_EVERY_S = 5.0
_FILE_VERSION = 1
_MAX_ID = 64
#: Characters of a recording failure's error kept (and shown).
_MAX_ERROR = 512


def validate_offline_after(value: float) -> float:
    """``value`` if it is a usable ``offline_after_s``; else :class:`InvalidSettingError`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSettingError(f"offline_after_s: expected a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < MIN_OFFLINE_AFTER_S:
        raise InvalidSettingError(
            f"offline_after_s: expected a finite number of seconds of at least "
            f"{MIN_OFFLINE_AFTER_S:g} (three heartbeats), got {value:g}"
        )
    return float(value)


def iso_utc(t: float) -> str:
    """``t`` (UTC seconds) as ISO-8601, e.g. ``2026-11-28T10:00:00Z``."""
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


@dataclass(slots=True)
class DevicePresence:
    """What the receiver knows of one device's presence."""

    device: str
    #: When the receiver last heard from it (clock seconds).
    last_heard: float
    #: When ``connected`` last changed (clock seconds).
    changed: float
    building: str | None = None
    #: ``building`` came from the enrollment certificate of its (last) connection; False:
    #: from a session's claim (an allow-listed device), or from before that connection.
    building_verified: bool = False
    connected: bool = False
    #: The session open on its current connection.
    session: str | None = None
    #: The offline alarm is raised (the warning was logged).
    alarmed: bool = False
    #: Since when its footage cannot be recorded (clock seconds; None: it can), why,
    #: and when it last failed.
    failing_since: float | None = None
    failing_error: str | None = None
    failing_last: float | None = None
    #: While a session is open on its connection: when its footage last became durable
    #: (or the session opened), and whether the alarm for none since is raised.
    footage_at: float | None = None
    stalled: bool = False

    def offline(self, now: float, offline_after_s: float) -> bool:
        """Whether it has been silent for ``offline_after_s`` at ``now``."""
        return now - self.last_heard >= offline_after_s

    def since(self, now: float, offline_after_s: float) -> float:
        """When its present condition began: offline, connected, or disconnected."""
        if self.offline(now, offline_after_s):
            return self.last_heard + offline_after_s
        return self.changed

    def to_json(self, now: float, offline_after_s: float) -> dict[str, object]:
        """The ``GET /v1/devices`` entry."""
        return {
            "device": self.device,
            "building": self.building,
            "building_verified": self.building is not None and self.building_verified,
            "connected": self.connected,
            "last_heard": iso_utc(self.last_heard),
            "offline": self.offline(now, offline_after_s),
            "since": iso_utc(self.since(now, offline_after_s)),
            "session": self.session,
            "footage_stalled_since": iso_utc(self.footage_at)
            if self.stalled and self.footage_at is not None
            else None,
            "recording_failing": None
            if self.failing_since is None or self.failing_last is None
            else {
                "since": iso_utc(self.failing_since),
                "last": iso_utc(self.failing_last),
                "error": self.failing_error,
            },
        }


class Presence:
    """Last heard, connection and offline alarm per device; saved to ``path``.

    Everything runs on the event loop except the file writes
    (:meth:`save` hands a finished snapshot to a worker thread).
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        offline_after_s: float = OFFLINE_AFTER_S,
        clock: Callable[[], float] = time.time,
        save_every_s: float = SAVE_EVERY_S,
    ) -> None:
        self.path = path
        self.offline_after_s = validate_offline_after(offline_after_s)
        self.clock = clock
        self.save_every_s = save_every_s
        self.devices: dict[str, DevicePresence] = {}
        self._dirty = False
        self._saved_at = -math.inf  # time.monotonic() of the last save
        self._event = asyncio.Event()

    # -- what the uplink reports ---------------------------------------------

    def connected(self, device: str, *, building: str | None = None) -> None:
        """The device completed a handshake (its hello counts as heard). ``building``: the
        one its accepted enrollment certificate names (verified); None: no certificate on
        this connection (the allow-list), so whatever building it had is unverified now."""
        now = self.clock()
        entry = self.devices.get(device)
        if entry is None:
            entry = self.devices[device] = DevicePresence(device, now, now)
        entry.connected, entry.changed, entry.session = True, now, None
        if building:
            entry.building, entry.building_verified = building, True
        else:
            entry.building_verified = False
        self.heard(device)
        self._changed()

    def heard(self, device: str) -> None:
        """Any message from the device; clears its offline alarm."""
        entry = self.devices.get(device)
        if entry is None:
            return  # only devices that passed a handshake are tracked
        entry.last_heard = self.clock()
        self._dirty = True
        if entry.alarmed:
            entry.alarmed = False
            log.info("device %s is back online (building %s)", device, entry.building or "?")
            self._changed()

    def session(self, device: str, session: str | None, *, building: str | None = None) -> None:
        """The session open on the device's connection (``None``: none). ``building`` is
        what the session says: it sets an unknown building, unverified (a claim), and never
        sets or changes one its certificate gave."""
        entry = self.devices.get(device)
        if entry is not None:
            if session != entry.session:
                entry.footage_at, entry.stalled = None if session is None else self.clock(), False
            entry.session = session
            if building and not entry.building and not entry.building_verified:
                entry.building, entry.building_verified = building, False
                self._dirty = True
            self._changed()

    def disconnected(self, device: str) -> None:
        """The device's uplink ended."""
        entry = self.devices.get(device)
        if entry is not None and entry.connected:
            entry.connected, entry.changed, entry.session = False, self.clock(), None
            entry.footage_at, entry.stalled = None, False  # offline says it now
            self._dirty = True
            self._changed()

    def recording_failed(self, device: str, error: str) -> None:
        """The receiver could not record the device's footage (its disk is full or
        failing, its recording is damaged): the device keeps it and retries, so it
        stays connected (or reconnects every few seconds) and never goes offline.
        Reported until :meth:`recording_works`; logged once per transition."""
        entry = self.devices.get(device)
        if entry is None:
            return
        now = self.clock()
        error = error[:_MAX_ERROR]
        if entry.failing_since is None:
            entry.failing_since = now
            log.error(
                "device %s (building %s): RECORDING FAILING: %s",
                device, entry.building or "?", error,
            )  # fmt: skip
        entry.failing_error, entry.failing_last = error, now
        self._changed()

    def recording_works(self, device: str) -> None:
        """Footage of the device was made durable (acknowledged): it records again."""
        entry = self.devices.get(device)
        if entry is None:
            return
        if entry.session is not None:
            entry.footage_at = self.clock()
            if entry.stalled:
                entry.stalled = False
                log.warning("device %s: session %s: footage recorded again", device, entry.session)
                self._changed()
        if entry.failing_since is None:
            return
        log.warning(
            "device %s: recording works again (failing since %s: %s)",
            device, iso_utc(entry.failing_since), entry.failing_error,
        )  # fmt: skip
        entry.failing_since = entry.failing_error = entry.failing_last = None
        self._changed()

    def failing(self) -> list[str]:
        """Ids of the devices whose footage cannot be recorded now."""
        return sorted(d.device for d in self.devices.values() if d.failing_since is not None)

    def forget(self, devices: Iterable[str], why: str) -> None:
        """Stop tracking these devices (revoked: their silence raises no alarm)."""
        for device in devices:
            if self.devices.pop(device, None) is not None:
                log.info("device %s no longer watched for the offline alarm: %s", device, why)
                self._dirty = True
                self._changed()

    # -- the alarm -----------------------------------------------------------

    def check(self) -> list[str]:
        """Raise the alarm of each device newly offline (one warning each); their ids."""
        now = self.clock()
        newly = []
        for entry in self.devices.values():
            if not entry.alarmed and entry.offline(now, self.offline_after_s):
                entry.alarmed = True
                newly.append(entry.device)
                log.warning(
                    "device %s (building %s) OFFLINE: nothing heard since %s (%.0f s)",
                    entry.device,
                    entry.building or "?",
                    iso_utc(entry.last_heard),
                    now - entry.last_heard,
                )
            if (
                not entry.stalled
                and entry.connected
                and entry.session is not None
                and entry.footage_at is not None
                and now - entry.footage_at >= FOOTAGE_STALL_S
            ):
                entry.stalled = True
                log.error(
                    "device %s (building %s): session %s: NO FOOTAGE recorded for %.0f s, "
                    "though it is connected",
                    entry.device, entry.building or "?", entry.session, now - entry.footage_at,
                )  # fmt: skip
                self._changed()
        if newly:
            self._changed()
        return newly

    def offline(self) -> list[str]:
        """Ids of the devices offline now."""
        now = self.clock()
        return sorted(
            d.device for d in self.devices.values() if d.offline(now, self.offline_after_s)
        )

    def to_json(self) -> list[dict[str, object]]:
        """Every tracked device, by id (alarms checked first)."""
        self.check()
        now = self.clock()
        return [self.devices[d].to_json(now, self.offline_after_s) for d in sorted(self.devices)]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; re-checked after every change of state."""
        while not predicate():
            await self._event.wait()

    def _changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------

    async def run(self, every_s: float) -> None:
        """Check the alarms and save when due, every ``every_s`` seconds, until cancelled."""
        while True:
            self.check()
            if self._dirty and time.monotonic() - self._saved_at >= self.save_every_s:
                await self.save()
            await asyncio.sleep(every_s)

    async def save(self) -> None:
        """Write the presence file now (atomically) if anything changed; errors are logged."""
        if self.path is None or not self._dirty:
            return
        doc = {
            "version": _FILE_VERSION,
            "devices": {
                d.device: {
                    "last_heard": d.last_heard,
                    "building": d.building,
                    "building_verified": d.building_verified,
                }
                for d in self.devices.values()
            },
        }
        self._dirty, self._saved_at = False, time.monotonic()
        data = json.dumps(doc, sort_keys=True).encode()
        try:
            await asyncio.to_thread(write_atomic, self.path, data, mode=0o640)
        except OSError as exc:
            self._dirty = True
            log.error("device presence not saved to %s: %s", self.path, exc)

    def load(self) -> None:
        """Read the presence file kept before a restart (devices start disconnected)."""
        if self.path is None:
            return
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("device presence %s unreadable, starting afresh: %s", self.path, exc)
            return
        for device, entry in _entries(doc):
            heard = float(entry["last_heard"])
            building = entry.get("building")
            self.devices[device] = DevicePresence(
                device,
                heard,
                heard,
                building if isinstance(building, str) else None,
                # A file from before this key: unverified until the device's next hello.
                building_verified=entry.get("building_verified") is True,
            )


def _entries(doc: Any) -> list[tuple[str, dict[str, Any]]]:
    """The well-formed entries of a presence file; anything else is skipped."""
    if not isinstance(doc, dict) or doc.get("version") != _FILE_VERSION:
        log.error("device presence file: unknown format, starting afresh")
        return []
    devices = doc.get("devices")
    if not isinstance(devices, dict):
        return []
    out = []
    for device, entry in devices.items():
        heard = entry.get("last_heard") if isinstance(entry, dict) else None
        if (
            isinstance(device, str)
            and 0 < len(device) <= _MAX_ID
            and isinstance(heard, int | float)
            and not isinstance(heard, bool)
            and math.isfinite(heard)
        ):
            out.append((device, entry))
        else:
            log.error("device presence file: entry %.64r skipped", device)
    return out
