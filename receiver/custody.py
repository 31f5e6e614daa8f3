"""The receiver's record of the devices' signed footage hash chain (chain of custody).

Per session, next to its recording::

    <session>/chain/<camera>.jsonl   one checkpoint per line (agent.chain), as received
    <session>/chain/keys.json        the device keys that signed them: kid -> device,
                                     raw key (base64url), enrollment certificate (or null)

A line is the checkpoint with its entries (:func:`agent.chain.record_json`)
plus ``source`` (``uplink``: a ``chain`` message; ``segment``: the checkpoint a
sealed segment carried, its entries computed here from the segment's
packets), ``result`` (``ok``, or why it was refused: ``bad_signature``,
``unknown_key``, ``bad_chain``, ``wrong_device``; a refused checkpoint is kept,
marked, as part of the record) and ``received_at`` (UTC seconds).

:meth:`CustodyLog.write` appends whole lines and fsyncs before it returns
(``keys.json`` is replaced atomically first when a new key appears), so the
receiver acknowledges a checkpoint (``chain_ack``) only once it is durable,
and records a sealed segment's footage only after its checkpoint. A line a
crash cut short is skipped when read. The same checkpoint received twice (a
resend after a reconnect) is written once. Blocking I/O: call from a thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import chain
from agent import protocol as p
from agent.statefile import fsync_dir
from provisioning.keys import kid as key_id
from provisioning.keys import raw_public

__all__ = [
    "CustodyLog",
    "CustodyRecord",
    "DeviceKey",
    "parse_record",
    "read_keys",
    "read_records",
    "record_line",
]

log = logging.getLogger(__name__)

CHAIN_DIR = "chain"
KEYS_FILE = "keys.json"


@dataclass(frozen=True, slots=True)
class CustodyRecord:
    """One checkpoint as the receiver got it, and what it made of it."""

    checkpoint: chain.Checkpoint
    source: str
    result: str
    received_at: float

    @property
    def ok(self) -> bool:
        """Whether the checkpoint verified when it arrived."""
        return self.result == "ok"


@dataclass(frozen=True, slots=True)
class DeviceKey:
    """A device key that signs checkpoints, and the certificate that vouched for it."""

    device: str
    key: Ed25519PublicKey
    certificate: Mapping[str, Any] | None = None

    @property
    def kid(self) -> str:
        """The key's id."""
        return key_id(self.key)

    def to_json(self) -> dict[str, Any]:
        """As stored in ``keys.json``."""
        cert = None if self.certificate is None else dict(self.certificate)
        return {"device": self.device, "key": p.b64url(raw_public(self.key)), "certificate": cert}


def record_line(record: CustodyRecord) -> bytes:
    """One record as a line of canonical JSON (with its newline)."""
    body = {
        **chain.record_json(record.checkpoint),
        "source": record.source,
        "result": record.result,
        "received_at": record.received_at,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def parse_record(line: bytes) -> CustodyRecord:
    """The record on one line; ValueError if it is not one."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    cp = chain.from_record(obj)
    source, result, at = obj.get("source"), obj.get("result"), obj.get("received_at")
    if source not in ("uplink", "segment") or not isinstance(result, str):
        raise ValueError("source or result missing")
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise ValueError("received_at missing")
    return CustodyRecord(cp, source, result, float(at))


def read_records(path: Path) -> list[CustodyRecord]:
    """The records of one camera's file, skipping lines that are not records (logged)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out: list[CustodyRecord] = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line:
            continue
        try:
            out.append(parse_record(line))
        except ValueError as exc:
            log.warning("%s:%d: not a checkpoint record (%s); skipped", path, number, exc)
    return out


def read_keys(session_dir: Path) -> dict[str, DeviceKey]:
    """The device keys a session's checkpoints were checked with, by kid."""
    try:
        doc = json.loads((session_dir / CHAIN_DIR / KEYS_FILE).read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        log.error("%s: unreadable: %s", session_dir / CHAIN_DIR / KEYS_FILE, exc)
        return {}
    keys: dict[str, DeviceKey] = {}
    for kid, entry in doc.items() if isinstance(doc, dict) else ():
        try:
            key = Ed25519PublicKey.from_public_bytes(p.unb64url(entry["key"], what="key"))
            keys[kid] = DeviceKey(str(entry["device"]), key, entry.get("certificate"))
        except (KeyError, TypeError, ValueError, p.ProtocolError) as exc:
            log.error("%s: key %s unreadable: %s", session_dir, kid, exc)
    return keys


class CustodyLog:
    """One session's checkpoint files. Thread-safe; every method blocks on the disk."""

    def __init__(self, session_dir: Path) -> None:
        self.directory = session_dir / CHAIN_DIR
        self._lock = threading.Lock()
        self._seen: dict[str, set[tuple[int, int, bytes, str]]] = {}
        self._keys: dict[str, DeviceKey] | None = None
        #: Cameras whose file this log created and whose name no folder fsync covers yet.
        self._unnamed: set[str] = set()

    def path(self, camera: str) -> Path:
        """The file of one camera's checkpoints."""
        return self.directory / f"{camera}.jsonl"

    def write(self, records: Iterable[CustodyRecord], key: DeviceKey | None = None) -> int:
        """Append the records not held yet and make them durable; how many were new.

        ``key`` (the device key they were checked with) is listed in ``keys.json``
        first if it is new there. A record counts as held (a resend is skipped)
        only once the fsync covering it succeeded: when writing or an fsync fails
        (a full disk, EIO) the error is raised, the file is cut back to where it
        was, and the resend is written again. A line left without its newline (a
        crash or a short write) is cut before anything is appended after it.
        """
        with self._lock:
            self._ensure_dir()
            if key is not None:
                self._note_key(key)
            fresh: dict[str, dict[tuple[int, int, bytes, str], bytes]] = {}
            for record in records:
                cp = record.checkpoint
                ident = (cp.first, cp.last, cp.head, record.result)
                if ident not in self._held(cp.camera):
                    fresh.setdefault(cp.camera, {}).setdefault(ident, record_line(record))
            for camera, lines in fresh.items():
                path = self.path(camera)
                if not path.exists():
                    self._unnamed.add(camera)
                _append_durably(path, b"".join(lines.values()))
                if camera in self._unnamed:
                    fsync_dir(self.directory)  # a new file's name is durable too
                    self._unnamed.discard(camera)
                # Only now: a record whose write or fsync failed must be written again.
                self._held(camera).update(lines)
            return sum(len(lines) for lines in fresh.values())

    def forget(self) -> None:
        """Drop what is cached of the files (a closed session's checkpoint ids: about
        1 MB per camera-hour); read again from disk if the session is written to again."""
        with self._lock:
            self._seen.clear()
            self._keys = None

    def _ensure_dir(self) -> None:
        if not self.directory.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.directory.parent)

    def _held(self, camera: str) -> set[tuple[int, int, bytes, str]]:
        seen = self._seen.get(camera)
        if seen is None:
            seen = {
                (r.checkpoint.first, r.checkpoint.last, r.checkpoint.head, r.result)
                for r in read_records(self.path(camera))
            }
            self._seen[camera] = seen
        return seen

    def _note_key(self, key: DeviceKey) -> None:
        if self._keys is None:
            self._keys = read_keys(self.directory.parent)
        known = self._keys.get(key.kid)
        if known is not None and (known.certificate is not None or key.certificate is None):
            return
        keys = {**self._keys, key.kid: key}
        doc = {kid: k.to_json() for kid, k in sorted(keys.items())}
        tmp = self.directory / (KEYS_FILE + ".tmp")
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / KEYS_FILE)
        fsync_dir(self.directory)
        self._keys = keys  # known only once durable: a failed save is tried again


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` (whole lines) to ``path`` (created if need be) and fsync it.

    A last line without its newline (a crash, a short write) is cut first, so
    nothing is appended onto it. If writing or the fsync fails, the file is cut
    back to its size before the append (what a scan finds is then only what an
    fsync covered: Linux reports a failed fsync once, and the pages it failed to
    write may stay readable in the page cache) and the error is raised.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        size = _cut_torn_line(path, fd)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            log.error("%s: appending %d bytes failed: %s; cut back to %d bytes", path,
                      len(data), exc, size)  # fmt: skip
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError as again:
                log.error("%s: cutting back to %d bytes failed: %s", path, size, again)
            raise
    finally:
        os.close(fd)


def _cut_torn_line(path: Path, fd: int) -> int:
    """Cut the file after its last newline if its last line has none; its size after."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    keep = 0
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        at = chunk.rfind(b"\n")
        if at >= 0:
            keep = start + at + 1
            break
        end = start
    log.warning("%s: last line has no newline (cut short): cut %d -> %d bytes", path, size, keep)
    os.ftruncate(fd, keep)
    return keep
