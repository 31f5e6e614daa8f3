"""Account management over HTTP: everyone's own password, the admins' accounts page and API.

Registered by :func:`receiver.auth.setup_auth` (its middleware has already
checked the session, the ``Origin`` and, for a POST, the CSRF token).

Pages (``Content-Security-Policy`` as the viewer's, no inline script):
``GET /password`` (every logged-in user: change one's own password) and
``GET /accounts`` (admins), with ``/static/password.js``,
``/static/accounts.js`` and ``/static/accounts.css``; both import the
viewer's ``/static/util.js`` and use ``/static/viewer.css``.

API (JSON bodies of at most :data:`MAX_BODY` bytes; errors are
``{"error": CODE, "detail"}``):

- ``POST /v1/me/password`` ``{"current", "new"}``: the current password is
  checked like a login (argon2 on a hashing thread, the address's rate limit,
  the name's lockout at this address: a wrong one counts as a failed login),
  the new one against :func:`check_password`. Success ends every session of
  the account, this one included (the answer clears the cookie): the user
  logs in again. If an admin set the password while the current one was
  being checked, nothing changes (401 ``unauthenticated``: that session
  ended with the reset).
  Codes: 403 ``wrong_password``, 429 ``locked`` / ``rate_limited`` (with
  ``Retry-After``), 400 ``weak_password`` / ``same_password`` / ``malformed``.
- Admins: ``GET /v1/users``; ``POST /v1/users`` ``{"name", "role",
  "password"}``; ``POST /v1/users/NAME/disable`` and ``.../enable``;
  ``POST /v1/users/NAME/role`` ``{"role"}``; ``POST
  /v1/users/NAME/password`` ``{"password"}`` (ends NAME's sessions, clears
  its locks); ``POST /v1/users/NAME/unlock`` (clears NAME's failure counts
  and locks at every address: ``{"name", "unlocked_addresses"}``). An
  admin cannot disable or demote themselves, nor set their own password
  here (409 ``self``: ``/v1/me/password`` asks for the current one), and no
  change may leave no enabled admin (409 ``last_admin``). 404
  ``unknown_account``, 400 ``invalid_name`` / ``weak_password`` /
  ``malformed``; others get 403 ``forbidden``.

Access log actions: ``password_change``, ``password_change_failed``
(``reason``), and ``login_lockout`` / ``login_rate_limited`` as for logins;
for admins ``user_add`` (``target``, ``target_role``), ``user_disable``,
``user_enable``, ``user_role`` (``target``, ``target_role``),
``user_passwd`` (``target``) and ``user_unlock`` (``target``,
``addresses``). No password ever goes into the log.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from receiver.accounts import (
    AccountError,
    AccountExistsError,
    AccountStore,
    CredentialsChangedError,
    LastAdminError,
    LoginOutcome,
    LoginResult,
    PasswordPolicyError,
    Role,
    UnknownAccountError,
    check_password,
    validate_name,
)
from receiver.auth import (
    _MAX_FIELD,
    AUTH_KEY,
    COOKIE,
    HEADERS,
    User,
    _error,
    _json_error,
    _refused,
    require,
)

__all__ = ["MAX_BODY", "setup_accounts_api"]

#: The largest JSON body the account endpoints read.
MAX_BODY: Final = 8 * 1024

_STATIC_DIR = Path(__file__).parent / "static"
_CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
#: path -> (file, MIME type, role needed).
_FILES: Final = {
    "/password": ("password.html", "text/html", Role.OFFICER),
    "/accounts": ("accounts.html", "text/html", Role.ADMIN),
    "/static/password.js": ("password.js", "text/javascript", Role.OFFICER),
    "/static/accounts.js": ("accounts.js", "text/javascript", Role.ADMIN),
    "/static/accounts.css": ("accounts.css", "text/css", Role.OFFICER),
}
_FILES_KEY: web.AppKey[dict[str, bytes]] = web.AppKey("breakglass.accounts_api.files")


def setup_accounts_api(app: web.Application) -> None:
    """Add the account pages and endpoints to ``app`` (after :func:`setup_auth`)."""
    app[_FILES_KEY] = {path: (_STATIC_DIR / f[0]).read_bytes() for path, f in _FILES.items()}
    for path in _FILES:
        app.router.add_get(path, _file)
    app.router.add_post("/v1/me/password", _own_password)
    app.router.add_get("/v1/users", _users)
    app.router.add_post("/v1/users", _user_add)
    app.router.add_post("/v1/users/{name}/{change:disable|enable}", _user_state)
    app.router.add_post("/v1/users/{name}/role", _user_role)
    app.router.add_post("/v1/users/{name}/password", _user_password)
    app.router.add_post("/v1/users/{name}/unlock", _user_unlock)


async def _file(request: web.Request) -> web.Response:
    _name, mime, role = _FILES[request.path]
    require(request, role)
    headers = dict(HEADERS)
    if mime == "text/html":
        headers["Content-Security-Policy"] = _CSP
    body = request.app[_FILES_KEY][request.path]
    return web.Response(body=body, content_type=mime, charset="utf-8", headers=headers)


# -- request bodies ----------------------------------------------------------------


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, at most MAX_BODY bytes; raises a JSON 400/413/415."""
    if request.content_type != "application/json":
        raise _json_error(web.HTTPUnsupportedMediaType, "malformed", "send JSON")
    too_large = web.HTTPRequestEntityTooLarge(
        max_size=MAX_BODY,
        actual_size=request.content_length or MAX_BODY + 1,
        text=json.dumps({"error": "too_large", "detail": f"at most {MAX_BODY} bytes"}),
        content_type="application/json",
        headers=HEADERS,
    )
    if (request.content_length or 0) > MAX_BODY:
        raise too_large
    raw = bytearray()
    async for chunk in request.content.iter_any():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise too_large
    try:
        data = json.loads(raw)
    except ValueError:
        raise _json_error(web.HTTPBadRequest, "malformed", "the body is not JSON") from None
    except RecursionError:  # nested deeper than the parser goes
        raise _json_error(
            web.HTTPBadRequest, "malformed", "the body is nested too deeply"
        ) from None
    if not isinstance(data, dict):
        raise _json_error(web.HTTPBadRequest, "malformed", "expected a JSON object")
    return data


def _text(data: dict[str, Any], field: str) -> str:
    """A non-empty string field of at most _MAX_FIELD characters; else a JSON 400."""
    value = data.get(field)
    if not isinstance(value, str) or not value or len(value) > _MAX_FIELD:
        detail = f"expected {field!r}: text of 1 to {_MAX_FIELD} characters"
        raise _json_error(web.HTTPBadRequest, "malformed", detail)
    return value


def _role(data: dict[str, Any]) -> Role:
    try:
        return Role(str(data["role"]))
    except (KeyError, ValueError):
        roles = "|".join(r.value for r in Role)
        raise _json_error(web.HTTPBadRequest, "malformed", f"expected role ({roles})") from None


def _target(request: web.Request) -> str:
    """The account named in the path; a JSON 400 if it cannot be a name."""
    try:
        return validate_name(request.match_info["name"])
    except AccountError as exc:
        raise _json_error(web.HTTPBadRequest, exc.code, str(exc)) from None


# -- one's own password ------------------------------------------------------------


def _verify_and_set(
    store: AccountStore, name: str, current: str, new: str, remote: str
) -> LoginResult:
    """Check ``current`` like a login (counted, locked); if right, set ``new`` (hashing
    thread) unless the password changed meanwhile (:class:`CredentialsChangedError`)."""
    result = store.authenticate(name, current, remote=remote, login=False)
    if result.outcome is LoginOutcome.OK:
        store.set_password(name, new, generation=result.generation)
    return result


async def _own_password(request: web.Request) -> web.Response:
    user = require(request)
    auth = request.app[AUTH_KEY]
    remote = request.remote or "?"
    data = await _body(request)
    current, new = _text(data, "current"), _text(data, "new")
    if not auth.limiter.allowed(remote):
        retry = auth.limiter.retry_after(remote)
        return _refused(False, 429, "rate_limited", "too many failed passwords", retry)
    if new == current:
        return _error(400, "same_password", "the new password must differ from the current one")
    try:
        check_password(new, user.name)
    except PasswordPolicyError as exc:
        return _error(400, exc.code, str(exc))
    who: dict[str, Any] = {"who": user.name, "role": str(user.role), "login": user.login}
    with auth.limiter.attempt(remote) as may:
        if not may:
            retry = auth.limiter.retry_after(remote)
            return _refused(False, 429, "rate_limited", "too many failed passwords", retry)
        try:
            result = await auth.slow(
                _verify_and_set, auth.accounts, user.name, current, new, remote
            )
        except UnknownAccountError:  # removed meanwhile (only the database file could)
            return _error(401, "unauthenticated", "log in first")
        except CredentialsChangedError:  # reset (or disabled) meanwhile: this session ended
            auth.access_log.record("password_change_failed", remote=remote, reason="changed", **who)
            return _error(401, "unauthenticated", "log in first")
        if result.outcome is not LoginOutcome.OK:
            auth.password_failed("password_change_failed", result, remote, **who)
    if result.outcome in (LoginOutcome.LOCKED, LoginOutcome.THROTTLED):
        retry = auth.lock_remaining(result)
        return _refused(False, 429, "locked", "too many wrong passwords; try later", retry)
    if result.outcome is LoginOutcome.DISABLED:
        return _error(401, "unauthenticated", "log in first")
    if result.outcome is not LoginOutcome.OK:
        return _error(403, "wrong_password", "the current password is wrong")
    auth.access_log.record("password_change", remote=remote, **who)
    body = {"ok": True, "logged_out": True, "detail": "every session ended: log in again"}
    resp = web.json_response(body, headers=HEADERS)
    resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return resp


# -- account management (admins) ---------------------------------------------------


def _audit(request: web.Request, admin: User, action: str, target: str, **fields: Any) -> None:
    request.app[AUTH_KEY].access_log.record(
        action,
        who=admin.name,
        role=str(admin.role),
        login=admin.login,
        remote=request.remote,
        target=target,
        **fields,
    )


def _self(detail: str) -> web.Response:
    return _error(409, "self", detail)


def _account_error(exc: AccountError) -> web.Response:
    if isinstance(exc, UnknownAccountError):
        return _error(404, exc.code, str(exc))
    if isinstance(exc, AccountExistsError | LastAdminError):
        return _error(409, exc.code, str(exc))
    return _error(400, exc.code, str(exc))


async def _users(request: web.Request) -> web.Response:
    require(request, Role.ADMIN)
    auth = request.app[AUTH_KEY]
    accounts = await auth.db(auth.accounts.accounts)
    now = auth.accounts.clock()
    return web.json_response({"users": [a.to_json(now) for a in accounts]}, headers=HEADERS)


async def _user_add(request: web.Request) -> web.Response:
    admin = require(request, Role.ADMIN)
    auth = request.app[AUTH_KEY]
    data = await _body(request)
    name, role, password = _text(data, "name"), _role(data), _text(data, "password")
    try:
        info = await auth.slow(auth.accounts.add, name, role, password)
    except AccountError as exc:
        return _account_error(exc)
    _audit(request, admin, "user_add", name, target_role=str(role))
    return web.json_response(info.to_json(auth.accounts.clock()), status=201, headers=HEADERS)


async def _user_state(request: web.Request) -> web.Response:
    admin = require(request, Role.ADMIN)
    auth = request.app[AUTH_KEY]
    name, change = _target(request), request.match_info["change"]
    disable = change == "disable"
    if disable and name == admin.name:
        return _self("you cannot disable your own account")
    try:
        await auth.db(functools.partial(auth.accounts.set_disabled, name, disable, keep_admin=True))
    except AccountError as exc:
        return _account_error(exc)
    _audit(request, admin, f"user_{change}", name)
    return web.json_response({"name": name, "disabled": disable}, headers=HEADERS)


async def _user_role(request: web.Request) -> web.Response:
    admin = require(request, Role.ADMIN)
    auth = request.app[AUTH_KEY]
    name = _target(request)
    role = _role(await _body(request))
    if name == admin.name and role is not Role.ADMIN:
        return _self("you cannot take the admin role from yourself; another admin can")
    try:
        await auth.db(functools.partial(auth.accounts.set_role, name, role, keep_admin=True))
    except AccountError as exc:
        return _account_error(exc)
    _audit(request, admin, "user_role", name, target_role=str(role))
    return web.json_response({"name": name, "role": str(role)}, headers=HEADERS)


async def _user_password(request: web.Request) -> web.Response:
    admin = require(request, Role.ADMIN)
    auth = request.app[AUTH_KEY]
    name = _target(request)
    password = _text(await _body(request), "password")
    if name == admin.name:
        return _self("change your own password on the password page: it asks for the current one")
    try:
        await auth.slow(auth.accounts.set_password, name, password)
    except AccountError as exc:
        return _account_error(exc)
    _audit(request, admin, "user_passwd", name)
    return web.json_response({"name": name, "sessions_ended": True}, headers=HEADERS)


async def _user_unlock(request: web.Request) -> web.Response:
    admin = require(request, Role.ADMIN)
    auth = request.app[AUTH_KEY]
    name = _target(request)
    try:
        locked = await auth.db(auth.accounts.unlock, name)
    except AccountError as exc:
        return _account_error(exc)
    _audit(request, admin, "user_unlock", name, addresses=locked)
    return web.json_response({"name": name, "unlocked_addresses": locked}, headers=HEADERS)
