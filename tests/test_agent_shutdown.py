"""A press while the agent stops (an update, a reboot) is not half handled.

The buttons stay armed while the agent stops its cameras and store; a press then is
audited and saved (``emergency.json``), so the session streams when the agent starts
again. The audit trail closes only once the buttons are closed and every state write
is done: a press after that point found the trail closed and was lost before the state
was saved (found by a review).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import press_button, write_agent_config
from receiver.server import Receiver

pytestmark = pytest.mark.timeout(60)


async def test_a_press_while_the_agent_stops_is_audited_and_resumed(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    at_audit_close: dict[str, Any] = {}
    async with Agent(load_config(path)) as agent:
        await agent.capture.wait_packets(10)
        store_close, audit_close = agent.store.close, agent.audit.close

        async def pressed_while_closing() -> None:
            press_button(agent)  # cameras already stopped, buttons still armed
            await store_close()

        def closing_audit() -> None:
            at_audit_close["buttons_open"] = [b for b in agent.buttons.values() if not b.closed]
            at_audit_close["state_writes"] = len(agent.state_writer.pending)
            audit_close()

        agent.store.close = pressed_while_closing  # type: ignore[method-assign]
        agent.audit.close = closing_audit  # type: ignore[method-assign]
    assert at_audit_close == {"buttons_open": [], "state_writes": 0}
    session = agent.emergency.active
    assert session is not None
    saved = json.loads(agent.state_path.read_text())
    assert saved["active"]["id"] == session.id
    events = [json.loads(line)["event"] for line in agent.audit.path.read_text().splitlines()]
    assert events.count("button_press") == 1
    assert "session_start" in events

    async with Agent(load_config(path)) as again:  # starts again: the session streams
        assert again.emergency.active is not None
        assert again.emergency.active.id == session.id
        await again.uplink.wait_until(lambda: again.uplink.stream(session.id) is not None)
        stream = again.uplink.stream(session.id)
        assert stream is not None
        await again.uplink.wait_until(lambda: min(stream.acked) >= 0)
