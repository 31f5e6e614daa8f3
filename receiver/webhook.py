"""Telling the district when an emergency session starts and ends: a signed webhook.

The town's agreement gives police footage only in an emergency, and the
district must know at once when that happens. The receiver POSTs one JSON
event per session start and end to the district's URL (``receiver serve
--notify-url``), signed with the receiver's Ed25519 key so the district can
tell it came from this receiver and was not changed; the district verifies
with the receiver's public key (no shared secret to leak or to default).

Delivery survives outages and restarts: events go first into an outbox in
SQLite (``DATA/notify.sqlite``, committed before anything is sent), then a
sender task POSTs what is due, one at a time in the order queued, and retries a
failure with exponential backoff (:data:`FIRST_RETRY_S` doubling up to
:data:`MAX_RETRY_S`) for :data:`GIVE_UP_S`; an event it gives up on stays in
the outbox, marked failed and logged as an error, for :data:`KEEP_DONE_S` (as
delivered ones are), then deleted. Receivers treat the event
id as an idempotency key: a retry after a lost answer may deliver it twice.

A session's events reach the district in the order they were queued: one is not
sent while an earlier one of the same session (device and session) is pending, so
a ``session.ended`` never overtakes its ``session.started`` that is waiting out a
backoff. The order is the outbox's (a sequence number stored with each event, not
the clock), so it holds across restarts. Only giving up lifts it: the later events
of a session whose event is given up go without it (the error logged says so).
Sessions do not wait for one another: an event the district refuses holds back its
own session's later events only. Once the district takes an event again, every
event waiting out a backoff is due at once, and the backlog goes out in queue
order rather than one per backoff; and a new event held back by one waiting out a
backoff has that one tried at once, in its place (the POST the new event would
have had), so an emergency's end finds out whether the district is back. No order
is kept between sessions, and the body carries no sequence number: within a
session, ``at`` (the receiver's clock for both events) orders them too.

What is sent (no footage, nothing about students): one JSON object, keys sorted:

- ``id``: ``evt_`` and 24 hex digits, from device, session and type (an
  idempotency key);
- ``type``: ``session.started`` or ``session.ended``;
- ``at``: when, on the **receiver's** clock (Unix seconds, 3 decimals): when it
  opened the session's recording (``started``: the device told it), or when the
  device told it the session ended (``ended``). Both on one clock, so
  ``ended.at - started.at`` is how long the receiver had the emergency open;
- ``device_at`` (``session.started`` only): when the session started on the
  **device's** own clock (the press, or the trigger). A Raspberry Pi's clock may
  be hours or days off until NTP syncs it, and a press made while the receiver
  was out of reach arrives later: compare it with ``at``, do not use it for
  ``at``. (Before it was added, ``session.started``'s ``at`` was this time.) The
  device does not say when a session ended on its clock;
- ``device``, ``building`` (null if unknown), ``session``: for a device enrolled by
  certificate the building its certificate names, whatever its ``session_open`` says
  (the uplink tells the listeners the session as recorded:
  :func:`receiver.device_trust.certify_open`); for an allow-listed device, its word;
- ``started_by`` (``started`` only): who or what started it, as the device says
  (``kind``: ``button`` with ``button_id`` and ``location``, or ``trigger`` with
  the signer's ``role``, ``label`` and ``reason``, ...);
- ``cameras`` (``started`` only): ``[{"id", "zone"}]``, each zone the certificate's
  where it lists the camera;
- ``certified`` (``started`` only, when known): whether the building and zones come
  from the device's enrollment certificate (false: an allow-listed device's word);
  ``mismatches`` (``started`` only, when there are any): what the device claimed
  otherwise, ``[{"field", "claimed", "certified"}]`` (a device misconfigured, or one
  that lies: the district should look at it);
- ``reason`` (``ended`` only): why it ended (``expired``, the trigger's reason, ...).

Redirects are not followed: an answer 3xx is a failed attempt, retried like any
other (following one would re-send the signed event wherever the ``Location``
points, plain ``http://`` included, or turn the POST into a GET of another page
whose 200 would pass for a delivery). Logs and the outbox's ``last_error``
name the district's URL and a redirect's target by scheme, host and port only:
a path, query or user part may hold a secret.

Headers: ``Breakglass-Event-Id``, ``Breakglass-Timestamp`` (Unix seconds)
and ``Breakglass-Signature: kid=<key id>,ed25519=<b64url>`` over the bytes
``<timestamp>.<body>``. The district should refuse a timestamp far from its
clock (replay) and an event id it has already processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from yarl import URL

from provisioning import documents as d
from provisioning.keys import kid

log = logging.getLogger(__name__)

FIRST_RETRY_S: Final = 5.0
MAX_RETRY_S: Final = 15 * 60.0
GIVE_UP_S: Final = 72 * 3600.0
#: Delivered and given-up events are kept this long (the outbox is not a log: the
#: receiver's own log and the access log are), then deleted as new ones come.
KEEP_DONE_S: Final = 30 * 86400.0
TIMEOUT_S: Final = 10.0
MAX_BODY: Final = 16 * 1024
EVENT_TYPES: Final = ("session.started", "session.ended")


class WebhookError(ValueError):
    """A bad notification setting (the URL or its pin)."""


def check_url(url: str) -> str:
    """The district's URL: https, with a host (WebhookError otherwise)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # an unbalanced IPv6 bracket
        host = None
    if host is None or parts.scheme != "https":
        # Named as a log may show it: its path or query may hold the district's secret.
        raise WebhookError(f"{safe_url(url)}: the district's webhook must be an https:// URL")
    return url


def safe_url(url: str) -> str:
    """``url`` as a log may show it: ``scheme://host:port/…`` (its path, query and user
    part may hold a secret); ``an unreadable URL`` if it has no host."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "an unreadable URL"
    if not parts.scheme or not host:
        return "an unreadable URL"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}/…"


def _redacted(text: str, url: str) -> str:
    """``text`` (an error's message) with ``url``, and its path, query and user part,
    replaced by what :func:`safe_url` shows."""
    wholes = {url}
    with contextlib.suppress(ValueError):
        wholes.add(str(URL(url)))  # as aiohttp prints it
    for whole in sorted(wholes, key=len, reverse=True):
        text = text.replace(whole, safe_url(url))
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    tails = {path, parts.path, parts.query, parts.username or "", parts.password or ""}
    for secret in sorted((t for t in tails if len(t) > 1), key=len, reverse=True):
        text = text.replace(secret, "…")
    return text


def _target(url: str, answer: aiohttp.ClientResponse) -> str:
    """``, to SCHEME://HOST:PORT/…`` of a redirect's ``Location`` (empty without one)."""
    location = answer.headers.get("Location")
    if not location:
        return ""
    try:
        return f", to {safe_url(urljoin(url, location))}"
    except ValueError:
        return ", to an unreadable URL"


def signature_base(timestamp: int, body: bytes) -> bytes:
    """What the signature covers: ``<timestamp>.<body>``."""
    return str(timestamp).encode() + b"." + body


def sign(key: Ed25519PrivateKey, timestamp: int, body: bytes) -> str:
    """The ``Breakglass-Signature`` header value."""
    sig = key.sign(signature_base(timestamp, body))
    return f"kid={kid(key.public_key())},ed25519={d.b64url(sig)}"


def verify(public: Ed25519PublicKey, header: str, timestamp: str, body: bytes) -> bool:
    """What a district does with a delivery (and what the tests do)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        sig = d.b64url_decode(fields.get("ed25519", ""), what="signature")
        public.verify(sig, signature_base(int(timestamp), body))
    except (d.DocumentError, ValueError, InvalidSignature):
        return False
    return fields.get("kid") == kid(public)


def _session_of(body: bytes) -> str | None:
    """The key that orders an event among its session's (device and session, from its
    body); None for a body without them (an event ordered with no other)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    device, session = doc.get("device"), doc.get("session")
    if not isinstance(device, str) or not isinstance(session, str):
        return None
    return json.dumps([device, session])


@dataclass(frozen=True, slots=True)
class Pending:
    """An event waiting in the outbox."""

    id: str
    body: bytes
    created: float
    attempts: int


class Outbox:
    """The durable queue of events (SQLite; time passed in). Any thread: the sender's
    and each notice's worker threads share one connection, one call at a time.

    Each event keeps its session (``session``: device and session) and its place in
    the queue (``seq``: one more than any event stored then; not the clock, which may
    step back, nor the rowid, which ``VACUUM`` may renumber)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, body BLOB NOT NULL,"
            " created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " next_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',"
            " last_error TEXT, session TEXT, seq INTEGER)"
        )
        self._upgrade()
        # The sender asks for due events on every pass, each checked against its
        # session's earlier ones; done ones are pruned by age.
        self._db.execute("CREATE INDEX IF NOT EXISTS events_due ON events (state, next_at)")
        self._db.execute("CREATE INDEX IF NOT EXISTS events_done ON events (state, created)")
        self._db.execute("CREATE INDEX IF NOT EXISTS events_order ON events (session, state, seq)")
        self._db.execute("CREATE INDEX IF NOT EXISTS events_seq ON events (seq)")

    def _upgrade(self) -> None:
        """An outbox from before the order was kept: its events' sessions read from their
        bodies, their places in the queue from the rowid (the order they were added)."""
        with self._transaction() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
            if "seq" not in columns:
                db.execute("ALTER TABLE events ADD COLUMN seq INTEGER")
                db.execute("UPDATE events SET seq = rowid")
            if "session" not in columns:
                db.execute("ALTER TABLE events ADD COLUMN session TEXT")
                rows = db.execute("SELECT rowid, body FROM events").fetchall()
                for rowid, body in rows:
                    session = _session_of(body)
                    if session is not None:
                        db.execute(
                            "UPDATE events SET session = ? WHERE rowid = ?", (session, rowid)
                        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def add(self, body: bytes, *, event_id: str, now: float) -> None:
        """Queue an event last (committed, fsynced, before this returns); events
        delivered or given up more than :data:`KEEP_DONE_S` ago are deleted (their ids no
        longer recognise a repeat: the district treats ids as idempotency keys anyway).

        A new event kept back by an earlier one of its session that is waiting out a
        backoff makes that one due now: it is tried at once in the new one's place."""
        session = _session_of(body)
        with self._transaction() as db:
            db.execute(
                "DELETE FROM events WHERE state IN ('delivered', 'failed') AND created < ?",
                (now - KEEP_DONE_S,),
            )
            added = db.execute(
                "INSERT OR IGNORE INTO events (id, body, created, next_at, session, seq)"
                " VALUES (?, ?, ?, ?, ?, (SELECT coalesce(max(seq), 0) + 1 FROM events))",
                (event_id, body, now, now, session),
            ).rowcount
            if added and session is not None:
                db.execute(
                    "UPDATE events SET next_at = ? WHERE next_at > ? AND seq = (SELECT"
                    " min(seq) FROM events WHERE session = ? AND state = 'pending')",
                    (now, now, session),
                )

    def due(self, now: float, limit: int = 16) -> list[Pending]:
        """Pending events whose time has come, in queue order, each the first pending
        of its session (the later ones wait for it)."""
        rows = self._execute(
            "SELECT id, body, created, attempts FROM events AS e WHERE e.state = 'pending'"
            " AND e.next_at <= ? AND (e.session IS NULL OR NOT EXISTS (SELECT 1 FROM events"
            " AS f WHERE f.session = e.session AND f.state = 'pending' AND f.seq < e.seq))"
            " ORDER BY e.seq LIMIT ?",
            (now, limit),
        )
        return [Pending(r[0], r[1], r[2], r[3]) for r in rows]

    def next_due(self) -> float | None:
        """When the next event :meth:`due` may give is due (None: nothing pending). An
        event kept back by its session's is not counted: its own time passed long ago."""
        (row,) = self._execute(
            "SELECT min(next_at) FROM events AS e WHERE e.state = 'pending' AND (e.session"
            " IS NULL OR NOT EXISTS (SELECT 1 FROM events AS f WHERE f.session = e.session"
            " AND f.state = 'pending' AND f.seq < e.seq))"
        )
        return None if row[0] is None else float(row[0])

    def delivered(self, event_id: str, *, now: float) -> int:
        """The district took it: it answers again, so every event waiting out a backoff is
        due ``now`` (then sent in queue order). Returns how many were."""
        with self._transaction() as db:
            db.execute("UPDATE events SET state = 'delivered' WHERE id = ?", (event_id,))
            return db.execute(
                "UPDATE events SET next_at = ? WHERE state = 'pending' AND next_at > ?",
                (now, now),
            ).rowcount

    def waiting_behind(self, event_id: str) -> int:
        """How many pending events of ``event_id``'s session were queued after it."""
        (row,) = self._execute(
            "SELECT count(*) FROM events AS e JOIN events AS f ON f.session = e.session"
            " AND f.seq > e.seq WHERE e.id = ? AND f.state = 'pending'",
            (event_id,),
        )
        return int(row[0])

    def failed(self, event: Pending, error: str, now: float) -> bool:
        """A failed attempt: schedule the retry; returns False when given up."""
        attempts = event.attempts + 1
        if now - event.created >= GIVE_UP_S:
            self._execute(
                "UPDATE events SET state = 'failed', attempts = ?, last_error = ? WHERE id = ?",
                (attempts, error[:300], event.id),
            )
            return False
        delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (attempts - 1))
        self._execute(
            "UPDATE events SET attempts = ?, next_at = ?, last_error = ? WHERE id = ?",
            (attempts, now + delay, error[:300], event.id),
        )
        return True

    def states(self) -> dict[str, int]:
        """Events per state (``pending``, ``delivered``, ``failed``)."""
        rows = self._execute("SELECT state, count(*) FROM events GROUP BY state")
        return {str(r[0]): int(r[1]) for r in rows}


def session_event(
    kind: str,
    *,
    device: str,
    building: str | None,
    session: str,
    at: float,
    device_at: float | None = None,
    started_by: Mapping[str, Any] | None = None,
    cameras: list[Mapping[str, Any]] | None = None,
    reason: str | None = None,
    certified: bool | None = None,
    mismatches: list[Mapping[str, Any]] | None = None,
) -> tuple[str, bytes]:
    """An event's id and its JSON body (canonical: sorted keys, no spaces).

    ``at`` is the receiver's clock, ``device_at`` the device's (see the module's
    docstring). The id is derived from the session and the type, so a session
    re-opened after a reconnect (or told again after a receiver restart) queues no
    second event.
    """
    if kind not in EVENT_TYPES:
        raise ValueError(f"event type {kind!r}")
    event_id = "evt_" + hashlib.sha256(f"{device}/{session}/{kind}".encode()).hexdigest()[:24]
    doc: dict[str, Any] = {
        "id": event_id,
        "type": kind,
        "at": round(at, 3),
        "device": device,
        "building": building,
        "session": session,
    }
    if device_at is not None and math.isfinite(device_at):  # the device's word
        doc["device_at"] = round(device_at, 3)
    if started_by is not None:
        doc["started_by"] = dict(started_by)
    if cameras is not None:
        doc["cameras"] = [{"id": c.get("id"), "zone": c.get("zone")} for c in cameras]
    if reason is not None:
        doc["reason"] = reason
    if certified is not None:
        doc["certified"] = certified
    if mismatches:
        doc["mismatches"] = [
            {k: m.get(k) for k in ("field", "claimed", "certified")} for m in mismatches
        ]
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_BODY:
        raise ValueError(f"event of {len(body)} bytes (at most {MAX_BODY})")
    return event_id, body


class Notifier:
    """Queues events and delivers them in a task (``async with``; ``notify()`` any time)."""

    def __init__(
        self,
        url: str,
        outbox: Outbox,
        key: Ed25519PrivateKey,
        *,
        ssl: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = check_url(url)
        self.outbox = outbox
        self.key = key
        self.ssl = ssl  # None: verify against the system CAs; aiohttp.Fingerprint: a pin
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0

    async def __aenter__(self) -> Notifier:
        self._task = asyncio.create_task(self._run(), name="district-webhook")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.outbox.close)

    async def notify(self, event_id: str, body: bytes) -> None:
        """Queue an event durably and wake the sender."""
        await asyncio.to_thread(self.outbox.add, body, event_id=event_id, now=self.clock())
        self._wake.set()

    async def deliver_due(self, http: aiohttp.ClientSession) -> int:
        """Try every due event once (:meth:`Outbox.due`: a session's in order); returns
        how many were delivered."""
        done = 0
        for event in await asyncio.to_thread(self.outbox.due, self.clock()):
            error = await self._post(http, event)
            if error is None:
                now = self.clock()
                backlog = await asyncio.to_thread(self.outbox.delivered, event.id, now=now)
                if backlog:
                    log.info(
                        "district webhook: delivered again; %d waiting event(s) due now", backlog
                    )
                done += 1
                continue
            retry = await asyncio.to_thread(self.outbox.failed, event, error, self.clock())
            if retry:
                log.warning("district webhook: event %s: %s (will retry)", event.id, error)
                continue
            behind = await asyncio.to_thread(self.outbox.waiting_behind, event.id)
            log.error(
                "district webhook: event %s given up after %s%s",
                event.id,
                error,
                f"; {behind} later event(s) of its session now go without it" if behind else "",
            )
        self.delivered += done
        return done

    async def _post(self, http: aiohttp.ClientSession, event: Pending) -> str | None:
        timestamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "Breakglass-Event-Id": event.id,
            "Breakglass-Timestamp": str(timestamp),
            "Breakglass-Signature": sign(self.key, timestamp, event.body),
        }
        try:
            async with http.post(
                self.url, data=event.body, headers=headers, ssl=self.ssl, allow_redirects=False
            ) as r:
                await r.content.read(4096)
                if 300 <= r.status < 400:
                    return f"HTTP {r.status} (redirects are not followed{_target(self.url, r)})"
                return None if 200 <= r.status < 300 else f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _redacted(f"{type(exc).__name__}: {exc}", self.url)[:300]

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                self._wake.clear()
                try:
                    await self.deliver_due(http)
                    next_at = await asyncio.to_thread(self.outbox.next_due)
                    wait = None if next_at is None else max(0.05, next_at - self.clock())
                except Exception:  # the outbox's disk (sqlite3.Error), or a bug: try again
                    log.exception("district webhook: sending failed; trying again")
                    wait = FIRST_RETRY_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)


class SessionNotices:
    """Turns the uplink's session events into the district's notifications.

    Emergencies only: a continuous exterior share (``started_by.kind == "share"``)
    is the building's standing policy, not an emergency, and would notify hourly.
    Register :meth:`__call__` in ``IngestServer.session_listeners`` (called when the
    receiver has opened or closed the session's recording: its time then is ``at``;
    with the certificate's building and zones in the ``SessionOpen``, not the device's).
    """

    def __init__(
        self,
        notifier: Notifier,
        meta_of: Callable[[str], Mapping[str, Any] | None] | None = None,
    ) -> None:
        """``meta_of(session)``: the session's recorded metadata (``certified`` and
        ``mismatches``, :func:`receiver.device_trust.certify_open`), if known."""
        self.notifier = notifier
        self.meta_of = meta_of
        self._open: dict[tuple[str, str], str | None] = {}  # (device, session) -> building
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, device: str, event: Any) -> None:
        """One session event from the uplink (on the loop)."""
        from agent import protocol as p

        if isinstance(event, p.SessionOpen):
            if event.started_by.get("kind") == "share":
                return
            self._open[(device, event.session)] = event.building
            meta = self.meta_of(event.session) if self.meta_of is not None else None
            certified = meta.get("certified") if meta is not None else None
            mismatches = meta.get("mismatches") if meta is not None else None
            made = session_event(
                "session.started",
                device=device,
                building=event.building,
                session=event.session,
                at=self.notifier.clock(),  # the receiver's, as the end's
                device_at=event.started_at,  # the device's own, beside it
                started_by=event.started_by,
                cameras=[{"id": c.id, "zone": c.zone} for c in event.cameras],
                certified=certified if isinstance(certified, bool) else None,
                mismatches=[m for m in mismatches if isinstance(m, Mapping)]
                if isinstance(mismatches, list)
                else None,
            )
        elif isinstance(event, p.SessionClose):
            if (device, event.session) not in self._open:
                return  # a share's end, or an end this receiver never saw start
            building = self._open.pop((device, event.session))
            made = session_event(
                "session.ended",
                device=device,
                building=building,
                session=event.session,
                at=self.notifier.clock(),
                reason=event.reason,
            )
        else:
            return
        task = asyncio.create_task(self.notifier.notify(*made), name="webhook-queue")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
