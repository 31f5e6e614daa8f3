"""Benchmark ``agent_cpu``: the agent's CPU per 1080p30 4 Mbps stream, encoding excluded.

A pre-encoded stream (PyAV libx264, 1920x1080, 30 fps, CBR 4 Mbit/s, an IDR
every second, no B-frames) is replayed in real time by
:class:`~tests.bench.replay.ReplayCamera` inside an agent in its own process
(:mod:`tests.bench.agent_proc`); the button is pressed so that capture
fan-out, pre-roll and the uplink (pinned TLS WebSocket to a receiver in a
third process) all run, and the agent reports its own CPU time over the
window.

Peer, same run: ffmpeg forwarding the same file in real time over TLS on
loopback (``-re -f h264 -i FILE -c copy -f h264 tls://...``; FILE is the
stream repeated, see :func:`looped_input`) into a sink that discards; its
CPU is read from ``/proc/PID/task/*/schedstat`` (nanoseconds, every thread)
over the same window.
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
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from breakglass.demo import write_agent_config
from provisioning.tls import ensure_certificate, server_context
from tests.bench.common import Figure, child, figure, make_temp_dir, receiver_process
from tests.bench.replay import load_access_units

BENCH = "agent_cpu"
WIDTH, HEIGHT, FPS = 1920, 1080, 30
BITRATE = 4_000_000

log = logging.getLogger("bench.agent_cpu")


def encode_stream(path: Path, seconds: float) -> None:
    """Encode ``seconds`` of textured, moving 1080p30 video as CBR H.264 (Annex-B) to ``path``."""
    rng = np.random.default_rng(20240611)
    # A noise texture larger than the frame, panned diagonally, and a moving box:
    # enough detail and motion that 4 Mbit/s is spent on picture, not on padding.
    luma_tex = rng.integers(16, 236, size=(HEIGHT + 256, WIDTH + 256), dtype=np.uint8)
    chroma_tex = rng.integers(96, 160, size=(HEIGHT // 2 + 128, WIDTH // 2 + 128), dtype=np.uint8)
    enc = av.CodecContext.create("libx264", "w")
    assert isinstance(enc, av.VideoCodecContext)
    enc.width, enc.height, enc.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    enc.framerate, enc.time_base = Fraction(FPS), Fraction(1, FPS)
    enc.gop_size, enc.max_b_frames = FPS, 0
    enc.bit_rate = BITRATE
    enc.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "maxrate": str(BITRATE),
        "bufsize": str(BITRATE),
        "x264-params": f"nal-hrd=cbr:keyint={FPS}:min-keyint={FPS}:scenecut=0:bframes=0"
        ":repeat-headers=1",
    }
    frames = round(seconds * FPS)
    n = WIDTH * HEIGHT
    buf = np.empty(n * 3 // 2, dtype=np.uint8)
    y = buf[:n].reshape(HEIGHT, WIDTH)
    u = buf[n : n * 5 // 4].reshape(HEIGHT // 2, WIDTH // 2)
    v = buf[n * 5 // 4 :].reshape(HEIGHT // 2, WIDTH // 2)
    box = 200
    with path.open("wb") as out:
        for i in range(frames + 1):
            frame: av.VideoFrame | None = None
            if i < frames:
                dx, dy = (3 * i) % 256, (2 * i) % 256
                y[:] = luma_tex[dy : dy + HEIGHT, dx : dx + WIDTH]
                u[:] = chroma_tex[dy // 2 : dy // 2 + HEIGHT // 2, dx // 2 : dx // 2 + WIDTH // 2]
                v[:] = chroma_tex[::-1, ::-1][
                    dy // 2 : dy // 2 + HEIGHT // 2, dx // 2 : dx // 2 + WIDTH // 2
                ]
                bx = (i * 24) % (WIDTH - box)
                y[400 : 400 + box, bx : bx + box] = 235
                frame = av.VideoFrame.from_ndarray(buf.reshape(HEIGHT * 3 // 2, WIDTH), "yuv420p")
                frame.pts = i
            for packet in enc.encode(frame):
                out.write(bytes(packet))


def check_stream(path: Path, seconds: float) -> dict[str, float]:
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
        "stream %s: %dx%d, %d frames (%.1f s asked), %d keyframes, %.3f Mbit/s actual",
        path.name,
        units.width,
        units.height,
        frames,
        seconds,
        units.keyframes,
        facts["bitrate_mbps"],
    )
    return facts


async def measure_agent(tmp: Path, stream: Path, seconds: float, warmup: float) -> dict[str, float]:
    """Run receiver and agent processes; the agent's own measurement (its JSON line)."""
    async with receiver_process(tmp / "receiver") as rx:
        config = write_agent_config(tmp / "agent", rx, fps=FPS, cameras=(("replay", "interior"),))
        argv = [sys.executable, "-m", "tests.bench.agent_proc", "--config", str(config)]
        argv += ["--stream", str(stream), "--seconds", str(seconds), "--warmup", str(warmup)]
        async with child("agent", argv, grace_s=5) as agent:
            line = await agent.wait_line(re.compile(r"^\{.*\}$"), timeout=seconds + warmup + 60)
            result: dict[str, float] = json.loads(line.group(0))
            code = await agent.wait_exit(timeout=40)
            if code != 0:
                raise RuntimeError(f"agent process exited with {code}")
    log.info(
        "agent: %.2f %% of one core over %.1f s (user %.2f s, system %.2f s), %.2f Mbit/s (%s)",
        result["cpu_pct"],
        result["wall_s"],
        result["user_s"],
        result["sys_s"],
        result["bytes_sent"] * 8 / result["wall_s"] / 1e6,
        result,
    )
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


def looped_input(stream: Path, out: Path, seconds: float) -> int:
    """``stream`` repeated end to end in ``out`` to last ``seconds``; returns the repeats.

    ``-stream_loop`` cannot loop a raw H.264 input (FFmpeg 5.1 answers the seek
    to the start with EPERM and stops), so ffmpeg reads the same bytes written
    several times instead: every repeat starts with an IDR carrying SPS/PPS.
    """
    frames = len(load_access_units(stream).units)
    repeats = max(1, math.ceil(seconds * FPS / frames))
    data = stream.read_bytes()
    with out.open("wb") as f:
        for _ in range(repeats):
            f.write(data)
    return repeats


async def measure_ffmpeg(tmp: Path, stream: Path, seconds: float, warmup: float) -> float:
    """CPU of ffmpeg copying the stream in real time over TLS, percent of one core."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is not installed")
    folder = tmp / "sink"
    folder.mkdir()
    run_s = warmup + seconds + 1
    looped = tmp / "ffmpeg-input.h264"
    repeats = await asyncio.to_thread(looped_input, stream, looped, run_s + 2)
    log.info("ffmpeg input: the stream %d times (%d bytes)", repeats, looped.stat().st_size)
    with TlsSink(folder) as sink:
        argv = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-re"]
        argv += ["-f", "h264", "-framerate", str(FPS), "-i", str(looped)]
        argv += ["-t", f"{run_s:.1f}", "-c", "copy", "-f", "h264"]
        argv += [f"tls://127.0.0.1:{sink.port}"]
        async with child("ffmpeg", argv, grace_s=5, env=dict(os.environ)) as proc:
            await asyncio.sleep(warmup)  # measurement window, not a poll
            cpu0, wall0 = _cpu_ns(proc.pid), time.monotonic_ns()
            ticks0 = _user_sys_ticks(proc.pid)
            received0 = sink.bytes_received
            await asyncio.sleep(seconds)
            cpu1, wall1 = _cpu_ns(proc.pid), time.monotonic_ns()
            ticks1 = _user_sys_ticks(proc.pid)
            received1 = sink.bytes_received
            code = await proc.wait_exit(timeout=30)
            if code != 0:
                raise RuntimeError(f"ffmpeg exited with {code}")
    pct = 100 * (cpu1 - cpu0) / (wall1 - wall0)
    mbps = (received1 - received0) * 8 / ((wall1 - wall0) / 1e9) / 1e6
    hz = os.sysconf("SC_CLK_TCK")
    log.info(
        "ffmpeg: %.2f %% of one core (user %.2f s, system %.2f s), %.2f Mbit/s into the sink",
        pct,
        (ticks1[0] - ticks0[0]) / hz,
        (ticks1[1] - ticks0[1]) / hz,
        mbps,
    )
    return pct


async def run(smoke: bool) -> list[Figure]:
    """Measure the agent and ffmpeg; one figure."""
    stream_s, seconds, warmup = (2.0, 3.0, 1.0) if smoke else (10.0, 20.0, 2.0)
    with make_temp_dir(BENCH) as tmp_name:
        tmp = Path(tmp_name)
        stream = tmp / "stream.h264"
        started = time.monotonic()
        await asyncio.to_thread(encode_stream, stream, stream_s)
        log.info("encoded %.0f s of 1080p in %.1f s", stream_s, time.monotonic() - started)
        facts = await asyncio.to_thread(check_stream, stream, stream_s)
        if facts["keyframes"] < 1 or facts["frames"] < FPS:
            raise RuntimeError(f"unexpected test stream: {facts}")
        ours = await measure_agent(tmp, stream, seconds, warmup)
        peer = await measure_ffmpeg(tmp, stream, seconds, warmup)
    per_stream = float(ours["cpu_pct"]) / max(1.0, float(ours["streams"]))
    return [
        figure(
            BENCH,
            "agent_cpu_per_stream_pct",
            per_stream,
            "percent_of_one_core",
            "ffmpeg_copy_h264_over_tls_pct",
            peer,
        )
    ]
