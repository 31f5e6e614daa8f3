"""The police-side web viewer: sessions, live view and recordings.

Routes added by :func:`setup_viewer`:

- ``GET /`` — the single-page viewer (``static/index.html``).
- ``GET /static/{name}`` — only the fixed files the page needs.
- ``GET /api/sessions[?limit=N][&before=CURSOR]`` — sessions with per-camera state,
  newest first (JSON ``{"sessions": [...], "next": CURSOR or null}``): every open
  session and the newest ``limit`` (default 50, at most 500) closed ones; with
  ``before`` (a ``next`` from an earlier answer) the closed sessions after it. Every
  viewer polls this, so its cost must not grow with the receiver's whole history.
- ``GET /api/sessions/{session}`` — one session, open or closed (for a link to it).
- Times: a session's ``opened_at`` and ``closed_at`` are the receiver's clock (when it
  opened and closed the recording); ``meta`` is what the device said, on its own clock
  (``started_at``, ``expires_at``), which a Raspberry Pi may have hours or days off
  until NTP syncs it. ``expires_at`` (open sessions; else null) is the device's expiry
  on the receiver's clock: moved by ``device_clock_offset_s`` (the device's clock
  minus the receiver's, measured by its heartbeats when the expiry was set:
  :mod:`receiver.device_clock`; null until measured), or, unmeasured, the session's
  length on the device's clock from ``opened_at``.
- A session whose recording cannot be read (its ``session.json`` unreadable or
  missing: :attr:`RecordingStore.damaged`) is on the first page of every listing and
  answers its own route, with ``damaged`` saying why (``null`` for every other
  session; no server path), no cameras, and its folder's last change as
  ``opened_at``; its footage routes answer 409 ``corrupt_recording``.
- ``GET /v1/devices`` — every device heard from, with its offline alarm (JSON:
  ``{"devices": [{device, building, connected, last_heard, offline, since,
  session, footage_stalled_since, recording_failing, enrollment}], "offline_after_s": N}``, times
  ISO-8601 UTC; ``since`` is when the device's present condition began:
  offline, connected or disconnected; ``enrollment`` is when its enrollment
  expires, and whether it was refused for that, as
  :meth:`receiver.device_trust.DeviceTrust.expiry` says, or null).
  Only when :func:`setup_viewer` is given a :class:`Presence`.
- ``GET /v1/live/{session}/{camera}`` — WebSocket: binary fMP4 init segment,
  then fragments, for Media Source Extensions.
- ``GET /recordings/{session}/{camera}.{first_seq}.mp4`` — a recorded part
  file, with HTTP range support.

Errors are JSON ``{"error": CODE, "detail": "..."}`` with a stable CODE.

Access control: every route needs a logged-in officer (:mod:`receiver.auth`
must be set up on the same application; without it every route answers
401). Each live view opened and closed (with its duration) and each
recorded part file fetched (once per login session, however many range
requests a player makes) goes into the access log (:mod:`receiver.access_log`).
A recorded part is sent only once its entry is durable (503
``access_log_unavailable`` when the log cannot be written); a live view is
never held back by the log (life safety: the entry waits in its queue).

A footage stream outlives the request that opened it: a live view lasts the
whole emergency, and a player reads a large part file lazily over one
response. So while either is open its login is looked up again every
``login_recheck_s`` (:data:`LOGIN_RECHECK_S`; one lookup per login session,
however many cameras it watches, on the accounts' database thread as the
middleware does, so an account changed by the command line in another
process is noticed too). When the session has ended (logout, the account
disabled, its password reset, expiry) the live socket is closed with
:data:`CLOSE_LOGIN_ENDED` (4401), when the role no longer allows footage with
:data:`CLOSE_FORBIDDEN` (4403), each with a reason the page can show, and the
``live_close`` entry says ``cut``; a recording transfer's connection is
dropped (:func:`until_cut`; the HLS routes' part transfers are cut the same
way, and a player link's by a re-check of the link: :mod:`receiver.hls`,
:mod:`receiver.player_links`). A lookup that fails (the database) is retried;
after :data:`MAX_FAILED_CHECKS` failures in a row the stream is cut too (1011).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from aiohttp import WSCloseCode, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from receiver.access_log import ACCESS_LOG_KEY, FootageLog
from receiver.accounts import Role
from receiver.auth import AUTH_KEY, COOKIE, User, require
from receiver.device_clock import DeviceClocks, receiver_expiry
from receiver.device_trust import DeviceTrust
from receiver.errors import CorruptRecordingError, InvalidIdError, ReceiverError
from receiver.livefeed import LiveFeed, Subscription
from receiver.presence import Presence
from receiver.recording import (
    RecordingStore,
    SessionKey,
    SessionSummary,
    parse_part_file,
    validate_camera_id,
    validate_session_id,
)

__all__ = [
    "CLOCKS_KEY",
    "CLOSE_FORBIDDEN",
    "CLOSE_LOGIN_ENDED",
    "FEEDS_KEY",
    "LOGIN_RECHECK_S",
    "LOGIN_WATCH_KEY",
    "PRESENCE_KEY",
    "STORE_KEY",
    "TRUST_KEY",
    "Cut",
    "FeedLookup",
    "LoginWatch",
    "Recheck",
    "TransferCut",
    "setup_viewer",
    "until_cut",
]

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Finds the live feed of ``(session_id, camera_id)``, or None if it is not live.
FeedLookup = Callable[[str, str], LiveFeed | None]

#: The recording store the viewer reads.
STORE_KEY = web.AppKey("breakglass.viewer.store", RecordingStore)
#: The live-feed lookup the viewer uses.
FEEDS_KEY: web.AppKey[FeedLookup] = web.AppKey("breakglass.viewer.feeds")
#: The devices' presence (last heard, offline alarm) the viewer shows.
PRESENCE_KEY = web.AppKey("breakglass.viewer.presence", Presence)
#: The enrollments the device list shows the expiry of.
TRUST_KEY = web.AppKey("breakglass.viewer.trust", DeviceTrust)
#: The devices' clocks, which convert a session's expiry to the receiver's clock.
CLOCKS_KEY = web.AppKey("breakglass.viewer.clocks", DeviceClocks)
_SOCKETS_KEY: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("breakglass.viewer.sockets")
_FILES_KEY: web.AppKey[dict[str, tuple[bytes, str]]] = web.AppKey("breakglass.viewer.files")
#: Part files fetched, by (login handle, session, part file): logged once each.
_FETCHED_KEY: web.AppKey[FootageLog] = web.AppKey("breakglass.viewer.fetched")
#: Closed sessions on a page of ``/api/sessions`` unless ``limit`` says, and at most.
PAGE_DEFAULT = 50
PAGE_MAX = 500

#: Seconds between lookups of the login behind an open live view or recording transfer.
LOGIN_RECHECK_S: Final = 2.0
#: Lookups in a row that may fail (the accounts' database) before the streams are cut.
MAX_FAILED_CHECKS: Final = 3
#: WebSocket close codes of a live view cut for its login: the session ended (log in
#: again), or the account's role no longer allows footage.
CLOSE_LOGIN_ENDED: Final = 4401
CLOSE_FORBIDDEN: Final = 4403
#: How long a cut live socket may take to close before its connection is dropped.
_CUT_CLOSE_S = 5.0

_STATIC_DIR = Path(__file__).parent / "static"
_STATIC_FILES = {
    "index.html": "text/html",
    "viewer.js": "text/javascript",
    "viewer.css": "text/css",
    # ES modules that viewer.js imports (no build step).
    "util.js": "text/javascript",
    "live.js": "text/javascript",
    "alarm.js": "text/javascript",
    "dispatch.js": "text/javascript",
}
_CSP = (
    "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # a same-origin POST must carry its Origin
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class Cut:
    """Why a footage stream was cut: its WebSocket close code and reason, the audit code."""

    code: int
    audit: str
    message: str


_LOGIN_ENDED = Cut(
    CLOSE_LOGIN_ENDED,
    "login_ended",
    "your login ended (logged out, account disabled, password reset or expired): log in again",
)
_FORBIDDEN = Cut(CLOSE_FORBIDDEN, "forbidden", "your role no longer allows watching footage")
_UNCHECKED = Cut(
    WSCloseCode.INTERNAL_ERROR, "login_unchecked", "the receiver cannot check your login now"
)


def _verdict(user: User | None, role: Role) -> Cut | None:
    """Why a stream that needs ``role`` must end for this login now (None: it may go on)."""
    if user is None:
        return _LOGIN_ENDED
    if not user.role.includes(role):
        return _FORBIDDEN
    return None


#: A stream's own re-check, for one not opened by a login (a player link): why it must
#: end now, or None. It may raise: a failed lookup, as a login's.
Recheck = Callable[[], Awaitable[Cut | None]]


@dataclass(eq=False, slots=True)
class _Stream:
    request: web.Request
    role: Role
    check: Recheck | None = None
    cut: asyncio.Future[Cut] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class LoginWatch:
    """The login sessions behind open footage streams, looked up again every ``interval_s``.

    One ticker task (running while any stream is open) looks up each login session once
    per round, however many streams it holds open, with :meth:`receiver.auth.Auth.user_of`
    (the middleware's lookup, on the accounts' database thread), and resolves each
    stream's ``cut`` future when the login no longer allows it. A stream opened by
    something else than a login (a player link) brings its own :data:`Recheck`, run once
    per round for all the streams of its key.
    """

    def __init__(self, interval_s: float = LOGIN_RECHECK_S) -> None:
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"login re-check interval {interval_s!r}: expected seconds > 0")
        self.interval_s = interval_s
        #: Rounds of lookups done so far (tests wait on :meth:`wait_rounds`).
        self.rounds = 0
        # By ("login", session cookie), or by a re-checked stream's ("link", key).
        self._groups: dict[tuple[str, str], set[_Stream]] = {}
        self._failures: dict[tuple[str, str], int] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._stopped = False
        self._round_done = asyncio.Condition()

    @property
    def streams(self) -> int:
        """How many streams are watched now."""
        return sum(len(group) for group in self._groups.values())

    @contextlib.contextmanager
    def watch(
        self, request: web.Request, role: Role, *, check: tuple[str, Recheck] | None = None
    ) -> Iterator[asyncio.Future[Cut]]:
        """Watch the login of ``request`` while the block runs; the future resolves (with
        why) when the login no longer allows a stream that needs ``role``.

        ``check=(key, recheck)``: watch with ``recheck`` instead of the login (a player
        link's stream; ``role`` is then unused); one call a round per ``key``.
        """
        if check is None:
            key, stream = ("login", request.cookies.get(COOKIE, "")), _Stream(request, role)
        else:
            key, stream = ("link", check[0]), _Stream(request, role, check[1])
        self._groups.setdefault(key, set()).add(stream)
        if self._ticker is None and not self._stopped:
            self._ticker = asyncio.create_task(self._tick(), name="viewer login re-check")
        try:
            yield stream.cut
        finally:
            group = self._groups.get(key)
            if group is not None:
                group.discard(stream)
                if not group:
                    del self._groups[key]
                    self._failures.pop(key, None)

    async def _tick(self) -> None:
        try:
            while self._groups:
                await asyncio.sleep(self.interval_s)
                await self.check()
        finally:
            self._ticker = None

    async def check(self) -> None:
        """One round: look up every watched login once; cut the streams it no longer allows."""
        for key, group in list(self._groups.items()):
            streams = list(group)
            if not streams:
                continue
            request, recheck = streams[0].request, streams[0].check
            user: User | None = None
            found: Cut | None = None
            try:
                if recheck is None:
                    user = await request.app[AUTH_KEY].user_of(request)
                else:
                    found = await recheck()
            except Exception as exc:  # the accounts' database: try again next round
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                _LOG.warning("cannot check a viewer's login (%d in a row): %r", failures, exc)
                if failures < MAX_FAILED_CHECKS:
                    continue
                cut: Cut | None = _UNCHECKED
            else:
                self._failures.pop(key, None)
                cut = None
            for stream in streams:
                why = cut or (found if recheck is not None else _verdict(user, stream.role))
                if why is not None and not stream.cut.done():
                    stream.cut.set_result(why)
        async with self._round_done:
            self.rounds += 1
            self._round_done.notify_all()

    async def wait_rounds(self, rounds: int) -> None:
        """Wait until :attr:`rounds` reaches ``rounds``."""
        async with self._round_done:
            await self._round_done.wait_for(lambda: self.rounds >= rounds)

    async def stop(self) -> None:
        """Stop looking up (the application shuts down)."""
        self._stopped = True
        ticker = self._ticker
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


#: The viewer's :class:`LoginWatch`.
LOGIN_WATCH_KEY = web.AppKey("breakglass.viewer.login_watch", LoginWatch)


def _error(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers=_HEADERS)


def _from_exception(exc: ReceiverError) -> web.Response:
    if isinstance(exc, InvalidIdError):
        status = 400
    else:
        status = 409 if isinstance(exc, CorruptRecordingError) else 404
    return _error(status, exc.code, str(exc))


def setup_viewer(
    app: web.Application,
    store: RecordingStore,
    feeds: FeedLookup,
    presence: Presence | None = None,
    *,
    trust: DeviceTrust | None = None,
    clocks: DeviceClocks | None = None,
    login_recheck_s: float = LOGIN_RECHECK_S,
) -> None:
    """Add the viewer's routes to ``app``; ``feeds`` finds a camera's live feed.

    With ``presence``, ``GET /v1/devices`` lists the devices and their offline alarm;
    with ``trust`` too, when each one's enrollment expires. ``clocks``: the devices'
    clocks as the ingest measures them (without, a session's expiry on the receiver's
    clock is its length from when the receiver opened it).
    ``login_recheck_s``: how often the login behind an open live view or recording
    transfer is looked up again (see the module's docstring).

    Reads the static files once, here. Open live WebSockets are closed when
    the application shuts down.
    """
    files: dict[str, tuple[bytes, str]] = {}
    for name, mime in _STATIC_FILES.items():
        path = _STATIC_DIR / name
        if path.is_file():
            files[name] = (path.read_bytes(), mime)
    app[STORE_KEY] = store
    app[FEEDS_KEY] = feeds
    if clocks is not None:
        app[CLOCKS_KEY] = clocks
    app[_SOCKETS_KEY] = set()
    app[_FILES_KEY] = files
    app[_FETCHED_KEY] = FootageLog(keep=100_000)
    app[LOGIN_WATCH_KEY] = LoginWatch(login_recheck_s)
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/api/sessions", _sessions)
    app.router.add_get("/api/sessions/{session}", _session)
    if presence is not None:
        app[PRESENCE_KEY] = presence
        if trust is not None:
            app[TRUST_KEY] = trust
        app.router.add_get("/v1/devices", _devices)
    app.router.add_get("/v1/live/{session}/{camera}", _live)
    app.router.add_get("/recordings/{session}/{file}", _recording)
    app.on_shutdown.append(_close_sockets)
    app.on_shutdown.append(_stop_watch)


def _file_response(request: web.Request, name: str) -> web.Response:
    entry = request.app[_FILES_KEY].get(name)
    if entry is None:
        return _error(404, "not_found", f"no static file {name!r}")
    body, mime = entry
    return web.Response(body=body, content_type=mime, charset="utf-8", headers=_HEADERS)


async def _index(request: web.Request) -> web.Response:
    require(request, Role.OFFICER)
    return _file_response(request, "index.html")


async def _static(request: web.Request) -> web.Response:
    require(request, Role.OFFICER)
    name = request.match_info["name"]
    if name == "index.html":  # served at "/" only
        return _error(404, "not_found", f"no static file {name!r}")
    return _file_response(request, name)


def _session_json(summary: SessionSummary, clocks: DeviceClocks | None) -> dict[str, object]:
    doc = summary.to_json()
    sid = summary.session_id
    # The receiver's clock beside the device's (see the module's docstring).
    offset = None if clocks is None or not summary.is_open else clocks.session_offset(sid)
    doc["device_clock_offset_s"] = offset
    doc["expires_at"] = (
        receiver_expiry(summary.meta, summary.opened_at, offset) if summary.is_open else None
    )
    cams = []
    for cam in summary.cameras:
        entry = cam.to_json()
        entry["live_url"] = f"/v1/live/{sid}/{cam.camera_id}"
        # Every part of every run in seq order: the recorded player plays them in turn.
        entry["recordings"] = [
            dict(part.to_json(), url=f"/recordings/{sid}/{part.file}", run=i)
            for i, run in enumerate(cam.runs)
            for part in run.parts
        ]
        cams.append(entry)
    doc["cameras"] = cams
    doc["damaged"] = None
    return doc


def _damaged_reason(store: RecordingStore, session_id: str) -> str | None:
    """Why the session's recording cannot be read (by its own name, not the server's
    path), or None if it can."""
    why = store.damaged.get(session_id)
    return None if why is None else why.replace(f"{store.root}{os.sep}", "")


async def _damaged_sessions(store: RecordingStore, ids: list[str]) -> list[dict[str, object]]:
    """The listing entries of damaged sessions (those still on disk): why, no cameras, and
    their folder's last change as ``opened_at`` (the time ``session.json`` held is lost)."""
    reasons = [(sid, why) for sid in ids if (why := _damaged_reason(store, sid)) is not None]

    def stat() -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for sid, why in reasons:
            try:
                changed = (store.root / sid).stat().st_mtime
            except FileNotFoundError:
                continue  # removed since: nothing left to list
            out.append(
                {
                    "session_id": sid,
                    "device_id": None,
                    "meta": {},
                    "opened_at": changed,
                    "closed_at": None,
                    "close_reason": None,
                    "open": False,
                    "cameras": [],
                    "damaged": why,
                    "expires_at": None,
                    "device_clock_offset_s": None,
                }
            )
        return out

    return await asyncio.to_thread(stat) if reasons else []


def _listing_key(doc: dict[str, object]) -> tuple[float, str]:
    """Where a listing entry sorts: as :meth:`RecordingStore.page` sorts (opened, id)."""
    opened = doc["opened_at"]
    return (float(opened) if isinstance(opened, int | float) else 0.0, str(doc["session_id"]))


async def _sessions(request: web.Request) -> web.Response:
    require(request, Role.OFFICER)
    query = request.query
    try:
        limit = int(query.get("limit", PAGE_DEFAULT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= PAGE_MAX:
        return _error(400, "bad_limit", f"limit must be a whole number from 1 to {PAGE_MAX}")
    before = None
    if "before" in query:
        before = _parse_cursor(query["before"])
        if before is None:
            return _error(400, "bad_cursor", "before must be a next cursor from this API")
    store = request.app[STORE_KEY]
    page = store.page(limit, before)
    clocks = request.app.get(CLOCKS_KEY)
    sessions = [_session_json(s, clocks) for s in page.sessions]
    if before is None and store.damaged:  # few and in need of attention: every first page
        damaged = await _damaged_sessions(store, list(store.damaged))
        sessions = sorted([*sessions, *damaged], key=_listing_key, reverse=True)
    body = {
        "sessions": sessions,
        "next": None if page.next is None else f"{page.next[0]!r}~{page.next[1]}",
    }
    return web.json_response(body, headers=_HEADERS)


def _parse_cursor(text: str) -> SessionKey | None:
    """``OPENED_AT~SESSION_ID`` (what ``next`` holds), or None if it is not one."""
    opened, _, sid = text.partition("~")
    try:
        at = float(opened)
        validate_session_id(sid)
    except (ValueError, InvalidIdError):
        return None
    return (at, sid) if math.isfinite(at) else None


async def _session(request: web.Request) -> web.Response:
    require(request, Role.OFFICER)
    store = request.app[STORE_KEY]
    try:
        sid = validate_session_id(request.match_info["session"])
        if sid in store.damaged and (found := await _damaged_sessions(store, [sid])):
            return web.json_response(found[0], headers=_HEADERS)
        summary = store.get(sid).summary()
    except ReceiverError as exc:
        return _from_exception(exc)
    return web.json_response(_session_json(summary, request.app.get(CLOCKS_KEY)), headers=_HEADERS)


async def _devices(request: web.Request) -> web.Response:
    require(request, Role.OFFICER)
    presence = request.app[PRESENCE_KEY]
    trust, now = request.app.get(TRUST_KEY), presence.clock()
    devices = presence.to_json()
    for entry in devices:
        entry["enrollment"] = None if trust is None else trust.expiry(str(entry["device"]), now)
    body = {"devices": devices, "offline_after_s": presence.offline_after_s}
    return web.json_response(body, headers=_HEADERS)


def _lookup(request: web.Request, camera_id: str) -> SessionSummary:
    """The session summary, after checking the session and camera exist."""
    sid = validate_session_id(request.match_info["session"])
    store = request.app[STORE_KEY]
    why = _damaged_reason(store, sid)
    if why is not None:
        raise CorruptRecordingError(
            f"session {sid!r}: its recording on this receiver is damaged ({why}); "
            "nothing of it can be played here"
        )
    summary = store.get(sid).summary()
    summary.camera(validate_camera_id(camera_id))
    return summary


async def _recording(request: web.Request) -> web.StreamResponse:
    user = require(request, Role.OFFICER)
    name = request.match_info["file"]
    parsed = parse_part_file(name)
    if parsed is None:
        return _error(404, "unknown_recording", f"no recording file {name!r}")
    try:
        summary = _lookup(request, parsed[0])
    except ReceiverError as exc:
        return _from_exception(exc)
    part = next((p for p in summary.camera(parsed[0]).parts if p.file == name), None)
    if part is None or not part.path.is_file():
        return _error(404, "unknown_recording", f"no recording file {name!r}")
    # Once per part per login, not per range request; sent once that is durable.
    logged = await request.app[_FETCHED_KEY].admit(
        request.app[ACCESS_LOG_KEY], (user.login, summary.session_id, name),
        "recording_fetch", who=user.name, role=str(user.role), login=user.login,
        session=summary.session_id, camera=parsed[0], remote=request.remote, file=name,
    )  # fmt: skip
    if not logged:
        detail = "the access log cannot be written now: no footage is sent without it"
        return _error(503, "access_log_unavailable", detail)
    headers = dict(_HEADERS, **{"Cache-Control": "no-cache", "Content-Type": "video/mp4"})
    return _WatchedFile(part.path, request.app[LOGIN_WATCH_KEY], headers=headers)


class _WatchedFile(web.FileResponse):
    """A part file whose transfer is cut (its connection dropped) if the login behind it
    no longer allows footage meanwhile: a player reads a large file lazily, as it plays."""

    def __init__(self, path: Path, watch: LoginWatch, *, headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._watch = watch

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if not isinstance(request, web.Request):
            return await super().prepare(request)
        with self._watch.watch(request, Role.OFFICER) as cut:
            return await until_cut(request, cut, super().prepare(request))


async def until_cut(request: web.Request, cut: asyncio.Future[Cut], sending: Awaitable[_T]) -> _T:
    """Await ``sending`` (a footage transfer of ``request``) unless ``cut`` resolves first:
    then drop the request's connection and raise :class:`TransferCut`."""
    task = asyncio.ensure_future(sending)
    try:
        await asyncio.wait((task, cut), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done():
        return task.result()
    why = cut.result()
    _LOG.info("recording transfer %s cut: %s", request.path, why.audit)
    if request.transport is not None:
        request.transport.abort()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await task
    raise TransferCut(f"recording transfer cut: {why.audit}")


class TransferCut(ConnectionResetError):
    """A footage transfer the receiver cut (:func:`until_cut`), its connection dropped."""


def _audit(
    request: web.Request, user: User, action: str, session: str, camera: str, **fields: object
) -> None:
    request.app[ACCESS_LOG_KEY].record(
        action,
        who=user.name,
        role=str(user.role),
        login=user.login,
        session=session,
        camera=camera,
        remote=request.remote,
        **fields,
    )


async def _live(request: web.Request) -> web.StreamResponse:
    user = require(request, Role.OFFICER)
    camera = request.match_info["camera"]
    try:
        summary = _lookup(request, camera)
    except ReceiverError as exc:
        return _from_exception(exc)
    feed = request.app[FEEDS_KEY](summary.session_id, camera)
    if feed is None or feed.closed:
        return _error(404, "not_live", f"camera {camera!r} is not live")
    ws = web.WebSocketResponse(heartbeat=15.0, max_msg_size=4096)
    if not ws.can_prepare(request).ok:
        return _error(426, "websocket_required", "connect with a WebSocket")
    await ws.prepare(request)
    sockets = request.app[_SOCKETS_KEY]
    sockets.add(ws)
    sid = summary.session_id
    _audit(request, user, "live_open", sid, camera)
    opened = time.monotonic()
    cut: Cut | None = None
    try:
        async with feed.subscribe() as sub:
            with request.app[LOGIN_WATCH_KEY].watch(request, Role.OFFICER) as verdict:
                tasks = (
                    asyncio.create_task(_pump(sub, ws), name=f"live {sid}/{camera}"),
                    asyncio.create_task(_close_when_cut(verdict, ws, request)),
                )
                try:
                    async for _msg in ws:
                        pass  # viewers send nothing; reading notices their close
                finally:
                    for task in tasks:
                        task.cancel()
                    for task in tasks:
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    if verdict.done():
                        cut = verdict.result()
    finally:
        sockets.discard(ws)
        await ws.close()
        duration = round(time.monotonic() - opened, 3)
        ended = {} if cut is None else {"cut": cut.audit}
        _audit(request, user, "live_close", sid, camera, duration_s=duration, **ended)
    return ws


async def _close_when_cut(
    verdict: asyncio.Future[Cut], ws: web.WebSocketResponse, request: web.Request
) -> None:
    """Close the live socket with the cut's code and reason when its login ends."""
    why = await verdict
    _LOG.info("live view %s cut: %s", request.path, why.audit)
    try:
        async with asyncio.timeout(_CUT_CLOSE_S):
            await ws.close(code=why.code, message=why.message.encode())
    except TimeoutError:  # a viewer that reads nothing: drop the connection
        if request.transport is not None:
            request.transport.abort()


async def _pump(sub: Subscription, ws: web.WebSocketResponse) -> None:
    """Send the subscription's data; close the socket when the feed ends."""
    try:
        async for data in sub:
            await ws.send_bytes(data)  # waits for the socket: a slow viewer falls behind
    except (ConnectionError, RuntimeError) as exc:
        _LOG.debug("live viewer went away: %r", exc)
    finally:
        if not ws.closed:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"live feed ended")


async def _stop_watch(app: web.Application) -> None:
    await app[LOGIN_WATCH_KEY].stop()


async def _close_sockets(app: web.Application) -> None:
    sockets = app[_SOCKETS_KEY]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
