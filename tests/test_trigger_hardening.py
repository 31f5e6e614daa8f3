"""Remote triggers against a LAN that lies: a clock set back, challenge floods, spent
envelopes replayed to skip the rate limit, refusals that left no audit entry.

Found by a review (t1, t3, t4, t5) against real processes; here a real agent and its
Local API on 127.0.0.1 (the whole 127/8 is the loopback, so other "addresses" and
"networks" are 127.0.x.y), clocks moved with :class:`tests.clocks.ShiftedTime`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import local_api, trigger_gate
from agent.boot import run_agent
from agent.config import load_config
from agent.daemon import Agent
from agent.first_boot import FirstBoot
from agent.replay import RETAIN_S, SqliteReplayCache
from breakglass.demo import press_button
from provisioning.triggers import (
    SKEW_S,
    Accepted,
    Challenges,
    Keyring,
    MemoryReplayCache,
    Rejected,
    parse_key_list,
    sign_key_list,
    sign_trigger,
    verify_trigger,
)
from receiver.server import Receiver
from tests.clocks import ShiftedTime
from tests.test_first_boot import first_boot_config
from tests.test_local_api_abuse import JUNK_TRIGGER, agent_config, request, trail, until
from tests.trust import BUILDING, Signers, entry

pytestmark = pytest.mark.timeout(60)

DAY = 25 * 3600.0  # more than the replay cache's RETAIN_S past a nonce's keep_until


def nonce_of(envelope: str) -> str:
    payload = json.loads(envelope)["payload"]
    return str(json.loads(base64.urlsafe_b64decode(payload + "==").decode())["nonce"])


def key_list(keys: Signers, version: int, folder: Path, days: int = 1) -> str:
    """The installed list's keys again, signed as ``version`` (good for ``days``)."""
    installed = json.loads((folder / "trigger-keys.json").read_text())
    entries = json.loads(base64.urlsafe_b64decode(installed["payload"] + "==").decode())["keys"]
    now = int(time.time())
    return json.dumps(
        sign_key_list(keys.authority, version, entries, iat=now, exp=now + days * 86400)
    )


# -- t5: a clock set back past what the replay cache remembers ---------------------------


async def test_an_end_accepted_a_day_ago_is_refused_after_the_clock_is_set_back(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``end`` accepted 25 h before was forgotten by the replay cache, and once a LAN
    host set the clock back into its window it ended a new emergency (review t5)."""
    path, keys = agent_config(tmp_path, receiver)
    clock = ShiftedTime()
    async with Agent(load_config(path), clock=clock.time) as agent:
        api = agent.local_api
        assert api is not None
        # The agent runs a day: both its clocks move (the mark follows the monotonic one).
        monkeypatch.setattr(agent.gate.replay, "_mono", clock.monotonic)
        month = key_list(keys, 3, tmp_path / "agent", days=30)  # (v2 is good for a day)
        assert (await request(api, "PUT", "/v1/trigger-keys", month, "127.0.0.2"))[0] == 200
        drill = keys.trigger("superintendent", "start", reason="drill")
        assert (await request(api, "POST", "/v1/triggers", drill, "127.0.0.2"))[0] == 202
        old_end = keys.trigger("superintendent", "end", reason="drill over")
        assert (await request(api, "POST", "/v1/triggers", old_end, "127.0.0.2"))[0] == 202
        assert (await request(api, "POST", "/v1/triggers", old_end, "127.0.0.2"))[0] == 409
        clock.wall_ns = clock.mono_ns = int(DAY * 1e9)
        start = keys.trigger("superintendent", "start", now=clock.time(), reason="intruder")
        status, answer = await request(api, "POST", "/v1/triggers", start, "127.0.0.2")
        assert status == 202, answer
        session = agent.emergency.active
        assert session is not None
        assert not agent.gate.replay.seen(nonce_of(old_end))  # forgotten, as it may be
        clock.wall_ns = int(30e9)  # NTP spoofed: back to the drill's day
        status, answer = await request(api, "POST", "/v1/triggers", old_end, "127.0.0.3")
        assert (status, answer.get("error")) == (403, "expired"), answer
        assert agent.emergency.active is session
        agent.end("test finished")
    refusals = [e for e in trail(tmp_path) if e["event"] == "trigger" and e["result"] == "rejected"]
    assert [e["code"] for e in refusals] == ["replayed", "expired"]
    assert refusals[1]["action"] == "end"
    assert refusals[1]["via"] == "local_api 127.0.0.3"


def test_the_replay_cache_says_before_when_it_may_have_forgotten(tmp_path: Path) -> None:
    """Every nonce it forgets was kept until before :meth:`forgotten_before`, after a
    restart too (the mark is saved with the pruning); a clock set back moves it not."""
    clock = ShiftedTime()
    path = tmp_path / "replay.sqlite"
    cache = SqliteReplayCache(path, clock.time, clock.monotonic)
    start = clock.time()
    cache.add("a" * 22, start + 180)
    assert cache.forgotten_before() <= start - RETAIN_S + 1
    clock.wall_ns = clock.mono_ns = int(DAY * 1e9)
    cache.add("b" * 22, clock.time() + 180)  # prunes "a"
    assert not cache.seen("a" * 22)
    assert cache.forgotten_before() > start + 180
    cache.close()
    clock.wall_ns = 0  # set back, and restarted
    again = SqliteReplayCache(path, clock.time, clock.monotonic)
    assert again.forgotten_before() > start + 180
    again.close()


def test_a_window_the_cache_no_longer_knows_is_expired_whatever_the_clock(
    tmp_path: Path,
) -> None:
    """The rule itself (pure): only windows that ended before ``forgotten_before`` are
    refused; a clock an hour behind (after a power cut) refuses nothing new, and a
    trigger on a device challenge is fresh by it."""
    from provisioning.keys import new_private_key

    key = new_private_key(tmp_path / "dispatch.key")
    authority = new_private_key(tmp_path / "authority.key")
    now = int(time.time())
    entries = [entry(key, "dispatch", "all", "dispatch")]
    keyring = Keyring(
        parse_key_list(
            sign_key_list(authority, 1, entries, iat=now - 10 * 86400, exp=now + 86400),
            authority.public_key(),
        )
    )
    challenges = Challenges()

    def verify(signed_at: int, forgotten: float, challenge: str | None = None) -> Any:
        body = sign_trigger(
            key, action="end", building=BUILDING, reason="r", now=signed_at, challenge=challenge
        )
        return verify_trigger(
            body,
            building=BUILDING,
            keyring=keyring,
            now=signed_at + 10,  # the clock agrees with the signer
            mono=0.0,
            replay=MemoryReplayCache(),
            challenges=challenges,
            forgotten_before=forgotten,
        )

    old = now - 2 * 86400
    refused = verify(old, forgotten_before := now - 86400.0)
    assert isinstance(refused, Rejected) and refused.code == "expired"
    assert isinstance(verify(old + 86400 - 120 - SKEW_S, forgotten_before), Accepted)
    assert isinstance(verify(now - 3600, now - 3600 - RETAIN_S), Accepted)
    challenge = challenges.issue(0.0, "10.0.0.1")
    assert isinstance(verify(old, forgotten_before, challenge), Accepted)


# -- t4: a flood of challenge requests cancels nobody's -----------------------------------


async def test_a_flood_from_many_addresses_cancels_no_signer_s_challenge(
    tmp_path: Path, receiver: Receiver
) -> None:
    """One GET /v1/challenge from each of 256 addresses gave up the oldest outstanding
    challenge: a signer's, whose clock-free trigger was then ``bad_challenge`` (t4)."""
    path, keys = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        status, mine = await request(api, "GET", "/v1/challenge", None, "127.0.0.2")
        assert status == 200, mine
        sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(256)]
        statuses: list[int] = []
        for k in range(0, len(sources), 32):
            batch = sources[k : k + 32]
            answers = await asyncio.gather(
                *(request(api, "GET", "/v1/challenge", None, src) for src in batch)
            )
            statuses += [s for s, _ in answers]
        body = keys.trigger(
            "superintendent", "start", now=time.time() - 7200, challenge=mine["challenge"]
        )
        status, answer = await request(api, "POST", "/v1/triggers", body, "127.0.0.2")
        assert status == 202, answer
        # Two networks (127.0.1/24, 127.0.2/24): each held at most its share.
        assert statuses.count(200) <= 2 * trigger_gate.MAX_CHALLENGES_PER_PREFIX
        assert set(statuses) == {200, 429}
        status, other = await request(api, "GET", "/v1/challenge", None, "127.0.9.1")
        assert status == 200, other  # another network is not held back
        agent.end("test finished")


async def test_challenges_are_rate_limited_per_network(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_api, "CHALLENGE_BURST", 2.0, raising=False)
    monkeypatch.setattr(local_api, "CHALLENGES_PER_S", 0.001, raising=False)
    path, _ = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        got = [await request(api, "GET", "/v1/challenge", None, f"127.0.5.{i}") for i in (1, 2, 3)]
        assert [s for s, _ in got] == [200, 200, 429]
        assert got[2][1] == {"error": "rate_limited", "detail": "too many challenges; retry later"}
        assert (await request(api, "GET", "/v1/challenge", None, "127.0.6.1"))[0] == 200


# -- t1: only what would be accepted skips the rate limit ---------------------------------


async def test_a_signed_envelope_that_would_be_refused_is_rate_limited(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A spent (replayed), expired or foreign envelope is signed too: it skipped the rate
    limit, and one spent envelope was checked in full 780 times a second (t1)."""
    path, keys = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        spent = keys.trigger("principal", "start")
        assert (await request(api, "POST", "/v1/triggers", spent, "127.0.0.2"))[0] == 202
        agent.end("drill over")
        api.triggers_per_s, api.burst = 0.001, 1.0  # one each, then empty
        assert (await request(api, "POST", "/v1/triggers", JUNK_TRIGGER, "127.0.0.3"))[0] == 400
        expired = keys.trigger("dispatch", "start", now=time.time() - 3600)
        foreign = keys.trigger("dispatch", "start", building="washington-high")
        for body in (spent, expired, foreign):
            status, answer = await request(api, "POST", "/v1/triggers", body, "127.0.0.3")
            assert (status, answer["error"]) == (429, "rate_limited"), answer
        fresh = keys.trigger("dispatch", "start")  # what would act is never held back
        status, answer = await request(api, "POST", "/v1/triggers", fresh, "127.0.0.3")
        assert status == 202, answer
        # Key lists likewise: the installed one again, or an older one, is rate limited.
        folder = tmp_path / "agent"
        assert (await request(api, "PUT", "/v1/trigger-keys", "{}", "127.0.0.4"))[0] == 400
        installed = (folder / "trigger-keys.json").read_text()
        older = key_list(keys, 1, folder)
        for body in (installed, older):
            status, answer = await request(api, "PUT", "/v1/trigger-keys", body, "127.0.0.4")
            assert status == 429, answer
        newer = key_list(keys, 3, folder)
        status, answer = await request(api, "PUT", "/v1/trigger-keys", newer, "127.0.0.4")
        assert (status, answer["version"]) == (200, 3)
        agent.end("test finished")


FLOODER = """
import asyncio, collections, json, sys, time
import aiohttp
from provisioning.tls import fingerprint_digest
url, pin, body, conns, most, secs = sys.argv[1:7]
async def main():
    fp = aiohttp.Fingerprint(fingerprint_digest(pin))
    counts = collections.Counter()
    end = time.monotonic() + float(secs)
    async def worker():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, ssl=fp)) as h:
            while time.monotonic() < end and sum(counts.values()) < int(most):
                try:
                    async with h.post(url, data=body.encode()) as r:
                        await r.read()
                        counts[r.status] += 1
                except aiohttp.ClientError:
                    counts["error"] += 1
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.gather(*(worker() for _ in range(int(conns))))
    print(json.dumps({str(k): v for k, v in counts.items()}), flush=True)
asyncio.run(main())
"""


async def test_a_press_is_not_held_back_by_a_flood_of_a_spent_envelope(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, keys = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        spent = keys.trigger("principal", "start")
        assert (await request(api, "POST", "/v1/triggers", spent, "127.0.0.2"))[0] == 202
        agent.end("drill over")
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, api.url + "/v1/triggers", api.fingerprint,
            spent, "8", "2000", "2.5",
            stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent,
        )  # fmt: skip
        assert flood.stdout is not None
        assert json.loads(await asyncio.wait_for(flood.stdout.readline(), 20))["ready"]
        assert await until(lambda: agent.gate.rejected["rate_limited"] > 0, timeout=20)
        pressed = time.monotonic()  # (one press: the button debounces a second)
        press_button(agent)
        await asyncio.wait_for(agent.wait_until(lambda: len(agent.press_log) == 1), 5)
        took = time.monotonic() - pressed
        assert agent.emergency.active is not None
        counts = json.loads(await asyncio.wait_for(flood.stdout.readline(), 30))
        await flood.wait()
        agent.end("test finished")
    assert took < 1.0, took
    assert counts.get("429", 0) > counts.get("409", 0), counts  # spent: mostly rate limited


# -- t3: refusals that left no audit entry -------------------------------------------------


async def test_a_flood_is_audited_when_its_minute_is_up_without_another_request(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``trigger_flood`` summary was written only by the next rate-limited request or
    at shutdown: a crash (or a flood that stopped) lost it (t3a)."""
    monkeypatch.setattr(local_api, "FLOOD_REPORT_S", 0.3)
    path, _ = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        api.triggers_per_s, api.burst = 0.001, 1.0
        written = asyncio.Event()
        record_soon = agent.audit.record_soon
        flood_entries: list[dict[str, Any]] = []

        def watched(event: str, **fields: Any) -> None:
            if event == "trigger_flood":
                flood_entries.append(fields)
                written.set()
            record_soon(event, **fields)

        monkeypatch.setattr(agent.audit, "record_soon", watched)
        statuses = [
            (await request(api, "POST", "/v1/triggers", JUNK_TRIGGER, "127.0.0.2"))[0]
            for _ in range(4)
        ]
        assert statuses == [400, 429, 429, 429]
        await asyncio.wait_for(written.wait(), 5)  # no request since: the timer wrote it
        assert flood_entries == [{"refused": 3, "via": "local_api"}]


@dataclass
class Unenrolled:
    """A device running :func:`run_agent` unprovisioned; :meth:`stop` it to read its trail."""

    runtime: FirstBoot
    stop_event: asyncio.Event
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.stop_event.set()
        await self.task


@pytest.fixture
async def first_boot(tmp_path: Path) -> AsyncIterator[Unenrolled]:
    config = first_boot_config(tmp_path / "pi")
    runtimes: asyncio.Queue[Any] = asyncio.Queue()
    stop = asyncio.Event()
    task = asyncio.create_task(run_agent(config, stop, on_start=runtimes.put_nowait))
    runtime = await asyncio.wait_for(runtimes.get(), 30)
    assert isinstance(runtime, FirstBoot)
    device = Unenrolled(runtime, stop, task)
    yield device
    await device.stop()


async def test_an_unprovisioned_device_audits_what_it_refuses_in_summary(
    first_boot: Unenrolled, tmp_path: Path, receiver: Receiver
) -> None:
    """Triggers, challenge requests and key lists sent to a device not enrolled yet were
    answered 409 and audited nowhere (t3b): someone believes it is armed."""
    api = first_boot.runtime.local_api
    assert api is not None
    _, keys = agent_config(tmp_path, receiver)
    trigger = keys.trigger("dispatch", "start")
    keylist = (tmp_path / "agent" / "trigger-keys.json").read_text()
    for _ in range(3):  # repeated: the first of each in full, the others in summary
        for method, where, body in (
            ("POST", "/v1/triggers", trigger),
            ("GET", "/v1/challenge", None),
            ("PUT", "/v1/trigger-keys", keylist),
        ):
            status, answer = await request(api, method, where, body, "127.0.0.7")
            assert (status, answer["error"]) == (409, "unprovisioned")
    await first_boot.stop()  # writes the summaries counted so far
    lines = (first_boot.runtime.config.state_dir / "audit.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    full = {e["event"]: e for e in entries if e.get("code") == "unprovisioned" and "of" not in e}
    assert set(full) == {"trigger", "challenge_refused", "keylist_refused"}
    assert full["trigger"]["result"] == "rejected"
    assert full["trigger"]["via"] == "local_api 127.0.0.7"
    assert full["keylist_refused"]["source"] == "local_api 127.0.0.7"
    summaries = {e["of"]: e["count"] for e in entries if e["event"] == "refusals"}
    assert summaries == {"trigger": 2, "challenge_refused": 2, "keylist_refused": 2}
