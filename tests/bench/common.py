"""Shared pieces of the benchmarks: figures, percentiles, child processes, the receiver.

Every child process is started with :func:`child` (an async context manager):
its stdout lines are collected by a reader task (never a deadlock on a full
pipe), its stderr is forwarded line by line to ours with a prefix, and on
exit it is stopped by its PID: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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


_URL_RE = re.compile(r"^receiver: (https://\S+/)\s+uplink: (wss://\S+)")
_PIN_RE = re.compile(r"^TLS pin .*: (sha256:[0-9a-f]{64})$")


@contextlib.asynccontextmanager
async def receiver_process(data_dir: Path) -> AsyncIterator[ReceiverContact]:
    """``breakglass receiver serve`` on 127.0.0.1, any free port, in a child process."""
    argv = [sys.executable, "-m", "breakglass", "receiver", "serve"]
    argv += ["--data", str(data_dir), "--host", "127.0.0.1", "--port", "0"]
    async with child("receiver", argv) as proc:
        url, uplink = (await proc.wait_line(_URL_RE, timeout=30)).groups()
        pin = (await proc.wait_line(_PIN_RE, timeout=5)).group(1)
        yield ReceiverContact(url, uplink, pin, data_dir / "devices", data_dir, proc.pid)


def make_temp_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory (never in the repository), removed on exit."""
    return tempfile.TemporaryDirectory(prefix=f"breakglass-bench-{prefix}-")
