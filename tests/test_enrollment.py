"""The receiver trusts the district's authority, not a hand-kept list (issue #5, point 5)."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import BUILDING, DEMO_CAMERAS, press_button, write_agent_config
from provisioning.documents import DocumentError, b64url, b64url_decode, canonical
from provisioning.enrollment import (
    parse_enrollment,
    parse_revocations,
    sign_enrollment,
    sign_revocations,
)
from provisioning.keys import kid, load_private_key, public_pem
from receiver.device_trust import DeviceTrust
from receiver.presence import iso_utc
from receiver.server import Receiver

pytestmark = pytest.mark.timeout(60)
NOW = int(time.time())


def enroll(
    tmp_path: Path,
    receiver: Receiver,
    *,
    signer: Ed25519PrivateKey | None = None,
    version: int = 1,
    exp: int = NOW + 86400,
    pin: str | None = None,
    device: str = "demo-agent-1",
) -> tuple[Path, dict[str, Any]]:
    """An agent NOT on the receiver's allow-list, with a certificate from ``signer``."""
    path = write_agent_config(tmp_path / "agent", receiver, preroll_s=1, allow=False)
    authority = load_private_key(tmp_path / "district" / "authority.key")
    device_key = load_private_key(tmp_path / "agent" / "device.key")
    config = load_config(path)
    cert = sign_enrollment(
        signer or authority,
        version=version,
        device=device,
        device_key=device_key.public_key(),
        building=BUILDING,
        receiver_url=config.receiver_url,
        receiver_pin=pin or receiver.fingerprint,
        recipients=list(config.store.recipients),
        cameras=[{"id": c, "zone": z} for c, z in DEMO_CAMERAS],
        iat=NOW - 10,
        exp=exp,
    )
    (tmp_path / "agent" / "enrollment.json").write_text(json.dumps(cert))
    text = path.read_text().replace(
        'state_dir = "state"\n', 'state_dir = "state"\nenrollment = "enrollment.json"\n'
    )
    path.write_text(text)
    # The receiver trusts the district's authority (and has no allow-list entry).
    shutil.copy(tmp_path / "district" / "authority.pub", receiver.data_dir / "authority.pub")
    return path, cert


async def refused(path: Path) -> str:
    async with Agent(load_config(path)) as agent:
        await agent.uplink.wait_until(lambda: bool(agent.uplink.stats.refusals))
        assert not agent.uplink.connected
        (code,) = agent.uplink.stats.refusals
        return str(code)


async def test_a_freshly_enrolled_device_is_accepted_with_no_manual_step(
    tmp_path: Path, receiver: Receiver
) -> None:
    path, _ = enroll(tmp_path, receiver)
    assert not (receiver.devices_dir / "demo-agent-1.pub").exists()
    async with Agent(load_config(path)) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        await agent.capture.wait_packets(10)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        agent.end("test finished")
        await agent.uplink.wait_settled(session.id)
    assert [s.session_id for s in receiver.store.sessions()] == [session.id]


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("other authority", "enrollment_unknown_key"),
        ("forged", "enrollment_bad_signature"),
        ("expired", "enrollment_expired"),
        ("another receiver", "enrollment_other_receiver"),
        ("another device", "enrollment_mismatch"),
        ("revoked", "revoked"),
    ],
)
async def test_the_receiver_refuses_what_the_authority_did_not_vouch_for(
    tmp_path: Path, receiver: Receiver, case: str, code: str
) -> None:
    if case == "other authority":
        path, _ = enroll(tmp_path, receiver, signer=Ed25519PrivateKey.generate())
    elif case == "expired":
        path, _ = enroll(tmp_path, receiver, exp=NOW - 1)
    elif case == "another receiver":
        path, _ = enroll(tmp_path, receiver, pin="sha256:" + "ab" * 32)
    elif case == "another device":
        path, _ = enroll(tmp_path, receiver, device="lincoln-pi-9")
    elif case == "forged":
        path, cert = enroll(tmp_path, receiver)
        payload = json.loads(b64url_decode(cert["payload"], what="payload"))
        payload["building"] = "jefferson-high"
        forged = {**cert, "payload": b64url(canonical(payload))}
        (tmp_path / "agent" / "enrollment.json").write_text(json.dumps(forged))
    else:
        path, _ = enroll(tmp_path, receiver)
        authority = load_private_key(tmp_path / "district" / "authority.key")
        device_key = load_private_key(tmp_path / "agent" / "device.key")
        revocations = sign_revocations(
            authority,
            1,
            [{"device": "demo-agent-1", "kid": kid(device_key.public_key())}],
            iat=NOW,
            exp=NOW + 3600,
        )
        (receiver.data_dir / "revocations.json").write_text(json.dumps(revocations))
    assert await refused(path) == code


async def test_re_enrollment_only_moves_forward(tmp_path: Path, receiver: Receiver) -> None:
    path, _ = enroll(tmp_path, receiver, version=2)
    async with Agent(load_config(path)) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
    enroll(tmp_path, receiver, version=1)  # an older certificate of the same device
    assert await refused(path) == "enrollment_superseded"


def test_documents_round_trip_and_reject_tampering() -> None:
    authority, device = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    cert = sign_enrollment(
        authority, version=1, device="lincoln-pi-1", device_key=device.public_key(),
        building=BUILDING, receiver_url="wss://rx:8443/v1/uplink",
        receiver_pin="sha256:" + "0" * 64,
        recipients=["age1" + "q" * 58], cameras=[{"id": "hall", "zone": "interior"}],
        iat=NOW, exp=NOW + 60,
    )  # fmt: skip
    parsed = parse_enrollment(json.dumps(cert), authority.public_key(), now=NOW)
    assert parsed.cameras == {"hall": "interior"} and parsed.device_kid == kid(device.public_key())
    with pytest.raises(DocumentError) as late:
        parse_enrollment(json.dumps(cert), authority.public_key(), now=NOW + 60)
    assert late.value.code == "expired"
    # A Pi before NTP syncs runs on the time it last saved: the refusal says both times.
    with pytest.raises(DocumentError) as early:
        parse_enrollment(json.dumps(cert), authority.public_key(), now=NOW - 40 * 86400)
    assert early.value.code == "not_yet_valid"
    stale = datetime.fromtimestamp(NOW - 40 * 86400, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"this clock says {stale}" in early.value.detail
    assert "NTP" in early.value.detail
    revocations = sign_revocations(authority, 3, [], iat=NOW, exp=NOW + 1)
    assert parse_revocations(json.dumps(revocations), authority.public_key()).version == 3
    with pytest.raises(DocumentError) as stranger:
        parse_revocations(json.dumps(revocations), device.public_key())
    assert stranger.value.code == "unknown_key"


@pytest.mark.parametrize(
    "entry",
    [
        {"kid": "0123456789abcdef"},  # a key id needs its device
        {"device": "pi-1", "kid": None},
        {"device": "pi-1", "kid": "0123"},
        {"device": "pi-1", "kid": "0123456789abcdef", "why": "stolen"},
        {"device": "Pi 1"},
    ],
)
def test_a_malformed_revocation_entry_is_refused(entry: dict[str, object]) -> None:
    authority = Ed25519PrivateKey.generate()
    doc = sign_revocations(authority, 1, [entry], iat=NOW, exp=NOW + 60)  # type: ignore[list-item]
    with pytest.raises(DocumentError) as bad:
        parse_revocations(json.dumps(doc), authority.public_key())
    assert bad.value.code == "malformed"
    assert "revoked[0]" in bad.value.detail


def test_the_receiver_remembers_each_devices_enrollment_expiry(tmp_path: Path) -> None:
    """The device list shows when each device's enrollment expires (a warning within 30
    days), from the last certificate the receiver accepted, across restarts; a hello
    refused for an expired certificate is said so until one is accepted again."""
    data, day, pin = tmp_path / "receiver", 86400, "sha256:" + "ab" * 32
    authority, device = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data.mkdir()
    (data / "authority.pub").write_bytes(public_pem(authority.public_key()))

    def cert(version: int, exp: int, receiver: str = pin) -> dict[str, str]:
        return sign_enrollment(
            authority, version=version, device="lincoln-pi-1", device_key=device.public_key(),
            building=BUILDING, receiver_url="wss://rx:8443/v1/uplink", receiver_pin=receiver,
            recipients=["age1" + "q" * 58], cameras=[], iat=NOW - 10, exp=exp,
        )  # fmt: skip

    def expiry(version: int, exp: int | None, *, expired: bool = False, soon: bool = False,
               refused: float | None = None) -> dict[str, object]:  # fmt: skip
        return {
            "version": version,
            "expires_at": None if exp is None else iso_utc(exp),
            "expired": expired,
            "expires_soon": soon,
            "refused": None if refused is None else {
                "code": "enrollment_expired", "at": iso_utc(refused),
            },
        }  # fmt: skip

    # What the receiver kept before it remembered expiry dates: shown without one, and
    # completed at the device's next hello (the same version).
    old = {"version": 1, "kid": kid(device.public_key()), "building": BUILDING}
    (data / "enrolled").mkdir()
    (data / "enrolled" / "lincoln-pi-1.json").write_text(json.dumps(old))
    trust = DeviceTrust(data)
    trust.load()
    assert trust.expiry("lincoln-pi-1", NOW) == expiry(1, None)
    assert trust.expiry("lincoln-pi-9", NOW) is None  # never enrolled here

    exp = NOW + 40 * day
    trust.check("lincoln-pi-1", cert(1, exp), now=NOW, own_pin=pin)
    assert trust.expiry("lincoln-pi-1", NOW) == expiry(1, exp)
    assert trust.expiry("lincoln-pi-1", exp - 30 * day) == expiry(1, exp, soon=True)
    assert trust.expiry("lincoln-pi-1", exp) == expiry(1, exp, expired=True)

    # The certificate expired: refused, and said so.
    with pytest.raises(p.RemoteProtocolError) as refusal:
        trust.check("lincoln-pi-1", cert(1, exp), now=exp + 5, own_pin=pin)
    assert refusal.value.code == "enrollment_expired"
    assert trust.expiry("lincoln-pi-1", exp + 6) == expiry(1, exp, expired=True, refused=exp + 5)

    # Renewed: accepted, the refusal is over. An expired certificate older than it, or
    # for another receiver, is no news (refused anyway).
    renewed = exp + 365 * day
    trust.check("lincoln-pi-1", cert(2, renewed), now=exp + 7, own_pin=pin)
    assert trust.expiry("lincoln-pi-1", exp + 8) == expiry(2, renewed)
    for stale in (cert(1, exp), cert(3, exp, "sha256:" + "cd" * 32)):
        with pytest.raises(p.RemoteProtocolError):
            trust.check("lincoln-pi-1", stale, now=exp + 9, own_pin=pin)
    assert trust.expiry("lincoln-pi-1", exp + 10) == expiry(2, renewed)

    again = DeviceTrust(data)  # a restart: read back from DATA/enrolled/
    again.load()
    assert again.expiry("lincoln-pi-1", exp + 11) == expiry(2, renewed)
