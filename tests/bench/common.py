"""Shared pieces of the benchmarks: figures, percentiles, child processes, the receiver.

Every child process is started with :func:`child` (an async context manager):
its stdout lines are collected by a reader task (never a deadlock on a full
pipe), its stderr is forwarded line by line to ours with a prefix, and on
exit it is stopped by its PID: SIGTERM, a bounded wait, then SIGKILL.

Test streams (:func:`h264_stream`) are encoded once with PyAV's libx264 into
the benchmark cache (``$BREAKGLASS_BENCH_CACHE``, else
``$XDG_CACHE_HOME/breakglass-bench``, else ``~/.cache/breakglass-bench``),
never into the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyrage

from provisioning.age_keys import recipient_of

log = logging.getLogger("bench")

#: The repository root (children run there, so ``python -m breakglass`` and ``tests`` import).
ROOT = Path(__file__).resolve().parents[2]

Figure = dict[str, object]


def figure(bench: str, name: str, value: float, unit: str, peer: str, peer_value: float) -> Figure:
    """One reported figure with its peer measured in the same run (``ratio = value / peer``)."""
    ratio = value / peer_value if peer_value > 0 else math.inf
    return {
        "bench": bench,
        "figure": name,
        "value": round(value, 4),
        "unit": unit,
        "peer": peer,
        "peer_value": round(peer_value, 4),
        "ratio": round(ratio, 4),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def child_env() -> dict[str, str]:
    """Environment for Python children: unbuffered output, the repository importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) if not path else f"{ROOT}{os.pathsep}{path}"
    return env


@dataclass(slots=True)
class Child:
    """A running child process and the stdout lines it printed so far."""

    name: str
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _eof: bool = False

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    async def wait_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first stdout line matching ``pattern``; raises if the child ends or times out."""
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if (match := pattern.search(line)) is not None:
                        return match
                seen = len(self.lines)
                if self._eof:
                    raise RuntimeError(
                        f"{self.name} (pid {self.pid}) ended without printing {pattern.pattern!r}"
                    )
                self._changed.clear()
                await self._changed.wait()

    async def wait_exit(self, timeout: float) -> int:
        """Wait for the child to exit by itself; returns its exit code."""
        async with asyncio.timeout(timeout):
            return await self.process.wait()


async def _read_stdout(proc: Child) -> None:
    stream = proc.process.stdout
    assert stream is not None
    try:
        while line := await stream.readline():
            proc.lines.append(line.decode(errors="replace").rstrip("\n"))
            proc._changed.set()
    finally:
        proc._eof = True
        proc._changed.set()


async def _forward_stderr(name: str, stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stderr.write(f"[{name}] {line.decode(errors='replace')}")


async def _stop(proc: asyncio.subprocess.Process, name: str, grace_s: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, 15)  # SIGTERM: the children shut down cleanly on it
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, proc.pid, grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, 9)
        await proc.wait()


@contextlib.asynccontextmanager
async def child(
    name: str, argv: Sequence[str], *, grace_s: float = 10.0, env: dict[str, str] | None = None
) -> AsyncIterator[Child]:
    """Run ``argv`` in ``ROOT``; on exit stop it by PID (SIGTERM, SIGKILL after ``grace_s``)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env=child_env() if env is None else env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    proc = Child(name, process)
    assert process.stderr is not None
    tasks = [
        asyncio.create_task(_read_stdout(proc), name=f"{name}-stdout"),
        asyncio.create_task(_forward_stderr(name, process.stderr), name=f"{name}-stderr"),
    ]
    log.info("started %s (pid %d)", name, process.pid)
    try:
        yield proc
    finally:
        try:
            await _stop(process, name, grace_s)
        finally:
            for task in tasks:
                # The pipes close with the child; bound the wait anyway.
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(5):
                        await task
                task.cancel()
            log.info("%s (pid %d) exited with %s", name, process.pid, process.returncode)


@dataclass(frozen=True, slots=True)
class ReceiverContact:
    """A receiver running in a child process (satisfies ``breakglass.demo.ReceiverContact``)."""

    url: str
    uplink_url: str
    fingerprint: str
    devices_dir: Path
    data_dir: Path
    pid: int
    #: The receiver's age recipient (agents seal segments to it).
    age_recipient: str


_URL_RE = re.compile(r"^receiver: (https://\S+/)\s+uplink: (wss://\S+)")
_PIN_RE = re.compile(r"^TLS pin .*: (sha256:[0-9a-f]{64})$")
_DEVICES_RE = re.compile(r"^allowed devices: ")
_AGE_RE = re.compile(r"^age recipient .*: (age1[0-9a-z]+)$")


@contextlib.asynccontextmanager
async def receiver_process(data_dir: Path) -> AsyncIterator[ReceiverContact]:
    """``breakglass receiver serve`` on 127.0.0.1, any free port, in a child process."""
    argv = [sys.executable, "-m", "breakglass", "receiver", "serve"]
    argv += ["--data", str(data_dir), "--host", "127.0.0.1", "--port", "0"]
    async with child("receiver", argv) as proc:
        url, uplink = (await proc.wait_line(_URL_RE, timeout=30)).groups()
        pin = (await proc.wait_line(_PIN_RE, timeout=5)).group(1)
        await proc.wait_line(_DEVICES_RE, timeout=5)
        try:  # printed right after that line by receivers that hold an age identity
            recipient = (await proc.wait_line(_AGE_RE, timeout=0.5)).group(1)
        except TimeoutError:
            recipient = recipient_of(pyrage.x25519.Identity.generate())
            log.warning("the receiver printed no age recipient; sealing to a generated one")
        yield ReceiverContact(url, uplink, pin, data_dir / "devices", data_dir, proc.pid, recipient)


def make_temp_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory (never in the repository), removed on exit."""
    return tempfile.TemporaryDirectory(prefix=f"breakglass-bench-{prefix}-")


# -- test streams ----------------------------------------------------------------------


def cache_dir() -> Path:
    """The benchmark cache (created on demand; outside the repository)."""
    explicit = os.environ.get("BREAKGLASS_BENCH_CACHE")
    if explicit:
        folder = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = Path(base) / "breakglass-bench"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def encode_stream(
    path: Path, seconds: float, width: int, height: int, fps: int, bitrate: int
) -> None:
    """Encode ``seconds`` of textured, moving video as CBR H.264 (Annex-B) to ``path``.

    PyAV libx264, an IDR every second carrying SPS/PPS, no B-frames: what an IP
    camera or the Pi's encoder sends.
    """
    rng = np.random.default_rng(20240611)
    # A noise texture larger than the frame, panned diagonally, and a moving box:
    # enough detail and motion that the bitrate is spent on picture, not on padding.
    luma_tex = rng.integers(16, 236, size=(height + 256, width + 256), dtype=np.uint8)
    chroma_tex = rng.integers(96, 160, size=(height // 2 + 128, width // 2 + 128), dtype=np.uint8)
    enc = av.CodecContext.create("libx264", "w")
    assert isinstance(enc, av.VideoCodecContext)
    enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
    enc.framerate, enc.time_base = Fraction(fps), Fraction(1, fps)
    enc.gop_size, enc.max_b_frames = fps, 0
    enc.bit_rate = bitrate
    enc.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "maxrate": str(bitrate),
        "bufsize": str(bitrate),
        "x264-params": f"nal-hrd=cbr:keyint={fps}:min-keyint={fps}:scenecut=0:bframes=0"
        ":repeat-headers=1",
    }
    frames = round(seconds * fps)
    n = width * height
    buf = np.empty(n * 3 // 2, dtype=np.uint8)
    y = buf[:n].reshape(height, width)
    u = buf[n : n * 5 // 4].reshape(height // 2, width // 2)
    v = buf[n * 5 // 4 :].reshape(height // 2, width // 2)
    box = min(200, height // 3, width // 3)
    top = min(400, height - box)
    with path.open("wb") as out:
        for i in range(frames + 1):
            frame: av.VideoFrame | None = None
            if i < frames:
                dx, dy = (3 * i) % 256, (2 * i) % 256
                y[:] = luma_tex[dy : dy + height, dx : dx + width]
                u[:] = chroma_tex[dy // 2 : dy // 2 + height // 2, dx // 2 : dx // 2 + width // 2]
                v[:] = chroma_tex[::-1, ::-1][
                    dy // 2 : dy // 2 + height // 2, dx // 2 : dx // 2 + width // 2
                ]
                bx = (i * 24) % (width - box)
                y[top : top + box, bx : bx + box] = 235
                frame = av.VideoFrame.from_ndarray(buf.reshape(height * 3 // 2, width), "yuv420p")
                frame.pts = i
            for packet in enc.encode(frame):
                out.write(bytes(packet))


def h264_stream(
    seconds: float, width: int = 1920, height: int = 1080, fps: int = 30, bitrate: int = 4_000_000
) -> Path:
    """A test stream from the cache, encoded (blocking, once) if it is not there yet."""
    path = cache_dir() / f"stream-v1-{width}x{height}-{fps}fps-{bitrate}bps-{seconds:g}s.h264"
    if not path.exists():
        log.info("encoding %g s of %dx%d for the benchmark cache: %s", seconds, width, height, path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            encode_stream(tmp, seconds, width, height, fps, bitrate)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def repeat_file(source: Path, out: Path, repeats: int) -> None:
    """``source`` written ``repeats`` times end to end into ``out``.

    ``-stream_loop`` cannot loop a raw H.264 input (FFmpeg 5.1 answers the seek
    to the start with EPERM and stops), so ffmpeg reads the same bytes written
    several times instead: every repeat starts with an IDR carrying SPS/PPS.
    """
    data = source.read_bytes()
    with out.open("wb") as f:
        for _ in range(repeats):
            f.write(data)


# -- measuring processes -----------------------------------------------------------------


def storage_write_bytes() -> int:
    """Bytes this process caused to be sent to storage so far (``/proc/self/io``).

    Counted when page-cache pages are dirtied (whole pages), over every thread;
    the file system's journal and metadata writes are not in it.
    """
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "write_bytes":
            return int(value)
    raise RuntimeError("/proc/self/io has no write_bytes (no task I/O accounting)")


def run_measured(argv: Sequence[str], timeout_s: float) -> tuple[int, resource.struct_rusage]:
    """Run ``argv`` to its end (blocking); its exit code and resource usage (``wait4``).

    ``ru_oublock`` is the child's ``write_bytes`` in 512-byte units, the same
    counter as :func:`storage_write_bytes`. Past ``timeout_s`` the child is
    killed by its PID and this raises.
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(  # reaped by wait4 below, for its rusage
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
        timer = threading.Timer(timeout_s, os.kill, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace").strip()
    if code < 0:
        raise RuntimeError(f"{argv[0]} killed after {timeout_s:.0f} s: {text[-2000:]}")
    if code != 0:
        raise RuntimeError(f"{argv[0]} exited with {code}: {text[-2000:]}")
    return code, usage
