"""The agent under measurement, in its own process, with one replayed camera.

``python -m tests.bench.agent_proc --config F --stream FILE --seconds T``
builds :class:`agent.daemon.Agent` with a :class:`~tests.bench.replay.ReplayCamera`
for every configured camera, waits for the uplink and a second of pre-roll,
presses the button (the uplink then streams live), waits ``--warmup`` seconds,
then measures its own CPU time (``getrusage(RUSAGE_SELF)``, user + system,
all threads) over ``T`` seconds of wall time. It prints one JSON line
(``cpu_pct`` is percent of one core), ends the session, waits until the
receiver acknowledged everything (bounded) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import sys
import time
from pathlib import Path

from agent.config import CameraConfig, load_config
from agent.daemon import Agent
from breakglass.demo import press_button
from tests.bench.replay import ReplayCamera, load_access_units

log = logging.getLogger("bench.agent_proc")


def _cpu_s() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def measure(config_path: Path, stream_path: Path, seconds: float, warmup: float) -> int:
    """Run the agent, measure, print the JSON line; returns the exit code."""
    config = load_config(config_path)
    stream = load_access_units(stream_path)
    cameras: dict[str, ReplayCamera] = {}

    def source(camera: CameraConfig) -> ReplayCamera:
        cameras[camera.id] = ReplayCamera(camera.id, stream, camera.fps)
        return cameras[camera.id]

    async with Agent(config, source_factory=source) as agent:
        async with asyncio.timeout(30):
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(round(max(c.fps for c in config.cameras)))
        press_button(agent)
        async with asyncio.timeout(10):
            await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        await asyncio.sleep(warmup)  # a measurement window, not a poll
        stats = agent.uplink.stats
        (user0, sys0), wall0 = _cpu_s(), time.monotonic()
        sent0, bytes0 = stats.packets_sent, stats.bytes_sent
        await asyncio.sleep(seconds)
        (user1, sys1), wall1 = _cpu_s(), time.monotonic()
        stream_state = agent.uplink.stream(session.id)
        backlog = 0 if stream_state is None else sum(len(q) for q in stream_state.unacked)
        wall = wall1 - wall0
        cpu = (user1 - user0) + (sys1 - sys0)
        result = {
            "cpu_pct": 100 * cpu / wall,
            "cpu_s": cpu,
            "user_s": user1 - user0,
            "sys_s": sys1 - sys0,
            "wall_s": wall,
            "streams": len(cameras),
            "packets_sent": stats.packets_sent - sent0,
            "bytes_sent": stats.bytes_sent - bytes0,
            "unacked_packets_at_end": backlog,
            "frames_skipped": sum(c.frames_skipped for c in cameras.values()),
        }
        print(json.dumps(result), flush=True)
        agent.end("benchmark finished")
        try:
            async with asyncio.timeout(30):
                await agent.uplink.wait_settled(session.id)
        except TimeoutError:
            log.error("the receiver did not acknowledge the session within 30 s")
            return 1
    return 0


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--stream", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(measure(args.config, args.stream, args.seconds, args.warmup)))
    sys.exit(130)


if __name__ == "__main__":
    main()
