"""The receiver speaks each device's clock where the device judges by it (review s3, s4).

A Raspberry Pi has no real-time clock: after a power cut it runs hours or days behind
(fake-hwclock) until NTP steps it, at any moment. The device judges a dispatch
trigger's ``iat``/``exp`` by its own clock (±60 s), and states its session's start and
expiry on it. The receiver measures each connected device's clock from its heartbeats
(:mod:`receiver.device_clock`): it signs dispatch triggers in the device's time, and
shows the police (and tells the district) times on its own clock.

Real receiver and real sockets on 127.0.0.1: a real agent whose trigger gate and
heartbeats run on a clock that is off, and devices speaking the uplink by hand that
judge triggers with the real verifier (:func:`provisioning.triggers.verify_trigger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from agent import uplink as agent_uplink
from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import BUILDING
from provisioning.keys import kid, load_private_key, public_pem
from provisioning.triggers import (
    Accepted,
    Challenges,
    Keyring,
    MemoryReplayCache,
    Rejected,
    TriggerKey,
    TriggerKeyList,
    verify_trigger,
)
from receiver.accounts import Role
from receiver.device_clock import MAX_SESSIONS, DeviceClocks, receiver_expiry
from receiver.server import Receiver
from tests.clocks import ShiftedTime
from tests.logins import logged_in
from tests.media import PacketList
from tests.test_enrollment import enroll
from tests.uplink import connect_device

pytestmark = pytest.mark.timeout(60)

DAY = 86400.0
#: How far apart two readings of "now" taken moments apart on two clocks may be here.
SLACK_S = 5.0


def seconds(iso: object) -> float:
    assert isinstance(iso, str), iso
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def access(receiver: Receiver) -> list[dict[str, Any]]:
    await receiver.access_log.flush()
    text = (receiver.data_dir / "access.log").read_text()
    return [json.loads(line) for line in text.splitlines()]


# -- a real agent on a wrong clock -------------------------------------------------------


@pytest.mark.parametrize("offset_s", [-7200.0, 600.0], ids=["2h-behind", "10min-ahead"])
async def test_a_dispatcher_starts_extends_and_ends_on_an_agent_whose_clock_is_off(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, offset_s: float
) -> None:
    """The receiver signed with its own clock and the agent refused everything more than
    60 s off its own (``403 not_yet_valid "iat is 7200 s in the future"``, or ``expired``
    for a clock ahead): no dispatcher could start, extend or end an emergency at a school
    whose Pi had not synced its clock yet (review s3)."""
    skewed = ShiftedTime(wall_s=offset_s)
    monkeypatch.setattr(agent_uplink, "time", skewed)  # the agent's heartbeats
    demo_dispatch = tmp_path / "dispatch" / "dispatch.key"
    demo_dispatch.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(receiver.dispatch_key_path, demo_dispatch)  # its trigger-key list enrolls it
    path, _ = enroll(tmp_path, receiver)
    async with Agent(load_config(path), clock=skewed.time) as agent:  # its trigger gate
        await receiver.presence.wait_for(lambda: bool(receiver.devices_of(BUILDING)))
        async with logged_in(receiver, Role.DISPATCHER, "jdoe") as http:
            url = receiver.url + "v1/dispatch"
            answers = []
            for action, why in [("start", "911 call: intruder"), ("extend", "still searching"),
                                ("end", "all clear")]:  # fmt: skip
                body = {"building": BUILDING, "action": action, "reason": why}
                async with http.post(url, json=body) as r:
                    assert r.status == 200, await r.text()
                    (delivery,) = (await r.json())["deliveries"]
                answers.append(delivery)
                if action == "start":
                    assert delivery["status"] == 202, delivery
                    assert agent.emergency.active is not None
            assert [a["status"] for a in answers] == [202, 202, 202], answers
            assert agent.emergency.active is None
    # The access log has, per device, the receiver's time and the device's time signed.
    dispatches = [e for e in await access(receiver) if e["action"] == "dispatch"]
    assert [e["requested"] for e in dispatches] == ["start", "extend", "end"]
    for entry in dispatches:
        (result,) = entry["results"]
        assert result["status"] == 202
        assert abs(seconds(result["receiver_time"]) - seconds(entry["at"])) < SLACK_S
        signed = seconds(result["device_time"]) - seconds(result["receiver_time"])
        assert abs(signed - offset_s) < SLACK_S, result
        assert abs(result["clock_offset_s"] - offset_s) < SLACK_S, result


# -- devices speaking the uplink by hand ---------------------------------------------------


DEVICE = "hand-pi-1"


@dataclass
class HandDevice:
    """An allow-listed device speaking the uplink by hand, its clock ``offset_s`` off the
    receiver's; it judges the triggers pushed to it with the real verifier."""

    receiver: Receiver
    offset_s: float
    name: str = DEVICE
    conn: p.Uplink = field(default_factory=lambda: p.Uplink(p.Role.AGENT))
    triggers: asyncio.Queue[p.Trigger] = field(default_factory=asyncio.Queue)
    outcomes: list[Accepted | Rejected] = field(default_factory=list)

    def now(self) -> float:
        return time.time() + self.offset_s

    async def __aenter__(self) -> HandDevice:
        key = Ed25519PrivateKey.generate()
        (self.receiver.devices_dir / f"{self.name}.pub").write_bytes(public_pem(key.public_key()))
        dispatch = load_private_key(self.receiver.dispatch_key_path).public_key()
        enrolled = TriggerKey(kid(dispatch), dispatch, "dispatch", None, "County 911")
        self.keyring = Keyring(TriggerKeyList(1, 0, 2**40, {enrolled.kid: enrolled}, {}))
        self.replay, self.challenges = MemoryReplayCache(), Challenges()
        self.http = aiohttp.ClientSession()
        self.ws, _ = await connect_device(self.http, self.receiver, self.conn, key, self.name)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def _read(self) -> None:
        while (msg := await self.ws.receive()).type is aiohttp.WSMsgType.TEXT:
            event = self.conn.receive(msg.data)
            if isinstance(event, p.Trigger):
                self.triggers.put_nowait(event)

    async def send(self, event: p.Event) -> None:
        await self.ws.send_str(str(self.conn.send(event)))

    async def beat(self, t: float | None = None) -> None:
        """A heartbeat: this device's clock now (or ``t``)."""
        await self.send(p.Heartbeat(self.now() if t is None else t))

    async def answer(self) -> Accepted | Rejected:
        """Judge the next trigger pushed here by this device's clock, and answer it."""
        async with asyncio.timeout(20):
            trigger = await self.triggers.get()
        outcome = verify_trigger(
            trigger.envelope, building=BUILDING, keyring=self.keyring, now=self.now(),
            mono=time.monotonic(), replay=self.replay, challenges=self.challenges,
            device=self.name,
        )  # fmt: skip
        self.outcomes.append(outcome)
        if isinstance(outcome, Accepted):
            status, body = 202, {"session": "s-hand"}
        else:
            status, body = 403, {"error": outcome.code, "detail": outcome.detail}
        await self.send(p.TriggerResult(trigger.ref, status, body))
        return outcome


@pytest.fixture
async def hand_receiver(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Receiver:
    """The receiver; dispatch for any building goes to :data:`DEVICE`."""
    assert receiver.dispatch is not None
    monkeypatch.setattr(receiver.dispatch, "devices_of", lambda building: [DEVICE])
    return receiver


async def measured(receiver: Receiver, device: str = DEVICE, after: float = -math.inf) -> float:
    """Wait until the receiver has a reading of ``device``'s clock newer than ``after``
    (its monotonic time); the reading's offset."""
    reading = await receiver.ingest.clocks.next_reading(device, after=after, within=10)
    assert reading is not None
    return reading.offset_s


async def dispatch(receiver: Receiver, action: str = "start") -> Any:
    assert receiver.dispatch is not None
    (delivery,) = await receiver.dispatch.send(
        building=BUILDING, action=action, reason="911 call", user="jdoe"
    )
    return delivery


async def test_a_step_since_the_last_heartbeat_is_measured_again_and_tried_once_more(
    hand_receiver: Receiver,
) -> None:
    """An offset measured before an NTP step (or a fake-hwclock restore) is wrong by the
    step, however fresh: the device's refusal for the clock is the sign. The receiver
    waits for a heartbeat sent after it and signs once more (the refused trigger did
    nothing: the device checks the clock before it spends the nonce)."""
    async with HandDevice(hand_receiver, 0.0) as dev:
        await dev.beat()
        assert abs(await measured(hand_receiver)) < SLACK_S
        dev.offset_s = -7200.0  # the clock is set back between two heartbeats
        sent = asyncio.create_task(dispatch(hand_receiver))
        first = await dev.answer()
        assert isinstance(first, Rejected) and first.code == "not_yet_valid", first
        await dev.beat()  # the next heartbeat, after the step
        second = await dev.answer()
        assert isinstance(second, Accepted), second
        delivery = await sent
    assert delivery.status == 202, delivery
    assert delivery.attempts == 2
    assert abs(delivery.device_time - delivery.receiver_time + 7200) < SLACK_S


async def test_a_device_not_heard_yet_on_its_connection_is_measured_then_asked_again(
    hand_receiver: Receiver,
) -> None:
    """Right after a connection (a Pi just booted, two hours behind) the receiver has no
    reading yet: it signs on its own clock (the right one for a synced device, so no
    wait), and after a refusal for the clock waits for the first heartbeat."""
    async with HandDevice(hand_receiver, -7200.0) as dev:
        sent = asyncio.create_task(dispatch(hand_receiver))
        first = await dev.answer()
        assert isinstance(first, Rejected) and first.code == "not_yet_valid", first
        await dev.beat()
        assert isinstance(await dev.answer(), Accepted)
        delivery = await sent
    assert (delivery.status, delivery.attempts) == (202, 2)


async def test_a_device_that_tells_no_clock_gets_its_refusal_within_a_bound(
    hand_receiver: Receiver,
) -> None:
    """No heartbeat after the refusal: the dispatcher gets the device's answer once the
    receiver has waited :attr:`Dispatch.remeasure_s`, not a hang."""
    assert hand_receiver.dispatch is not None
    hand_receiver.dispatch.remeasure_s = 0.5
    async with HandDevice(hand_receiver, -7200.0) as dev:
        sent = asyncio.create_task(dispatch(hand_receiver))
        assert isinstance(await dev.answer(), Rejected)
        async with asyncio.timeout(10):
            delivery = await sent
    assert (delivery.status, delivery.body["error"], delivery.attempts) == (
        403,
        "not_yet_valid",
        1,
    )


async def test_absurd_heartbeats_are_not_clock_readings(hand_receiver: Receiver) -> None:
    """A heartbeat's time is the device's word: NaN, infinities, before 1970 or past what
    a trigger can carry are ignored (counted, logged once a minute), the reading before
    them stands, and the device stays connected."""
    async with HandDevice(hand_receiver, -3 * DAY) as dev:
        await dev.beat()
        assert abs(await measured(hand_receiver) + 3 * DAY) < SLACK_S
        mark = time.monotonic()
        for t in (math.nan, math.inf, -math.inf, -1.0, 1e13, float(2**40)):
            await dev.beat(t)
        await dev.beat()  # a good one after them: all of them were taken in by now
        assert abs(await measured(hand_receiver, after=mark) + 3 * DAY) < SLACK_S
        clocks = hand_receiver.ingest.clocks
        assert clocks.ignored == 6
        sent = asyncio.create_task(dispatch(hand_receiver))
        assert isinstance(await dev.answer(), Accepted)
        delivery = await sent
    assert (delivery.status, delivery.attempts) == (202, 1)


# -- session times for the police and the district --------------------------------------------


async def open_session(
    dev: HandDevice, packets: PacketList, started_at: float, expires_at: float
) -> None:
    """``session_open`` of s-clock (the agent sends it again, as it is, when extended)."""
    extradata = packets[0][0][: packets[0][0].find(b"\x00\x00\x00\x01\x65")]
    desc = p.CameraDesc(0, "cam", "interior", "h264", 160, 120, 30.0, extradata, 0, 0)
    by = {"kind": "button", "button_id": "office", "location": "Main office"}
    await dev.send(p.SessionOpen("s-clock", BUILDING, by, started_at, expires_at, (desc,)))


async def session_json(http: aiohttp.ClientSession, receiver: Receiver) -> dict[str, Any]:
    async with http.get(receiver.url + "api/sessions/s-clock") as r:
        assert r.status == 200, await r.text()
        doc: dict[str, Any] = await r.json()
        return doc


async def test_the_api_gives_session_times_on_the_receivers_clock(
    receiver: Receiver, packets: PacketList
) -> None:
    """A Pi three days behind: the page showed the press "3 days ago" at the wrong time of
    day, and its expiry three days before the press (review s4). The session's
    ``opened_at`` is on the receiver's clock; its ``expires_at`` is the device's expiry
    moved by the device's offset measured when it was set (an NTP step later does not
    move it: the device counts the time left on its monotonic clock); an extension
    moves it."""
    async with HandDevice(receiver, -3 * DAY) as dev, logged_in(receiver, Role.OFFICER) as http:
        await dev.beat()
        await measured(receiver)
        mark = time.monotonic()
        pressed = dev.now()
        await open_session(dev, packets, pressed, pressed + 3600)
        await dev.beat()  # after the open: the receiver took both in, in order
        await measured(receiver, after=mark)
        doc = await session_json(http, receiver)
        now = time.time()
        assert abs(doc["opened_at"] - now) < SLACK_S
        assert abs(doc["meta"]["started_at"] - (now - 3 * DAY)) < SLACK_S  # the device's own
        assert abs(doc["expires_at"] - (now + 3600)) < SLACK_S
        assert abs(doc["device_clock_offset_s"] + 3 * DAY) < SLACK_S

        dev.offset_s = 0.0  # NTP syncs the Pi mid-emergency
        mark = time.monotonic()
        await dev.beat()
        await measured(receiver, after=mark)
        doc = await session_json(http, receiver)
        assert abs(doc["expires_at"] - (now + 3600)) < SLACK_S  # still an hour from the press

        mark = time.monotonic()
        # Extended (by the device's clock, synced now): opened again with its new expiry.
        await open_session(dev, packets, pressed, dev.now() + 7200)
        await dev.beat()
        await measured(receiver, after=mark)
        doc = await session_json(http, receiver)
        assert abs(doc["meta"]["expires_at"] - (time.time() + 7200)) < SLACK_S
        assert abs(doc["expires_at"] - (time.time() + 7200)) < SLACK_S
        assert abs(doc["device_clock_offset_s"]) < SLACK_S


def test_a_sessions_offset_is_the_one_measured_when_its_expiry_was_set() -> None:
    """The device counts an emergency's time left on its monotonic clock from when the
    expiry was set: that moment's offset converts it, a resume keeps it, a new expiry (an
    extension) takes the newest; a new connection is not measured until it beats."""
    now = [1_800_000_000.0]
    clocks = DeviceClocks(clock=lambda: now[0], mono=lambda: now[0])
    clocks.connected("pi")
    clocks.session_opened("pi", "s-1", 1_000.0)  # before any heartbeat: measured by the next
    assert clocks.session_offset("s-1") is None
    clocks.heard("pi", now[0] - DAY)
    assert clocks.session_offset("s-1") == -DAY
    now[0] += 60
    clocks.heard("pi", now[0])  # NTP synced it
    assert clocks.session_offset("s-1") == -DAY  # the expiry was set on the old clock
    clocks.disconnected("pi")
    clocks.connected("pi")
    assert clocks.reading("pi") is None
    clocks.session_opened("pi", "s-1", 1_000.0)  # resumed, same expiry
    assert clocks.session_offset("s-1") == -DAY
    clocks.heard("pi", now[0] + 2)
    clocks.session_opened("pi", "s-1", 9_000.0)  # extended on the synced clock
    assert clocks.session_offset("s-1") == 2
    clocks.session_closed("s-1")
    assert clocks.session_offset("s-1") is None
    for i in range(MAX_SESSIONS + 10):  # bounded, oldest forgotten first
        clocks.session_opened("pi", f"s-{i}", 1.0)
    assert clocks.session_offset("s-0") is None and clocks.session_offset("s-10") == 2


def test_an_expiry_on_the_receivers_clock() -> None:
    meta = {"started_at": 1_000.0, "expires_at": 4_600.0}
    assert receiver_expiry(meta, 2_000_000.0, -1_998_000.0) == 4_600.0 + 1_998_000.0
    assert receiver_expiry(meta, 2_000_000.0, None) == 2_003_600.0  # its length, from opening
    assert receiver_expiry({"expires_at": 4_600.0}, 2_000_000.0, None) is None
    assert receiver_expiry({"started_at": 1.0, "expires_at": math.nan}, 2.0, 0.0) is None
    assert receiver_expiry({}, 2.0, 0.0) is None
