"""One enrollment at a time (agent.technician): a second request while one is being
installed, or after one was installed (the device is starting again with it), is
refused ``busy`` and audited; it never runs beside the first.

Two enrollments installed at once could each pass the version check against the same
``current`` one, and one could remove the other's new directory while swapping the
state link: the device would come back unprovisioned. The real install path is tested
end to end in tests/test_first_boot.py; here it is replaced by one that waits until
the test lets it finish, so the overlap is certain.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import AuditLog
from agent.config import AgentConfig
from agent.enrollment_state import EnrollmentRefused
from agent.technician import TechnicianDesk

pytestmark = pytest.mark.timeout(30)


class SlowInstall:
    """Stands in for ``TechnicianDesk._apply`` (a worker thread): each call waits for
    ``finish``, and counts how many run at once."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.started = threading.Event()
        self.finish = threading.Event()
        self.running = self.most = self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, bundle: Any, now: float) -> Any:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        self.started.set()
        try:
            if not self.finish.wait(10):
                raise AssertionError("never told to finish")
            if self.refuse:
                raise EnrollmentRefused("rollback", "version 1 is not newer than 1")
            enrollment = SimpleNamespace(
                version=2, building="b-1", receiver_url="wss://rx", cameras={}, device="d-1"
            )
            return SimpleNamespace(enrollment=enrollment)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl", lambda: 0.0)
    yield log
    log.close()


def refusals(audit: AuditLog) -> list[str]:
    """The codes of the ``technician_refused`` entries written so far."""
    audit.close()  # writes what is queued
    entries = [json.loads(line) for line in audit.path.read_text().splitlines()]
    return [e["code"] for e in entries if e.get("event") == "technician_refused"]


def desk(audit: AuditLog, install: SlowInstall, monkeypatch: pytest.MonkeyPatch) -> TechnicianDesk:
    technician = TechnicianDesk(
        cast(AgentConfig, None),  # only the replaced install would read it
        Ed25519PrivateKey.generate().public_key(),
        audit,
        clock=lambda: 0.0,
    )
    monkeypatch.setattr(technician, "_apply", install)
    return technician


async def test_an_enrollment_while_one_is_being_installed_is_refused_busy(
    audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    install = SlowInstall(refuse=True)
    technician = desk(audit, install, monkeypatch)
    first = asyncio.create_task(technician.handle({"op": "enroll", "bundle": {}}, "tech-a"))
    await asyncio.to_thread(install.started.wait, 10)
    second = await technician.handle({"op": "enroll", "bundle": {}}, "tech-b")
    assert second["error"] == "busy"
    assert "another enrollment is being installed" in second["detail"]
    install.finish.set()
    assert (await first)["error"] == "rollback"
    # The first one is over (refused): the next one is installed as usual.
    third = await technician.handle({"op": "enroll", "bundle": {}}, "tech-b")
    assert third["error"] == "rollback"
    assert (install.calls, install.most) == (2, 1)
    assert refusals(audit) == ["busy", "rollback", "rollback"]


async def test_an_enrollment_after_one_was_installed_is_refused_busy(
    audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    install = SlowInstall(refuse=False)
    install.finish.set()
    technician = desk(audit, install, monkeypatch)
    first = await technician.handle({"op": "enroll", "bundle": {}}, "tech-a")
    assert first["ok"]["version"] == 2
    again = await technician.handle({"op": "enroll", "bundle": {}}, "tech-a")
    assert again["error"] == "busy"
    assert "starting again" in again["detail"]
    assert install.calls == 1
    technician.after_reply()
    assert technician.enrolled.is_set()
    assert refusals(audit) == ["busy"]
