"""What a certified device says of its sessions is held to its certificate (review t1, t4).

A device enrolled for lincoln-elementary opened an emergency saying washington-high: the
police alarm, the building cards and the district's webhook named washington-high. The
same device shared its interior camera ``hall`` as an "exterior" share: shown as a share,
no alarm, no webhook. Now the receiver records, shows and notifies the certificate's
building and zones, keeps what the device claimed beside them, and refuses a share with a
camera the certificate does not list as exterior (``zone_forbidden``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import protocol as p
from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import BUILDING, press_button
from provisioning.enrollment import sign_enrollment
from provisioning.keys import new_private_key, public_pem
from provisioning.tls import fingerprint_digest
from receiver.accounts import Role
from receiver.server import Receiver
from tests.browser import chromium, logged_in_page, needs_chromium
from tests.district_hook import DistrictHook, district_hook
from tests.logins import FAST, add_account, logged_in
from tests.media import PacketList, make_h264_packets
from tests.test_enrollment import enroll

pytestmark = pytest.mark.timeout(90)
NOW = int(time.time())
DEVICE = "lincoln-pi-1"
CERTIFIED = "lincoln-elementary"
#: The certificate's cameras: ``hall`` is interior, ``door`` exterior.
CAMERAS = [{"id": "hall", "zone": "interior"}, {"id": "door", "zone": "exterior"}]
BUTTON = {"kind": "button", "button_id": "b1", "location": "Room 12"}
SHARE = {"kind": "share", "policy": "share_exterior"}


@pytest.fixture(scope="module")
def small() -> PacketList:
    """H.264 frames, 160x120, a keyframe every 30."""
    return make_h264_packets(45, width=160, height=120)


@pytest.fixture
async def district(tmp_path: Path) -> AsyncIterator[DistrictHook]:
    async with district_hook(tmp_path) as hook:
        yield hook


@pytest.fixture
async def rx(tmp_path: Path, district: DistrictHook) -> AsyncIterator[Receiver]:
    async with Receiver(
        tmp_path / "receiver", "127.0.0.1", 0, password_params=FAST,
        notify_url=district.url, notify_pin=district.pin,
    ) as receiver:  # fmt: skip
        yield receiver


def certificate(rx: Receiver, folder: Path, device: str = DEVICE) -> tuple[Any, dict[str, str]]:
    """The device's key, and its certificate from the district's authority for
    lincoln-elementary (the receiver trusts that authority)."""
    authority = new_private_key(folder / "authority.key")
    (rx.data_dir / "authority.pub").write_bytes(public_pem(authority.public_key()))
    key = new_private_key(folder / f"{device}.key")
    cert = sign_enrollment(
        authority, version=1, device=device, device_key=key.public_key(), building=CERTIFIED,
        receiver_url=rx.uplink_url, receiver_pin=rx.fingerprint,
        recipients=[rx.age_recipient], cameras=CAMERAS, iat=NOW - 10, exp=NOW + 86400,
    )  # fmt: skip
    return key, cert


@dataclass
class Device:
    """A device speaking the uplink by hand, with its certificate (or on the allow-list)."""

    rx: Receiver
    key: Any
    cert: dict[str, str] | None
    name: str = DEVICE
    conn: p.Uplink = field(default_factory=lambda: p.Uplink(p.Role.AGENT))
    acked: dict[int, int] = field(default_factory=dict)
    error: p.Error | None = None
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Device:
        self.http = aiohttp.ClientSession()
        pin = aiohttp.Fingerprint(fingerprint_digest(self.rx.fingerprint))
        self.ws = await self.http.ws_connect(self.rx.uplink_url, ssl=pin)
        challenge = self.conn.receive((await self.ws.receive(timeout=10)).data)
        assert isinstance(challenge, p.Challenge)
        sig = self.key.sign(p.hello_signed_bytes(challenge.nonce, self.rx.origin))
        hello = p.Hello(self.name, p.b64url(sig), self.cert)
        await self.ws.send_str(str(self.conn.send(hello)))
        welcome = self.conn.receive((await self.ws.receive(timeout=10)).data)
        assert isinstance(welcome, p.Welcome), welcome
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()
        await asyncio.wait_for(self._reader, 10)

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                        return
                    continue
                event = self.conn.receive(msg.data)
                async with self.progress:
                    if isinstance(event, p.Ack):
                        self.acked[event.camera] = max(self.acked.get(event.camera, -1), event.seq)
                    elif isinstance(event, p.Error):
                        self.error = event
                    self.progress.notify_all()
        finally:
            self.closed.set()

    async def open(
        self, session: str, building: str, by: dict[str, str], cameras: list[tuple[str, str]],
        packets: PacketList,
    ) -> None:  # fmt: skip
        extradata = packets[0][0][: packets[0][0].find(b"\x00\x00\x00\x01\x65")]
        descs = tuple(
            p.CameraDesc(i, cid, zone, "h264", 160, 120, 30.0, extradata, 0, 0)
            for i, (cid, zone) in enumerate(cameras)
        )
        t = time.time()
        opened = p.SessionOpen(session, building, by, t, t + 3600, descs)
        await self.ws.send_str(str(self.conn.send(opened)))

    async def stream(self, cameras: int, packets: PacketList) -> None:
        """Every packet to each camera; returns once the receiver acked all but the last
        (the muxer writes a frame when the next one comes)."""
        self.acked.clear()
        for seq, (payload, key) in enumerate(packets):
            for cam in range(cameras):
                media = p.Media(
                    p.MediaKind.LIVE, cam, seq, 1000 + seq * 33_333, key, False, payload
                )
                wire = self.conn.send(media)
                assert isinstance(wire, bytes)
                await self.ws.send_bytes(wire)
        last = len(packets) - 2
        async with asyncio.timeout(20), self.progress:
            await self.progress.wait_for(
                lambda: all(self.acked.get(c, -1) >= last for c in range(cameras))
            )

    async def close_session(self, session: str) -> None:
        await self.ws.send_str(str(self.conn.send(p.SessionClose(session, "all clear"))))

    async def refused(self) -> p.Error:
        """The receiver's error, once it closed the uplink."""
        await asyncio.wait_for(self.closed.wait(), 10)
        assert self.error is not None, "closed without an error"
        return self.error


async def api_session(rx: Receiver, session: str) -> dict[str, Any]:
    """``GET /api/sessions/SESSION`` as an officer sees it."""
    async with (
        logged_in(rx, Role.OFFICER) as http,
        http.get(rx.url + f"api/sessions/{session}") as r,
    ):
        assert r.status == 200, await r.text()
        return dict(await r.json())


@needs_chromium
async def test_an_emergency_claiming_another_building_is_recorded_shown_and_notified_as_certified(
    tmp_path: Path,
    rx: Receiver,
    district: DistrictHook,
    small: PacketList,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="receiver.ingest")
    key, cert = certificate(rx, tmp_path)
    claimed = [("hall", "exterior"), ("door", "exterior"), ("attic", "interior")]
    async with Device(rx, key, cert) as dev:
        # Never refused: the footage of an emergency reaches the police whatever it says.
        await dev.open("s-spoof", "washington-high", BUTTON, claimed, small)
        await dev.stream(3, small)
        assert dev.error is None
        started = await district.next()
        api = await api_session(rx, "s-spoof")
        await add_account(rx.accounts, "olivia", Role.OFFICER)
        async with chromium() as browser, logged_in_page(browser, rx.url, "olivia") as page:
            alarm = '#alarms .alarm[data-session="s-spoof"] .alarm-line'
            await page.wait_for_selector(alarm, timeout=15_000)
            line = await page.text_content(alarm) or ""
            card = f'#devices .building[data-building="{CERTIFIED}"] .building-state'
            await page.wait_for_selector(card, timeout=15_000)
            state = await page.text_content(card)
            buildings = await page.eval_on_selector_all(
                "#devices .building", "els => els.map(e => e.dataset.building)"
            )
        await dev.close_session("s-spoof")
        ended = await district.next()
    # The district is told the certified building and zones.
    assert (started["type"], started["building"]) == ("session.started", CERTIFIED)
    assert started["cameras"] == [
        {"id": "hall", "zone": "interior"},
        {"id": "door", "zone": "exterior"},
        {"id": "attic", "zone": "interior"},  # not in the certificate: as it said
    ]
    assert (ended["type"], ended["building"]) == ("session.ended", CERTIFIED)
    # The recording and the police API: certified values, the claims beside them.
    mismatches = [
        {"field": "building", "claimed": "washington-high", "certified": CERTIFIED},
        {"field": "cameras.hall.zone", "claimed": "exterior", "certified": "interior"},
        {"field": "cameras.attic.zone", "claimed": "interior", "certified": None},
    ]
    # The district is told what the device claimed too: a device that lies is its concern.
    assert (started["certified"], started["mismatches"]) == (True, mismatches)
    assert "mismatches" not in ended
    meta = api["meta"]
    assert (meta["building"], meta["certified"]) == (CERTIFIED, True)
    assert meta["mismatches"] == mismatches
    assert {c["camera_id"]: c["zone"] for c in api["cameras"]} == {
        "hall": "interior", "door": "exterior", "attic": "interior",
    }  # fmt: skip
    (summary,) = rx.store.sessions()
    assert summary.meta["building"] == CERTIFIED and summary.meta["mismatches"] == mismatches
    assert rx.presence.devices[DEVICE].building == CERTIFIED
    # The police page: an emergency at lincoln-elementary, with what the device claimed.
    assert line.startswith(f"EMERGENCY — building {CERTIFIED} — "), line
    assert "DEVICE CLAIMED OTHERWISE" in line and "building washington-high" in line, line
    assert "camera hall zone exterior (certificate: interior)" in line, line
    assert state == "EMERGENCY"
    assert buildings == [CERTIFIED]  # no washington-high card
    # Logged as a warning naming the device, each field, the claim and the certificate's.
    (warning,) = [r.getMessage() for r in caplog.records if "claims in session" in r.getMessage()]
    assert DEVICE in warning and "s-spoof" in warning
    assert f"building claimed 'washington-high', certified '{CERTIFIED}'" in warning
    assert "cameras.hall.zone claimed 'exterior', certified 'interior'" in warning
    assert "cameras.attic.zone claimed 'interior', certified (not listed)" in warning


@pytest.mark.parametrize(
    ("camera", "why"),
    [("hall", "'hall' is interior in the enrollment certificate"),
     ("attic", "'attic' is not in the enrollment certificate")],
)  # fmt: skip
async def test_a_share_carries_only_cameras_certified_exterior(
    tmp_path: Path, rx: Receiver, district: DistrictHook, small: PacketList, camera: str, why: str
) -> None:
    key, cert = certificate(rx, tmp_path)
    async with Device(rx, key, cert) as dev:
        # The exterior camera, as certified, is shared (and nobody is told: no emergency).
        await dev.open("share-ok", CERTIFIED, SHARE, [("door", "exterior")], small)
        await dev.stream(1, small)
        await dev.close_session("share-ok")
        # An interior (or unknown) camera labelled exterior is refused, before any recording.
        await dev.open("share-bad", CERTIFIED, SHARE, [("door", "exterior"), (camera, "exterior")],
                       small)  # fmt: skip
        error = await dev.refused()
    assert error.code == "zone_forbidden"
    assert why in error.detail and "share-bad" in error.detail
    sessions = {s.session_id: s for s in rx.store.sessions()}
    assert set(sessions) == {"share-ok"}
    ok = sessions["share-ok"]
    assert [(c.camera_id, c.zone) for c in ok.cameras] == [("door", "exterior")]
    assert ok.meta["certified"] is True and "mismatches" not in ok.meta
    assert district.posts.empty()


@needs_chromium
async def test_an_allow_listed_devices_building_is_its_word_and_marked_unverified(
    tmp_path: Path, rx: Receiver, district: DistrictHook, small: PacketList
) -> None:
    key = new_private_key(tmp_path / "old-pi.key")
    (rx.devices_dir / "old-pi.pub").write_bytes(public_pem(key.public_key()))
    async with Device(rx, key, None, name="old-pi") as dev:
        await dev.open("s-old", "washington-high", BUTTON, [("hall", "exterior")], small)
        await dev.stream(1, small)
        started = await district.next()
        await add_account(rx.accounts, "olivia", Role.OFFICER)
        async with chromium() as browser, logged_in_page(browser, rx.url, "olivia") as page:
            alarm = '#alarms .alarm[data-session="s-old"] .alarm-line'
            await page.wait_for_selector(alarm, timeout=15_000)
            line = await page.text_content(alarm) or ""
            device = '#devices .device[data-device="old-pi"] .unverified'
            await page.wait_for_selector(device, timeout=15_000)
            note = await page.text_content(device)
    assert line.startswith("EMERGENCY — building washington-high — "), line
    assert line.endswith(" — building unverified (device not enrolled by certificate)"), line
    assert note == "building unverified (not enrolled)"
    assert started["building"] == "washington-high"  # unchanged: nothing to hold it to
    assert started["certified"] is False and "mismatches" not in started
    assert started["cameras"] == [{"id": "hall", "zone": "exterior"}]
    api = await api_session(rx, "s-old")
    assert api["meta"]["building"] == "washington-high"
    assert api["meta"]["certified"] is False and "mismatches" not in api["meta"]


async def test_a_correctly_enrolled_agent_is_never_flagged(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """The real agent, enrolled by certificate, sharing its exterior camera and then
    pressed: both sessions are accepted as certified, with nothing claimed otherwise."""
    caplog.set_level(logging.WARNING, logger="receiver.ingest")
    path, _ = enroll(tmp_path, receiver)
    text = path.read_text()
    path.write_text(
        text.replace(f'id = "{BUILDING}"\n', f'id = "{BUILDING}"\nshare_exterior = true\n')
    )
    async with Agent(load_config(path)) as agent:
        await agent.wait_until(lambda: agent.share is not None)
        share = agent.share
        assert share is not None
        stream = agent.uplink.stream(share.id)
        assert stream is not None
        await agent.uplink.wait_until(lambda: stream.acked[0] >= stream.preroll_end[0] + 5)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        emergency = agent.emergency.active
        assert emergency is not None
        await agent.wait_until(lambda: agent.uplink.stream(emergency.id) is not None)
        agent.end("test finished")
        await agent.uplink.wait_settled(emergency.id)
        await agent.uplink.wait_settled(share.id)
        assert not agent.uplink.stats.refusals
    sessions = {s.session_id: s for s in receiver.store.sessions()}
    assert {share.id, emergency.id} <= set(sessions)
    for summary in sessions.values():
        assert summary.meta["building"] == BUILDING
        assert summary.meta["certified"] is True
        assert "mismatches" not in summary.meta, summary.meta
    assert not [r for r in caplog.records if "claims in session" in r.getMessage()]
