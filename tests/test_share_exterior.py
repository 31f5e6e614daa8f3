"""A building's optional policy: exterior cameras shared continuously, interior never."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import BUILDING, press_button, write_agent_config
from hardware.led import LedPattern
from receiver.server import Receiver

pytestmark = pytest.mark.timeout(90)


async def test_exterior_cameras_are_shared_and_interior_ones_wait_for_an_emergency(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = write_agent_config(tmp_path / "agent", receiver, fps=15, preroll_s=2)
    text = path.read_text()
    path.write_text(
        text.replace(f'id = "{BUILDING}"\n', f'id = "{BUILDING}"\nshare_exterior = true\n')
    )
    async with Agent(load_config(path)) as agent:
        await agent.wait_until(lambda: agent.share is not None)
        share = agent.share
        assert share is not None
        stream = agent.uplink.stream(share.id)
        assert stream is not None
        assert [(c.id, c.zone) for c in stream.open.cameras] == [("front-door", "exterior")]
        await agent.uplink.wait_until(lambda: stream.acked[0] >= stream.preroll_end[0] + 15)
        assert agent.led is not None and agent.led.pattern is LedPattern.ARMED  # no alarm
        assert agent.status()["share"] == share.id
        # A press: the share ends, the emergency carries every camera.
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        emergency = agent.emergency.active
        assert emergency is not None and agent.share is None
        await agent.wait_until(lambda: agent.uplink.stream(emergency.id) is not None)
        live = agent.uplink.stream(emergency.id)
        assert live is not None
        assert {c.id for c in live.open.cameras} == {"front-door", "hallway-2"}
        await agent.uplink.wait_until(lambda: min(live.acked) >= live.preroll_end[0] + 5)
        agent.end("test finished")
        # Idle again: a new share starts by itself.
        await agent.wait_until(lambda: agent.share is not None and agent.share.id != share.id)
        again = agent.share
        assert again is not None
        await agent.uplink.wait_settled(emergency.id)
        await agent.uplink.wait_settled(share.id)
    sessions = {s.session_id: s for s in receiver.store.sessions()}
    for summary in sessions.values():
        cams = {c.camera_id: c.zone for c in summary.cameras}
        if summary.meta["started_by"]["kind"] == "share":
            assert cams == {"front-door": "exterior"}, summary.session_id
        else:
            assert cams == {"front-door": "exterior", "hallway-2": "interior"}
    assert {share.id, emergency.id} <= set(sessions)
    trail = [
        json.loads(line)
        for line in (tmp_path / "agent" / "state" / "audit.log").read_text().splitlines()
    ]
    kinds = [(e["kind"], e["session"]) for e in trail if e["event"] == "disclosure"]
    assert kinds[:3] == [("share", share.id), ("button", emergency.id), ("share", again.id)]
    (ended,) = [e for e in trail if e["event"] == "session_end" and e["session"] == share.id]
    assert ended["reason"] == "an emergency started"
    (started,) = [e for e in trail if e["event"] == "session_start" and e["session"] == share.id]
    assert started["by"] == {"kind": "share", "policy": "share_exterior"}
    assert started["cameras"] == ["front-door"]
