"""What police do besides watching: dispatch, evidence export, and the HLS audit.

Routes (every one needs a login; state changes need the CSRF header, both
enforced by :mod:`receiver.auth`'s middleware):

- ``POST /v1/dispatch`` (dispatcher): ``{"building", "action", "reason"}`` ->
  ``{"deliveries": [{"device", "status", ...the device's answer}]}``; the
  receiver signs the trigger with its dispatch key (:mod:`receiver.dispatch`).
  Errors: 400 ``malformed``, 409 ``no_device``.
- ``POST /v1/evidence/{session}`` (officer): the session's evidence bundle
  (:func:`receiver.evidence.build_bundle`), a zip download. The receiver keeps
  the copy it handed out in ``DATA/exports/SESSION/`` and logs its SHA-256, so the
  access log says exactly which bytes left, to whom. Exports run on threads of
  their own (:data:`EXPORT_THREADS`), never the shared pool the recordings'
  fsyncs run on: officers exporting long sessions at once must not hold up the
  acks of every device. More exports at once wait their turn. The bundle is
  sent only once its ``evidence_export`` entry is durable; a log that cannot
  be written within :data:`EXPORT_LOG_WAIT_S` withholds it (503
  ``access_log_unavailable``, the copy deleted, ``evidence_export_withheld``
  logged after it), as the CLI's export does. An export that would leave less
  than :data:`EXPORT_FREE_FLOOR_BYTES` free on the data disk is refused (507
  ``insufficient_storage``): the recordings need it more.

Every dispatch and every export goes into the access log (who, what, when,
the result; for a dispatch, per device, the receiver's time and the device's
time it signed the trigger at, and the device's clock offset used); each HLS
playlist a user opens, and each part file it fetches, is logged once per login
session and file, like the recordings the viewer fetches, and sent only once
that entry is durable (:class:`receiver.access_log.FootageLog`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from receiver.access_log import ACCESS_LOG_KEY, FootageLog
from receiver.accounts import Role
from receiver.auth import User, current_user, require
from receiver.dispatch import Dispatch, DispatchError
from receiver.errors import ReceiverError
from receiver.evidence import build_bundle, sha256_file
from receiver.evidence_format import EvidenceError
from receiver.hls import on_sending
from receiver.recording import folder_bytes, parse_part_file, validate_session_id
from receiver.retention import Retention

log = logging.getLogger(__name__)

DISPATCH_KEY: Final = web.AppKey("breakglass.dispatch", Dispatch)
DATA_KEY: Final = web.AppKey("breakglass.data_dir", Path)
RETENTION_KEY: Final = web.AppKey("breakglass.retention", Retention)
_HLS_SEEN_KEY: Final = web.AppKey("breakglass.hls_seen", FootageLog)
_EXPORTS_KEY: Final = web.AppKey("breakglass.export_threads", ThreadPoolExecutor)
MAX_BODY: Final = 2048
#: How long an export waits for its access-log entry to be durable before it is withheld.
EXPORT_LOG_WAIT_S: Final = 10.0
#: Evidence exports built at once (each reads a session's recordings, writes a zip).
EXPORT_THREADS: Final = 2
#: Free space an evidence export must leave on the data disk, beyond its own size: the
#: recordings of emergencies under way come first (each export keeps a copy there).
EXPORT_FREE_FLOOR_BYTES: Final = 1 << 30


def setup_police_api(
    app: web.Application, data_dir: Path, dispatch: Dispatch, retention: Retention
) -> None:
    """Add the routes and the HLS audit (after :func:`receiver.auth.setup_auth`)."""
    app[DISPATCH_KEY] = dispatch
    app[DATA_KEY] = Path(data_dir)
    app[RETENTION_KEY] = retention
    app[_HLS_SEEN_KEY] = FootageLog()
    app.router.add_post("/v1/dispatch", _dispatch)
    app.router.add_post("/v1/evidence/{session}", _evidence)
    app.middlewares.append(_audit_hls)
    app.cleanup_ctx.append(_export_threads)


async def _export_threads(app: web.Application) -> AsyncIterator[None]:
    pool = ThreadPoolExecutor(EXPORT_THREADS, thread_name_prefix="evidence-export")
    app[_EXPORTS_KEY] = pool
    yield
    # Exports under way finish (off the loop); ones still waiting are dropped.
    await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


def _error(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status)


async def _dispatch(request: web.Request) -> web.Response:
    user = require(request, Role.DISPATCHER)
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        return _error(413, "too_large", f"a dispatch request is at most {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return _error(400, "malformed", "body: a JSON object {building, action, reason}")
    journal = request.app[ACCESS_LOG_KEY]
    who = {"who": user.name, "role": str(user.role), "login": user.login}
    try:
        deliveries = await request.app[DISPATCH_KEY].send(
            building=body.get("building"),
            action=body.get("action"),
            reason=body.get("reason"),
            user=user.name,
        )
    except DispatchError as exc:
        journal.record(
            "dispatch_refused", **who, remote=request.remote, code=exc.code,
            building=str(body.get("building"))[:40], requested=str(body.get("action"))[:10],
        )  # fmt: skip
        return _error(409 if exc.code == "no_device" else 400, exc.code, exc.detail)
    journal.record(
        "dispatch", **who, remote=request.remote, building=body["building"],
        requested=body["action"], reason=str(body["reason"])[:200],
        results=[d.audit() for d in deliveries],
    )  # fmt: skip
    return web.json_response({"deliveries": [d.to_json() for d in deliveries]})


async def _evidence(request: web.Request) -> web.StreamResponse:
    user = require(request, Role.OFFICER)
    session = request.match_info["session"]
    try:
        validate_session_id(session)
    except ReceiverError as exc:
        return _error(400, "invalid_id", str(exc))
    data = request.app[DATA_KEY]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # A folder per session (its retention deletes it whole); a name of its own: two
    # exports in one second (a double click) must not share a file.
    out = data / "exports" / session / f"{session}-{stamp}-{user.name}-{secrets.token_hex(3)}.zip"
    loop, pool = asyncio.get_running_loop(), request.app[_EXPORTS_KEY]
    with request.app[RETENTION_KEY].hold(session):  # not deleted while it is exported
        try:
            await loop.run_in_executor(pool, _build, data, session, out)
        except _NoRoom as exc:
            log.error("evidence of %s for %s not built: %s", session, user.name, exc)
            return _error(507, "insufficient_storage", str(exc))
        except (EvidenceError, ReceiverError) as exc:
            log.error("evidence of %s for %s not built: %s", session, user.name, exc)
            missing = "no recording" in str(exc)  # the detail names no server path
            detail = f"no recording of session {session}" if missing else "the export failed"
            return _error(404 if missing else 409, "no_evidence", detail)
        return await _hand_out(request, user, session, out)


class _NoRoom(ReceiverError):
    """An export would leave the recordings too little room on the data disk."""


def _build(data: Path, session: str, out: Path) -> None:
    (data / "exports").mkdir(mode=0o700, exist_ok=True)
    # About the size of its recordings (remuxed, never re-encoded); refused before a
    # byte is written if it would eat into what live recording needs (ten exports of
    # one session at once took ten copies: an officer could fill the disk).
    size = folder_bytes(data / "recordings" / session)
    free = shutil.disk_usage(data / "exports").free
    if free < size + EXPORT_FREE_FLOOR_BYTES:
        raise _NoRoom(
            f"the export (about {size / 1e6:.0f} MB) would leave less than "
            f"{EXPORT_FREE_FLOOR_BYTES / 2**30:g} GiB free on the receiver's disk, which "
            "the recordings need; free space first (older exports are in DATA/exports)"
        )
    build_bundle(data, session, out)
    if not (data / "recordings" / session).is_dir():  # deleted (retention) meanwhile
        shutil.rmtree(out.parent, ignore_errors=True)
        raise ReceiverError(f"no recording of session {session!r} any more (deleted)")


async def _hand_out(
    request: web.Request, user: User, session: str, out: Path
) -> web.StreamResponse:
    """Log the built bundle ``out`` durably, then send it (or withhold it: 503)."""
    loop, pool = asyncio.get_running_loop(), request.app[_EXPORTS_KEY]
    digest = await loop.run_in_executor(pool, sha256_file, out)
    access_log = request.app[ACCESS_LOG_KEY]
    who = {"who": user.name, "role": str(user.role), "login": user.login}
    ticket = access_log.record(
        "evidence_export", **who, session=session, remote=request.remote, file=out.name,
        sha256=digest,
    )  # fmt: skip
    # A copy of footage leaves only once the log says who took it (as at the CLI).
    if not await access_log.durable(ticket, EXPORT_LOG_WAIT_S):
        access_log.record(
            "evidence_export_withheld", **who, session=session, remote=request.remote,
            file=out.name, reason="access_log_unavailable",
        )  # fmt: skip
        await loop.run_in_executor(pool, out.unlink)
        log.error(
            "evidence of %s for %s withheld: the access log is not written", session, user.name
        )
        detail = "the access log cannot be written now: no evidence is handed out without it"
        return _error(503, "access_log_unavailable", detail)
    log.warning("evidence of %s exported by %s (%s, sha256 %s)", session, user.name, out, digest)
    return web.FileResponse(
        out,
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{out.name}"',
            "Cache-Control": "no-store",
            "X-Evidence-SHA256": digest,
        },
    )


@web.middleware
async def _audit_hls(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log a login's HLS playlists and the part files it fetches through them (once per
    login session and camera, or part file: not per refresh or range request). A part
    file fetched directly, without its playlist, is footage too.

    The entry is written just before the route sends (:func:`receiver.hls.on_sending`),
    never after: a player that hangs up mid-transfer (to fetch the file in pieces it
    never lets finish) is on the log all the same; nothing is sent before the entry is
    durable. A request is marked seen only where it is logged, so no transfer, cut or
    not, leaves a later one of its file unlogged.
    """
    path = request.path
    user = current_user(request)
    if request.method != "GET" or not path.startswith("/hls/") or user is None:
        return await handler(request)
    session, _, name = path.removeprefix("/hls/").partition("/")
    if name.endswith(".m3u8"):
        action, camera, fields = "recording_playlist", name.removesuffix(".m3u8"), {}
    elif (parsed := parse_part_file(name)) is not None:
        action, camera, fields = "recording_fetch", parsed[0], {"file": name, "via": "hls"}
    else:
        return await handler(request)

    async def audit(request: web.Request) -> bool:
        return await request.app[_HLS_SEEN_KEY].admit(
            request.app[ACCESS_LOG_KEY], (user.login, session, name), action,
            who=user.name, role=str(user.role), login=user.login,
            session=session, camera=camera, remote=request.remote, **fields,
        )  # fmt: skip

    on_sending(request, audit)
    return await handler(request)
