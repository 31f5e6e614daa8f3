"""An evidence bundle's audit excerpt: its chain, and what the device signed of the session.

:func:`check_audit` follows the excerpt's hash chain and checks the device's
signed audit checkpoints in it; from the session's entries that a checkpoint
covers it gathers a :class:`Trail` (when the session started and ended, the
cameras it disclosed). The footage is checked against the session's end
(:mod:`receiver.evidence_footage`); :func:`check_cameras` checks the bundle's
cameras against the signed disclosures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import audit
from provisioning.documents import DocumentError, b64url_decode, canonical
from provisioning.keys import verify
from receiver.evidence_findings import VerifyReport
from receiver.evidence_format import NO_SESSION_SEQS, SessionSeqs, session_seqs
from receiver.evidence_manifest import Manifest, is_time
from receiver.evidence_zip import MemberError, Source, strict_json

__all__ = ["Trail", "check_audit", "check_cameras"]

MAX_AUDIT_LINE: Final = 4 * audit.MAX_LINE_BYTES
#: Why an ended session's bundle needs the device's signed session_end.
_END: Final = (
    "without it a tail cut from every camera (with its checkpoints) cannot be told "
    "(export again once the device has signed its trail, which it does every minute and "
    "when it stops)"
)


@dataclass(slots=True)
class Trail:
    """What the device's signed audit entries say about the session."""

    #: When it started and ended (its session_start, session_end entries), if signed.
    start_us: int | None = None
    end_us: int | None = None
    #: The cameras it disclosed (streamed) in the session; None: no disclosure signed.
    disclosed: set[str] | None = None
    #: Whether every disclosure entry of the session in the excerpt is signed.
    disclosures_signed: bool = True
    #: The cameras its session_start names (None: not signed).
    started: list[str] | None = None
    #: Each camera's first and last seq in the session, as its signed entries say.
    seqs: SessionSeqs = NO_SESSION_SEQS


class _Broken(Exception):
    """The excerpt cannot be trusted from this line on (the message says where and why)."""


def check_audit(
    source: Source,
    report: VerifyReport,
    manifest: Manifest,
    keys: dict[str, Ed25519PublicKey],
) -> Trail | None:
    """Check the excerpt; what its signed entries say of the session (None: nothing)."""
    name = manifest.audit
    if name is None:
        what = (
            "no audit entries of this session in the receiver's copy: the cameras and the "
            "session's end cannot be checked against the device's trail"
        )
        if manifest.open_session:
            report.warn("audit", what)
        else:
            report.fail("audit", f"{what}, and the bundle is of a session that ended: {_END}")
        return None
    if not source.holds(name):
        return None  # reported as missing (check_files, check_references)
    prev: str | None = None
    signed_through = 0
    first_n = last_n = 0
    mentions = 0
    #: (n, event, entry) of the session's own entries.
    mine: list[tuple[int, str, dict[str, Any]]] = []
    try:
        for number, raw in source.lines(name, MAX_AUDIT_LINE):
            if raw == b"":
                continue
            where = f"line {number}"
            try:
                if raw is None:
                    raise ValueError("too long")
                entry = strict_json(raw)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                digest = entry.pop("hash", None)
                if not isinstance(digest, str) or type(entry.get("n")) is not int:
                    raise ValueError("no entry number or hash")
                computed = hashlib.sha256(canonical(entry)).hexdigest()
            except (ValueError, RecursionError) as exc:
                raise _Broken(f"{where}: not an audit entry") from exc
            if computed != digest:
                raise _Broken(f"{where}: entry {entry['n']}: altered (its hash does not match)")
            if prev is not None and (entry.get("prev") != prev or entry["n"] != last_n + 1):
                raise _Broken(f"{where}: entry {entry['n']}: the chain is broken before it")
            prev, last_n = digest, entry["n"]
            first_n = first_n or last_n
            if entry.get("session") == manifest.session:
                mentions += 1
                if entry.get("event") in ("session_start", "session_end", "disclosure"):
                    mine.append((last_n, str(entry["event"]), entry))
            if entry.get("event") == audit.CHECKPOINT:
                if not _audit_checkpoint_ok(entry, last_n, keys):
                    raise _Broken(
                        f"{where}: audit checkpoint {last_n}: not signed by a trusted device key"
                    )
                signed_through = last_n
    except (MemberError, _Broken) as exc:
        report.fail(name, str(exc))
        return None
    if mentions == 0:
        report.fail(name, f"holds no entry of session {manifest.session}")
    if signed_through < last_n:
        first_unsigned = signed_through + 1 if signed_through else first_n
        report.warn(
            name,
            f"entries {first_unsigned}..{last_n} are not signed by the device yet "
            "(it signs its trail every minute and when it stops)",
        )
    return _session_facts(report, manifest, name, mine, signed_through)


def _audit_checkpoint_ok(entry: dict[str, Any], n: int, keys: dict[str, Ed25519PublicKey]) -> bool:
    kid, sig, covers, head = (entry.get(k) for k in ("kid", "sig", "covers", "head"))
    if not isinstance(kid, str) or not isinstance(sig, str) or not isinstance(head, str):
        return False
    key = keys.get(kid)
    if key is None or type(covers) is not int or covers != n - 1 or head != entry.get("prev"):
        return False
    try:
        signature = b64url_decode(sig, what="sig")
    except DocumentError:
        return False
    return verify(key, signature, audit.checkpoint_message(covers, head, kid))


def _session_facts(
    report: VerifyReport,
    manifest: Manifest,
    name: str,
    mine: list[tuple[int, str, dict[str, Any]]],
    signed_through: int,
) -> Trail:
    trail = Trail()
    for n, event, entry in mine:
        if n > signed_through:
            if event == "disclosure":
                trail.disclosures_signed = False
            continue
        where = f"entry {n} ({event})"
        if event != "session_start" and not _seqs_well_formed(entry, event):
            report.fail(name, f"{where}: its cameras' seqs are not whole numbers")
        if event == "session_start":
            cams = entry.get("cameras")
            if not isinstance(cams, list) or not all(isinstance(c, str) for c in cams):
                report.fail(name, f"{where}: its cameras are not a list of ids")
                continue
            trail.started = [*(trail.started or []), *cams]
            t = entry.get("t")
            if is_time(t) and trail.start_us is None:
                trail.start_us = round(t * 1e6)
        elif event == "disclosure":
            cams = entry.get("cameras")
            cams = cams if isinstance(cams, list) else [None]
            ids = [c.get("id") if isinstance(c, dict) else None for c in cams]
            if not all(isinstance(i, str) for i in ids):
                report.fail(name, f"{where}: its cameras are not a list of {{id, zone}}")
                continue
            if entry.get("device") != manifest.device:
                report.fail(
                    name,
                    f"{where}: the device disclosed as {str(entry.get('device'))[:80]}, "
                    f"the bundle is of {manifest.device}",
                )
            trail.disclosed = (trail.disclosed or set()) | {str(i) for i in ids}
        elif event == "session_end":
            t = entry.get("t")
            if is_time(t):
                end_us = round(t * 1e6)
                trail.end_us = end_us if trail.end_us is None else max(trail.end_us, end_us)
    trail.seqs = session_seqs(entry for n, _, entry in mine if n <= signed_through)
    if trail.end_us is None and not manifest.open_session:
        # Whatever session.closed_at says (the receiver writes it): the manifest says the
        # session was no longer streaming, so the device signed its end.
        report.fail(
            name,
            "the session's end is not among the device's signed entries, though the "
            f"manifest says the session was not streaming any more: {_END}",
        )
    elif trail.end_us is None and manifest.closed:
        report.warn(
            name,
            "the session's end is not among the device's signed entries: the footage's "
            "capture times cannot be checked against it",
        )
    return trail


def _seqs_well_formed(entry: dict[str, Any], event: str) -> bool:
    """Whether a disclosure's ``first`` or a session_end's ``last`` seqs, where given,
    are seqs (an older agent gives none; a session_end's camera list may be null)."""
    cams = entry.get("cameras")
    field, low = ("first", 0) if event == "disclosure" else ("last", -1)
    if not isinstance(cams, list):
        return cams is None
    return all(
        not isinstance(c, dict) or field not in c or (type(c[field]) is int and c[field] >= low)
        for c in cams
    )


def check_cameras(report: VerifyReport, manifest: Manifest, trail: Trail | None) -> None:
    """The bundle's cameras against those the device disclosed in the session (signed)."""
    if trail is None:
        return
    if trail.disclosed is None:
        report.warn(
            manifest.audit or "audit",
            "no signed disclosure of the session in the excerpt: whether the bundle holds "
            "every camera of the session cannot be checked",
        )
        return
    have = {c.id for c in manifest.cameras}
    for cam in sorted(trail.disclosed - have):
        if manifest.selected is not None and cam not in manifest.selected:
            report.warn(
                f"camera {cam}",
                "streamed in the session (the device's signed disclosure), not in this "
                f"bundle: the export selected only {', '.join(manifest.selected)}",
            )
        else:
            report.fail(
                f"camera {cam}",
                "streamed in the session (the device's signed disclosure): its footage is "
                "missing from the bundle",
            )
    for cam in sorted(have - trail.disclosed):
        say = report.fail if trail.disclosures_signed else report.warn
        say(f"camera {cam}", "not a camera the device disclosed in this session (signed)")
    for cam in sorted(set(trail.started or []) - trail.disclosed):
        report.warn(
            f"camera {cam}",
            "named by the session's start, but the device streamed none of its footage",
        )
