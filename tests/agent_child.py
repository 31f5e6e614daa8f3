"""A building agent in its own process, for crash tests (SIGKILL).

``python -m tests.agent_child CONFIG [--press]`` runs :class:`agent.daemon.Agent`
like ``breakglass agent run`` does, and prints one line per milestone so the
test can follow it without sleeping:

- ``armed``: running, cameras configured;
- ``session <id>``: after ``--press`` (once the uplink is connected and the
  cameras have footage), the session the virtual button opened;
- ``resumed <id>``: a session restored from disk after a restart streams again;
- ``settled <id>``: the receiver acknowledged everything of that session.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import press_button


def say(line: str) -> None:
    print(line, flush=True)


async def main(config_path: Path, press: bool) -> None:
    async with Agent(load_config(config_path)) as agent:
        say("armed")
        restored = agent.emergency.active
        if restored is not None:
            await agent.wait_until(lambda: agent.uplink.stream(restored.id) is not None)
            say(f"resumed {restored.id}")
            session_id = restored.id
        else:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(15)
            if not press:
                await asyncio.Event().wait()
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
            active = agent.emergency.active
            assert active is not None
            session_id = active.id
            say(f"session {session_id}")
        await agent.uplink.wait_settled(session_id)
        await agent.wait_until(lambda: agent.emergency.active is None)
        say(f"settled {session_id}")
        await asyncio.Event().wait()  # the test ends us


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--press", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(args.config, args.press))
