"""Dispatch goes only to devices certified for the building, and never far ahead (review t2).

A device on the receiver's allow-list (no enrollment certificate) opened a session claiming
lincoln-elementary and reported a clock one day ahead in its heartbeats: from then on every
dispatch for lincoln-elementary was also signed for it, in its time (``iat`` a day ahead),
and pushed to it. It kept them: a day later a kept ``end`` posted to the real device's Local
API ended a new, real emergency there (and a kept ``start`` started one). Now a trigger is
signed only for a device whose connection was accepted with a certificate naming the
building (one that only claims it is listed as ``not_certified``), a session's claim never
sets or moves a certified building, and no trigger is signed more than
:data:`receiver.dispatch.MAX_DEVICE_AHEAD_S` ahead of the receiver's clock.

Real receiver, real sockets on 127.0.0.1: devices speaking the uplink by hand, judging the
triggers pushed to them with the real verifier on their own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from provisioning.enrollment import sign_enrollment
from provisioning.keys import kid, load_private_key, public_pem
from provisioning.tls import fingerprint_digest
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
from receiver.dispatch import MAX_DEVICE_AHEAD_S, Delivery
from receiver.presence import Presence
from receiver.server import Receiver
from tests.logins import logged_in
from tests.media import PacketList

pytestmark = pytest.mark.timeout(60)

BUILDING = "lincoln-elementary"
DAY = 86400.0
SLACK_S = 5.0
NOW = int(time.time())


@dataclass
class HandDevice:
    """A device speaking the uplink by hand: certified for ``building`` by the district's
    ``authority``, or (``authority`` None) on the allow-list only. Its clock is ``offset_s``
    off the receiver's; it keeps every trigger pushed to it and answers as a device would
    (the real verifier, on its own clock)."""

    rx: Receiver
    name: str
    offset_s: float = 0.0
    authority: Ed25519PrivateKey | None = None
    building: str = BUILDING
    conn: p.Uplink = field(default_factory=lambda: p.Uplink(p.Role.AGENT))
    kept: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[Accepted | Rejected] = field(default_factory=list)

    def now(self) -> float:
        return time.time() + self.offset_s

    async def __aenter__(self) -> HandDevice:
        key = Ed25519PrivateKey.generate()
        cert = None
        if self.authority is None:
            (self.rx.devices_dir / f"{self.name}.pub").write_bytes(public_pem(key.public_key()))
        else:
            cert = sign_enrollment(
                self.authority, version=1, device=self.name, device_key=key.public_key(),
                building=self.building, receiver_url=self.rx.uplink_url,
                receiver_pin=self.rx.fingerprint, recipients=[self.rx.age_recipient],
                cameras=[{"id": "cam", "zone": "interior"}], iat=NOW - 10, exp=NOW + 86400,
            )  # fmt: skip
        dispatch = load_private_key(self.rx.dispatch_key_path).public_key()
        enrolled = TriggerKey(kid(dispatch), dispatch, "dispatch", None, "County 911")
        self.keyring = Keyring(TriggerKeyList(1, 0, 2**40, {enrolled.kid: enrolled}, {}))
        self.replay, self.challenges = MemoryReplayCache(), Challenges()
        self.http = aiohttp.ClientSession()
        pin = aiohttp.Fingerprint(fingerprint_digest(self.rx.fingerprint))
        self.ws = await self.http.ws_connect(self.rx.uplink_url, ssl=pin)
        challenge = self.conn.receive((await self.ws.receive(timeout=10)).data)
        assert isinstance(challenge, p.Challenge)
        sig = key.sign(p.hello_signed_bytes(challenge.nonce, self.rx.origin))
        await self.ws.send_str(str(self.conn.send(p.Hello(self.name, p.b64url(sig), cert))))
        welcome = self.conn.receive((await self.ws.receive(timeout=10)).data)
        assert isinstance(welcome, p.Welcome), welcome
        self._reader = asyncio.create_task(self._read())
        await self.rx.presence.wait_for(self._connected)
        return self

    def _connected(self) -> bool:
        entry = self.rx.presence.devices.get(self.name)
        return entry is not None and entry.connected

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.rx.presence.wait_for(lambda: not self._connected())

    async def _read(self) -> None:
        while (msg := await self.ws.receive()).type is aiohttp.WSMsgType.TEXT:
            event = self.conn.receive(msg.data)
            if not isinstance(event, p.Trigger):
                continue
            self.kept.append(dict(event.envelope))
            outcome = verify_trigger(
                event.envelope, building=BUILDING, keyring=self.keyring, now=self.now(),
                mono=time.monotonic(), replay=self.replay, challenges=self.challenges,
                device=self.name,
            )  # fmt: skip
            self.outcomes.append(outcome)
            if isinstance(outcome, Accepted):
                status, body = 202, {"session": f"s-{self.name}"}
            else:
                status, body = 403, {"error": outcome.code, "detail": outcome.detail}
            await self.send(p.TriggerResult(event.ref, status, body))

    async def send(self, event: p.Event) -> None:
        await self.ws.send_str(str(self.conn.send(event)))

    async def beat(self) -> None:
        """A heartbeat with this device's clock; returns once the receiver measured it."""
        mark = time.monotonic()
        await self.send(p.Heartbeat(self.now()))
        reading = await self.rx.ingest.clocks.next_reading(self.name, after=mark, within=10)
        assert reading is not None
        assert abs(reading.offset_s - self.offset_s) < SLACK_S

    async def open(self, session: str, building: str, packets: PacketList) -> None:
        """``session_open`` claiming ``building``; returns once the receiver took it."""
        extradata = packets[0][0][: packets[0][0].find(b"\x00\x00\x00\x01\x65")]
        desc = p.CameraDesc(0, "cam", "interior", "h264", 160, 120, 30.0, extradata, 0, 0)
        by = {"kind": "button", "button_id": "office", "location": "Main office"}
        t = self.now()
        await self.send(p.SessionOpen(session, building, by, t, t + 3600, (desc,)))
        entry = self.rx.presence.devices[self.name]
        await self.rx.presence.wait_for(lambda: entry.session == session)

    def kept_iats(self) -> list[int]:
        return [json.loads(p.unb64url(e["payload"], what="payload"))["iat"] for e in self.kept]


@pytest.fixture
def authority(receiver: Receiver) -> Ed25519PrivateKey:
    """The district's authority, trusted by the receiver."""
    key = Ed25519PrivateKey.generate()
    (receiver.data_dir / "authority.pub").write_bytes(public_pem(key.public_key()))
    return key


async def devices_api(http: aiohttp.ClientSession, rx: Receiver) -> dict[str, dict[str, Any]]:
    async with http.get(rx.url + "v1/devices") as r:
        assert r.status == 200, await r.text()
        return {d["device"]: d for d in (await r.json())["devices"]}


async def access(rx: Receiver) -> list[dict[str, Any]]:
    await rx.access_log.flush()
    text = (rx.data_dir / "access.log").read_text()
    return [json.loads(line) for line in text.splitlines()]


async def test_a_device_that_only_claims_the_building_is_sent_nothing_and_listed_not_certified(
    receiver: Receiver, authority: Ed25519PrivateKey, packets: PacketList
) -> None:
    """The reviewer's rogue: allow-listed, claiming lincoln-elementary, a day ahead."""
    async with (
        HandDevice(receiver, "lincoln-pi-1", authority=authority) as real,
        HandDevice(receiver, "rogue-1", offset_s=DAY) as rogue,
        logged_in(receiver, Role.DISPATCHER, "jdoe") as http,
    ):
        await rogue.beat()
        await rogue.open("s-rogue", BUILDING, packets)
        await real.beat()
        url = receiver.url + "v1/dispatch"
        results = []
        for action, why in [("start", "911 call"), ("end", "all clear")]:
            body = {"building": BUILDING, "action": action, "reason": why}
            async with http.post(url, json=body) as r:
                assert r.status == 200, await r.text()
                results.append((await r.json())["deliveries"])
        shown = await devices_api(http, receiver)
    assert rogue.kept == []  # nothing signed for it, nothing pushed to it
    for deliveries in results:
        assert [(d["device"], d["status"]) for d in deliveries] == [
            ("lincoln-pi-1", 202),
            ("rogue-1", 0),
        ], deliveries
        assert deliveries[1]["error"] == "not_certified"
        assert "enrollment certificate" in deliveries[1]["detail"]
    assert len(real.kept) == 2 and all(isinstance(o, Accepted) for o in real.outcomes)
    # What one device was sent is of no use on the building's others: each names its device.
    for kept in real.kept:
        other = verify_trigger(
            kept, building=BUILDING, keyring=real.keyring, now=real.now(),
            mono=time.monotonic(), replay=MemoryReplayCache(), challenges=Challenges(),
            device="lincoln-pi-2",
        )  # fmt: skip
        assert isinstance(other, Rejected) and other.code == "wrong_device", other
    # The device list: the claim is shown as such, the certificate's building as verified.
    assert (shown["rogue-1"]["building"], shown["rogue-1"]["building_verified"]) == (
        BUILDING,
        False,
    )
    assert shown["lincoln-pi-1"]["building_verified"] is True
    # The access log says so per device, with no device time (nothing was signed).
    (start, _) = [e for e in await access(receiver) if e["action"] == "dispatch"]
    rogue_entry = next(r for r in start["results"] if r["device"] == "rogue-1")
    assert rogue_entry["device_time"] is None and rogue_entry["attempts"] == 0


async def test_only_claimants_is_a_dispatch_that_reaches_no_device_and_says_why(
    receiver: Receiver, packets: PacketList
) -> None:
    async with HandDevice(receiver, "rogue-1") as rogue:
        await rogue.open("s-rogue", BUILDING, packets)
        assert receiver.dispatch is not None
        (listed,) = await receiver.dispatch.send(
            building=BUILDING, action="end", reason="all clear", user="jdoe"
        )
    assert (listed.device, listed.status, listed.body["error"]) == ("rogue-1", 0, "not_certified")
    assert rogue.kept == []


async def test_a_building_kept_from_an_earlier_certificate_is_not_enough(
    receiver: Receiver, authority: Ed25519PrivateKey
) -> None:
    """The device's certificate named the building on an earlier connection; now it is back
    on the allow-list alone: its building is no longer verified, and it gets nothing."""
    async with HandDevice(receiver, "lincoln-pi-2", authority=authority):
        assert receiver.devices_of(BUILDING) == ["lincoln-pi-2"]
    assert receiver.devices_of(BUILDING) == []
    async with HandDevice(receiver, "lincoln-pi-2") as again:  # no certificate this time
        assert receiver.dispatch is not None
        (listed,) = await receiver.dispatch.send(
            building=BUILDING, action="start", reason="911 call", user="jdoe"
        )
        assert again.kept == []
        assert (listed.status, listed.body["error"]) == (0, "not_certified")
        entry = receiver.presence.devices["lincoln-pi-2"]
        assert (entry.building, entry.building_verified) == (BUILDING, False)


async def test_a_claim_never_sets_or_moves_a_certified_building(
    receiver: Receiver, authority: Ed25519PrivateKey, packets: PacketList
) -> None:
    async with HandDevice(receiver, "lincoln-pi-1", authority=authority) as dev:
        await dev.open("s-spoof", "washington-high", packets)
        entry = receiver.presence.devices["lincoln-pi-1"]
        assert (entry.building, entry.building_verified) == (BUILDING, True)
        assert receiver.devices_of("washington-high") == []
        assert receiver.unverified_of("washington-high") == []
        assert receiver.devices_of(BUILDING) == ["lincoln-pi-1"]


def test_presence_marks_a_claimed_building_unverified_and_keeps_a_certified_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "presence.json"
    presence = Presence(path)
    presence.connected("pi-cert", building=BUILDING)
    presence.session("pi-cert", "s-1", building="washington-high")  # a claim: ignored
    presence.connected("pi-old")  # the allow-list
    presence.session("pi-old", "s-2", building=BUILDING)  # its claim: unverified
    shown = {d["device"]: d for d in presence.to_json()}
    assert (shown["pi-cert"]["building"], shown["pi-cert"]["building_verified"]) == (
        BUILDING,
        True,
    )
    assert (shown["pi-old"]["building"], shown["pi-old"]["building_verified"]) == (
        BUILDING,
        False,
    )
    presence.disconnected("pi-cert")
    presence.connected("pi-cert")  # back without its certificate
    assert presence.devices["pi-cert"].building_verified is False
    presence.session("pi-cert", "s-3", building="washington-high")  # still not moved
    assert presence.devices["pi-cert"].building == BUILDING


# -- how far ahead a trigger is signed ------------------------------------------------------


async def signed_for(rx: Receiver, action: str = "start") -> Delivery:
    assert rx.dispatch is not None
    (delivery,) = await rx.dispatch.send(
        building=BUILDING, action=action, reason="911 call", user="jdoe"
    )
    return delivery


async def test_no_trigger_is_signed_more_than_the_bound_ahead_and_behind_is_served(
    receiver: Receiver, authority: Ed25519PrivateKey
) -> None:
    """A certified device whose clock reads a day ahead is refused before anything is
    signed (``device_clock_ahead``); within the bound it is served in its time, and a Pi
    days behind (fake-hwclock after a power cut) is served too."""
    async with HandDevice(receiver, "lincoln-pi-1", DAY, authority=authority) as dev:
        await dev.beat()
        refused = await signed_for(receiver)
        assert (refused.status, refused.body["error"], refused.attempts) == (
            0,
            "device_clock_ahead",
            0,
        )
        detail = refused.body["detail"]
        assert "s ahead of the receiver's" in detail and f"{MAX_DEVICE_AHEAD_S:.0f} s" in detail
        assert dev.kept == []
        ahead = MAX_DEVICE_AHEAD_S - 120.0
        for offset in (ahead, -30 * DAY):
            dev.offset_s = offset
            await dev.beat()
            delivery = await signed_for(receiver)
            assert delivery.status == 202, delivery
            (iat,) = dev.kept_iats()[-1:]
            assert math.isclose(iat - time.time(), offset, abs_tol=SLACK_S)
            await signed_for(receiver, "end")
    assert len(dev.kept) == 4
