"""The agent under measurement, in its own process, with replayed cameras.

``python -m tests.bench.agent_proc --config F --units FILE --seconds T [--press]``
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

The stream comes already split into access units (``--units``, written by the
parent with :func:`write_units`, which runs FFmpeg's parser through PyAV):
this process never imports PyAV. Splitting the file is the harness's work,
not the agent's, and PyAV is about 17 MiB resident that an agent with Pi
cameras never maps; the replay runs on a worker thread per camera, as every deployed camera
source does (:class:`FreshReplayCamera`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import struct
import sys
import threading
import time
from pathlib import Path

from agent.config import CameraConfig, load_config
from agent.daemon import Agent
from hardware import EncodedPacket, StreamInfo
from hardware._bridge import ThreadedSource

log = logging.getLogger("bench.agent_proc")

#: ``--units`` file: this header (JSON length), the JSON, then per unit a record header
#: (keyframe, length) and the access unit.
_UNITS_HEAD = struct.Struct("<I")
_UNIT = struct.Struct("<?I")


def write_units(path: Path, units: list[tuple[bytes, bool]], info: dict[str, int | str]) -> None:
    """Write access units and ``info`` (width, height, extradata hex) for :func:`read_units`."""
    head = json.dumps(info).encode()
    parts = [_UNITS_HEAD.pack(len(head)), head]
    for unit, key in units:
        parts += [_UNIT.pack(key, len(unit)), unit]
    path.write_bytes(b"".join(parts))


def read_units(path: Path) -> tuple[tuple[tuple[bytes, bool], ...], dict[str, int | str]]:
    """The access units and info written by :func:`write_units`."""
    data = path.read_bytes()
    (n,) = _UNITS_HEAD.unpack_from(data)
    pos = _UNITS_HEAD.size + n
    info = json.loads(data[_UNITS_HEAD.size : pos])
    units = []
    while pos < len(data):
        key, size = _UNIT.unpack_from(data, pos)
        pos += _UNIT.size
        units.append((data[pos : pos + size], key))
        pos += size
    return tuple(units), info


class FreshReplayCamera(ThreadedSource):
    """A :class:`hardware.CameraSource` replaying access units in real time, looping, each
    packet with a fresh copy of its payload.

    It runs as every deployed camera source does (:class:`hardware._bridge.ThreadedSource`,
    like the RTSP, file and Pi cameras): a worker thread that waits until each frame is
    due and hands it over to the loop; a thread more than a second late skips to a
    keyframe due now.
    """

    _kind = "replay"

    def __init__(
        self, camera_id: str, units: tuple[tuple[bytes, bool], ...], info: StreamInfo
    ) -> None:
        super().__init__(camera_id, max_buffered_s=2.0)
        self._units = units
        self._initial_info = info
        self.frames_skipped = 0  # frames a thread more than a second late skipped

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        units, count, info = self._units, len(self._units), self._initial_info
        period_ns = round(1e9 / info.fps)
        start, index, mono = time.monotonic_ns(), 0, time.monotonic_ns
        first: StreamInfo | None = info
        while True:
            lag = mono() - (start + index * period_ns)
            if self._stop.is_set():
                return
            if lag < 0:
                # One nanosleep per frame, as ffmpeg -re paces (the peer); a frame
                # period is short enough to see a stop in time.
                time.sleep(-lag / 1e9)
                continue
            if lag > 1_000_000_000:  # a stalled thread: skip to a keyframe due now
                skipped = lag // period_ns
                while not units[(index + skipped) % count][1]:
                    skipped += 1
                self.frames_skipped += skipped
                index += skipped
                start = mono() - index * period_ns
            payload, keyframe = units[index % count]
            packet = EncodedPacket(
                self._id,
                -1,
                time.time_ns(),
                mono(),
                keyframe,
                "h264",
                memoryview(payload).tobytes(),
            )
            self._emit(loop, packet, first)
            first = None
            index += 1


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


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    hz = os.sysconf("SC_CLK_TCK")
    found: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            name = names.get(int(task.name), f"native-{task.name}")
            found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / hz
    return found


def _memory_mb() -> tuple[float, float, float]:
    """(resident, peak resident, resident file pages) of this process in MiB
    (``/proc/self/status``; file pages: shared libraries' code, which the kernel may
    share and drop)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssFile"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values["VmRSS"], values["VmHWM"], values["RssFile"]


async def measure(
    config_path: Path, units_path: Path, seconds: float, warmup: float, press: bool
) -> int:
    """Run the agent, measure, print the JSON line; returns the exit code."""
    config = load_config(config_path)
    units, info = read_units(units_path)
    cameras: dict[str, FreshReplayCamera] = {}

    def source(camera: CameraConfig) -> FreshReplayCamera:
        desc = StreamInfo(
            "h264",
            int(info["width"]),
            int(info["height"]),
            camera.fps,
            bytes.fromhex(str(info["extradata"])),
        )
        cameras[camera.id] = FreshReplayCamera(camera.id, units, desc)
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
        (user0, sys0), wall0, threads0 = _cpu_s(), time.monotonic(), _thread_cpu_s()
        sent0, bytes0 = stats.packets_sent, stats.bytes_sent
        segs0, written0, media0 = store.segments_written, store.bytes_written, store.media_bytes
        await asyncio.sleep(seconds)
        (user1, sys1), wall1, threads1 = _cpu_s(), time.monotonic(), _thread_cpu_s()
        rss, peak, rss_file = _memory_mb()
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
            "rss_file_mb": rss_file,
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
            # Where the CPU went (clock ticks: coarse), the busiest threads first.
            "thread_cpu_pct": {
                name: round(100 * (cpu1 - threads0.get(name, 0.0)) / wall, 2)
                for name, cpu1 in sorted(threads1.items(), key=lambda kv: -kv[1])
                if cpu1 > threads0.get(name, 0.0)
            },
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
    parser.add_argument("--units", type=Path, required=True, help="from write_units")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--press", action="store_true", help="stream live (an emergency)")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(
            asyncio.run(measure(args.config, args.units, args.seconds, args.warmup, args.press))
        )
    sys.exit(130)


if __name__ == "__main__":
    main()
