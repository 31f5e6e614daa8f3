"""The emergency on this device: what starts, extends and ends it.

A panic button press starts one (or joins the open one: it never ends it),
whatever the key list says. A remote trigger (over the Local API or pushed by the
receiver over the uplink) is verified by :class:`agent.trigger_gate.TriggerGate` and
applied by :func:`agent.policy.apply_trigger`: a start, an extension or an end.
Expiry ends it too (the agent's housekeeping asks). Each change is persisted first
(the session survives a restart whatever fails after), audited, then streamed or
stopped (:mod:`agent.streaming`). The state machine itself: :mod:`agent.emergency`.
A session restored after a restart is audited as ``session_resumed`` with the time
left it got and why, as soon as that is fixed (the first housekeeping tick).

A button pressed again and again while a session is open (a frightened person, or a
chattering contact: a broken switch can "press" ten times a second for days) is
never ignored, but only the first :data:`JOIN_AUDITS` such presses of a button per
:data:`JOIN_WINDOW_S` are audited (and saved) one by one; the rest are counted and
audited as one ``button_presses`` entry when the window closes, or the session ends.
A press that starts a session is always audited and saved at once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.audit import AuditLog
from agent.changes import Changes
from agent.config import AgentConfig
from agent.emergency import Emergency, Ended, Extended, Started
from agent.policy import Outcome, apply_trigger, refused
from agent.streaming import Streaming
from agent.trigger_gate import TriggerGate
from hardware.button import PressEvent
from provisioning.triggers import Rejected

log = logging.getLogger(__name__)

#: Presses of one button joining an open session audited one by one per window.
JOIN_AUDITS: Final = 5
#: The window (monotonic seconds from its first press) beyond whose first presses a
#: button's joining presses are counted, then audited as one entry.
JOIN_WINDOW_S: Final = 60.0


@dataclass(slots=True)
class _Joins:
    """One button's presses joining ``session`` in the window opened at ``opened``."""

    session: str
    location: str
    opened: float
    audited: int = 0
    counted: int = 0
    first_at: float = 0.0
    last_at: float = 0.0


class Alarm:
    """Presses, remote triggers and expiry, applied to the emergency."""

    def __init__(
        self,
        config: AgentConfig,
        emergency: Emergency,
        gate: TriggerGate,
        streaming: Streaming,
        audit: AuditLog,
        *,
        clock: Callable[[], float],
        persist: Callable[[], None],
        changes: Changes,
        press_log: deque[PressEvent],
    ) -> None:
        self.config = config
        self.emergency = emergency
        self.gate = gate
        self.streaming = streaming
        self.audit = audit
        self.clock = clock
        #: Writes the state files (the emergency and the sessions owed).
        self.persist = persist
        self.changes = changes
        #: The latest presses, in order (a chattering button must not grow it for ever).
        self.press_log = press_log
        #: Every press since start (the metrics' counter).
        self.presses = 0
        #: Presses joining an open session, by button, in their window.
        self._joins: dict[str, _Joins] = {}

    def press(self, event: PressEvent) -> None:
        """A panic button was pressed (runs on the loop). Never depends on any key list."""
        self.press_log.append(event)
        self.presses += 1
        self.changes.notify()
        cameras = tuple(c.id for c in self.config.cameras)
        now, mono = self.clock(), time.monotonic()
        result = self.emergency.press(now, event.button_id, event.location, cameras, mono=mono)
        self.audit_resumed()
        if not isinstance(result, Started) and not self._audit_join(
            event, result.session.id, now, mono
        ):
            return  # counted: audited with the others of its window
        self.persist()  # first: whatever fails below, the session survives a restart
        self.audit.record_soon(
            "button_press",
            button=event.button_id,
            location=event.location,
            session=result.session.id,
            started=isinstance(result, Started),
        )
        if isinstance(result, Started):
            log.warning(
                "EMERGENCY %s started by button %s (%s)",
                result.session.id,
                event.button_id,
                event.location,
            )
            self.streaming.begin(result.session)
        else:
            log.info(
                "button %s pressed again during session %s", event.button_id, result.session.id
            )

    def _audit_join(self, event: PressEvent, session: str, now: float, mono: float) -> bool:
        """Whether this press joining ``session`` is audited on its own (else counted)."""
        joins = self._joins.get(event.button_id)
        if joins is not None and (joins.session != session or mono - joins.opened >= JOIN_WINDOW_S):
            self._say_joins(event.button_id)
            joins = None
        if joins is None:
            joins = self._joins[event.button_id] = _Joins(session, event.location, mono)
        if joins.audited < JOIN_AUDITS:
            joins.audited += 1
            return True
        if not joins.counted:
            joins.first_at = now
            log.warning(
                "button %s pressed over %d times within %g s: further presses are counted",
                event.button_id, JOIN_AUDITS, JOIN_WINDOW_S,
            )  # fmt: skip
        joins.counted += 1
        joins.last_at = now
        return False

    def _say_joins(self, button: str) -> None:
        """Audit the presses of ``button`` counted in its window, if any; close it."""
        joins = self._joins.pop(button, None)
        if joins is None or not joins.counted:
            return
        self.audit.record_soon(
            "button_presses",
            button=button,
            location=joins.location,
            session=joins.session,
            count=joins.counted,
            first_at=joins.first_at,
            last_at=joins.last_at,
        )

    def _close_windows(self, *, every: bool = False) -> None:
        """Audit the counted presses of windows that have closed (``every``: all)."""
        mono = time.monotonic()
        for button, joins in list(self._joins.items()):
            if every or mono - joins.opened >= JOIN_WINDOW_S:
                self._say_joins(button)

    def trigger(self, body: bytes | str | Mapping[str, Any], *, via: str) -> Outcome:
        """Verify a remote trigger and apply it; every attempt is audited. Never raises."""
        verdict = self.gate.verify(body, via=via)
        if isinstance(verdict, Rejected):
            return refused(verdict.code, verdict.detail)
        trigger = verdict.trigger
        cameras = tuple(c.id for c in self.config.cameras)
        outcome = apply_trigger(
            self.emergency,
            trigger,
            now=self.clock(),
            cameras=cameras,
            via=via,
            mono=time.monotonic(),
        )
        self.audit_resumed()
        if not outcome.accepted:
            code, detail = outcome.body["error"], outcome.body["detail"]
            self.gate.reject(
                Rejected(code, detail, trigger.kid, trigger.role, trigger.action, trigger.reason),
                via=via,
            )
            return outcome
        self.gate.accepted += 1
        result = outcome.result
        assert result is not None  # an accepted outcome carries the state change
        log.warning(
            "trigger %s by %s key %s (%s) via %s: session %s",
            trigger.action, trigger.role, trigger.kid, trigger.label, via, result.session.id,
        )  # fmt: skip
        self.audit.record_soon(
            "trigger",
            result="accepted",
            code=None,
            detail=None,
            kid=trigger.kid,
            role=trigger.role,
            action=trigger.action,
            reason=trigger.reason,
            via=via,
            session=result.session.id,
        )
        self.persist()  # first, as for a press: whatever fails below, a restart knows it
        if isinstance(result, Started):
            self.streaming.begin(result.session)
        elif isinstance(result, Extended):
            self.streaming.extend(result.session)
        elif isinstance(result, Ended):
            self._close_windows(every=True)
            self.streaming.stop(result)
        return outcome

    def end(self, reason: str) -> Ended | None:
        """End the open session (callers verify the authority to do so)."""
        ended = self.emergency.end(self.clock(), reason)
        if ended is not None:
            self._close_windows(every=True)
            self.streaming.stop(ended)
        return ended

    def expire(self) -> None:
        """End the open session if its time is up."""
        ended = self.emergency.tick(self.clock(), time.monotonic())
        self.audit_resumed()
        if self._joins:
            self._close_windows(every=ended is not None)
        if ended is not None:
            self.streaming.stop(ended)

    def audit_resumed(self) -> None:
        """Audit how a session restored after a restart got its time left, once it has
        (``session_resumed``: after a reboot the wall clock decides, bounded)."""
        resumed = self.emergency.take_resumed()
        if resumed is None:
            return
        self.audit.record_soon(
            "session_resumed",
            session=resumed.session,
            reboot=resumed.reboot,
            why=resumed.why,
            left_s=round(resumed.left, 1),
            wall_left_s=None if resumed.wall_left is None else round(resumed.wall_left, 1),
            most_s=round(resumed.most, 1),
        )
