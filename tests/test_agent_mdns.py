"""The agent advertises its Local API over mDNS (bound to 127.0.0.1) and follows its state."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon import Agent
from agent.discovery import discover
from breakglass.demo import BUILDING, press_button, write_agent_config
from receiver.server import Receiver

pytestmark = pytest.mark.timeout(60)


async def test_the_agent_is_found_with_its_pin_and_its_state(
    tmp_path: Path, receiver: Receiver
) -> None:
    # A device id of its own: agents of other tests (other xdist workers) advertise on
    # the same loopback.
    path = write_agent_config(
        tmp_path / "agent", receiver, preroll_s=1, device_id=f"mdns-test-{os.getpid()}"
    )
    async with Agent(load_config(path)) as agent:
        await agent.wait_until(lambda: agent.advertiser is not None)
        api = agent.local_api
        assert api is not None
        (found,) = [
            d
            for d in await discover(interfaces=["127.0.0.1"], timeout_s=2.5)
            if d.device_id == agent.config.device_id
        ]
        assert (found.building, found.state, found.port) == (BUILDING, "armed", api.port)
        assert found.fingerprint == api.fingerprint
        assert "127.0.0.1" in found.addresses
        await agent.capture.wait_packets(5)
        press_button(agent)
        advertiser = agent.advertiser
        assert advertiser is not None
        await agent.wait_until(lambda: advertiser.state == "emergency")
        again = [
            d
            for d in await discover(interfaces=["127.0.0.1"], timeout_s=2.5)
            if d.device_id == agent.config.device_id
        ]
        assert [d.state for d in again] == ["emergency"]
        agent.end("test finished")


async def test_advertising_retries_until_the_lan_address_is_up() -> None:
    """At boot the address may come later: the agent retries (no packet is sent here:
    an address this machine does not hold fails at bind)."""
    from agent.discovery import Advertiser, advertise_when_possible

    faults: list[BaseException] = []
    attempts = 0
    second = asyncio.Event()

    def make() -> Advertiser:
        nonlocal attempts
        attempts += 1
        if attempts == 3:
            second.set()
        return Advertiser("bg-1", "", 8443, "sha256:" + "0" * 64, interfaces=["192.0.2.77"])

    task = asyncio.create_task(advertise_when_possible(make, faults.append, first_retry_s=0.001))
    async with asyncio.timeout(10):
        await second.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert len(faults) == 1 and "192.0.2.77" in str(faults[0])
