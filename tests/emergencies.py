"""An emergency started the way a principal starts one, for tests of a real agent."""

from __future__ import annotations

from agent.daemon import Agent
from agent.emergency import Session
from breakglass.demo import press_button

__all__ = ["pressed"]


async def pressed(agent: Agent, footage: int = 30) -> Session:
    """Once the uplink is up and ``footage`` packets were captured (30: a second of the
    demo's camera): press the button; the session it started."""
    await agent.uplink.wait_until(lambda: agent.uplink.connected)
    await agent.capture.wait_packets(footage)
    press_button(agent)
    await agent.wait_until(lambda: agent.emergency.active is not None)
    session = agent.emergency.active
    assert session is not None
    return session
