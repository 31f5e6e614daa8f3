"""Emergency policy: what a verified trigger does to the emergency state (pure).

- ``start``: opens a session on the cameras it names (``all``: every camera of
  the building) when IDLE; while ACTIVE it joins the open session, like a
  second button press, and changes nothing else.
- ``extend``: moves the open session's expiry to ``now + duration``.
- ``end``: closes the open session.
- ``extend`` and ``end`` with no session open are refused (``no_session``), and so
  are those that name a session (``Trigger.session``) other than the open one: an
  end meant for an emergency that is over never ends the next one;
  a start naming a camera the building does not have is refused
  (``malformed``): the signer meant something this device cannot do.

Roles were checked by the verifier (:data:`provisioning.triggers.MAY`); this
module never sees a trigger that failed verification. The answer carries the
HTTP status the Local API returns for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.emergency import Emergency, Ended, Extended, Repeated, Started
from provisioning.triggers import Trigger

#: HTTP status per rejection code (the body carries the code itself).
STATUS: Final[Mapping[str, int]] = {
    "malformed": 400,
    "too_large": 413,
    "unknown_key": 403,
    "bad_signature": 403,
    "role_forbidden": 403,
    "wrong_building": 403,
    "wrong_device": 403,
    "expired": 403,
    "not_yet_valid": 403,
    "bad_challenge": 403,
    "replayed": 409,
    "no_session": 409,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a trigger attempt led to: an HTTP status and the JSON body of the answer."""

    status: int
    body: Mapping[str, Any]
    result: Started | Repeated | Extended | Ended | None = None

    @property
    def accepted(self) -> bool:
        """Whether the trigger took effect (202)."""
        return self.status == 202


def refused(code: str, detail: str) -> Outcome:
    """The Local API's error answer."""
    return Outcome(STATUS.get(code, 400), {"error": code, "detail": detail})


def trigger_by(trigger: Trigger, via: str) -> dict[str, Any]:
    """Who acted, as sessions and the audit trail record it."""
    return {
        "kind": "trigger",
        "kid": trigger.kid,
        "role": trigger.role,
        "label": trigger.label,
        "reason": trigger.reason,
        "via": via,
    }


def apply_trigger(
    emergency: Emergency,
    trigger: Trigger,
    *,
    now: float,
    cameras: tuple[str, ...],
    via: str,
    mono: float | None = None,
) -> Outcome:
    """Apply a verified trigger to ``emergency`` (``cameras``: the building's camera ids;
    ``mono``: the monotonic clock, which fixes a start's or an extension's deadline)."""
    by = trigger_by(trigger, via)
    if trigger.action == "start":
        named = cameras if trigger.cameras is None else trigger.cameras
        unknown = sorted(set(named) - set(cameras))
        if unknown:
            return refused("malformed", f"payload.cameras: {unknown[0]!r} is not a camera here")
        started = emergency.start(now, by, tuple(c for c in cameras if c in named), mono=mono)
        joined = isinstance(started, Repeated)
        body = {"session": started.session.id, "action": "start", "joined": joined}
        return Outcome(202, body, started)
    target = trigger.session
    active = emergency.active
    if target is not None and (active is None or active.id != target):
        now_open = "no session is open" if active is None else "another session is open"
        return refused(
            "no_session", f"the trigger is for session {target}, which is not open ({now_open})"
        )
    if trigger.action == "extend":
        extended = emergency.extend(now, by, mono=mono)
        if extended is None:
            return refused("no_session", "no emergency session is open to extend")
        body = {"session": extended.session.id, "action": "extend"}
        return Outcome(202, {**body, "expires_at": extended.session.expires_at}, extended)
    # Who and why, as the receiver and the district's notice show it (the trigger's own
    # reason names the dispatcher): "ended by trigger" alone said neither.
    who = f"{trigger.role} key {trigger.label or trigger.kid}"
    ended = emergency.end(now, f"ended by {who}: {trigger.reason}"[:600], by)
    if ended is None:
        return refused("no_session", "no emergency session is open to end")
    return Outcome(202, {"session": ended.session.id, "action": "end"}, ended)
