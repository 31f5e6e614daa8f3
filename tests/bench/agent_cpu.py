"""Benchmark ``agent_cpu``: the agent's CPU and memory per 1080p30 4 Mbps stream, encoding excluded.

A pre-encoded stream (PyAV libx264, 1920x1080, 30 fps, CBR 4 Mbit/s, an IDR
every second, no B-frames; from the benchmark cache) is replayed in real time
by replay cameras inside an agent in its own process
(:mod:`tests.bench.agent_proc`), which reports its own CPU time over the
window (``getrusage``: every thread, the segment writer included). A
receiver runs in a third process, so the uplink is connected as deployed.

- ``agent_cpu_per_stream_pct``: the agent as it runs nearly always, idle:
  capture fan-out, a full 30 s pre-roll and sealed 4 s segments (age, two
  recipients, written tmp + fsync + rename). Peer, same run, same input,
  same window: ffmpeg segmenting the stream in real time (``-re -f h264 -i
  FILE -c copy -f segment -segment_time 4``, MPEG-TS segments).
- ``agent_cpu_floor_per_stream_pct``: the floor under the figure above, a
  skeleton of what any agent of this design must do per camera and nothing
  more (:mod:`tests.bench.agent_floor`: a camera thread waking per frame,
  0.25 s hand-offs, age-sealed 4 s segments written tmp + fsync + rename);
  peer: the same ffmpeg run. Its ratio is the lowest the first figure's
  ratio can be on this machine.
- ``agent_cpu_live_per_stream_pct``: the same during an emergency (button
  pressed), the uplink streaming live over pinned TLS too. Peer: ffmpeg
  forwarding the same stream in real time over TLS on loopback (``-re -f
  h264 -i FILE -c copy -f h264 tls://...``) into a sink that discards.
- ``agent_rss_mb_8_cameras``: resident memory of an idle agent with eight
  such streams and full 30 s pre-rolls, at the end of its window. Peer: the
  pre-roll bytes it holds (the floor: a pre-roll is kept in RAM by design).
  Target: RSS <= 80 MB + the pre-roll bytes.

ffmpeg reads FILE, the stream repeated end to end (:func:`repeat_file`); its
CPU is read from ``/proc/PID/task/*/schedstat`` (nanoseconds, every thread)
over a window of the same length after the same warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

from breakglass.demo import write_agent_config
from provisioning.tls import ensure_certificate, server_context
from tests.bench.agent_proc import write_units
from tests.bench.common import (
    Figure,
    ReceiverContact,
    child,
    figure,
    h264_stream,
    make_temp_dir,
    receiver_process,
    repeat_file,
)
from tests.bench.replay import load_access_units

BENCH = "agent_cpu"
WIDTH, HEIGHT, FPS = 1920, 1080, 30
BITRATE = 4_000_000
SEGMENT_S = 4  # the store's default, and ffmpeg's -segment_time

log = logging.getLogger("bench.agent_cpu")


def check_stream(path: Path) -> dict[str, float]:
    """Split the file as the replay camera will and report what it holds (logged)."""
    units = load_access_units(path)
    frames = len(units.units)
    facts = {
        "frames": float(frames),
        "keyframes": float(units.keyframes),
        "bitrate_mbps": units.payload_bytes * 8 / (frames / FPS) / 1e6,
        "width": float(units.width),
        "height": float(units.height),
    }
    log.info(
        "stream %s: %dx%d, %d frames, %d keyframes, %.3f Mbit/s actual",
        path.name,
        units.width,
        units.height,
        frames,
        units.keyframes,
        facts["bitrate_mbps"],
    )
    return facts


async def measure_agent(
    tmp: Path,
    stream: Path,
    seconds: float,
    warmup: float,
    *,
    rx: ReceiverContact,
    name: str,
    cameras: int = 1,
    preroll_s: float = 30,
    press: bool = False,
) -> dict[str, float]:
    """Run an agent process uplinked to ``rx``; its own measurement (its JSON line)."""
    ids = (
        (("replay", "interior"),)
        if cameras == 1
        else tuple((f"replay-{i}", "interior") for i in range(cameras))
    )
    config = write_agent_config(  # a device of its own: its own audit trail and sessions
        tmp / name, rx, device_id=f"bench-{name}", fps=FPS, preroll_s=preroll_s, cameras=ids
    )
    units = tmp / f"{stream.name}.units"
    if not units.exists():  # split here: the agent's process never loads PyAV for it
        split = await asyncio.to_thread(load_access_units, stream)
        info: dict[str, int | str] = {"width": split.width, "height": split.height}
        info["extradata"] = split.extradata.hex()
        await asyncio.to_thread(write_units, units, list(split.units), info)
    argv = [sys.executable, "-m", "tests.bench.agent_proc", "--config", str(config)]
    argv += ["--units", str(units), "--seconds", str(seconds), "--warmup", str(warmup)]
    if press:
        argv.append("--press")
    async with child(name, argv, grace_s=5) as agent:
        line = await agent.wait_line(re.compile(r"^\{.*\}$"), timeout=seconds + warmup + 60)
        result: dict[str, float] = json.loads(line.group(0))
        code = await agent.wait_exit(timeout=40)
        if code != 0:
            raise RuntimeError(f"agent process exited with {code}")
    log.info(
        "%s: %.2f %% of one core over %.1f s for %d stream(s) (user %.2f s, system %.2f s), "
        "RSS %.1f MiB (%.1f of it file-backed: libraries), pre-roll %.1f MiB (>= %.1f s per "
        "camera), %d segments sealed, "
        "%.2f Mbit/s uplink (%s)",
        name,
        result["cpu_pct"],
        result["wall_s"],
        result["streams"],
        result["user_s"],
        result["sys_s"],
        result["rss_mb"],
        result["rss_file_mb"],
        result["preroll_bytes"] / 2**20,
        result["preroll_s_min"],
        result["segments_written"],
        result["bytes_sent"] * 8 / result["wall_s"] / 1e6,
        result,
    )
    if result["segments_dropped"] or result["segment_write_errors"]:
        raise RuntimeError(f"{name}: the store dropped or failed segments: {result}")
    return result


class TlsSink:
    """A TLS server on 127.0.0.1 that accepts one connection and discards what it reads."""

    def __init__(self, folder: Path) -> None:
        ensure_certificate(
            folder / "sink.crt", folder / "sink.key", common_name="bench sink", hosts=["127.0.0.1"]
        )
        self._ctx: ssl.SSLContext = server_context(folder / "sink.crt", folder / "sink.key")
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self._listener.settimeout(0.5)
        self.port: int = self._listener.getsockname()[1]
        self.bytes_received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-sink", daemon=True)

    def __enter__(self) -> TlsSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(10)  # the handshake
            try:
                with self._ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(0.5)  # then wake up now and then to see the stop flag
                    self._drain(conn)
            except (OSError, ssl.SSLError) as exc:
                log.debug("sink connection ended: %s", exc)
            finally:
                raw.close()

    def _drain(self, conn: ssl.SSLSocket) -> None:
        while not self._stop.is_set():
            try:
                data = conn.recv(256 * 1024)
            except TimeoutError:
                continue
            if not data:
                return
            self.bytes_received += len(data)


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (``/proc/PID/task/*/schedstat``)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        raise RuntimeError(f"process {pid} ended before the measurement window did") from None
    total = 0
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def _user_sys_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of ``pid`` in clock ticks (``/proc/PID/stat``), for the log."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


async def _ffmpeg_cpu(
    tmp: Path, stream: Path, output: list[str], seconds: float, warmup: float, what: str
) -> float:
    """CPU of ffmpeg copying the stream in real time to ``output`` args, percent of one core."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is not installed")
    run_s = warmup + seconds + 1
    looped = tmp / "ffmpeg-input.h264"
    if not looped.exists():
        frames = len((await asyncio.to_thread(load_access_units, stream)).units)
        repeats = max(1, math.ceil((run_s + 2) * FPS / frames))
        await asyncio.to_thread(repeat_file, stream, looped, repeats)
        log.info("ffmpeg input: the stream %d times (%d bytes)", repeats, looped.stat().st_size)
    argv = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-re"]
    argv += ["-f", "h264", "-framerate", str(FPS), "-i", str(looped)]
    argv += ["-t", f"{run_s:.1f}", "-c", "copy", *output]
    async with child("ffmpeg", argv, grace_s=5, env=dict(os.environ)) as proc:
        await asyncio.sleep(warmup)  # measurement window, not a poll
        cpu0, wall0 = _cpu_ns(proc.pid), time.monotonic_ns()
        ticks0 = _user_sys_ticks(proc.pid)
        await asyncio.sleep(seconds)
        cpu1, wall1 = _cpu_ns(proc.pid), time.monotonic_ns()
        ticks1 = _user_sys_ticks(proc.pid)
        code = await proc.wait_exit(timeout=30)
        if code != 0:
            raise RuntimeError(f"ffmpeg exited with {code}")
    pct = 100 * (cpu1 - cpu0) / (wall1 - wall0)
    hz = os.sysconf("SC_CLK_TCK")
    log.info(
        "ffmpeg %s: %.2f %% of one core (user %.2f s, system %.2f s)",
        what,
        pct,
        (ticks1[0] - ticks0[0]) / hz,
        (ticks1[1] - ticks0[1]) / hz,
    )
    return pct


async def measure_floor(tmp: Path, seconds: float, warmup: float) -> float:
    """The skeleton of :mod:`tests.bench.agent_floor` on the units file the agent replayed."""
    units = next(tmp.glob("*.units"))  # written by measure_agent
    argv = [sys.executable, "-m", "tests.bench.agent_floor", "--units", str(units)]
    argv += ["--folder", str(tmp / "floor"), "--seconds", str(seconds), "--warmup", str(warmup)]
    async with child("floor", argv, grace_s=5) as proc:
        line = await proc.wait_line(re.compile(r"^\{.*\}$"), timeout=seconds + warmup + 60)
        result = json.loads(line.group(0))
        code = await proc.wait_exit(timeout=30)
        if code != 0:
            raise RuntimeError(f"floor process exited with {code}")
    pct = float(result["cpu_pct"])
    log.info("floor (skeleton agent): %.2f %% of one core (%s)", pct, result)
    return pct


async def measure_ffmpeg_segment(tmp: Path, stream: Path, seconds: float, warmup: float) -> float:
    """ffmpeg writing 4 s MPEG-TS segments of the stream in real time."""
    out = tmp / "ffmpeg-segments"
    out.mkdir()
    output = ["-f", "segment", "-segment_time", str(SEGMENT_S), "-segment_format", "mpegts"]
    output += ["-reset_timestamps", "1", str(out / "seg%05d.ts")]
    pct = await _ffmpeg_cpu(tmp, stream, output, seconds, warmup, "segmenting")
    files = list(out.iterdir())
    log.info("ffmpeg wrote %d segments, %d bytes", len(files), sum(f.stat().st_size for f in files))
    return pct


async def measure_ffmpeg_tls(tmp: Path, stream: Path, seconds: float, warmup: float) -> float:
    """ffmpeg forwarding the stream in real time over TLS into a discarding sink."""
    folder = tmp / "sink"
    folder.mkdir()
    with TlsSink(folder) as sink:
        output = ["-f", "h264", f"tls://127.0.0.1:{sink.port}"]
        pct = await _ffmpeg_cpu(tmp, stream, output, seconds, warmup, "over TLS")
        log.info("sink received %d bytes", sink.bytes_received)
    return pct


async def run(smoke: bool) -> list[Figure]:
    """Measure the agent (idle, live, eight cameras), its floor and ffmpeg; four figures."""
    if smoke:
        stream_s, seconds, warmup, preroll_s, rss_seconds = 2.0, 2.0, 1.0, 2.0, 1.0
    else:
        stream_s, seconds, warmup, preroll_s, rss_seconds = 10.0, 20.0, 2.0, 30.0, 10.0
    started = time.monotonic()
    stream = await asyncio.to_thread(h264_stream, stream_s, WIDTH, HEIGHT, FPS, BITRATE)
    log.info("test stream ready in %.1f s", time.monotonic() - started)
    facts = await asyncio.to_thread(check_stream, stream)
    if facts["keyframes"] < 1 or facts["frames"] < FPS:
        raise RuntimeError(f"unexpected test stream: {facts}")
    full = preroll_s + warmup  # a full pre-roll before the window: the steady state
    with make_temp_dir(BENCH) as tmp_name:
        tmp = Path(tmp_name)
        async with receiver_process(tmp / "receiver") as rx:  # idle while ffmpeg runs
            idle = await measure_agent(
                tmp, stream, seconds, full, rx=rx, name="agent", preroll_s=preroll_s
            )
            idle_peer = await measure_ffmpeg_segment(tmp, stream, seconds, warmup)
            floor = await measure_floor(tmp, seconds, warmup)
            live = await measure_agent(
                tmp, stream, seconds, warmup, rx=rx, name="agent-live", preroll_s=preroll_s,
                press=True,
            )  # fmt: skip
            live_peer = await measure_ffmpeg_tls(tmp, stream, seconds, warmup)
            eight = await measure_agent(
                tmp, stream, rss_seconds, full, rx=rx, name="agent-8", cameras=8,
                preroll_s=preroll_s,
            )  # fmt: skip
    return [
        figure(
            BENCH,
            "agent_cpu_per_stream_pct",
            idle["cpu_pct"] / max(1.0, idle["streams"]),
            "percent_of_one_core",
            "ffmpeg_copy_segment_pct",
            idle_peer,
        ),
        figure(
            BENCH,
            "agent_cpu_floor_per_stream_pct",
            floor,
            "percent_of_one_core",
            "ffmpeg_copy_segment_pct",
            idle_peer,
        ),
        figure(
            BENCH,
            "agent_cpu_live_per_stream_pct",
            live["cpu_pct"] / max(1.0, live["streams"]),
            "percent_of_one_core",
            "ffmpeg_copy_h264_over_tls_pct",
            live_peer,
        ),
        figure(
            BENCH,
            "agent_rss_mb_8_cameras",
            eight["rss_mb"],
            "MiB",
            "preroll_held_mib",
            eight["preroll_bytes"] / 2**20,
        ),
    ]
