"""Emergency sessions: the sans-IO state machine and its persisted form.

IDLE -> ACTIVE(session) -> IDLE (the ended session is kept as ``last``).

- A button press or a valid start trigger opens a session when IDLE
  (:meth:`Emergency.start`); while ACTIVE it joins the open session (recorded
  in ``presses``) and never ends it.
- ``extend`` moves the expiry to ``now + duration``; ``end`` closes it. Only
  signed dispatch or superintendent triggers do either (the caller verified
  the trigger: :mod:`provisioning.triggers`), or expiry (``tick``).

``by`` (who acted) is a small mapping: ``{"kind": "button", "button_id",
"location"}`` or ``{"kind": "trigger", "kid", "role", "label", "reason",
"via"}``; ``at`` is added here.

Time is passed in; the shell persists :meth:`Emergency.to_json` atomically
after every change (see :func:`agent.statefile.write_atomic`) and restores it
with :meth:`Emergency.from_json` on start, so a session survives restarts and
power loss.

How long an open session has left is measured on the monotonic clock
(:meth:`Emergency.tick`): a Pi has no battery-backed clock, and NTP steps it by
hours (forward after a stale boot, or back). The persisted form carries the
session's monotonic deadline and this boot's id (``clock``), so a restart within
the same boot (systemd after a crash or an update: CLOCK_MONOTONIC goes on) keeps
exactly the time left whatever the wall clock did. After a reboot the monotonic
clock starts again and only the wall clock is left, bounded (:meth:`Emergency._resumed`).
How a restored session's time left was chosen is kept as a :class:`Resumed` note for
the shell to audit (:meth:`Emergency.take_resumed`); this module does no I/O.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

#: After a reboot, a session whose end the wall clock cannot vouch for streams this long,
#: never longer than it had left when last seen open: at least this long when the clock
#: says the session is over, or nearly (a clock stepped forward since the press looks
#: exactly like a long outage), and at most this long when the clock reads before a time
#: the file says was already past (fake-hwclock's last save after a power cut: the outage
#: cannot be measured). The police see it resumed and can extend it or end it.
RESUME_AT_LEAST_S = 600.0
#: Presses a session keeps (its first and its latest halves): each one is saved with it,
#: and a chattering button took ``emergency.json`` past its size limit in 20 minutes.
#: The audit trail has every press.
MAX_PRESSES_KEPT = 32


class State(enum.Enum):
    """Whether an emergency is open."""

    IDLE = "idle"
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class Session:
    """One emergency session: who opened it, why, which cameras, until when."""

    id: str
    building: str
    started_by: Mapping[str, Any]
    started_at: float
    expires_at: float
    cameras: tuple[str, ...]
    ended_at: float | None = None
    end_reason: str | None = None
    presses: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    extensions: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    ended_by: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """A session was opened."""

    session: Session


@dataclass(frozen=True, slots=True)
class Repeated:
    """A press arrived while a session was already open; it changes nothing."""

    session: Session


@dataclass(frozen=True, slots=True)
class Extended:
    """A session's expiry moved later."""

    session: Session


@dataclass(frozen=True, slots=True)
class Ended:
    """A session was closed (``session.end_reason`` says why)."""

    session: Session


@dataclass(frozen=True, slots=True)
class Resumed:
    """How a session restored from the file after a restart got its time left.

    ``why``: ``same_boot`` (the saved monotonic deadline, exact), or after a reboot
    ``wall_clock`` (the time left when last seen open, less the outage the wall clock
    measures), ``clock_behind`` (the clock reads before a time the file says was already
    past: at most :data:`RESUME_AT_LEAST_S`), ``clock_says_over`` (the clock says it is
    over or nearly: :data:`RESUME_AT_LEAST_S`) or ``none_left`` (it had no time left when
    last seen open: it ends). ``wall_left``: what the wall clock alone gives (None in the
    same boot); ``most``: the bound, what it had left when last seen open.
    """

    session: str
    reboot: bool
    left: float
    why: str
    wall_left: float | None
    most: float


def share_session(building: str, now: float, cameras: tuple[str, ...], hours: float) -> Session:
    """A building's continuous share of its exterior cameras (not an emergency).

    :func:`agent.zones.cameras_to_stream` lets only exterior cameras out of it,
    whatever ``cameras`` says.
    """
    return Session(
        id="share-" + new_session_id(now),
        building=building,
        started_by={"kind": "share", "policy": "share_exterior", "at": now},
        started_at=now,
        expires_at=now + hours * 3600,
        cameras=cameras,
    )


def new_session_id(now: float) -> str:
    """Sortable, unguessable: ``20261128T133000Z-3f9a1c2e``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{stamp}-{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class _Clock:
    """The open session's deadline as saved: on the monotonic clock of boot ``boot``, and
    when it was last seen open (``seen_at`` on the wall clock, ``left`` seconds left)."""

    session: str
    extensions: int
    boot: str
    deadline: float
    seen_at: float
    left: float

    @classmethod
    def from_json(cls, raw: Any) -> _Clock | None:
        """The record, or None when it is missing or damaged (then as from an older file)."""
        if not isinstance(raw, Mapping):
            return None
        try:
            record = cls(
                _str(raw["session"]),
                _int(raw["extensions"]),
                _str(raw["boot"]),
                _float(raw["deadline"]),
                _float(raw["seen_at"]),
                _float(raw["left"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return record


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("not a number")
    if not math.isfinite(value):
        raise ValueError("not finite")
    return float(value)


@functools.cache
def this_boot() -> str:
    """This boot's id (Linux): monotonic times are only comparable within one boot.
    Without one, a random id: every restart then counts as a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read(64).strip()
    except OSError:
        boot = ""
    return boot or "random-" + secrets.token_hex(16)


class Emergency:
    """The emergency state of one building agent.

    ``boot`` is this boot's id (default: :func:`this_boot`); the monotonic times passed
    in (``mono``) must be CLOCK_MONOTONIC seconds (``time.monotonic()``) of that boot.
    """

    def __init__(self, building: str, duration_s: float, *, boot: str | None = None) -> None:
        self.building = building
        self.duration_s = duration_s
        self.boot = this_boot() if boot is None else boot
        self.active: Session | None = None
        self.last: Session | None = None
        #: ((session id, extensions), monotonic deadline) of the open session (:meth:`tick`).
        self._deadline: tuple[tuple[str, int], float] | None = None
        #: (wall, monotonic) when the open session was last seen open (saved with it).
        self._seen: tuple[float, float] | None = None
        #: The session restored by :meth:`from_json` ((id, extensions)), until anchored,
        #: and its saved clock record (None: an older file, or a damaged record).
        self._restored: tuple[str, int] | None = None
        self._saved: _Clock | None = None
        #: How the restored session's time left was chosen, until the shell takes it.
        self.resumed: Resumed | None = None

    @property
    def state(self) -> State:
        """IDLE or ACTIVE."""
        return State.ACTIVE if self.active is not None else State.IDLE

    def press(
        self,
        now: float,
        button_id: str,
        location: str,
        cameras: tuple[str, ...],
        *,
        mono: float | None = None,
    ) -> Started | Repeated:
        """A physical panic button was pressed."""
        by = {"kind": "button", "button_id": button_id, "location": location}
        return self.start(now, by, cameras, mono=mono)

    def start(
        self,
        now: float,
        by: Mapping[str, Any],
        cameras: tuple[str, ...],
        *,
        mono: float | None = None,
    ) -> Started | Repeated:
        """Open a session (a press or a verified start trigger); while open, join it.

        With ``mono`` (the monotonic clock) its deadline is fixed at once, so the state
        saved right after the press already has it (else the next :meth:`tick` fixes it).
        """
        event = {**by, "at": now}
        if self.active is not None:
            presses = (*self.active.presses, event)
            if len(presses) > MAX_PRESSES_KEPT:  # a chattering button: the first and latest
                half = MAX_PRESSES_KEPT // 2
                presses = (*presses[:half], *presses[-half:])
            self.active = replace(self.active, presses=presses)
            return Repeated(self.active)
        session = Session(
            id=new_session_id(now),
            building=self.building,
            started_by=event,
            started_at=now,
            expires_at=now + self.duration_s,
            cameras=cameras,
            presses=(event,),
        )
        self.active = session
        if mono is not None:
            self._anchor(session, now, mono)
        return Started(session)

    def extend(
        self, now: float, by: Mapping[str, Any], *, mono: float | None = None
    ) -> Extended | None:
        """Keep the open session for another ``duration_s`` from now (never shorter)."""
        if self.active is None:
            return None
        expires = max(self.active.expires_at, now + self.duration_s)
        event = {**by, "at": now, "expires_at": expires}
        before = self._deadline
        self.active = replace(
            self.active, expires_at=expires, extensions=(*self.active.extensions, event)
        )
        if mono is not None:
            deadline = self._anchor(self.active, now, mono)
            if before is not None and before[0][0] == self.active.id and before[1] > deadline:
                self._deadline = (self._deadline_key(self.active), before[1])  # never shorter
        return Extended(self.active)

    def tick(self, now: float, mono: float | None = None) -> Ended | None:
        """Close the session if it expired.

        With ``mono`` (the monotonic clock, in seconds) the time left is measured on it,
        not on the wall clock: a Pi has no battery-backed clock, and an open session must
        not end when the clock is set right (or last months when it is set back). The
        time left is taken from the wall clock when the session starts or is extended, at
        most :attr:`duration_s` (the most any start or extension gives), so a clock that
        was wrong then is bounded too. After a restart in the same boot it is the saved
        monotonic deadline; after a reboot, :meth:`_resumed`.
        """
        active = self.active
        if active is None:
            return None
        if mono is None:
            expired = now >= active.expires_at
        else:
            expired = mono >= self._anchor(active, now, mono)
        return self.end(now, "expired") if expired else None

    def time_left(self, now: float, mono: float) -> float | None:
        """Seconds the open session has left on the monotonic clock (None: none open);
        fixes its deadline as :meth:`tick` does."""
        active = self.active
        return None if active is None else self._anchor(active, now, mono) - mono

    @staticmethod
    def _deadline_key(session: Session) -> tuple[str, int]:
        return (session.id, len(session.extensions))

    def _anchor(self, active: Session, now: float, mono: float) -> float:
        """The open session's monotonic deadline, fixed the first time it is asked for
        after a start, an extension or a restore; notes when the session was seen open."""
        key = self._deadline_key(active)
        if self._deadline is None or self._deadline[0] != key:
            if key == self._restored:
                left = self._resumed(active, now, mono)
            else:
                left = min(active.expires_at - now, self.duration_s)
            self._deadline = (key, mono + left)
            self._restored = self._saved = None
        self._seen = (now, mono)
        return self._deadline[1]

    def take_resumed(self) -> Resumed | None:
        """How the session restored from the file got its time left, once (for the audit
        trail); None when nothing was restored, or it was taken already."""
        resumed, self.resumed = self.resumed, None
        return resumed

    def _resumed(self, active: Session, now: float, mono: float) -> float:
        """Time left of a session restored from the file (a restart); noted in
        :attr:`resumed`.

        - Saved in this boot: exactly what was left (the monotonic clock went on).
        - Otherwise (a reboot, or a file from before the deadline was saved): the wall
          clock, at most what the session had left when last seen open (a whole duration
          for an older file). If the clock reads before a time the file says was already
          past (when the session was last seen open, a press, an extension, the start, the
          end of the session before) it is behind (fake-hwclock's last save after a power
          cut): the outage cannot be measured, and the session gets at most
          :data:`RESUME_AT_LEAST_S`. If it says the session is over or nearly, it still
          gets :data:`RESUME_AT_LEAST_S` (within that bound): a clock stepped forward since
          the press cannot be told from a long outage, and a life-safety emergency is not
          ended on its word.
        """
        saved = self._saved
        if saved is not None and saved.boot == self.boot:
            left = min(saved.deadline - mono, self.duration_s)
            self.resumed = Resumed(active.id, False, left, "same_boot", None, left)
            return left
        if saved is not None:
            most = min(max(saved.left, 0.0), self.duration_s)
            seen_at, deadline = saved.seen_at, saved.seen_at + saved.left
        else:
            most, seen_at, deadline = self.duration_s, active.started_at, active.expires_at
        wall_left = deadline - now
        if most <= 0:
            left, why = most, "none_left"
        elif now < max(seen_at, self._latest_known(active)):
            left, why = min(most, RESUME_AT_LEAST_S), "clock_behind"
        elif wall_left < min(RESUME_AT_LEAST_S, most):
            left, why = min(RESUME_AT_LEAST_S, most), "clock_says_over"
        else:
            left, why = min(most, wall_left), "wall_clock"
        self.resumed = Resumed(active.id, True, left, why, wall_left, most)
        log.warning(
            "session %s resumed after a reboot with %.0f s left (%s; the wall clock gives it"
            " %.0f s, it had %.0f s left when last seen open)",
            active.id,
            left,
            why,
            wall_left,
            most,
        )
        return left

    def _latest_known(self, active: Session) -> float:
        """The latest wall time the file says was already past: the open session's start,
        presses and extensions, the session before it. A clock that reads before it is
        behind."""
        times = [active.started_at]
        times += [e["at"] for e in (*active.presses, *active.extensions) if _is_time(e.get("at"))]
        last = self.last
        if last is not None:
            times += [t for t in (last.started_at, last.ended_at) if t is not None]
        return max(times)

    def end(self, now: float, reason: str, by: Mapping[str, Any] | None = None) -> Ended | None:
        """Close the open session (the caller checked the trigger's authority)."""
        if self.active is None:
            return None
        ended_by = None if by is None else {**by, "at": now}
        ended = replace(self.active, ended_at=now, end_reason=reason, ended_by=ended_by)
        self.active, self.last = None, ended
        return Ended(ended)

    def to_json(self) -> dict[str, Any]:
        """The persisted form (``clock``: the open session's deadline, once it has one)."""
        return {
            "v": 1,
            "active": _session_json(self.active),
            "last": _session_json(self.last),
            "clock": self._clock_json(),
        }

    def _clock_json(self) -> dict[str, Any] | None:
        active = self.active
        if active is None:
            return None
        key = self._deadline_key(active)
        if self._deadline is not None and self._deadline[0] == key and self._seen is not None:
            seen_at, seen_mono = self._seen
            deadline = self._deadline[1]
            return {
                "session": active.id,
                "extensions": len(active.extensions),
                "boot": self.boot,
                "deadline": deadline,
                "seen_at": seen_at,
                "left": deadline - seen_mono,
            }
        saved = self._saved  # restored and not looked at since: kept as it was
        if saved is not None and key == self._restored == (saved.session, saved.extensions):
            return asdict(saved)
        return None

    @classmethod
    def from_json(
        cls,
        building: str,
        duration_s: float,
        doc: Mapping[str, Any],
        *,
        boot: str | None = None,
    ) -> Emergency:
        """Restore from :meth:`to_json` output; a foreign building's session is not restored.

        ``clock`` is optional (files written before it are read as they were)."""
        emergency = cls(building, duration_s, boot=boot)
        if doc.get("v") != 1:
            raise ValueError("emergency state: unknown version")
        for name in ("active", "last"):
            raw = doc.get(name)
            if raw is not None:
                session = Session(
                    id=str(raw["id"]),
                    building=str(raw["building"]),
                    started_by=dict(raw["started_by"]),
                    started_at=float(raw["started_at"]),
                    expires_at=float(raw["expires_at"]),
                    cameras=tuple(str(c) for c in raw["cameras"]),
                    ended_at=None if raw["ended_at"] is None else float(raw["ended_at"]),
                    end_reason=raw["end_reason"],
                    presses=tuple(dict(p) for p in raw["presses"]),
                    extensions=tuple(dict(e) for e in raw.get("extensions", ())),
                    ended_by=None if raw.get("ended_by") is None else dict(raw["ended_by"]),
                )
                if session.building == building:
                    setattr(emergency, name, session)
        active = emergency.active
        if active is not None:
            emergency._restored = key = cls._deadline_key(active)
            saved = _Clock.from_json(doc.get("clock"))
            if saved is not None and (saved.session, saved.extensions) == key:
                emergency._saved = saved
        return emergency


def _session_json(session: Session | None) -> dict[str, Any] | None:
    if session is None:
        return None
    doc = asdict(session)
    doc["cameras"] = list(session.cameras)
    doc["presses"] = [dict(p) for p in session.presses]
    doc["extensions"] = [dict(e) for e in session.extensions]
    doc["started_by"] = dict(session.started_by)
    doc["ended_by"] = None if session.ended_by is None else dict(session.ended_by)
    return doc
