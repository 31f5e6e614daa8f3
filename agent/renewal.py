"""What the district signed expires: warn ahead, and show an expired enrollment.

Two documents expire (docs/INSTALL-PI.md, "Renewal"): the enrollment certificate (the
receiver then refuses the device and a press reaches nobody; an expired one is a
fault on the LED) and the trigger-key list (remote triggers are then refused; the
buttons still work). The agent's housekeeping checks both; each is warned of once a
day from :data:`RENEW_WARN_DAYS` before it expires, in the log and the audit trail.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from agent.audit import AuditLog
from agent.enrollment_state import Enrolled
from provisioning.triggers import TriggerKeyList

log = logging.getLogger(__name__)

#: The agent warns this many days before its enrollment certificate expires.
RENEW_WARN_DAYS = 30


class RenewalWatch:
    """Warnings of what expires, and whether the enrollment certificate has."""

    def __init__(
        self,
        device_id: str,
        audit: AuditLog,
        *,
        clock: Callable[[], float],
        on_change: Callable[[], None],
    ) -> None:
        self.device_id = device_id
        self.audit = audit
        self.clock = clock
        #: Called when :attr:`certificate_expired` changed (the LED shows it).
        self.on_change = on_change
        #: The enrollment certificate has expired (the LED shows a fault).
        self.certificate_expired = False
        #: When each expiry (audit event name) was last warned of (monotonic).
        self._warned: dict[str, float] = {}

    def check(self, enrollment: Enrolled | None, keys: TriggerKeyList | None) -> None:
        """Warn (log, audit trail) once a day from :data:`RENEW_WARN_DAYS` before what the
        district signed expires: the enrollment certificate (the receiver then refuses the
        device and a press reaches nobody; an expired one is a fault on the LED) and the
        trigger-key list (remote triggers are then refused; the buttons still work)."""
        if enrollment is not None:
            e = enrollment.enrollment
            expired = e.exp <= self.clock()
            if expired != self.certificate_expired:
                self.certificate_expired = expired
                self.on_change()
            self._warn(
                "enrollment_expiring", f"enrollment certificate v{e.version}", e.version, e.exp,
                "the receiver refuses this device",
                f"renew it (breakglass provision rotate {self.device_id})",
            )  # fmt: skip
        if keys is not None:
            self._warn(
                "keylist_expiring", f"trigger-key list v{keys.version}", keys.version, keys.exp,
                "remote triggers are refused",
                "the district must send a new one (PUT /v1/trigger-keys)",
            )  # fmt: skip

    def _warn(
        self, event: str, what: str, version: int, exp: float, then: str, remedy: str
    ) -> None:
        days = (exp - self.clock()) / 86400
        now = time.monotonic()
        if days > RENEW_WARN_DAYS or now < self._warned.get(event, -math.inf) + 86400:
            return
        self._warned[event] = now
        when = f"has expired: {then}" if days <= 0 else f"expires in {days:.0f} day(s)"
        log.warning("%s %s: %s", what, when, remedy)
        self.audit.record_soon(event, version=version, exp=exp, expired=days <= 0)
