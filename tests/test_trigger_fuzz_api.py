"""Mutated trigger envelopes against the running agent's HTTPS API (hypothesis).

After one valid start trigger, no mutation of it (byte by byte, field by
field) is ever accepted, and the API never answers 5xx. The agent runs on its
own event-loop thread so hypothesis can drive it example by example.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import write_agent_config
from provisioning import documents as d
from provisioning.keys import kid
from provisioning.tls import fingerprint_digest
from receiver.server import Receiver
from tests.mutations import HOWS, mutate
from tests.trust import enrol_roles

T = TypeVar("T")
pytestmark = pytest.mark.timeout(300)


class Running:
    """A receiver and an agent on an event loop in a thread of their own."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop")
        self.thread.start()
        self.receiver = Receiver(tmp_path / "receiver", "127.0.0.1", 0)
        self.run(self.receiver.__aenter__())
        path = write_agent_config(tmp_path / "agent", self.receiver, preroll_s=1)
        self.keys = enrol_roles(tmp_path / "agent")
        self.agent = Agent(load_config(path))
        self.run(self.agent.__aenter__())
        api = self.agent.local_api
        assert api is not None
        api.triggers_per_s = api.burst = 1e9  # the rate limit is tested elsewhere
        self.url = api.url + "/v1/triggers"
        self.pin = aiohttp.Fingerprint(fingerprint_digest(api.fingerprint))
        self.http = self.run(self._session())

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def post(self, body: bytes) -> tuple[int, Any]:
        async def go() -> tuple[int, Any]:
            async with self.http.post(self.url, data=body, ssl=self.pin) as response:
                return response.status, await response.read()

        return self.run(go())

    def close(self) -> None:
        self.run(self.http.close())
        self.run(self.agent.__aexit__(None, None, None))
        self.run(self.receiver.__aexit__(None, None, None))
        self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Running, bytes]]:
    env = Running(tmp_path)
    try:
        original = env.keys.trigger("principal", "start").encode()
        status, _ = env.post(original)
        assert status == 202  # used once: from now on nothing like it may pass
        yield env, original
    finally:
        env.close()


FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=st.data())
def test_byte_mutations_are_refused_and_never_5xx(
    running: tuple[Running, bytes], data: st.DataObject
) -> None:
    env, original = running
    at = data.draw(st.integers(0, len(original) - 1))
    how = data.draw(st.sampled_from(HOWS))
    byte = data.draw(st.integers(0, 255))
    mutant = mutate(original, at, how, byte)
    status, body = env.post(mutant)
    assert status < 500, body
    assert status != 202, (mutant, body)
    assert json.loads(body)["error"]


@FUZZ
@given(
    field=st.sampled_from(
        ["type", "v", "iat", "exp", "action", "building", "cameras", "reason", "nonce", "x"]
    ),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=64),
        st.lists(st.text(max_size=8), max_size=4),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    ),
    resign=st.booleans(),
)
def test_field_mutations_are_refused_and_never_5xx(
    running: tuple[Running, bytes], field: str, value: Any, resign: bool
) -> None:
    env, original = running
    signed = json.loads(original)
    doc = json.loads(d.parse_envelope(original).payload)
    if value is None:
        doc.pop(field, None)
    else:
        doc[field] = value
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    if resign:  # a valid signature by a key the device does not know
        stranger = Ed25519PrivateKey.generate()
        envelope = {
            "payload": d.b64url(data),
            "kid": kid(stranger.public_key()),
            "sig": d.b64url(stranger.sign(data)),
        }
    else:  # the enrolled key's signature, over other bytes
        envelope = {**signed, "payload": d.b64url(data)}
    status, body = env.post(json.dumps(envelope).encode())
    assert status < 500, body
    assert status != 202, (doc, body)
