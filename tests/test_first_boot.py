"""First boot, enrollment over the paired channel, re-enrollment, camera check (issue #5).

A device starts from the small configuration every SD card carries, makes its
key and setup code, runs unprovisioned, and is enrolled by the technician's
real ``provision enroll`` path (pair, certify, deliver, wait until armed)
against a real receiver on loopback that trusts the district authority.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import enrollment_state
from agent.boot import load_agent_config, run_agent
from agent.daemon import Agent
from agent.errors import ConfigError
from agent.first_boot import FirstBoot
from breakglass.demo import write_trust
from breakglass.enroll_cli import District, Target, check_one, enroll_one, rotate_one
from breakglass.pairing_client import pair, request
from provisioning.age_keys import new_identity, recipient_of
from provisioning.enrollment import Enrollment
from provisioning.keys import kid, load_private_key, new_private_key
from provisioning.pairing import PairingError, normalise_code
from receiver.server import Receiver

pytestmark = pytest.mark.timeout(90)

FIRST_BOOT = """# the same on every SD card
[device]
key = "device.key"
state_dir = "state"

[local_api]
host = "127.0.0.1"
port = 0

[discovery]
enabled = false

[store]
dir = "store"
segment_s = 1

[gpio]
pin_factory = "mock"
led_pin = 27

[[buttons]]
id = "office"
pin = 17
location = "Main office"
"""


def first_boot_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "agent.toml"
    path.write_text(FIRST_BOOT)
    return path


async def next_runtime(
    runtimes: asyncio.Queue[Agent | FirstBoot], task: asyncio.Task[None]
) -> Agent | FirstBoot:
    """The next runtime :func:`run_agent` started; fails at once if ``task`` (running it)
    ended, with its error."""
    get = asyncio.ensure_future(runtimes.get())
    await asyncio.wait({get, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if not get.done():
        get.cancel()
        if task.done():
            task.result()
        raise AssertionError("no runtime started within 30 s")
    return get.result()


@dataclass
class Device:
    """A device running :func:`run_agent`; ``runtimes`` gets each runtime as it starts."""

    config: Path
    runtimes: asyncio.Queue[Agent | FirstBoot]
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def next(self) -> Agent | FirstBoot:
        """The next runtime; fails at once if the device stopped (the error shows)."""
        return await next_runtime(self.runtimes, self.task)


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[Device]:
    config = first_boot_config(tmp_path / "pi")
    runtimes: asyncio.Queue[Agent | FirstBoot] = asyncio.Queue()
    stop = asyncio.Event()
    task = asyncio.create_task(run_agent(config, stop, on_start=runtimes.put_nowait))
    yield Device(config, runtimes, stop, task)
    stop.set()
    await task


def district(tmp_path: Path, receiver: Receiver) -> District:
    (tmp_path / "district-files").mkdir()
    authority_pub, keylist = write_trust(tmp_path / "district-files")
    # The receiver trusts the district authority: no allow-list entry for the device.
    shutil.copy(authority_pub, receiver.data_dir / "authority.pub")
    age = new_identity(tmp_path / "district" / "age.key")
    return District(
        authority=tmp_path / "district" / "authority.key",
        receiver_url=receiver.uplink_url,
        receiver_pin=receiver.fingerprint,
        recipients=(recipient_of(age), receiver.age_recipient),
        trigger_keys=keylist,
    )


def code_of(runtime: Agent | FirstBoot) -> str:
    label = runtime.config.state_dir / "setup-code"
    assert stat.S_IMODE(label.stat().st_mode) == 0o600
    return normalise_code(label.read_text())


def target(runtime: Agent | FirstBoot, **kw: Any) -> Target:
    assert runtime.local_api is not None
    return Target(
        device=runtime.config.device_id,
        setup_code=code_of(runtime),
        building="lincoln-elementary",
        cameras=(
            ("front-door", "exterior", {"id": "front-door", "source": "synthetic", "fps": 10}),
            ("hallway-2", "interior", {"id": "hallway-2", "source": "synthetic", "fps": 10}),
        ),
        to=runtime.local_api.url,
        **kw,
    )


def trail(runtime: Agent | FirstBoot) -> list[dict[str, Any]]:
    runtime.audit.flush()
    lines = (runtime.config.state_dir / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


def quiet(device: str, step: str) -> None:
    pass


async def test_first_boot_makes_its_key_and_code_and_waits_unprovisioned(
    tmp_path: Path, device: Device
) -> None:
    first = await device.next()
    assert isinstance(first, FirstBoot)
    key = device.config.parent / "device.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert first.config.device_id == f"bg-{kid(load_private_key(key).public_key())[:12]}"
    assert not first.config.provisioned
    api = first.local_api
    assert api is not None
    pin = aiohttp.Fingerprint(bytes.fromhex(api.fingerprint.removeprefix("sha256:")))
    async with aiohttp.ClientSession() as http:
        async with http.get(api.url + "/v1/status", ssl=pin) as r:
            status = await r.json()
        async with http.post(api.url + "/v1/triggers", ssl=pin, data=b"{}") as r:
            refused = (r.status, await r.json())
    assert status["state"] == "unprovisioned"
    assert status["pairing_open"] is True
    assert refused == (409, {"error": "unprovisioned", "detail": "this device is not enrolled yet"})


async def test_enroll_then_reenroll_then_check_through_the_cli_path(
    tmp_path: Path, device: Device, receiver: Receiver
) -> None:
    first = await device.next()
    assert isinstance(first, FirstBoot)
    plan = district(tmp_path, receiver)
    steps: list[str] = []
    version = await enroll_one(target(first), plan, lambda d, s: steps.append(s))
    assert version == 1
    assert steps[-1] == "armed with enrollment v1"
    armed = await device.next()
    assert isinstance(armed, Agent)
    assert armed.config.building == "lincoln-elementary"
    assert [(c.id, c.zone, c.source) for c in armed.config.cameras] == [
        ("front-door", "exterior", "synthetic"),
        ("hallway-2", "interior", "synthetic"),
    ]
    # The receiver accepts it on its certificate alone.
    await armed.uplink.wait_until(lambda: armed.uplink.connected)
    assert not (receiver.data_dir / "devices" / f"{armed.config.device_id}.pub").exists()
    assert armed.gate.keyring.current is not None  # the district's trigger-key list came along

    # Re-enrollment: a new building, the next version (the device says which it has).
    moved = replace(target(armed), building="lincoln-annex")
    assert await enroll_one(moved, plan, quiet) == 2
    again = await device.next()
    assert isinstance(again, Agent)
    assert again.config.building == "lincoln-annex"
    assert again.enrollment is not None and again.enrollment.version == 2

    # The aim check: one JPEG per camera, interior included, each audited.
    await asyncio.gather(*(again.capture.wait_ready(c.id) for c in again.config.cameras))
    shots = await check_one(target(again), plan, tmp_path / "shots", quiet)
    assert [p.name for p in shots] == [
        f"{again.config.device_id}-front-door.jpg",
        f"{again.config.device_id}-hallway-2.jpg",
    ]
    for shot in shots:
        probe = subprocess.run(
            ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,width", "-of",
             "json", str(shot)],
            capture_output=True, check=True, text=True,
        )  # fmt: skip
        assert json.loads(probe.stdout)["streams"][0]["codec_name"] == "mjpeg"
    # Going back to an older version is refused, and the device keeps v2 (after a
    # restart: the check's pairing closed this start's window).
    assert again.local_api is not None and again.local_api.pairing is not None
    again.local_api.pairing.reopen()
    with pytest.raises(PairingError) as rollback:
        await enroll_one(replace(target(again), version=1), plan, quiet)
    assert rollback.value.code == "enrollment_rollback"

    events = trail(again)
    checks = [e for e in events if e["event"] == "camera_check"]
    assert [(e["camera"], e["zone"]) for e in checks] == [
        ("front-door", "exterior"),
        ("hallway-2", "interior"),
    ]
    assert [e["version"] for e in events if e["event"] == "enrolled"] == [1, 2]
    assert [e["code"] for e in events if e["event"] == "technician_refused"] == [
        "enrollment_rollback"
    ]


async def test_rotate_renews_the_certificate_with_a_new_receiver_pin(
    tmp_path: Path, device: Device, receiver: Receiver
) -> None:
    first = await device.next()
    plan = district(tmp_path, receiver)
    await enroll_one(target(first), plan, quiet)
    armed = await device.next()
    assert isinstance(armed, Agent)
    renewed = District(authority=plan.authority, receiver_pin="sha256:" + "ab" * 32)
    assert await rotate_one(target(armed), renewed, quiet) == 2
    rotated = await device.next()
    assert isinstance(rotated, Agent)
    assert rotated.config.receiver_pin == "sha256:" + "ab" * 32
    assert rotated.config.building == "lincoln-elementary"  # kept
    assert [c.source for c in rotated.config.cameras] == ["synthetic", "synthetic"]  # kept


async def test_a_refused_enrollment_leaves_it_unprovisioned_and_pairable(
    tmp_path: Path, device: Device, receiver: Receiver
) -> None:
    first = await device.next()
    assert isinstance(first, FirstBoot)
    plan = district(tmp_path, receiver)
    bad = replace(target(first), cameras=(
        ("front-door", "exterior", {"id": "front-door", "source": "rtsp", "url": "http://x"}),
    ))  # fmt: skip
    with pytest.raises(PairingError) as refused:
        await enroll_one(bad, plan, quiet)
    assert refused.value.code == "bad_cameras"
    assert enrollment_state.load(first.config.state_dir) is None
    assert first.status()["pairing_open"] is True
    # Paired again (the window stays open for an unprovisioned device): a good one works.
    assert await enroll_one(target(first), plan, quiet) == 1
    assert isinstance(await device.next(), Agent)


async def test_a_device_refuses_another_authority_once_enrolled(
    tmp_path: Path, device: Device, receiver: Receiver
) -> None:
    first = await device.next()
    plan = district(tmp_path, receiver)
    await enroll_one(target(first), plan, quiet)
    armed = await device.next()
    assert isinstance(armed, Agent)
    new_private_key(tmp_path / "other" / "authority.key")
    other = replace(plan, authority=tmp_path / "other" / "authority.key")
    with pytest.raises(PairingError) as refused:
        await enroll_one(target(armed), other, quiet)
    assert refused.value.code == "other_authority"


async def test_an_unknown_operation_and_a_tampered_box_are_refused(
    tmp_path: Path, device: Device
) -> None:
    first = await device.next()
    assert first.local_api is not None
    paired = await pair(first.local_api.url, first.config.device_id, code_of(first))
    with pytest.raises(PairingError) as unknown:
        await request(paired, {"op": "format-disk"})
    assert unknown.value.code == "malformed"
    paired.channel.seal(b"skipped")  # the device expects the next counter: this box won't open
    with pytest.raises(PairingError) as tampered:
        await request(paired, {"op": "enroll", "bundle": {}})
    assert tampered.value.code == "bad_box"
    with pytest.raises(PairingError) as ended:
        await request(paired, {"op": "enroll", "bundle": {}})
    assert ended.value.code == "no_session"
    assert first.status()["pairing_open"] is True


async def test_a_delivery_cut_halfway_changes_nothing_and_the_device_stays_pairable(
    tmp_path: Path, device: Device, receiver: Receiver
) -> None:
    first = await device.next()
    assert isinstance(first, FirstBoot) and first.local_api is not None
    paired = await pair(first.local_api.url, first.config.device_id, code_of(first))
    # The technician's laptop loses the network halfway through sending the bundle.
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    port = first.local_api.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    head = (
        "POST /v1/pairing/channel HTTP/1.1\r\nHost: device\r\n"
        "Content-Type: application/json\r\nContent-Length: 90000\r\n\r\n"
    )
    writer.write(head.encode() + b'{"session": "' + paired.session.encode() + b'", "box": "AAAA')
    await writer.drain()
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    del reader
    assert enrollment_state.load(first.config.state_dir) is None
    assert first.status()["pairing_open"] is True
    assert await enroll_one(target(first), district(tmp_path, receiver), quiet) == 1
    assert isinstance(await device.next(), Agent)


def test_an_interrupted_enrollment_is_cleaned_up_and_the_device_stays_unprovisioned(
    tmp_path: Path,
) -> None:
    config = first_boot_config(tmp_path / "pi")
    state = tmp_path / "pi" / "state"
    # What a power cut leaves at each step before the commit (the link's rename).
    (state / "enrollment.v1.partial").mkdir(parents=True)
    (state / "enrollment.v1.partial" / "certificate.json").write_text('{"half')
    (state / "enrollment.v2").mkdir()
    (state / "enrollment.link").symlink_to("enrollment.v2")
    loaded = load_agent_config(config)
    assert not loaded.provisioned
    assert sorted(p.name for p in state.iterdir()) == []


async def test_the_long_button_hold_reopens_pairing(tmp_path: Path) -> None:
    config = first_boot_config(tmp_path / "pi")
    config.write_text(FIRST_BOOT.replace("port = 0\n", "port = 0\npairing_hold_s = 1\n"))
    async with FirstBoot(load_agent_config(config)) as first:
        assert first.local_api is not None and first.local_api.pairing is not None
        pairing = first.local_api.pairing
        pairing.window.closes_at = pairing.mono()  # the 15 minutes are over
        assert first.status()["pairing_open"] is False
        reopened = asyncio.Event()
        reopen = pairing.reopen

        def spy() -> None:
            reopen()
            reopened.set()

        pairing.reopen = spy  # type: ignore[method-assign]
        pin = first.pin_factory.pin(17)
        pin.drive_low()  # pressed, and held (gpiozero's hold timer, on its thread)
        async with asyncio.timeout(10):
            await reopened.wait()
        pin.drive_high()
        assert first.status()["pairing_open"] is True
        assert "pairing_reopened" in [e["event"] for e in trail(first)]


def test_the_first_boot_example_is_a_valid_unprovisioned_configuration(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "agent.firstboot.example.toml"
    text = example.read_text().replace("/var/lib/breakglass-agent/", "").replace("lgpio", "mock")
    config = tmp_path / "agent.toml"
    config.write_text(text)
    loaded = load_agent_config(config)
    assert not loaded.provisioned
    assert loaded.cameras == () and loaded.building == ""
    assert loaded.local_api.pairing_hold_s == 10
    assert loaded.device_id.startswith("bg-")


def test_a_key_path_the_agent_cannot_write_is_a_config_error(tmp_path: Path) -> None:
    """Not a PermissionError traceback and a crash loop: the key and the path named."""
    example = Path(__file__).resolve().parent.parent / "docs" / "agent.firstboot.example.toml"
    config = tmp_path / "agent.toml"
    config.write_text(example.read_text().replace("/var/lib/breakglass-agent/", "/proc/none/"))
    with pytest.raises(ConfigError, match=r"device\.key: cannot make /proc/none/device\.key"):
        load_agent_config(config)


def foreign_folder(tmp_path: Path) -> Path:
    """A folder another user owns (made so as root; else the root directory)."""
    if os.geteuid() != 0:
        return Path("/")
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 54321, 54321)
    return folder


def test_an_agent_run_as_another_user_than_its_folders_is_refused(tmp_path: Path) -> None:
    """``sudo breakglass agent run`` would leave root's files where the service user cannot
    write: the unit would crash-loop with the buttons dead."""
    example = Path(__file__).resolve().parent.parent / "docs" / "agent.firstboot.example.toml"
    config = tmp_path / "agent.toml"
    theirs = foreign_folder(tmp_path)
    text = example.read_text().replace("lgpio", "mock")
    text = text.replace("/var/lib/breakglass-agent/state", str(theirs))
    config.write_text(text.replace("/var/lib/breakglass-agent/", f"{tmp_path}/"))
    with pytest.raises(ConfigError, match=rf"device\.state_dir: {theirs} belongs to .*: run "):
        load_agent_config(config)
    assert not (tmp_path / "device.key").exists()


def test_a_half_written_configuration_names_what_is_missing(tmp_path: Path) -> None:
    config = first_boot_config(tmp_path / "pi")
    config.write_text(FIRST_BOOT + '\n[building]\nid = "lincoln-elementary"\n')
    with pytest.raises(ConfigError, match=r"receiver\.url: missing"):
        load_agent_config(config)


def test_under_systemd_the_cli_reports_ready_feeds_the_watchdog_and_stops(tmp_path: Path) -> None:
    """``breakglass agent run`` (first boot) as systemd runs it: Type=notify, a watchdog."""
    config = first_boot_config(tmp_path / "pi")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="200000")
    env["INVOCATION_ID"] = "0123456789abcdef"  # what systemd sets for a service
    log = (tmp_path / "stderr").open("wb")  # a file: a full pipe could stall the agent
    child = subprocess.Popen(
        [sys.executable, "-m", "breakglass", "agent", "run", "--config", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        messages: list[bytes] = []
        while messages.count(b"WATCHDOG=1") < 2:
            messages.append(notify.recv(4096))
        ready = next(m for m in messages if m.startswith(b"READY=1"))
        assert b"STATUS=bg-" in ready and b"unprovisioned" in ready
        child.send_signal(signal.SIGTERM)
        while b"STOPPING=1" not in messages[-1]:
            messages.append(notify.recv(4096))
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        notify.close()
        log.close()
    stderr = (tmp_path / "stderr").read_text()
    code = (tmp_path / "pi" / "state" / "setup-code").read_text().strip()
    assert code not in stderr  # the journal is a log: only where the code is
    assert "setup code path" in stderr


def test_a_damaged_enrollment_is_set_aside_and_the_device_is_pairable_again(
    tmp_path: Path,
) -> None:
    config = first_boot_config(tmp_path / "pi")
    state = tmp_path / "pi" / "state"
    (state / "enrollment.v3").mkdir(parents=True)
    (state / "enrollment.v3" / "certificate.json").write_text("{not json")
    (state / "enrollment").symlink_to("enrollment.v3")
    loaded = load_agent_config(config)  # not a crash loop: unprovisioned, pairable
    assert not loaded.provisioned
    (aside,) = [p.name for p in state.iterdir()]
    assert aside.startswith("damaged-enrollment-")


async def test_an_enrollment_the_agent_could_not_start_with_is_refused_before_it_is_written(
    tmp_path: Path, device: Device, receiver: Receiver
) -> None:
    first = await device.next()
    assert isinstance(first, FirstBoot)
    plan = district(tmp_path, receiver)
    # Shaped like an age recipient (the certificate accepts it), but its checksum is wrong.
    bogus = replace(plan, recipients=("age1" + "q" * 58,))
    with pytest.raises(PairingError) as refused:
        await enroll_one(target(first), bogus, quiet)
    assert refused.value.code == "bad_config"
    assert "recipients" in refused.value.detail
    assert enrollment_state.load(first.config.state_dir) is None
    assert first.status()["pairing_open"] is True


async def test_a_hand_written_configuration_must_point_at_its_certified_key(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A mistyped ``[device] key`` path: no new key (it would sign the audit trail as a
    key nobody trusts), and a key other than the certified one: both a ConfigError."""
    from breakglass.demo import write_agent_config, write_enrollment

    config = write_agent_config(tmp_path / "agent", receiver)
    write_enrollment(config, receiver)
    assert load_agent_config(config).enrollment == tmp_path / "agent" / "enrollment.json"
    text = config.read_text()
    config.write_text(text.replace('key = "device.key"', 'key = "devce.key"'))
    with pytest.raises(ConfigError, match=r"device\.key: .*devce\.key is missing but "):
        load_agent_config(config)
    assert not (tmp_path / "agent" / "devce.key").exists()
    other = new_private_key(tmp_path / "agent" / "other.key")
    config.write_text(text.replace('key = "device.key"', 'key = "other.key"'))
    with pytest.raises(ConfigError, match=rf"is key {kid(other.public_key())}, but "):
        load_agent_config(config)
    # A certificate that cannot be read is the receiver's to refuse: the buttons work.
    (tmp_path / "agent" / "enrollment.json").write_text("{not json")
    config.write_text(text)
    assert load_agent_config(config).device_id


def enrolled_until(config_path: Path, exp: int) -> enrollment_state.Enrolled:
    """What the agent of ``config_path`` knows of an enrollment valid until ``exp``."""
    config = load_agent_config(config_path)
    key = load_private_key(config.device_key).public_key()
    authority = new_private_key(config_path.parent / "authority.key").public_key()
    certificate = Enrollment(
        1, exp - 365 * 86400, exp, config.device_id, key, config.building,
        config.receiver_url, config.receiver_pin, config.store.recipients, 72.0,
        {c.id: c.zone for c in config.cameras}, {},
    )  # fmt: skip
    return enrollment_state.Enrolled(config_path.parent, certificate, authority, ())


async def test_a_certificate_near_its_end_is_warned_of_and_an_expired_one_is_a_fault(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A year after enrollment the receiver refuses the device, and a press reaches nobody:
    the trail says so 30 days ahead (once a day), and once expired the LED shows a fault."""
    from breakglass.demo import write_agent_config
    from hardware.led import LedPattern

    path = write_agent_config(tmp_path / "agent", receiver)
    exp = 1_900_000_000
    certificate = enrolled_until(path, exp)
    soon = exp - 10 * 86400
    async with Agent(load_agent_config(path), enrolled=certificate, clock=lambda: soon) as agent:
        agent._check_expiry()  # the housekeeping's check, now and again: warned once
        agent._check_expiry()
        assert agent.led is not None and agent.led.pattern is LedPattern.ARMED
    late = exp + 60
    async with Agent(load_agent_config(path), enrolled=certificate, clock=lambda: late) as agent:
        await agent.wait_until(lambda: agent.device_state() == "fault")
        assert agent.led is not None and agent.led.pattern is LedPattern.FAULT
    trail = [json.loads(line) for line in (agent.config.state_dir / "audit.log").open()]
    warned = [(e["exp"], e["expired"]) for e in trail if e["event"] == "enrollment_expiring"]
    assert warned == [(exp, False), (exp, True)]


async def test_a_trigger_key_list_near_its_end_is_warned_of(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Once the district's list expires remote triggers are refused: the trail says so
    30 days ahead, once a day; the buttons are not concerned."""
    from breakglass.demo import write_agent_config
    from hardware.led import LedPattern

    path = write_agent_config(tmp_path / "agent", receiver)
    async with Agent(load_agent_config(path)) as agent:
        keys = agent.gate.keyring.current
        assert keys is not None
    soon = keys.exp - 5 * 86400
    async with Agent(load_agent_config(path), clock=lambda: soon) as agent:
        agent._check_expiry()  # the housekeeping's check, now and again: warned once
        agent._check_expiry()
        assert agent.led is not None and agent.led.pattern is LedPattern.ARMED
    trail = [json.loads(line) for line in (agent.config.state_dir / "audit.log").open()]
    warned = [(e["version"], e["expired"]) for e in trail if e["event"] == "keylist_expiring"]
    assert warned == [(keys.version, False)]
