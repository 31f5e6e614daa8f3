"""Login abuse on the real receiver (TLS on 127.0.0.1; attackers on other 127/8 addresses).

A review found: a few wrong passwords from anywhere locked an officer's name for
everyone (even the right password was refused); an empty password told which
names exist; a login checked while an admin reset the password still got a
session; deep JSON and a non-UTF-8 CSRF header answered a plain-text 500. Each
test here failed before the fix.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from receiver.accounts import (
    AccountStore,
    CredentialsChangedError,
    LockoutPolicy,
    LoginOutcome,
    LoginResult,
    Role,
    address_key,
)
from receiver.auth import COOKIE, CSRF_HEADER, AuthSettings, _AddressLimiter
from receiver.limits import ServerLimits, guard_middleware
from receiver.server import Receiver
from tests.logins import FAST, PASSWORD, access_entries, client_for, log_in, strict_receiver
from tests.test_accounts import CountingHasher
from tests.test_receiver_cli_data import served

pytestmark = pytest.mark.timeout(60)

NEW = "brand new passphrase 2024!"
WRONG = "wrong guess 123456"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def rx(tmp_path: Path) -> AsyncIterator[Receiver]:
    """3 failures of a name from one address lock it there (10 per address in a minute);
    olivia (officer), dana (dispatcher), ada (admin)."""
    async with strict_receiver(tmp_path / "receiver") as receiver:
        yield receiver


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AccountStore]:
    policy = LockoutPolicy(max_failures=3, lockout_s=600, name_failures=4, name_interval_s=30)
    with AccountStore(
        tmp_path / "accounts.sqlite", params=FAST, lockout=policy, clock=Clock()
    ) as s:
        s.add("alice", Role.OFFICER, PASSWORD)
        yield s


async def attempt(
    rx: Receiver, source: str, name: str, password: str
) -> tuple[int, dict[str, Any], str | None]:
    """One JSON login from ``source``: (status, answer, Retry-After)."""
    async with client_for(rx.url, rx.fingerprint, source) as http:
        body = {"name": name, "password": password}
        async with http.post(rx.url + "login", json=body) as resp:
            return resp.status, await resp.json(), resp.headers.get("Retry-After")


# -- 1. a name locked by failures from one address is not locked for the others -------------


async def test_an_attacker_cannot_lock_the_real_user_out(rx: Receiver) -> None:
    attackers = {"olivia": "127.0.0.2", "dana": "127.0.0.3", "ada": "127.0.0.4"}
    for name, source in attackers.items():
        for _ in range(3):
            assert (await attempt(rx, source, name, WRONG))[0] == 401
        # The attacker's own address is locked for the name: even the right password.
        status, body, retry = await attempt(rx, source, name, PASSWORD)
        assert (status, body["error"]) == (429, "locked") and retry is not None
    for name in ("olivia", "dana", "ada"):  # the real users, from the dispatch center
        assert (await attempt(rx, "127.0.0.1", name, PASSWORD))[0] == 200
    info = await asyncio.to_thread(rx.accounts.get, "olivia")
    assert info.locked_addresses == 1 and info.locked_until > rx.accounts.clock()
    entries = [(e["action"], e["who"], e["remote"]) for e in access_entries(rx)]
    assert entries.count(("login_lockout", "olivia", "127.0.0.2")) == 1
    assert ("login", "olivia", "127.0.0.1") in entries


async def test_a_name_under_attack_from_many_addresses_is_throttled_not_locked(
    rx: Receiver,
) -> None:
    rx.accounts.lockout = LockoutPolicy(
        max_failures=3, lockout_s=600, name_failures=4, name_interval_s=600
    )
    for source in ("127.0.0.2", "127.0.0.3"):
        for _ in range(2):
            assert (await attempt(rx, source, "olivia", WRONG))[0] == 401
    # 4 failures from everywhere: addresses that failed lately share one check per 600 s.
    assert (await attempt(rx, "127.0.0.2", "olivia", WRONG))[0] == 401  # that one check
    status, body, retry = await attempt(rx, "127.0.0.3", "olivia", PASSWORD)
    assert (status, body["error"]) == (429, "locked")  # not checked, right or wrong
    assert retry is not None and 590 <= int(retry) <= 600
    # An address without a failure for the name is never held back.
    assert (await attempt(rx, "127.0.0.4", "olivia", WRONG))[0] == 401  # checked
    assert (await attempt(rx, "127.0.0.1", "olivia", PASSWORD))[0] == 200
    reasons = [e.get("reason") for e in access_entries(rx) if e["action"] == "login_failed"]
    assert reasons.count("throttled") == 1


def test_failures_count_per_name_and_address(store: AccountStore) -> None:
    store.lockout = LockoutPolicy(max_failures=3, lockout_s=600)  # the name throttle at 10
    for _ in range(3):
        assert (
            store.authenticate("alice", WRONG, remote="192.0.2.7").outcome is LoginOutcome.INVALID
        )
    assert store.authenticate("alice", PASSWORD, remote="192.0.2.7").outcome is LoginOutcome.LOCKED
    # The right password from another address logs in; that does not unlock the first.
    assert store.authenticate("alice", PASSWORD, remote="192.0.2.8").outcome is LoginOutcome.OK
    assert store.authenticate("alice", PASSWORD, remote="192.0.2.7").outcome is LoginOutcome.LOCKED
    # One IPv6 /64 is one address: 3 failures from 3 of its addresses lock all of it.
    for host in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:ffff::1"):
        store.authenticate("alice", WRONG, remote=host)
    got = store.authenticate("alice", PASSWORD, remote="2001:db8:1:2:5::9")
    assert got.outcome is LoginOutcome.LOCKED
    assert (
        store.authenticate("alice", PASSWORD, remote="2001:db8:1:3::a").outcome is LoginOutcome.OK
    )


def test_the_name_throttle_holds_back_only_addresses_that_failed(store: AccountStore) -> None:
    clock = store.clock
    assert isinstance(clock, Clock)
    for source in ("192.0.2.1", "192.0.2.2"):
        for _ in range(2):
            store.authenticate("alice", WRONG, remote=source)
    # Hot (4 failures): one check among the addresses that failed lately, then wait 30 s.
    third = store.authenticate("alice", WRONG, remote="192.0.2.1")  # checked: locked there
    assert (third.outcome, third.locked_now) == (LoginOutcome.INVALID, True)
    held = store.authenticate("alice", PASSWORD, remote="192.0.2.2")
    assert (held.outcome, held.locked_until) == (LoginOutcome.THROTTLED, clock.t + 30)
    # A new address is checked at once, a success there leaves the name hot.
    assert store.authenticate("alice", WRONG, remote="192.0.2.3").outcome is LoginOutcome.INVALID
    assert store.authenticate("alice", PASSWORD, remote="192.0.2.4").outcome is LoginOutcome.OK
    clock.t += 30
    assert store.authenticate("alice", PASSWORD, remote="192.0.2.2").outcome is LoginOutcome.OK
    got = store.authenticate("alice", PASSWORD, remote="192.0.2.3")
    assert got.outcome is LoginOutcome.THROTTLED  # the one check of this interval was used
    clock.t += 600  # its failure is too old to count now: a clean address again
    assert store.authenticate("alice", PASSWORD, remote="192.0.2.3").outcome is LoginOutcome.OK


def test_unlock_and_a_new_password_clear_every_lock(store: AccountStore) -> None:
    store.lockout = LockoutPolicy(max_failures=3, lockout_s=600)  # the name throttle at 10
    for source in ("192.0.2.1", "192.0.2.2"):
        for _ in range(3):
            store.authenticate("alice", WRONG, remote=source)
    info = store.get("alice")
    assert (info.locked_addresses, info.failures) == (2, 6)
    assert store.unlock("alice") == 2
    assert store.get("alice").locked_addresses == 0
    assert store.authenticate("alice", PASSWORD, remote="192.0.2.1").outcome is LoginOutcome.OK
    for _ in range(3):
        store.authenticate("alice", WRONG, remote="192.0.2.1")
    store.set_password("alice", NEW)
    assert store.authenticate("alice", NEW, remote="192.0.2.1").outcome is LoginOutcome.OK


def test_client_addresses_are_grouped_by_ipv6_64() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2::5") == address_key("2001:db8:1:2:ffff:0:0:1")
    assert address_key("2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::5") != address_key("2001:db8:1:2::5")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key(None) == address_key("") == "-"
    clock = Clock()
    limiter = _AddressLimiter(AuthSettings(ip_failures=3, ip_window_s=60), clock)
    for host in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:ffff::c"):
        assert limiter.allowed(host)
        limiter.failed(host)
    assert not limiter.allowed("2001:db8:1:2::d")  # the same /64
    assert limiter.allowed("2001:db8:1:3::d")
    assert limiter.retry_after("2001:db8:1:2::e") == 60


async def test_logins_sent_at_once_check_no_more_passwords_than_the_lock(rx: Receiver) -> None:
    """Known and unknown names alike (the unknown names' counter lost updates before)."""
    rx.auth.limiter.settings = AuthSettings(ip_failures=100)  # only the name's lock counts
    async with client_for(rx.url, rx.fingerprint, "127.0.0.3") as http:

        async def guess(name: str, i: int) -> str:
            body = {"name": name, "password": f"wrong guess {i:04}"}
            async with http.post(rx.url + "login", json=body) as resp:
                return f"{resp.status} {(await resp.json())['error']}"

        known = Counter(await asyncio.gather(*(guess("olivia", i) for i in range(16))))
        unknown = Counter(await asyncio.gather(*(guess("ghost", i) for i in range(16))))
    assert known == unknown == Counter({"401 invalid_credentials": 3, "429 locked": 13})


# -- 2. which names exist --------------------------------------------------------------------


async def test_an_empty_password_does_not_tell_which_names_exist(rx: Receiver) -> None:
    answers = {}
    for source, name in (("127.0.0.2", "olivia"), ("127.0.0.3", "nobody")):
        seen = [await attempt(rx, source, name, "") for _ in range(5)]
        seen.append(await attempt(rx, source, name, WRONG))
        answers[name] = [(status, body["error"]) for status, body, _ in seen]
    assert answers["olivia"] == answers["nobody"] == [(401, "invalid_credentials")] * 6
    assert (await asyncio.to_thread(rx.accounts.get, "olivia")).failures == 1


def test_an_empty_password_is_refused_alike_unhashed_uncounted(store: AccountStore) -> None:
    counter = CountingHasher(store)
    store._hasher = counter  # type: ignore[assignment]
    for name in ("alice", "mallory", "Not A Name"):
        for _ in range(5):
            assert store.authenticate(name, "", remote="192.0.2.1") == LoginResult(
                LoginOutcome.INVALID
            )
    assert counter.verified == 0
    assert store.get("alice").failures == 0
    for name in ("alice", "mallory"):  # one wrong password each: checked, counted alike
        got = store.authenticate(name, WRONG, remote="192.0.2.1")
        assert (got.outcome, got.locked_now) == (LoginOutcome.INVALID, False)
    assert counter.verified == 2


# -- 3. a password reset during a login -------------------------------------------------------


def reset_during(rx: Receiver, password: str) -> list[str]:
    """Make the next password check of ``rx`` be followed, before its caller goes on, by
    an admin's reset of olivia's password to ``password``; the reasons it was called."""
    store = rx.accounts
    original = store.authenticate
    calls: list[str] = []

    def check_then_reset(name: str, given: str, **kw: Any) -> LoginResult:
        result = original(name, given, **kw)
        store.set_password("olivia", password)  # as an admin (or `user passwd`) would
        store.authenticate = original  # type: ignore[method-assign]
        calls.append("login" if kw.get("login", True) else "confirm")
        return result

    store.authenticate = check_then_reset  # type: ignore[method-assign]
    return calls


async def test_a_login_checked_during_a_password_reset_gets_no_session(rx: Receiver) -> None:
    calls = reset_during(rx, NEW)
    async with client_for(rx.url, rx.fingerprint, "127.0.0.2") as http:
        resp = await http.post(rx.url + "login", json={"name": "olivia", "password": PASSWORD})
        assert (resp.status, (await resp.json())["error"]) == (401, "invalid_credentials")
        assert COOKIE not in resp.headers.get("Set-Cookie", "")
        assert (await http.get(rx.url + "v1/me")).status == 401
    assert calls == ["login"]
    assert await asyncio.to_thread(rx.accounts.session_count, "olivia") == 0
    (entry,) = [e for e in access_entries(rx) if e["action"].startswith("login")]
    assert (entry["action"], entry["who"], entry["reason"]) == ("login_failed", "olivia", "changed")


async def test_ones_own_password_change_during_a_reset_changes_nothing(rx: Receiver) -> None:
    async with client_for(rx.url, rx.fingerprint) as http:
        await log_in(http, rx.url, "olivia")
        calls = reset_during(rx, NEW)
        body = {"current": PASSWORD, "new": "what the thief wants 99"}
        resp = await http.post(rx.url + "v1/me/password", json=body)
        assert (resp.status, (await resp.json())["error"]) == (401, "unauthenticated")
    assert calls == ["confirm"]
    assert (await attempt(rx, "127.0.0.1", "olivia", "what the thief wants 99"))[0] == 401
    assert (await attempt(rx, "127.0.0.1", "olivia", NEW))[0] == 200  # the admin's stays


def test_a_session_needs_the_generation_the_password_was_checked_against(
    store: AccountStore,
) -> None:
    first = store.authenticate("alice", PASSWORD)
    assert first.generation is not None
    store.create_session("alice", generation=first.generation)  # unchanged: fine
    store.set_password("alice", NEW)
    with pytest.raises(CredentialsChangedError):
        store.create_session("alice", generation=first.generation)
    with pytest.raises(CredentialsChangedError):
        store.set_password("alice", "a thiefs new password", generation=first.generation)
    second = store.authenticate("alice", NEW)
    store.set_disabled("alice", True)
    store.set_disabled("alice", False)  # disabled and enabled again meanwhile
    with pytest.raises(CredentialsChangedError):
        store.create_session("alice", generation=second.generation)
    assert store.session_count("alice") == 0
    third = store.authenticate("alice", NEW)
    assert store.lookup_session(store.create_session("alice", generation=third.generation).token)


def test_a_database_from_before_generations_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite"
    with AccountStore(path, params=FAST) as first:
        first.add("alice", Role.OFFICER, PASSWORD)
    old = sqlite3.connect(path)
    old.execute("ALTER TABLE users DROP COLUMN generation")  # as the table was made before
    old.execute("DROP TABLE login_failures")
    old.execute("DROP TABLE login_names")
    old.commit()
    old.close()
    with AccountStore(path, params=FAST) as again:
        result = again.authenticate("alice", PASSWORD)
        assert (result.outcome, result.generation) == (LoginOutcome.OK, 0)
        again.create_session("alice", generation=0)


# -- 4. malformed requests: JSON errors, never a 500 ------------------------------------------

DEEP = "[" * 1000 + "]" * 1000  # 2000 bytes: within every body limit


async def test_deeply_nested_json_is_a_400(rx: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    headers = {"Content-Type": "application/json"}
    async with (
        client_for(rx.url, rx.fingerprint, "127.0.0.2") as anonymous,
        anonymous.post(rx.url + "login", data=DEEP, headers=headers) as resp,
    ):
        assert (resp.status, (await resp.json())["error"]) == (400, "malformed")
    async with client_for(rx.url, rx.fingerprint) as admin:
        await log_in(admin, rx.url, "ada")
        for path in ("v1/dispatch", "v1/users", "v1/me/password", "v1/users/olivia/role"):
            async with admin.post(rx.url + path, data=DEEP, headers=headers) as resp:
                assert resp.content_type == "application/json", path
                assert (path, resp.status, (await resp.json())["error"]) == (path, 400, "malformed")
    assert not [r for r in caplog.records if r.exc_info], "no traceback logged"


async def raw_post(rx: Receiver, path: str, headers: bytes) -> tuple[int, dict[str, Any]]:
    """POST ``path`` with these raw header lines (bytes as sent); (status, JSON answer)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", rx.port, ssl=ctx)
    host = f"127.0.0.1:{rx.port}"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n"
    writer.write(head.encode() + headers + b"\r\n")
    try:
        data = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


async def test_a_csrf_header_that_is_not_utf8_is_a_403(rx: Receiver) -> None:
    async with client_for(rx.url, rx.fingerprint) as http:
        await log_in(http, rx.url, "olivia")
        cookie = next(c.value for c in http.cookie_jar if c.key == COOKIE)
    lines = (
        f"Origin: https://127.0.0.1:{rx.port}\r\nCookie: {COOKIE}={cookie}\r\n".encode()
        + CSRF_HEADER.encode()
        + b": \xff\xfe\r\n"
    )
    status, body = await raw_post(rx, "/logout", lines)
    assert (status, body["error"]) == (403, "csrf")
    assert CSRF_HEADER in body["detail"]


async def test_an_unexpected_error_is_a_json_500_that_says_nothing_of_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret detail of the failure")

    app = web.Application(middlewares=[guard_middleware(ServerLimits())])
    app.router.add_get("/broken/{n}", broken)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            for n in range(3):
                async with http.get(server.make_url(f"/broken/{n}")) as resp:
                    assert resp.status == 500 and resp.content_type == "application/json"
                    text = await resp.text()
                    assert json.loads(text)["error"] == "internal_error"
                    assert "secret" not in text and "RuntimeError" not in text
    finally:
        await server.close()
    logged = [r for r in caplog.records if r.exc_info and r.name == "receiver.limits"]
    assert len(logged) == 1  # once a minute per kind of failure and route
    assert "/broken/{n}" in logged[0].getMessage()


# -- an admin clears a lock -------------------------------------------------------------------


async def test_an_admin_unlocks_a_name(rx: Receiver) -> None:
    for _ in range(3):
        await attempt(rx, "127.0.0.2", "olivia", WRONG)
    assert (await attempt(rx, "127.0.0.2", "olivia", PASSWORD))[0] == 429
    async with client_for(rx.url, rx.fingerprint) as admin:
        await log_in(admin, rx.url, "ada")
        async with admin.get(rx.url + "v1/users") as resp:
            users = {u["name"]: u for u in (await resp.json())["users"]}
        assert users["olivia"]["locked"] and users["olivia"]["locked_addresses"] == 1
        async with admin.post(rx.url + "v1/users/olivia/unlock") as resp:
            assert (resp.status, await resp.json()) == (
                200,
                {"name": "olivia", "unlocked_addresses": 1},
            )
        async with admin.post(rx.url + "v1/users/nobody/unlock") as resp:
            assert (resp.status, (await resp.json())["error"]) == (404, "unknown_account")
    assert (await attempt(rx, "127.0.0.2", "olivia", PASSWORD))[0] == 200
    (entry,) = [e for e in access_entries(rx) if e["action"] == "user_unlock"]
    assert (entry["who"], entry["target"], entry["addresses"]) == ("ada", "olivia", 1)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "breakglass", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_user_unlock(tmp_path: Path) -> None:
    data = served(tmp_path / "rx")
    policy = LockoutPolicy(max_failures=3)
    open_store: Callable[[], AccountStore] = functools.partial(
        AccountStore, data / "accounts.sqlite", params=FAST, lockout=policy
    )
    with open_store() as store:
        store.add("alice", Role.OFFICER, PASSWORD)
        for _ in range(3):
            store.authenticate("alice", WRONG, remote="192.0.2.7")
    listed = run("receiver", "user", "list", "--data", str(data))
    assert "locked for 1 address until" in listed.stdout, listed.stdout
    unlocked = run("receiver", "user", "unlock", "alice", "--data", str(data))
    assert unlocked.returncode == 0, unlocked.stderr
    assert "account alice unlocked (it was locked for 1 address" in unlocked.stdout
    with open_store() as store:
        got = store.authenticate("alice", PASSWORD, remote="192.0.2.7")
        assert got.outcome is LoginOutcome.OK
    unknown = run("receiver", "user", "unlock", "zed", "--data", str(data))
    assert unknown.returncode == 2 and "no account 'zed'" in unknown.stderr
    log = [json.loads(line) for line in (data / "access.log").read_text().splitlines()]
    assert [(e["action"], e["target"], e["addresses"]) for e in log] == [
        ("user_unlock", "alice", 1)
    ]


@pytest.fixture(autouse=True)
def _quiet_aiohttp(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
