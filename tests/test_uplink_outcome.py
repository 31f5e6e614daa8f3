"""Why an uplink connection ended: the receiver's refusal is not lost to a broken pipe.

When the receiver refuses a device mid-connection (say it was revoked), it sends an
``error`` and closes the socket. The agent's writer may hit the closed socket before its
reader has read that ``error``. The reason the agent records, and its back-off, must
still come from the ``error``. Real asyncio tasks; they coordinate on events.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from agent.errors import UplinkRefused
from agent.uplink import UplinkClient, connection_outcome
from provisioning.keys import new_private_key, public_pem
from receiver import ingest
from receiver.server import Receiver
from tests.uplink import unconnected_uplink


def allowed_uplink(receiver: Receiver, tmp_path: Path, **options: Any) -> UplinkClient:
    """An agent's uplink client to ``receiver`` as device-1, on its allow-list."""
    key = new_private_key(tmp_path / "device-1.key")
    (receiver.devices_dir / "device-1.pub").write_bytes(public_pem(key.public_key()))
    return UplinkClient(
        url=receiver.uplink_url,
        origin=receiver.origin,
        pin=receiver.fingerprint,
        device_id="device-1",
        device_key=key,
        reconnect_max_s=0.05,
        **options,
    )


async def test_a_refusal_read_after_the_writer_broke_wins() -> None:
    received = asyncio.Event()  # the error frame is in, not yet read

    async def reader() -> None:
        await received.wait()
        for _ in range(5):  # reading and parsing a frame takes the loop a few steps
            await asyncio.sleep(0)
        raise UplinkRefused("revoked", "device d-1 is revoked")

    async def writer() -> None:
        received.set()
        raise ConnectionResetError("Cannot write to closing transport")

    with pytest.raises(UplinkRefused) as caught:
        await connection_outcome(asyncio.create_task(reader()), asyncio.create_task(writer()))
    assert caught.value.code == "revoked"


async def test_a_refusal_read_first_wins() -> None:
    async def reader() -> None:
        raise UplinkRefused("revoked", "device d-1 is revoked")

    async def writer() -> None:
        await asyncio.Event().wait()

    writing = asyncio.create_task(writer())
    with pytest.raises(UplinkRefused):
        await connection_outcome(asyncio.create_task(reader()), writing)
    writing.cancel()


async def test_a_silent_reader_leaves_the_writers_failure_after_the_drain() -> None:
    async def reader() -> None:
        await asyncio.Event().wait()

    async def writer() -> None:
        raise ConnectionResetError("Cannot write to closing transport")

    reading = asyncio.create_task(reader())
    with pytest.raises(ConnectionResetError):
        await connection_outcome(reading, asyncio.create_task(writer()), drain_s=0.05)
    assert not reading.done()  # the caller cancels it
    reading.cancel()


async def test_an_unexpected_error_is_logged_and_the_uplink_connects_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug of ours in a connection (any exception) must not end the uplink for good."""
    uplink = unconnected_uplink(reconnect_max_s=0.05)
    again = asyncio.Event()
    calls = 0

    async def connect_once(http: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug")
        again.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(uplink, "_connect_once", connect_once)
    running = asyncio.create_task(uplink.run())
    async with asyncio.timeout(10):
        await again.wait()
    assert not running.done()
    assert uplink.stats.last_error == "KeyError: 'a bug'"
    assert any("failed unexpectedly" in r.getMessage() for r in caplog.records)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


def test_the_receiver_cannot_claim_more_of_the_trail_than_the_device_has() -> None:
    """An audit_ack (or a welcome) beyond the device's last entry stopped the trail from
    being shipped for the rest of the connection (found by a review)."""
    head = 5
    uplink = unconnected_uplink(audit_head=lambda: head)
    uplink._on_audit_ack(p.AuditAck(10**12))
    assert uplink.audit_acked == 5
    head = 7
    uplink._on_audit_ack(p.AuditAck(6))
    assert uplink.audit_acked == 6  # still moving
    uplink._resume(p.Welcome({}, 5.0, 10**12))
    assert uplink.audit_acked == 7


async def test_stopping_while_a_failed_connection_is_collected_stops_the_uplink(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent stopping (its uplink task cancelled) while a failed connection's reader
    and writer are being collected stops the uplink. The cancellation was swallowed
    there: the uplink connected again and ran on, and the agent never finished stopping
    (a CI hang in test_dispatch). Here the cancellation lands exactly then: from the
    writer's own cancellation, on a real connection to a real receiver."""
    uplink = allowed_uplink(receiver, tmp_path)
    connections = 0

    async def reader(*_: object) -> None:
        nonlocal connections
        connections += 1
        raise ConnectionResetError("the receiver went away")

    async def writer(*_: object) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # the connection is being collected: stop now
            running.cancel()
            raise

    monkeypatch.setattr(uplink, "_reader", reader)
    monkeypatch.setattr(uplink, "_writer", writer)
    running = asyncio.create_task(uplink.run())
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await asyncio.shield(running)
    assert running.cancelled()
    assert connections == 1


async def test_a_device_set_to_beat_slower_than_the_receiver_asks_is_not_cut(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``uplink.heartbeat_s`` may be up to 300 s; the receiver cuts a device it has not
    heard from in three of its own heartbeats (its welcome says how often). An idle agent
    set to beat every 30 s was cut and reconnected every 15 s. It now beats as often as
    the welcome asks. Here the receiver's heartbeat is 0.5 s (its rate limit allows
    1/s after a burst of 10), the device's setting 30 s: while the receiver hears twelve
    heartbeats, the device stays on one connection."""
    monkeypatch.setattr(ingest, "HEARTBEAT_S", 0.5)
    heard = 0
    enough = asyncio.Event()
    real_receive = p.Uplink.receive

    def receive(self: p.Uplink, message: str | bytes) -> p.Event:
        nonlocal heard
        event = real_receive(self, message)
        if isinstance(event, p.Heartbeat) and self.role is p.Role.RECEIVER:
            heard += 1
            if heard >= 12:
                enough.set()
        return event

    monkeypatch.setattr(p.Uplink, "receive", receive)
    uplink = allowed_uplink(receiver, tmp_path, heartbeat_s=30)
    running = asyncio.create_task(uplink.run())
    try:
        async with asyncio.timeout(30):
            await enough.wait()
        assert uplink.stats.connects == 1, uplink.stats.last_error
        assert uplink.connected
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
