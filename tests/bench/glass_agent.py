"""The agent of the ``glass`` benchmark, in its own process, streaming an emergency.

``python -m tests.bench.glass_agent --config F [--max-s T]`` runs
:class:`agent.daemon.Agent` with the cameras of its config (synthetic ones:
rendered and encoded live by libx264, each packet stamped with its UTC
capture time), waits until the uplink is connected and a second of footage
is captured, presses the button through gpiozero's mock pin and prints
``session <id>`` once the emergency is active. It then streams live until
SIGTERM (or ``--max-s`` seconds, so it never outlives a parent that died),
ends the session and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from agent.config import load_config
from agent.daemon import Agent
from tests.bench.agent_proc import press_button

log = logging.getLogger("bench.glass_agent")


async def stream(config_path: Path, max_s: float) -> int:
    """Run, press, print the session, stream until told to stop; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    config = load_config(config_path)
    async with Agent(config) as agent:
        async with asyncio.timeout(30):
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(round(max(c.fps for c in config.cameras)))
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        print(f"session {session.id}", flush=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_s):
                await stop.wait()
        if not stop.is_set():
            log.error("no SIGTERM within %.0f s; ending the session", max_s)
        agent.end("benchmark finished")
    return 0


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--max-s", type=float, default=600.0, help="stream at most this long")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    sys.exit(asyncio.run(stream(args.config, args.max_s)))


if __name__ == "__main__":
    main()
