"""The floor under ``agent_cpu_per_stream_pct``: the least a Python agent can spend.

``python -m tests.bench.agent_floor --units FILE --folder DIR --seconds T --warmup W``

Not the agent: a skeleton of what any agent of this design must do for one
camera, and nothing else, measured on the same machine in the same run as
the agent and ffmpeg (:mod:`tests.bench.agent_cpu`):

- a camera thread that wakes once per frame (30 fps), as every camera source
  does: picamera2 hands over each encoded frame on its own thread, an IP
  camera's packets arrive one by one, the replay camera paces like
  ``ffmpeg -re``; it copies the payload (a camera's buffer is its own);
- the frames handed to the event loop in batches of 0.25 s (the agent's idle
  hand-off, :data:`agent.daemon.IDLE_HANDOFF_S`), kept in a list;
- every 4 s a segment: sealed with age to two X25519 recipients and written
  as the store writes (temporary file, fsync, rename, fsync of the folder), on
  a worker thread.

No pre-roll ring, no sequence numbers, no chain hashes, no index, no audit
trail, no uplink, no watchdog. The issue's target (the agent at most half of
ffmpeg) is measured against this: if the skeleton alone costs more than half
of ffmpeg, the target lies below what the design can reach on this machine,
whatever the agent's own code does. Prints one JSON line (``cpu_pct``: percent
of one core, every thread, ``getrusage``) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import threading
import time
from pathlib import Path

import pyrage

from tests.bench.agent_proc import read_units

FPS = 30
HANDOFF_S = 0.25
SEGMENT_FRAMES = 4 * FPS


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _write_segment(folder: Path, name: str, plain: bytes, recipients: list[object]) -> None:
    sealed = pyrage.encrypt(plain, recipients)
    tmp = folder / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(sealed)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, folder / f"{name}.age")
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def measure(
    units_path: Path, folder: Path, seconds: float, warmup: float
) -> dict[str, float]:
    """Run the skeleton for ``warmup`` + ``seconds``; its CPU over the last ``seconds``."""
    units, _ = read_units(units_path)
    payloads = [payload for payload, _ in units]
    recipients: list[object] = [pyrage.x25519.Identity.generate().to_public() for _ in range(2)]
    loop = asyncio.get_running_loop()
    frames: list[bytes] = []
    writes: list[asyncio.Future[None]] = []
    stop = threading.Event()

    def take(batch: list[bytes]) -> None:
        frames.extend(batch)
        if len(frames) >= SEGMENT_FRAMES:
            plain = b"".join(frames)
            frames.clear()
            name = f"{len(writes):06d}"
            writes.append(
                loop.run_in_executor(None, _write_segment, folder, name, plain, recipients)
            )

    def camera() -> None:
        period = round(1e9 / FPS)
        start = last = time.monotonic_ns()
        index, held = 0, []
        while not stop.is_set():
            lag = time.monotonic_ns() - (start + index * period)
            if lag < 0:
                time.sleep(-lag / 1e9)
                continue
            held.append(memoryview(payloads[index % len(payloads)]).tobytes())
            index += 1
            now = time.monotonic_ns()
            if now - last >= HANDOFF_S * 1e9:
                loop.call_soon_threadsafe(take, held)
                held, last = [], now

    thread = threading.Thread(target=camera, name="floor-camera")
    thread.start()
    try:
        await asyncio.sleep(warmup)  # a measurement window, not a poll
        cpu0, wall0, done0 = _cpu_s(), time.monotonic(), len(writes)
        await asyncio.sleep(seconds)
        cpu1, wall1, done1 = _cpu_s(), time.monotonic(), len(writes)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    await asyncio.gather(*writes)
    return {"cpu_pct": 100 * (cpu1 - cpu0) / (wall1 - wall0), "segments": done1 - done0}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.agent_floor")
    parser.add_argument("--units", type=Path, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(measure(args.units, args.folder, args.seconds, args.warmup))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
