"""``breakglass demo``: a police receiver and one building agent on 127.0.0.1.

Everything is generated in a data folder: the device key (0600), the
receiver's self-signed certificate, the allow-list entry and the agent's
config. The agent has two synthetic cameras (one exterior, one interior), a
panic button and a status LED on gpiozero's MockFactory; pressing Enter
drives the button's mock pin low and high, the same path a real button takes.

The receiver gets one police account, ``demo-dispatcher`` (role dispatcher,
which includes officer), with a random password printed once; only its
argon2id hash is kept (``DATA/receiver/accounts.sqlite``). A demo run again
on the same folder gives it a new password.

``--for N`` runs unattended: it presses the button a few seconds in, runs N
seconds, then the demo dispatcher declares the all-clear with a signed end
trigger pushed over the uplink; it prints a summary and exits 0 only if the
receiver holds pre-roll and live footage of every camera.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from agent.config import load_config
from agent.daemon import Agent
from provisioning.age_keys import load_identity, new_identity, recipient_of
from provisioning.documents import b64url
from provisioning.enrollment import sign_enrollment
from provisioning.keys import load_private_key, new_private_key, public_pem, raw_public
from provisioning.triggers import sign_key_list
from receiver.accounts import AccountExistsError, AccountStore, Role
from receiver.dispatch import DispatchError
from receiver.server import Receiver

DEVICE_ID = "demo-agent-1"
BUILDING = "lincoln-elementary"
BUTTON_PIN = 17
PRESS_AFTER_S = 4.0
DEMO_ACCOUNT = "demo-dispatcher"


class ReceiverContact(Protocol):
    """What an agent's config needs of a receiver (a running :class:`Receiver` has it)."""

    @property
    def uplink_url(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def devices_dir(self) -> Path: ...

    @property
    def age_recipient(self) -> str: ...


DEMO_CAMERAS = (("front-door", "exterior"), ("hallway-2", "interior"))


def write_agent_config(
    folder: Path,
    receiver: ReceiverContact,
    *,
    device_id: str = DEVICE_ID,
    fps: float = 15,
    preroll_s: float = 30,
    allow: bool = True,
    cameras: Sequence[tuple[str, str]] = DEMO_CAMERAS,
    store: str = "",
    local_api_port: int = 0,
) -> Path:
    """Write an agent's key and config; allow-list its key unless ``allow`` is false.

    ``cameras`` are (id, zone) pairs of synthetic cameras. Segments are sealed to
    the receiver and to a demo district identity (``<folder>/../district/age.key``,
    never in the agent's folder: the device must not hold a key that opens them).
    ``store`` is extra TOML for the ``[store]`` table (tests shrink segments).
    Remote triggers are trusted through a demo district authority and a
    dispatch key (:func:`write_trust`); the Local API listens on 127.0.0.1.
    """
    folder.mkdir(parents=True, exist_ok=True)
    district_key = folder.parent / "district" / "age.key"
    if district_key.exists():
        district = load_identity(district_key)
    else:
        district_key.parent.mkdir(parents=True, exist_ok=True)
        district = new_identity(district_key)
    recipients = f'["{recipient_of(district)}", "{receiver.age_recipient}"]'
    key_path = folder / "device.key"
    key = new_private_key(key_path) if not key_path.exists() else None
    if key is not None and allow:
        (receiver.devices_dir / f"{device_id}.pub").write_bytes(public_pem(key.public_key()))
    authority_pub, keylist = write_trust(folder)
    config = folder / "agent.toml"
    config.write_text(
        f"""# breakglass demo agent (generated)
[device]
id = "{device_id}"
key = "device.key"
state_dir = "state"

[building]
id = "{BUILDING}"

[receiver]
url = "{receiver.uplink_url}"
tls_pin = "{receiver.fingerprint}"

[emergency]
duration_s = 3600
preroll_s = {preroll_s}

[store]
dir = "store"
recipients = {recipients}
{store}

[trust]
authority = "{authority_pub}"
trigger_keys = "{keylist.name}"

[local_api]
host = "127.0.0.1"
port = {local_api_port}

[gpio]
pin_factory = "mock"
led_pin = 27

[[buttons]]
id = "office"
pin = {BUTTON_PIN}
location = "Main office"

"""
        + "".join(
            f'\n[[cameras]]\nid = "{cam}"\nzone = "{zone}"\nsource = "synthetic"\nfps = {fps}\n'
            for cam, zone in cameras
        )
    )
    return config


def write_trust(folder: Path, *, valid_days: int = 365) -> tuple[Path, Path]:
    """A demo district authority and dispatch key beside ``folder``, and the signed list.

    ``<folder>/../district/authority.key`` signs the trigger-key list (v1) that
    enrols ``<folder>/../dispatch/dispatch.key`` for every building, written to
    ``<folder>/trigger-keys.json``. Returns (authority public key, list).
    """
    district = folder.parent / "district"
    authority_key = district / "authority.key"
    authority_pub = district / "authority.pub"
    dispatch_key = folder.parent / "dispatch" / "dispatch.key"
    if authority_key.exists():
        authority = load_private_key(authority_key)
    else:
        authority = new_private_key(authority_key)
        authority_pub.write_bytes(public_pem(authority.public_key()))
    dispatch = (
        load_private_key(dispatch_key) if dispatch_key.exists() else new_private_key(dispatch_key)
    )
    (dispatch_key.parent / "dispatch.pub").write_bytes(public_pem(dispatch.public_key()))
    keylist = folder / "trigger-keys.json"
    if not keylist.exists():
        now = int(time.time())
        entry = {
            "key": b64url(raw_public(dispatch.public_key())),
            "role": "dispatch",
            "buildings": "all",
            "label": "demo county 911 dispatch",
        }
        envelope = sign_key_list(authority, 1, [entry], iat=now, exp=now + valid_days * 86400)
        keylist.write_text(json.dumps(envelope) + "\n")
    return authority_pub, keylist


def dispatch_key_path(agent_folder: Path) -> Path:
    """The demo dispatch key :func:`write_trust` made for the agent in ``agent_folder``."""
    return agent_folder.parent / "dispatch" / "dispatch.key"


def press_button(agent: Agent, pin: int = BUTTON_PIN) -> None:
    """Press and release the virtual button through gpiozero's mock pin."""
    mock_pin = agent.pin_factory.pin(pin)
    mock_pin.drive_low()
    mock_pin.drive_high()


async def run_demo(data: Path | None, run_for: float | None, port: int, stop: asyncio.Event) -> int:
    """Run the demo; returns the process exit code."""
    # The page polls the API every second: keep the terminal for what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    data = Path(tempfile.mkdtemp(prefix="breakglass-demo-")) if data is None else data
    data.mkdir(parents=True, exist_ok=True)
    print(f"breakglass demo: data in {data}")
    async with Receiver(data / "receiver", "127.0.0.1", port) as receiver:
        password = await asyncio.to_thread(demo_account, receiver.accounts)
        await asyncio.to_thread(  # as `receiver user add/passwd` would be
            receiver.access_log.record,
            "user_passwd", who="local:demo", role="local-admin", target=DEMO_ACCOUNT,
        )  # fmt: skip
        # The district enrolls the receiver's dispatch key (the trigger-key list) and
        # certifies the agent, so the receiver knows its building (the dispatch panel).
        demo_dispatch = dispatch_key_path(data / "agent")
        demo_dispatch.parent.mkdir(parents=True, exist_ok=True)
        demo_dispatch.write_bytes(receiver.dispatch_key_path.read_bytes())
        demo_dispatch.chmod(0o600)
        path = write_agent_config(data / "agent", receiver)
        write_enrollment(path, receiver)
        config = load_config(path)
        async with Agent(config) as agent:
            print(f"receiver: open {receiver.url} (self-signed; pin {receiver.fingerprint})")
            print(
                f"log in as {DEMO_ACCOUNT} (dispatcher) with password {password}"
                " (printed once; only its hash is kept)"
            )
            if agent.local_api is not None:
                api = agent.local_api
                print(f"agent local API: {api.url}/v1/status (pin {api.fingerprint})")
            if run_for is None:
                await _interactive(agent, stop)
                return 0
            return await _unattended(agent, receiver, run_for, stop)


def write_enrollment(config_path: Path, receiver: Receiver, *, days: int = 30) -> Path:
    """Certify the agent of ``config_path`` with the demo district authority (what
    ``provision certify`` does), point its ``[device] enrollment`` at it, and make the
    receiver trust that authority (``DATA/authority.pub``)."""
    folder = config_path.parent
    district = folder.parent / "district"
    authority = load_private_key(district / "authority.key")
    config = load_config(config_path)
    device_key = load_private_key(config.device_key)
    now = int(time.time())
    cert = sign_enrollment(
        authority,
        version=1,
        device=config.device_id,
        device_key=device_key.public_key(),
        building=config.building,
        receiver_url=config.receiver_url,
        receiver_pin=config.receiver_pin,
        recipients=list(config.store.recipients),
        cameras=[{"id": c.id, "zone": c.zone} for c in config.cameras],
        iat=now - 60,
        exp=now + days * 86400,
    )
    out = folder / "enrollment.json"
    out.write_text(json.dumps(cert) + "\n")
    text = config_path.read_text()
    if "enrollment =" not in text:
        text = text.replace(
            'state_dir = "state"\n', 'state_dir = "state"\nenrollment = "enrollment.json"\n'
        )
        config_path.write_text(text)
    (receiver.data_dir / "authority.pub").write_bytes((district / "authority.pub").read_bytes())
    return out


def demo_account(accounts: AccountStore) -> str:
    """Give the demo's account a new random password (creating it if needed); the password."""
    password = secrets.token_urlsafe(15)  # 120 bits, 20 characters
    try:
        accounts.add(DEMO_ACCOUNT, Role.DISPATCHER, password)
    except AccountExistsError:
        accounts.set_password(DEMO_ACCOUNT, password)
    return password


async def _interactive(agent: Agent, stop: asyncio.Event) -> None:
    print("press Enter to press the panic button ('office', Main office); Ctrl-C to stop")
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline()))
    try:
        while not stop.is_set():
            waiter = asyncio.ensure_future(lines.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, pending = await asyncio.wait(
                {waiter, stopper}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if waiter in done:
                if waiter.result() == "":  # end of input
                    await stop.wait()
                    break
                press_button(agent)
                print("panic button pressed: the receiver's page shows the cameras")
    finally:
        loop.remove_reader(sys.stdin.fileno())


async def _unattended(agent: Agent, receiver: Receiver, run_for: float, stop: asyncio.Event) -> int:
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=min(PRESS_AFTER_S, run_for / 2))
    print("pressing the panic button")
    press_button(agent)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            stop.wait(), timeout=max(0.0, run_for - (time.monotonic() - started))
        )
    session = agent.emergency.active
    if session is not None:
        await _all_clear(agent, receiver)
    if session is not None:
        try:
            await asyncio.wait_for(agent.uplink.wait_settled(session.id), timeout=15)
        except TimeoutError:
            print("warning: the receiver has not acknowledged everything within 15 s")
    return _summary(agent, receiver, session.id if session else None)


async def _all_clear(agent: Agent, receiver: Receiver) -> None:
    """Dispatch declares the all-clear: the receiver signs an end trigger and pushes it."""
    assert receiver.dispatch is not None  # made when the receiver started
    try:
        deliveries = await receiver.dispatch.send(
            building=agent.config.building, action="end", reason="all clear", user=DEMO_ACCOUNT
        )
        for d in deliveries:
            print(f"dispatch all-clear trigger: {d.status} {json.dumps(d.to_json())}")
        # In the access log as a dispatch from the page is (who: the demo's dispatcher).
        await asyncio.to_thread(
            receiver.access_log.record,
            "dispatch", who=DEMO_ACCOUNT, role=str(Role.DISPATCHER), remote="local:demo",
            building=agent.config.building, requested="end", reason="all clear",
            results=[{"device": d.device, "status": d.status} for d in deliveries],
        )  # fmt: skip
    except DispatchError as exc:
        print(f"warning: the all-clear could not be sent ({exc}); ending locally")
    if agent.emergency.active is not None:
        agent.end("demo finished")


def _summary(agent: Agent, receiver: Receiver, session_id: str | None) -> int:
    if session_id is None or not agent.press_log:
        print("FAIL: no session was started")
        return 1
    summaries = {s.session_id: s for s in receiver.store.sessions()}
    summary = summaries.get(session_id)
    if summary is None:
        print(f"FAIL: the receiver has no recording of session {session_id}")
        return 1
    press_ns = agent.press_log[0].mono_ns
    ok = True
    print(f"session {session_id}")
    first = [c.first_durable_mono_ns for c in summary.cameras if c.first_durable_mono_ns]
    if first:
        print(
            f"  press -> first byte durable at the receiver: {(min(first) - press_ns) / 1e6:.1f} ms"
        )
    folders = {p.path.parent for cam in summary.cameras for p in cam.parts}
    print(f"  recordings in {', '.join(str(f) for f in sorted(folders))}")
    for cam in summary.cameras:
        print(
            f"  {cam.camera_id:<12} {cam.zone:<9} pre-roll {cam.preroll_frames:4d} frames, "
            f"live {cam.live_frames:4d} frames: {' + '.join(p.path.name for p in cam.parts)}"
        )
        if cam.preroll_frames == 0 or cam.live_frames == 0:
            ok = False
            print(f"  FAIL: camera {cam.camera_id} lacks pre-roll or live footage")
    missing = {c.id for c in agent.config.cameras} - {c.camera_id for c in summary.cameras}
    if missing:
        ok = False
        print(f"  FAIL: cameras missing at the receiver: {sorted(missing)}")
    print("OK" if ok else "FAIL")
    return 0 if ok else 1
