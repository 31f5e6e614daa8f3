"""Whose keys an evidence bundle was signed with: the receiver's and the device's.

:func:`check_signature` checks the receiver's signature over the manifest,
with the key given or else the bundle's own (a warning says so).
:func:`trusted_device_keys` decides which device keys the footage and audit
checkpoints may be signed with: the one given, those the district's
authority certified for this device, or else the bundle's own (a warning).
"""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from provisioning.documents import DocumentError, b64url_decode
from provisioning.enrollment import parse_enrollment
from provisioning.errors import KeyFileError
from provisioning.keys import kid as key_id
from provisioning.keys import public_key_from_pem, raw_public, verify
from receiver.evidence_findings import VerifyReport
from receiver.evidence_format import MANIFEST, MANIFEST_CONTEXT, SIGNATURE
from receiver.evidence_manifest import Manifest
from receiver.evidence_zip import MAX_KEY_FILE, MemberError, Source, shallow, strict_json

__all__ = ["check_signature", "trusted_device_keys"]


def _load_key(source: Source, report: VerifyReport, name: str | None) -> Ed25519PublicKey | None:
    if name is None:
        return None  # reported as malformed
    if not source.holds(name):
        report.fail(name, "key file missing")
        return None
    try:
        return public_key_from_pem(source.read(name, MAX_KEY_FILE), where=name)
    except (KeyFileError, MemberError, ValueError, UnsupportedAlgorithm) as exc:
        report.fail(name, f"not an Ed25519 public key: {exc}")
        return None


def check_signature(
    source: Source,
    report: VerifyReport,
    manifest: Manifest,
    body: bytes,
    given: Ed25519PublicKey | None,
) -> None:
    """The receiver's signature over the manifest's bytes (``body``)."""
    bundled = _load_key(source, report, manifest.receiver)
    key = given or bundled
    if given is None:
        report.warn(
            "receiver.pub", "the receiver key is the bundle's own: pass --receiver-key to check it"
        )
    elif bundled is not None and raw_public(bundled) != raw_public(given):
        report.fail("receiver.pub", f"is key {key_id(bundled)}, not the given {key_id(given)}")
    if SIGNATURE not in source.present:
        report.fail(SIGNATURE, "missing: the manifest is not signed")
        return
    try:
        sig_doc = strict_json(source.read(SIGNATURE, MAX_KEY_FILE))
        if not isinstance(sig_doc, dict) or not isinstance(sig_doc.get("sig"), str):
            raise ValueError("not {kid, sig}")
        sig = b64url_decode(sig_doc["sig"], what="sig")
    except (MemberError, ValueError, DocumentError) as exc:
        report.fail(SIGNATURE, f"unreadable: {exc}")
        return
    if key is None or not verify(key, sig, MANIFEST_CONTEXT + body):
        report.fail(
            MANIFEST,
            "the receiver's signature does not verify: the manifest was altered "
            "(or signed by another key)",
        )


def trusted_device_keys(
    source: Source,
    report: VerifyReport,
    manifest: Manifest,
    given: Ed25519PublicKey | None,
    authority: Ed25519PublicKey | None,
) -> dict[str, Ed25519PublicKey]:
    """The device keys to trust, by kid (see the module's docstring)."""
    bundled: dict[str, Ed25519PublicKey] = {}
    certified: set[str] = set()
    for item in manifest.keys:
        key = _load_key(source, report, item.file)
        if key is None:
            continue
        kid = key_id(key)
        if kid != item.kid:
            report.fail(item.file, f"holds key {kid}, the manifest says {item.kid[:40]}")
        bundled[kid] = key
        cert = item.certificate
        if authority is not None and cert is not None and cert in source.present:
            try:
                raw = source.read(cert, MAX_KEY_FILE)
                shallow(raw)
                enrollment = parse_enrollment(raw, authority, now=manifest.opened_at)
            except DocumentError as exc:
                report.fail(cert, f"enrollment certificate refused: {exc.code}: {exc.detail}")
                continue
            except (MemberError, ValueError) as exc:
                report.fail(cert, f"enrollment certificate unreadable: {exc}")
                continue
            same_key = raw_public(enrollment.device_key) == raw_public(key)
            if enrollment.device != manifest.device or not same_key:
                report.fail(cert, "is not the certificate of this device and key")
                continue
            certified.add(kid)
    if given is not None:
        kid = key_id(given)
        if kid not in bundled:
            report.fail(
                "device", f"the bundle's device key(s) {sorted(bundled)} are not the given {kid}"
            )
        return {kid: given}
    if authority is not None:
        for kid in sorted(set(bundled) - certified):
            report.fail(f"device/{kid}.pub", "no enrollment certificate from the given authority")
        return {kid: bundled[kid] for kid in certified}
    report.warn("device", "the device key is the bundle's own: pass --device-key or --authority")
    return bundled
