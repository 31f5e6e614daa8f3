"""A button pressed again and again during a session: every press counts, the trail stays
small (a broken contact can "press" ten times a second for days: one entry and one
state-file write per press filled the card and wore it out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import alarm
from agent.config import load_config
from agent.daemon import Agent
from breakglass.cli import main
from breakglass.demo import press_button
from hardware.button import PressEvent
from receiver.server import Receiver
from tests.clocks import ShiftedTime
from tests.test_local_api import agent_config, audit_entries

pytestmark = pytest.mark.timeout(120)


async def test_a_chattering_button_is_counted_and_audited_once_per_window(
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = agent_config(tmp_path, receiver)
    later = ShiftedTime()
    monkeypatch.setattr(alarm, "time", later)  # the windows run on the monotonic clock
    async with Agent(load_config(path), clock=later.time) as agent:
        await agent.capture.wait_packets(10)
        press_button(agent)  # the real button (gpiozero's mock pin) starts the session
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        office = agent.config.buttons[0]

        def chatter(n: int) -> None:
            for _ in range(n):  # presses 0.1 s apart, as the debouncer lets them through
                later.mono_ns += 10**8
                later.wall_ns += 10**8
                agent.on_press(PressEvent(office.id, office.location, later.monotonic_ns(),
                                          later.time_ns()))  # fmt: skip

        chatter(40)
        assert agent.alarm.presses == 41  # every press counts (the metrics)
        later.mono_ns += 61 * 10**9  # the window closes: its count is audited
        agent.alarm.expire()
        chatter(10)  # a window of its own: five one by one, five counted
        agent.end("all clear")  # the count is audited before the session's end
        assert agent.alarm.presses == 51
        await agent.uplink.wait_settled(session.id)
    trail = audit_entries(tmp_path / "agent")
    presses = [e for e in trail if e["event"] == "button_press"]
    assert [e["started"] for e in presses] == [True] + [False] * 2 * alarm.JOIN_AUDITS
    summaries = [e for e in trail if e["event"] == "button_presses"]
    assert [e["count"] for e in summaries] == [40 - alarm.JOIN_AUDITS, 10 - alarm.JOIN_AUDITS]
    for summary in summaries:
        assert (summary["button"], summary["location"]) == (office.id, office.location)
        assert summary["session"] == session.id
        assert summary["first_at"] < summary["last_at"]
    events = [e["event"] for e in trail]
    assert events.index("button_presses") < events.index("session_end")
    assert len(events) - events[::-1].index("button_presses") - 1 < events.index("session_end")
    # The district's report says it in one line per window.
    code = main(["audit", "report", str(tmp_path / "agent" / "state" / "audit.log")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"pressed:      {40 - alarm.JOIN_AUDITS} more times, until" in out
    assert out.count("pressed:") == 1 + 2 * alarm.JOIN_AUDITS + 2
