"""Logins, sessions, CSRF, Origin and roles on the real receiver (TLS on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from receiver.accounts import Role, SessionPolicy
from receiver.auth import COOKIE, CSRF_HEADER
from receiver.server import Receiver
from tests.logins import PASSWORD, client_for, log_in, logged_in, strict_receiver
from tests.logins import access_entries as access

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def rx(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A receiver with small login limits: 3 failures lock a name (for that address),
    10 an address."""
    async with strict_receiver(tmp_path / "receiver") as receiver:
        yield receiver


async def anonymous(rx: Receiver, method: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
    async with client_for(rx.url, rx.fingerprint) as http:
        resp = await http.request(method, rx.url + path.lstrip("/"), allow_redirects=False, **kw)
        await resp.read()
        return resp


@pytest.mark.parametrize(
    "path",
    ["/api/sessions", "/v1/devices", "/v1/me", "/v1/users", "/recordings/s/c.0.mp4", "/nope",
     "/static/viewer.js", "/v1/live/s/c"],
)  # fmt: skip
async def test_every_route_needs_a_login(rx: Receiver, path: str) -> None:
    resp = await anonymous(rx, "GET", path, headers={"Accept": "application/json"})
    assert resp.status == 401
    body = await resp.json()
    assert body["error"] == "unauthenticated"
    assert resp.headers["Cache-Control"] == "no-store"


async def test_pages_redirect_to_the_login_page_which_is_public(rx: Receiver) -> None:
    resp = await anonymous(rx, "GET", "/", headers={"Accept": "text/html"})
    assert resp.status == 303
    assert resp.headers["Location"] == "/login"
    page = await anonymous(rx, "GET", "/login")
    assert page.status == 200 and page.content_type == "text/html"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "form-action 'self'" in csp
    for name in ("login.js", "login.css"):
        assert (await anonymous(rx, "GET", f"/static/{name}")).status == 200
    assert (await anonymous(rx, "GET", "/static/viewer.js")).status == 401


async def test_websocket_without_a_login_is_refused(rx: Receiver) -> None:
    async with client_for(rx.url, rx.fingerprint) as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(rx.url + "v1/live/s-1/cam1")
    assert err.value.status == 401


async def test_login_sets_a_host_only_secure_strict_cookie(rx: Receiver) -> None:
    async with client_for(rx.url, rx.fingerprint) as http:
        resp = await http.post(rx.url + "login", json={"name": "olivia", "password": PASSWORD})
        body = await resp.json()
        assert resp.status == 200
        assert (body["user"], body["role"]) == ("olivia", "officer")
        assert len(body["csrf_token"]) >= 43
        (header,) = resp.headers.getall("Set-Cookie")
        attrs = [a.strip().lower() for a in header.split(";")]
        assert header.startswith(f"{COOKIE}=")
        assert {"secure", "httponly", "samesite=strict", "path=/"} <= set(attrs)
        assert not any(a.startswith(("domain", "max-age", "expires")) for a in attrs)
        me = await http.get(rx.url + "v1/me")
        assert (await me.json()) == body
        sessions = await http.get(rx.url + "api/sessions")
        assert sessions.status == 200


async def test_a_form_login_redirects(rx: Receiver) -> None:
    async with client_for(rx.url, rx.fingerprint) as http:
        ok = await http.post(rx.url + "login", data={"name": "olivia", "password": PASSWORD},
                             allow_redirects=False)  # fmt: skip
        assert (ok.status, ok.headers["Location"]) == (303, "/")
        assert COOKIE in ok.headers["Set-Cookie"]
        bad = await http.post(rx.url + "login", data={"name": "olivia", "password": "nope"},
                              allow_redirects=False)  # fmt: skip
        assert (bad.status, bad.headers["Location"]) == (303, "/login?error=invalid_credentials")


@pytest.mark.parametrize(
    ("body", "status"),
    [({"name": "olivia"}, 400), ({"name": 1, "password": 2}, 400), ("[1]", 400),
     ({"name": "o", "password": "x" * 2000}, 400)],
)  # fmt: skip
async def test_malformed_logins_are_refused(rx: Receiver, body: Any, status: int) -> None:
    kw = {"data": body, "headers": {"Content-Type": "application/json"}}
    if isinstance(body, dict):
        kw = {"json": body}
    resp = await anonymous(rx, "POST", "/login", **kw)
    assert resp.status == status
    assert (await resp.json())["error"] == "malformed"


async def test_wrong_password_then_lockout_audited(rx: Receiver) -> None:
    async with client_for(rx.url, rx.fingerprint) as http:
        for _ in range(3):
            resp = await http.post(rx.url + "login", json={"name": "olivia", "password": "x" * 12})
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_credentials"
            assert "Set-Cookie" not in resp.headers
        locked = await http.post(rx.url + "login", json={"name": "olivia", "password": PASSWORD})
        body = await locked.json()
        assert (locked.status, body["error"]) == (429, "locked")
        assert 590 <= body["retry_after_s"] <= 600
        assert int(locked.headers["Retry-After"]) == body["retry_after_s"]
        # Unknown names answer alike: nobody learns which names exist.
        for _ in range(3):
            resp = await http.post(rx.url + "login", json={"name": "nobody", "password": "x" * 12})
            assert resp.status == 401
        resp = await http.post(rx.url + "login", json={"name": "nobody", "password": "x" * 12})
        assert (resp.status, (await resp.json())["error"]) == (429, "locked")
    actions = [(e["action"], e["who"], e.get("reason")) for e in access(rx)]
    assert actions == [
        ("login_failed", "olivia", "invalid_credentials"),
        ("login_failed", "olivia", "invalid_credentials"),
        ("login_failed", "olivia", "invalid_credentials"),
        ("login_lockout", "olivia", None),
        ("login_failed", "olivia", "locked"),
        ("login_failed", "nobody", "invalid_credentials"),
        ("login_failed", "nobody", "invalid_credentials"),
        ("login_failed", "nobody", "invalid_credentials"),
        ("login_lockout", "nobody", None),
        ("login_failed", "nobody", "locked"),
    ]
    assert all(e["remote"] == "127.0.0.1" for e in access(rx))


async def test_too_many_failures_from_one_address_are_rate_limited(rx: Receiver) -> None:
    async with client_for(rx.url, rx.fingerprint) as http:
        for i in range(10):  # different names: no lockout, only the address counts
            resp = await http.post(rx.url + "login", json={"name": f"u{i}", "password": "x" * 12})
            assert resp.status == 401
        limited = await http.post(rx.url + "login", json={"name": "olivia", "password": PASSWORD})
        assert (limited.status, (await limited.json())["error"]) == (429, "rate_limited")
        assert int(limited.headers["Retry-After"]) > 0
    assert [e["action"] for e in access(rx)][-2:] == ["login_failed", "login_rate_limited"]


async def test_logins_sent_at_once_check_no_more_passwords_than_the_allowance(
    rx: Receiver,
) -> None:
    """Each waits for the password hash; all had passed the address check before the
    first failure was counted (found by a review: 100 guesses at once, all checked)."""
    async with client_for(rx.url, rx.fingerprint) as http:

        async def guess(i: int) -> int:
            body = {"name": f"u{i}", "password": "x" * 12}
            async with http.post(rx.url + "login", json=body) as resp:
                return resp.status

        statuses = await asyncio.gather(*(guess(i) for i in range(40)))
    assert statuses.count(401) == 10  # the allowance (rx: 10 per address)
    assert statuses.count(429) == 30
    assert [e["action"] for e in access(rx)].count("login_failed") == 10


async def test_state_changes_need_the_csrf_token_and_the_origin(rx: Receiver) -> None:
    async with logged_in(rx, Role.ADMIN, "ada") as http:
        url = rx.url + "v1/users/olivia/disable"
        no_token = await http.post(url, headers={CSRF_HEADER: ""})
        assert (no_token.status, (await no_token.json())["error"]) == (403, "csrf")
        wrong = await http.post(url, headers={CSRF_HEADER: "x" * 43})
        assert (wrong.status, (await wrong.json())["error"]) == (403, "csrf")
        evil = await http.post(url, headers={"Origin": "https://evil.example"})
        assert (evil.status, (await evil.json())["error"]) == (403, "bad_origin")
        ok = await http.post(url)
        assert ok.status == 200
    assert (await asyncio.to_thread(rx.accounts.get, "olivia")).disabled


async def test_login_and_websockets_check_the_origin(rx: Receiver) -> None:
    resp = await anonymous(rx, "POST", "/login", json={"name": "olivia", "password": PASSWORD},
                           headers={"Origin": "https://evil.example"})  # fmt: skip
    assert (resp.status, (await resp.json())["error"]) == (403, "bad_origin")
    async with logged_in(rx) as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(rx.url + "v1/live/s-1/cam1", origin="https://evil.example")
        assert err.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:  # the right origin: 404 now
            await http.ws_connect(rx.url + "v1/live/s-1/cam1")
        assert err.value.status == 404


async def test_roles(rx: Receiver) -> None:
    async with logged_in(rx, Role.OFFICER, "olivia") as officer:
        resp = await officer.get(rx.url + "v1/users")
        assert (resp.status, (await resp.json())["error"]) == (403, "forbidden")
        resp = await officer.post(rx.url + "v1/users/dana/disable")
        assert resp.status == 403
    async with logged_in(rx, Role.DISPATCHER, "dana") as dispatcher:
        assert (await dispatcher.get(rx.url + "api/sessions")).status == 200  # includes officer
        assert (await dispatcher.get(rx.url + "v1/users")).status == 403
    async with logged_in(rx, Role.ADMIN, "ada") as admin:
        users = await (await admin.get(rx.url + "v1/users")).json()
        assert [(u["name"], u["role"]) for u in users["users"]] == [
            ("ada", "admin"),
            ("dana", "dispatcher"),
            ("olivia", "officer"),
        ]
        nick = {"name": "nick", "role": "officer", "password": PASSWORD}
        made = await admin.post(rx.url + "v1/users", json=nick)
        assert made.status == 201
        again = await admin.post(rx.url + "v1/users", json=nick)
        assert (again.status, (await again.json())["error"]) == (409, "account_exists")
        weak = await admin.post(rx.url + "v1/users", json=dict(nick, name="pat", password="short"))
        assert (weak.status, (await weak.json())["error"]) == (400, "weak_password")
    entries = [(e["action"], e["who"], e.get("target")) for e in access(rx)]
    assert ("user_add", "ada", "nick") in entries


async def test_logout_ends_the_session(rx: Receiver) -> None:
    async with logged_in(rx) as http:
        cookie = http.cookie_jar.filter_cookies(URL(rx.url))[COOKIE].value
        resp = await http.post(rx.url + "logout")
        assert resp.status == 200
        assert (await http.get(rx.url + "api/sessions")).status == 401
    # The old cookie is dead on the server, not only forgotten by the client.
    resp = await anonymous(rx, "GET", "/api/sessions", cookies={COOKIE: cookie})
    assert resp.status == 401
    assert [e["action"] for e in access(rx)] == ["login", "logout"]


async def test_disabling_or_a_new_password_ends_live_sessions(rx: Receiver) -> None:
    async with logged_in(rx, Role.OFFICER, "olivia") as http:
        await asyncio.to_thread(rx.accounts.set_disabled, "olivia", True)  # as the CLI does
        assert (await http.get(rx.url + "api/sessions")).status == 401
    await asyncio.to_thread(rx.accounts.set_disabled, "olivia", False)
    async with logged_in(rx, Role.OFFICER, "olivia") as http:
        await asyncio.to_thread(rx.accounts.set_password, "olivia", "a different passphrase")
        assert (await http.get(rx.url + "api/sessions")).status == 401
        refused = await http.post(rx.url + "login", json={"name": "olivia", "password": PASSWORD})
        assert refused.status == 401


async def test_sessions_time_out(rx: Receiver) -> None:
    clock = Clock()
    rx.accounts.clock = clock
    rx.accounts.session_policy = SessionPolicy(idle_timeout_s=60, lifetime_s=300, touch_every_s=0)
    async with logged_in(rx) as http:
        for _ in range(4):
            clock.t += 59
            assert (await http.get(rx.url + "api/sessions")).status == 200
        clock.t += 60
        assert (await http.get(rx.url + "api/sessions")).status == 401  # idle
    async with logged_in(rx) as http:
        for _ in range(5):
            clock.t += 50
            assert (await http.get(rx.url + "api/sessions")).status == 200
        clock.t += 50
        assert (await http.get(rx.url + "api/sessions")).status == 401  # 300 s after login


async def test_a_new_login_replaces_the_session(rx: Receiver) -> None:
    async with logged_in(rx) as http:
        first = http.cookie_jar.filter_cookies(URL(rx.url))[COOKIE].value
        await log_in(http, rx.url, "olivia")
        second = http.cookie_jar.filter_cookies(URL(rx.url))[COOKIE].value
        assert first != second
    resp = await anonymous(rx, "GET", "/api/sessions", cookies={COOKIE: first})
    assert resp.status == 401


async def test_the_uplink_stays_open_to_devices(rx: Receiver) -> None:
    """The device uplink authenticates devices itself: its challenge comes without a login."""
    async with client_for(rx.url, rx.fingerprint) as http, http.ws_connect(rx.uplink_url) as ws:
        msg = await ws.receive_json(timeout=10)
        assert msg["type"] == "challenge"


async def test_the_officer_session_fixture(receiver: Receiver, officer_session: Any) -> None:
    """``officer_session`` (conftest) is a client logged in to the ``receiver`` fixture."""
    me = await (await officer_session.get(receiver.url + "v1/me")).json()
    assert (me["user"], me["role"]) == ("officer-1", "officer")
    assert officer_session.headers[CSRF_HEADER] == me["csrf_token"]
    assert (await officer_session.post(receiver.url + "logout")).status == 200
