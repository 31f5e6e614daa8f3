"""Police logins for tests: accounts, logged-in HTTP clients, a secured bare viewer app.

Every route of the receiver but the login page and the device uplink needs a
logged-in user (:mod:`receiver.auth`). Tests log in over HTTP exactly as the
page does (``POST /login``, then the session cookie, ``Origin`` and the
``X-CSRF-Token`` header on every request). Passwords are hashed with
:data:`FAST` argon2id parameters so a login costs a millisecond, not 300.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from provisioning.tls import ensure_certificate, fingerprint_digest, server_context
from receiver.access_log import AccessLog
from receiver.accounts import (
    AccountExistsError,
    AccountStore,
    LockoutPolicy,
    PasswordParams,
    Role,
)
from receiver.auth import CSRF_HEADER, Auth, AuthSettings, setup_auth
from receiver.server import Receiver

#: argon2id at its cheapest: tests log in often.
FAST = PasswordParams(time_cost=1, memory_cost_kib=1024, parallelism=1)
PASSWORD = "a long test passphrase 42"


async def add_account(
    store: AccountStore, name: str, role: Role = Role.OFFICER, password: str = PASSWORD
) -> None:
    """Create an account unless it exists (hashing off the event loop)."""
    with contextlib.suppress(AccountExistsError):
        await asyncio.to_thread(store.add, name, role, password)


def origin_of(url: str | URL) -> str:
    """``scheme://host:port`` of ``url``, as a browser sends it in ``Origin``."""
    u = URL(str(url))
    return f"{u.scheme}://{u.host}:{u.port}"


async def log_in(http: aiohttp.ClientSession | TestClient, url: str | URL, name: str,
                 password: str = PASSWORD) -> str:  # fmt: skip
    """``POST /login`` as the page does; sets the CSRF header on ``http``; the token."""
    login_url = "/login" if isinstance(http, TestClient) else URL(str(url)).with_path("/login")
    resp = await http.post(login_url, json={"name": name, "password": password})
    body = await resp.json()
    assert resp.status == 200, body
    csrf = str(body["csrf_token"])
    session = http.session if isinstance(http, TestClient) else http
    session.headers[CSRF_HEADER] = csrf
    return csrf


def client_for(url: str, fingerprint: str, source: str | None = None) -> aiohttp.ClientSession:
    """A client pinned to the receiver's certificate, sending the receiver's ``Origin``;
    ``source``: the loopback address it connects from (any 127/8 address is this host)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            ssl=aiohttp.Fingerprint(fingerprint_digest(fingerprint)),
            local_addr=(source, 0) if source else None,
        ),
        cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies for an IP address
        headers={"Origin": origin_of(url)},
        timeout=aiohttp.ClientTimeout(total=30),
    )


@contextlib.asynccontextmanager
async def logged_in(
    rx: Receiver, role: Role = Role.OFFICER, name: str | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    """A client logged in to ``rx`` with an account of ``role`` (made if missing)."""
    name = name or f"{role}-1"
    await add_account(rx.accounts, name, role)
    async with client_for(rx.url, rx.fingerprint) as http:
        await log_in(http, rx.url, name)
        yield http


def tls_context(folder: Path) -> tuple[ssl.SSLContext, str]:
    """A server TLS context with a fresh self-signed certificate for 127.0.0.1; its pin."""
    cert, key = folder / "tls.crt", folder / "tls.key"
    pin = ensure_certificate(cert, key, common_name="test receiver", hosts=["127.0.0.1"])
    return server_context(cert, key), pin


def secure(app: web.Application, folder: Path, settings: AuthSettings | None = None) -> Auth:
    """Put the receiver's logins on a bare ``app`` (accounts and access log in ``folder``)."""
    auth = Auth(
        AccountStore(folder / "accounts.sqlite", params=FAST),
        AccessLog(folder / "access.log"),
        settings,
    )
    setup_auth(app, auth)
    return auth


@contextlib.asynccontextmanager
async def secured_client(
    app: web.Application, folder: Path, role: Role | None = Role.OFFICER
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """``app`` secured and served over TLS on 127.0.0.1; a client logged in with ``role``.

    ``role=None``: the client is not logged in. The :class:`Auth` is ``app[AUTH_KEY]``.
    """
    auth = secure(app, folder)
    context, pin = tls_context(folder)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server(ssl=context)
    client = TestClient(
        server,
        connector=aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(fingerprint_digest(pin))),
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        headers={"Origin": origin_of(server.make_url("/"))},
    )
    async with client:
        if role is not None:
            await add_account(auth.accounts, f"{role}-1", role)
            await log_in(client, server.make_url("/"), f"{role}-1")
        yield client


@contextlib.asynccontextmanager
async def strict_receiver(folder: Path) -> AsyncIterator[Receiver]:
    """A receiver with small login limits (3 failures from one address lock a name for
    that address, 10 failures limit an address for a minute) and three accounts: olivia
    (officer), dana (dispatcher), ada (admin)."""
    receiver = Receiver(
        folder,
        "127.0.0.1",
        0,
        password_params=FAST,
        auth_settings=AuthSettings(ip_failures=10, ip_window_s=60),
    )
    receiver.accounts.lockout = LockoutPolicy(max_failures=3, lockout_s=600)
    async with receiver:
        await add_account(receiver.accounts, "olivia", Role.OFFICER)
        await add_account(receiver.accounts, "dana", Role.DISPATCHER)
        await add_account(receiver.accounts, "ada", Role.ADMIN)
        yield receiver


def access_entries(rx: Receiver) -> list[dict[str, Any]]:
    """Every entry of ``rx``'s access log so far."""
    rx.access_log.flush_sync()
    return [json.loads(line) for line in (rx.data_dir / "access.log").read_text().splitlines()]


@contextlib.contextmanager
def failing_access_log(log: AccessLog) -> Iterator[None]:
    """Every append of ``log`` fails (EIO, as a failed disk) until the block ends; its
    writer keeps what it could not write and tries again (now and then, and at the next
    entry). Injected into the log itself: a folder put in the file's place, and put back,
    raced with the writer's retry, which could create a new file in between."""

    def fail(batch: list[dict[str, Any]]) -> None:
        raise OSError(errno.EIO, f"test: the disk under {log.path} fails")

    log._append = fail  # type: ignore[method-assign]
    try:
        yield
    finally:
        del log._append
