"""The receiver's copy of each device's audit trail (``DATA/audit/<device>.log``).

Devices ship their hash-chained trail over the uplink (``AuditEntries``); the
receiver appends each entry that continues its copy, fsyncs, and acks. The
copy is the district's reference: a device's own file can be edited or
truncated by whoever holds the SD card, a copy off the device cannot, so
``breakglass audit verify FILE --reference COPY`` proves the device's file
whole.

Continuity is checked entry by entry (``n`` one more than the last, ``prev``
the last ``hash``, and ``hash`` the SHA-256 of the entry's canonical JSON):
entries already held are skipped, and a batch that does not continue the copy
(a device whose trail was replaced or edited) is not appended: it is stored
beside the copy as ``<device>.fork-<time>.log`` and logged loudly, and the
ack stays at the copy's last entry. The same fork sent again (a device resends
after each ack) is not stored again, and at most :data:`MAX_FORKS` are kept per
device and receiver run: a device that resent its fork at once filled the disk
with copies of it, thousands a minute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from provisioning.documents import canonical

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 16 * 1024
#: Forks stored per device and receiver run (each a different one).
MAX_FORKS = 8
DEVICE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(slots=True)
class _Head:
    n: int
    hash: str


class AuditCopies:
    """Per-device audit trail copies in one directory (blocking: call from a thread).

    One lock for all: a device that reconnects may have its old connection's append
    still running in one thread while the new one reads the head or appends in another;
    unlocked, both could append the same entries and the copy would no longer verify.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._heads: dict[str, _Head] = {}
        self._lock = threading.Lock()
        #: Per device, the forks stored this run: (entry number, SHA-256 of that line).
        self._forks: dict[str, set[tuple[int, str]]] = {}

    def path(self, device: str) -> Path:
        """The copy of ``device``'s trail."""
        if not DEVICE_RE.match(device):
            raise ValueError(f"device id {device!r} cannot name a file")
        return self.directory / f"{device}.log"

    def last_n(self, device: str) -> int:
        """The last entry held for ``device`` (0: none)."""
        with self._lock:
            return self._head(device).n

    def _head(self, device: str) -> _Head:
        head = self._heads.get(device)
        if head is None:
            head = _Head(0, "0" * 64)
            try:
                with self.path(device).open("rb") as fh:
                    for raw in fh:  # the copy only ever holds whole, checked entries
                        entry = json.loads(raw)
                        head = _Head(int(entry["n"]), str(entry["hash"]))
            except FileNotFoundError:
                pass
            self._heads[device] = head
        return head

    def append(self, device: str, first: int, lines: tuple[str, ...]) -> int:
        """Append what continues the copy; returns the last entry now held."""
        with self._lock:
            return self._append(device, first, lines)

    def _append(self, device: str, first: int, lines: tuple[str, ...]) -> int:
        head = self._head(device)
        fresh: list[bytes] = []
        n, prev = head.n, head.hash
        for offset, line in enumerate(lines):
            number = first + offset
            if number <= n:
                continue  # held already (a resend after a reconnect)
            problem = _check(line, number, n, prev)
            if problem is not None:
                self._fork(device, first, lines, number, f"entry {number}: {problem}")
                break
            entry = json.loads(line)
            n, prev = number, str(entry["hash"])
            fresh.append(line.encode("utf-8") + b"\n")
        if fresh:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path(device), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"".join(fresh))
                os.fsync(fd)
            finally:
                os.close(fd)
            head.n, head.hash = n, prev
        return head.n

    def _fork(self, device: str, first: int, lines: tuple[str, ...], number: int, why: str) -> None:
        forks = self._forks.setdefault(device, set())
        line = lines[number - first].encode("utf-8", "surrogateescape")
        key = (number, hashlib.sha256(line).hexdigest())
        if key in forks:
            return  # this fork is kept already
        if len(forks) >= MAX_FORKS:
            if len(forks) == MAX_FORKS:
                forks.add(key)  # said once
                log.error("audit trail of %s: %d forks kept; no more this run", device, MAX_FORKS)
            return
        forks.add(key)
        log.error(
            "audit trail of %s does not continue the receiver's copy (%s): kept aside", device, why
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        aside = self.directory / f"{device}.fork-{time.time_ns()}.log"
        with aside.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps({"first": first, "why": why}) + "\n")
            fh.writelines(line + "\n" for line in lines)


def _check(line: str, number: int, n: int, prev: str) -> str | None:
    if len(line) > MAX_LINE_BYTES:
        return "longer than an audit entry can be"
    try:
        entry = json.loads(line)
        digest = entry.pop("hash")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "not an audit entry"
    if number != n + 1 or entry.get("n") != number:
        return f"expected entry {n + 1}"
    if entry.get("prev") != prev:
        return "does not chain to the last entry held"
    if hashlib.sha256(canonical(entry)).hexdigest() != digest:
        return "hash does not match its content"
    return None
