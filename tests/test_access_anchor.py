"""The receiver's access log is anchored in the device's signed audit trail.

The receiver tells each connected device the head of its access log (who
logged in, who watched what); the device writes it into its trail, which the
district holds. A log the police hand over later must still contain every
anchored entry unchanged (``breakglass audit report --access-log``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent import daemon
from agent.config import load_config
from agent.daemon import Agent
from breakglass.cli import main
from breakglass.demo import write_agent_config
from provisioning.keys import load_private_key, public_pem
from receiver.server import Receiver
from tests.logins import logged_in

pytestmark = pytest.mark.timeout(60)


def anchors(agent: Agent) -> list[dict[str, Any]]:
    lines = agent.audit.path.read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "receiver_access_head"]


async def test_the_device_anchors_the_receivers_access_log_and_the_report_checks_it(
    tmp_path: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    async with logged_in(receiver):  # a login: the access log has entries
        await receiver.access_log.flush()
    n, head = receiver.access_log.head
    assert n >= 1
    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    async with Agent(load_config(path)) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        # Told at the first heartbeat of the connection (5 s), written off the loop, then
        # shipped: the district's copy at the receiver holds it too.
        await agent.uplink.wait_until(
            lambda: bool(anchors(agent)) and agent.uplink.audit_acked >= agent.audit.head_n
        )
        (anchor,) = anchors(agent)
        pub = tmp_path / "device.pub"
        key = load_private_key(agent.config.device_key)
        pub.write_bytes(public_pem(key.public_key()))
    assert (anchor["receiver"], anchor["entry"], anchor["head"]) == (
        agent.config.receiver_origin,
        n,
        head,
    )
    access = receiver.data_dir / "access.log"
    report = ["audit", "report", str(agent.audit.path), "--access-log", str(access)]
    code = main([*report, "--device-key", str(pub)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert f"anchored it through entry {n} at" in err
    # Rewritten by hand from the anchored entry on: refused.
    lines = access.read_bytes().splitlines(keepends=True)
    lines[n - 1] = lines[n - 1].replace(b'"officer-1"', b'"someone"')
    access.write_bytes(b"".join(lines))
    assert main(report) == 1


async def test_a_head_that_went_back_is_anchored_too(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only heads that grew were anchored: one claim of a huge entry number hid every
    later head until the agent restarted, and a log cut short was never anchored (found
    by a review). Now every change is, at most once per ACCESS_ANCHOR_EVERY_S."""
    monkeypatch.setattr(daemon, "ACCESS_ANCHOR_EVERY_S", 0.0)
    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    async with Agent(load_config(path)) as agent:
        for n, digest in ((10**9, "a" * 64), (10**9, "a" * 64), (3, "b" * 64)):
            agent._on_access_head(n, digest)
        await asyncio.to_thread(agent.audit.flush)
        told = [(a["entry"], a["head"]) for a in anchors(agent)]
    assert told[-2:] == [(10**9, "a" * 64), (3, "b" * 64)]
    assert told.count((10**9, "a" * 64)) == 1
