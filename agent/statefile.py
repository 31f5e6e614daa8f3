"""Small crash-safe state files: write whole or not at all.

Write order: temporary file in the same folder, fsync, rename over the old
file, fsync the folder. After a power cut the file is either the old or the
new version, never a torn mix.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

MAX_STATE_BYTES = 1024 * 1024

log = logging.getLogger(__name__)

T = TypeVar("T")


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


def set_aside(path: Path, stamp: int) -> Path:
    """Move a damaged state file to ``NAME.damaged-<stamp>`` beside it (kept for whoever
    looks into it); its new path. Raises OSError."""
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    path.replace(aside)
    return aside


def read_state(path: Path, parse: Callable[[Any], T], default: T) -> tuple[T, str | None]:
    """``parse`` of the JSON in ``path``, or ``default`` if there is no such file.

    A damaged file (unreadable, not JSON, or contents ``parse`` refuses with any error)
    is moved aside as ``NAME.damaged-<unix time>`` and ``default`` is used: a state file
    must never keep the agent, and its buttons, from arming. Returns what was wrong
    (for the caller to audit), or None.
    """
    try:
        doc = read_json(path)
        return (default if doc is None else parse(doc)), None
    except Exception as exc:  # whatever the contents: never a dead agent
        why = f"{type(exc).__name__}: {exc}"[:300]
    try:
        aside = set_aside(path, int(time.time()))
    except OSError as exc:
        log.critical("state file %s is damaged (%s) and cannot be moved aside: %s", path, why, exc)
    else:
        log.critical("state file %s is damaged (%s): moved to %s", path, why, aside.name)
    return default, why


def check_sequences(doc: Any) -> None:
    """sequences.json as :class:`SequenceReservations` writes it; ValueError otherwise."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    for camera, limit in doc.items():
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"{camera!r}: {limit!r} is not a sequence number")


def backup_path(path: Path) -> Path:
    """Where :class:`SequenceReservations` keeps its second copy of ``path``."""
    return path.with_name(f"{path.stem}.backup{path.suffix}")


class SequenceReservations:
    """Per-camera sequence numbers that never repeat across restarts.

    Numbers are handed out from blocks reserved on disk before use: after a
    crash the next run starts above every number the last run could have
    used. Numbers skipped by a restart are a declared discontinuity, never a
    reuse. Each reservation is written twice, to ``path`` and then to its
    :func:`backup_path`, each file whole: a card that damages one file still
    holds the other, so numbering never starts again below numbers the
    receiver has (the sealed store, the other floor, may have aged out).
    """

    BLOCK = 100_000

    def __init__(self, path: Path, floor: Mapping[str, int] | None = None) -> None:
        """Raises ValueError (or TypeError) for a damaged file.

        ``floor``: per camera, a number every one used before is below (the agent passes
        it when a file was damaged and moved aside: the other copy, the sealed store's
        last seq and what may have been used beyond it).
        """
        self.path = path
        self.backup = backup_path(path)
        self._limit: dict[str, int] = {}
        for copy in (path, self.backup):
            doc = read_json(copy) or {}
            if not isinstance(doc, dict):
                raise ValueError(f"{copy}: not a JSON object")
            for camera, seq in doc.items():
                self._limit[str(camera)] = max(self._limit.get(str(camera), 0), int(seq))
        for camera, seq in (floor or {}).items():
            self._limit[camera] = max(self._limit.get(camera, 0), seq)
        self._next: dict[str, int] = dict(self._limit)

    def next(self, camera: str) -> int:
        """The next sequence number of ``camera``; reserves a new block when needed."""
        seq = self._next.get(camera, 0)
        if seq >= self._limit.get(camera, 0):
            # On disk first: a failed write must not leave numbers handed out that a
            # restart would hand out again.
            reserved = {**self._limit, camera: seq + self.BLOCK}
            write_json(self.path, reserved)
            write_json(self.backup, reserved)
            self._limit[camera] = seq + self.BLOCK
        self._next[camera] = seq + 1
        return seq

    def peek(self, camera: str) -> int:
        """The number the next packet of ``camera`` will get."""
        return self._next.get(camera, 0)
