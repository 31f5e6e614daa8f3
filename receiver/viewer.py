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
- ``GET /v1/devices`` — every device heard from, with its offline alarm (JSON:
  ``{"devices": [{device, building, connected, last_heard, offline, since,
  session}], "offline_after_s": N}``, times ISO-8601 UTC; ``since`` is when
  the device's present condition began: offline, connected or disconnected).
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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from aiohttp import WSCloseCode, web

from receiver.access_log import ACCESS_LOG_KEY
from receiver.accounts import Role
from receiver.auth import User, require
from receiver.errors import InvalidIdError, ReceiverError
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

__all__ = ["FEEDS_KEY", "PRESENCE_KEY", "STORE_KEY", "FeedLookup", "setup_viewer"]

_LOG = logging.getLogger(__name__)

#: Finds the live feed of ``(session_id, camera_id)``, or None if it is not live.
FeedLookup = Callable[[str, str], LiveFeed | None]

#: The recording store the viewer reads.
STORE_KEY = web.AppKey("breakglass.viewer.store", RecordingStore)
#: The live-feed lookup the viewer uses.
FEEDS_KEY: web.AppKey[FeedLookup] = web.AppKey("breakglass.viewer.feeds")
#: The devices' presence (last heard, offline alarm) the viewer shows.
PRESENCE_KEY = web.AppKey("breakglass.viewer.presence", Presence)
_SOCKETS_KEY: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("breakglass.viewer.sockets")
_FILES_KEY: web.AppKey[dict[str, tuple[bytes, str]]] = web.AppKey("breakglass.viewer.files")
#: (login handle, session, part file) already audited as fetched, oldest first.
_FETCHED_KEY: web.AppKey[OrderedDict[tuple[str, str, str], None]] = web.AppKey(
    "breakglass.viewer.fetched"
)
_MAX_FETCHED = 100_000
#: Closed sessions on a page of ``/api/sessions`` unless ``limit`` says, and at most.
PAGE_DEFAULT = 50
PAGE_MAX = 500

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


def _error(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers=_HEADERS)


def _from_exception(exc: ReceiverError) -> web.Response:
    status = 400 if isinstance(exc, InvalidIdError) else 404
    return _error(status, exc.code, str(exc))


def setup_viewer(
    app: web.Application,
    store: RecordingStore,
    feeds: FeedLookup,
    presence: Presence | None = None,
) -> None:
    """Add the viewer's routes to ``app``; ``feeds`` finds a camera's live feed.

    With ``presence``, ``GET /v1/devices`` lists the devices and their offline alarm.

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
    app[_SOCKETS_KEY] = set()
    app[_FILES_KEY] = files
    app[_FETCHED_KEY] = OrderedDict()
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/api/sessions", _sessions)
    app.router.add_get("/api/sessions/{session}", _session)
    if presence is not None:
        app[PRESENCE_KEY] = presence
        app.router.add_get("/v1/devices", _devices)
    app.router.add_get("/v1/live/{session}/{camera}", _live)
    app.router.add_get("/recordings/{session}/{file}", _recording)
    app.on_shutdown.append(_close_sockets)


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


def _session_json(summary: SessionSummary) -> dict[str, object]:
    doc = summary.to_json()
    sid = summary.session_id
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
    return doc


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
    page = request.app[STORE_KEY].page(limit, before)
    body = {
        "sessions": [_session_json(s) for s in page.sessions],
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
    try:
        sid = validate_session_id(request.match_info["session"])
        summary = request.app[STORE_KEY].get(sid).summary()
    except ReceiverError as exc:
        return _from_exception(exc)
    return web.json_response(_session_json(summary), headers=_HEADERS)


async def _devices(request: web.Request) -> web.Response:
    require(request, Role.OFFICER)
    presence = request.app[PRESENCE_KEY]
    body = {"devices": presence.to_json(), "offline_after_s": presence.offline_after_s}
    return web.json_response(body, headers=_HEADERS)


def _lookup(request: web.Request, camera_id: str) -> SessionSummary:
    """The session summary, after checking the session and camera exist."""
    sid = validate_session_id(request.match_info["session"])
    summary = request.app[STORE_KEY].get(sid).summary()
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
    fetched = request.app[_FETCHED_KEY]
    key = (user.login, summary.session_id, name)
    if key not in fetched:  # once per part per login, not per range request
        fetched[key] = None
        while len(fetched) > _MAX_FETCHED:
            fetched.popitem(last=False)
        _audit(request, user, "recording_fetch", summary.session_id, parsed[0], file=name)
    headers = dict(_HEADERS, **{"Cache-Control": "no-cache", "Content-Type": "video/mp4"})
    return web.FileResponse(part.path, headers=headers)


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
    try:
        async with feed.subscribe() as sub:
            pump = asyncio.create_task(_pump(sub, ws), name=f"live {summary.session_id}/{camera}")
            try:
                async for _msg in ws:
                    pass  # viewers send nothing; reading notices their close
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
    finally:
        sockets.discard(ws)
        await ws.close()
        duration = round(time.monotonic() - opened, 3)
        _audit(request, user, "live_close", sid, camera, duration_s=duration)
    return ws


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


async def _close_sockets(app: web.Application) -> None:
    sockets = app[_SOCKETS_KEY]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
