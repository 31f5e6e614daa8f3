"""Abuse of the receiver over real TLS on 127.0.0.1 (issue #6, "Bad input").

Slow clients, oversized and malformed requests, devices that flood: each is
refused or cut with a clear error within a bounded time, other devices and
viewers go on, and nothing acknowledged is lost.

Attackers connect from other loopback addresses (127.0.0.2, ...: every
127/8 address is this machine's loopback; the receiver listens on 127.0.0.1
only) so that the per-address limit can be told from the total. Figures
(cut times, latencies, RSS) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import re
import socket
import ssl
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from agent.connection_slots import address_group
from provisioning.keys import load_private_key, new_private_key, public_pem
from provisioning.tls import fingerprint_digest
from receiver import ingest
from receiver.accounts import Role
from receiver.accounts_api import MAX_BODY as ACCOUNT_BODY
from receiver.auth import COOKIE, CSRF_HEADER
from receiver.ingest import ABANDONED_AFTER_S, UplinkLimits
from receiver.limits import ServerLimits
from receiver.server import Receiver
from tests.logins import FAST, add_account, client_for, log_in
from tests.media import PacketList, make_h264_packets
from tests.uplink import connect_device

pytestmark = pytest.mark.timeout(60)

#: Short bounds, so that a test sees several of them pass.
LIMITS = ServerLimits(
    tls_handshake_s=2.0, header_s=2.0, body_s=2.0, max_connections=64, max_per_address=16
)
ATTACKER = "127.0.0.2"
SECRET = b"this file lies outside DATA 6b1f"


@pytest.fixture(scope="module")
def small_packets() -> PacketList:
    """30 frames of 160x120 H.264 (keyframe at 0): a camera's GOP, looped by the senders."""
    return make_h264_packets(30, width=160, height=120)


@pytest.fixture
async def rx(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A receiver with :data:`LIMITS`; a file beside its data folder that it must never serve."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    async with Receiver(
        tmp_path / "receiver", "127.0.0.1", 0, password_params=FAST, limits=LIMITS
    ) as receiver:
        yield receiver


# -- raw TLS clients ------------------------------------------------------------------


@functools.cache
def _tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # raw attackers; the pinned clients check the pin
    return ctx


async def connect(
    rx: Receiver, source: str = "127.0.0.1", *, tls: bool = True
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP (and TLS) connection to ``rx`` from the loopback address ``source``."""
    return await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1",
            rx.port,
            ssl=_tls() if tls else None,
            server_hostname="127.0.0.1" if tls else None,
            local_addr=(source, 0),
        ),
        5,
    )


async def read_to_end(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything until the server closes (a reset counts as the end)."""
    data = b""
    async with asyncio.timeout(within):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except (ConnectionError, ssl.SSLError):
            pass
    return data


@dataclass
class Answer:
    """One HTTP answer as read off the wire."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_answer(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return Answer(status, headers, body)


async def http(
    rx: Receiver,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    source: str = "127.0.0.1",
) -> Answer:
    """One request sent byte for byte as given (no client-side path normalising)."""
    reader, writer = await connect(rx, source)
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{rx.port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    writer.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
    try:
        return parse_answer(await read_to_end(reader, 15))
    finally:
        writer.close()


def assert_json_error(answer: Answer, status: int | None = None, code: str | None = None) -> str:
    """A 4xx with a JSON ``{"error": CODE}`` body; the code."""
    assert 400 <= answer.status < 500, (answer.status, answer.body[:200])
    if status is not None:
        assert answer.status == status, (answer.status, answer.body[:200])
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
    doc = answer.json()
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    if code is not None:
        assert doc["error"] == code, doc
    return str(doc["error"])


# -- devices ------------------------------------------------------------------------------


def enroll(rx: Receiver, folder: Path, device: str) -> Ed25519PrivateKey:
    key = new_private_key(folder / f"{device}.key")
    (rx.devices_dir / f"{device}.pub").write_bytes(public_pem(key.public_key()))
    return key


@dataclass(frozen=True)
class Target:
    """Where a device connects (a :class:`Receiver` has the same three attributes)."""

    uplink_url: str
    fingerprint: str
    origin: str


@dataclass
class Device:
    """A device speaking the protocol by hand; records when each seq was sent and acked."""

    rx: Receiver | Target
    key: Ed25519PrivateKey
    name: str
    conn: p.Uplink = field(default_factory=lambda: p.Uplink(p.Role.AGENT))
    welcome: p.Welcome | None = None
    sent: dict[int, float] = field(default_factory=dict)
    acked: int = -1
    ack_times: list[tuple[int, float]] = field(default_factory=list)
    error: p.Error | None = None
    packets: PacketList = field(default_factory=list)
    close_code: int | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    acks: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Device:
        self.http = aiohttp.ClientSession()
        self.ws, self.welcome = await connect_device(
            self.http, self.rx, self.conn, self.key, self.name, max_msg_size=0, timeout=5
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()
        await asyncio.wait_for(self._reader, 5)

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    self.close_code = int(msg.data)  # the receiver's (ws.close_code may be ours)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    return
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                event = self.conn.receive(msg.data)
                if isinstance(event, p.Ack) and event.seq > self.acked:
                    self.acked = event.seq
                    self.ack_times.append((event.seq, time.monotonic()))
                    self.acks.set()
                elif isinstance(event, p.Error):
                    self.error = event
        finally:
            self.closed.set()

    async def open_session(self, session: str, packets: PacketList) -> None:
        self.packets = packets
        extradata = packets[0][0][: packets[0][0].find(b"\x00\x00\x00\x01\x65")]
        desc = p.CameraDesc(0, "cam", "interior", "h264", 160, 120, 30.0, extradata, 0, 0)
        opened = p.SessionOpen(session, "bldg", {"kind": "test"}, 1.0, 2.0, (desc,))
        await self.ws.send_str(str(self.conn.send(opened)))

    def media(self, seq: int, packets: PacketList) -> bytes:
        payload, key = packets[seq % len(packets)]
        wire = self.conn.send(
            p.Media(p.MediaKind.LIVE, 0, seq, 1000 + seq * 33_333, key, False, payload)
        )
        assert isinstance(wire, bytes)
        return wire

    async def stream(
        self, packets: PacketList, count: int, fps: float = 30.0, first: int = 0
    ) -> None:
        """``count`` packets from seq ``first`` at ``fps``, paced by the clock as a camera is."""
        start = time.monotonic()
        for seq in range(first, first + count):
            due = start + (seq - first) / fps
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            self.sent[seq] = time.monotonic()
            await self.ws.send_bytes(self.media(seq, packets))

    async def wait_acked(self, seq: int, within: float = 10) -> None:
        async with asyncio.timeout(within):
            while self.acked < seq:
                self.acks.clear()
                await self.acks.wait()

    def ack_latencies(self) -> list[float]:
        """Per seq N: from the send of N+1 (the muxer writes N when N+1 comes) to N's ack."""
        out = []
        times = iter(self.ack_times)
        current = next(times, None)
        for seq in sorted(self.sent)[:-1]:
            while current is not None and current[0] < seq:
                current = next(times, None)
            if current is None:
                break
            out.append(max(0.0, current[1] - self.sent[seq + 1]))
        return out

    async def cut_with(self, within: float = 10) -> p.Error | None:
        """Wait for the receiver to close the uplink; its error, if it sent one."""
        await asyncio.wait_for(self.closed.wait(), within)
        return self.error


def summary(values: list[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"p50 {statistics.median(ordered) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {ordered[-1] * 1000:.0f} ms (n={len(ordered)})"
    )


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def viewer_latencies(http_client: aiohttp.ClientSession, rx: Receiver, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.monotonic()
        async with http_client.get(rx.url + "api/sessions") as resp:
            assert resp.status == 200
            await resp.read()
        out.append(time.monotonic() - start)
    return out


# -- 1. slow clients -----------------------------------------------------------------------


async def _slow_headers(rx: Receiver) -> float:
    """Headers a byte at a time after the TLS handshake; seconds until the receiver cuts."""
    reader, writer = await connect(rx, ATTACKER)
    start = time.monotonic()
    writer.write(b"GET /login HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        for _ in range(100):  # 10 s at most
            writer.write(b"a")
            try:
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    break
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                break
        return time.monotonic() - start
    finally:
        writer.close()


async def _no_handshake(rx: Receiver) -> float:
    """A TCP connection that starts a TLS ClientHello and stops; seconds until cut."""
    reader, writer = await connect(rx, ATTACKER, tls=False)
    start = time.monotonic()
    writer.write(b"\x16\x03\x01\x02\x00\x01")  # a record header and one byte of 512
    await read_to_end(reader, 10)
    writer.close()
    return time.monotonic() - start


async def _no_body(rx: Receiver) -> tuple[float, Answer]:
    """A POST announcing 100 bytes and sending 10; seconds until cut, and the answer."""
    reader, writer = await connect(rx, ATTACKER)
    start = time.monotonic()
    writer.write(
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Origin: https://x\r\nContent-Length: 100\r\n\r\n" + b'{"name": "'
    )
    data = await read_to_end(reader, 10)
    writer.close()
    return time.monotonic() - start, parse_answer(data)


async def test_slow_clients_are_cut_in_bounded_time_while_others_are_served(
    tmp_path: Path, rx: Receiver, small_packets: PacketList
) -> None:
    key = enroll(rx, tmp_path, "dev-ok")
    await add_account(rx.accounts, "officer-1", Role.OFFICER)
    async with client_for(rx.url, rx.fingerprint) as officer:
        await log_in(officer, rx.url, "officer-1")
        before = await viewer_latencies(officer, rx, 10)
        # 16 slow clients from one address: its whole allowance.
        attacks: list[asyncio.Task[Any]] = []
        for _ in range(6):
            attacks.append(asyncio.create_task(_slow_headers(rx)))
        for _ in range(6):
            attacks.append(asyncio.create_task(_no_handshake(rx)))
        for _ in range(4):
            attacks.append(asyncio.create_task(_no_body(rx)))
        async with asyncio.timeout(5):
            while rx.site is not None and rx.site.connections_from(ATTACKER) < 16:
                await asyncio.sleep(0.01)  # polled: the attackers connect on their own tasks
        # (One more from that address would take the slot of its own oldest idle one:
        # tests/test_connection_slots.py.)
        assert rx.site is not None
        # Meanwhile an officer and a device are served as before.
        during = await viewer_latencies(officer, rx, 10)
        async with Device(rx, key, "dev-ok") as dev:
            await dev.open_session("s-ok", small_packets)
            await dev.stream(small_packets, 30)
            await dev.wait_acked(28)
            assert rx.site.connections_from(ATTACKER) == 16  # all still hanging on
        results = await asyncio.gather(*attacks)
    header_cuts = results[:6]
    tls_cuts = results[6:12]
    body_cuts = [r[0] for r in results[12:]]
    for _, answer in results[12:]:
        assert_json_error(answer, 408, "body_timeout")
    print(
        f"\nslow headers cut after {min(header_cuts):.2f}-{max(header_cuts):.2f} s "
        f"(header_s {LIMITS.header_s}); TLS handshake never finished: cut after "
        f"{min(tls_cuts):.2f}-{max(tls_cuts):.2f} s (tls_handshake_s {LIMITS.tls_handshake_s}); "
        f"body never sent: 408 after {min(body_cuts):.2f}-{max(body_cuts):.2f} s "
        f"(body_s {LIMITS.body_s})\nofficer /api/sessions before: {summary(before)}; "
        f"during: {summary(during)}\ndevice ack latency during: {summary(dev.ack_latencies())}"
    )
    for cuts, limit in (
        (header_cuts, LIMITS.header_s),
        (tls_cuts, LIMITS.tls_handshake_s),
        (body_cuts, LIMITS.body_s),
    ):
        assert all(limit - 0.2 <= t <= limit + 1.5 for t in cuts), (cuts, limit)
    assert max(during) < max(before) + 0.5
    assert max(dev.ack_latencies()) < 1.0
    assert rx.site.connections_from(ATTACKER) == 0


async def test_connections_are_capped_in_all(tmp_path: Path) -> None:
    limits = ServerLimits(tls_handshake_s=1.0, max_connections=8, max_per_address=4)
    async with Receiver(tmp_path / "rx", "127.0.0.1", 0, password_params=FAST, limits=limits) as rx:
        assert rx.site is not None
        held = [
            await connect(rx, source, tls=False)
            for source in ("127.0.0.2", "127.0.0.3")
            for _ in range(4)
        ]
        async with asyncio.timeout(5):
            while rx.site.open_connections < 8:
                await asyncio.sleep(0.01)  # polled: accepts run on the receiver's task
        # A ninth takes the slot of an idle one (tests/test_connection_slots.py), which is
        # cut at once; the others when their handshake time runs out.
        answer = await http(rx, "GET", "/v1/me", source="127.0.0.4")
        assert_json_error(answer, 401, "unauthenticated")
        assert rx.site.evicted == {"total": 1} and not rx.site.refused
        for reader, writer in held:
            await read_to_end(reader, 5)
            writer.close()
        async with asyncio.timeout(5):
            while rx.site.open_connections:
                await asyncio.sleep(0.01)  # polled: the receiver sees the closes on its task


async def test_uplink_handshakes_in_progress_are_bounded(rx: Receiver) -> None:
    pin = aiohttp.Fingerprint(fingerprint_digest(rx.fingerprint))
    async with aiohttp.ClientSession() as http_client:
        waiting = []
        for _ in range(UplinkLimits().max_handshakes_per_address):
            ws = await http_client.ws_connect(rx.uplink_url, ssl=pin)
            assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.TEXT  # the challenge
            waiting.append(ws)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http_client.ws_connect(rx.uplink_url, ssl=pin)
        assert refused.value.status == 503
        for ws in waiting:
            await ws.close()
        ws = await http_client.ws_connect(rx.uplink_url, ssl=pin)  # room again
        await ws.close()
    assert rx.ingest.refused["busy"] == 1


async def test_uplink_handshakes_are_counted_per_ipv6_64(rx: Receiver) -> None:
    # One host's /64 holds 2^64 addresses: counted per address, it could hold every
    # handshake slot of the receiver from addresses of its own.
    limit = UplinkLimits().max_handshakes_per_address
    rx.ingest._handshaking[address_group("2001:db8:1:2::1")] = limit
    try:
        refused = rx.ingest._busy("2001:db8:1:2::ffff", address_group("2001:db8:1:2::ffff"))
        assert refused is not None and refused.status == 503
        assert rx.ingest._busy("2001:db8:1:3::1", address_group("2001:db8:1:3::1")) is None
    finally:
        rx.ingest._handshaking.clear()


# -- 2. oversized ---------------------------------------------------------------------


POST_ROUTES = [
    "/login",
    "/logout",
    "/v1/dispatch",
    "/v1/evidence/s-1",
    "/v1/users",
    "/v1/users/officer-1/disable",
]


@pytest.mark.parametrize("route", POST_ROUTES)
async def test_oversized_bodies_get_413_and_are_not_read(rx: Receiver, route: str) -> None:
    reader, writer = await connect(rx)
    start = time.monotonic()
    writer.write(
        f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {100 * 1024 * 1024}\r\n\r\n".encode()
        + bytes(64 * 1024)
    )
    data = await read_to_end(reader, 5)  # the rest is never sent: the receiver must not wait
    writer.close()
    elapsed = time.monotonic() - start
    print(f"\n{route}: 413 and closed {elapsed * 1000:.0f} ms after 64 KiB of 100 MiB announced")
    assert elapsed < 1.5
    assert_json_error(parse_answer(data), 413, "too_large")


async def test_body_limits_for_a_logged_in_admin(rx: Receiver) -> None:
    await add_account(rx.accounts, "admin-1", Role.ADMIN)
    async with client_for(rx.url, rx.fingerprint) as admin:
        await log_in(admin, rx.url, "admin-1")
        big = json.dumps({"name": "x" * (LIMITS.max_body + 1)}).encode()
        async with admin.post(rx.url + "v1/users", data=big) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "too_large"
        # Within the server's bound, the handler's own: account bodies are small.
        json_type = {"Content-Type": "application/json"}
        at_limit = b"{" + b" " * (LIMITS.max_body - 2) + b"["
        async with admin.post(rx.url + "v1/users", data=at_limit, headers=json_type) as resp:
            assert resp.status == 413
            assert (await resp.json())["detail"] == f"at most {ACCOUNT_BODY} bytes"
        async with admin.post(rx.url + "v1/users", data=b"{[", headers=json_type) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "malformed"
        async with admin.post(rx.url + "v1/users", data=b"{[") as resp:  # not even said JSON
            assert resp.status == 415
            assert (await resp.json())["error"] == "malformed"

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"name": "x"}'

        async with admin.post(rx.url + "v1/users", data=chunks()) as resp:  # chunked
            assert resp.status == 411
            assert (await resp.json())["error"] == "length_required"
        async with admin.get(rx.url + "v1/me") as resp:  # the login goes on
            assert resp.status == 200


@pytest.mark.parametrize(
    ("what", "headers", "target"),
    [
        ("a header over 8 KiB", {"X-Big": "a" * 9000}, "/login"),
        ("too many headers", {f"X-H{i}": "a" for i in range(100)}, "/login"),
        ("a query string over 8 KiB", {}, "/api/sessions?q=" + "a" * 9000),
    ],
)
async def test_oversized_headers_get_431_json(
    rx: Receiver, what: str, headers: dict[str, str], target: str
) -> None:
    answer = await http(rx, "GET", target, headers=headers)
    assert_json_error(answer, 431, "headers_too_large")


async def test_a_long_query_within_the_limit_is_an_ordinary_request(rx: Receiver) -> None:
    answer = await http(rx, "GET", "/api/sessions?q=" + "a" * 7000)
    assert_json_error(answer, 401, "unauthenticated")


async def test_oversized_live_view_message_is_refused_with_a_close_code(
    tmp_path: Path, rx: Receiver, small_packets: PacketList
) -> None:
    async with Device(rx, enroll(rx, tmp_path, "dev-live"), "dev-live") as dev:
        await dev.open_session("s-live", small_packets)
        await dev.stream(small_packets, 3, fps=1000)
        await dev.wait_acked(1)
        await add_account(rx.accounts, "officer-1", Role.OFFICER)
        async with client_for(rx.url, rx.fingerprint) as officer:
            await log_in(officer, rx.url, "officer-1")
            ws = await officer.ws_connect(rx.url + "v1/live/s-live/cam")
            await ws.send_str("x" * 10_000)
            async with asyncio.timeout(10):
                while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
                    pass
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


# -- 3. devices that flood or send garbage ---------------------------------------------------


FloodStep = Callable[[Device, int], Awaitable[None]]


async def _heartbeat(dev: Device, i: int) -> None:
    await dev.ws.send_str(str(dev.conn.send(p.Heartbeat(time.time()))))
    await asyncio.sleep(0.001)  # pacing: 1000 a second


async def _session_open(dev: Device, i: int) -> None:
    await dev.open_session(f"s-flood-{i}", dev.packets)


async def _trigger_result(dev: Device, i: int) -> None:
    answer = p.TriggerResult(f"ref-{i}", 200, {"ok": True})  # answers nothing asked
    await dev.ws.send_str(str(dev.conn.send(answer)))


async def _media(dev: Device, i: int) -> None:
    await dev.ws.send_bytes(dev.media(i, dev.packets))  # a 30 fps camera's packets, unpaced


FLOODS: dict[str, FloodStep] = {
    "heartbeats": _heartbeat,
    "session_open": _session_open,
    "control messages": _trigger_result,
    "media": _media,
}


async def flood(spec: dict[str, Any]) -> dict[str, Any]:
    """The flooding device (in its own process, so it never holds the receiver's loop)."""
    target = Target(spec["uplink_url"], spec["fingerprint"], spec["origin"])
    async with Device(target, load_private_key(Path(spec["key"])), spec["device"]) as dev:
        dev.packets = make_h264_packets(30, width=160, height=120)
        if spec["kind"] == "media":
            await dev.open_session("s-flood", dev.packets)
        print("flooding", flush=True)
        step, sent, start = FLOODS[spec["kind"]], 0, time.monotonic()
        while not dev.closed.is_set() and sent < spec["count"]:
            if time.monotonic() - start > spec["seconds"]:
                break
            try:
                await step(dev, sent)
            except ConnectionError:
                break  # cut: the reader sees the error and the close
            sent += 1
            await asyncio.sleep(0)  # a yield, so that the reader sees the cut
        elapsed = time.monotonic() - start
        if spec["kind"] == "media":  # everything sent is acknowledged once closed
            await dev.ws.send_str(str(dev.conn.send(p.SessionClose("s-flood", "done"))))
            await dev.wait_acked(sent - 1, within=30)
        else:
            await dev.cut_with(within=15)
    error = None if dev.error is None else {"code": dev.error.code, "detail": dev.error.detail}
    return {"sent": sent, "seconds": elapsed, "acked": dev.acked, "error": error}


@contextlib.asynccontextmanager
async def flooding(
    rx: Receiver, folder: Path, kind: str, *, seconds: float = 3.0, count: int = 100_000
) -> AsyncIterator[asyncio.Future[dict[str, Any]]]:
    """A device flooding ``rx`` from a child process; yields once it floods, then its result."""
    enroll(rx, folder, "dev-flood")
    spec = {
        "uplink_url": rx.uplink_url,
        "fingerprint": rx.fingerprint,
        "origin": rx.origin,
        "key": str(folder / "dev-flood.key"),
        "device": "dev-flood",
        "kind": kind,
        "seconds": seconds,
        "count": count,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.test_receiver_abuse", json.dumps(spec),
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"flooding\n"

        async def result() -> dict[str, Any]:
            assert proc.stdout is not None
            out = await proc.stdout.read()
            assert await proc.wait() == 0
            return dict(json.loads(out.splitlines()[-1]))

        task = asyncio.ensure_future(result())
        yield task
        await asyncio.wait_for(task, 45)
    finally:
        if proc.returncode is None:
            proc.kill()  # the child we started, by its handle
            await proc.wait()


@pytest.mark.parametrize("kind", ["heartbeats", "session_open", "control messages"])
async def test_a_device_flooding_control_messages_is_cut_once_and_others_go_on(
    tmp_path: Path,
    rx: Receiver,
    small_packets: PacketList,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    caplog.set_level(logging.INFO, logger="receiver")
    async with Device(rx, enroll(rx, tmp_path, "dev-good"), "dev-good") as good:
        await good.open_session("s-good", small_packets)
        async with flooding(rx, tmp_path, kind, count=20_000) as result:
            await good.stream(small_packets, 30)
        await good.wait_acked(28)
    got = result.result()
    assert got["error"] is not None, got
    code = got["error"]["code"]
    if kind == "session_open" and code == "too_many_sessions":
        # The bucket's burst (64) is the cap on open sessions: on a machine slow enough
        # that a token came back meanwhile, the 65th session meets the cap first.
        assert "64 sessions of this device are open" in got["error"]["detail"], got
    else:
        assert code == "rate_limited" and kind in got["error"]["detail"], got
    lines = [r.getMessage() for r in caplog.records if code in r.getMessage()]
    assert len(lines) == 1, lines
    print(
        f"\n{kind} flood: cut with rate_limited ({got['sent']} sent in {got['seconds']:.2f} s "
        f"before the device saw it); the other device's ack latency in the test: "
        f"{summary(good.ack_latencies())}"
    )
    assert max(good.ack_latencies()) < 1.0


async def test_a_device_flooding_media_is_held_back_and_others_go_on(
    tmp_path: Path, rx: Receiver, small_packets: PacketList
) -> None:
    await add_account(rx.accounts, "officer-1", Role.OFFICER)
    async with (
        Device(rx, enroll(rx, tmp_path, "dev-good"), "dev-good") as good,
        client_for(rx.url, rx.fingerprint) as officer,
    ):
        await log_in(officer, rx.url, "officer-1")
        await good.open_session("s-good", small_packets)
        before = await viewer_latencies(officer, rx, 10)
        await good.stream(small_packets, 30)
        await good.wait_acked(28)
        idle = good.ack_latencies()
        good.sent.clear()
        before_rss = rss_mib()
        async with flooding(rx, tmp_path, "media", seconds=2.5) as result:
            viewing = asyncio.create_task(viewer_latencies(officer, rx, 30))
            await good.stream(small_packets, 75, first=30)
            during = await viewing
            during_rss = rss_mib()
        await good.wait_acked(103)
    got = result.result()
    after_rss = rss_mib()
    print(
        f"\nmedia flood: {got['sent']} messages in {got['seconds']:.1f} s "
        f"({got['sent'] / got['seconds']:.0f}/s; the camera declares 30/s), all acknowledged; "
        f"receiver RSS {before_rss:.0f} MiB before, {during_rss:.0f} during, "
        f"{after_rss:.0f} after\nthe other device's ack latency before: {summary(idle)}; "
        f"meanwhile: {summary(good.ack_latencies())}\n"
        f"officer /api/sessions before: {summary(before)}; during: {summary(during)}"
    )
    assert got["error"] is None and got["acked"] == got["sent"] - 1
    assert max(good.ack_latencies()) < 1.0
    assert max(during) < max(before) + 0.5
    assert max(during_rss, after_rss) - before_rss < 200


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{not json", "malformed"),
        (b"\x01\x00garbage", "malformed"),
        ('{"type":"welcome","acked":{},"heartbeat_s":5,"audit_n":0}', "unexpected"),
        (p.MEDIA_HEADER.pack(1, 0, 0, 99, 0, 1, 0) + bytes(p.MAX_PAYLOAD_BYTES + 1), None),
    ],
    ids=["text", "binary", "wrong-side", "oversized"],
)
async def test_garbage_after_the_handshake_is_cut_and_acked_footage_stays(
    tmp_path: Path,
    rx: Receiver,
    small_packets: PacketList,
    message: str | bytes,
    code: str | None,
) -> None:
    key = enroll(rx, tmp_path, "dev-bad")
    async with Device(rx, key, "dev-bad") as dev:
        await dev.open_session("s-bad", small_packets)
        await dev.stream(small_packets, 10, fps=1000)
        await dev.wait_acked(8)
        acked = dev.acked
        if isinstance(message, str):
            await dev.ws.send_str(message)
        else:
            await dev.ws.send_bytes(message)
        error = await dev.cut_with()
        close_code = dev.close_code
    if code is None:  # aiohttp refuses the frame by its header: the WebSocket's own code
        assert close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    else:
        assert error is not None and error.code == code
        assert close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    async with Device(rx, key, "dev-bad") as again:
        assert again.welcome is not None
        assert again.welcome.acked["s-bad"]["cam"] >= acked
    assert rx.store.get("s-bad").summary().camera("cam").parts


async def test_a_device_gone_quiet_gets_heartbeats_then_is_cut_and_its_footage_stays(
    tmp_path: Path, rx: Receiver, small_packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Heartbeats and the silence check run on a task of their own (no timeout around each
    # receive): the device below sends nothing after its footage, reads everything.
    monkeypatch.setattr(ingest, "HEARTBEAT_S", 0.2)
    key = enroll(rx, tmp_path, "dev-quiet")
    beats: list[p.Heartbeat] = []
    real_receive = p.Uplink.receive

    def receive(self: p.Uplink, message: str | bytes) -> p.Event:
        event = real_receive(self, message)
        if isinstance(event, p.Heartbeat) and self.role is p.Role.AGENT:
            beats.append(event)
        return event

    monkeypatch.setattr(p.Uplink, "receive", receive)
    async with Device(rx, key, "dev-quiet") as dev:
        await dev.open_session("s-quiet", small_packets)
        await dev.stream(small_packets, 10, fps=1000)
        await dev.wait_acked(8)
        error = await dev.cut_with()
        assert error is not None and error.code == "timeout", error
        assert dev.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert len(beats) >= 2  # every HEARTBEAT_S until three of them passed unanswered
    assert rx.store.get("s-quiet").camera("cam").durable_seq >= 8


async def test_a_receiver_stopping_closes_each_uplink_going_away_after_recording_it(
    tmp_path: Path, small_packets: PacketList
) -> None:
    """Device uplinks were not closed at shutdown: aiohttp waited its whole
    ``shutdown_timeout`` for their handlers, then cancelled them mid-recording, and the
    device saw the connection drop (no close frame). Each is closed "going away" (1001)
    now, and what it sent stays recorded."""
    data = tmp_path / "receiver"
    async with Receiver(data, "127.0.0.1", 0, password_params=FAST, limits=LIMITS) as rx:
        key = enroll(rx, tmp_path, "dev-stop")
        dev = Device(rx, key, "dev-stop")
        await dev.__aenter__()
        await dev.open_session("s-stop", small_packets)
        await dev.stream(small_packets, 10, fps=1000)
        await dev.wait_acked(8)
    try:
        await dev.cut_with()
        assert dev.close_code == aiohttp.WSCloseCode.GOING_AWAY
    finally:
        await dev.__aexit__()
    async with Receiver(data, "127.0.0.1", 0, password_params=FAST) as again:
        assert again.store.get("s-stop").camera("cam").durable_seq >= 8


# -- 4. unauthenticated and malformed HTTP ------------------------------------------------------


TRAVERSALS = [
    "/recordings/../../secret.txt",
    "/recordings/%2e%2e/%2e%2e/secret.txt",
    "/recordings/s-rec/..%2F..%2F..%2Fsecret.txt",
    "/recordings/s-rec/cam.0.mp4%00.txt",
    "/recordings/..%2f..%2f/cam.0.mp4",
    "/hls/%2e%2e/cam.m3u8",
    "/hls/%2e%2e/%2e%2e/secret.txt",
    "/hls/s-rec/..%2f..%2f..%2fsecret.txt",
    "/hls/s-rec/%2e%2e%2f%2e%2e%2fsession.json",
    "/static/..%2f..%2fserver.py",
    "/static/%2e%2e/limits.py",
    "/v1/live/%2e%2e/cam",
    "/v1/live/s-rec/..%2f..%2fsecret.txt",
    "/v1/evidence/..%2f..%2fsecret",
    "/v1/users/..%2f..%2fadmin/disable",
    "/./secret.txt",
    "//etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
]
ROUTES = [
    "/",
    "/login",
    "/logout",
    "/static/viewer.js",
    "/api/sessions",
    "/v1/devices",
    "/v1/me",
    "/v1/users",
    "/v1/users/officer-1/disable",
    "/v1/dispatch",
    "/v1/evidence/s-rec",
    "/v1/live/s-rec/cam",
    "/v1/uplink",
    "/recordings/s-rec/cam.0.mp4",
    "/hls/s-rec/cam.m3u8",
    "/api/sessions/s-rec/cameras/cam/player-link",
    "/nowhere",
]
BODIES: list[tuple[str, bytes]] = [
    ("application/json", b"{"),
    ("application/json", b"[]"),
    ("application/json", b"null"),
    ("application/json", b'{"name": 5, "role": [], "password": {}, "building": null}'),
    ("application/json", b'{"name": "x", "role": "root", "password": "y", "action": "boom"}'),
    (
        "application/json",
        b'{"name": 5, "role": "officer", "password": "a long test passphrase 42"}',
    ),
    ("application/json", b'{"building": ["b"], "action": "start", "reason": 7}'),
    ("application/json", b"\xff\xfe not utf-8"),
    ("application/json", b"[" * 1000 + b"]" * 1000),  # deeper than the JSON parser goes
    ("text/plain", b"name=x&password=y"),
    ("application/x-www-form-urlencoded", b"name=%ff&password"),
    ("multipart/form-data; boundary=zz", b"--zz\r\nbroken"),
]
METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "BREW"]


async def test_fuzzed_http_requests_are_4xx_json_never_500_never_outside_data(
    tmp_path: Path, rx: Receiver, small_packets: PacketList
) -> None:
    async with Device(rx, enroll(rx, tmp_path, "dev-rec"), "dev-rec") as dev:
        await dev.open_session("s-rec", small_packets)
        await dev.stream(small_packets, 10, fps=1000)
        await dev.wait_acked(8)
    await add_account(rx.accounts, "admin-1", Role.ADMIN)
    await add_account(rx.accounts, "officer-1", Role.OFFICER)
    async with client_for(rx.url, rx.fingerprint) as admin:
        csrf = await log_in(admin, rx.url, "admin-1")
        cookie = next(c.value for c in admin.cookie_jar if c.key == COOKIE)
    logged_in = {"Cookie": f"{COOKIE}={cookie}", CSRF_HEADER: csrf, "Origin": origin(rx)}
    anonymous = {"Origin": origin(rx)}
    seen: dict[int, int] = {}
    codes: set[str] = set()
    requests = 0

    async def check(method: str, target: str, headers: dict[str, str], body: bytes = b"") -> None:
        nonlocal requests
        if headers.get("Cookie") and method == "POST" and target == "/logout":
            return  # would end the login the rest of the pass uses
        requests += 1
        answer = await http(rx, method, target, headers=headers, body=body)
        seen[answer.status] = seen.get(answer.status, 0) + 1
        assert answer.status < 500, (method, target, answer.status, answer.body[:300])
        assert SECRET not in answer.body, (method, target)
        if answer.status >= 400:
            codes.add(assert_json_error(answer))

    for who in (anonymous, logged_in):
        for target in TRAVERSALS:
            await check("GET", target, who)
        for route in ROUTES:
            for method in METHODS:
                await check(method, route, who)
            for content_type, body in BODIES if who is logged_in or route == "/login" else []:
                await check("POST", route, dict(who, **{"Content-Type": content_type}), body)
            await check("GET", route + "?" + "&".join(f"k{i}=%zz%00" for i in range(500)), who)
    # Cookie, CSRF and Origin headers that are wrong rather than missing.
    for bad in (
        {"Cookie": f"{COOKIE}=" + "A" * 4000},
        {"Cookie": f"{COOKIE}={cookie}", CSRF_HEADER: "x" * 5000, "Origin": origin(rx)},
        {"Cookie": f"{COOKIE}={cookie}", CSRF_HEADER: csrf, "Origin": "null"},
        {"Cookie": f"{COOKIE}={cookie}", CSRF_HEADER: "\u00e9".encode().decode("latin-1")},
        {"Cookie": f"{COOKIE}={cookie}", CSRF_HEADER: "\xff\xfe", "Origin": origin(rx)},  # no UTF-8
    ):
        await check("POST", "/v1/users", dict(bad, **{"Content-Type": "application/json"}), b"{}")
    statuses = dict(sorted(seen.items()))
    print(f"\n{requests} fuzzed requests: statuses {statuses}; codes {sorted(codes)}")
    assert all(re.fullmatch(r"[a-z][a-z0-9_]{1,40}", code) for code in codes), codes


def origin(rx: Receiver) -> str:
    return rx.url.rstrip("/")


if __name__ == "__main__":  # the flooding device's process (:func:`flooding`)
    print(json.dumps(asyncio.run(flood(json.loads(sys.argv[1])))))


async def test_a_connection_failing_in_accept_does_not_stop_accepting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept(2) may fail for one connection (ECONNABORTED, EPROTO, ...). That ended the
    accept task: no device or viewer was served again, and nothing said so (found by a
    review)."""
    loop = asyncio.get_running_loop()
    accept = loop.sock_accept
    calls = 0

    async def accept_failing_once(sock: socket.socket) -> tuple[socket.socket, Any]:
        nonlocal calls
        conn, addr = await accept(sock)
        calls += 1
        if calls == 1:
            conn.close()  # the kernel reports the queued connection aborted
            raise ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")
        return conn, addr

    monkeypatch.setattr(loop, "sock_accept", accept_failing_once)
    async with Receiver(tmp_path / "rx", "127.0.0.1", 0, password_params=FAST) as rx:
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await http(rx, "GET", "/v1/me")  # this one is lost
        answer = await http(rx, "GET", "/v1/me")
        assert_json_error(answer, 401, "unauthenticated")
        assert rx.site is not None and rx.site._accepting is not None
        assert not rx.site._accepting.done()


async def test_a_session_whose_device_stays_away_a_day_is_closed_as_abandoned(
    tmp_path: Path, small_packets: PacketList
) -> None:
    """A device that never came back (destroyed, reflashed) left its session open: an
    emergency under way on the police dashboard for good. A day after its device was
    last heard it is closed (the district told); a device connected is never judged so,
    and one that comes back with the session opens it again."""
    async with Receiver(tmp_path / "rx", "127.0.0.1", 0, password_params=FAST) as rx:
        told: list[tuple[str, str, str]] = []
        rx.ingest.session_listeners.append(
            lambda device, event: told.append((device, type(event).__name__, event.session))
        )
        gone = enroll(rx, tmp_path, "dev-gone")
        async with Device(rx, gone, "dev-gone") as device:
            await device.open_session("s-gone", small_packets)
            await device.stream(small_packets, 3)
            await device.wait_acked(1)
        async with Device(rx, enroll(rx, tmp_path, "dev-here"), "dev-here") as here:
            await here.open_session("s-here", small_packets)
            await here.stream(small_packets, 3)
            await here.wait_acked(1)
            await rx.presence.wait_for(lambda: not rx.presence.devices["dev-gone"].connected)
            assert await rx.ingest.close_abandoned() == []  # silent for seconds only
            rx.ingest.clocks.clock = lambda: time.time() + ABANDONED_AFTER_S + 60
            assert await rx.ingest.close_abandoned() == ["s-gone"]
            assert await rx.ingest.close_abandoned() == []  # once
        rx.ingest.clocks.clock = time.time
        closed = rx.store.get("s-gone")
        assert closed is not None and not closed.is_open
        assert closed.close_reason is not None and closed.close_reason.startswith("abandoned")
        assert ("dev-gone", "SessionClose", "s-gone") in told
        still = rx.store.get("s-here")
        assert still is not None and still.is_open  # its device was connected
        async with Device(rx, gone, "dev-gone") as device:  # it comes back after all
            await device.open_session("s-gone", small_packets)
            await device.stream(small_packets, 3, first=3)
            await device.wait_acked(4)
        assert rx.store.get("s-gone").is_open  # type: ignore[union-attr]


async def test_a_device_opening_session_after_session_is_cut_at_the_limit(
    tmp_path: Path, small_packets: PacketList
) -> None:
    """Each open session holds files open; a device that opens and never closes (within
    the rate limit) could take every descriptor of the receiver (found by a review)."""
    limits = UplinkLimits(max_open_sessions=3)
    async with Receiver(
        tmp_path / "rx", "127.0.0.1", 0, password_params=FAST, uplink_limits=limits
    ) as rx:
        dev_1 = enroll(rx, tmp_path, "dev-1")
        async with Device(rx, dev_1, "dev-1") as device:
            for n in range(4):
                await device.open_session(f"s-{n}", small_packets)
            error = await device.cut_with()
        assert error is not None and error.code == "too_many_sessions", error
        assert sorted(s.session_id for s in rx.store.open_sessions()) == ["s-0", "s-1", "s-2"]
        # A day later they are taken for abandoned (a device whose state was lost never
        # closes them): the oldest is closed to make room, and the new one opens.
        rx.ingest.clocks.clock = lambda: time.time() + ABANDONED_AFTER_S + 60
        async with Device(rx, dev_1, "dev-1") as device:
            await device.open_session("s-3", small_packets)
            await device.stream(small_packets, 3)
            await device.wait_acked(1)
        assert sorted(s.session_id for s in rx.store.open_sessions()) == ["s-1", "s-2", "s-3"]
        assert rx.store.get("s-0").close_reason.startswith("abandoned")  # type: ignore[union-attr]
        rx.ingest.clocks.clock = time.time
        async with Device(rx, enroll(rx, tmp_path, "dev-2"), "dev-2") as other:
            await other.open_session("t-0", small_packets)  # another device is not counted
            await other.stream(small_packets, 3)
            await other.wait_acked(1)
