"""The receiver's access log: who logged in, and who watched which camera, when.

Theory of operation
-------------------
``DATA/access.log`` is an append-only JSON-lines file, one entry per line in
canonical form (keys sorted, separators ``,`` and ``:``), hash-chained like
the agent's audit trail (:mod:`agent.audit`): ``n`` (from 1), ``at``
(ISO-8601 UTC with milliseconds), ``action`` (a stable code), ``who`` (the
account name, or null), ``role``, ``login`` (the public handle of the login
session, never its secret), ``session`` and ``camera`` (the emergency
session and camera, when the action is about footage), ``remote`` (the
client's address), the action's own fields, ``prev`` (the previous entry's
``hash``, :data:`GENESIS` for the first) and ``hash`` (SHA-256 over the
canonical JSON of everything else). Editing, deleting or reordering an entry
breaks the chain (:func:`verify_lines`; ``breakglass receiver access
verify``). The chain proves order and integrity, not completeness at the
end: record the head it prints elsewhere to notice a cut.

Actions: ``login`` / ``login_failed`` (``reason``: ``invalid_credentials``,
``disabled``, ``locked``, ``throttled``, ``changed``: the password was reset
during the check) / ``login_lockout`` (``until``) /
``login_rate_limited`` / ``logout``; ``live_open`` / ``live_close``
(``duration_s``; ``cut`` when the receiver ended the view because its login
no longer allowed it: ``login_ended``, ``forbidden`` or ``login_unchecked``,
see :mod:`receiver.viewer`); ``recording_fetch`` (``file``: once per part
file per login session, however many range requests the player makes);
``footage_withheld`` (``withheld``: the view's action, ``reason``: recorded
footage not sent, its entry not durable in time); ``user_add``,
``user_disable``, ``user_enable``, ``user_passwd``, ``user_role``
(``target``, ``role``), ``user_unlock`` (``target``, ``addresses``);
``password_change`` / ``password_change_failed`` (one's own,
:mod:`receiver.accounts_api`); ``log_torn_tail`` (``bytes``: an
unfinished line a crash left, cut before appending). Other modules record
through :data:`ACCESS_LOG_KEY` with their own actions (evidence exports,
dispatch, ``player_link_*`` in :mod:`receiver.player_links`), and
``recording_deleted`` comes from :mod:`receiver.retention` (no user).

Writing: :meth:`AccessLog.record` never blocks; a writer thread appends what
is queued in batches, one ``fsync`` per batch (entries that arrive while it
syncs form the next batch). Each batch is chained under an exclusive
``flock`` on the file, reading the last entry first, so the server and the
command line (``breakglass receiver user ...``) can append to the same log
without forking the chain. :meth:`AccessLog.flush` waits until everything
recorded so far is durable; :meth:`AccessLog.durable` until one entry is.

Recorded footage leaves only once the log says who took it
(:class:`FootageLog`): the route records its entry (once per login, or player
link, and file) and sends nothing until that entry is durable; a log that
cannot be written within :data:`VIEW_LOG_WAIT_S` withholds it (503
``access_log_unavailable``, a ``footage_withheld`` entry queued after the
view's). Live video is not held back: during an emergency, police see the
cameras whatever the state of this disk (its entries wait in the queue, and
the writer's failure is in the receiver's log).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from aiohttp import web

__all__ = [
    "ACCESS_LOG_KEY",
    "GENESIS",
    "AccessLog",
    "FootageLog",
    "Verification",
    "entry_hash",
    "verify_file",
    "verify_lines",
]

log = logging.getLogger(__name__)

GENESIS: Final = "0" * 64
_N = re.compile(rb'"n":(\d+)')
_MAX_TAIL = 1 << 20  # an entry is small; a longer last line is damage
#: Problems :func:`verify_lines` lists one by one; the rest are counted in a last one.
MAX_LISTED: Final = 100
#: How long recorded footage waits for its access-log entry to be durable before it is
#: withheld (an fsync takes milliseconds; this is a disk that fails).
VIEW_LOG_WAIT_S: Final = 10.0


def canonical(obj: dict[str, Any]) -> bytes:
    """Canonical JSON (keys sorted, no whitespace), as the agent's audit trail."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(body: dict[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of an entry without its ``hash``."""
    return hashlib.sha256(canonical(body)).hexdigest()


def iso_ms(t: float) -> str:
    """``t`` (UTC seconds) as ISO-8601 with milliseconds."""
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@dataclass(slots=True)
class Verification:
    """What :func:`verify_lines` found."""

    entries: int = 0
    #: The last good entry's hash (the chain's head), GENESIS for an empty log.
    head: str = GENESIS
    #: ``(line number, what is wrong)``, in file order; empty when the chain holds. Past
    #: :data:`MAX_LISTED` the rest are counted in ``unlisted`` and one last summary.
    errors: list[tuple[int, str]] = field(default_factory=list)
    unlisted: int = 0

    @property
    def ok(self) -> bool:
        """Whether every line is a well-formed entry chained to the one before."""
        return not self.errors


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # canonical() never writes NaN or Infinity


def _show(value: object) -> str:
    """An entry's ``n`` as a problem names it: short, whatever the line holds."""
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
    elif isinstance(value, str):
        text = repr(value[:40])
    else:
        text = f"<a JSON {'object' if isinstance(value, dict) else 'array'}>"
    return text if len(text) <= 40 else text[:37] + "..."


def verify_lines(lines: Iterable[bytes]) -> Verification:
    """Check a log's lines: numbering, chaining and each entry's hash (sans-IO).

    Any line, however hostile (NaN, nesting deeper than Python's recursion limit), is a
    problem on its line, never an exception; memory does not grow with the lines."""
    result = Verification()
    first_unlisted = last_unlisted = 0

    def problem(lineno: int, what: str) -> None:
        nonlocal first_unlisted, last_unlisted
        if len(result.errors) < MAX_LISTED:
            result.errors.append((lineno, what))
            return
        result.unlisted += 1
        first_unlisted = first_unlisted or lineno
        last_unlisted = lineno

    prev, expect_n = GENESIS, 1
    for lineno, raw in enumerate(lines, start=1):
        if not raw.endswith(b"\n"):
            problem(lineno, "unfinished last line (torn write)")
            break
        try:
            entry = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            why = ""
            if isinstance(exc, RecursionError):
                why = " (nested too deeply)"
            elif "is not JSON" in str(exc):
                why = f" ({exc})"
            problem(lineno, f"not a JSON entry{why}")
            prev, expect_n = hashlib.sha256(raw.rstrip(b"\n")).hexdigest(), expect_n + 1
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
            problem(lineno, "not an access-log entry")
            continue
        digest = entry.pop("hash")
        n = entry.get("n")
        try:
            altered = entry_hash(entry) != digest
            written = canonical(dict(entry, hash=digest))
        except (ValueError, RecursionError):
            problem(lineno, "not an access-log entry (nested too deeply)")
            prev, expect_n = digest, expect_n + 1
            continue
        if n != expect_n:
            problem(lineno, f"entry number {_show(n)}, expected {expect_n}")
        if entry.get("prev") != prev:
            problem(lineno, f"entry {_show(n)} does not follow the one before (prev mismatch)")
        if altered:
            problem(lineno, f"entry {_show(n)} was altered (hash mismatch)")
        if raw.rstrip(b"\n") != written:
            problem(lineno, f"entry {_show(n)} is not in canonical form")
        prev = digest
        expect_n = (n + 1) if type(n) is int else expect_n + 1
        result.entries += 1
        if not result.errors:
            result.head = digest
    if result.unlisted:
        result.errors.append(
            (
                first_unlisted,
                f"{result.unlisted} more problems, not listed one by one "
                f"(lines {first_unlisted}..{last_unlisted})",
            )
        )
    return result


def verify_file(path: Path) -> Verification:
    """:func:`verify_lines` over a log file."""
    with open(path, "rb") as f:
        return verify_lines(f)


class AccessLog:
    """The append-only, hash-chained access log at ``path`` (see the module docs).

    Use as a (sync or async) context manager, or :meth:`start` then :meth:`close`.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._cond = threading.Condition()
        self._queue: list[dict[str, Any]] = []
        self._recorded = 0  # entries handed to record()
        self._written = 0  # of those, durable
        self._failed: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._head: tuple[int, str] = (0, GENESIS)
        #: :meth:`durable` callers: (ticket, their loop, their future), under ``_cond``.
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def head(self) -> tuple[int, str]:
        """``(n, hash)`` of the newest entry known durable: this process's last write, or
        the file's last entry when :meth:`start` ran (``(0, GENESIS)``: none).

        Devices anchor it in their signed audit trails (``access_head`` on the uplink),
        so a log rewritten later no longer matches what the district holds.
        """
        return self._head

    # -- recording -----------------------------------------------------------

    def record(
        self,
        action: str,
        *,
        who: str | None,
        role: str | None = None,
        login: str | None = None,
        session: str | None = None,
        camera: str | None = None,
        remote: str | None = None,
        **fields: Any,
    ) -> int:
        """Queue one entry (never blocks on the disk); safe from any thread. Returns its
        ticket for :meth:`durable` (0 when written at once: no writer thread runs)."""
        entry = self._entry(
            action,
            who=who,
            role=role,
            login=login,
            session=session,
            camera=camera,
            remote=remote,
            **fields,
        )
        ticket = 0
        with self._cond:
            if self._thread is not None:
                self._queue.append(entry)
                self._recorded += 1
                ticket = self._recorded
                self._cond.notify_all()
        if not ticket:  # not started, or closed: write it now (the command line)
            self._append([entry])
        for listener in list(self._listeners):
            listener(entry)
        return ticket

    def listen(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback(entry)`` (unchained, on the recording thread) for every entry
        recorded from now on; returns the function that stops it."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _entry(self, action: str, **fields: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "role": None,
            "login": None,
            "session": None,
            "camera": None,
            "remote": None,
        }
        entry.update(fields, action=action, at=iso_ms(self.clock()))
        canonical(entry)  # not serialisable: the caller's bug, raised here
        return entry

    def flush_sync(self, timeout: float | None = 30.0) -> None:
        """Wait until every entry recorded so far is durable."""
        with self._cond:
            target = self._recorded
            if not self._cond.wait_for(lambda: self._written >= target, timeout):
                raise TimeoutError(f"access log {self.path}: entries not durable in {timeout} s")

    async def flush(self) -> None:
        """Wait (off the event loop) until every entry recorded so far is durable."""
        await asyncio.to_thread(self.flush_sync)

    async def durable(self, ticket: int, within_s: float) -> bool:
        """Whether the entry :meth:`record` gave ``ticket`` for is durable within
        ``within_s`` seconds (no thread: the writer wakes the caller's loop)."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._written >= ticket or self._thread is None:
                return self._written >= ticket
            waiter = (ticket, loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            async with asyncio.timeout(within_s):
                await waiter[2]
            return True
        except TimeoutError:
            return False
        finally:
            with self._cond, contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> AccessLog:
        """Start the writer thread (reads the head of the log as it is)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                n, digest, _ = _tail(fd)
            finally:
                os.close(fd)
            self._head = (n, digest)
        with self._cond:
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(
                    target=self._run, name="access-log writer", daemon=True
                )
                self._thread.start()
        return self

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        with self._cond:
            thread = self._thread
            self._closing = True
            self._cond.notify_all()
        if thread is not None:
            thread.join()
        with self._cond:
            self._thread = None

    def __enter__(self) -> AccessLog:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> AccessLog:
        return self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closing)
                batch, self._queue = self._queue, []
                if not batch and self._closing:
                    # Under the lock: an entry recorded from now on is written by its
                    # caller (as when closed), not queued for a writer that has gone.
                    self._thread = None
                    return
            try:
                self._append(batch)
            except OSError as exc:  # keep them: the next batch tries again
                log.error("access log %s: %d entries not written: %s", self.path, len(batch), exc)
                with self._cond:
                    self._queue[:0] = batch
                    if self._closing:
                        return
                    self._cond.wait(1.0)
                continue
            with self._cond:
                self._written += len(batch)
                self._cond.notify_all()
                ready = [w for w in self._waiters if w[0] <= self._written]
            for _, loop, future in ready:
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    loop.call_soon_threadsafe(_resolve, future)

    # -- the file ------------------------------------------------------------

    def _append(self, batch: list[dict[str, Any]]) -> None:
        """Chain ``batch`` after the file's last entry and append it durably, under flock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            n, prev, torn = _tail(fd)
            lines = []
            if torn:
                os.ftruncate(fd, os.fstat(fd).st_size - torn)
                batch = [self._entry("log_torn_tail", who=None, bytes=torn), *batch]
                log.warning(
                    "access log %s: cut an unfinished last line (%d bytes)", self.path, torn
                )
            for entry in batch:
                n += 1
                body = dict(entry, n=n, prev=prev)
                prev = entry_hash(body)
                lines.append(canonical(dict(body, hash=prev)) + b"\n")
            data = memoryview(b"".join(lines))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
            self._head = (n, prev)
        finally:
            os.close(fd)  # releases the lock


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class FootageLog:
    """Recorded footage's entries, once per key, and the wait before it is sent.

    A key names one viewing (a login, or a player link and address, and one file):
    a player's many range requests of a file are one entry. :meth:`admit` records
    the entry the first time and, every time, answers whether the footage may go:
    only once that entry is durable (the module docs). A key whose entry was
    withheld is forgotten, so the next try is logged anew.
    """

    def __init__(self, keep: int = 10_000) -> None:
        self._tickets: OrderedDict[Hashable, int] = OrderedDict()
        self._keep = keep

    async def admit(self, access_log: AccessLog, key: Hashable, action: str, **fields: Any) -> bool:
        """Log ``action`` with ``fields`` (as :meth:`AccessLog.record` takes them) unless
        ``key`` was; whether its entry is durable within :data:`VIEW_LOG_WAIT_S`."""
        ticket = self._tickets.get(key)
        first = ticket is None
        if ticket is None:
            ticket = access_log.record(action, **fields)
            self._tickets[key] = ticket
            while len(self._tickets) > self._keep:
                self._tickets.popitem(last=False)
        if await access_log.durable(ticket, VIEW_LOG_WAIT_S):
            return True
        if first:
            self._tickets.pop(key, None)
            log.error("%s withheld: the access log %s is not written", action, access_log.path)
            access_log.record(
                "footage_withheld", withheld=action, reason="access_log_unavailable", **fields
            )
        return False


def _tail(fd: int) -> tuple[int, str, int]:
    """(last n, last hash, bytes of an unfinished last line) of the open log."""
    size = os.fstat(fd).st_size
    chunk, pos, cut = b"", size, -1
    while pos > 0 and size - pos <= _MAX_TAIL:
        step = min(65536, pos)
        pos -= step
        chunk = os.pread(fd, step, pos) + chunk
        cut = chunk.rfind(b"\n")  # the end of the last whole line
        if cut >= 0 and chunk.rfind(b"\n", 0, cut) >= 0:
            break  # its beginning is in the chunk too
    torn = len(chunk) - (cut + 1)
    if cut < 0:
        return 0, GENESIS, torn
    last = chunk[:cut].rsplit(b"\n", 1)[-1]
    try:
        entry = json.loads(last)
        return int(entry["n"]), str(entry["hash"]), torn
    except (ValueError, KeyError, TypeError, RecursionError):
        # A damaged last line: chain on its bytes, so the damage stays visible to verify.
        log.error("access log: the last entry is damaged; chaining after its bytes")
        match = _N.search(last)
        return (int(match.group(1)) if match else 0), hashlib.sha256(last).hexdigest(), torn


#: The access log every module records through (the receiver sets it up with its accounts).
ACCESS_LOG_KEY = web.AppKey("breakglass.access_log", AccessLog)
