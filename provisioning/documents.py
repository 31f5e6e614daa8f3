"""Signed documents: canonical JSON, the envelope, strict schemas (DESIGN.md).

An envelope is ``{"payload": b64url(payload), "kid": "...", "sig": b64url(sig)}``
with ``sig = Ed25519(payload bytes exactly as sent)``. A verifier checks the
signature first and parses the payload only afterwards (:func:`open_envelope`
then :func:`read_payload`), so a forger never reaches the JSON parser with
bytes the key holder did not sign.

Any signer that can produce an Ed25519 signature over bytes can sign, e.g.
``openssl pkeyutl -sign -rawin -inkey key.pem -in payload.json`` (README).

Everything here is pure: no files, no clocks. Errors are :class:`DocumentError`
with a stable ``code`` (``malformed`` or ``too_large``) and a detail naming the
field.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from provisioning.keys import kid as key_id
from provisioning.keys import verify

#: DESIGN.md: a signed trigger is at most 4 KiB (other documents pass their own limit).
MAX_PAYLOAD_BYTES: Final = 4096
#: What an envelope adds to its payload: base64 (4/3), kid, signature, JSON syntax.
ENVELOPE_OVERHEAD: Final = 256
KID_RE: Final = re.compile(r"^[0-9a-f]{16}$")
_B64URL_RE: Final = re.compile(r"^[A-Za-z0-9_-]*$")


class DocumentError(ValueError):
    """A document that cannot be accepted; ``code`` is stable, ``detail`` says where."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def canonical(obj: Mapping[str, Any]) -> bytes:
    """UTF-8 JSON, keys sorted, separators ``,`` and ``:``, no insignificant whitespace."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, what: str) -> bytes:
    """Strict base64url without padding: one spelling per byte string."""
    if not isinstance(text, str) or not _B64URL_RE.match(text) or len(text) % 4 == 1:
        raise DocumentError("malformed", f"{what}: not base64url without padding")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise DocumentError("malformed", f"{what}: not base64url") from exc
    if b64url(data) != text:  # non-zero padding bits: a second spelling of the same bytes
        raise DocumentError("malformed", f"{what}: not canonical base64url")
    return data


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed envelope whose signature is not checked yet."""

    payload: bytes
    kid: str
    sig: bytes

    def as_json(self) -> dict[str, str]:
        """The envelope as sent (to keep or pass on)."""
        return {"payload": b64url(self.payload), "kid": self.kid, "sig": b64url(self.sig)}


def envelope_limit(max_payload: int) -> int:
    """The largest envelope (bytes) that can carry a payload of ``max_payload`` bytes."""
    return (max_payload * 4 + 2) // 3 + ENVELOPE_OVERHEAD


def seal(
    payload: Mapping[str, Any], key: Ed25519PrivateKey, *, max_payload: int = MAX_PAYLOAD_BYTES
) -> dict[str, str]:
    """Sign ``payload`` (canonical JSON) into an envelope."""
    data = canonical(payload)
    if len(data) > max_payload:
        raise DocumentError("too_large", f"payload is {len(data)} bytes, limit {max_payload}")
    return {"payload": b64url(data), "kid": key_id(key.public_key()), "sig": b64url(key.sign(data))}


def parse_envelope(
    body: bytes | str | Mapping[str, Any], *, max_payload: int = MAX_PAYLOAD_BYTES
) -> Envelope:
    """The envelope's parts, size-checked; the payload stays opaque bytes."""
    if isinstance(body, Mapping):
        doc: Any = body
    else:
        raw = body.encode("utf-8") if isinstance(body, str) else body
        limit = envelope_limit(max_payload)
        if len(raw) > limit:
            raise DocumentError("too_large", f"envelope is {len(raw)} bytes, limit {limit}")
        doc = parse_json(raw, what="envelope")
    if not isinstance(doc, Mapping):
        raise DocumentError("malformed", "envelope: not a JSON object")
    extra = set(doc) - {"payload", "kid", "sig"}
    if extra:
        raise DocumentError("malformed", f"envelope: unknown field {sorted(extra)[0]!r}")
    for name in ("payload", "kid", "sig"):
        if not isinstance(doc.get(name), str):
            raise DocumentError("malformed", f"envelope.{name}: missing or not a string")
    if len(doc["payload"]) > (max_payload * 4 + 2) // 3:
        raise DocumentError("too_large", f"envelope.payload: larger than {max_payload} bytes")
    if not KID_RE.match(doc["kid"]):
        raise DocumentError("malformed", "envelope.kid: not 16 lowercase hex digits")
    payload = b64url_decode(doc["payload"], what="envelope.payload")
    if len(payload) > max_payload:
        raise DocumentError("too_large", f"payload is {len(payload)} bytes, limit {max_payload}")
    sig = b64url_decode(doc["sig"], what="envelope.sig")
    if len(sig) != 64:
        raise DocumentError("malformed", "envelope.sig: not a 64-byte Ed25519 signature")
    return Envelope(payload, doc["kid"], sig)


def open_signed(
    body: bytes | str | Mapping[str, Any], signer: Ed25519PublicKey, *, what: str, max_payload: int
) -> Envelope:
    """An envelope that ``signer`` (the one key allowed to sign ``what``) signed.

    DocumentError ``unknown_key`` when another key signed it, ``bad_signature``
    when the signature does not verify (and the envelope's own codes).
    """
    envelope = parse_envelope(body, max_payload=max_payload)
    if envelope.kid != key_id(signer):
        raise DocumentError("unknown_key", f"{what}: not signed by the district authority")
    if not signature_valid(envelope, signer):
        raise DocumentError("bad_signature", f"{what}: signature does not verify")
    return envelope


def signature_valid(envelope: Envelope, key: Ed25519PublicKey) -> bool:
    """Whether ``key`` signed the payload bytes exactly as sent."""
    return verify(key, envelope.sig, envelope.payload)


def parse_json(raw: bytes, *, what: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN or Infinity."""
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = exc.detail if isinstance(exc, DocumentError) else "not valid UTF-8 JSON"
        raise DocumentError("malformed", f"{what}: {detail}") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name, value in pairs:
        if name in doc:
            raise DocumentError("malformed", f"duplicate field {name!r}")
        doc[name] = value
    return doc


def _no_constant(name: str) -> Any:
    raise DocumentError("malformed", f"{name} is not JSON")


# -- strict schemas ---------------------------------------------------------------


Check = Callable[[Any, str], Any]


def read_payload(
    envelope: Envelope, doc_type: str, fields: Mapping[str, Check], optional: frozenset[str]
) -> dict[str, Any]:
    """The payload as a dict, every field checked; unknown or missing fields rejected.

    ``fields`` maps each field (besides ``type``, ``v``, ``iat``, ``exp``) to a
    check that returns the value (possibly normalised) or raises DocumentError.
    """
    doc = parse_json(envelope.payload, what="payload")
    if not isinstance(doc, dict):
        raise DocumentError("malformed", "payload: not a JSON object")
    if doc.get("type") != doc_type:
        raise DocumentError("malformed", f"payload.type: expected {doc_type!r}")
    if doc.get("v") != 1 or isinstance(doc.get("v"), bool):
        raise DocumentError("malformed", "payload.v: only schema version 1 is known")
    known = {"type", "v", "iat", "exp", *fields}
    extra = set(doc) - known
    if extra:
        raise DocumentError("malformed", f"payload: unknown field {sorted(extra)[0]!r}")
    out: dict[str, Any] = {"type": doc_type, "v": 1}
    for name in ("iat", "exp"):
        out[name] = integer(doc.get(name), f"payload.{name}", low=0, high=2**40)
    for name, check in fields.items():
        if name not in doc:
            if name in optional:
                continue
            raise DocumentError("malformed", f"payload.{name}: missing")
        out[name] = check(doc[name], f"payload.{name}")
    return out


def integer(value: Any, where: str, *, low: int, high: int) -> int:
    """An integer (not a bool, not a float) in ``[low, high]``."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DocumentError("malformed", f"{where}: expected an integer in [{low}, {high}]")
    return value


def text(value: Any, where: str, *, max_len: int, pattern: re.Pattern[str] | None = None) -> str:
    """A non-empty string of at most ``max_len`` characters, printable, matching ``pattern``."""
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise DocumentError("malformed", f"{where}: expected a string of 1..{max_len} characters")
    if not value.isprintable():
        raise DocumentError("malformed", f"{where}: control characters are not allowed")
    if pattern is not None and not pattern.match(value):
        raise DocumentError("malformed", f"{where}: not of the form {pattern.pattern}")
    return value


def one_of(value: Any, where: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise DocumentError("malformed", f"{where}: expected one of {', '.join(choices)}")
    return value
