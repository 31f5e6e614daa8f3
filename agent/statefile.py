"""Small crash-safe state files: write whole or not at all.

Write order: temporary file in the same folder, fsync, rename over the old
file, fsync the folder. After a power cut the file is either the old or the
new version, never a torn mix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MAX_STATE_BYTES = 1024 * 1024


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the names in folder ``path`` (a new file, a rename) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, doc: Any) -> None:
    """Atomically write a JSON document."""
    write_atomic(path, json.dumps(doc, sort_keys=True, indent=1).encode())


def read_json(path: Path) -> Any | None:
    """Read a JSON state file; ``None`` if it does not exist. Raises ValueError if corrupt."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_STATE_BYTES} bytes")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


class SequenceReservations:
    """Per-camera sequence numbers that never repeat across restarts.

    Numbers are handed out from blocks reserved on disk before use: after a
    crash the next run starts above every number the last run could have
    used. Numbers skipped by a restart are a declared discontinuity, never a
    reuse. (The sealed segment store will make this exact.)
    """

    BLOCK = 100_000

    def __init__(self, path: Path) -> None:
        self.path = path
        doc = read_json(path) or {}
        self._limit: dict[str, int] = {str(k): int(v) for k, v in doc.items()}
        self._next: dict[str, int] = dict(self._limit)

    def next(self, camera: str) -> int:
        """The next sequence number of ``camera``; reserves a new block when needed."""
        seq = self._next.get(camera, 0)
        if seq >= self._limit.get(camera, 0):
            self._limit[camera] = seq + self.BLOCK
            write_json(self.path, self._limit)
        self._next[camera] = seq + 1
        return seq

    def peek(self, camera: str) -> int:
        """The number the next packet of ``camera`` will get."""
        return self._next.get(camera, 0)
