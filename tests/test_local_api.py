"""Remote triggers over the agent's real HTTPS Local API and over the uplink (issue #4)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import alarm
from agent.config import load_config
from agent.daemon import Agent
from agent.emergency import State
from breakglass.demo import BUILDING, press_button, write_agent_config
from provisioning import documents as d
from provisioning.keys import kid, load_private_key
from provisioning.tls import fingerprint_digest
from provisioning.triggers import sign_key_list
from receiver.server import Receiver
from tests.clocks import ShiftedTime
from tests.trust import Signers, call, enrol_roles, entry

pytestmark = pytest.mark.timeout(120)


def agent_config(tmp_path: Path, receiver: Receiver) -> tuple[Path, Signers]:
    path = write_agent_config(tmp_path / "agent", receiver, preroll_s=2)
    return path, enrol_roles(tmp_path / "agent")


def audit_entries(agent_folder: Path) -> list[dict[str, Any]]:
    path = agent_folder / "state" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def payload(**fields: Any) -> dict[str, Any]:
    now = int(time.time())
    doc: dict[str, Any] = {
        "type": "trigger",
        "v": 1,
        "iat": now,
        "exp": now + 120,
        "action": "start",
        "building": BUILDING,
        "cameras": "all",
        "reason": "test",
        "nonce": d.b64url(fields.pop("nonce_bytes", b"n" * 16)),
    }
    doc.update(fields)
    return doc


def envelope(key: Ed25519PrivateKey, doc: dict[str, Any]) -> str:
    data = d.canonical(doc)
    return json.dumps(
        {"payload": d.b64url(data), "kid": kid(key.public_key()), "sig": d.b64url(key.sign(data))}
    )


async def test_each_reason_code_over_https_is_answered_and_audited(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, keys = agent_config(tmp_path, receiver)
    now = int(time.time())
    valid = keys.trigger("principal", "start")
    faults: dict[str, bytes | str] = {
        "malformed": b'{"payload": "x", "kid": 1}',
        "too_large": json.dumps({"payload": "A" * 9000, "kid": "0" * 16, "sig": "A"}),
        "unknown_key": keys.trigger("dispatch", "start").replace(
            kid(keys.dispatch.public_key()), "0123456789abcdef"
        ),
        "bad_signature": json.dumps(
            {**json.loads(valid), "sig": d.b64url(Ed25519PrivateKey.generate().sign(b"x"))}
        ),
        "role_forbidden": keys.trigger("principal", "end"),
        "wrong_building": keys.trigger("dispatch", "start", building="jefferson-high"),
        "expired": envelope(keys.dispatch, payload(iat=now - 400, exp=now - 200)),
        "not_yet_valid": envelope(keys.dispatch, payload(iat=now + 200, exp=now + 300)),
        "bad_challenge": keys.trigger("dispatch", "start", challenge="Y2hhbGxlbmdlLWNoYWxsZW5nZQ"),
    }
    async with Agent(load_config(path)) as agent:
        for code, body in faults.items():
            status, answer = await call(agent, "POST", "/v1/triggers", body)
            assert 400 <= status < 500, (code, status, answer)
            assert answer["error"] == code, (code, answer)
            assert answer["detail"]
        assert agent.emergency.state is State.IDLE
        # The valid one starts a session; sent again it is a replay.
        status, answer = await call(agent, "POST", "/v1/triggers", valid)
        assert status == 202, answer
        session = answer["session"]
        status, answer = await call(agent, "POST", "/v1/triggers", valid)
        assert (status, answer["error"]) == (409, "replayed")
        _, metrics = await call(agent, "GET", "/metrics")
        for code in [*faults, "replayed"]:
            assert f'breakglass_triggers_rejected_total{{reason="{code}"}} 1' in metrics
        assert "breakglass_triggers_accepted_total 1" in metrics
        assert 'breakglass_emergency_state{state="active"} 1' in metrics
        status, doc = await call(agent, "GET", "/v1/status")
        assert status == 200
        assert doc["state"] == "active" and doc["session"]["id"] == session
        # Not who started it, or why, for anyone on the LAN (found by a review).
        assert set(doc["session"]) == {"id", "expires_at"}
        assert "certificate" not in doc
        agent.end("test finished")
    trail = audit_entries(tmp_path / "agent")
    rejected = {
        e["code"]: e for e in trail if e["event"] == "trigger" and e["result"] == "rejected"
    }
    assert set(rejected) == {*faults, "replayed"}
    assert rejected["role_forbidden"]["kid"] == kid(keys.principal.public_key())
    assert rejected["role_forbidden"]["action"] == "end"
    assert all(e["via"].startswith("local_api") for e in rejected.values())
    (accepted,) = [e for e in trail if e["event"] == "trigger" and e["result"] == "accepted"]
    assert accepted["session"] == session and accepted["role"] == "principal"
    (start,) = [e for e in trail if e["event"] == "session_start"]
    assert start["by"]["kind"] == "trigger" and start["by"]["reason"] == "principal start"


async def test_who_may_extend_and_end_and_what_a_second_press_does(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, keys = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        await agent.capture.wait_packets(10)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        # A principal's key can neither end nor extend.
        for action in ("end", "extend"):
            status, answer = await call(
                agent, "POST", "/v1/triggers", keys.trigger("principal", action)
            )
            assert (status, answer["error"]) == (403, "role_forbidden")
        # A second press joins; it never ends the session. (Three frames later: the
        # button's debounce ignores edges within 50 ms of the last.)
        await agent.capture.wait_packets(3)
        press_button(agent)
        await agent.wait_until(lambda: len(agent.press_log) == 2)
        assert agent.emergency.active is not None and agent.emergency.active.id == session.id
        # A principal's start while active joins too.
        status, answer = await call(
            agent, "POST", "/v1/triggers", keys.trigger("principal", "start")
        )
        assert status == 202 and answer == {
            "session": session.id,
            "action": "start",
            "joined": True,
        }
        status, answer = await call(
            agent, "POST", "/v1/triggers", keys.trigger("dispatch", "extend")
        )
        assert status == 202 and answer["session"] == session.id
        assert answer["expires_at"] > session.expires_at
        status, answer = await call(
            agent, "POST", "/v1/triggers", keys.trigger("superintendent", "end")
        )
        assert status == 202 and answer["action"] == "end"
        assert agent.emergency.state is State.IDLE
        status, answer = await call(agent, "POST", "/v1/triggers", keys.trigger("dispatch", "end"))
        assert (status, answer["error"]) == (409, "no_session")
        await agent.uplink.wait_settled(session.id)
    trail = audit_entries(tmp_path / "agent")
    events = [e["event"] for e in trail if e["event"].startswith(("session_", "button"))]
    assert events == [
        "button_press",
        "session_start",
        "button_press",
        "session_extend",
        "session_end",
    ]
    (end,) = [e for e in trail if e["event"] == "session_end"]
    assert end["by"]["role"] == "superintendent"
    # Who and why, as the receiver and the district are told (not "ended by trigger").
    assert (
        end["reason"] == f"ended by superintendent key {end['by']['label']}: {end['by']['reason']}"
    )
    (closed,) = [s for s in receiver.store.sessions() if s.session_id == session.id]
    assert closed.close_reason == end["reason"]
    (disclosure,) = [e for e in trail if e["event"] == "disclosure"]
    assert {c["id"]: c["zone"] for c in disclosure["cameras"]} == {
        "front-door": "exterior",
        "hallway-2": "interior",
    }
    assert disclosure["receiver"] == receiver.origin


async def test_expiry_ends_a_session(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = agent_config(tmp_path, receiver)
    later = ShiftedTime()
    # The time left is measured on the monotonic clock (the wall clock alone steps).
    monkeypatch.setattr(alarm, "time", later)
    async with Agent(load_config(path), clock=later.time) as agent:
        await agent.capture.wait_packets(10)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        later.wall_ns = later.mono_ns = 3601 * 10**9  # an hour later (the default duration)
        await agent.wait_until(lambda: agent.emergency.active is None)
        assert agent.emergency.last is not None
        assert agent.emergency.last.end_reason == "expired"
    (end,) = [e for e in audit_entries(tmp_path / "agent") if e["event"] == "session_end"]
    assert end["reason"] == "expired" and end["by"] is None


async def test_a_replayed_trigger_is_refused_after_a_restart(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, keys = agent_config(tmp_path, receiver)
    extend = keys.trigger("dispatch", "extend")
    async with Agent(load_config(path)) as agent:
        status, answer = await call(agent, "POST", "/v1/triggers", extend)
        assert (status, answer["error"]) == (409, "no_session")  # verified: nonce spent
    async with Agent(load_config(path)) as agent:
        status, answer = await call(agent, "POST", "/v1/triggers", extend)
        assert (status, answer["error"]) == (409, "replayed")


async def test_a_device_challenge_stands_in_for_the_clock(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, keys = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        status, answer = await call(agent, "GET", "/v1/challenge")
        assert status == 200
        # The signer's clock is a day off; the fresh device challenge vouches instead.
        body = keys.trigger(
            "dispatch", "start", now=time.time() - 86400, challenge=answer["challenge"]
        )
        status, answer = await call(agent, "POST", "/v1/triggers", body)
        assert status == 202, answer
        status, answer = await call(agent, "POST", "/v1/triggers", keys.trigger("dispatch", "end"))
        assert status == 202, answer


async def test_a_trigger_signed_with_openssl_is_accepted_over_https(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, keys = agent_config(tmp_path, receiver)
    key = tmp_path / "keys" / "openssl-dispatch.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True)
    key.chmod(0o600)
    now = int(time.time())
    entries = [entry(load_private_key(key), "dispatch", [BUILDING], "openssl dispatch")]
    keylist = sign_key_list(keys.authority, 3, entries, iat=now, exp=now + 3600)
    (tmp_path / "agent" / "trigger-keys.json").write_text(json.dumps(keylist))
    data = d.canonical(payload(nonce_bytes=b"openssl-nonce-16"))
    payload_file = tmp_path / "payload.json"
    payload_file.write_bytes(data)
    signed = subprocess.run(
        ["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(payload_file)],
        check=True,
        capture_output=True,
    ).stdout
    pub = load_private_key(key).public_key()
    body = json.dumps({"payload": d.b64url(data), "kid": kid(pub), "sig": d.b64url(signed)})
    async with Agent(load_config(path)) as agent:
        status, answer = await call(agent, "POST", "/v1/triggers", body)
        assert status == 202, answer
        # v3 replaced v2: the earlier keys are revoked.
        status, answer = await call(agent, "POST", "/v1/triggers", keys.trigger("dispatch", "end"))
        assert (status, answer["error"]) == (403, "unknown_key")


async def test_a_trigger_pushed_by_the_receiver_reaches_the_agent_over_the_uplink(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, keys = agent_config(tmp_path, receiver)
    device = load_config(path).device_id
    async with Agent(load_config(path)) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        await agent.capture.wait_packets(10)
        start = json.loads(keys.trigger("dispatch", "start", reason="911 call: smoke in gym"))
        answer = await receiver.ingest.push_trigger(device, start)
        assert answer.status == 202, answer
        session = str(answer.body["session"])
        await agent.uplink.wait_until(lambda: agent.uplink.stream(session) is not None)
        forbidden = json.loads(keys.trigger("principal", "end"))
        answer = await receiver.ingest.push_trigger(device, forbidden)
        assert (answer.status, answer.body["error"]) == (403, "role_forbidden")
        answer = await receiver.ingest.push_trigger(
            device, json.loads(keys.trigger("dispatch", "end"))
        )
        assert answer.status == 202
        await agent.uplink.wait_settled(session)
        # The audit trail reached the receiver too.
        await agent.uplink.wait_until(lambda: agent.uplink.audit_acked >= agent.audit.head_n)
    (summary,) = receiver.store.sessions()
    assert summary.meta["started_by"]["reason"] == "911 call: smoke in gym"
    copy = (tmp_path / "receiver" / "audit" / f"{device}.log").read_text().splitlines()
    device_trail = (tmp_path / "agent" / "state" / "audit.log").read_text().splitlines()
    assert copy == device_trail[: len(copy)]
    vias = [json.loads(x).get("via") for x in copy if json.loads(x)["event"] == "trigger"]
    assert vias == ["uplink", "uplink", "uplink"]


async def test_unreadable_trust_and_a_broken_replay_cache_leave_the_button_armed(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, keys = agent_config(tmp_path, receiver)
    (tmp_path / "district" / "authority.pub").write_text("not a key")
    state = tmp_path / "agent" / "state"
    state.mkdir()
    (state / "replay.sqlite").write_bytes(b"not a database" * 100)
    async with Agent(load_config(path)) as agent:
        status, answer = await call(
            agent, "POST", "/v1/triggers", keys.trigger("dispatch", "start")
        )
        assert (status, answer["error"]) == (403, "unknown_key")
        await agent.capture.wait_packets(10)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        agent.end("test finished")
    events = [e["event"] for e in audit_entries(tmp_path / "agent")]
    assert "keylist_refused" in events and "replay_cache_reset" in events


async def test_keys_rotate_and_revoke_by_a_newer_list_and_never_roll_back(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, keys = agent_config(tmp_path, receiver)
    now = int(time.time())
    v2 = (tmp_path / "agent" / "trigger-keys.json").read_text()
    # v3 revokes the superintendent's key (and keeps dispatch).
    only_dispatch = [entry(keys.dispatch, "dispatch", "all", "county 911 dispatch")]
    v3 = json.dumps(sign_key_list(keys.authority, 3, only_dispatch, iat=now, exp=now + 3600))
    stale = json.dumps(sign_key_list(keys.authority, 4, only_dispatch, iat=now - 99, exp=now - 9))
    forged = json.dumps(
        sign_key_list(Ed25519PrivateKey.generate(), 9, only_dispatch, iat=now, exp=now + 60)
    )
    async with Agent(load_config(path)) as agent:
        assert (await call(agent, "PUT", "/v1/trigger-keys", v3))[0] == 200
        for body, status, code in (
            (v2, 409, "keylist_rollback"),
            (stale, 409, "keylist_expired"),
            (forged, 403, "unknown_key"),
        ):
            got, answer = await call(agent, "PUT", "/v1/trigger-keys", body)
            assert (got, answer["error"]) == (status, code)
        revoked = keys.trigger("superintendent", "start")
        status, answer = await call(agent, "POST", "/v1/triggers", revoked)
        assert (status, answer["error"]) == (403, "unknown_key")
    # The config still names v2: after a restart the device keeps v3.
    async with Agent(load_config(path)) as agent:
        assert agent.gate.keyring.current is not None
        assert agent.gate.keyring.current.version == 3
    trail = audit_entries(tmp_path / "agent")
    refused = [e["code"] for e in trail if e["event"] == "keylist_refused"]
    assert refused == ["keylist_rollback", "keylist_expired", "unknown_key", "keylist_rollback"]
    assert [e["version"] for e in trail if e["event"] == "keylist_installed"] == [2, 3]


async def test_each_button_has_its_room_and_the_alarm_says_which_was_pressed(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, _ = agent_config(tmp_path, receiver)
    text = path.read_text()
    path.write_text(text + '\n[[buttons]]\nid = "gym"\npin = 22\nlocation = "Gym, north door"\n')
    async with Agent(load_config(path)) as agent:
        await agent.capture.wait_packets(10)
        press_button(agent, pin=22)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        assert session.started_by["button_id"] == "gym"
        await agent.capture.wait_packets(3)  # past the debounce
        press_button(agent)  # the office button joins the same session
        await agent.wait_until(lambda: len(agent.press_log) == 2)
        await agent.wait_until(lambda: agent.uplink.stream(session.id) is not None)
        stream = agent.uplink.stream(session.id)
        assert stream is not None
        await agent.uplink.wait_until(lambda: min(stream.acked) >= 0)
        agent.end("test finished")
        await agent.uplink.wait_settled(session.id)
    (summary,) = receiver.store.sessions()
    assert summary.meta["started_by"]["location"] == "Gym, north door"
    presses = [e for e in audit_entries(tmp_path / "agent") if e["event"] == "button_press"]
    assert [(e["button"], e["started"]) for e in presses] == [("gym", True), ("office", False)]
    assert {e["session"] for e in presses} == {session.id}


async def test_junk_from_one_machine_does_not_hold_back_a_real_trigger(
    tmp_path: Path, receiver: Receiver
) -> None:
    """One bucket for everyone: a flood of junk from one laptop on the LAN answered a
    principal's real triggers 429 too (found by a review). Each address has its own."""
    path, keys = agent_config(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        api = agent.local_api
        assert api is not None
        pin = aiohttp.Fingerprint(fingerprint_digest(api.fingerprint))
        flooder = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=flooder) as http:
            statuses = []
            while len(statuses) < 200 and 429 not in statuses:  # bounded: the burst is 50
                async with http.post(api.url + "/v1/triggers", data=b"{}", ssl=pin) as r:
                    statuses.append(r.status)
            assert statuses[-1] == 429 and len(statuses) > 10
        status, answer = await call(
            agent, "POST", "/v1/triggers", keys.trigger("principal", "start")
        )
        assert status == 202, answer
        agent.end("test finished")
