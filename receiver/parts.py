"""Part files on disk: what ``session.json`` says of one, writing one, scanning one.

Blocking I/O: the run calls these through ``asyncio.to_thread`` (the writer
too: the fragments the loop made since the last fsync, then the fsync).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from receiver.errors import CorruptRecordingError
from receiver.fmp4 import scan_file
from receiver.summaries import parse_part_file

__all__ = [
    "PartInfo",
    "PartWriter",
    "cut_failed_part",
    "cut_part",
    "open_part_file",
    "parts_with_data",
    "remove_empty_part",
    "scan_part",
]

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


def open_part_file(path: Path, sync_dir: bool, *, rewrite: bool = False) -> int:
    """Create a part file for writing; with ``sync_dir`` make its name durable.

    A file of that name is never overwritten: it is created with ``O_EXCL``;
    one that exists already is taken only when empty (a part created, never
    listed, then abandoned: a failed or interrupted open). ``rewrite`` is the
    one exception: the planned rewrite of a part found to hold no complete
    fragment (an init segment, a torn one); the file is scanned again first.
    Raises :class:`CorruptRecordingError` (and leaves the file as it is) when
    it holds more.
    """
    flags = os.O_WRONLY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        fd = os.open(path, (os.O_RDWR if rewrite else os.O_WRONLY) | os.O_CLOEXEC)
        try:
            _take_existing(path, fd, rewrite)
        except BaseException:
            os.close(fd)
            raise
    if sync_dir:  # the new name must survive a power cut, not only its data
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return fd


def _take_existing(path: Path, fd: int, rewrite: bool) -> None:
    """Empty an existing part file about to be (re)written, if it holds no footage."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    if rewrite:
        with open(path, "rb") as f:
            samples = scan_file(f).samples
        if samples == 0:
            os.ftruncate(fd, 0)
            return
        what = f"{samples} samples in complete fragments"
    else:
        what = f"{size} bytes"
    _LOG.error("%s: exists and holds %s: never overwritten", path, what)
    raise CorruptRecordingError(
        f"{path.parent.name}/{path.name} exists and holds {what}; it is not overwritten "
        "(is session.json current?)"
    )


def cut_failed_part(fd: int, size: int, path: Path) -> None:
    """Cut a part whose write or fsync just failed to ``size`` bytes (what the last
    good fsync covered), through its still open descriptor, and make the new size
    durable. What came after may read back from the page cache but never reach the
    disk: cut now, a restart before the part is repaired finds only durable frames.
    """
    try:
        if os.fstat(fd).st_size > size:
            _LOG.warning("%s: writing failed: cut to %d bytes, what the last good fsync "
                         "covered", path, size)  # fmt: skip
            os.ftruncate(fd, size)
        os.fsync(fd)  # the size only: the bytes before it were fsynced already
    except OSError as exc:  # the repair at the re-open cuts it again
        _LOG.error("%s: cutting to %d bytes after a failed write failed: %s", path, size, exc)


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


def parts_with_data(directory: Path) -> list[str]:
    """Names of the part files in a session folder that are not empty, sorted."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[str] = []
    for entry in entries:
        if parse_part_file(entry.name) is None:
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_size > 0:
                found.append(entry.name)
        except FileNotFoundError:
            continue
    return sorted(found)


def remove_empty_part(path: Path) -> bool:
    """Delete a part file listed nowhere any more, unless it holds a complete fragment
    (then it is kept and logged: footage is never deleted); whether it was deleted."""
    try:
        with open(path, "rb") as f:
            samples = scan_file(f).samples
        if samples:
            _LOG.error("%s: not deleted: it holds %d samples in complete fragments", path, samples)
            return False
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # left behind: an empty file that nothing lists harms nobody
        _LOG.warning("%s: not deleted: %s", path, exc)
        return False
    return True


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
