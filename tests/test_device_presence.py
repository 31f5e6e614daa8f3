"""The receiver's offline alarm and its drop of revoked devices (issue #5, point 5).

Real TLS uplinks on 127.0.0.1 with the real agent. Presence counts in an
injected clock, which the tests move instead of waiting; they wait on
conditions (the agent's and the receiver's), never on time passing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.async_api import Page

from agent import protocol as p
from agent.config import load_config
from agent.daemon import Agent
from breakglass.cli import build_parser
from breakglass.demo import BUILDING, press_button
from provisioning.enrollment import sign_enrollment, sign_revocations
from provisioning.keys import kid, load_private_key, public_pem
from provisioning.tls import fingerprint_digest
from receiver.device_trust import DeviceTrust
from receiver.errors import InvalidSettingError
from receiver.presence import FOOTAGE_STALL_S, DevicePresence, Presence, iso_utc
from receiver.recording import RecordingStore
from receiver.server import Receiver
from receiver.viewer import setup_viewer
from tests.browser import chromium, logged_in_page, needs_chromium
from tests.logins import FAST, logged_in, secured_client
from tests.test_enrollment import NOW, enroll, refused

pytestmark = pytest.mark.timeout(60)

DEVICE = "demo-agent-1"
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
FIELDS = {
    "device",
    "building",
    "building_verified",
    "connected",
    "last_heard",
    "offline",
    "since",
    "session",
    "footage_stalled_since",
    "recording_failing",
    "enrollment",
}
DAY = 86400


class Clock:
    """Wall-clock seconds that move only when the test says so."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@contextlib.asynccontextmanager
async def receiver_at(
    tmp_path: Path, clock: Clock, *, poll_s: float = 60.0
) -> AsyncIterator[Receiver]:
    """A receiver on 127.0.0.1 whose presence counts in ``clock``."""
    async with Receiver(
        tmp_path / "receiver", "127.0.0.1", 0, clock=clock, poll_s=poll_s, password_params=FAST
    ) as rx:
        yield rx


async def get_devices(rx: Receiver) -> dict[str, Any]:
    """``GET /v1/devices`` over the receiver's pinned TLS, logged in as an officer."""
    async with logged_in(rx) as http, http.get(rx.url + "v1/devices") as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        body: dict[str, Any] = await resp.json()
        return body


def entry(body: dict[str, Any]) -> dict[str, Any]:
    (device,) = body["devices"]
    assert set(device) == FIELDS
    return dict(device)


def isoparse(text: str) -> float:
    """An ISO-8601 UTC time of the API as seconds."""
    return datetime.fromisoformat(text).timestamp()


def presence_of(rx: Receiver) -> DevicePresence:
    return rx.presence.devices[DEVICE]


async def until_disconnected(rx: Receiver) -> None:
    await rx.presence.wait_for(lambda: not presence_of(rx).connected)


def offline_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "receiver.presence" and r.levelno == logging.WARNING
    ]


def revoke(tmp_path: Path, rx: Receiver, version: int, *, other: bool = False) -> None:
    """Write revocation list ``version`` into DATA: revoking our agent, or another device."""
    authority = load_private_key(tmp_path / "district" / "authority.key")
    if other:
        revoked = {"device": "lincoln-pi-9", "kid": kid(Ed25519PrivateKey.generate().public_key())}
    else:
        device_key = load_private_key(tmp_path / "agent" / "device.key")
        revoked = {"device": DEVICE, "kid": kid(device_key.public_key())}
    doc = sign_revocations(authority, version, [revoked], iat=NOW, exp=NOW + 3600)
    tmp = rx.data_dir / "revocations.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(rx.data_dir / "revocations.json")  # as `breakglass provision revoke` does


async def test_a_silent_device_goes_offline_once_and_comes_back_on_reconnect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="receiver.presence")
    clock = Clock()
    async with receiver_at(tmp_path, clock, poll_s=0.05) as rx:
        assert await get_devices(rx) == {"devices": [], "offline_after_s": 300.0}
        path, _ = enroll(tmp_path, rx)
        async with Agent(load_config(path)) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await rx.presence.wait_for(lambda: DEVICE in rx.presence.devices)
            first = entry(await get_devices(rx))
            assert first.pop("enrollment")["version"] == 1  # its expiry: a test of its own
            assert first == {
                "device": DEVICE,
                "building": BUILDING,  # from its enrollment certificate
                "building_verified": True,
                "connected": True,
                "last_heard": "2027-01-15T08:00:00Z",
                "offline": False,
                "since": "2027-01-15T08:00:00Z",
                "session": None,
                "footage_stalled_since": None,
                "recording_failing": None,
            }
        await until_disconnected(rx)
        clock.t += 299
        quiet = entry(await get_devices(rx))
        assert (quiet["connected"], quiet["offline"]) == (False, False)
        assert not offline_warnings(caplog)

        clock.t += 1  # 300 s of silence
        gone = entry(await get_devices(rx))
        assert gone["offline"] is True
        assert gone["since"] == iso_utc(T0 + 300)
        assert gone["last_heard"] == iso_utc(T0)
        assert rx.presence.offline() == [DEVICE]
        clock.t += 3600
        assert entry(await get_devices(rx))["offline"] is True
        (warning,) = offline_warnings(caplog)  # once per transition, however often checked
        assert f"device {DEVICE} (building {BUILDING}) OFFLINE" in warning

        async with Agent(load_config(path)) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await rx.presence.wait_for(lambda: presence_of(rx).connected)
            back = entry(await get_devices(rx))
            assert (back["connected"], back["offline"]) == (True, False)
            assert back["last_heard"] == back["since"] == iso_utc(clock.t)
        assert any(f"device {DEVICE} is back online" in r.getMessage() for r in caplog.records)
        assert len(offline_warnings(caplog)) == 1


async def test_the_offline_alarm_survives_a_receiver_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    async with receiver_at(tmp_path, clock) as rx:
        path, _ = enroll(tmp_path, rx)
        async with Agent(load_config(path)) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await rx.presence.wait_for(lambda: DEVICE in rx.presence.devices)
        await until_disconnected(rx)
    saved = json.loads((tmp_path / "receiver" / "presence.json").read_text())
    assert saved["devices"][DEVICE] == {
        "last_heard": T0, "building": BUILDING, "building_verified": True,
    }  # fmt: skip

    clock.t += 120
    async with receiver_at(tmp_path, clock) as rx:  # the device never reconnects
        after = entry(await get_devices(rx))
        assert (after["connected"], after["offline"]) == (False, False)
        clock.t += 180  # 300 s since it was last heard, before the restart
        after = entry(await get_devices(rx))
        assert after["offline"] is True
        assert after["building"] == BUILDING
        assert after["building_verified"] is True  # kept: its certificate said so
        assert after["since"] == iso_utc(T0 + 300)
    assert len(offline_warnings(caplog)) == 1


async def test_the_device_list_says_when_an_enrollment_expires_and_that_it_was_refused(
    tmp_path: Path,
) -> None:
    """Past its enrollment's expiry the receiver refuses a device, and an emergency from
    its school no longer reaches it: the device list says when that comes (a warning
    within 30 days), across a restart, and that the device was refused for it."""
    clock = Clock(NOW)
    async with receiver_at(tmp_path, clock) as rx:
        path, _ = enroll(tmp_path, rx, exp=NOW + 40 * DAY)
        async with Agent(load_config(path)) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await rx.presence.wait_for(lambda: DEVICE in rx.presence.devices)
            assert entry(await get_devices(rx))["enrollment"] == {
                "version": 1,
                "expires_at": iso_utc(NOW + 40 * DAY),
                "expired": False,
                "expires_soon": False,
                "refused": None,
            }
        await until_disconnected(rx)
        clock.t += 11 * DAY  # 29 days left
        soon = entry(await get_devices(rx))["enrollment"]
        assert (soon["expires_soon"], soon["expired"]) == (True, False)

    async with receiver_at(tmp_path, clock) as rx:  # a restart: still known
        assert entry(await get_devices(rx))["enrollment"]["expires_soon"] is True
        enroll(tmp_path, rx, exp=NOW - 1)  # the same certificate, as if its time had come
        assert await refused(path) == "enrollment_expired"
        gone = entry(await get_devices(rx))["enrollment"]
        assert gone["expires_at"] == iso_utc(NOW - 1)
        assert (gone["expired"], gone["expires_soon"]) == (True, False)
        assert gone["refused"]["code"] == "enrollment_expired"
        assert abs(isoparse(gone["refused"]["at"]) - time.time()) < 60


async def test_a_revocation_written_while_connected_drops_the_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with receiver_at(tmp_path, Clock(), poll_s=0.05) as rx:
        path, _ = enroll(tmp_path, rx)
        async with Agent(load_config(path)) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(10)
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
            session = agent.emergency.active
            assert session is not None
            await agent.uplink.wait_until(
                lambda: (s := agent.uplink.stream(session.id)) is not None and min(s.acked) >= 5
            )
            assert entry(await get_devices(rx))["session"] == session.id

            revoke(tmp_path, rx, 1)  # the background watch notices the new file
            await agent.uplink.wait_until(lambda: "revoked" in agent.uplink.stats.refusals)
            assert not agent.uplink.connected
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            acked = dict(zip((c.id for c in stream.open.cameras), stream.acked, strict=True))
        # Everything the device saw acknowledged is durable at the receiver.
        durable = rx.store.get(session.id).durable_by_camera()
        assert all(durable[cam] >= seq >= 5 for cam, seq in acked.items()), (durable, acked)
        assert rx.ingest.refused == {"revoked": 1}
        assert any(
            f"device {DEVICE} is revoked (revocation list v1): closing its uplink" in r.getMessage()
            for r in caplog.records
        )
        # A revoked device is no longer watched for the offline alarm.
        assert (await get_devices(rx))["devices"] == []
        assert await refused(path) == "revoked"  # and it cannot come back
        assert rx.ingest.refused == {"revoked": 2}


async def test_a_revocation_read_at_another_hello_drops_the_device(tmp_path: Path) -> None:
    async with receiver_at(tmp_path, Clock()) as rx:  # the periodic watch is 60 s away
        path, _ = enroll(tmp_path, rx)
        async with Agent(load_config(path)) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            revoke(tmp_path, rx, 1)
            # Any hello, even a stranger's that is refused, makes the receiver look again.
            conn = p.Uplink(p.Role.AGENT)
            pin = aiohttp.Fingerprint(fingerprint_digest(rx.fingerprint))
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(rx.uplink_url, ssl=pin) as ws,
            ):
                conn.receive((await ws.receive()).data)
                await ws.send_str(str(conn.send(p.Hello("stranger-1", p.b64url(bytes(64))))))
                answer = conn.receive((await ws.receive()).data)
                assert isinstance(answer, p.Error)
                assert answer.code == "unknown_device"
            await agent.uplink.wait_until(lambda: "revoked" in agent.uplink.stats.refusals)
            assert not agent.uplink.connected
        assert rx.ingest.refused == {"unknown_device": 1, "revoked": 1}


async def test_overlapping_revocation_checks_drop_a_device_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hellos and the periodic watch each check the list; checks that overlap while the
    device's uplink is still closing count, log and send its ``revoked`` once."""
    async with receiver_at(tmp_path, Clock()) as rx:
        path, _ = enroll(tmp_path, rx)
        async with Agent(load_config(path)) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            revoke(tmp_path, rx, 1)
            await asyncio.gather(*(rx.ingest.check_revocations() for _ in range(3)))
            await agent.uplink.wait_until(lambda: "revoked" in agent.uplink.stats.refusals)
        assert rx.ingest.refused == {"revoked": 1}
        closing = [r for r in caplog.records if "closing its uplink" in r.getMessage()]
        assert len(closing) == 1


async def test_an_older_revocation_list_never_replaces_a_newer_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with receiver_at(tmp_path, Clock()) as rx:
        path, _ = enroll(tmp_path, rx)
        revoke(tmp_path, rx, 2, other=True)  # read by the agent's hello
        async with Agent(load_config(path)) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            assert rx.ingest.trust is not None
            assert rx.ingest.trust.current is not None
            assert rx.ingest.trust.current.version == 2
            revoke(tmp_path, rx, 1)  # an older list that would revoke it
            await rx.ingest.check_revocations()
            assert rx.ingest.trust.current.version == 2
            assert agent.uplink.connected and not agent.uplink.stats.refusals
            assert rx.ingest.devices[DEVICE].connected
            assert entry(await get_devices(rx))["connected"] is True
        assert any("v1 is older than v2: kept the newer" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", [0, -1, 14.9, float("nan"), float("inf"), "300"])
def test_bad_offline_after_values_are_refused_clearly(tmp_path: Path, value: Any) -> None:
    with pytest.raises(InvalidSettingError, match=r"^offline_after_s: expected") as err:
        Receiver(tmp_path / "receiver", offline_after_s=value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "expected a number of seconds, got 'abc'"),
        ("5", "at least 15 (three heartbeats), got 5"),
        ("-300", "got -300"),
        ("inf", "got inf"),
        ("nan", "got nan"),
    ],
)
def test_bad_offline_after_flags_are_refused_clearly(
    capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    args = ["receiver", "serve", "--data", "rx", "--offline-after", text]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --offline-after:" in err
    assert message in err
    assert build_parser().parse_args([*args[:-1], "600"]).offline_after == 600.0
    assert build_parser().parse_args(args[:4]).offline_after == 300.0


# The viewer page: the offline alarm shows, red, and clears without a reload.
_ALARM_JS = """new Promise((resolve, reject) => {
  const hiddenNow = %s;  // resolve once the banner's hidden flag is no longer this
  const look = () => {
    const banner = document.getElementById('device-alarms');
    const chip = document.querySelector('#devices .device');
    if (!banner || !chip || banner.hidden === hiddenNow) return false;
    resolve({hidden: banner.hidden, text: banner.textContent, chip: chip.textContent,
             background: getComputedStyle(banner).backgroundColor,
             chipClass: chip.className, title: document.title});
    return true;
  };
  if (look()) return;
  const seen = new MutationObserver(() => { if (look()) seen.disconnect(); });
  seen.observe(document, {subtree: true, childList: true, attributes: true});
  setTimeout(() => reject(new Error('timed out')), 15000);
})"""


async def banner(page: Page, hidden_now: bool) -> dict[str, Any]:
    """The offline banner once its ``hidden`` flag is no longer ``hidden_now``."""
    value: dict[str, Any] = await page.evaluate(_ALARM_JS % ("true" if hidden_now else "false"))
    return value


@needs_chromium
async def test_the_viewer_shows_the_offline_alarm_and_clears_it_without_reload(
    tmp_path: Path,
) -> None:
    clock = Clock()
    presence = Presence(clock=clock)
    presence.connected("lincoln-pi-1", building="lincoln-elementary")
    presence.disconnected("lincoln-pi-1")
    clock.t += 301
    async with RecordingStore(tmp_path / "rec") as store:
        app = web.Application()
        setup_viewer(app, store, store.live_feed, presence)
        async with (
            secured_client(app, tmp_path / "auth") as client,
            chromium() as browser,
            logged_in_page(browser, str(client.make_url("/")), "officer-1") as page,
        ):
            alarm = await banner(page, hidden_now=True)
            assert "DEVICE OFFLINE — lincoln-pi-1 (building lincoln-elementary)" in alarm["text"]
            assert alarm["background"] == "rgb(200, 16, 46)"  # --alarm: red
            assert "offline" in alarm["chipClass"].split()
            assert "OFFLINE" in alarm["chip"]
            assert "DEVICE(S) OFFLINE" in alarm["title"]

            presence.connected("lincoln-pi-1")  # it reconnects: the next poll clears it
            ok = await banner(page, hidden_now=False)
            assert ok["hidden"] is True
            assert "connected" in ok["chipClass"].split()
            assert ok["title"] == "breakglass receiver"


@needs_chromium
async def test_the_viewer_shows_a_device_whose_recording_fails_and_clears_it(
    tmp_path: Path,
) -> None:
    """A device the receiver cannot record (its disk full) reconnects every few seconds, so
    it is never offline: its failure has a banner line of its own."""
    clock = Clock()
    presence = Presence(clock=clock)
    presence.connected("lincoln-pi-1", building="lincoln-elementary")
    presence.recording_failed("lincoln-pi-1", "recording_failed: [Errno 28] No space left")
    async with RecordingStore(tmp_path / "rec") as store:
        app = web.Application()
        setup_viewer(app, store, store.live_feed, presence)
        async with (
            secured_client(app, tmp_path / "auth") as client,
            chromium() as browser,
            logged_in_page(browser, str(client.make_url("/")), "officer-1") as page,
        ):
            alarm = await banner(page, hidden_now=True)
            assert "RECORDING FAILING — lincoln-pi-1 (building lincoln-elementary)" in alarm["text"]
            assert "No space left" in alarm["text"]
            assert "DEVICE OFFLINE" not in alarm["text"]
            assert "RECORDING FAILING" in alarm["chip"]
            assert "connected" in alarm["chipClass"].split()

            presence.recording_works("lincoln-pi-1")  # acked again: the next poll clears it
            ok = await banner(page, hidden_now=False)
            assert ok["hidden"] is True
            assert "RECORDING FAILING" not in ok["chip"]


_ENROLLMENT_JS = """() => {
  const banner = document.getElementById('device-alarms');
  const chips = {};
  for (const li of document.querySelectorAll('#devices .device')) {
    const span = li.querySelector('.enrollment');
    chips[li.dataset.device] = span && {text: span.textContent, cls: span.className,
                                        background: getComputedStyle(span).backgroundColor};
  }
  if (Object.keys(chips).length < 3 || banner.hidden) return null;
  return {banner: banner.textContent, chips};
}"""


@needs_chromium
async def test_the_viewer_shows_when_each_enrollment_expires_and_warns_before(
    tmp_path: Path,
) -> None:
    """Per device, when its enrollment expires: a warning within 30 days, an alarm once
    it expired and the receiver refused the device."""
    data, pin, now = tmp_path / "receiver", "sha256:" + "ab" * 32, time.time()
    authority = Ed25519PrivateKey.generate()
    data.mkdir()
    (data / "authority.pub").write_bytes(public_pem(authority.public_key()))
    trust = DeviceTrust(data)
    presence = Presence(clock=Clock(now))
    for device, exp in [("lincoln-pi-1", now + 10 * DAY), ("lincoln-pi-2", now + 200 * DAY),
                        ("lincoln-pi-3", now - DAY)]:  # fmt: skip
        cert = sign_enrollment(
            authority, version=1, device=device,
            device_key=Ed25519PrivateKey.generate().public_key(), building=BUILDING,
            receiver_url="wss://rx:8443/v1/uplink", receiver_pin=pin,
            recipients=["age1" + "q" * 58], cameras=[], iat=int(now) - 400 * DAY, exp=int(exp),
        )  # fmt: skip
        with contextlib.suppress(p.RemoteProtocolError):  # lincoln-pi-3: expired, refused
            trust.check(device, cert, now=now, own_pin=pin)
        presence.connected(device, building=BUILDING)
    presence.disconnected("lincoln-pi-3")
    async with RecordingStore(tmp_path / "rec") as store:
        app = web.Application()
        setup_viewer(app, store, store.live_feed, presence, trust=trust)
        async with (
            secured_client(app, tmp_path / "auth") as client,
            chromium() as browser,
            logged_in_page(browser, str(client.make_url("/")), "officer-1") as page,
        ):
            shown = await (
                await page.wait_for_function(_ENROLLMENT_JS, timeout=15_000)
            ).json_value()
    soon, later, gone = (shown["chips"][f"lincoln-pi-{i}"] for i in (1, 2, 3))
    assert soon["text"].startswith("ENROLLMENT EXPIRES ") and "(in 10 days)" in soon["text"]
    assert soon["cls"] == "enrollment expiring"
    assert soon["background"] == "rgb(217, 154, 0)"  # --warn: amber
    assert later["text"].startswith("enrolled until ") and later["cls"] == "enrollment"
    assert gone["text"].startswith("REFUSED: ENROLLMENT EXPIRED ")
    assert gone["cls"] == "enrollment expired"
    assert f"ENROLLMENT EXPIRED — lincoln-pi-3 (building {BUILDING})" in shown["banner"]
    assert "an emergency there no longer reaches this receiver" in shown["banner"]
    assert "lincoln-pi-1" not in shown["banner"] and "lincoln-pi-2" not in shown["banner"]


async def test_the_presence_file_is_written_whole_and_read_back(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "presence.json"
    first = Presence(path, clock=clock)
    first.connected("lincoln-pi-1", building="lincoln-elementary")
    await first.save()
    assert not (tmp_path / "presence.json.tmp").exists()
    second = Presence(path, clock=clock)
    second.load()
    (loaded,) = second.devices.values()
    assert (loaded.device, loaded.last_heard, loaded.building, loaded.connected) == (
        "lincoln-pi-1",
        T0,
        "lincoln-elementary",
        False,
    )
    path.write_text("{not json")
    third = Presence(path, clock=clock)
    third.load()  # logged; a damaged file never keeps the receiver from starting
    assert third.devices == {}
    fresh = Presence(tmp_path / "missing" / "presence.json", clock=clock)
    fresh.load()  # the first start: no file yet
    assert fresh.devices == {}


def test_a_connected_device_whose_session_records_nothing_raises_its_own_alarm(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connected and online said all was well while an emergency's footage had stopped
    (a review found live frozen for 11 minutes, the device list green throughout)."""
    clock = Clock()
    presence = Presence(clock=clock)
    presence.connected("lincoln-pi-1", building="lincoln-elementary")
    presence.session("lincoln-pi-1", "s-1")
    clock.t += FOOTAGE_STALL_S - 1
    presence.recording_works("lincoln-pi-1")  # footage made durable: the count starts again
    clock.t += FOOTAGE_STALL_S - 1
    presence.check()
    assert presence.to_json()[0]["footage_stalled_since"] is None
    clock.t += 1
    presence.check()
    presence.check()  # said once
    (device,) = presence.to_json()
    assert device["footage_stalled_since"] == iso_utc(T0 + FOOTAGE_STALL_S - 1)
    said = [r.getMessage() for r in caplog.records if "NO FOOTAGE" in r.getMessage()]
    assert len(said) == 1 and "session s-1" in said[0], said
    presence.recording_works("lincoln-pi-1")
    assert presence.to_json()[0]["footage_stalled_since"] is None
    # No session open, or not connected: no footage is owed, no alarm.
    presence.session("lincoln-pi-1", None)
    clock.t += 10 * FOOTAGE_STALL_S
    presence.check()
    assert presence.to_json()[0]["footage_stalled_since"] is None
    presence.session("lincoln-pi-1", "s-2")
    presence.disconnected("lincoln-pi-1")
    clock.t += 10 * FOOTAGE_STALL_S
    presence.check()
    assert presence.to_json()[0]["footage_stalled_since"] is None
