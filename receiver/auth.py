"""Logins, sessions, CSRF and role checks for every route of the receiver.

:func:`setup_auth` installs a deny-by-default middleware: a request needs a
live login session unless its ``(method, path)`` is on the allow-list, which
holds only the login page and its two static files, ``POST /login`` and
whatever the server adds with :func:`allow_anonymous` (the device uplink,
which authenticates devices itself). Without a session an API or WebSocket
request gets 401 ``{"error": "unauthenticated"}`` and a page request is
redirected to ``/login``. Handlers check roles with :func:`require` (or the
:func:`requires` decorator) and learn who asks with :func:`current_user`;
a role that does not suffice gets 403 ``{"error": "forbidden"}``.

Sessions (:mod:`receiver.accounts`) travel in one cookie,
``__Host-breakglass`` (``Secure; HttpOnly; SameSite=Strict; Path=/``, no
``Domain``, no ``Max-Age``: the server decides when it ends). Every
state-changing request (POST, PUT, PATCH, DELETE) must carry the session's
CSRF token in ``X-CSRF-Token`` (compared in constant time) and an ``Origin``
that is the receiver's own; so must every WebSocket upgrade (Origin only) and
``POST /login`` (Origin only: there is no session yet). The page learns the
token from ``GET /v1/me`` or the login answer, both readable only same-origin.

Login attempts are limited per client address (``ip_failures`` failures in
``ip_window_s``, then 429 ``rate_limited`` before any password is checked;
an IPv6 address counts as its /64) and per name and address (the account
store's lockout, :class:`receiver.accounts.LockoutPolicy`: 429 ``locked``,
which a name locked for one address never answers another). At most
``hash_workers`` argon2 checks run at once, on their own threads; session
lookups run on another thread so a flood of logins never delays them.

Every login, failure, lockout, logout and account change is written to the
access log (:mod:`receiver.access_log`).

One exception to the cookie: a *player link* (:mod:`receiver.player_links`),
``?t=TOKEN``, stands in for it on ``GET``/``HEAD`` of exactly the routes in
:data:`LINK_ROUTES` (a recording's HLS playlist and part files) when the
request has no live session. The middleware hands such a request to
``Auth.links`` (a :class:`LinkGate`), which admits it or answers 401. Such a
request has no :func:`current_user`, so :func:`require` refuses it anywhere.

Routes added: ``GET /login``, ``GET /static/login.js``, ``GET
/static/login.css``, ``POST /login`` (JSON ``{"name", "password"}`` or a
form; JSON answers ``{"user", "role", "csrf_token"}``, a form is redirected
to ``/`` or back to ``/login?error=CODE``), ``POST /logout``, ``GET /v1/me``,
and the account pages and API of :mod:`receiver.accounts_api` (a user's own
password; the admins' ``/v1/users`` endpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from receiver.access_log import ACCESS_LOG_KEY, AccessLog
from receiver.accounts import (
    AccountStore,
    CredentialsChangedError,
    LoginOutcome,
    LoginResult,
    Role,
    address_key,
    validate_name,
)

__all__ = [
    "AUTH_KEY",
    "COOKIE",
    "CSRF_HEADER",
    "LINK_PARAM",
    "LINK_ROUTES",
    "Auth",
    "AuthSettings",
    "LinkGate",
    "User",
    "admit_link",
    "allow_anonymous",
    "current_user",
    "link_token",
    "require",
    "requires",
    "setup_auth",
]

log = logging.getLogger(__name__)

COOKIE = "__Host-breakglass"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MAX_FIELD = 1024

#: The query parameter of a player link, and the only routes (GET, HEAD) it may open.
LINK_PARAM: Final = "t"
LINK_ROUTES: Final = frozenset({"/hls/{session}/{camera}.m3u8", "/hls/{session}/{file}"})

_STATIC_DIR = Path(__file__).parent / "static"
_LOGIN_FILES = {
    "/login": ("login.html", "text/html"),
    "/static/login.js": ("login.js", "text/javascript"),
    "/static/login.css": ("login.css", "text/css"),
}
_LOGIN_CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # a same-origin POST must carry its Origin
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Per-address login limits, the hashing threads and extra trusted origins."""

    #: Failed logins from one client address within ``ip_window_s`` before 429.
    ip_failures: int = 20
    ip_window_s: float = 300.0
    #: Addresses tracked at once (the oldest are forgotten first).
    max_addresses: int = 10_000
    #: argon2 checks at once (each holds 64 MiB by default).
    hash_workers: int = 2
    #: Origins accepted besides the receiver's own (``https://HOST:PORT`` of the
    #: request), e.g. the name a reverse proxy serves it under.
    extra_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class User:
    """Who is asking: the account, its role now, and the login session's handle."""

    name: str
    role: Role
    #: Public handle of the login session (what audit entries name).
    login: str
    csrf: str

    def to_json(self) -> dict[str, object]:
        """The ``GET /v1/me`` answer."""
        return {"user": self.name, "role": str(self.role), "csrf_token": self.csrf}


_T = TypeVar("_T")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LinkGate(Protocol):
    """Lets a player link open one of :data:`LINK_ROUTES` (``receiver.player_links``)."""

    async def serve(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Call ``handler`` if the request's link admits it (see :func:`admit_link`), else 401."""


class _AddressLimiter:
    """Failed logins per client address in a sliding window (an IPv6 address counts as
    its /64: :func:`receiver.accounts.address_key`)."""

    def __init__(self, settings: AuthSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._pending: Counter[str] = Counter()  # checks under way, per address

    def _recent(self, address: str) -> deque[float]:
        address = address_key(address)
        now = self.clock()
        times = self._failures.get(address)
        if times is None:
            return deque()
        while times and times[0] <= now - self.settings.ip_window_s:
            times.popleft()
        return times

    def allowed(self, address: str) -> bool:
        """Whether ``address`` may try to log in now (its attempts under way count)."""
        pending = self._pending[address_key(address)]
        return len(self._recent(address)) + pending < self.settings.ip_failures

    @contextlib.contextmanager
    def attempt(self, address: str) -> Iterator[bool]:
        """One password check from ``address``: yields whether it may go on; while it runs
        it counts against the allowance, so attempts sent at once (each waits for the
        password hash) cannot check more passwords than the allowance."""
        may = self.allowed(address)
        key = address_key(address)
        if may:
            self._pending[key] += 1
        try:
            yield may
        finally:
            if may:
                self._pending[key] -= 1
                if self._pending[key] <= 0:
                    del self._pending[key]

    def failed(self, address: str) -> bool:
        """Count a failure; whether this one used up the address's allowance."""
        times = self._recent(address)
        times.append(self.clock())
        key = address_key(address)
        self._failures[key] = times
        self._failures.move_to_end(key)
        while len(self._failures) > self.settings.max_addresses:
            self._failures.popitem(last=False)
        return len(times) == self.settings.ip_failures

    def retry_after(self, address: str) -> float:
        times = self._recent(address)
        return max(1.0, times[0] + self.settings.ip_window_s - self.clock()) if times else 1.0


class Auth:
    """The receiver's logins: accounts, sessions, the access log and the limits."""

    def __init__(
        self,
        accounts: AccountStore,
        access_log: AccessLog,
        settings: AuthSettings | None = None,
    ) -> None:
        self.accounts = accounts
        self.access_log = access_log
        self.settings = settings or AuthSettings()
        self.limiter = _AddressLimiter(self.settings, accounts.clock)
        self.anonymous: set[tuple[str, str]] = {("GET", p) for p in _LOGIN_FILES}
        self.anonymous.add(("POST", "/login"))
        self._files: dict[str, tuple[bytes, str]] = {}
        self._db: ThreadPoolExecutor | None = None
        self._hash: ThreadPoolExecutor | None = None
        self._hash_slots = asyncio.Semaphore(self.settings.hash_workers)
        #: Player links, when the server offers them (:mod:`receiver.player_links`).
        self.links: LinkGate | None = None

    # -- lifecycle -----------------------------------------------------------

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp ``cleanup_ctx``: the store, the log and the worker threads."""
        for path, (name, mime) in _LOGIN_FILES.items():
            self._files[path] = ((_STATIC_DIR / name).read_bytes(), mime)
        self._db = ThreadPoolExecutor(1, thread_name_prefix="accounts-db")
        self._hash = ThreadPoolExecutor(
            self.settings.hash_workers, thread_name_prefix="password-hash"
        )
        try:
            await self.db(self.accounts.open)
            self.access_log.start()
            warm = asyncio.get_running_loop().run_in_executor(self._hash, self.accounts.warm_up)
            try:
                yield
            finally:
                await warm
        finally:
            await asyncio.to_thread(self._hash.shutdown)
            await asyncio.to_thread(self._db.shutdown)
            self.accounts.close()
            await asyncio.to_thread(self.access_log.close)

    async def db(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a quick account-store call on the database thread."""
        if self._db is None:
            raise RuntimeError("the receiver's accounts are not open")
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def slow(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run an argon2 call (login, password change) on a hashing thread."""
        if self._hash is None:
            raise RuntimeError("the receiver's accounts are not open")
        async with self._hash_slots:
            return await asyncio.get_running_loop().run_in_executor(self._hash, fn, *args)

    async def user_of(self, request: web.Request) -> User | None:
        """The user whose session cookie ``request`` carries, if the session is live."""
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        info = await self.db(self.accounts.lookup_session, token)
        if info is None:
            return None
        return User(info.name, info.role, info.handle, info.csrf)

    def password_failed(self, action: str, result: LoginResult, remote: str, **who: Any) -> None:
        """Audit a refused password as ``action`` (with its reason and any lockout it
        started) and count it against the client address (``who``: the entry's who/role)."""
        audit = self.access_log
        audit.record(action, remote=remote, reason=result.outcome, **who)
        if result.locked_now:
            audit.record("login_lockout", remote=remote, until=result.locked_until, **who)
        if self.limiter.failed(remote):
            audit.record("login_rate_limited", who=None, remote=remote)

    def lock_remaining(self, result: LoginResult) -> float:
        """Seconds until the lock of a ``LOCKED`` (or ``THROTTLED``) result ends (at least 1)."""
        return max(1.0, (result.locked_until or 0) - self.accounts.clock())

    def origin_ok(self, request: web.Request) -> bool:
        """Whether the request's ``Origin`` is the receiver's own (or a configured one)."""
        origin = request.headers.get(hdrs.ORIGIN)
        if not origin:
            return False
        own = f"{request.scheme}://{request.host}"
        return hmac.compare_digest(origin, own) or origin in self.settings.extra_origins


AUTH_KEY = web.AppKey("breakglass.auth", Auth)
_USER_KEY = web.RequestKey("breakglass.user", User)
_LINK_KEY = web.RequestKey("breakglass.player_link", str)


def setup_auth(app: web.Application, auth: Auth) -> None:
    """Install the login routes, the deny-by-default middleware and the access log."""
    app[AUTH_KEY] = auth
    app[ACCESS_LOG_KEY] = auth.access_log
    app.middlewares.append(_middleware)
    app.cleanup_ctx.append(auth.ctx)
    for path in _LOGIN_FILES:
        app.router.add_get(path, _login_file)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/v1/me", _me)
    from receiver.accounts_api import setup_accounts_api  # it builds on this module

    setup_accounts_api(app)


def allow_anonymous(app: web.Application, method: str, path: str) -> None:
    """Put one more exact ``(method, path)`` on the allow-list (e.g. the device uplink)."""
    app[AUTH_KEY].anonymous.add((method.upper(), path))


def current_user(request: web.Request) -> User | None:
    """Who is logged in on this request (None on an anonymous route)."""
    return request.get(_USER_KEY)


def admit_link(request: web.Request, token: str) -> None:
    """Mark ``request`` as admitted by the player link ``token`` (for its LinkGate)."""
    request[_LINK_KEY] = token


def link_token(request: web.Request) -> str | None:
    """The token of the player link that admitted ``request`` (None: a login, or anonymous)."""
    return request.get(_LINK_KEY)


def _json_error(cls: type[web.HTTPException], code: str, detail: str, **extra: Any) -> Any:
    body = json.dumps({"error": code, "detail": detail, **extra})
    return cls(text=body, content_type="application/json", headers=HEADERS)


def require(request: web.Request, role: Role = Role.OFFICER) -> User:
    """The logged-in user if their role includes ``role``; raises 401 or 403 (JSON) if not."""
    user = current_user(request)
    if user is None:
        raise _json_error(web.HTTPUnauthorized, "unauthenticated", "log in first")
    if not user.role.includes(role):
        raise _json_error(web.HTTPForbidden, "forbidden", f"this needs the {role} role")
    return user


def requires(role: Role) -> Callable[[_Handler], _Handler]:
    """Decorator form of :func:`require` for a handler."""

    def wrap(handler: _Handler) -> _Handler:
        @functools.wraps(handler)
        async def checked(request: web.Request) -> web.StreamResponse:
            require(request, role)
            return await handler(request)

        return checked

    return wrap


def _error(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    return web.json_response(
        {"error": code, "detail": detail, **extra}, status=status, headers=HEADERS
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers=dict(HEADERS, Location=location))


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def _link_route(request: web.Request) -> bool:
    """Whether ``request`` may be opened by a player link (one of LINK_ROUTES, GET or HEAD)."""
    if request.method not in ("GET", "HEAD") or LINK_PARAM not in request.query:
        return False
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical in LINK_ROUTES and not _is_websocket(request)


def _wants_page(request: web.Request) -> bool:
    if request.method not in ("GET", "HEAD"):
        return False
    return request.path == "/" or "text/html" in request.headers.get(hdrs.ACCEPT, "")


@web.middleware
async def _middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    auth = request.app[AUTH_KEY]
    if (request.method, request.path) in auth.anonymous:
        if request.method in UNSAFE_METHODS and not auth.origin_ok(request):
            return _error(403, "bad_origin", "the request's Origin is not this receiver")
        return await handler(request)
    user = await auth.user_of(request)
    if user is None:
        if auth.links is not None and _link_route(request):
            return await auth.links.serve(request, handler)
        if not _is_websocket(request) and _wants_page(request):
            return _see_other("/login")
        return _error(401, "unauthenticated", "log in first")
    if (request.method in UNSAFE_METHODS or _is_websocket(request)) and not auth.origin_ok(request):
        return _error(403, "bad_origin", "the request's Origin is not this receiver")
    if request.method in UNSAFE_METHODS:
        # aiohttp decodes header bytes that are not UTF-8 as surrogates: encode them back.
        token = request.headers.get(CSRF_HEADER, "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(token, user.csrf.encode()):
            return _error(403, "csrf", f"missing or wrong {CSRF_HEADER} header")
    request[_USER_KEY] = user
    return await handler(request)


# -- login and logout ----------------------------------------------------------------


async def _login_file(request: web.Request) -> web.Response:
    body, mime = request.app[AUTH_KEY]._files[request.path]
    headers = dict(HEADERS)
    if mime == "text/html":
        headers["Content-Security-Policy"] = _LOGIN_CSP
    return web.Response(body=body, content_type=mime, charset="utf-8", headers=headers)


async def _credentials(request: web.Request) -> tuple[str, str, bool]:
    """(name, password, came from a form); 400 for anything else."""
    form = request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data")
    try:
        if form:
            data: Any = await request.post()
        elif request.content_type == "application/json":
            data = await request.json()
        else:
            raise _json_error(web.HTTPUnsupportedMediaType, "malformed", "send JSON or a form")
    except (ValueError, HttpProcessingError):  # a multipart body's broken part headers too
        raise _json_error(web.HTTPBadRequest, "malformed", "the body is not valid") from None
    except RecursionError:  # JSON nested deeper than the parser goes
        raise _json_error(
            web.HTTPBadRequest, "malformed", "the body is nested too deeply"
        ) from None
    name = data.get("name") if isinstance(data, dict) or form else None
    password = data.get("password") if isinstance(data, dict) or form else None
    if not isinstance(name, str) or not isinstance(password, str):
        raise _json_error(web.HTTPBadRequest, "malformed", "expected name and password")
    if len(name) > _MAX_FIELD or len(password) > _MAX_FIELD:
        raise _json_error(web.HTTPBadRequest, "malformed", "name or password too long")
    return name, password, form


def _audit_name(name: str) -> str | None:
    """The attempted name as the audit records it (None if it cannot be a name)."""
    try:
        return validate_name(name)
    except ValueError:
        return None  # perhaps a password typed in the wrong field: never logged


async def _login(request: web.Request) -> web.StreamResponse:
    auth = request.app[AUTH_KEY]
    remote = request.remote or "?"
    name, password, form = await _credentials(request)
    audit = auth.access_log
    with auth.limiter.attempt(remote) as may:
        if not may:
            retry = auth.limiter.retry_after(remote)
            return _refused(form, 429, "rate_limited", "too many failed logins", retry)
        check = functools.partial(auth.accounts.authenticate, remote=remote)
        result: LoginResult = await auth.slow(check, name, password)
        who = _audit_name(name)
        role = str(result.role) if result.role else None
        if result.outcome is not LoginOutcome.OK:
            auth.password_failed("login_failed", result, remote, who=who, role=role)
    if result.outcome is not LoginOutcome.OK:
        if result.outcome in (LoginOutcome.LOCKED, LoginOutcome.THROTTLED):
            retry = auth.lock_remaining(result)
            return _refused(form, 429, "locked", "too many failed logins; try later", retry)
        return _refused(form, 401, "invalid_credentials", "wrong name or password")
    old = request.cookies.get(COOKIE)
    if old:
        await auth.db(auth.accounts.end_session, old)
    start = functools.partial(auth.accounts.create_session, generation=result.generation)
    try:
        new = await auth.db(start, name, remote)
    except CredentialsChangedError:  # the password was reset while it was being checked
        audit.record("login_failed", who=name, role=role, remote=remote, reason="changed")
        return _refused(form, 401, "invalid_credentials", "wrong name or password")
    audit.record(
        "login", who=name, role=role, login=new.handle, remote=remote, rehashed=result.rehashed
    )
    resp: web.StreamResponse
    if form:
        resp = _see_other("/")
    else:
        body = {"user": name, "role": role, "csrf_token": new.csrf}
        resp = web.json_response(body, headers=HEADERS)
    resp.set_cookie(COOKIE, new.token, path="/", secure=True, httponly=True, samesite="Strict")
    return resp


def _refused(
    form: bool, status: int, code: str, detail: str, retry: float | None = None
) -> web.Response:
    if form:
        return _see_other(f"/login?error={code}")
    extra: dict[str, Any] = {}
    headers = dict(HEADERS)
    if retry is not None:
        extra["retry_after_s"] = round(retry)
        headers["Retry-After"] = str(round(retry))
    return web.json_response(
        {"error": code, "detail": detail, **extra}, status=status, headers=headers
    )


async def _logout(request: web.Request) -> web.Response:
    auth = request.app[AUTH_KEY]
    user = require(request)
    await auth.db(auth.accounts.end_session, request.cookies.get(COOKIE, ""))
    auth.access_log.record(
        "logout", who=user.name, role=str(user.role), login=user.login, remote=request.remote
    )
    resp = web.json_response({"ok": True}, headers=HEADERS)
    resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return resp


async def _me(request: web.Request) -> web.Response:
    return web.json_response(require(request).to_json(), headers=HEADERS)
