"""Pairing by setup code over the agent's real HTTPS Local API (issue #5)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import write_agent_config
from breakglass.pairing_client import pair
from provisioning import documents as d
from provisioning.keys import kid
from provisioning.pairing import (
    MAX_FAILURES,
    MAX_MESSAGE_BYTES,
    RETRY_AFTER_FAILURE_S,
    SLOW_RETRY_S,
    PairingError,
    TechnicianPairing,
    normalise_code,
)
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


async def test_guesses_sent_at_once_get_one_answer(agent: Agent) -> None:
    """Each request used to pass the window's check while its body was on the way, and
    be counted only after: guesses sent at once were all answered (each answer tests
    one guess offline). Found by a review: 300 guesses in one window, code recovered."""
    api = agent.local_api
    assert api is not None and api.pairing is not None
    url = URL(api.url)
    code = setup_code(agent)
    device = agent.config.device_id
    guesses = [f"{(int(code) + 1 + i) % 10**8:08d}" for i in range(20)]
    bodies = [
        json.dumps({"msg": d.b64url(TechnicianPairing(g, device).start())}).encode()
        for g in guesses
    ]
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    conns = []
    for body in bodies:  # every request's head first, its body held back
        reader, writer = await asyncio.open_connection(url.host, url.port, ssl=tls)
        writer.write(
            b"POST /v1/pairing/start HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
        )
        await writer.drain()
        conns.append((reader, writer))
    async with (  # a round trip: the heads are in
        aiohttp.ClientSession() as http,
        http.get(api.url + "/v1/status", ssl=tls) as r,
    ):
        assert r.status == 200
    for (_, writer), body in zip(conns, bodies, strict=True):
        writer.write(body)
        await writer.drain()
    answers = []
    for reader, writer in conns:
        answers.append(json.loads((await reader.read()).partition(b"\r\n\r\n")[2]))
        writer.close()
    assert sum("confirm" in a for a in answers) == 1
    assert {a.get("error") for a in answers if "confirm" not in a} == {"rate_limited"}
    assert api.pairing.window.failures == 1


async def test_refusals_repeated_are_audited_once_with_their_count(agent: Agent) -> None:
    """Every refusal was an fsynced audit entry: 5,000 requests, 5,000 entries on the SD
    card (found by a review). Now once a minute per address, step and code."""
    api = agent.local_api
    assert api is not None and api.pairing is not None
    async with aiohttp.ClientSession() as http:
        for attempt in ("é", "x", "y", "z"):  # no such attempt (é: once a 500)
            body = {"attempt": attempt, "confirm": "AA"}
            async with http.post(api.url + "/v1/pairing/confirm", json=body, ssl=False) as r:
                assert (r.status, (await r.json())["error"]) == (409, "no_attempt")
    refused = [e for e in audit(agent) if e["event"] == "pairing_refused"]
    assert [(e["step"], e["code"]) for e in refused] == [("confirm", "no_attempt")]
    clock = api.pairing.mono
    api.pairing.mono = lambda: clock() + 61  # a minute later: the next one says how many
    async with (
        aiohttp.ClientSession() as http,
        http.post(api.url + "/v1/pairing/confirm", json={"attempt": "w"}, ssl=False) as r,
    ):
        assert r.status == 409
    refused = [e for e in audit(agent) if e["event"] == "pairing_refused"]
    assert [e.get("repeats") for e in refused] == [None, 3]


async def start_from(api_url: str, source: str, device: str, guess: str) -> tuple[int, Any]:
    """One ``POST /v1/pairing/start`` from the local address ``source`` (127.0.0.0/8)."""
    body = {"msg": d.b64url(TechnicianPairing(guess, device).start())}
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.post(api_url + "/v1/pairing/start", json=body, ssl=False) as r,
    ):
        return r.status, (await r.json()) | {"retry-after": r.headers.get("Retry-After")}


async def test_a_guesser_slows_only_itself_and_the_technician_pairs(agent: Agent) -> None:
    """Ten starts from any LAN host closed pairing for everyone until a restart (found by
    a review: the technician with the right code was refused ``pairing_closed``)."""
    api = agent.local_api
    assert api is not None and api.pairing is not None
    clock = [api.pairing.mono()]
    api.pairing.mono = lambda: clock[0]
    device, code = agent.config.device_id, setup_code(agent)
    answers = []
    for i in range(MAX_FAILURES + 2):  # no code known: any SPAKE2 message will do
        status, body = await start_from(api.url, "127.0.0.66", device, f"{i:08d}")
        answers.append(status if status != 200 else "ok")
        clock[0] += RETRY_AFTER_FAILURE_S + 0.1
    assert answers == ["ok"] * MAX_FAILURES + [429, 429]
    assert body["error"] == "rate_limited" and int(body["retry-after"]) > 200
    clock[0] += SLOW_RETRY_S  # five minutes later it may try once more
    assert (await start_from(api.url, "127.0.0.66", device, "00000042"))[0] == 200
    assert (await start_from(api.url, "127.0.0.66", device, "00000043"))[0] == 429
    # The technician, at another address, with the right code: no wait, no lockout.
    paired = await pair(api.url, device, code)
    assert paired.kid == kid(agent.device_public_key)
    attempts = [e for e in audit(agent) if e["event"] == "pairing_attempt"]
    assert [e["attempt"] for e in attempts] == [*range(1, MAX_FAILURES + 2), 1]


async def test_a_start_from_another_address_keeps_the_technicians_attempt(agent: Agent) -> None:
    """Attempts are kept per client: another address starting one between the
    technician's start and confirm does not replace the technician's."""
    api = agent.local_api
    assert api is not None and api.pairing is not None
    device, code = agent.config.device_id, setup_code(agent)
    side = TechnicianPairing(code, device)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            api.url + "/v1/pairing/start", json={"msg": d.b64url(side.start())}, ssl=False
        ) as r:
            first = await r.json()
        assert (await start_from(api.url, "127.0.0.66", device, "12345670"))[0] == 200
        confirm = side.finish(
            d.b64url_decode(first["msg"], what="msg"),
            d.b64url_decode(first["confirm"], what="confirm"),
        )
        body = {"attempt": first["attempt"], "confirm": d.b64url(confirm)}
        async with http.post(api.url + "/v1/pairing/confirm", json=body, ssl=False) as r:
            assert r.status == 200, await r.text()
            assert "box" in await r.json()


def tls_client() -> ssl.SSLContext:
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    return tls


async def post_in_pieces(
    url: str, path: str, pieces: list[bytes], *, length: int | None = None, pause: float = 0.05
) -> tuple[int, dict[str, Any]]:
    """POST over a raw TLS socket: the head, then each piece with a short pause between."""
    parsed = URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port, ssl=tls_client())
    size = sum(map(len, pieces)) if length is None else length
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: device\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (path.encode(), size)
    )
    answer = b""
    with contextlib.suppress(ConnectionError):  # it may answer (and close) before the end
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(pause)  # the deliberate gap in transit, not a wait for it
            writer.write(piece)
            await writer.drain()
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            answer += chunk
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_a_body_that_arrives_in_two_pieces_is_read_whole(agent: Agent) -> None:
    """``read(n)`` returns what has arrived so far: a start whose body came in two TLS
    records 50 ms apart was parsed half and refused ``malformed`` (found by a review)."""
    api = agent.local_api
    assert api is not None and api.pairing is not None
    side = TechnicianPairing(setup_code(agent), agent.config.device_id)
    body = json.dumps({"msg": d.b64url(side.start())}).encode()
    status, answer = await post_in_pieces(api.url, "/v1/pairing/start", [body[:20], body[20:]])
    assert status == 200, answer
    side.finish(  # the device answered this very message: the code checks out
        d.b64url_decode(answer["msg"], what="msg"),
        d.b64url_decode(answer["confirm"], what="confirm"),
    )


async def test_a_large_sealed_request_sent_in_chunks_reaches_the_device(agent: Agent) -> None:
    """An enrollment-sized request (about 200 KB, chunked, in pieces with a pause) is
    read whole: the device opens the box and answers it, sealed."""
    api = agent.local_api
    assert api is not None
    paired = await pair(api.url, agent.config.device_id, setup_code(agent))
    request = {"op": "no-such-op", "pad": "x" * 150_000}
    body = json.dumps(
        {
            "session": paired.session,
            "box": d.b64url(paired.channel.seal(json.dumps(request).encode())),
        }
    ).encode()
    assert 200_000 < len(body) < 2 * MAX_MESSAGE_BYTES

    async def pieces() -> AsyncIterator[bytes]:
        yield body[:1000]
        await asyncio.sleep(0.05)  # the deliberate gap in transit
        yield body[1000:]

    async with (
        aiohttp.ClientSession() as http,
        http.post(api.url + "/v1/pairing/channel", data=pieces(), ssl=False) as r,
    ):
        answer = await r.json()
    assert r.status == 200, answer
    opened = json.loads(paired.channel.open(d.b64url_decode(answer["box"], what="box")))
    assert opened["error"] == "malformed" and "op" in opened["detail"]  # about the op itself


async def test_a_body_too_large_or_too_slow_is_refused(agent: Agent) -> None:
    api = agent.local_api
    assert api is not None and api.pairing is not None
    async with asyncio.timeout(10):  # refused by its Content-Length, without waiting for it
        status, answer = await post_in_pieces(
            api.url, "/v1/pairing/start", [b"{"], length=10_000_000
        )
    assert (status, answer["error"]) == (413, "too_large")
    api.pairing.body_timeout_s = 0.2
    status, answer = await post_in_pieces(api.url, "/v1/pairing/start", [b'{"msg": "'], length=100)
    assert (status, answer["error"]) == (408, "timeout")
    assert api.pairing.window.failures == 0  # neither counted as an attempt
