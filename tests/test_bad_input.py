"""Bad input over the real TLS uplink: refused with a code, nothing else disturbed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import press_button, write_agent_config
from provisioning.keys import new_private_key, public_pem
from provisioning.tls import fingerprint_digest, server_context
from receiver import ingest
from receiver.server import Receiver
from tests.media import make_h264_packets
from tests.uplink import connect_device

pytestmark = pytest.mark.timeout(60)


def enroll(receiver: Receiver, tmp_path: Path, device: str) -> Ed25519PrivateKey:
    key = new_private_key(tmp_path / f"{device}.key")
    (receiver.devices_dir / f"{device}.pub").write_bytes(public_pem(key.public_key()))
    return key


class RawDevice:
    """A device speaking the protocol by hand, to send what a real agent never would."""

    def __init__(self, receiver: Receiver, key: Ed25519PrivateKey, device: str) -> None:
        self.receiver, self.key, self.device = receiver, key, device
        self.conn = p.Uplink(p.Role.AGENT)

    async def __aenter__(self) -> RawDevice:
        self.http = aiohttp.ClientSession()
        self.ws, _ = await connect_device(
            self.http, self.receiver, self.conn, self.key, self.device
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()

    async def open_session(self, session: str) -> list[tuple[bytes, bool]]:
        packets = make_h264_packets(10, width=160, height=120)
        extradata = packets[0][0][: packets[0][0].find(b"\x00\x00\x00\x01\x65")]
        desc = p.CameraDesc(0, "cam", "interior", "h264", 160, 120, 30.0, extradata, 0, 0)
        opened = p.SessionOpen(session, "bldg", {"kind": "test"}, 1.0, 2.0, (desc,))
        await self.ws.send_str(str(self.conn.send(opened)))
        return packets

    async def error_and_close(self) -> p.Error:
        """Read until the receiver's error, then expect the close."""
        while True:
            msg = await self.ws.receive(timeout=10)
            if msg.type is aiohttp.WSMsgType.TEXT:
                event = p.Uplink(p.Role.AGENT)
                event.phase = p.Phase.READY
                parsed = event.receive(msg.data)
                if isinstance(parsed, p.Error):
                    closing = await self.ws.receive(timeout=10)
                    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                    return parsed
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                raise AssertionError(f"closed without an error: {self.ws.close_code}")


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\x01\x00", "malformed"),
        (p.MEDIA_HEADER.pack(9, 0, 0, 0, 0, 1, 0), "bad_version"),
        (p.MEDIA_HEADER.pack(1, 0, 5, 0, 0, 1, 0), "unknown_camera"),
        ('{"type":"ack","session":"s","camera":0,"seq":1}', "unexpected"),
        ("{not json", "malformed"),
    ],
)
async def test_garbage_from_a_device_is_refused_with_its_code(
    tmp_path: Path, receiver: Receiver, message: bytes | str, code: str
) -> None:
    key = enroll(receiver, tmp_path, "dev-bad")
    async with RawDevice(receiver, key, "dev-bad") as dev:
        await dev.open_session("s-bad")
        if isinstance(message, bytes):
            await dev.ws.send_bytes(message)
        else:
            await dev.ws.send_str(message)
        error = await dev.error_and_close()
    assert error.code == code


async def test_oversized_message_is_cut_and_others_unaffected(
    tmp_path: Path, receiver: Receiver
) -> None:
    good_key = enroll(receiver, tmp_path, "dev-good")
    bad_key = enroll(receiver, tmp_path, "dev-flood")
    async with (
        RawDevice(receiver, good_key, "dev-good") as good,
        RawDevice(receiver, bad_key, "dev-flood") as bad,
    ):
        packets = await good.open_session("s-good")
        await bad.open_session("s-flood")
        await bad.ws.send_bytes(
            p.MEDIA_HEADER.pack(1, 0, 0, 0, 0, 1, 0) + bytes(p.MAX_PAYLOAD_BYTES + 1)
        )
        closing = await bad.ws.receive(timeout=10)
        while closing.type is aiohttp.WSMsgType.TEXT:  # the error, then the close
            closing = await bad.ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        # The good device streams on and gets its acks.
        for seq, (payload, key) in enumerate(packets):
            media = p.Media(p.MediaKind.LIVE, 0, seq, 1000 + seq * 33_333, key, False, payload)
            await good.ws.send_bytes(bytes(good.conn.send(media)))
        await good.ws.send_str(str(good.conn.send(p.SessionClose("s-good", "done"))))
        acked = -1
        while acked < len(packets) - 1:
            event = good.conn.receive((await good.ws.receive(timeout=10)).data)
            if isinstance(event, p.Ack):
                acked = max(acked, event.seq)
    assert acked == len(packets) - 1


async def test_agent_survives_a_receiver_that_sends_garbage(tmp_path: Path) -> None:
    """A receiver sending garbage: the agent says what was wrong, retries, and stays armed."""
    garbage_sent = asyncio.Event()

    async def hostile_uplink(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str('{"type":"challenge","nonce":"short"}')
        garbage_sent.set()
        await ws.receive()
        return ws

    rx_dir = tmp_path / "receiver"
    async with Receiver(rx_dir, "127.0.0.1", 0) as receiver:  # makes the certificate and port
        config = load_config(write_agent_config(tmp_path / "agent", receiver))
        port = receiver.port
    app = web.Application()
    app.router.add_get("/v1/uplink", hostile_uplink)
    runner = web.AppRunner(app)
    await runner.setup()
    tls = server_context(rx_dir / "tls" / "receiver.crt", rx_dir / "tls" / "receiver.key")
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        async with Agent(config) as agent:
            await garbage_sent.wait()
            await agent.uplink.wait_until(
                lambda: "malformed" in (agent.uplink.stats.last_error or "")
            )
            assert not agent.uplink.connected
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
            assert not any(b.closed for b in agent.buttons.values())
    finally:
        await runner.cleanup()


async def test_a_device_that_never_says_hello_is_told_why(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal named nothing: ``str(TimeoutError())`` is empty (found by a review)."""
    monkeypatch.setattr(ingest, "HANDSHAKE_TIMEOUT_S", 0.3)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            receiver.uplink_url, ssl=aiohttp.Fingerprint(fingerprint_digest(receiver.fingerprint))
        )
        conn = p.Uplink(p.Role.AGENT)
        assert isinstance(conn.receive((await ws.receive(timeout=10)).data), p.Challenge)
        error = conn.receive((await ws.receive(timeout=10)).data)  # and nothing sent
        await ws.close()
    assert isinstance(error, p.Error)
    assert (error.code, error.detail) == (
        "handshake_failed",
        "no hello within 0.3 s of the challenge",
    )
