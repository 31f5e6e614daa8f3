"""Account management over HTTP on the real receiver (TLS on 127.0.0.1, real argon2id).

Everyone's own password (``POST /v1/me/password``) and the admins' role,
password, disable and enable endpoints, with their self-protection and
access-log entries (:mod:`receiver.accounts_api`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from receiver.accounts import LastAdminError, Role
from receiver.auth import CSRF_HEADER
from receiver.server import Receiver
from tests.logins import (
    PASSWORD,
    access_entries,
    add_account,
    client_for,
    log_in,
    logged_in,
    strict_receiver,
)

pytestmark = pytest.mark.timeout(60)

NEW = "a fresh passphrase for spring"
RESET = "reset by the admin 2024 xyz"


@pytest.fixture
async def rx(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A receiver whose names lock after 3 failures; olivia, dana and ada (admin)."""
    async with strict_receiver(tmp_path / "receiver") as receiver:
        yield receiver


def access(rx: Receiver) -> list[dict[str, Any]]:
    """The access log's entries, after checking no password ever went into it."""
    entries = access_entries(rx)
    text = (rx.data_dir / "access.log").read_text()
    for secret in (PASSWORD, NEW, RESET, "not my password", "short"):
        assert secret not in text
    return entries


def actions(rx: Receiver, *names: str) -> list[tuple[Any, ...]]:
    """(action, who, target, reason) of the entries whose action is one of ``names``."""
    return [
        (e["action"], e["who"], e.get("target"), e.get("reason"))
        for e in access(rx)
        if e["action"] in names
    ]


async def call(
    http: aiohttp.ClientSession, rx: Receiver, path: str, body: Any = None, **kw: Any
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON (GET without one); (status, JSON answer)."""
    url = rx.url + path.lstrip("/")
    resp = await (http.post(url, json=body, **kw) if body is not None or kw else http.get(url))
    return resp.status, await resp.json()


async def login_status(rx: Receiver, name: str, password: str) -> int:
    async with client_for(rx.url, rx.fingerprint) as http:
        resp = await http.post(rx.url + "login", json={"name": name, "password": password})
        return resp.status


# -- one's own password -------------------------------------------------------------


async def test_changing_ones_password_ends_every_session(rx: Receiver) -> None:
    async with (
        logged_in(rx, Role.OFFICER, "olivia") as other,
        logged_in(rx, Role.OFFICER, "olivia") as http,
    ):
        before = await asyncio.to_thread(rx.accounts.get, "olivia")
        status, body = await call(http, rx, "/v1/me/password", {"current": PASSWORD, "new": NEW})
        assert (status, body["ok"], body["logged_out"]) == (200, True, True)
        # This session and the other one (another browser) are over.
        assert (await http.get(rx.url + "v1/me")).status == 401
        assert (await other.get(rx.url + "v1/me")).status == 401
        after = await asyncio.to_thread(rx.accounts.get, "olivia")
        assert after.last_login == before.last_login  # confirming a password is not a login
        assert after.password_changed > before.password_changed
    assert await login_status(rx, "olivia", PASSWORD) == 401
    assert await login_status(rx, "olivia", NEW) == 200
    (entry,) = [e for e in access(rx) if e["action"] == "password_change"]
    assert (entry["who"], entry["role"], entry["remote"]) == ("olivia", "officer", "127.0.0.1")
    assert len(entry["login"]) == 16


async def test_a_wrong_current_password_counts_as_a_failed_login(rx: Receiver) -> None:
    async with logged_in(rx, Role.OFFICER, "olivia") as http:
        assert await login_status(rx, "olivia", "not my password") == 401  # failure 1 of 3
        wrong = {"current": "not my password", "new": NEW}
        for _ in range(2):  # failures 2 and 3: the name locks
            status, body = await call(http, rx, "/v1/me/password", wrong)
            assert (status, body["error"]) == (403, "wrong_password")
        right = {"current": PASSWORD, "new": NEW}
        resp = await http.post(rx.url + "v1/me/password", json=right)
        body = await resp.json()
        assert (resp.status, body["error"]) == (429, "locked")  # even the right one, now
        assert 590 <= body["retry_after_s"] <= 600 and resp.headers["Retry-After"]
        assert await login_status(rx, "olivia", PASSWORD) == 429
        assert (await http.get(rx.url + "v1/me")).status == 200  # the session itself lives on
    assert actions(rx, "login_failed", "password_change_failed", "login_lockout") == [
        ("login_failed", "olivia", None, "invalid_credentials"),
        ("password_change_failed", "olivia", None, "invalid_credentials"),
        ("password_change_failed", "olivia", None, "invalid_credentials"),
        ("login_lockout", "olivia", None, None),
        ("password_change_failed", "olivia", None, "locked"),
        ("login_failed", "olivia", None, "locked"),
    ]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"current": PASSWORD, "new": "short"}, 400, "weak_password"),
        ({"current": PASSWORD, "new": "olivia is my name ok"}, 400, "weak_password"),
        ({"current": PASSWORD, "new": "password1234"}, 400, "weak_password"),
        ({"current": PASSWORD, "new": PASSWORD}, 400, "same_password"),
        ({"current": PASSWORD}, 400, "malformed"),
        ({"current": 12, "new": NEW}, 400, "malformed"),
        ({"current": PASSWORD, "new": "x" * 5000}, 400, "malformed"),
        ({"current": PASSWORD, "new": NEW, "pad": "x" * 9000}, 413, "too_large"),
        ([PASSWORD, NEW], 400, "malformed"),
    ],
)
async def test_bad_new_passwords_are_refused_uncounted(
    rx: Receiver, body: Any, status: int, code: str
) -> None:
    async with logged_in(rx, Role.OFFICER, "olivia") as http:
        got, answer = await call(http, rx, "/v1/me/password", body)
        assert (got, answer["error"]) == (status, code)
        assert (await http.get(rx.url + "v1/me")).status == 200
    info = await asyncio.to_thread(rx.accounts.get, "olivia")
    assert info.failures == 0
    assert await login_status(rx, "olivia", PASSWORD) == 200
    assert actions(rx, "password_change", "password_change_failed") == []


async def test_a_password_change_needs_the_csrf_token_and_the_origin(rx: Receiver) -> None:
    body = {"current": PASSWORD, "new": NEW}
    async with logged_in(rx, Role.OFFICER, "olivia") as http:
        status, answer = await call(http, rx, "/v1/me/password", body, headers={CSRF_HEADER: ""})
        assert (status, answer["error"]) == (403, "csrf")
        evil = {"Origin": "https://evil.example"}
        status, answer = await call(http, rx, "/v1/me/password", body, headers=evil)
        assert (status, answer["error"]) == (403, "bad_origin")
        form = await http.post(rx.url + "v1/me/password", data=body)
        assert (form.status, (await form.json())["error"]) == (415, "malformed")
    async with client_for(rx.url, rx.fingerprint) as anonymous:
        status, answer = await call(anonymous, rx, "/v1/me/password", body)
        assert (status, answer["error"]) == (401, "unauthenticated")
    assert await login_status(rx, "olivia", PASSWORD) == 200


# -- admins ------------------------------------------------------------------------------


async def test_an_admin_changes_a_role_and_sets_a_password(rx: Receiver) -> None:
    async with (
        logged_in(rx, Role.ADMIN, "ada") as admin,
        logged_in(rx, Role.OFFICER, "olivia") as officer,
    ):
        status, body = await call(admin, rx, "/v1/users/olivia/role", {"role": "dispatcher"})
        assert (status, body) == (200, {"name": "olivia", "role": "dispatcher"})
        me = await (await officer.get(rx.url + "v1/me")).json()
        assert me["role"] == "dispatcher"  # at her next request, same session

        status, body = await call(admin, rx, "/v1/users/olivia/password", {"password": RESET})
        assert (status, body) == (200, {"name": "olivia", "sessions_ended": True})
        assert (await officer.get(rx.url + "v1/me")).status == 401

        refusals = [
            ("/v1/users/olivia/password", {"password": "short"}, 400, "weak_password"),
            ("/v1/users/olivia/password", {}, 400, "malformed"),
            ("/v1/users/nobody/password", {"password": RESET}, 404, "unknown_account"),
            ("/v1/users/nobody/role", {"role": "admin"}, 404, "unknown_account"),
            ("/v1/users/olivia/role", {"role": "superuser"}, 400, "malformed"),
            ("/v1/users/olivia/role", {}, 400, "malformed"),
            ("/v1/users/Bad%20Name/role", {"role": "admin"}, 400, "invalid_name"),
            ("/v1/users/nobody/disable", None, 404, "unknown_account"),
        ]
        for path, request, want_status, code in refusals:
            status, body = await call(admin, rx, path, request if request is not None else {})
            assert (path, status, body["error"]) == (path, want_status, code)

        users = await (await admin.get(rx.url + "v1/users")).json()
        olivia = next(u for u in users["users"] if u["name"] == "olivia")
        assert olivia["role"] == "dispatcher" and olivia["locked_until"] is None
    assert await login_status(rx, "olivia", RESET) == 200
    entries = [e for e in access(rx) if e["action"] in ("user_role", "user_passwd")]
    assert [(e["action"], e["who"], e["target"], e.get("target_role")) for e in entries] == [
        ("user_role", "ada", "olivia", "dispatcher"),
        ("user_passwd", "ada", "olivia", None),
    ]
    assert all(e["role"] == "admin" and len(e["login"]) == 16 for e in entries)


async def test_an_admin_reset_clears_a_lockout(rx: Receiver) -> None:
    for _ in range(3):
        assert await login_status(rx, "olivia", "not my password") == 401
    async with logged_in(rx, Role.ADMIN, "ada") as admin:
        users = await (await admin.get(rx.url + "v1/users")).json()
        olivia = next(u for u in users["users"] if u["name"] == "olivia")
        assert olivia["locked"] and olivia["locked_until"] > 0
        status, _ = await call(admin, rx, "/v1/users/olivia/password", {"password": RESET})
        assert status == 200
    assert await login_status(rx, "olivia", RESET) == 200


async def test_an_admin_cannot_lock_themselves_out(rx: Receiver) -> None:
    async with logged_in(rx, Role.ADMIN, "ada") as admin:
        for path, body in [
            ("/v1/users/ada/disable", {}),
            ("/v1/users/ada/role", {"role": "dispatcher"}),
            ("/v1/users/ada/role", {"role": "officer"}),
            ("/v1/users/ada/password", {"password": RESET}),
        ]:
            status, answer = await call(admin, rx, path, body)
            assert (path, status, answer["error"]) == (path, 409, "self")
        status, _ = await call(admin, rx, "/v1/users/ada/role", {"role": "admin"})
        assert status == 200  # no change: allowed
        assert (await call(admin, rx, "/v1/me"))[1]["role"] == "admin"
        # Another admin can be demoted and disabled (ada remains).
        await add_account(rx.accounts, "root", Role.ADMIN)
        assert (await call(admin, rx, "/v1/users/root/role", {"role": "officer"}))[0] == 200
        assert (await call(admin, rx, "/v1/users/root/disable", {}))[0] == 200
        assert (await call(admin, rx, "/v1/users/root/enable", {}))[0] == 200
    info = await asyncio.to_thread(rx.accounts.get, "ada")
    assert (info.role, info.disabled) == (Role.ADMIN, False)
    assert actions(rx, "user_role", "user_disable", "user_enable") == [
        ("user_role", "ada", "ada", None),
        ("user_role", "ada", "root", None),
        ("user_disable", "ada", "root", None),
        ("user_enable", "ada", "root", None),
    ]


async def test_the_last_enabled_admin_stays(rx: Receiver) -> None:
    """The store's guard (the API uses it; a live admin session makes it hold there anyway)."""
    store = rx.accounts
    with pytest.raises(LastAdminError):
        await asyncio.to_thread(store.set_disabled, "ada", True, keep_admin=True)
    with pytest.raises(LastAdminError):
        await asyncio.to_thread(store.set_role, "ada", Role.DISPATCHER, keep_admin=True)
    await add_account(store, "root", Role.ADMIN)
    await asyncio.to_thread(store.set_disabled, "root", True)
    with pytest.raises(LastAdminError):  # a disabled admin does not count
        await asyncio.to_thread(store.set_role, "ada", Role.OFFICER, keep_admin=True)
    await asyncio.to_thread(store.set_disabled, "root", False)
    await asyncio.to_thread(store.set_role, "ada", Role.OFFICER, keep_admin=True)
    with pytest.raises(LastAdminError):
        await asyncio.to_thread(store.set_disabled, "root", True, keep_admin=True)
    await asyncio.to_thread(store.set_disabled, "ada", True, keep_admin=True)  # not an admin now
    assert (await asyncio.to_thread(store.get, "root")).role is Role.ADMIN


@pytest.mark.parametrize(("role", "name"), [(Role.OFFICER, "olivia"), (Role.DISPATCHER, "dana")])
async def test_others_cannot_manage_accounts(rx: Receiver, role: Role, name: str) -> None:
    async with logged_in(rx, role, name) as http:
        for path, body in [
            ("/v1/users", None),
            ("/v1/users", {"name": "eve", "role": "admin", "password": RESET}),
            ("/v1/users/ada/disable", {}),
            ("/v1/users/ada/enable", {}),
            ("/v1/users/ada/role", {"role": "officer"}),
            (f"/v1/users/{name}/role", {"role": "admin"}),
            ("/v1/users/ada/password", {"password": RESET}),
        ]:
            status, answer = await call(http, rx, path, body)
            assert (path, status, answer["error"]) == (path, 403, "forbidden")
        page = await http.get(rx.url + "accounts", headers={"Accept": "text/html"})
        assert page.status == 403
        assert (await http.get(rx.url + "static/accounts.js")).status == 403
        mine = await http.get(rx.url + "password", headers={"Accept": "text/html"})
        assert mine.status == 200
        assert "default-src 'self'" in mine.headers["Content-Security-Policy"]
        assert (await http.get(rx.url + "static/password.js")).status == 200
    assert (await asyncio.to_thread(rx.accounts.get, "ada")).role is Role.ADMIN
    assert actions(rx, "user_add", "user_role", "user_disable", "user_passwd") == []


async def test_pages_need_a_login(rx: Receiver) -> None:
    async with client_for(rx.url, rx.fingerprint) as http:
        for path in ("accounts", "password"):
            resp = await http.get(rx.url + path, headers={"Accept": "text/html"},
                                  allow_redirects=False)  # fmt: skip
            assert (resp.status, resp.headers["Location"]) == (303, "/login")
        await log_in(http, rx.url, "ada")
        page = await http.get(rx.url + "accounts")
        assert page.status == 200 and "Add an account" in await page.text()
