"""Dispatch: the receiver signs with its dispatch key and pushes to the building (issue #6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import BUILDING, dispatch_key_path
from provisioning.keys import load_private_key, new_private_key
from receiver.dispatch import Dispatch, DispatchError, check_request, load_or_make_key
from receiver.server import Receiver
from tests.test_enrollment import enroll

pytestmark = pytest.mark.timeout(60)


def connected_in(receiver: Receiver, building: str) -> list[str]:
    return [
        d.device
        for d in receiver.presence.devices.values()
        if d.connected and d.building == building
    ]


async def test_a_dispatcher_starts_extends_and_ends_an_emergency(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, _ = enroll(tmp_path, receiver)  # an enrolled device: the receiver knows its building
    key = load_private_key(dispatch_key_path(tmp_path / "agent"))  # enrolled as dispatch
    dispatch = Dispatch(key, receiver.ingest, lambda b: connected_in(receiver, b))
    async with Agent(load_config(path)) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        await receiver.presence.wait_for(lambda: bool(connected_in(receiver, BUILDING)))
        (started,) = await dispatch.send(
            building=BUILDING, action="start", reason="911 call: intruder", user="jdoe"
        )
        assert started.status == 202, started.body
        session = agent.emergency.active
        assert session is not None and session.id == started.body["session"]
        assert session.started_by["reason"] == "911 call: intruder (dispatcher jdoe)"
        (extended,) = await dispatch.send(
            building=BUILDING, action="extend", reason="still searching", user="jdoe"
        )
        assert extended.status == 202
        (ended,) = await dispatch.send(
            building=BUILDING, action="end", reason="all clear", user="asmith"
        )
        assert ended.status == 202
        assert agent.emergency.active is None


async def test_a_key_the_district_did_not_enroll_is_refused_by_the_device(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, _ = enroll(tmp_path, receiver)
    rogue = load_or_make_key(tmp_path / "rogue" / "dispatch.key")
    dispatch = Dispatch(rogue, receiver.ingest, lambda b: connected_in(receiver, b))
    async with Agent(load_config(path)) as agent:
        await receiver.presence.wait_for(lambda: bool(connected_in(receiver, BUILDING)))
        (refused,) = await dispatch.send(
            building=BUILDING, action="start", reason="test", user="mallory"
        )
        assert (refused.status, refused.body["error"]) == (403, "unknown_key")
        assert agent.emergency.active is None


async def test_no_connected_device_is_a_clear_error(tmp_path: Path, receiver: Receiver) -> None:
    key = new_private_key(tmp_path / "dispatch.key")
    dispatch = Dispatch(key, receiver.ingest, lambda b: [])
    with pytest.raises(DispatchError) as none:
        await dispatch.send(building="lincoln-elementary", action="start", reason="x", user="u")
    assert none.value.code == "no_device"


@pytest.mark.parametrize(
    ("building", "action", "reason", "field"),
    [
        ("Lincoln!", "start", "fire", "building"),
        ("lincoln", "delete", "fire", "action"),
        ("lincoln", "start", "", "reason"),
        ("lincoln", "start", "x" * 201, "reason"),
        ("lincoln", "start", "line\nbreak", "reason"),
        (None, "start", "fire", "building"),
    ],
)
def test_bad_requests_name_the_field(
    building: object, action: object, reason: object, field: str
) -> None:
    with pytest.raises(DispatchError, match=f"^malformed: {field}"):
        check_request(building, action, reason)


async def test_a_device_whose_connection_is_going_is_not_connected_not_a_failure(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Its transport is closing, and the receiver's handler has not noticed yet: the send
    raised a ConnectionResetError that failed the whole building's dispatch (500, and
    unaudited) after the other devices had taken it (found by a review)."""
    path, _ = enroll(tmp_path, receiver)
    device = load_config(path).device_id
    key = load_private_key(dispatch_key_path(tmp_path / "agent"))
    dispatch = Dispatch(key, receiver.ingest, lambda b: connected_in(receiver, b))
    async with Agent(load_config(path)) as agent:
        await receiver.presence.wait_for(lambda: bool(connected_in(receiver, BUILDING)))
        ws = receiver.ingest._connections[device]
        ws._writer.transport.close()  # type: ignore[union-attr]  # the TCP connection is gone
        assert not ws.closed
        (delivery,) = await dispatch.send(
            building=BUILDING, action="start", reason="911 call: intruder", user="jdoe"
        )
        assert (delivery.status, delivery.body["error"]) == (0, "not_connected")
        assert agent.emergency.active is None
