"""What any host on the school LAN can do to the agent's Local API, and what it cannot.

Real sockets and real TLS on 127.0.0.1 (the whole 127/8 is the loopback, so
"addresses" are 127.0.x.y). Found by a review (s9): idle connections used up the
agent's file descriptors; refused key lists were audited in full, fsynced on the
event loop; junk from two addresses made a principal's signed trigger answer 429;
64 challenges held by 16 addresses kept a dispatcher from getting one; a body
split in transit was read half and refused as malformed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import resource
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import lan_guard, local_api, trigger_gate
from agent.audit import AuditLog
from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import press_button, write_agent_config
from provisioning.tls import fingerprint_digest
from provisioning.triggers import ChallengesExhausted, sign_key_list
from receiver.server import Receiver
from tests.trust import Signers, call, enrol_roles, entry

pytestmark = pytest.mark.timeout(60)

UNIT = Path(__file__).parent.parent / "deploy" / "systemd" / "breakglass-agent.service"
#: A junk key list: a 15 KB unknown field name, which the refusal's detail used to quote.
JUNK_KEYLIST = json.dumps({"A" * 15000: 1}).encode()
JUNK_TRIGGER = json.dumps({"B" * 2000: 1}).encode()
REFUSAL_EVENTS = frozenset({"keylist_refused", "trigger", "refusals", "trigger_flood"})


def agent_config(tmp_path: Path, receiver: Receiver) -> tuple[Path, Signers]:
    path = write_agent_config(tmp_path / "agent", receiver, preroll_s=1)
    return path, enrol_roles(tmp_path / "agent")


def trail(tmp_path: Path) -> list[dict[str, Any]]:
    text = (tmp_path / "agent" / "state" / "audit.log").read_text()
    return [json.loads(line) for line in text.splitlines()]


def use_limits(monkeypatch: pytest.MonkeyPatch, **limits: Any) -> None:
    """The limits the next agent's Local API applies (none before the fix: a no-op, so
    that the tests show what the old code did rather than fail to import)."""
    if hasattr(local_api, "ApiLimits"):
        monkeypatch.setattr(local_api, "DEFAULT_LIMITS", lan_guard.ApiLimits(**limits))


def insecure() -> ssl.SSLContext:
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    return tls


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closes (or resets) the connection within ``timeout`` seconds."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def raw(api: local_api.LocalApi, src: str, *, tls: bool = False) -> Any:
    """A connection from ``src``: plain TCP (no TLS byte sent) or TLS."""
    return await asyncio.open_connection(
        "127.0.0.1", api.port, local_addr=(src, 0), ssl=insecure() if tls else None
    )


async def request(
    api: local_api.LocalApi, method: str, path: str, body: bytes | str | None, src: str
) -> tuple[int, Any]:
    """One pinned HTTPS request from source address ``src``."""
    pin = aiohttp.Fingerprint(fingerprint_digest(api.fingerprint))
    connector = aiohttp.TCPConnector(local_addr=(src, 0), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as h,
        h.request(method, api.url + path, data=body, ssl=pin) as r,
    ):
        return r.status, await r.json()


def head(method: str, path: str, length: int) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


def answer_of(data: bytes) -> tuple[int, dict[str, Any]]:
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


# -- D3: connections and time --------------------------------------------------------


def test_the_unit_gives_the_agent_descriptors_the_lan_cannot_take() -> None:
    """systemd's default soft limit (1024) was all the agent had, and the Local API took
    a descriptor for every connection: the unit sets one, far above the API's share."""
    found = re.findall(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.MULTILINE)
    assert len(found) == 1, "the agent unit sets LimitNOFILE= once"
    limit = int(found[0])
    limits = lan_guard.ApiLimits()
    assert limits.max_connections * lan_guard.FD_SHARE <= limit
    assert limit - limits.max_connections >= 4096  # the agent's own, whatever the LAN does


async def test_connections_are_capped_per_address_and_in_all(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_limits(monkeypatch, max_connections=6, max_per_address=3, tls_handshake_s=30.0)
    path, _ = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        held = [await raw(api, "127.0.0.2") for _ in range(3)]
        # A fourth from one address takes the slot of its oldest idle one: a reset.
        held.append(await raw(api, "127.0.0.2"))
        assert await closed_within(held[0][0], 5.0)
        held += [await raw(api, "127.0.0.3") for _ in range(3)]
        site = api.site
        assert site is not None
        assert await until(lambda: site.open_connections == 6)
        # A seventh in all takes the slot of an idle one (of the largest group).
        held.append(await raw(api, "127.0.0.4"))
        assert await until(lambda: site.evicted["total"] == 1)
        assert site.open_connections == 6 and site.connections_from("127.0.0.2") == 2
        assert site.evicted == {"per_address": 1, "total": 1} and not site.refused
        for _, w in held:
            w.close()
        assert await until(lambda: site.open_connections == 0)
        status, _ = await request(api, "GET", "/v1/status", None, "127.0.0.5")
        assert status == 200
        _, metrics = await call(agent, "GET", "/metrics")
        assert 'breakglass_local_api_connections_refused_total{limit="per_address"} 0' in metrics
        assert 'breakglass_local_api_connections_refused_total{limit="total"} 0' in metrics


def limit_leaving(spare: int) -> int:
    """The open-file limit that leaves this process ``spare`` descriptors (the lowest
    free numbers: those open above it stay open)."""
    used = {int(f) for f in os.listdir("/proc/self/fd")}
    limit = free = 0
    while free < spare:
        free += limit not in used
        limit += 1
    return limit


ATTACKER = r"""
import resource, select, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, n = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()  # go
socks = []
for i in range(n):  # 5 from each address, no TLS byte ever
    s = socket.socket()
    s.bind((f"127.0.9.{i // 5 + 2}", 0))
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    socks.append(s)
pending = list(socks)
for _ in range(50):
    if not pending:
        break
    _, pending, _ = select.select([], pending, [], 0.1)
print("ready", n - len(pending), flush=True)
sys.stdin.read()
"""


async def test_idle_connections_from_the_lan_leave_the_agent_its_descriptors(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,100 idle connections used to take all 1,024 descriptors: then the store could
    not write segments, the uplink not reconnect, a press not be saved. Here the
    process has 100 descriptors to spare, and 200 connections come in."""
    use_limits(monkeypatch, max_connections=20, max_per_address=5)
    path, _ = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        await agent.capture.wait_packets(10)
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ATTACKER, str(api.port), "200",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert attacker.stdin is not None and attacker.stdout is not None
        saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        fds = os.listdir("/proc/self/fd")
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(100), saved[1]))
        try:
            attacker.stdin.write(b"go\n")
            line = await asyncio.wait_for(attacker.stdout.readline(), 20)
            assert line.startswith(b"ready")
            site: lan_guard.GuardedSite | None = getattr(api, "site", None)

            def all_seen() -> bool:
                if site is None:  # before the fix: until the process runs out
                    return len(os.listdir("/proc/self/fd")) >= len(fds) + 95
                return site.open_connections + sum(site.refused.values()) >= 200

            await until(all_seen)
            grown = len(os.listdir("/proc/self/fd")) - len(fds)
            with (tmp_path / "probe").open("wb") as probe:  # EMFILE before the fix
                probe.write(b"a descriptor to spare")
            assert grown <= 20 + 40, grown  # the API's 20, and slack for the agent's own
            press_button(agent)  # a press is persisted and audited meanwhile
            await agent.wait_until(lambda: agent.emergency.active is not None)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, saved)
            attacker.kill()
            await attacker.wait()
        assert site is not None and site.open_connections <= 20
        agent.end("test finished")
    state = json.loads((tmp_path / "agent" / "state" / "emergency.json").read_text())
    assert state, "the press was saved"
    assert [e for e in trail(tmp_path) if e["event"] == "button_press"]


async def test_a_tls_handshake_never_started_is_cut(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_limits(monkeypatch, tls_handshake_s=0.3)
    path, _ = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        assert agent.local_api is not None
        reader, writer = await raw(agent.local_api, "127.0.0.2")
        assert await closed_within(reader, 5.0)  # was 60 s, aiohttp's default
        writer.close()


async def test_slow_headers_and_idle_keep_alive_connections_are_cut(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_limits(monkeypatch, header_s=0.3)
    path, _ = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        reader, writer = await raw(api, "127.0.0.2", tls=True)
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        await writer.drain()
        assert await closed_within(reader, 5.0)  # was aiohttp's keep-alive: an hour
        writer.close()
        reader, writer = await raw(api, "127.0.0.2", tls=True)
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive
        await writer.drain()
        assert b" 200 " in await reader.readuntil(b"\r\n")
        assert await closed_within(reader, 5.0)  # idle after the answer
        writer.close()


async def test_a_body_not_sent_in_time_is_answered_408(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_limits(monkeypatch, body_s=0.3)
    path, _ = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        assert agent.local_api is not None
        reader, writer = await raw(agent.local_api, "127.0.0.2", tls=True)
        writer.write(head("POST", "/v1/triggers", 500) + b'{"payload": ')  # the rest never
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5.0)
        writer.close()
        assert answer_of(data) == (
            408,
            {"error": "body_timeout", "detail": "request body not whole within 0.3 s"},
        )


# -- D6: bodies read whole -------------------------------------------------------------


@pytest.mark.parametrize("what", ["trigger", "key list"])
async def test_a_body_split_in_transit_is_read_whole(
    tmp_path: Path, receiver: Receiver, what: str
) -> None:
    """``content.read(n)`` answered what had arrived so far: a valid trigger whose body
    came in two pieces was refused as malformed."""
    path, keys = agent_config(tmp_path, receiver)
    now = int(time.time())
    v3 = [entry(keys.dispatch, "dispatch", "all", "county 911 dispatch")]
    route, body, expected = {
        "trigger": ("/v1/triggers", keys.trigger("principal", "start").encode(), 202),
        "key list": (
            "/v1/trigger-keys",
            json.dumps(sign_key_list(keys.authority, 3, v3, iat=now, exp=now + 60)).encode(),
            200,
        ),
    }[what]
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        reader, writer = await raw(api, "127.0.0.2", tls=True)
        method = "POST" if what == "trigger" else "PUT"
        writer.write(head(method, route, len(body)) + body[:40])
        await writer.drain()
        # A round trip on another connection: the first piece has reached the handler.
        assert (await request(api, "GET", "/v1/status", None, "127.0.0.3"))[0] == 200
        writer.write(body[40:])
        await writer.drain()
        status, answer = answer_of(await asyncio.wait_for(reader.read(), 10))
        writer.close()
        assert status == expected, answer
        if what == "trigger":
            assert agent.emergency.active is not None
            agent.end("test finished")
        else:
            assert answer["version"] == 3


async def test_a_body_announced_too_large_is_refused_unread(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, _ = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        assert agent.local_api is not None
        for route, method in (("/v1/triggers", "POST"), ("/v1/trigger-keys", "PUT")):
            reader, writer = await raw(agent.local_api, "127.0.0.2", tls=True)
            writer.write(head(method, route, 10**7))  # and not a byte of it
            await writer.drain()
            status, answer = answer_of(await asyncio.wait_for(reader.read(), 5))
            writer.close()
            assert (status, answer["error"]) == (413, "too_large")


async def test_a_client_gone_mid_body_is_no_refusal_and_no_traceback(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Half a body was read as the whole: refused as malformed and audited. Now the
    handler waits for the rest, and a client that leaves instead costs nothing."""
    path, keys = agent_config(tmp_path, receiver)
    body = keys.trigger("principal", "start").encode()
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        _, writer = await raw(api, "127.0.0.2", tls=True)
        writer.write(head("POST", "/v1/triggers", len(body)) + body[:40])
        await writer.drain()
        assert (await request(api, "GET", "/v1/status", None, "127.0.0.3"))[0] == 200
        writer.transport.abort()  # gone, the rest never sent
        site: lan_guard.GuardedSite | None = getattr(api, "site", None)
        await until(
            lambda: bool(agent.gate.rejected) or (site is not None and not site.open_connections)
        )
        assert not agent.gate.rejected
        assert agent.emergency.active is None
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


# -- D1: signed triggers are never held back; challenges for everyone -------------------


async def test_junk_from_other_addresses_never_holds_back_a_signed_trigger(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The bucket for all clients was charged before the signature was checked: junk
    from two addresses made a principal's signed trigger answer 429."""
    path, keys = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        api.triggers_per_s, api.burst = 0.001, 2.0  # all clients together: 4
        statuses = [
            (await request(api, "POST", "/v1/triggers", JUNK_TRIGGER, src))[0]
            for src in ("127.0.0.2", "127.0.0.3")
            for _ in range(3)
        ]
        assert statuses.count(429) == 2  # the buckets are empty
        junk = await request(api, "POST", "/v1/triggers", JUNK_TRIGGER, "127.0.0.4")
        assert junk[0] == 429  # a third address: held back by the bucket for all
        for _ in range(3):  # one the verifier accepts: answered for what it is, never 429
            start = keys.trigger("principal", "start")
            status, answer = await request(api, "POST", "/v1/triggers", start, "127.0.0.4")
            assert status == 202, answer
        assert agent.emergency.active is not None
        # (review t1: a spent one, signed too, is rate limited now: test_trigger_hardening)
        v2 = json.loads((tmp_path / "agent" / "trigger-keys.json").read_text())
        now = int(time.time())
        v3 = sign_key_list(
            keys.authority,
            3,
            json.loads(base64.urlsafe_b64decode(v2["payload"] + "==").decode())["keys"],
            iat=now,
            exp=now + 86400,
        )
        status, answer = await request(api, "PUT", "/v1/trigger-keys", json.dumps(v3), "127.0.0.4")
        assert status == 200, answer  # a newer list from the authority: never 429
        status, answer = await request(api, "PUT", "/v1/trigger-keys", JUNK_KEYLIST, "127.0.0.4")
        assert status == 429, answer
        agent.end("test finished")


async def test_a_dispatcher_gets_a_challenge_whoever_holds_the_others(
    tmp_path: Path, receiver: Receiver
) -> None:
    """16 addresses with 4 challenges each held all 64: a dispatcher got 429. Now one
    network (here 127.0.1.0/24) holds at most its share: a signer on another still gets
    one, and nobody's is given up for a new one (review t4)."""
    path, keys = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        status, mine = await request(api, "GET", "/v1/challenge", None, "127.0.2.1")
        assert status == 200, mine
        for i in range(70):  # 280 asked for: more than are kept
            for _ in range(4):
                await request(api, "GET", "/v1/challenge", None, f"127.0.1.{i + 2}")
        status, answer = await request(api, "GET", "/v1/challenge", None, "127.0.2.2")
        assert status == 200, answer
        challenge = mine["challenge"]  # the flood cancelled none but its own
        body = keys.trigger("dispatch", "start", now=time.time() - 86400, challenge=challenge)
        status, answer = await request(api, "POST", "/v1/triggers", body, "127.0.2.1")
        assert status == 202, answer
        agent.end("test finished")


def test_challenges_are_shared_so_that_whoever_asks_gets_one() -> None:
    """Review t4: giving up the oldest let 256 addresses cancel a signer's challenge. Now
    none is ever given up: a new one is refused when its address, its network or the
    pool holds its share, and one network cannot hold the whole pool."""
    challenges = trigger_gate.FairChallenges(limit=8, per_client=4, per_prefix=4)
    dispatcher = challenges.issue(0.0, "10.0.9.9")
    flood = [challenges.issue(1.0, "10.0.0.1") for _ in range(4)]
    with pytest.raises(ChallengesExhausted):  # a fifth of one address: refused
        challenges.issue(2.0, "10.0.0.1")
    with pytest.raises(ChallengesExhausted):  # another address of the same /24: refused
        challenges.issue(2.0, "10.0.0.2")
    others = [challenges.issue(3.0, "10.0.1.2") for _ in range(3)]  # all 8 held now
    with pytest.raises(ChallengesExhausted):
        challenges.issue(4.0, "10.0.2.3")
    assert all(challenges.valid(c, 5.0) for c in (dispatcher, *flood, *others))
    challenges.consume(dispatcher)  # used: gone, and its place is free
    assert not challenges.valid(dispatcher, 5.0)
    assert challenges.valid(challenges.issue(5.0, "10.0.2.3"), 5.0)
    stale = challenges.issue(400.0, "10.0.0.1")  # expired ones free their places
    assert challenges.valid(stale, 400.0)


def test_a_network_is_its_prefix() -> None:
    assert trigger_gate.address_prefix("10.1.2.3") == "10.1.2.0/24"
    assert trigger_gate.address_prefix("::ffff:10.1.2.3") == "10.1.2.0/24"
    assert trigger_gate.address_prefix("fd00:1:2:3:4:5:6:7") == "fd00:1:2:3::/64"
    assert trigger_gate.address_prefix("fe80::1%eth0") == "fe80::/64"
    assert trigger_gate.address_prefix("?") == "?"


# -- D2: refusals audited off the loop, bounded, in summary --------------------------------


async def test_refusals_are_audited_off_the_loop_bounded_and_in_summary(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refused key list was an fsynced entry, on the event loop, quoting 15 KB of
    the request: anyone on the LAN wrote 440 KiB/s to the trail and stalled the loop."""
    path, _ = agent_config(tmp_path, receiver)
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        record = agent.audit.record

        def watched(event: str, **fields: Any) -> None:
            if threading.get_ident() == loop_thread and event in REFUSAL_EVENTS:
                on_loop.append(event)
            record(event, **fields)

        monkeypatch.setattr(agent.audit, "record", watched)
        for _ in range(20):
            status, answer = await request(
                api, "PUT", "/v1/trigger-keys", JUNK_KEYLIST, "127.0.0.2"
            )
            assert (status, answer["error"]) == (400, "malformed")
            assert len(answer["detail"]) <= 300
            status, _ = await request(api, "POST", "/v1/triggers", JUNK_TRIGGER, "127.0.0.3")
            assert status == 400
        assert agent.gate.rejected["malformed"] == 20
    assert not on_loop, on_loop
    entries = trail(tmp_path)
    assert all(len(json.dumps(e)) < 2000 for e in entries)
    (keylist,) = [e for e in entries if e["event"] == "keylist_refused"]
    assert keylist["code"] == "malformed" and len(keylist["detail"]) == 300
    (trigger,) = [e for e in entries if e["event"] == "trigger"]
    assert trigger["code"] == "malformed" and trigger["via"] == "local_api 127.0.0.3"
    summaries = {e["of"]: e for e in entries if e["event"] == "refusals"}
    assert set(summaries) == {"keylist_refused", "trigger"}
    for summary in summaries.values():
        assert summary["code"] == "malformed" and summary["count"] == 19
        assert summary["first"] <= summary["last"] and len(summary["example"]["detail"]) <= 300
    assert summaries["keylist_refused"]["example"]["source"] == "local_api 127.0.0.2"


class Queued:
    """An :class:`AuditLog` stand-in that keeps what ``record_soon`` is given."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []
        self.summary = asyncio.Event()

    def record_soon(self, event: str, **fields: Any) -> None:
        self.entries.append((event, fields))
        if event == "refusals":
            self.summary.set()


async def test_a_summary_is_written_when_its_minute_is_up_and_a_quiet_one_starts_over() -> None:
    audit = Queued()
    mono = [0.0]
    digest = trigger_gate.RefusalDigest(
        audit,  # type: ignore[arg-type]  # only record_soon is used
        every_s=0.2,
        clock=lambda: 1000.0 + mono[0],
        mono=lambda: mono[0],
    )
    assert digest.refuse("trigger", ("malformed", None), {"detail": "first"})
    assert digest.refuse("trigger", ("bad_signature", None), {"detail": "another kind"})
    assert digest.refuse("trigger", ("replayed", "0123456789abcdef"), {"detail": "signed"})
    assert digest.refuse("trigger", ("replayed", "fedcba9876543210"), {"detail": "other key"})
    for i in range(5):
        mono[0] = 0.01 * (i + 1)
        assert not digest.refuse("trigger", ("malformed", None), {"detail": f"then {i}"})
    mono[0] = 0.25
    await asyncio.wait_for(audit.summary.wait(), 5)  # no refusal follows: the timer
    assert [e for e, _ in audit.entries] == ["trigger"] * 4 + ["refusals"]
    assert audit.entries[-1][1] == {
        "of": "trigger",
        "code": "malformed",
        "count": 5,
        "first": 1000.01,
        "last": 1000.05,
        "example": {"detail": "then 0"},
    }
    audit.summary.clear()
    mono[0] = 0.3  # still within a minute of that summary: counted, summarised in turn
    assert not digest.refuse("trigger", ("malformed", None), {"detail": "again"})
    mono[0] = 0.5
    await asyncio.wait_for(audit.summary.wait(), 5)
    assert audit.entries[-1][1]["count"] == 1
    mono[0] = 1.0  # a quiet minute after that: the next is audited in full
    assert digest.refuse("trigger", ("malformed", None), {"detail": "after"})
    assert audit.entries[-1] == ("trigger", {"detail": "after"})
    digest.close()  # nothing counted: nothing more written
    assert len(audit.entries) == 7


def test_a_digest_writes_through_an_ordinary_trail(tmp_path: Path) -> None:
    """A digest writes through an ordinary trail, off the caller's thread."""
    audit = AuditLog(tmp_path / "audit.log", time.time)
    digest = trigger_gate.RefusalDigest(audit, every_s=60.0)
    for _ in range(3):
        digest.refuse("keylist_refused", ("malformed",), {"code": "malformed", "detail": "x"})
    digest.close()
    audit.close()
    events = [
        json.loads(line)["event"] for line in (tmp_path / "audit.log").read_text().splitlines()
    ]
    assert events == ["keylist_refused", "refusals"]


async def test_a_malformed_request_is_one_line_a_minute_without_a_traceback(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp logged every request it could not parse as an error with a traceback:
    any host on the LAN could fill the journal with them. Now one line per address a
    minute, counting the rest; the request is still refused with 400."""
    path, _ = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        caplog.clear()
        for _ in range(5):
            reader, writer = await raw(api, "127.0.0.2", tls=True)
            writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
            await writer.drain()
            assert b" 400 " in await reader.readuntil(b"\r\n")
            writer.close()
        assert (await request(api, "GET", "/v1/status", None, "127.0.0.3"))[0] == 200
    bad = [r for r in caplog.records if "Error handling request" in r.getMessage()]
    assert len(bad) == 1, caplog.text
    assert bad[0].exc_info is None
    assert bad[0].levelname == "WARNING"
    assert "127.0.0.2" in bad[0].getMessage()
    assert "BadHttpMessage" in bad[0].getMessage()
