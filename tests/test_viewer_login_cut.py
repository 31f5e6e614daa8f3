"""A footage stream ends when the login behind it does (review s9: a live view opened
before its account was disabled went on until the emergency ended).

Real TLS server on 127.0.0.1, real aiohttp clients; the account changes are made on
another connection to the accounts database, as ``breakglass receiver user ...`` does
from its own process, so only the viewer's periodic re-check can notice them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from receiver.access_log import ACCESS_LOG_KEY
from receiver.accounts import AccountStore, Role
from receiver.auth import AUTH_KEY, User
from receiver.h264 import parameter_sets
from receiver.recording import RecordingStore, TrackInfo
from receiver.viewer import (
    CLOSE_FORBIDDEN,
    CLOSE_LOGIN_ENDED,
    LOGIN_WATCH_KEY,
    _verdict,
    setup_viewer,
)
from tests.logins import FAST, secured_client
from tests.media import META, PacketList
from tests.test_viewer import Env

pytestmark = pytest.mark.timeout(60)

RECHECK_S = 0.05
NAME = "officer-1"  # secured_client's login


@pytest.fixture
async def env(tmp_path: Path, packets: PacketList) -> AsyncIterator[Env]:
    async with RecordingStore(tmp_path / "rec") as store:
        extradata = parameter_sets(packets[0][0]).annex_b()
        track = TrackInfo("cam1", "interior", "h264", 320, 240, 30.0, extradata, 0)
        rec = await store.open_session("s-1", "dev-1", META, [track])
        app = web.Application()
        setup_viewer(app, store, store.live_feed, login_recheck_s=RECHECK_S)
        async with secured_client(app, tmp_path / "auth") as client:
            env = Env(store, rec, client)
            env.folder = tmp_path / "auth"
            yield env


def other_process(env: Env, change: Callable[[AccountStore], None]) -> Awaitable[None]:
    """Change the accounts on a connection of their own (as the command line does)."""

    def run() -> None:
        with AccountStore(env.folder / "accounts.sqlite", params=FAST) as accounts:
            change(accounts)

    return asyncio.to_thread(run)


async def disable(env: Env) -> None:
    await other_process(env, lambda a: a.set_disabled(NAME, True))


async def reset_password(env: Env) -> None:
    await other_process(env, lambda a: a.set_password(NAME, "a brand new passphrase 77"))


async def log_out(env: Env) -> None:
    assert (await env.client.post("/logout")).status == 200


async def next_non_binary(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    """The first message that is not footage (what ends the stream)."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type is not aiohttp.WSMsgType.BINARY:
            return msg


def live_closes(env: Env) -> tuple[asyncio.Event, Callable[[], None]]:
    closed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def seen(entry: dict[str, Any]) -> None:
        if entry["action"] == "live_close":
            loop.call_soon_threadsafe(closed.set)

    return closed, env.client.app[ACCESS_LOG_KEY].listen(seen)  # type: ignore[index]


@pytest.mark.parametrize("end_login", [disable, reset_password, log_out])
async def test_an_open_live_view_is_cut_when_its_login_ends(
    env: Env, packets: PacketList, end_login: Callable[[Env], Awaitable[None]]
) -> None:
    env.feed(packets, 3)
    closed, stop = live_closes(env)
    ws = await env.client.ws_connect("/v1/live/s-1/cam1")
    assert (await asyncio.wait_for(ws.receive(), 10)).data[4:8] == b"ftyp"
    await end_login(env)
    env.feed(packets, 30)  # the camera goes on: the socket would carry it
    msg = await next_non_binary(ws)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    assert msg.data == CLOSE_LOGIN_ENDED
    assert "log in again" in msg.extra
    await ws.close()
    await asyncio.wait_for(closed.wait(), 10)
    stop()
    await env.client.app[ACCESS_LOG_KEY].flush()  # type: ignore[index]
    (close,) = [e for e in env.access() if e["action"] == "live_close"]
    assert (close["who"], close["cut"]) == (NAME, "login_ended")
    with pytest.raises(aiohttp.WSServerHandshakeError) as again:
        await env.client.ws_connect("/v1/live/s-1/cam1")
    assert again.value.status == 401


async def test_a_live_view_whose_login_holds_goes_on(env: Env, packets: PacketList) -> None:
    """Rounds of re-checks pass without cutting it; each login is looked up once a round
    however many cameras it watches."""
    env.feed(packets, 3)
    watch = env.client.app[LOGIN_WATCH_KEY]  # type: ignore[index]
    auth = env.client.app[AUTH_KEY]  # type: ignore[index]
    lookups = 0
    user_of = auth.user_of

    async def counted(request: web.Request) -> User | None:
        nonlocal lookups
        lookups += 1
        return await user_of(request)

    auth.user_of = counted  # type: ignore[method-assign]
    sockets = [await env.client.ws_connect("/v1/live/s-1/cam1") for _ in range(3)]
    for ws in sockets:
        assert (await asyncio.wait_for(ws.receive(), 10)).data[4:8] == b"ftyp"
    assert watch.streams == 3
    start, before = watch.rounds, lookups
    await asyncio.wait_for(watch.wait_rounds(start + 5), 10)
    assert 4 <= lookups - before <= 6  # one a round (not one per socket: 12 to 18)
    env.feed(packets, 40)
    for ws in sockets:
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type is aiohttp.WSMsgType.BINARY
        await ws.close()


async def test_a_live_view_is_cut_when_its_login_cannot_be_checked(
    env: Env, packets: PacketList
) -> None:
    """The accounts' database fails: a few rounds are let pass, then the view ends."""
    env.feed(packets, 3)
    auth = env.client.app[AUTH_KEY]  # type: ignore[index]
    ws = await env.client.ws_connect("/v1/live/s-1/cam1")
    assert (await asyncio.wait_for(ws.receive(), 10)).data[4:8] == b"ftyp"

    async def broken(request: web.Request) -> User | None:
        raise RuntimeError("the receiver's accounts are not open")

    auth.user_of = broken  # type: ignore[method-assign]
    msg = await next_non_binary(ws)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.INTERNAL_ERROR)
    await ws.close()


def test_a_role_that_no_longer_allows_footage_is_a_cut() -> None:
    officer = User(NAME, Role.OFFICER, "handle", "csrf")
    assert _verdict(officer, Role.OFFICER) is None
    cut = _verdict(officer, Role.DISPATCHER)
    assert cut is not None and (cut.code, cut.audit) == (CLOSE_FORBIDDEN, "forbidden")
    ended = _verdict(None, Role.OFFICER)
    assert ended is not None and ended.code == CLOSE_LOGIN_ENDED
    for why in (cut, ended):
        assert len(why.message.encode()) <= 123  # a WebSocket close reason's limit


async def test_a_recording_transfer_is_cut_when_its_login_ends(
    env: Env, packets: PacketList
) -> None:
    """A player reads a long recording lazily over one response: disabling the account
    drops that connection too instead of letting it play to the end."""
    env.feed(packets, 30)
    await env.rec.close("all clear")
    (part,) = env.store.get("s-1").summary().camera("cam1").parts
    with part.path.open("ab") as f:  # a long recording: far more than the sockets buffer
        f.write(bytes(48 << 20))
    resp = await env.client.get("/recordings/s-1/cam1.0.mp4")
    assert resp.status == 200
    assert (await resp.content.readexactly(1 << 16))[4:8] == b"ftyp"
    await disable(env)
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.read(), 20)
    resp.release()
    assert (await env.client.get("/recordings/s-1/cam1.0.mp4")).status == 401
