"""Pairing by setup code over the agent's real HTTPS Local API (issue #5)."""

from __future__ import annotations

import asyncio
import json
import ssl
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import write_agent_config
from breakglass.pairing_client import pair
from provisioning.keys import kid
from provisioning.pairing import PairingError, normalise_code
from provisioning.tls import ensure_certificate, server_context
from receiver.server import Receiver

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def agent(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Agent]:
    path = write_agent_config(tmp_path / "agent", receiver, preroll_s=1)
    async with Agent(load_config(path)) as running:
        yield running


def setup_code(agent: Agent) -> str:
    label = agent.config.state_dir / "setup-code"
    assert stat.S_IMODE(label.stat().st_mode) == 0o600
    return normalise_code(label.read_text())


def audit(agent: Agent) -> list[dict[str, object]]:
    agent.audit.flush()  # what is queued, written
    path = agent.config.state_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_the_right_code_pairs_once_and_proves_the_device(agent: Agent) -> None:
    api = agent.local_api
    assert api is not None
    device = await pair(api.url, agent.config.device_id, setup_code(agent))
    assert device.kid == kid(agent.device_public_key)
    assert device.fingerprint == api.fingerprint
    with pytest.raises(PairingError) as closed:
        await pair(api.url, agent.config.device_id, setup_code(agent))
    assert closed.value.code == "pairing_closed"
    trail = audit(agent)
    assert [e["event"] for e in trail if str(e["event"]).startswith("pair")] == [
        "pairing_attempt",
        "paired",
        "pairing_refused",
    ]
    assert setup_code(agent) not in json.dumps(trail)


async def test_a_wrong_code_fails_and_the_next_try_must_wait(agent: Agent) -> None:
    api = agent.local_api
    assert api is not None
    code = setup_code(agent)
    wrong = f"{(int(code) + 1) % 10**8:08d}"
    with pytest.raises(PairingError) as refused:
        await pair(api.url, agent.config.device_id, wrong)
    assert refused.value.code == "wrong_code"
    with pytest.raises(PairingError) as paused:
        await pair(api.url, agent.config.device_id, code)
    assert paused.value.code == "rate_limited"


async def test_pairing_closes_when_its_window_ends(agent: Agent) -> None:
    api = agent.local_api
    assert api is not None and api.pairing is not None
    api.pairing.mono = lambda: time.monotonic() + 15 * 60  # fifteen minutes later
    with pytest.raises(PairingError) as closed:
        await pair(api.url, agent.config.device_id, setup_code(agent))
    assert closed.value.code == "pairing_closed"


async def test_a_proxy_in_the_middle_is_caught_and_learns_nothing(
    agent: Agent, tmp_path: Path
) -> None:
    """The proxy terminates TLS with its own certificate and relays every request."""
    api = agent.local_api
    assert api is not None
    seen: list[bytes] = []
    client_tls = ssl.create_default_context()
    client_tls.check_hostname, client_tls.verify_mode = False, ssl.CERT_NONE

    async def relay(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(body)
        async with (
            aiohttp.ClientSession() as http,
            http.post(api.url + request.path, data=body, ssl=client_tls) as answer,
        ):
            data = await answer.read()
            seen.append(data)
            return web.Response(body=data, status=answer.status, content_type="application/json")

    cert, key = tmp_path / "mitm.crt", tmp_path / "mitm.key"
    ensure_certificate(cert, key, common_name="not the device", hosts=["127.0.0.1"])
    app = web.Application()
    app.router.add_post("/v1/pairing/{step}", relay)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(cert, key))
    await site.start()
    port = runner.addresses[0][1]
    try:
        with pytest.raises(PairingError) as caught:
            await pair(f"https://127.0.0.1:{port}", agent.config.device_id, setup_code(agent))
        assert caught.value.code == "man_in_the_middle"
    finally:
        await runner.cleanup()
    code = setup_code(agent)
    assert len(seen) == 4  # it relayed both steps
    assert not any(code.encode() in part for part in seen)


async def test_the_technician_cli_pairs_and_writes_what_the_code_proved(
    agent: Agent, tmp_path: Path
) -> None:
    api = agent.local_api
    assert api is not None
    out = tmp_path / "paired.json"
    args = ["provision", "pair", "--to", api.url, "--device", agent.config.device_id]

    async def run(code: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "breakglass", *args, "--setup-code", code, "--out", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await proc.communicate()
        return proc.returncode or 0, output.decode()

    code = setup_code(agent)
    wrong = f"{(int(code) + 7) % 10**8:08d}"
    assert api.pairing is not None
    api.pairing.window.retry_after_s = 0  # the pause after a wrong code is tested above
    status, text = await run(wrong)
    assert status == 1 and "wrong_code" in text
    status, text = await run(code[:4] + "-" + code[4:])
    assert status == 0, text
    paired = json.loads(out.read_text())
    assert paired["kid"] == kid(agent.device_public_key)
    assert paired["fingerprint"] == api.fingerprint
