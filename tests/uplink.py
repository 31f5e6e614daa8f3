"""A device's side of the uplink handshake, for tests that speak the protocol by hand."""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from agent.uplink import UplinkClient
from provisioning.tls import fingerprint_digest

__all__ = ["UplinkTarget", "connect_device", "unconnected_uplink"]


def unconnected_uplink(**options: Any) -> UplinkClient:
    """An agent's uplink client that is never run (nothing listens at its address): for
    tests that drive its rules by hand."""
    return UplinkClient(
        url="wss://127.0.0.1:1/v1/uplink",
        origin="wss://127.0.0.1:1",
        pin="sha256:" + "00" * 32,
        device_id="device-1",
        device_key=Ed25519PrivateKey.generate(),
        **options,
    )


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
    features: str | None = None,
) -> tuple[aiohttp.ClientWebSocketResponse, p.Welcome]:
    """Connect pinned to ``target``'s certificate, answer its challenge as ``device``;
    ``features``: the upgrade request's :data:`agent.protocol.FEATURES_HEADER` (none: as
    an agent from before it)."""
    ws = await http.ws_connect(
        target.uplink_url,
        ssl=aiohttp.Fingerprint(fingerprint_digest(target.fingerprint)),
        max_msg_size=max_msg_size,
        headers={} if features is None else {p.FEATURES_HEADER: features},
    )
    challenge = conn.receive((await ws.receive(timeout=timeout)).data)
    assert isinstance(challenge, p.Challenge)
    sig = key.sign(p.hello_signed_bytes(challenge.nonce, target.origin))
    await ws.send_str(str(conn.send(p.Hello(device, p.b64url(sig)))))
    welcome = conn.receive((await ws.receive(timeout=timeout)).data)
    assert isinstance(welcome, p.Welcome)
    return ws, welcome
