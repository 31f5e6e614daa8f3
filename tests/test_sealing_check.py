"""A device whose store seals without the receiver's key is a fault from its first connection.

The backfill lane sends sealed segments, which the receiver opens with its own
age identity; a store sealed only to the district's recipient (the config
accepted one) had every outage's footage refused at the receiver, in an
emergency, with nothing said on the device (found by a review). The
receiver's welcome now names its recipients, and the device checks them
against ``[store] recipients`` (docs/DECISIONS.md, "The receiver's
recipients in its welcome").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pyrage
import pytest

from agent import protocol as p
from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import write_agent_config
from provisioning.age_keys import recipient_of
from provisioning.keys import new_private_key, public_pem
from receiver.server import Receiver
from tests.uplink import connect_device

pytestmark = pytest.mark.timeout(60)

OTHER = recipient_of(pyrage.x25519.Identity.generate())


def audit_events(agent: Agent, name: str) -> list[dict[str, Any]]:
    path = agent.config.state_dir / "audit.log"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in lines if e.get("event") == name]


def agent_config(tmp_path: Path, rx: Receiver, *, receivers_too: bool) -> Path:
    """The demo's agent config; without the receiver's recipient unless ``receivers_too``."""
    path = write_agent_config(tmp_path / "agent", rx)
    text = path.read_text()
    if not receivers_too:
        text = text.replace(f', "{rx.age_recipient}"]', "]")
        assert rx.age_recipient not in text
    path.write_text(text)
    return path


# -- the wire ------------------------------------------------------------------------------


def test_a_welcome_names_recipients_only_when_it_has_some() -> None:
    plain = p.encode(p.Welcome({}, 5.0, 0))
    assert isinstance(plain, str) and "recipients" not in plain  # what older agents take
    named = p.encode(p.Welcome({}, 5.0, 0, (OTHER,)))
    assert isinstance(named, str)
    assert p.decode_control(named) == p.Welcome({}, 5.0, 0, (OTHER,))
    assert p.decode_control(plain) == p.Welcome({}, 5.0, 0, ())


@pytest.mark.parametrize(
    "recipients",
    [OTHER, [OTHER.upper()], ["age1short"], [1], [OTHER] * 9],
    ids=["not_a_list", "upper_case", "short", "number", "too_many"],
)
def test_a_welcome_with_bad_recipients_is_malformed(recipients: Any) -> None:
    text = json.dumps(
        {"type": "welcome", "acked": {}, "heartbeat_s": 5, "audit_n": 0, "recipients": recipients}
    )
    with pytest.raises(p.RemoteProtocolError) as refused:
        p.decode_control(text)
    assert refused.value.code == "malformed"
    assert "welcome.recipients" in refused.value.detail


# -- the agent -----------------------------------------------------------------------------


async def test_a_store_not_sealed_to_the_receiver_is_a_loud_fault(tmp_path: Path) -> None:
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0) as rx:
        config = load_config(agent_config(tmp_path, rx, receivers_too=False))
        async with Agent(config) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            fault = agent.uplink.sealing_fault
            assert fault is not None and rx.age_recipient in fault
            assert agent.device_state() == "fault"  # mDNS, and the LED with it
            status = agent.status()
            assert status["sealing_fault"] == fault
            await agent.wait_until(
                lambda: bool(audit_events(agent, "store_not_sealed_to_receiver"))
            )
            (entry,) = audit_events(agent, "store_not_sealed_to_receiver")
            assert entry["receiver_recipients"] == [rx.age_recipient]
            assert rx.age_recipient not in entry["store_recipients"]


async def test_a_store_sealed_to_the_receiver_is_no_fault(tmp_path: Path) -> None:
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0) as rx:
        config = load_config(agent_config(tmp_path, rx, receivers_too=True))
        async with Agent(config) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            assert agent.uplink.sealing_fault is None
            assert agent.device_state() == "armed"
            assert agent.status()["sealing_fault"] is None
            assert not audit_events(agent, "store_not_sealed_to_receiver")


def test_the_fault_is_audited_when_it_begins_and_when_it_is_mended() -> None:
    from agent.uplink import UplinkClient
    from tests.uplink import unconnected_uplink

    ours = recipient_of(pyrage.x25519.Identity.generate())
    # As a config may spell it (age takes upper case; spaces around it are dropped).
    uplink: UplinkClient = unconnected_uplink(sealed_to=(f" {ours.upper()} ",))
    audited: list[str] = []
    uplink._audit = lambda event, **fields: audited.append(event)  # type: ignore[method-assign]
    uplink._check_sealing(())  # a receiver from before the field: nothing known
    assert uplink.sealing_fault is None
    uplink._check_sealing((OTHER,))
    uplink._check_sealing((OTHER,))  # the next connection: still so, said once
    assert uplink.sealing_fault is not None
    uplink._check_sealing((ours, OTHER))
    assert uplink.sealing_fault is None
    assert audited == ["store_not_sealed_to_receiver", "store_sealing_mended"]
    uplink._check_sealing((OTHER,))
    uplink._check_sealing(())  # then a receiver that names none: unknown, no fault stands
    assert uplink.sealing_fault is None


# -- the receiver, and agents from before the field -----------------------------------------


def allow(rx: Receiver, tmp_path: Path, device: str) -> Any:
    key = new_private_key(tmp_path / f"{device}.key")
    (rx.devices_dir / f"{device}.pub").write_bytes(public_pem(key.public_key()))
    return key


@pytest.mark.parametrize(
    ("features", "named"),
    [
        (None, False),  # an agent from before the field: its decoder would refuse it
        ("", False),
        ("something-else", False),
        (p.WELCOME_RECIPIENTS, True),
        (f"later-field, {p.WELCOME_RECIPIENTS}", True),
    ],
)
async def test_a_welcome_names_recipients_only_to_a_device_that_asks(
    tmp_path: Path, features: str | None, named: bool
) -> None:
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0) as rx:
        key = allow(rx, tmp_path, "dev-1")
        async with aiohttp.ClientSession() as http:
            conn = p.Uplink(p.Role.AGENT)
            ws, welcome = await connect_device(http, rx, conn, key, "dev-1", features=features)
            assert welcome.recipients == ((rx.age_recipient,) if named else ())
            await ws.send_str(str(conn.send(p.Heartbeat(1_800_000_000.0))))  # connected
            await ws.close()
