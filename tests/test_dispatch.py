"""Dispatch: the receiver signs with its dispatch key and pushes to the building (issue #6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import BUILDING, dispatch_key_path
from provisioning import documents as d
from provisioning import triggers
from provisioning.keys import load_private_key, new_private_key
from receiver.dispatch import (
    MAX_REASON,
    Dispatch,
    DispatchError,
    check_request,
    load_or_make_key,
)
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
    seen: dict[str, str | None] = {}  # the receiver's view, stale on purpose below

    def session_of(device: str) -> str | None:
        return seen.get(device, receiver.emergency_of(device))

    dispatch = Dispatch(
        key, receiver.ingest, lambda b: connected_in(receiver, b), session_of=session_of
    )
    async with Agent(load_config(path)) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        await receiver.presence.wait_for(lambda: bool(connected_in(receiver, BUILDING)))
        (started,) = await dispatch.send(
            building=BUILDING, action="start", reason="911 call: intruder", user="jdoe"
        )
        assert started.status == 202, started.body
        assert started.session is None  # a start names no session
        session = agent.emergency.active
        assert session is not None and session.id == started.body["session"]
        assert session.started_by["reason"] == "911 call: intruder (dispatcher jdoe)"
        device = agent.config.device_id
        await receiver.presence.wait_for(lambda: receiver.emergency_of(device) == session.id)
        (extended,) = await dispatch.send(
            building=BUILDING, action="extend", reason="still searching", user="jdoe"
        )
        assert extended.status == 202
        assert extended.session == session.id  # named: the device checked it is the open one
        assert extended.audit()["named_session"] == session.id
        # An end for an emergency the receiver saw, which is over on the device by now
        # (another is open there): refused, and the open one goes on.
        seen[device] = "20261128T000000Z-0ld5e55i"
        (stale,) = await dispatch.send(
            building=BUILDING, action="end", reason="all clear", user="asmith"
        )
        assert (stale.status, stale.body["error"]) == (409, "no_session"), stale.body
        assert agent.emergency.active is not None and agent.emergency.active.id == session.id
        del seen[device]
        (ended,) = await dispatch.send(
            building=BUILDING, action="end", reason="all clear", user="asmith"
        )
        assert ended.status == 202 and ended.session == session.id
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


class Capture:
    """A pusher that keeps the reason of every trigger it is given (and its envelope)."""

    def __init__(self) -> None:
        self.envelopes: list[dict[str, Any]] = []

    async def push_trigger(
        self, device: str, envelope: dict[str, Any], *, timeout_s: float = 10.0
    ) -> p.TriggerResult:
        self.envelopes.append(envelope)
        return p.TriggerResult("r", 202, {"session": "s"})

    def reasons(self) -> list[str]:
        return [
            json.loads(d.b64url_decode(e["payload"], what="p"))["reason"] for e in self.envelopes
        ]


async def test_the_dispatchers_name_is_last_and_whole_in_the_devices_reason(
    tmp_path: Path,
) -> None:
    """The signed reason was f"{reason} (dispatcher {user})"[:240]: a long reason cut the
    name off, and a reason ending in "(dispatcher chief)" then read as chief's (review s9)."""
    user = "a" + "b" * 62 + "z"  # the longest account name
    reason = "all clear, building searched " + "x" * 152 + " (dispatcher chief)"
    assert len(reason) == MAX_REASON
    capture = Capture()
    dispatch = Dispatch(new_private_key(tmp_path / "dispatch.key"), capture, lambda b: ["dev-1"])
    await dispatch.send(building="lincoln", action="end", reason=reason, user=user)
    (said,) = capture.reasons()
    assert said == f"{reason} (dispatcher {user})"  # all of it: it fits the trigger
    # ... and a device takes it: the trigger's own checks pass.
    (envelope,) = capture.envelopes
    doc = d.read_payload(
        d.parse_envelope(envelope), "trigger", triggers._TRIGGER_FIELDS, triggers._OPTIONAL
    )
    assert doc["reason"] == said
    assert doc["device"] == "dev-1"  # the building's other devices refuse it


def test_a_reason_too_long_for_the_trigger_is_shortened_before_the_name() -> None:
    from receiver.dispatch import TRIGGER_REASON_MAX, signed_reason

    said = signed_reason("y" * 600 + " (dispatcher chief)", "jdoe")
    assert len(said) == TRIGGER_REASON_MAX
    assert said.endswith("y… (dispatcher jdoe)")
    assert signed_reason("fire", "jdoe") == "fire (dispatcher jdoe)"
    # TRIGGER_REASON_MAX is the trigger's own limit: a reason of that length is taken,
    # one character more is not.
    check = triggers._TRIGGER_FIELDS["reason"]
    assert check("r" * TRIGGER_REASON_MAX, "reason") == "r" * TRIGGER_REASON_MAX
    with pytest.raises(d.DocumentError):
        check("r" * (TRIGGER_REASON_MAX + 1), "reason")


class OlderAgent(Capture):
    """Answers as an agent from before the session and device fields: the real payload
    reader with the fields it knew (unknown fields refused), then 202."""

    async def push_trigger(
        self, device: str, envelope: dict[str, Any], *, timeout_s: float = 10.0
    ) -> p.TriggerResult:
        self.envelopes.append(envelope)
        known = {
            k: v for k, v in triggers._TRIGGER_FIELDS.items() if k not in ("session", "device")
        }
        try:
            d.read_payload(d.parse_envelope(envelope), "trigger", known, frozenset({"challenge"}))
        except d.DocumentError as exc:
            return p.TriggerResult("r", 400, {"error": exc.code, "detail": exc.detail})
        return p.TriggerResult("r", 202, {"session": "s"})


async def test_an_older_agent_gets_the_trigger_it_knew_and_the_log_says_so(
    tmp_path: Path,
) -> None:
    """Review n1: an upgraded receiver's bound triggers were refused by every agent not
    yet upgraded (unknown fields), start included: no dispatch reached them."""
    older = OlderAgent()
    dispatch = Dispatch(
        new_private_key(tmp_path / "dispatch.key"), older, lambda b: ["dev-1"],
        session_of=lambda device: "20261128T000000Z-0ld5e55i",
    )  # fmt: skip
    for action in ("start", "end"):
        (delivery,) = await dispatch.send(
            building="lincoln", action=action, reason="drill", user="jdoe"
        )
        assert delivery.status == 202 and delivery.unbound, delivery
        assert delivery.session is None and delivery.to_json()["unbound"] is True
        assert "older agent" in delivery.audit()["unbound"]
    payloads = [json.loads(d.b64url_decode(e["payload"], what="p")) for e in older.envelopes]
    assert [("device" in x, "session" in x) for x in payloads] == [
        (True, False), (False, False), (True, True), (False, False),
    ]  # fmt: skip
    # An agent of today never gets the unbound one: its answer is not that refusal.
    current = Capture()
    dispatch.pusher = current
    (delivery,) = await dispatch.send(building="lincoln", action="end", reason="x", user="j")
    assert not delivery.unbound and len(current.envelopes) == 1
