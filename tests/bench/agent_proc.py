"""The agent under measurement, in its own process, with replayed cameras.

``python -m tests.bench.agent_proc --config F --stream FILE --seconds T [--press]``
builds :class:`agent.daemon.Agent` (which captures every camera into its
pre-roll and its sealed :class:`~agent.store.SegmentStore`, sealed to the
recipients in the config) with a replay camera for every configured camera,
waits for the uplink, then ``--warmup`` seconds (long enough to fill the
pre-roll, for the steady state), then measures its own CPU time
(``getrusage(RUSAGE_SELF)``, user + system, all threads: the segment writer
included) over ``T`` seconds of wall time. It prints one JSON line
(``cpu_pct`` is percent of one core; ``rss_mb`` and ``preroll_bytes`` at the
end of the window) and exits.

Without ``--press`` the agent is idle, as it is nearly always: capture,
pre-roll and sealed segments. With ``--press`` the button is pressed before
the warm-up, so the uplink streams live too; then the session is ended and
the process waits until the receiver acknowledged everything (bounded).

Each replayed packet gets a payload of its own (a copy), as a real camera's
packets have: otherwise every pre-roll and every camera would share the few
hundred buffers of the looped file and the memory figure would be a fiction.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import resource
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path

from agent.config import CameraConfig, load_config
from agent.daemon import Agent
from hardware import EncodedPacket
from tests.bench.replay import ReplayCamera, load_access_units

log = logging.getLogger("bench.agent_proc")


class FreshReplayCamera(ReplayCamera):
    """A :class:`ReplayCamera` whose every packet owns its payload bytes."""

    async def packets(self) -> AsyncGenerator[EncodedPacket, None]:
        """The replayed packets, each with a fresh copy of its payload."""
        async for packet in super().packets():
            yield dataclasses.replace(packet, payload=memoryview(packet.payload).tobytes())


def press_button(agent: Agent) -> None:
    """Press and release the first configured button through gpiozero's mock pin.

    Not :func:`breakglass.demo.press_button`: importing the demo imports the
    receiver (aiohttp's server, the recorder), about 3 MiB that no agent holds.
    """
    pin = agent.pin_factory.pin(agent.config.buttons[0].pin)
    pin.drive_low()
    pin.drive_high()


def _cpu_s() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _memory_mb() -> tuple[float, float]:
    """(resident, peak resident) set size of this process in MiB (``/proc/self/status``)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values["VmRSS"], values["VmHWM"]


async def measure(
    config_path: Path, stream_path: Path, seconds: float, warmup: float, press: bool
) -> int:
    """Run the agent, measure, print the JSON line; returns the exit code."""
    config = load_config(config_path)
    stream = load_access_units(stream_path)
    cameras: dict[str, ReplayCamera] = {}

    def source(camera: CameraConfig) -> ReplayCamera:
        cameras[camera.id] = FreshReplayCamera(camera.id, stream, camera.fps)
        return cameras[camera.id]

    async with Agent(config, source_factory=source) as agent:
        async with asyncio.timeout(30):
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(round(max(c.fps for c in config.cameras)))
        session = None
        if press:
            press_button(agent)
            async with asyncio.timeout(10):
                await agent.wait_until(lambda: agent.emergency.active is not None)
            session = agent.emergency.active
            assert session is not None
        await asyncio.sleep(warmup)  # a measurement window, not a poll
        stats, store = agent.uplink.stats, agent.store.stats
        (user0, sys0), wall0 = _cpu_s(), time.monotonic()
        sent0, bytes0 = stats.packets_sent, stats.bytes_sent
        segs0, written0, media0 = store.segments_written, store.bytes_written, store.media_bytes
        await asyncio.sleep(seconds)
        (user1, sys1), wall1 = _cpu_s(), time.monotonic()
        rss, peak = _memory_mb()
        prerolls = agent.capture.prerolls.values()
        held = [p.snapshot() for p in prerolls]
        backlog = 0
        if session is not None:
            stream_state = agent.uplink.stream(session.id)
            backlog = 0 if stream_state is None else sum(len(q) for q in stream_state.ram)
        wall = wall1 - wall0
        cpu = (user1 - user0) + (sys1 - sys0)
        result = {
            "cpu_pct": 100 * cpu / wall,
            "cpu_s": cpu,
            "user_s": user1 - user0,
            "sys_s": sys1 - sys0,
            "wall_s": wall,
            "streams": len(cameras),
            "rss_mb": rss,
            "peak_rss_mb": peak,
            "preroll_bytes": sum(p.bytes for p in prerolls),
            "preroll_s_min": min(
                ((h[-1].capture_ns - h[0].capture_ns) / 1e9 if h else 0.0) for h in held
            ),
            "segments_written": store.segments_written - segs0,
            "segment_bytes_written": store.bytes_written - written0,
            "segment_media_bytes": store.media_bytes - media0,
            "segments_dropped": store.dropped,
            "segment_write_errors": store.write_errors,
            "packets_sent": stats.packets_sent - sent0,
            "bytes_sent": stats.bytes_sent - bytes0,
            "unacked_ram_packets_at_end": backlog,
            "frames_skipped": sum(c.frames_skipped for c in cameras.values()),
        }
        print(json.dumps(result), flush=True)
        if session is not None:
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
    parser.add_argument("--press", action="store_true", help="stream live (an emergency)")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(
            asyncio.run(measure(args.config, args.stream, args.seconds, args.warmup, args.press))
        )
    sys.exit(130)


if __name__ == "__main__":
    main()
