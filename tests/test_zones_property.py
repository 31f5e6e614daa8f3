"""Interior cameras are dark outside an ACTIVE session: a property over random events.

A hypothesis state machine drives the pure core the agent uses: button
presses, signed triggers from every role (through the real verifier),
expiry, restarts (the persisted state reloaded) and the passing of time. After
every step, the cameras the zone rule lets out (``cameras_to_stream``) are
checked against a model of the policy: interior cameras only while a session
is ACTIVE and names them; a session ends only by expiry or a dispatch or
superintendent end trigger; a second press never ends one.
"""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.config import CameraConfig
from agent.emergency import Emergency, State, share_session
from agent.policy import apply_trigger
from agent.zones import cameras_to_share, cameras_to_stream
from provisioning import documents as d
from provisioning.keys import raw_public
from provisioning.triggers import (
    Accepted,
    Challenges,
    Keyring,
    MemoryReplayCache,
    parse_key_list,
    sign_key_list,
    sign_trigger,
    verify_trigger,
)

BUILDING = "lincoln-elementary"
DURATION = 3600.0
CAMERAS = (
    CameraConfig("front-door", "exterior", "synthetic"),
    CameraConfig("hallway-2", "interior", "synthetic"),
    CameraConfig("gym", "interior", "synthetic"),
)
IDS = tuple(c.id for c in CAMERAS)
AUTHORITY = Ed25519PrivateKey.generate()
KEYS = {role: Ed25519PrivateKey.generate() for role in ("dispatch", "principal", "superintendent")}
T0 = 1_800_000_000.0


def keyring() -> Keyring:
    entries = [
        {"key": d.b64url(raw_public(k.public_key())), "role": r, "buildings": "all", "label": r}
        for r, k in KEYS.items()
    ]
    env = sign_key_list(AUTHORITY, 1, entries, iat=int(T0), exp=int(T0 + 10 * 86400))
    return Keyring(parse_key_list(json.dumps(env), AUTHORITY.public_key()))


class EmergencyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.emergency = Emergency(BUILDING, DURATION)
        self.keyring = keyring()
        self.replay = MemoryReplayCache()
        # The model: the open session's id, expiry and cameras, or None.
        self.model: tuple[str, float, tuple[str, ...]] | None = None

    def _trigger(self, role: str, action: str, cameras: str | list[str]) -> None:
        body = sign_trigger(
            KEYS[role], action=action, building=BUILDING, reason="r", now=int(self.now),
            cameras=cameras,
        )  # fmt: skip
        verdict = verify_trigger(
            body,
            building=BUILDING,
            keyring=self.keyring,
            now=self.now,
            mono=0.0,
            replay=self.replay,
            challenges=Challenges(),
        )
        may_act = role in ("dispatch", "superintendent") or action == "start"
        assert isinstance(verdict, Accepted) == may_act
        if not isinstance(verdict, Accepted):
            return
        outcome = apply_trigger(self.emergency, verdict.trigger, now=self.now, cameras=IDS, via="t")
        if action == "start":
            assert outcome.accepted
            if self.model is None:
                named = IDS if cameras == "all" else tuple(c for c in IDS if c in cameras)
                assert outcome.result is not None
                self.model = (outcome.result.session.id, self.now + DURATION, named)
        elif self.model is None:
            assert outcome.body["error"] == "no_session"
        elif action == "extend":
            sid, expires, named = self.model
            self.model = (sid, max(expires, self.now + DURATION), named)
        else:
            self.model = None

    @rule(button=st.sampled_from(["office", "gym", "room-12"]))
    def press(self, button: str) -> None:
        result = self.emergency.press(self.now, button, button.title(), IDS)
        if self.model is None:
            self.model = (result.session.id, self.now + DURATION, IDS)
        else:
            assert result.session.id == self.model[0]  # joined, never ended

    @rule(
        role=st.sampled_from(["dispatch", "principal", "superintendent"]),
        action=st.sampled_from(["start", "extend", "end"]),
        cameras=st.one_of(st.just("all"), st.lists(st.sampled_from(IDS), min_size=1, unique=True)),
    )
    def trigger(self, role: str, action: str, cameras: str | list[str]) -> None:
        self._trigger(role, action, cameras)

    @rule(seconds=st.floats(min_value=0.1, max_value=2 * DURATION))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.emergency.tick(self.now)
        if self.model is not None and self.now >= self.model[1]:
            self.model = None

    @rule()
    def restart(self) -> None:
        saved = json.loads(json.dumps(self.emergency.to_json()))
        self.emergency = Emergency.from_json(BUILDING, DURATION, saved)
        self.emergency.tick(self.now)
        if self.model is not None and self.now >= self.model[1]:
            self.model = None

    @invariant()
    def only_an_active_session_lets_interior_cameras_out(self) -> None:
        streamed = cameras_to_stream(CAMERAS, self.emergency.active)
        if self.model is None:
            assert self.emergency.state is State.IDLE
            assert streamed == ()
            return
        sid, expires, named = self.model
        active = self.emergency.active
        assert active is not None and active.id == sid
        assert active.expires_at == expires and self.now < expires
        assert tuple(c.id for c in streamed) == named
        assert all(c.zone == "exterior" or c.id in active.cameras for c in streamed)


EmergencyMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None
)
test_interior_cameras_stream_only_inside_an_active_session = EmergencyMachine.TestCase


@settings(max_examples=300, deadline=None)
@given(
    zones=st.lists(st.sampled_from(["exterior", "interior"]), min_size=1, max_size=6),
    named=st.sets(st.integers(0, 5)),
    policy=st.booleans(),
)
def test_a_share_never_carries_an_interior_camera(
    zones: list[str], named: set[int], policy: bool
) -> None:
    cameras = tuple(
        CameraConfig(f"cam-{i}", zone, "synthetic")  # type: ignore[arg-type]
        for i, zone in enumerate(zones)
    )
    shared = cameras_to_share(cameras, share_exterior=policy)
    assert all(c.zone == "exterior" for c in cameras if c.id in shared)
    assert policy or shared == ()
    # Even a share session that names interior cameras (a bug elsewhere) lets none out.
    session = share_session(BUILDING, T0, tuple(f"cam-{i}" for i in named), 1.0)
    assert all(c.zone == "exterior" for c in cameras_to_stream(cameras, session))
