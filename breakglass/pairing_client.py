"""The technician's side of pairing over a device's Local API (``provision pair``).

Before pairing, the technician has no pin for the device's self-signed
certificate (the mDNS ``fp`` is unauthenticated), so the TLS connection is
not verified by itself. The setup code does it: the device seals its
identity, including the pin of its certificate, under the SPAKE2 key, and
the client compares that pin with the certificate its own connection saw.
A proxy in the middle (terminating TLS with another certificate) is caught
there, and one that only relays cannot open or change what it relays.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from provisioning import documents as d
from provisioning.keys import kid, public_key_from_pem
from provisioning.pairing import PairingError, TechnicianPairing
from provisioning.tls import fingerprint, fingerprint_digest, pins_equal

TIMEOUT_S = 15.0
MAX_ANSWER = 512 * 1024  # a camera snapshot, sealed and base64


@dataclass(frozen=True, slots=True)
class PairedDevice:
    """A device the technician paired with: who it is, proven by the setup code."""

    device: str
    public_key_pem: str
    kid: str
    fingerprint: str
    url: str
    #: The device's state when paired (``provisioned``, ``enrollment_version``).
    provisioned: bool = False
    enrollment_version: int | None = None
    #: Its current enrollment certificate (an envelope), and its cameras (id, zone).
    certificate: dict[str, Any] | None = None
    cameras: tuple[tuple[str, str], ...] = ()
    #: The paired session and its channel (sealed requests: :func:`request`).
    session: str = field(default="", repr=False)
    channel: Any = field(default=None, repr=False, compare=False)


async def _seen_pin(base_url: str) -> str:
    """The pin of the certificate the server at ``base_url`` shows (not trusted yet)."""
    parts = urlsplit(base_url)
    if parts.scheme != "https" or not parts.hostname:
        raise PairingError("bad_url", f"{base_url!r}: expected https://HOST:PORT")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # verified below, by the code (module docstring)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            _, writer = await asyncio.open_connection(
                parts.hostname, parts.port or 443, ssl=context
            )
    except (OSError, TimeoutError) as exc:
        raise PairingError("unreachable", f"{base_url}: {exc}") from exc
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return fingerprint(der)


async def _post(
    http: aiohttp.ClientSession, url: str, pin: str, body: dict[str, Any]
) -> dict[str, Any]:
    """POST JSON to the server showing the certificate ``pin`` (and no other)."""
    try:
        async with http.post(
            url, json=body, ssl=aiohttp.Fingerprint(fingerprint_digest(pin))
        ) as response:
            raw = await response.content.read(MAX_ANSWER + 1)
    except aiohttp.ServerFingerprintMismatch as exc:
        raise PairingError("man_in_the_middle", f"{url}: the certificate changed") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PairingError("unreachable", f"{url}: {exc}") from exc
    try:
        answer = json.loads(raw)
    except ValueError as exc:
        raise PairingError("malformed", f"{url}: answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise PairingError("malformed", f"{url}: answer is not a JSON object")
    if "error" in answer:
        raise PairingError(str(answer["error"])[:64], str(answer.get("detail", ""))[:300])
    return answer


async def pair(base_url: str, device_id: str, code: str) -> PairedDevice:
    """Pair with the device at ``base_url`` (``https://HOST:PORT``) by its setup code."""
    base = base_url.rstrip("/")
    side = TechnicianPairing(code, device_id)
    seen = await _seen_pin(base)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        first = await _post(http, base + "/v1/pairing/start", seen, {"msg": d.b64url(side.start())})
        try:
            device_msg = d.b64url_decode(first.get("msg", ""), what="msg")
            device_confirm = d.b64url_decode(first.get("confirm", ""), what="confirm")
        except d.DocumentError as exc:
            raise PairingError("malformed", exc.detail) from exc
        confirm = side.finish(device_msg, device_confirm)  # wrong_code if not the device
        second = await _post(
            http,
            base + "/v1/pairing/confirm",
            seen,
            {"attempt": first.get("attempt", ""), "confirm": d.b64url(confirm)},
        )
    assert side.channel is not None
    try:
        box = d.b64url_decode(second.get("box", ""), what="box")
        identity = json.loads(side.channel.open(box))
        key = public_key_from_pem(identity["public_key"].encode("ascii"))
        device, pin = str(identity["device"]), str(identity["fp"])
    except (d.DocumentError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PairingError("malformed", f"the device's identity: {exc}") from exc
    if device != device_id:
        raise PairingError("wrong_device", f"paired with {device!r}, expected {device_id!r}")
    if not pins_equal(seen, pin):
        raise PairingError(
            "man_in_the_middle",
            f"the TLS certificate seen ({seen[:23]}...) is not the device's ({pin[:23]}...)",
        )
    version = identity.get("enrollment_version")
    certificate = identity.get("certificate")
    cameras = identity.get("cameras") or []
    return PairedDevice(
        device,
        identity["public_key"],
        kid(key),
        pin,
        base,
        provisioned=bool(identity.get("provisioned", False)),
        enrollment_version=version if isinstance(version, int) else None,
        certificate=certificate if isinstance(certificate, dict) else None,
        cameras=tuple((str(c["id"]), str(c["zone"])) for c in cameras if isinstance(c, dict)),
        session=str(second.get("session", "")),
        channel=side.channel,
    )


async def request(paired: PairedDevice, body: dict[str, Any]) -> dict[str, Any]:
    """Send one sealed request to a paired device; its opened answer (``{"ok": ...}``).

    Raises PairingError with the device's code when it refuses.
    """
    channel = paired.channel
    if channel is None or not paired.session:
        raise PairingError("no_session", "not paired")
    box = channel.seal(json.dumps(body).encode())
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        answer = await _post(
            http,
            paired.url + "/v1/pairing/channel",
            paired.fingerprint,
            {"session": paired.session, "box": d.b64url(box)},
        )
    try:
        opened = json.loads(channel.open(d.b64url_decode(answer.get("box", ""), what="box")))
    except (d.DocumentError, ValueError) as exc:
        raise PairingError("malformed", f"the device's answer: {exc}") from exc
    if not isinstance(opened, dict):
        raise PairingError("malformed", "the device's answer is not a JSON object")
    if "error" in opened:
        raise PairingError(str(opened["error"])[:64], str(opened.get("detail", ""))[:300])
    ok = opened.get("ok")
    if not isinstance(ok, dict):
        raise PairingError("malformed", "the device's answer has no result")
    return ok
