"""Checking an evidence bundle offline: every part, and that the footage is the device's.

:func:`verify_bundle` reads a bundle (the zip, or a folder it was unpacked
into) and reports a :class:`Finding` for each problem, naming the part:

0. the zip: laid out as the exporter writes it (its first member at offset
   0, members back to back, the central directory right after them, nothing
   after its end record; bytes before or between members are what a reader
   walking the zip from its start would take for the bundle), no member whose
   bytes run into the next one's (never read: a small zip of overlapping
   members made the verifier read hundreds of GB), and never more bytes read
   of all members together than the zip holds;
1. the members: none missing, none extra, none altered (SHA-256 and size
   against the manifest), no unsafe or repeated names, none compressed or
   encrypted (the exporter stores them: nothing else is read), every one with
   its place in the manifest (an MP4 no camera lists is never checked), and
   every one the manifest refers to (footage, checkpoints, keys, the audit
   excerpt) listed among its files and in the bundle;
2. the manifest's signature, with the receiver key given (``receiver_key``)
   or else the one in the bundle (a warning says it was not given), and the
   type of every field it has: checked before the members it lists are hashed;
3. the device key(s): the given one (``device_key``) must be the bundle's;
   with ``authority``, each must come with the district's enrollment
   certificate for this device, valid when the session opened;
4. the device's checkpoints: each signed by a trusted device key, its
   entries folding to its head (:func:`agent.chain.check`);
5. the footage: every sample of every MP4 (one video track, nothing else,
   shown as encoded: no display matrix but the identity, no crop or stretch),
   by its seq, against the entry the device signed (payload digest, keyframe
   flag), its timestamp against the signed capture time, the sample count
   against the manifest, and every frame the manifest lists verified; a
   sample no checkpoint covers is a failure too (nothing but the receiver
   vouches for it). Every seq a checkpoint of the bundle signed in the
   selected time range, every seq between a camera's files, and the seqs from
   the camera's signed first seq and to its signed last where the range
   covers them or the footage stops well short of the range's edge
   (:func:`receiver.evidence_format.bound_reasons`), is in the footage or
   declared missing (``gaps`` and ``holes``, both written by the receiver): a
   warning names each declared one, one left out without a word is a failure;
6. the audit excerpt: hash chain, and the device's signed audit checkpoints;
   from its signed entries, that the bundle holds every camera the device
   disclosed in the session (a camera left out of the export's selection is
   a warning) and none it did not, and no frame captured after the device
   ended the session. A bundle whose manifest says the device had signed the
   session's end (``selection.open_session`` false) fails without it.

What the device does not sign cannot be checked: which session a checkpoint
belongs to (it binds device, camera, seqs and capture times, not the
session), how long the pre-roll before the session's start was, and, of a
bundle exported before the device signed the session's end (or that says
so), whether its last checkpoints were left out together with their footage.

Errors mean a check failed; warnings are facts a reader should know (a key
taken from the bundle itself, footage declared lost, audit
entries not signed yet, an export of part of a session). At most
:data:`MAX_FINDINGS_PER_PART` findings are listed per part (then a count).
Sans-IO apart from reading the bundle.

This module is the entry point and runs the checks in order; the parts:

- :mod:`receiver.evidence_findings`: :class:`Finding`, :class:`VerifyReport`
  (findings bounded per part and in all);
- :mod:`receiver.evidence_zip`: the members, read from an untrusted zip or
  folder within limits (:class:`BundleInputError`: no bundle at all), and
  strict JSON;
- :mod:`receiver.evidence_manifest`: the manifest's fields type-checked, and
  the members against it (1);
- :mod:`receiver.evidence_keys`: the receiver's signature and the device keys
  to trust (2, 3);
- :mod:`receiver.evidence_footage`: the device's checkpoints, and the MP4s and
  seqs against them (4, 5);
- :mod:`receiver.evidence_audit`: the audit excerpt and what it signed of the
  session: its end, its cameras (6).

The layout of a bundle is :mod:`receiver.evidence_format`'s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from receiver.evidence_audit import check_audit, check_cameras
from receiver.evidence_findings import (
    MAX_FINDINGS,
    MAX_FINDINGS_PER_PART,
    Finding,
    VerifyReport,
    iso,
)
from receiver.evidence_footage import check_footage, signed_entries
from receiver.evidence_format import BUNDLE_TYPE, MANIFEST, safe_name
from receiver.evidence_keys import check_signature, trusted_device_keys
from receiver.evidence_manifest import (
    Manifest,
    check_files,
    check_references,
    check_roles,
    parse_manifest,
)
from receiver.evidence_zip import MAX_MANIFEST_BYTES, BundleInputError, MemberError, strict_json
from receiver.evidence_zip import Source as _Source

__all__ = [
    "MAX_FINDINGS",
    "MAX_FINDINGS_PER_PART",
    "BundleInputError",
    "Finding",
    "VerifyReport",
    "verify_bundle",
]


def verify_bundle(
    path: Path,
    *,
    device_key: Ed25519PublicKey | None = None,
    receiver_key: Ed25519PublicKey | None = None,
    authority: Ed25519PublicKey | None = None,
) -> VerifyReport:
    """Check a bundle offline. Raises :class:`BundleInputError` only when it cannot be read."""
    report = VerifyReport()
    source = _Source(Path(path))
    try:
        with tempfile.TemporaryDirectory(prefix="bg-verify-") as tmp:
            _verify(source, report, Path(tmp), device_key, receiver_key, authority)
    finally:
        source.close()
        report.finish()
    return report


def _verify(
    source: _Source,
    report: VerifyReport,
    tmp: Path,
    device_key: Ed25519PublicKey | None,
    receiver_key: Ed25519PublicKey | None,
    authority: Ed25519PublicKey | None,
) -> None:
    for problem in source.layout:
        report.fail("zip", problem)
    counts = source.counts
    for name in sorted(n for n, c in counts.items() if c > 1):
        report.fail(name, "appears more than once in the bundle (which one is the evidence?)")
    for name in sorted(counts):
        if not safe_name(name):
            report.fail(name, "not a plain relative name; not read")
    for name, why in sorted(source.refused.items()):
        report.fail(name, f"{why}; not read")
    if MANIFEST not in source.present:
        report.fail(MANIFEST, "missing: nothing can be checked")
        return
    try:
        body = source.read(MANIFEST, MAX_MANIFEST_BYTES)
        doc = strict_json(body)
        if not isinstance(doc, dict) or doc.get("type") != BUNDLE_TYPE:
            raise ValueError("not a breakglass evidence manifest")
    except (MemberError, ValueError) as exc:
        report.fail(MANIFEST, f"unreadable: {exc}")
        return
    manifest = parse_manifest(doc, report)
    report.session = manifest.session
    _selection(report, manifest)
    # The signature first: nothing is hashed for a manifest no one signed before it is said.
    check_signature(source, report, manifest, body, receiver_key)
    readable = check_files(source, report, manifest)
    check_references(source, report, manifest)
    keys = trusted_device_keys(source, report, manifest, device_key, authority)
    trail = check_audit(source, report, manifest, keys)
    signed = signed_entries(source, report, manifest, keys)
    check_footage(source, report, manifest, signed, readable, trail, tmp)
    if report.frames_verified != report.frames:
        report.fail(
            "footage",
            f"{report.frames_verified} of the {report.frames} frames the manifest lists were "
            "checked against the device's checkpoints: the rest are not the device's "
            "(missing, altered or not covered)",
        )
    check_cameras(report, manifest, trail)
    check_roles(report, manifest)


def _selection(report: VerifyReport, manifest: Manifest) -> None:
    """Facts of the export: part of a session is not all of it."""
    if manifest.open_session and manifest.closed:
        report.warn(
            "selection",
            "exported before the device signed the session's end (it signs its trail every "
            "minute and when it stops): a tail cut from every camera with its checkpoints "
            "could not be told; export it again to check that",
        )
    elif manifest.open_session:
        report.warn(
            "selection",
            "exported while the session was still streaming: what the device signed after "
            "that is not in it",
        )
    if manifest.from_us is not None or manifest.to_us is not None:
        start = "its start" if manifest.from_us is None else iso(manifest.from_us)
        end = "its end" if manifest.to_us is None else iso(manifest.to_us)
        report.warn(
            "selection", f"only the footage captured from {start} to {end} (the export's range)"
        )
