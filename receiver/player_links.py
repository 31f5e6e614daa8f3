"""Player links: one camera's recording as HLS for VLC, ffplay or a video management system.

Players cannot log in, and the login cookie (``__Host-breakglass``) is
HttpOnly. A logged-in officer (any role) asks for a link to one camera of one
session::

    POST /api/sessions/{session}/cameras/{camera}/player-link   (CSRF header, Origin)
    optional body {"ttl_s": 3600}   (MIN_TTL_S .. MAX_TTL_S, default DEFAULT_TTL_S)
    -> {"url": "https://HOST:PORT/hls/SESSION/CAMERA.m3u8?t=TOKEN",
        "expires_at": seconds, "expires": ISO-8601, "ttl_s", "session", "camera", "link"}

The token is ``b64url(payload) "." b64url(HMAC-SHA256(key, ...))``; the
payload names the user, their role when the link was made, when it was made
(ms) and when it expires (s); the MAC also covers the session and the camera,
which the URL's path supplies. The key is 32 random bytes in
``DATA/player-links.key`` (mode 0600, made on first start). Nothing is stored
per link: a link is checked by recomputing its MAC (constant-time compare),
then its expiry, then the account as it is *now* (one indexed SELECT): a
link dies when it expires, when its user is removed, when they are disabled,
their password changes or their role stops including an earlier one after it
was made (for good: ``rights_lost``), or while their role does not include the
role they had when they made it. It does not die at logout: a player outlives
the browser tab that made its link. A part file transfer a link opened is
checked again (expiry and account) every :data:`receiver.viewer.LOGIN_RECHECK_S`
while it runs, and cut (its connection dropped) once the link no longer holds.

Where a link counts: only on ``GET``/``HEAD`` of the two HLS routes of its own
session and camera (the playlist and the camera's part files), and only when
the request has no live login session (:data:`receiver.auth.LINK_ROUTES`; the
deny-by-default middleware in :mod:`receiver.auth` calls :meth:`PlayerLinks.serve`
for those and nothing else). A request admitted by a link has no
:func:`receiver.auth.current_user`, so no ``require()`` anywhere can pass on it.
The playlist fetched with a link carries the token on every URI it lists
(:func:`receiver.hls.render_playlist`), so players fetch the segments with it.

Refusals are 401 JSON ``{"error": CODE, "detail"}``: ``bad_token`` (malformed,
forged, tampered, or for another session or camera), ``token_expired``,
``token_revoked`` (the user's rights changed).

Access log actions (the token itself is never written; ``link`` is the first
16 hex digits of its SHA-256): ``player_link_issue`` (who, session, camera,
``link``, ``expires``, ``ttl_s``), ``player_link_playlist`` and
``player_link_fetch`` (``file``: the first playlist or part file fetched with a
link, per link, address and file and receiver run; written before a byte of it
is sent), ``player_link_refused`` (``code``; once per link, or per address for a
bad token, and code).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from aiohttp.web_request import BaseRequest

from agent.statefile import fsync_dir, write_atomic
from provisioning.keys import read_small
from receiver.access_log import ACCESS_LOG_KEY, FootageLog, iso_ms
from receiver.accounts import AccountInfo, Role, UnknownAccountError, validate_name
from receiver.auth import AUTH_KEY, HEADERS, LINK_PARAM, admit_link, require
from receiver.errors import ReceiverError
from receiver.hls import on_sending, requested_camera, watch_transfer
from receiver.summaries import parse_part_file, validate_camera_id, validate_session_id
from receiver.viewer import CLOSE_LOGIN_ENDED, LOGIN_WATCH_KEY, Cut

__all__ = [
    "DEFAULT_TTL_S",
    "KEY_FILE",
    "MAX_TTL_S",
    "MIN_TTL_S",
    "PLAYER_LINKS_KEY",
    "LinkRefused",
    "PlayerLink",
    "PlayerLinks",
    "QueryFreeAccessLogger",
    "setup_player_links",
]

log = logging.getLogger(__name__)

KEY_FILE: Final = "player-links.key"
DEFAULT_TTL_S: Final = 3600
MIN_TTL_S: Final = 60
#: A shift, like a login's absolute lifetime (receiver.accounts.SessionPolicy).
MAX_TTL_S: Final = 12 * 3600
#: Longer than any token the receiver makes (a user name is at most 64 characters).
MAX_TOKEN: Final = 512
_TOKEN = re.compile(r"([A-Za-z0-9_-]{16,400})\.([A-Za-z0-9_-]{43})")
_NUMBER = re.compile(r"[0-9]{1,16}")
_VERSION = "1"
_MAC_CONTEXT = b"breakglass player link\n"
_MAX_BODY = 1024
_MAX_REMEMBERED = 10_000

_Remembered = OrderedDict[tuple[str, str], None]


class LinkRefused(ReceiverError):
    """A player link that does not open this request; ``code`` says why."""

    def __init__(self, code: str, detail: str, link: PlayerLink | None = None) -> None:
        super().__init__(detail)
        self.code = code
        #: The link, when its MAC held (so the refusal can name its user).
        self.link = link


@dataclass(frozen=True, slots=True)
class PlayerLink:
    """A link's claims, once its MAC has been checked (or just made)."""

    name: str
    role: Role
    session: str
    camera: str
    issued_ms: int
    expires: int
    token: str

    @property
    def handle(self) -> str:
        """What the access log names the link by (never the token)."""
        return link_handle(self.token)


def link_handle(token: str) -> str:
    """16 hex digits of the token's SHA-256."""
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes, session: str, camera: str) -> bytes:
    message = b"\n".join([_MAC_CONTEXT + payload, session.encode(), camera.encode()])
    return hmac.new(key, message, hashlib.sha256).digest()


def load_or_make_key(path: Path) -> bytes:
    """The receiver's player-link key: 32 random bytes (hex) in ``path``, mode 0600.

    Made on first use, atomically (written beside it, then linked in place only
    if no other process made one first). A file readable by others is refused.
    """
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
        write_atomic(tmp, secrets.token_hex(32).encode() + b"\n")
        try:
            os.link(tmp, path)
            log.info("made the player-link key %s", path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
        fsync_dir(path.parent)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"player-link key {path}: mode {mode:04o} is too open, expected 0600")
    text = read_small(path, "player-link key").decode("ascii", "replace").strip()
    if re.fullmatch(r"[0-9a-f]{64}", text) is None:
        raise ValueError(f"player-link key {path}: expected 64 hex digits")
    return bytes.fromhex(text)


class PlayerLinks:
    """Makes and checks player links (the key is loaded when the application starts)."""

    def __init__(
        self,
        key_path: Path,
        *,
        clock: Callable[[], float] = time.time,
        max_ttl_s: int = MAX_TTL_S,
    ) -> None:
        self.key_path = Path(key_path)
        #: Wall seconds; links are made and expire on it.
        self.clock = clock
        self.max_ttl_s = max_ttl_s
        self._key: bytes | None = None
        self._played = FootageLog(keep=_MAX_REMEMBERED)
        self._refused: _Remembered = OrderedDict()

    def load(self) -> None:
        """Read (or make) the key."""
        self._key = load_or_make_key(self.key_path)

    @property
    def key(self) -> bytes:
        if self._key is None:
            raise RuntimeError("the player-link key is not loaded")
        return self._key

    # -- tokens (sans-IO) ----------------------------------------------------------

    def mint(self, name: str, role: Role, session: str, camera: str, ttl_s: int) -> PlayerLink:
        """A link to ``camera`` of ``session`` for ``name``, valid ``ttl_s`` seconds from now."""
        if not MIN_TTL_S <= ttl_s <= self.max_ttl_s:
            raise ValueError(f"ttl_s: {MIN_TTL_S}..{self.max_ttl_s} seconds")
        now = self.clock()
        issued_ms, expires = int(now * 1000), int(now) + ttl_s
        fields = [_VERSION, validate_name(name), str(Role(role)), str(issued_ms), str(expires)]
        payload = "\n".join(fields).encode()
        token = f"{_b64(payload)}.{_b64(_mac(self.key, payload, session, camera))}"
        return PlayerLink(name, Role(role), session, camera, issued_ms, expires, token)

    def check(self, token: str, session: str, camera: str) -> PlayerLink:
        """The unexpired link ``token`` for ``camera`` of ``session``; else :class:`LinkRefused`.

        The account is not looked at here (:meth:`check_account`).
        """
        m = _TOKEN.fullmatch(token) if len(token) <= MAX_TOKEN else None
        if m is None:
            raise LinkRefused("bad_token", "the player link's token is malformed")
        try:
            payload, mac = _unb64(m.group(1)), _unb64(m.group(2))
        except ValueError:  # a length base64 cannot have
            raise LinkRefused("bad_token", "the player link's token is malformed") from None
        if not hmac.compare_digest(mac, _mac(self.key, payload, session, camera)):
            raise LinkRefused("bad_token", "the player link is not valid for this recording")
        try:
            version, name, role, issued, expires = payload.decode("ascii").split("\n")
            numbers = _NUMBER.fullmatch(issued) and _NUMBER.fullmatch(expires)
            if version != _VERSION or not numbers:
                raise ValueError(version)
            link = PlayerLink(
                validate_name(name), Role(role), session, camera, int(issued), int(expires), token
            )
        except ValueError:  # a MAC over this needs our key: a bug, or an older format
            raise LinkRefused("bad_token", "the player link's token is malformed") from None
        if link.expires - link.issued_ms // 1000 > self.max_ttl_s + 1:
            raise LinkRefused("bad_token", "the player link lasts too long", link)
        if self.clock() >= link.expires:
            raise LinkRefused("token_expired", "the player link expired; ask for a new one", link)
        return link

    @staticmethod
    def check_account(link: PlayerLink, account: AccountInfo) -> None:
        """:class:`LinkRefused` (``token_revoked``) unless the account keeps the link's rights."""
        role = account.role
        if account.disabled:
            raise LinkRefused("token_revoked", "the account of this player link is disabled", link)
        if account.password_changed * 1000 > link.issued_ms:
            raise LinkRefused(
                "token_revoked", "the password of this link's account changed since", link
            )
        if account.rights_lost * 1000 > link.issued_ms:
            raise LinkRefused(
                "token_revoked", "this link's account was disabled or lost its role since", link
            )
        if not role.includes(link.role) or not role.includes(Role.OFFICER):
            raise LinkRefused("token_revoked", "the role of this link's account was lowered", link)

    # -- the gate (called by receiver.auth's middleware) ------------------------------

    async def serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Admit ``request`` (an HLS route, no login) by its link, or answer 401."""
        session, camera = _scope(request)
        tokens = request.query.getall(LINK_PARAM, [])
        try:
            if session is None or camera is None or len(tokens) != 1:
                raise LinkRefused("bad_token", "one player link token (t=) for a recording")
            link = self.check(tokens[0], session, camera)
            role = (await self._account(request, link)).role
        except LinkRefused as exc:
            self._refused_entry(request, exc, session, camera)
            body = {"error": exc.code, "detail": str(exc)}
            return web.json_response(body, status=401, headers=HEADERS)
        admit_link(request, link.token)
        name = request.path.rpartition("/")[2]

        async def audit(request: web.Request) -> bool:
            # Once per link, address and file: a link used from a new address is seen,
            # and a part file fetched without its playlist is footage too. Called by the
            # HLS route just before it sends: a player that hangs up is logged too.
            playlist = name.endswith(".m3u8")
            return await self._played.admit(
                request.app[ACCESS_LOG_KEY], (link.handle, f"{request.remote} {name}"),
                "player_link_playlist" if playlist else "player_link_fetch",
                who=link.name, role=str(role),
                session=link.session, camera=link.camera, remote=request.remote,
                link=link.handle, **({} if playlist else {"file": name}),
            )  # fmt: skip

        on_sending(request, audit)
        logins = request.app.get(LOGIN_WATCH_KEY)
        if logins is not None:
            check = (link.handle, lambda: self.recheck(request, link))
            watch_transfer(request, lambda: logins.watch(request, role, check=check))
        return await handler(request)

    async def _account(self, request: web.Request, link: PlayerLink) -> AccountInfo:
        """The link's account as it is now; :class:`LinkRefused` unless it keeps the link."""
        auth = request.app[AUTH_KEY]
        try:
            account = await auth.db(auth.accounts.get, link.name)
        except UnknownAccountError:
            raise LinkRefused("token_revoked", "the link's account is gone", link) from None
        self.check_account(link, account)
        return account

    async def recheck(self, request: web.Request, link: PlayerLink) -> Cut | None:
        """Why a transfer ``link`` opened must stop now (expired or revoked), or None."""
        try:
            if self.clock() >= link.expires:
                raise LinkRefused("token_expired", "the player link expired", link)
            await self._account(request, link)
        except LinkRefused as exc:
            return Cut(CLOSE_LOGIN_ENDED, exc.code, str(exc))
        return None

    def _refused_entry(
        self, request: web.Request, exc: LinkRefused, session: str | None, camera: str | None
    ) -> None:
        link = exc.link
        key = link.handle if link is not None else f"address {request.remote}"
        if not _first(self._refused, (key, exc.code)):
            return  # a player retrying its expired link says it once
        request.app[ACCESS_LOG_KEY].record(
            "player_link_refused", who=link.name if link else None,
            role=str(link.role) if link else None, session=session, camera=camera,
            remote=request.remote, code=exc.code, link=link.handle if link else None,
        )  # fmt: skip

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp ``cleanup_ctx``: load (or make) the key before serving."""
        await asyncio.to_thread(self.load)
        yield


def _first(remembered: _Remembered, key: tuple[str, str]) -> bool:
    """Whether ``key`` is new (it is remembered from now on; the oldest are forgotten)."""
    if key in remembered:
        return False
    remembered[key] = None
    while len(remembered) > _MAX_REMEMBERED:
        remembered.popitem(last=False)
    return True


def _scope(request: web.Request) -> tuple[str | None, str | None]:
    """The session and camera an HLS request is for (None where not a valid id)."""
    try:
        session = validate_session_id(request.match_info.get("session", ""))
    except ReceiverError:
        return None, None
    if "camera" in request.match_info:
        camera: str | None = request.match_info["camera"]
    else:
        part = parse_part_file(request.match_info.get("file", ""))
        camera = part[0] if part else None
    try:
        return session, validate_camera_id(camera or "")
    except ReceiverError:
        return session, None


# -- issuing a link -----------------------------------------------------------------------

PLAYER_LINKS_KEY: Final = web.AppKey("breakglass.player_links", PlayerLinks)


def setup_player_links(app: web.Application, links: PlayerLinks) -> None:
    """Add the link route and open the HLS routes to links (after setup_auth and setup_hls)."""
    app[PLAYER_LINKS_KEY] = links
    app[AUTH_KEY].links = links
    app.cleanup_ctx.append(links.ctx)
    app.router.add_post("/api/sessions/{session}/cameras/{camera}/player-link", _issue)


def _error(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers=HEADERS)


async def _ttl(request: web.Request, links: PlayerLinks) -> int:
    """``ttl_s`` of the (optional) JSON body; ValueError if unusable."""
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise ValueError("the body is too large")
    if not raw.strip():
        return DEFAULT_TTL_S
    body = json.loads(raw)
    ttl = body.get("ttl_s", DEFAULT_TTL_S) if isinstance(body, dict) else None
    if type(ttl) is not int or not MIN_TTL_S <= ttl <= links.max_ttl_s:
        raise ValueError(f"ttl_s: whole seconds, {MIN_TTL_S}..{links.max_ttl_s}")
    return ttl


async def _issue(request: web.Request) -> web.Response:
    user = require(request, Role.OFFICER)  # as the HLS routes themselves
    links = request.app[PLAYER_LINKS_KEY]
    try:
        entry, cam = await requested_camera(request)
        session, camera = entry.session_id, cam.camera_id
    except ReceiverError as exc:
        return _error(400 if isinstance(exc, ValueError) else 404, exc.code, str(exc))
    try:
        ttl = await _ttl(request, links)
    except ValueError as exc:
        return _error(400, "malformed", f'body: optional JSON {{"ttl_s"}}; {exc}')
    link = links.mint(user.name, user.role, session, camera, ttl)
    expires = iso_ms(link.expires)
    request.app[ACCESS_LOG_KEY].record(
        "player_link_issue", who=user.name, role=str(user.role), login=user.login,
        session=session, camera=camera, remote=request.remote, link=link.handle,
        expires=expires, ttl_s=ttl,
    )  # fmt: skip
    url = f"{request.scheme}://{request.host}/hls/{session}/{camera}.m3u8?{LINK_PARAM}={link.token}"
    body = {
        "url": url, "expires_at": link.expires, "expires": expires, "ttl_s": ttl,
        "session": session, "camera": camera, "link": link.handle,
    }  # fmt: skip
    return web.json_response(body, headers=HEADERS)


class QueryFreeAccessLogger(AbstractAccessLogger):
    """aiohttp's request log without query strings: a player link's token is a credential."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %s %.3fs "%s"',
            request.remote, request.method, request.path, response.status,
            response.body_length, time, request.headers.get("User-Agent", "-"),
        )  # fmt: skip
