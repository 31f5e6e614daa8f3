"""Part files on disk: what ``session.json`` says of one, writing one, scanning one.

Blocking I/O: the run calls these through ``asyncio.to_thread`` (the writer
too: the fragments the loop made since the last fsync, then the fsync).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from receiver.fmp4 import scan_file

__all__ = ["PartInfo", "PartWriter", "open_part_file", "scan_part"]

_IOV_MAX = 1024  # buffers one writev takes at most (Linux)

_LOG = logging.getLogger(__name__)


@dataclass(slots=True)
class PartInfo:
    """One part file of a run, as recorded in ``session.json`` (``frames`` is counted)."""

    file: str
    first_seq: int
    #: Capture time (UTC µs) of the part's first sample: its pts 0.
    first_capture_us: int | None = None
    #: Samples in complete fragments made durable (found by scanning; not stored).
    frames: int = 0

    @property
    def last_seq(self) -> int:
        """The last durable seq of this part (``first_seq - 1`` if none)."""
        return self.first_seq + self.frames - 1


class PartWriter:
    """Writes a part file's bytes, whole, to its descriptor (until detached)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def detach(self) -> None:
        """Refuse further writes (the fd may be closed and its number reused)."""
        self._fd = None

    def write(self, chunks: list[bytes]) -> int:
        """Write all of ``chunks``, in order, to the file (a writev per ``IOV_MAX``)."""
        total = 0
        for at in range(0, len(chunks), _IOV_MAX):
            views = [memoryview(c) for c in chunks[at : at + _IOV_MAX] if c]
            while views:
                if self._fd is None:
                    raise OSError("part file is detached")
                n = os.writev(self._fd, views)
                total += n
                while views and n >= len(views[0]):
                    n -= len(views.pop(0))
                if views:
                    views[0] = views[0][n:]
        return total


def open_part_file(path: Path, sync_dir: bool) -> int:
    """Create (or truncate) a part file for writing; with ``sync_dir`` make its name durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    if sync_dir:  # the new name must survive a power cut, not only its data
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return fd


def cut_part(path: Path, size: int) -> None:
    """Cut a part file to its first ``size`` bytes (the last good fsync's), durably."""
    try:
        with open(path, "r+b") as f:
            if os.fstat(f.fileno()).st_size > size:
                _LOG.warning("%s: cut to %d bytes, what the last good fsync covered", path, size)
                f.truncate(size)
            os.fsync(f.fileno())
    except FileNotFoundError:
        pass


def scan_part(path: Path, repair: bool) -> tuple[int, bytes | None]:
    """Samples in complete fragments and the avcC; with ``repair`` cut a torn tail."""
    try:
        with open(path, "r+b" if repair else "rb") as f:
            result = scan_file(f)
            if repair and result.torn:
                _LOG.warning(
                    "%s: truncating torn tail %d -> %d bytes",
                    path,
                    result.file_size,
                    result.valid_end,
                )
                f.truncate(result.valid_end)
            # Whatever survived a crash in the page cache becomes durable now, before it
            # is reported as held (a welcome's acks, the index): read-only too.
            os.fsync(f.fileno())
            return result.samples, result.avcc
    except FileNotFoundError:
        return 0, None
