"""A device's side of the uplink handshake, for tests that speak the protocol by hand."""

from __future__ import annotations

from typing import Protocol

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from provisioning.tls import fingerprint_digest

__all__ = ["UplinkTarget", "connect_device"]


class UplinkTarget(Protocol):
    """A receiver (or what stands in for one): where and how to reach its uplink."""

    @property
    def uplink_url(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def origin(self) -> str: ...


async def connect_device(
    http: aiohttp.ClientSession,
    target: UplinkTarget,
    conn: p.Uplink,
    key: Ed25519PrivateKey,
    device: str,
    *,
    max_msg_size: int = 4 * 1024 * 1024,
    timeout: float = 10,
) -> tuple[aiohttp.ClientWebSocketResponse, p.Welcome]:
    """Connect pinned to ``target``'s certificate, answer its challenge as ``device``."""
    ws = await http.ws_connect(
        target.uplink_url,
        ssl=aiohttp.Fingerprint(fingerprint_digest(target.fingerprint)),
        max_msg_size=max_msg_size,
    )
    challenge = conn.receive((await ws.receive(timeout=timeout)).data)
    assert isinstance(challenge, p.Challenge)
    sig = key.sign(p.hello_signed_bytes(challenge.nonce, target.origin))
    await ws.send_str(str(conn.send(p.Hello(device, p.b64url(sig)))))
    welcome = conn.receive((await ws.receive(timeout=timeout)).data)
    assert isinstance(welcome, p.Welcome)
    return ws, welcome
