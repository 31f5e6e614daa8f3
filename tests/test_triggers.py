"""The sans-IO trigger verifier and the district's trigger-key list (DESIGN.md)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.emergency import Emergency
from agent.policy import apply_trigger
from provisioning import documents as d
from provisioning.keys import kid, load_private_key, raw_public
from provisioning.triggers import (
    CHALLENGE_TTL_S,
    Accepted,
    Challenges,
    ChallengesExhausted,
    KeyListRefused,
    Keyring,
    MemoryReplayCache,
    Rejected,
    parse_key_list,
    sign_key_list,
    sign_trigger,
    verify_trigger,
)
from tests.mutations import HOWS, mutate

NOW = 1_800_000_000
BUILDING = "lincoln-elementary"


class Trust:
    """A district authority, three enrolled trigger keys and a device's verifier state."""

    def __init__(self) -> None:
        self.authority = Ed25519PrivateKey.generate()
        self.dispatch = Ed25519PrivateKey.generate()
        self.principal = Ed25519PrivateKey.generate()
        self.superintendent = Ed25519PrivateKey.generate()
        self.keyring = Keyring()
        self.keyring.install(self.key_list(1), NOW)
        self.replay = MemoryReplayCache()
        self.challenges = Challenges()

    def entries(self, *keys: tuple[Ed25519PrivateKey, str, Any]) -> list[dict[str, Any]]:
        return [
            {"key": d.b64url(raw_public(k.public_key())), "role": r, "buildings": b, "label": r}
            for k, r, b in keys
        ]

    def key_list(self, version: int, *, exp: int = NOW + 86400, keys: Any = None) -> Any:
        keys = keys or self.entries(
            (self.dispatch, "dispatch", "all"),
            (self.principal, "principal", [BUILDING]),
            (self.superintendent, "superintendent", "all"),
        )
        envelope = sign_key_list(self.authority, version, keys, iat=NOW - 10, exp=exp)
        return parse_key_list(json.dumps(envelope), self.authority.public_key())

    def verify(self, body: Any, *, now: float = NOW, mono: float = 100.0) -> Accepted | Rejected:
        return verify_trigger(
            body,
            building=BUILDING,
            keyring=self.keyring,
            now=now,
            mono=mono,
            replay=self.replay,
            challenges=self.challenges,
        )


def envelope(key: Ed25519PrivateKey, payload: dict[str, Any]) -> str:
    data = d.canonical(payload)
    return json.dumps(
        {"payload": d.b64url(data), "kid": kid(key.public_key()), "sig": d.b64url(key.sign(data))}
    )


def payload(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "trigger",
        "v": 1,
        "iat": NOW,
        "exp": NOW + 120,
        "action": "start",
        "building": BUILDING,
        "cameras": "all",
        "reason": "911 call: intruder reported",
        "nonce": "bm9uY2Utbm9uY2Utbm9uY2U",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def trust() -> Trust:
    return Trust()


def test_a_valid_trigger_is_accepted_once(trust: Trust) -> None:
    body = json.dumps(
        sign_trigger(trust.dispatch, action="start", building=BUILDING, reason="911", now=NOW)
    )
    result = trust.verify(body)
    assert isinstance(result, Accepted)
    assert (result.trigger.action, result.trigger.role, result.trigger.cameras) == (
        "start",
        "dispatch",
        None,
    )
    again = trust.verify(body)
    assert isinstance(again, Rejected)
    assert again.code == "replayed"


def test_a_trigger_signed_by_openssl_alone_is_accepted(trust: Trust, tmp_path: Path) -> None:
    key_path = tmp_path / "dispatch.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key_path)], check=True
    )
    key_path.chmod(0o600)
    key = load_private_key(key_path)
    trust.keyring.install(trust.key_list(2, keys=trust.entries((key, "dispatch", "all"))), NOW)
    data = d.canonical(payload(cameras=["hallway-2"]))
    (tmp_path / "payload.json").write_bytes(data)
    sig = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-sign",
            "-rawin",
            "-inkey",
            str(key_path),
            "-in",
            str(tmp_path / "payload.json"),
        ],
        check=True,
        capture_output=True,
    ).stdout
    body = json.dumps(
        {"payload": d.b64url(data), "kid": kid(key.public_key()), "sig": d.b64url(sig)}
    )
    result = trust.verify(body)
    assert isinstance(result, Accepted), result
    assert result.trigger.cameras == ("hallway-2",)


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("not json", "malformed"),
        ("huge", "too_large"),
        ("stranger", "unknown_key"),
        ("forged", "bad_signature"),
        ("extra field", "malformed"),
        ("float iat", "malformed"),
        ("long lifetime", "malformed"),
        ("short nonce", "malformed"),
        ("other building", "wrong_building"),
        ("principal ends", "role_forbidden"),
        ("principal extends", "role_forbidden"),
        ("future", "not_yet_valid"),
        ("old", "expired"),
        ("made-up challenge", "bad_challenge"),
    ],
)
def test_each_rule_has_its_reason_code(trust: Trust, case: str, code: str) -> None:
    bodies: dict[str, Any] = {
        "not json": b"{nope",
        "huge": b" " * 20000,
        "stranger": envelope(Ed25519PrivateKey.generate(), payload()),
        "forged": json.dumps(
            {
                **json.loads(envelope(trust.dispatch, payload())),
                "payload": d.b64url(d.canonical(payload(reason="x"))),
            }
        ),
        "extra field": envelope(trust.dispatch, payload(speed="fast")),
        "float iat": envelope(trust.dispatch, payload(iat=NOW + 0.5)),
        "long lifetime": envelope(trust.dispatch, payload(exp=NOW + 301)),
        "short nonce": envelope(trust.dispatch, payload(nonce="abc")),
        "other building": envelope(trust.dispatch, payload(building="jefferson-high")),
        "principal ends": envelope(trust.principal, payload(action="end")),
        "principal extends": envelope(trust.principal, payload(action="extend")),
        "future": envelope(trust.dispatch, payload(iat=NOW + 61, exp=NOW + 120)),
        "old": envelope(trust.dispatch, payload(iat=NOW - 300, exp=NOW - 61)),
        "made-up challenge": envelope(
            trust.dispatch, payload(challenge="Y2hhbGxlbmdlLWNoYWxsZW5nZQ")
        ),
    }
    result = trust.verify(bodies[case])
    assert isinstance(result, Rejected)
    assert result.code == code, result
    assert trust.replay.nonces == {}  # nothing rejected consumes a nonce


def test_skew_of_sixty_seconds_is_tolerated(trust: Trust) -> None:
    early = envelope(
        trust.dispatch, payload(iat=NOW + 60, exp=NOW + 120, nonce="ZWFybHktZWFybHktZWFybHk")
    )
    late = envelope(
        trust.dispatch, payload(iat=NOW - 200, exp=NOW - 60, nonce="bGF0ZS1sYXRlLWxhdGUtbGF0")
    )
    assert isinstance(trust.verify(early), Accepted)
    assert isinstance(trust.verify(late), Accepted)


def test_a_principal_key_is_scoped_to_its_building(trust: Trust) -> None:
    keyring = Keyring(trust.key_list(1))
    result = verify_trigger(
        envelope(trust.principal, payload(building="jefferson-high")),
        building="jefferson-high",
        keyring=keyring,
        now=NOW,
        mono=0,
        replay=MemoryReplayCache(),
        challenges=Challenges(),
    )
    assert isinstance(result, Rejected)
    assert result.code == "wrong_building"
    assert "not enrolled" in result.detail


def test_a_device_challenge_replaces_the_clock_once(trust: Trust) -> None:
    challenge = trust.challenges.issue(mono=100.0)
    # Signed with the signer's clock; the device's clock is a year off.
    body = envelope(trust.dispatch, payload(challenge=challenge))
    result = trust.verify(body, now=NOW - 365 * 86400, mono=130.0)
    assert isinstance(result, Accepted)
    other = envelope(
        trust.dispatch, payload(challenge=challenge, nonce="c2Vjb25kLXNlY29uZC1zZWNvbmQ")
    )
    reused = trust.verify(other, now=NOW - 365 * 86400, mono=131.0)
    assert isinstance(reused, Rejected)
    assert reused.code == "bad_challenge"
    stale = trust.challenges.issue(mono=100.0)
    late = envelope(trust.dispatch, payload(challenge=stale, nonce="dGhpcmQtdGhpcmQtdGhpcmQtdA"))
    result = trust.verify(late, mono=100.0 + 301)
    assert isinstance(result, Rejected)
    assert result.code == "bad_challenge"


def test_a_device_challenge_never_reads_as_a_command_line_option() -> None:
    # One token_urlsafe draw in 64 starts with "-", which argparse takes for an
    # option in ``trigger sign --challenge C``; 2000 draws miss that by chance
    # with probability (63/64)**2000, about 2e-14.
    challenges = Challenges(limit=4000)
    issued = [challenges.issue(mono=0.0) for _ in range(2000)]
    assert not [c for c in issued if c.startswith("-")]
    assert len(set(issued)) == len(issued)


def test_key_list_rollback_freeze_rotation_and_revocation(trust: Trust) -> None:
    with pytest.raises(KeyListRefused) as rolled_back:
        trust.keyring.install(
            trust.key_list(0 + 1, keys=trust.entries((trust.principal, "principal", "all"))), NOW
        )
    assert rolled_back.value.code == "keylist_rollback"
    with pytest.raises(KeyListRefused) as frozen:
        trust.keyring.install(trust.key_list(5, exp=NOW - 1), NOW)
    assert frozen.value.code == "keylist_expired"
    # Rotation: v2 drops the old dispatch key and enrols a new one.
    new_dispatch = Ed25519PrivateKey.generate()
    v2 = trust.key_list(
        2,
        keys=trust.entries(
            (new_dispatch, "dispatch", "all"), (trust.principal, "principal", [BUILDING])
        ),
    )
    assert trust.keyring.install(v2, NOW)
    revoked = trust.verify(envelope(trust.dispatch, payload()))
    assert isinstance(revoked, Rejected)
    assert revoked.code == "unknown_key"
    assert isinstance(trust.verify(envelope(new_dispatch, payload())), Accepted)
    # An installed list that expires freezes remote triggers (never the button).
    stale = trust.verify(
        envelope(new_dispatch, payload(nonce="c3RhbGUtc3RhbGUtc3RhbGUtcw")), now=NOW + 86400
    )
    assert isinstance(stale, Rejected)
    assert stale.code == "unknown_key"
    assert "expired" in stale.detail


def test_a_key_list_not_from_the_authority_is_refused(trust: Trust) -> None:
    impostor = Ed25519PrivateKey.generate()
    envelope_ = sign_key_list(impostor, 9, [], iat=NOW, exp=NOW + 10)
    with pytest.raises(d.DocumentError) as refused:
        parse_key_list(json.dumps(envelope_), trust.authority.public_key())
    assert refused.value.code == "unknown_key"


# -- mutation fuzzing: nothing mutated is ever accepted ------------------------------------


FIELDS = ["type", "v", "iat", "exp", "action", "building", "cameras", "reason", "nonce"]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.lists(st.text(max_size=8), max_size=3),
    st.sampled_from(["start", "extend", "end", "all", BUILDING, "jefferson-high"]),
)


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_byte_mutations_of_a_valid_envelope_are_never_accepted(data: st.DataObject) -> None:
    trust = Trust()
    signed = sign_trigger(trust.principal, action="start", building=BUILDING, reason="r", now=NOW)
    original = json.dumps(signed).encode()
    at = data.draw(st.integers(0, len(original) - 1))
    how = data.draw(st.sampled_from(HOWS))
    byte = data.draw(st.integers(0, 255))
    mutant = mutate(original, at, how, byte)
    if mutant == original:
        return
    fresh = trust.verify(mutant)
    if isinstance(fresh, Accepted):
        # Only a respelling of the same envelope (JSON whitespace) can pass: the
        # same signed bytes by the same key, and so the same nonce: once.
        assert d.parse_envelope(mutant).payload == d.parse_envelope(original).payload
        assert isinstance(trust.verify(original), Rejected)
    else:
        assert fresh.code in ("malformed", "too_large", "unknown_key", "bad_signature")


@settings(max_examples=500, deadline=None)
@given(field=st.sampled_from([*FIELDS, "extra", "challenge"]), value=VALUES, resign=st.booleans())
def test_field_mutations_are_never_accepted(field: str, value: Any, resign: bool) -> None:
    trust = Trust()
    signed = json.loads(envelope(trust.principal, payload()))
    doc = payload()
    if value is None:
        doc.pop(field, None)
    else:
        doc[field] = value
    if doc == payload():
        return
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    # Either the original signature over the changed bytes, or a valid signature by
    # a key the device does not know.
    signer = Ed25519PrivateKey.generate() if resign else None
    body = {
        "payload": d.b64url(data),
        "kid": kid(signer.public_key()) if signer else signed["kid"],
        "sig": d.b64url(signer.sign(data)) if signer else signed["sig"],
    }
    result = trust.verify(json.dumps(body))
    assert isinstance(result, Rejected)
    assert result.code in ("unknown_key", "bad_signature", "malformed", "too_large")


def test_a_flood_of_challenges_cancels_none_already_given() -> None:
    """At the limit the oldest was given up: 64 anonymous requests cancelled the one a
    dispatcher was signing with (found by a review). Now new ones are refused, and one
    client may hold only a few."""
    challenges = Challenges(limit=8, per_client=4)
    mine = challenges.issue(0.0, "dispatch-desk")
    for i in range(7):
        challenges.issue(0.0, f"10.0.0.{i // 4}")
    with pytest.raises(ChallengesExhausted):
        challenges.issue(1.0, "10.0.0.9")
    assert challenges.valid(mine, 1.0)
    per_client = Challenges(limit=64, per_client=4)
    for _ in range(4):
        per_client.issue(0.0, "10.0.0.1")
    with pytest.raises(ChallengesExhausted):
        per_client.issue(0.0, "10.0.0.1")
    per_client.issue(0.0, "10.0.0.2")  # another client is not held back
    per_client.issue(CHALLENGE_TTL_S + 1, "10.0.0.1")  # expired ones free their place


def test_an_extend_or_end_may_name_its_session_and_a_start_may_not(trust: Trust) -> None:
    session = "20261128T133000Z-3f9a1c2e"
    named = trust.verify(envelope(trust.dispatch, payload(action="end", session=session)))
    assert isinstance(named, Accepted) and named.trigger.session == session
    for action, value, detail in [
        ("start", session, "only an extend or an end names a session"),
        ("end", "../etc", "payload.session: not of the form"),
        ("extend", "x" * 65, "payload.session: expected a string of 1..64"),
    ]:
        refused = trust.verify(envelope(trust.dispatch, payload(action=action, session=value)))
        assert isinstance(refused, Rejected) and refused.code == "malformed", refused
        assert detail in refused.detail


def test_an_end_for_an_emergency_that_is_over_never_ends_the_next(trust: Trust) -> None:
    """The race a session id closes: an end signed for emergency A arrives (late, or
    replayed where the cache cannot see it) after A ended and B began."""
    emergency = Emergency(BUILDING, 3600)
    cams = ("front-door",)
    first = emergency.press(NOW, "b1", "office", cams).session
    late_end = sign_trigger(
        trust.dispatch, action="end", building=BUILDING, reason="all clear", now=NOW,
        session=first.id,
    )  # fmt: skip
    assert emergency.end(NOW + 5, "ended by trigger") is not None
    second = emergency.press(NOW + 9, "b1", "office", cams).session
    verified = trust.verify(json.dumps(late_end), now=NOW + 10)
    assert isinstance(verified, Accepted)
    outcome = apply_trigger(emergency, verified.trigger, now=NOW + 10, cameras=cams, via="api")
    assert (outcome.status, outcome.body["error"]) == (409, "no_session")
    assert (
        first.id in outcome.body["detail"] and "another session is open" in outcome.body["detail"]
    )
    assert emergency.active is not None and emergency.active.id == second.id
    # The same end naming the open session ends it.
    end_b = sign_trigger(
        trust.dispatch, action="end", building=BUILDING, reason="all clear", now=NOW,
        session=second.id,
    )  # fmt: skip
    verified = trust.verify(json.dumps(end_b), now=NOW + 11)
    assert isinstance(verified, Accepted)
    outcome = apply_trigger(emergency, verified.trigger, now=NOW + 11, cameras=cams, via="api")
    assert outcome.accepted and outcome.body["session"] == second.id
    assert emergency.active is None


def test_a_trigger_naming_a_device_is_refused_by_the_buildings_others(trust: Trust) -> None:
    body = envelope(trust.dispatch, payload(device="dev-a"))

    def verify(device: str | None) -> Accepted | Rejected:
        return verify_trigger(
            body, building=BUILDING, keyring=trust.keyring, now=NOW, mono=0.0,
            replay=trust.replay, challenges=trust.challenges, device=device,
        )  # fmt: skip

    for other in ("dev-b", None):
        refused = verify(other)
        assert isinstance(refused, Rejected) and refused.code == "wrong_device", refused
        assert refused.detail == "trigger is for device 'dev-a'"
    assert trust.replay.nonces == {}  # refused before its nonce is spent
    accepted = verify("dev-a")
    assert isinstance(accepted, Accepted)
    malformed = trust.verify(envelope(trust.dispatch, payload(device="Dev A")))
    assert isinstance(malformed, Rejected) and malformed.code == "malformed"
