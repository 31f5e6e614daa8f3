"""The agent's audit trail: an append-only, hash-chained log.

Every entry is one JSON line: ``n`` (its number), ``t`` (UTC seconds),
``event`` (a stable code such as ``segment_torn``, ``camera_fault``), the
event's fields, ``prev`` (the hash of the previous entry) and ``hash``
(SHA-256 over the canonical JSON of everything else). Deleting, reordering
or editing an entry breaks the chain, which :func:`verify_chain` detects;
the district reads the file and checks it. Entries are fsynced one by one:
they are rare, and an audit entry that a power cut can lose is worth little.

:class:`AuditChain` is the sans-IO core (entries in, lines out);
:class:`AuditLog` is the file shell, safe to call from any thread.
Footage and secrets never go into the trail: fields are small facts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

GENESIS: Final = "0" * 64
MAX_LINE_BYTES: Final = 16 * 1024


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class AuditChain:
    """Numbers and chains entries; knows nothing of files or clocks."""

    def __init__(self, last_n: int = 0, last_hash: str = GENESIS) -> None:
        self.n = last_n
        self.head = last_hash

    def entry(self, t: float, event: str, fields: dict[str, Any]) -> bytes:
        """The next entry as one line (with its newline), and advance the chain."""
        body = {**fields, "n": self.n + 1, "t": round(t, 3), "event": event, "prev": self.head}
        digest = hashlib.sha256(_canonical(body)).hexdigest()
        line = _canonical({**body, "hash": digest}) + b"\n"
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"audit entry {event!r} is larger than {MAX_LINE_BYTES} bytes")
        self.n, self.head = body["n"], digest
        return line


def verify_chain(lines: Iterable[bytes]) -> tuple[int, str]:
    """Check a whole trail; returns (entries, head hash). Raises ValueError at the first break."""
    chain = AuditChain()
    for number, raw in enumerate(lines, 1):
        try:
            obj = json.loads(raw)
            digest = obj.pop("hash")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"audit line {number}: not an audit entry") from exc
        if obj.get("prev") != chain.head or obj.get("n") != chain.n + 1:
            raise ValueError(f"audit line {number}: chain broken (entry removed or reordered)")
        if hashlib.sha256(_canonical(obj)).hexdigest() != digest:
            raise ValueError(f"audit line {number}: entry altered")
        chain.n, chain.head = obj["n"], digest
    return chain.n, chain.head


class AuditLog:
    """The audit trail file. ``record`` appends and fsyncs; callable from any thread."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._torn = False  # the file ends in a fragment: start the next entry on a new line
        path.parent.mkdir(parents=True, exist_ok=True)
        self._chain = AuditChain(*self._resume())
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._background: ThreadPoolExecutor | None = None

    def _resume(self) -> tuple[int, str]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0, GENESIS
        lines = data.splitlines()
        if data and not data.endswith(b"\n"):
            # A torn last line (power cut mid-append): keep the file, continue the chain
            # from the last whole entry on a line of its own; verify_chain will point at
            # the torn line.
            lines = lines[:-1]
            self._torn = True
            log.error("audit trail %s ends in a torn entry", self.path)
        for raw in reversed(lines):
            try:
                obj = json.loads(raw)
                return int(obj["n"]), str(obj["hash"])
            except (ValueError, KeyError, TypeError):
                continue
        return 0, GENESIS

    def record(self, event: str, **fields: Any) -> None:
        """Append one entry durably. Never raises into the caller: a full disk is logged."""
        with self._lock:
            n, head, landed = self._chain.n, self._chain.head, False
            try:
                line = self._chain.entry(self.clock(), event, fields)
                data = b"\n" + line if self._torn else line
                written = os.write(self._fd, data)
                if written != len(data):  # a full disk: a fragment may be left behind
                    if written:
                        self._torn = not data[:written].endswith(b"\n")
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
                self._torn, landed = False, True
                os.fsync(self._fd)
            except (OSError, ValueError) as exc:
                if not landed:  # the entry is not in the file: the next one takes its place
                    self._chain.n, self._chain.head = n, head
                log.error("audit entry %s not written: %s", event, exc)
        log.info("audit: %s %s", event, fields)

    def record_soon(self, event: str, **fields: Any) -> None:
        """Append one entry from the event loop: the fsync runs on the trail's own thread,
        in call order, so the loop never waits for the disk."""
        if self._background is None:
            self._background = ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._background.submit(self.record, event, **fields)

    def close(self) -> None:
        """Write what is queued, then close the file (blocks for queued fsyncs)."""
        if self._background is not None:
            self._background.shutdown(wait=True)
            self._background = None
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
