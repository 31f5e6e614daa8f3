"""Idle connections at the cap give their slots up (review s13).

A few addresses holding idle TLS connections, re-opened whenever they were cut,
held every slot of the receiver (9 x 256 of 2048): a device reconnecting was
reset (and raised its OFFLINE alarm), an officer's request refused. At a cap a
new connection now takes the slot of one that has done nothing useful yet (TLS
handshake or first request not done), or else of one idle after a request; it
is refused only when the cap is held by busy connections (a request being
served, a WebSocket). The per-address cap counts an IPv6 /64 as one address.

Real sockets and real TLS on 127.0.0.1; attackers connect from other loopback
addresses (127.0.0.2, ...), so that a group's cap can be told from the total.
The pure accounting (:class:`ConnectionSlots`) is tested by itself too, for
IPv6 groups: this host has one IPv6 loopback address, ``::1``, not a /64.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from yarl import URL

from agent import lan_guard
from agent import protocol as p
from agent.connection_slots import ConnectionSlots, Stage, address_group
from agent.lan_guard import ApiLimits
from provisioning.tls import fingerprint_digest
from receiver.accounts import Role, address_key
from receiver.auth import COOKIE
from receiver.limits import ServerLimits
from receiver.server import Receiver
from tests.logins import FAST, add_account, client_for, log_in, tls_context
from tests.test_receiver_abuse import assert_json_error, connect, enroll, http
from tests.uplink import connect_device

pytestmark = pytest.mark.timeout(60)

#: Small caps; time bounds far beyond a test, so that every cut seen is an eviction.
SLOTS = ServerLimits(
    tls_handshake_s=60.0, header_s=60.0, body_s=60.0, max_connections=30, max_per_address=10
)
ATTACKERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` (state changed by other tasks) until it holds; fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


def cut(conn: Conn) -> bool:
    """Whether the server closed or reset ``conn`` (seen by its reader)."""
    reader = conn[0]
    return reader.at_eof() or reader.exception() is not None


def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()


@contextlib.asynccontextmanager
async def receiver(folder: Path, limits: ServerLimits = SLOTS) -> AsyncIterator[Receiver]:
    async with Receiver(folder, "127.0.0.1", 0, password_params=FAST, limits=limits) as rx:
        assert rx.site is not None
        yield rx


async def idle(rx: Receiver | Any, source: str, kind: str) -> Conn:
    """A connection that does nothing useful: ``tcp`` (no TLS byte), ``tls`` (handshake
    done, nothing sent) or ``slow`` (TLS, and half a request's headers)."""
    conn = await connect(rx, source, tls=kind != "tcp")
    if kind == "slow":
        conn[1].write(b"GET /v1/me HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        await conn[1].drain()
    return conn


async def keep_alive_request(rx: Receiver | Any, conn: Conn, path: str = "/v1/me") -> int:
    """A request on a kept-alive connection, its answer read whole; the status."""
    reader, writer = conn
    port = rx.port
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        length = int({k.lower(): v for k, v in fields.items()}["content-length"])
        await reader.readexactly(length)
    return int(lines[0].split()[1])


@contextlib.asynccontextmanager
async def device(
    rx: Receiver, key: Ed25519PrivateKey, name: str, source: str = "127.0.0.1"
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A device's uplink from ``source``, through its challenge (a busy connection)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        ws, welcome = await connect_device(session, rx, p.Uplink(p.Role.AGENT), key, name)
        assert isinstance(welcome, p.Welcome)
        try:
            yield ws
        finally:
            await ws.close()


async def officer_cookie(rx: Receiver) -> str:
    """An officer's session cookie (the client that logged in is closed, and its slot
    given back)."""
    await add_account(rx.accounts, "officer-1", Role.OFFICER)
    async with client_for(rx.url, rx.fingerprint) as officer:
        await log_in(officer, rx.url, "officer-1")
        cookie = officer.cookie_jar.filter_cookies(URL(rx.url))[COOKIE].value
    assert rx.site is not None
    await until(lambda: rx.site is not None and rx.site.open_connections == 0)
    return cookie


# -- the receiver -----------------------------------------------------------------------


async def test_idle_connections_filling_the_cap_make_room_for_a_device_and_an_officer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The review's attack, scaled down: 3 addresses x 10 idle connections hold all 30
    slots; a device's uplink and an officer's request from 127.0.0.1 get in all the same,
    each taking the slot of an idle one (the oldest of the largest group)."""
    caplog.set_level(logging.INFO, "receiver.listener")
    async with receiver(tmp_path / "rx") as rx:
        site = rx.site
        assert site is not None
        key = enroll(rx, tmp_path, "dev-1")
        cookie = await officer_cookie(rx)
        held: dict[str, list[Conn]] = {}
        for source, kind in zip(ATTACKERS, ("tcp", "tls", "slow"), strict=True):
            held[source] = [await idle(rx, source, kind) for _ in range(10)]
        await until(lambda: site.open_connections == 30)
        assert site.evicted.total() == 0

        async with device(rx, key, "dev-1") as ws:
            answer = await http(rx, "GET", "/v1/me", headers={"Cookie": f"{COOKIE}={cookie}"})
            assert answer.status == 200, answer.body[:200]
            assert answer.json()["user"] == "officer-1"
            # Two idle ones were cut, one for each: none of the others, nor the device.
            attackers = [c for conns in held.values() for c in conns]
            await until(lambda: sum(map(cut, attackers)) == 2)
            assert site.evicted == {"total": 2} and not site.refused
            assert [i for i, c in enumerate(held[ATTACKERS[0]]) if cut(c)] == [0]
            assert [i for i, c in enumerate(held[ATTACKERS[1]]) if cut(c)] == [0]
            assert not any(map(cut, held[ATTACKERS[2]]))
            assert sum(site.connections_from(a) for a in ATTACKERS) == 28
            assert not ws.closed
        with pytest.raises(ConnectionResetError):  # cut with a reset, not a FIN
            await held[ATTACKERS[0]][0][0].read(1)
        close_all(attackers)
        await until(lambda: site.open_connections == 0)
    cuts = [r.getMessage() for r in caplog.records if "cut a connection" in r.getMessage()]
    assert len(cuts) == 2, cuts
    assert "127.0.0.2 (TLS handshake unfinished" in cuts[0], cuts
    assert "127.0.0.3 (no request yet" in cuts[1], cuts


async def test_one_address_at_its_cap_makes_room_by_cutting_its_own_oldest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At the per-address cap a new connection from that address cuts the address's own
    oldest idle one (never another's), logged once, not once per connection."""
    caplog.set_level(logging.INFO, "receiver.listener")
    async with receiver(tmp_path / "rx") as rx:
        site = rx.site
        assert site is not None
        other = await idle(rx, ATTACKERS[1], "tcp")  # the oldest of all: not its turn
        mine = [await idle(rx, ATTACKERS[0], "tcp") for _ in range(10)]
        await until(lambda: site.connections_from(ATTACKERS[0]) == 10)
        newer = [await idle(rx, ATTACKERS[0], "tls") for _ in range(5)]
        await until(lambda: sum(map(cut, mine)) == 5)
        assert [cut(c) for c in mine] == [True] * 5 + [False] * 5
        assert not any(map(cut, newer)) and not cut(other)
        assert site.connections_from(ATTACKERS[0]) == 10
        assert site.evicted == {"per_address": 5} and not site.refused
        # The newest of them is served.
        assert await keep_alive_request(rx, newer[-1]) == 401
        close_all([other, *mine, *newer])
        await until(lambda: site.open_connections == 0)
    cuts = [r.getMessage() for r in caplog.records if "cut a connection" in r.getMessage()]
    assert len(cuts) == 1 and "10 connections from it already" in cuts[0], cuts


async def test_an_idle_keep_alive_connection_gives_way_only_when_none_is_unproven(
    tmp_path: Path,
) -> None:
    """A connection idle after its request is cut for a new one only when no unproven
    one is left: a slowloris cannot hold slots by answering one request a connection."""
    limits = ServerLimits(tls_handshake_s=60.0, header_s=60.0, max_connections=3, max_per_address=3)
    async with receiver(tmp_path / "rx", limits) as rx:
        site = rx.site
        assert site is not None
        key = enroll(rx, tmp_path, "dev-1")
        async with device(rx, key, "dev-1"):
            k1 = await connect(rx, "127.0.0.2")
            assert await keep_alive_request(rx, k1) == 401
            k2 = await connect(rx, "127.0.0.3")
            assert await keep_alive_request(rx, k2) == 401
            await until(lambda: site.open_connections == 3)
            r = await idle(rx, "127.0.0.4", "tcp")  # none unproven: the longest idle gives way
            await until(lambda: cut(k1))
            s = await idle(rx, "127.0.0.5", "tcp")  # the unproven one gives way, not k2
            await until(lambda: cut(r))
            assert not cut(k2) and not cut(s)
            assert await keep_alive_request(rx, k2) == 401
            assert site.evicted == {"total": 2} and not site.refused
            close_all([k1, k2, r, s])
        await until(lambda: site.open_connections == 0)


async def test_a_cap_held_by_busy_connections_refuses_the_new_one_as_before(
    tmp_path: Path,
) -> None:
    """Uplinks (and a request being served) are never cut to make room: over a cap they
    hold, a new connection is reset at once, as before."""
    limits = ServerLimits(max_connections=3, max_per_address=2)
    async with receiver(tmp_path / "rx", limits) as rx:
        site = rx.site
        assert site is not None
        keys = {name: enroll(rx, tmp_path, name) for name in ("dev-1", "dev-2", "dev-3", "dev-4")}
        async with contextlib.AsyncExitStack() as stack:

            async def uplink(name: str, source: str = "127.0.0.1") -> Any:
                return await stack.enter_async_context(device(rx, keys[name], name, source))

            wss = [await uplink("dev-1"), await uplink("dev-2")]
            with pytest.raises((aiohttp.ClientError, ConnectionError, ssl.SSLError)):
                await uplink("dev-3")
            assert site.refused == {"per_address": 1}
            wss.append(await uplink("dev-4", "127.0.0.2"))
            start = time.monotonic()
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await connect(rx, "127.0.0.3")
            assert time.monotonic() - start < 1.0
            assert site.refused == {"per_address": 1, "total": 1}
            assert not site.evicted and not any(ws.closed for ws in wss)
            assert site.open_connections == 3
        await until(lambda: site.open_connections == 0)
        answer = await http(rx, "GET", "/v1/me")  # room again
        assert_json_error(answer, 401, "unauthenticated")


async def test_connections_cut_in_a_churn_are_each_counted_free_once(tmp_path: Path) -> None:
    """Four addresses open 5 connections each, 12 rounds, at a cap of 6: all at once
    (slots taken from handshakes not begun and under way), or one after the other per
    address (from connections that finished their handshake, with or without a request
    answered). Every slot is given back exactly once: none left held (a leak), the count
    never below zero nor over the cap (a double free)."""
    limits = ServerLimits(tls_handshake_s=60.0, header_s=60.0, max_connections=6, max_per_address=3)
    async with receiver(tmp_path / "rx", limits) as rx:
        site = rx.site
        assert site is not None
        seen: list[int] = []
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                seen.append(site.open_connections)
                await asyncio.sleep(0)

        async def one(source: str, i: int, opened: list[Conn]) -> int:
            """1 if it was answered (it may be cut first: 0)."""
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError, OSError):
                conn = await connect(rx, source, tls=i % 3 != 0)
                opened.append(conn)
                if i % 3 == 2:
                    return int(await keep_alive_request(rx, conn) == 401)
            return 0

        async def in_turn(source: str, opened: list[Conn]) -> int:
            return sum([await one(source, i, opened) for i in range(5)])

        sources = (*ATTACKERS, "127.0.0.5")
        watcher = asyncio.create_task(watch())
        served = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for round_ in range(12):
                opened: list[Conn] = []
                if round_ % 2:
                    results = await asyncio.gather(*(in_turn(s, opened) for s in sources))
                else:
                    results = await asyncio.gather(
                        *(one(s, i, opened) for s in sources for i in range(5))
                    )
                served += sum(results)
                close_all(opened)
            await until(lambda: site.open_connections == 0)
            done.set()
            await watcher
            gc.collect()
        # A socket left to the garbage collector (a handshake cut before it began).
        assert not [str(w.message) for w in caught if w.category is ResourceWarning]
        assert site.slots.evictable == 0 and sum(site.slots.held_by(a) for a in ATTACKERS) == 0
        assert min(seen) >= 0 and max(seen) <= 6, (min(seen), max(seen))
        assert site.evicted.total() > 0, "the churn never reached the cap"
        assert served > 0
        answer = await http(rx, "GET", "/v1/me")
        assert_json_error(answer, 401, "unauthenticated")


def ipv6_loopback() -> bool:
    with socket.socket(socket.AF_INET6) as s:
        try:
            s.bind(("::1", 0))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback address")
async def test_over_ipv6_a_connection_counts_in_its_slash_64(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """::1 is the only IPv6 loopback address (other addresses of a /64 are tested on the
    accounting alone, below): its connections count as ``::/64``'s, and at the group's
    cap the group's oldest idle one makes room."""
    caplog.set_level(logging.INFO, "receiver.listener")
    limits = ServerLimits(tls_handshake_s=60.0, max_connections=30, max_per_address=3)
    async with Receiver(tmp_path / "rx", "::1", 0, password_params=FAST, limits=limits) as rx:
        site = rx.site
        assert site is not None

        async def open_v6(tls: bool) -> Conn:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    "::1", rx.port, ssl=_insecure() if tls else None,
                    server_hostname="::1" if tls else None,
                ),
                5,
            )  # fmt: skip

        held = [await open_v6(tls=False) for _ in range(3)]
        await until(lambda: site.connections_from("::1") == 3)
        assert site.connections_from("::2") == 3  # the same /64
        newer = await open_v6(tls=True)
        assert await keep_alive_request(rx, newer) == 401
        await until(lambda: cut(held[0]))
        assert not cut(held[1]) and not cut(held[2])
        assert site.evicted == {"per_address": 1} and site.connections_from("::1") == 3
        close_all([*held, newer])
        await until(lambda: site.open_connections == 0)
    assert any("3 connections from ::/64 already" in r.getMessage() for r in caplog.records)


def _insecure() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


# -- the agent's Local API: the same site --------------------------------------------------


async def test_the_local_api_makes_room_the_same_way(tmp_path: Path) -> None:
    tls, pin = tls_context(tmp_path)

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    limits = ApiLimits(tls_handshake_s=60.0, header_s=60.0, max_connections=6, max_per_address=3)
    app = web.Application(handler_args=limits.handler_args())
    app.router.add_get("/ping", ping)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = lan_guard.GuardedSite(runner, sock, ssl_context=tls, limits=limits)
    await site.start()
    api = SimpleNamespace(port=sock.getsockname()[1])
    try:
        held = [await idle(api, s, "tcp") for s in ATTACKERS[:2] for _ in range(3)]
        await until(lambda: site.open_connections == 6)
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.5", 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as client:
            url = f"https://127.0.0.1:{api.port}/ping"
            async with client.get(url, ssl=aiohttp.Fingerprint(fingerprint_digest(pin))) as r:
                assert r.status == 200 and await r.json() == {"ok": True}
        await until(lambda: sum(map(cut, held)) == 1)
        assert cut(held[0]) and site.evicted == {"total": 1} and not site.refused
        close_all(held)
        await until(lambda: site.open_connections == 0)
    finally:
        await runner.cleanup()


# -- the accounting, by itself --------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "::1",
        "2001:db8::1",
        "2001:db8:0:0:ffff::1",
        "2001:db8:0:1::1",
        "fe80::1%eth0",
        "::ffff:192.0.2.7",
        "not an address",
        "x" * 100,
        "",
    ],
)
def test_addresses_are_grouped_as_the_login_limiter_groups_them(address: str) -> None:
    assert address_group(address) == address_key(address)


def test_an_ipv6_slash_64_counts_as_one_address() -> None:
    slots = ConnectionSlots(cap=10, per_group=2)
    a, _, _ = slots.admit("2001:db8::1")
    b, _, _ = slots.admit("2001:db8::ffff:2")
    assert a is not None and b is not None
    assert slots.held_by("2001:db8::3") == 2 and slots.held_by("2001:db8:0:1::1") == 0
    c, victim, reason = slots.admit("2001:db8::3")  # its /64 is full: its oldest gives way
    assert c is not None and victim is a and reason == "per_address"
    d, victim, reason = slots.admit("2001:db8:0:1::1")  # another /64
    assert d is not None and victim is None and reason is None
    for slot in (b, c):
        slots.request_began(slot, whole=True)  # busy: never cut
    e, victim, reason = slots.admit("2001:db8::4")
    assert e is None and victim is None and reason == "per_address"
    assert slots.open == 3


def test_the_largest_group_gives_way_not_the_oldest_handshake() -> None:
    """An attacker re-opening connections as fast as it can cuts its own: a client's
    handshake under way (the oldest, here) is not cut while a group holds more."""
    slots = ConnectionSlots(cap=5, per_group=5)
    client, _, _ = slots.admit("192.0.2.1")
    attacker = [slots.admit("198.51.100.9")[0] for _ in range(3)]
    other, _, _ = slots.admit("203.0.113.5")
    for _ in range(20):
        _, victim, reason = slots.admit("198.51.100.9")
        assert victim is not None and victim.group == "198.51.100.9" and reason == "total"
    assert client is not None and not client.freed and other is not None and not other.freed
    assert slots.open == 5 and all(s is not None and s.freed for s in attacker)


def test_a_slot_is_counted_free_once_whatever_reports_its_end() -> None:
    slots = ConnectionSlots(cap=2, per_group=2)
    a, _, _ = slots.admit("192.0.2.1")
    b, _, _ = slots.admit("192.0.2.2")
    assert a is not None and b is not None
    n = slots.request_began(a, whole=False)  # headers in, the body not yet: still unproven
    c, victim, _ = slots.admit("192.0.2.3")
    assert victim is a and c is not None
    assert not slots.free(a)  # its connection_lost, its handshake task: counted once
    slots.body_whole(a, n)  # late callbacks of an evicted slot change nothing
    slots.request_ended(a, n)
    assert slots.open == 2 and slots.evictable == 2 and a.stage is Stage.HANDSHAKE
    assert slots.free(b) and not slots.free(b) and slots.open == 1


def test_a_connection_evicted_as_its_handshake_completes_is_aborted_and_freed_once() -> None:
    """The handshake finished (its protocol's connection_made) after the slot was given
    to another connection: the transport is aborted there, the protocol never told, and
    the slot not counted again when the connection is lost."""
    slots = ConnectionSlots(cap=1, per_group=1)
    slot, _, _ = slots.admit("192.0.2.1")
    assert slot is not None
    newer, victim, _ = slots.admit("192.0.2.1")  # evicted during its handshake
    assert victim is slot and newer is not None
    told: list[str] = []
    inner = SimpleNamespace(
        connection_made=lambda t: told.append("made"),
        connection_lost=lambda e: told.append("lost"),
    )
    transport = SimpleNamespace(aborted=0)
    transport.abort = lambda: setattr(transport, "aborted", transport.aborted + 1)
    wrapper = lan_guard._SlotProtocol(inner, SimpleNamespace(slots=slots), slot)  # type: ignore[arg-type]
    wrapper.connection_made(transport)  # type: ignore[arg-type]
    assert transport.aborted == 1 and told == []
    wrapper.connection_lost(None)
    assert told == [] and slots.open == 1 and slots.held_by("192.0.2.1") == 1
