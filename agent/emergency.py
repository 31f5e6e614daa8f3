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
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any


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


class Emergency:
    """The emergency state of one building agent."""

    def __init__(self, building: str, duration_s: float) -> None:
        self.building = building
        self.duration_s = duration_s
        self.active: Session | None = None
        self.last: Session | None = None
        #: ((session id, extensions), monotonic deadline) of the open session (:meth:`tick`).
        self._deadline: tuple[tuple[str, int], float] | None = None

    @property
    def state(self) -> State:
        """IDLE or ACTIVE."""
        return State.ACTIVE if self.active is not None else State.IDLE

    def press(
        self, now: float, button_id: str, location: str, cameras: tuple[str, ...]
    ) -> Started | Repeated:
        """A physical panic button was pressed."""
        by = {"kind": "button", "button_id": button_id, "location": location}
        return self.start(now, by, cameras)

    def start(
        self, now: float, by: Mapping[str, Any], cameras: tuple[str, ...]
    ) -> Started | Repeated:
        """Open a session (a press or a verified start trigger); while open, join it."""
        event = {**by, "at": now}
        if self.active is not None:
            self.active = replace(self.active, presses=(*self.active.presses, event))
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
        return Started(session)

    def extend(self, now: float, by: Mapping[str, Any]) -> Extended | None:
        """Keep the open session for another ``duration_s`` from now (never shorter)."""
        if self.active is None:
            return None
        expires = max(self.active.expires_at, now + self.duration_s)
        event = {**by, "at": now, "expires_at": expires}
        self.active = replace(
            self.active, expires_at=expires, extensions=(*self.active.extensions, event)
        )
        return Extended(self.active)

    def tick(self, now: float, mono: float | None = None) -> Ended | None:
        """Close the session if it expired.

        With ``mono`` (the monotonic clock, in seconds) the time left is measured on it,
        not on the wall clock: a Pi has no battery-backed clock, and an open session must
        not end when the clock is set right (or last months when it is set back). The
        time left is taken from the wall clock whenever the session starts, is extended
        or is first seen after a restart, at most :attr:`duration_s` (the most any start
        or extension gives), so a clock that was wrong then is bounded too.
        """
        active = self.active
        if active is None:
            return None
        if mono is None:
            expired = now >= active.expires_at
        else:
            key = (active.id, len(active.extensions))
            if self._deadline is None or self._deadline[0] != key:
                left = min(active.expires_at - now, self.duration_s)
                self._deadline = (key, mono + left)
            expired = mono >= self._deadline[1]
        return self.end(now, "expired") if expired else None

    def end(self, now: float, reason: str, by: Mapping[str, Any] | None = None) -> Ended | None:
        """Close the open session (the caller checked the trigger's authority)."""
        if self.active is None:
            return None
        ended_by = None if by is None else {**by, "at": now}
        ended = replace(self.active, ended_at=now, end_reason=reason, ended_by=ended_by)
        self.active, self.last = None, ended
        return Ended(ended)

    def to_json(self) -> dict[str, Any]:
        """The persisted form."""
        return {
            "v": 1,
            "active": _session_json(self.active),
            "last": _session_json(self.last),
        }

    @classmethod
    def from_json(cls, building: str, duration_s: float, doc: Mapping[str, Any]) -> Emergency:
        """Restore from :meth:`to_json` output; a foreign building's session is not restored."""
        emergency = cls(building, duration_s)
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
