"""Enrollment certificates and revocation lists, signed by the district authority.

An enrollment certificate (``type: "enrollment"``, DESIGN.md "Signed
documents") binds a device id and its Ed25519 public key to a building, the
receiver it streams to (URL and TLS pin), the age recipients its footage is
sealed to, its retention and its camera zones. The device sends it in its
uplink ``hello``; a receiver that trusts the authority accepts any device
whose certificate verifies, is current, names this receiver and is not
revoked, with no hand-kept list. A higher ``version`` replaces an earlier
certificate of the same device (re-enrollment: a new building, rotated keys).

A revocation list (``type: "revocations"``) names devices (and their key ids)
that no receiver may accept any more: decommissioned or stolen. It has a
``version`` too; a receiver never goes back to an older list.

Pure: no files, no clocks (``now`` is passed in).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from provisioning import documents as d
from provisioning.documents import DocumentError
from provisioning.keys import kid as key_id
from provisioning.keys import raw_public

MAX_ENROLLMENT_PAYLOAD: Final = 16 * 1024
MAX_REVOCATIONS_PAYLOAD: Final = 256 * 1024
ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
PIN_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
AGE_RE: Final = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A verified enrollment certificate."""

    version: int
    iat: int
    exp: int
    device: str
    device_key: Ed25519PublicKey
    building: str
    receiver_url: str
    receiver_pin: str
    recipients: tuple[str, ...]
    retention_h: float
    cameras: Mapping[str, str]  # id -> zone
    envelope: Mapping[str, str]

    @property
    def device_kid(self) -> str:
        """The device key's id."""
        return key_id(self.device_key)


def _text(pattern: re.Pattern[str], max_len: int) -> d.Check:
    return lambda v, w: d.text(v, w, max_len=max_len, pattern=pattern)


def _key(value: Any, where: str) -> Ed25519PublicKey:
    raw = d.b64url_decode(value, what=where)
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise DocumentError("malformed", f"{where}: not a raw Ed25519 public key") from exc


def _receiver(value: Any, where: str) -> tuple[str, str]:
    if not isinstance(value, dict) or set(value) != {"url", "tls_pin"}:
        raise DocumentError("malformed", f"{where}: expected {{url, tls_pin}}")
    url = d.text(value["url"], f"{where}.url", max_len=256)
    if not url.startswith("wss://"):
        raise DocumentError("malformed", f"{where}.url: must be wss://")
    return url, d.text(value["tls_pin"], f"{where}.tls_pin", max_len=71, pattern=PIN_RE)


def _recipients(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= 8:
        raise DocumentError("malformed", f"{where}: expected 1..8 age recipients")
    return tuple(
        d.text(r, f"{where}[{i}]", max_len=62, pattern=AGE_RE) for i, r in enumerate(value)
    )


def _retention(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 24 * 365:
        raise DocumentError("malformed", f"{where}: hours in 1..8760")
    return float(value)


def _cameras(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, list) or len(value) > 64:
        raise DocumentError("malformed", f"{where}: expected a list of at most 64 cameras")
    cameras: dict[str, str] = {}
    for i, cam in enumerate(value):
        if not isinstance(cam, dict) or set(cam) != {"id", "zone"}:
            raise DocumentError("malformed", f"{where}[{i}]: expected {{id, zone}}")
        cid = d.text(cam["id"], f"{where}[{i}].id", max_len=32, pattern=ID_RE)
        if cid in cameras:
            raise DocumentError("malformed", f"{where}[{i}].id: listed twice")
        cameras[cid] = d.one_of(cam["zone"], f"{where}[{i}].zone", ("exterior", "interior"))
    return cameras


_FIELDS: Final[Mapping[str, d.Check]] = {
    "version": lambda v, w: d.integer(v, w, low=1, high=2**40),
    "device": _text(ID_RE, 32),
    "device_key": _key,
    "building": _text(ID_RE, 32),
    "receiver": _receiver,
    "recipients": _recipients,
    "retention_h": _retention,
    "cameras": _cameras,
}


def parse_enrollment(
    body: bytes | str | Mapping[str, Any], authority: Ed25519PublicKey, *, now: float | None
) -> Enrollment:
    """Verify an enrollment certificate (DocumentError: ``unknown_key``, ``bad_signature``,
    ``malformed``, ``expired``, ``not_yet_valid``).

    ``now=None`` skips the validity period: the device itself keeps running on an
    expired certificate (its buttons and buffer work; the receiver refuses it)."""
    envelope = d.open_signed(body, authority, what="enrollment", max_payload=MAX_ENROLLMENT_PAYLOAD)
    doc = d.read_payload(envelope, "enrollment", _FIELDS, frozenset())
    if doc["exp"] <= doc["iat"]:
        raise DocumentError("malformed", "payload.exp: not after iat")
    if now is None:
        pass
    elif now >= doc["exp"]:
        raise DocumentError(
            "expired",
            f"enrollment of {doc['device']} expired at {_utc(doc['exp'])} "
            f"(this clock says {_utc(now)})",
        )
    elif now < doc["iat"] - 60:
        # Most often this clock is wrong: a Pi has no real-time clock, and before NTP
        # syncs it runs on the time it last saved. Say so, with both times.
        raise DocumentError(
            "not_yet_valid",
            f"enrollment of {doc['device']} is valid from {_utc(doc['iat'])}, but this "
            f"clock says {_utc(now)}: if the clock is wrong (no network time yet), set it "
            "or let NTP sync, then try again",
        )
    url, pin = doc["receiver"]
    return Enrollment(
        doc["version"], doc["iat"], doc["exp"], doc["device"], doc["device_key"],
        doc["building"], url, pin, doc["recipients"], doc["retention_h"], doc["cameras"],
        envelope.as_json(),
    )  # fmt: skip


def certified_device_key(body: bytes | str | Mapping[str, Any]) -> Ed25519PublicKey:
    """The device key an enrollment certificate names, its signature NOT checked: for a
    device to see that its configuration points at the key it was certified with (the
    receiver verifies the certificate). DocumentError if it is not a certificate."""
    envelope = d.parse_envelope(body, max_payload=MAX_ENROLLMENT_PAYLOAD)
    key: Ed25519PublicKey = d.read_payload(envelope, "enrollment", _FIELDS, frozenset())[
        "device_key"
    ]
    return key


def sign_enrollment(
    authority: Ed25519PrivateKey,
    *,
    version: int,
    device: str,
    device_key: Ed25519PublicKey,
    building: str,
    receiver_url: str,
    receiver_pin: str,
    recipients: list[str],
    cameras: list[dict[str, str]],
    iat: int,
    exp: int,
    retention_h: float = 72,
) -> dict[str, str]:
    """Sign an enrollment certificate (``breakglass provision certify`` and ``enroll``)."""
    payload = {
        "type": "enrollment",
        "v": 1,
        "iat": iat,
        "exp": exp,
        "version": version,
        "device": device,
        "device_key": d.b64url(raw_public(device_key)),
        "building": building,
        "receiver": {"url": receiver_url, "tls_pin": receiver_pin},
        "recipients": recipients,
        "retention_h": retention_h,
        "cameras": cameras,
    }
    return d.seal(payload, authority, max_payload=MAX_ENROLLMENT_PAYLOAD)


# -- revocations -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Revocations:
    """A verified revocation list: device ids and device key ids no receiver accepts."""

    version: int
    exp: int
    devices: frozenset[str]
    kids: frozenset[str]

    def revoked(self, enrollment: Enrollment) -> bool:
        """Whether this certificate's device or key is on the list."""
        return enrollment.device in self.devices or enrollment.device_kid in self.kids


def _revoked(value: Any, where: str) -> list[tuple[str, str | None]]:
    if not isinstance(value, list) or len(value) > 10_000:
        raise DocumentError("malformed", f"{where}: expected a list of at most 10000 entries")
    out: list[tuple[str, str | None]] = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) not in ({"device"}, {"device", "kid"}):
            raise DocumentError("malformed", f"{where}[{i}]: expected {{device[, kid]}}")
        device = d.text(entry["device"], f"{where}[{i}].device", max_len=32, pattern=ID_RE)
        key_id = None
        if "kid" in entry:  # when present, a key id (never null)
            key_id = d.text(entry["kid"], f"{where}[{i}].kid", max_len=16, pattern=d.KID_RE)
        out.append((device, key_id))
    return out


def parse_revocations(
    body: bytes | str | Mapping[str, Any], authority: Ed25519PublicKey
) -> Revocations:
    """Verify a revocation list signed by the authority."""
    envelope = d.open_signed(
        body, authority, what="revocation list", max_payload=MAX_REVOCATIONS_PAYLOAD
    )
    doc = d.read_payload(
        envelope,
        "revocations",
        {"version": _FIELDS["version"], "revoked": _revoked},
        frozenset(),
    )
    pairs = doc["revoked"]
    return Revocations(
        doc["version"],
        doc["exp"],
        frozenset(p[0] for p in pairs),
        frozenset(p[1] for p in pairs if p[1] is not None),
    )


def sign_revocations(
    authority: Ed25519PrivateKey, version: int, revoked: list[dict[str, str]], *, iat: int, exp: int
) -> dict[str, str]:
    """Sign a revocation list (``revoked``: ``[{device}]`` or ``[{device, kid}]``: a device,
    every key it ever had, and with ``kid`` that key under any device id too)."""
    payload = {"type": "revocations", "v": 1, "iat": iat, "exp": exp, "version": version}
    return d.seal({**payload, "revoked": revoked}, authority, max_payload=MAX_REVOCATIONS_PAYLOAD)


def _utc(t: float) -> str:
    """``t`` (Unix seconds) as ISO-8601 UTC to the second, or as it is if out of range."""
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return repr(t)
