"""Checking an evidence bundle offline: every part, and that the footage is the device's.

:func:`verify_bundle` reads a bundle (the zip, or a folder it was unpacked
into) and reports a :class:`Finding` for each problem, naming the part:

1. the members: none missing, none extra, none altered (SHA-256 and size
   against the manifest), no unsafe or repeated names;
2. the manifest's signature, with the receiver key given (``receiver_key``)
   or else the one in the bundle (a warning says it was not given);
3. the device key(s): the given one (``device_key``) must be the bundle's;
   with ``authority``, each must come with the district's enrollment
   certificate for this device, valid when the session opened;
4. the device's checkpoints: each signed by a trusted device key, its
   entries folding to its head (:func:`agent.chain.check`);
5. the footage: every sample of every MP4, by its seq, against the entry the
   device signed (payload digest, keyframe flag), its timestamp against the
   signed capture time, the sample count against the manifest; a sample no
   checkpoint covers is a failure too (nothing but the receiver vouches for it);
6. the audit excerpt: hash chain, and the device's signed audit checkpoints.

Errors mean a check failed; warnings are facts a reader should know (a key
taken from the bundle itself, footage the device declared lost, audit
entries not signed yet). Sans-IO apart from reading the bundle.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import av
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import audit, chain
from provisioning.documents import DocumentError, b64url_decode, canonical
from provisioning.enrollment import parse_enrollment
from provisioning.errors import KeyFileError
from provisioning.keys import kid as key_id
from provisioning.keys import public_key_from_pem, raw_public, verify
from receiver.custody import parse_record
from receiver.evidence_format import (
    BUNDLE_TYPE,
    MANIFEST,
    MANIFEST_CONTEXT,
    SIGNATURE,
    next_pts,
    read_mp4,
    safe_name,
)

__all__ = ["BundleInputError", "Finding", "VerifyReport", "verify_bundle"]

MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024
MAX_SMALL_FILE: Final = 256 * 1024 * 1024


class BundleInputError(ValueError):
    """The bundle cannot be read at all (not a zip or a folder, unreadable): exit 2."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem (``error``) or fact worth telling (a warning), and the part it concerns."""

    part: str
    what: str
    error: bool = True

    def __str__(self) -> str:
        return f"{'FAILED' if self.error else 'warning'}: {self.part}: {self.what}"


@dataclass(slots=True)
class VerifyReport:
    """What :func:`verify_bundle` found."""

    findings: list[Finding] = field(default_factory=list)
    session: str | None = None
    frames: int = 0
    frames_verified: int = 0
    checkpoints: int = 0
    files: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.error]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.error]

    @property
    def ok(self) -> bool:
        """No check failed."""
        return not self.errors

    def fail(self, part: str, what: str) -> None:
        self.findings.append(Finding(part, what))

    def warn(self, part: str, what: str) -> None:
        self.findings.append(Finding(part, what, error=False))


# -- reading a bundle ---------------------------------------------------------------------


class _Source:
    """The members of a bundle, from a zip or a folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.names = sorted(
                p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
            )
        elif path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise BundleInputError(f"{path}: not a zip file ({exc})") from exc
            self.names = [i.filename for i in self._zip.infolist() if not i.is_dir()]
        else:
            raise BundleInputError(f"{path}: no such file or folder")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def chunks(self, name: str) -> Iterator[bytes]:
        if self._zip is not None:
            with self._zip.open(name) as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
        else:
            with (self.path / name).open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk

    def read(self, name: str, limit: int = MAX_SMALL_FILE) -> bytes:
        """A member's bytes; ValueError if larger than ``limit`` or damaged in the zip."""
        data = bytearray()
        try:
            for chunk in self.chunks(name):
                data += chunk
                if len(data) > limit:
                    raise ValueError(f"larger than {limit} bytes")
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"damaged in the zip: {exc}") from exc
        return bytes(data)

    def local(self, name: str, folder: Path) -> Path:
        """A path to the member on disk (copied out of a zip; OSError if damaged there)."""
        if self._zip is None:
            return self.path / name
        dest = folder / name.replace("/", "__")
        with dest.open("wb") as out:
            try:
                for chunk in self.chunks(name):
                    out.write(chunk)
            except zipfile.BadZipFile as exc:
                raise OSError(f"damaged in the zip: {exc}") from exc
        return dest


def _sha256(source: _Source, name: str) -> tuple[str, int] | None:
    """SHA-256 and size of a member; None if the zip's own check (CRC) fails on it."""
    h, size = hashlib.sha256(), 0
    try:
        for chunk in source.chunks(name):
            h.update(chunk)
            size += len(chunk)
    except (zipfile.BadZipFile, OSError):
        return None
    return h.hexdigest(), size


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
    return report


def _verify(
    source: _Source,
    report: VerifyReport,
    tmp: Path,
    device_key: Ed25519PublicKey | None,
    receiver_key: Ed25519PublicKey | None,
    authority: Ed25519PublicKey | None,
) -> None:
    names = source.names
    for name in sorted({n for n in names if names.count(n) > 1}):
        report.fail(name, "appears more than once in the bundle (which one is the evidence?)")
    for name in names:
        if not safe_name(name):
            report.fail(name, "not a plain relative name; not read")
    if MANIFEST not in names:
        report.fail(MANIFEST, "missing: nothing can be checked")
        return
    try:
        body = source.read(MANIFEST, MAX_MANIFEST_BYTES)
        manifest = json.loads(body)
        if not isinstance(manifest, dict) or manifest.get("type") != BUNDLE_TYPE:
            raise ValueError("not a breakglass evidence manifest")
    except ValueError as exc:
        report.fail(MANIFEST, f"unreadable: {exc}")
        return
    session = _obj(manifest.get("session"))
    report.session = str(session.get("id"))
    _check_files(source, report, manifest)
    _check_signature(source, report, manifest, body, receiver_key)
    keys = _trusted_device_keys(source, report, manifest, device_key, authority)
    signed = _checkpoints(source, report, manifest, keys)
    _footage(source, report, manifest, signed, tmp)
    _audit(source, report, manifest, keys)


def _check_files(source: _Source, report: VerifyReport, manifest: dict[str, Any]) -> None:
    """Missing, altered and extra members."""
    files = manifest.get("files")
    if not isinstance(files, list):
        report.fail(MANIFEST, "lists no files")
        return
    present = set(source.names)
    expected: set[str] = set()
    for item in files:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            report.fail(MANIFEST, "a file entry is malformed")
            continue
        name = item["path"]
        expected.add(name)
        if name not in present:
            report.fail(name, "missing (listed in the manifest, not in the bundle)")
            continue
        if not safe_name(name):
            continue
        found = _sha256(source, name)
        if found is None:
            report.fail(name, "altered: its bytes no longer match the zip's own checksum")
            continue
        digest, size = found
        if digest != item.get("sha256") or size != item.get("size"):
            report.fail(
                name,
                f"altered: SHA-256 {digest[:16]}... ({size} bytes), the manifest says "
                f"{str(item.get('sha256'))[:16]}... ({item.get('size')} bytes)",
            )
    for name in sorted(present - expected - {MANIFEST, SIGNATURE}):
        report.fail(name, "extra: not listed in the manifest")
    report.files = len(expected)


def _load_key(source: _Source, report: VerifyReport, name: Any) -> Ed25519PublicKey | None:
    if not isinstance(name, str) or name not in source.names or not safe_name(name):
        report.fail(str(name), "key file missing")
        return None
    try:
        return public_key_from_pem(source.read(name, 64 * 1024), where=name)
    except (KeyFileError, ValueError) as exc:
        report.fail(name, f"not an Ed25519 public key: {exc}")
        return None


def _check_signature(
    source: _Source,
    report: VerifyReport,
    manifest: dict[str, Any],
    body: bytes,
    given: Ed25519PublicKey | None,
) -> None:
    info = _obj(manifest.get("receiver"))
    bundled = _load_key(source, report, info.get("file"))
    key = given or bundled
    if given is None:
        report.warn(
            "receiver.pub", "the receiver key is the bundle's own: pass --receiver-key to check it"
        )
    elif bundled is not None and raw_public(bundled) != raw_public(given):
        report.fail("receiver.pub", f"is key {key_id(bundled)}, not the given {key_id(given)}")
    if SIGNATURE not in source.names:
        report.fail(SIGNATURE, "missing: the manifest is not signed")
        return
    try:
        sig_doc = json.loads(source.read(SIGNATURE, 64 * 1024))
        sig = b64url_decode(sig_doc["sig"], what="sig")
    except (ValueError, KeyError, TypeError, DocumentError) as exc:
        report.fail(SIGNATURE, f"unreadable: {exc}")
        return
    if key is None or not verify(key, sig, MANIFEST_CONTEXT + body):
        report.fail(
            MANIFEST,
            "the receiver's signature does not verify: the manifest was altered "
            "(or signed by another key)",
        )


def _trusted_device_keys(
    source: _Source,
    report: VerifyReport,
    manifest: dict[str, Any],
    given: Ed25519PublicKey | None,
    authority: Ed25519PublicKey | None,
) -> dict[str, Ed25519PublicKey]:
    device_info = _obj(manifest.get("device"))
    device = str(device_info.get("id"))
    session = _obj(manifest.get("session"))
    bundled: dict[str, Ed25519PublicKey] = {}
    certified: set[str] = set()
    for item in device_info.get("keys") or []:
        if not isinstance(item, dict):
            continue
        key = _load_key(source, report, item.get("file"))
        if key is None:
            continue
        kid = key_id(key)
        if kid != item.get("kid"):
            report.fail(
                str(item.get("file")), f"holds key {kid}, the manifest says {item.get('kid')}"
            )
        bundled[kid] = key
        cert = item.get("certificate")
        if authority is not None and isinstance(cert, str) and cert in source.names:
            try:
                opened = session.get("opened_at")
                enrollment = parse_enrollment(
                    source.read(cert, 64 * 1024), authority,
                    now=float(opened) if isinstance(opened, int | float) else None,
                )  # fmt: skip
            except DocumentError as exc:
                report.fail(cert, f"enrollment certificate refused: {exc.code}: {exc.detail}")
                continue
            if enrollment.device != device or raw_public(enrollment.device_key) != raw_public(key):
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


def _checkpoints(
    source: _Source,
    report: VerifyReport,
    manifest: dict[str, Any],
    keys: dict[str, Ed25519PublicKey],
) -> dict[str, dict[int, tuple[int, int, bytes]]]:
    """Per camera, seq -> (capture_us, flags, digest) from every checkpoint that verifies."""
    device = str(_obj(manifest.get("device")).get("id"))
    signed: dict[str, dict[int, tuple[int, int, bytes]]] = {}
    for cam in _cameras(manifest):
        entries = signed.setdefault(str(cam.get("id")), {})
        name = cam.get("checkpoints")
        if name is None:
            continue
        if not isinstance(name, str) or name not in source.names or not safe_name(name):
            continue  # reported as missing
        try:
            data = source.read(name)
        except ValueError as exc:
            report.fail(name, str(exc))
            continue
        for number, line in enumerate(data.split(b"\n"), 1):
            if not line:
                continue
            where = f"{name} line {number}"
            try:
                record = parse_record(line)
            except ValueError as exc:
                report.fail(where, f"not a checkpoint: {exc}")
                continue
            cp = record.checkpoint
            if cp.device != device or cp.camera != cam.get("id"):
                report.fail(where, f"a checkpoint of {cp.device}/{cp.camera}, not of this camera")
                continue
            if not record.ok:
                report.warn(
                    where,
                    f"seqs {cp.first}..{cp.last}: refused by the receiver when it arrived "
                    f"({record.result}); not used",
                )
                continue
            problem = chain.check(cp, keys)
            if problem is not None:
                why = {
                    "unknown_key": f"signed by key {cp.kid}, not a trusted device key",
                    "bad_signature": "the device's signature does not verify (altered)",
                    "bad_chain": "its entries do not chain to its signed head (altered)",
                }[problem]
                report.fail(where, f"checkpoint of seqs {cp.first}..{cp.last}: {why}")
                continue
            report.checkpoints += 1
            for seq, fields in cp.iter_entries():
                known = entries.setdefault(seq, fields)
                if known != fields:
                    report.fail(where, f"seq {seq}: two signed checkpoints disagree")
    return signed


def _obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (the manifest is not trusted)."""
    return value if isinstance(value, dict) else {}


def _cameras(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cams = manifest.get("cameras")
    return [c for c in cams if isinstance(c, dict)] if isinstance(cams, list) else []


def _ranges(seqs: list[int]) -> str:
    """``a..b, c`` of sorted seqs (the first 8 ranges)."""
    out: list[str] = []
    start = prev = None
    for seq in [*seqs, None]:
        if start is not None and (seq is None or seq != prev + 1):  # type: ignore[operator]
            out.append(f"{start}" if start == prev else f"{start}..{prev}")
            start = None
        if seq is not None:
            start = seq if start is None else start
            prev = seq
    more = f" and {len(out) - 8} more ranges" if len(out) > 8 else ""
    return ", ".join(out[:8]) + more


def _footage(
    source: _Source,
    report: VerifyReport,
    manifest: dict[str, Any],
    signed: dict[str, dict[int, tuple[int, int, bytes]]],
    tmp: Path,
) -> None:
    for cam in _cameras(manifest):
        camera = str(cam.get("id"))
        entries = signed.get(camera, {})
        for gap in cam.get("gaps") or []:
            report.warn(
                f"camera {camera}",
                f"seqs {gap.get('first')}..{gap.get('last')} declared {gap.get('reason')} by "
                "the device: no footage of them exists",
            )
        for hole in cam.get("holes") or []:
            report.warn(f"camera {camera}", f"seqs {hole[0]}..{hole[1]} not in the recording")
        for item in cam.get("footage") or []:
            if isinstance(item, dict):
                _one_file(source, report, item, entries, tmp)


def _one_file(
    source: _Source,
    report: VerifyReport,
    item: dict[str, Any],
    entries: dict[int, tuple[int, int, bytes]],
    tmp: Path,
) -> None:
    name, first, frames = item.get("file"), item.get("first_seq"), item.get("frames")
    if not isinstance(name, str) or not isinstance(first, int) or not isinstance(frames, int):
        report.fail(MANIFEST, "a footage entry is malformed")
        return
    if name not in source.names or not safe_name(name):
        return  # reported as missing
    report.frames += frames
    try:
        track = read_mp4(source.local(name, tmp))
    except (av.FFmpegError, OSError, ValueError) as exc:
        report.fail(name, f"unreadable as MP4: {exc}")
        return
    samples = track.samples
    if len(samples) != frames:
        report.fail(name, f"holds {len(samples)} samples, the manifest says {frames} (truncated?)")
    if not track.ninety_khz:
        report.fail(name, "timestamps are not in a 90 kHz time base")
    uncovered: list[int] = []
    altered: list[int] = []
    keyflag: list[int] = []
    timing: list[int] = []
    last_pts, origin = -1, None
    verified = 0
    for i, (data, key, pts) in enumerate(samples):
        seq = first + i
        entry = entries.get(seq)
        if entry is None:
            uncovered.append(seq)
            origin = None  # timestamps are checked only from signed capture times
            continue
        capture_us, flags, digest = entry
        if chain.sample_digest(data, track.length_size) != digest:
            altered.append(seq)
            continue
        if bool(flags & chain.FLAG_KEYFRAME) != key:
            keyflag.append(seq)
            continue
        if i == 0:
            origin, last_pts = capture_us, -1
        if origin is not None:
            expected = next_pts(capture_us, origin, last_pts)
            if pts != expected:
                timing.append(seq)
            last_pts = pts
        verified += 1
    report.frames_verified += verified
    if altered:
        report.fail(name, f"seqs {_ranges(altered)}: not the footage the device signed (altered)")
    if keyflag:
        report.fail(name, f"seqs {_ranges(keyflag)}: keyframe flag differs from the signed one")
    if timing:
        report.fail(
            name, f"seqs {_ranges(timing)}: timestamps differ from the signed capture times"
        )
    if uncovered:
        report.fail(
            name,
            f"seqs {_ranges(uncovered)}: no device checkpoint covers them "
            "(only the receiver vouches for this footage)",
        )


def _audit(
    source: _Source,
    report: VerifyReport,
    manifest: dict[str, Any],
    keys: dict[str, Ed25519PublicKey],
) -> None:
    info = manifest.get("audit")
    if not isinstance(info, dict):
        report.warn("audit", "no audit entries of this session in the receiver's copy")
        return
    name = info.get("file")
    if not isinstance(name, str) or name not in source.names or not safe_name(name):
        return  # reported as missing
    try:
        lines = [line for line in source.read(name).split(b"\n") if line]
    except ValueError as exc:
        report.fail(name, str(exc))
        return
    prev: str | None = None
    signed_through = 0
    first_n = last_n = 0
    session_id = _obj(manifest.get("session")).get("id")
    mentions = 0
    for number, raw in enumerate(lines, 1):
        where = f"{name} line {number}"
        try:
            entry = json.loads(raw)
            digest = entry.pop("hash")
            if type(entry.get("n")) is not int:
                raise TypeError("no entry number")
        except (ValueError, KeyError, TypeError, AttributeError):
            report.fail(where, "not an audit entry")
            return
        if hashlib.sha256(canonical(entry)).hexdigest() != digest:
            report.fail(where, f"entry {entry.get('n')}: altered (its hash does not match)")
            return
        if prev is not None and (entry.get("prev") != prev or entry["n"] != last_n + 1):
            report.fail(where, f"entry {entry.get('n')}: the chain is broken before it")
            return
        prev, last_n = digest, entry["n"]
        first_n = first_n or last_n
        mentions += entry.get("session") == session_id
        if entry.get("event") == audit.CHECKPOINT:
            kid, sig = entry.get("kid"), entry.get("sig")
            key = keys.get(str(kid))
            try:
                signature = b64url_decode(str(sig), what="sig")
            except DocumentError:
                signature = b""
            message = audit.checkpoint_message(entry.get("covers"), entry.get("head"), str(kid))
            if (
                key is None
                or entry.get("covers") != last_n - 1
                or entry.get("head") != entry.get("prev")
                or not verify(key, signature, message)
            ):
                report.fail(where, f"audit checkpoint {last_n}: not signed by a trusted device key")
                return
            signed_through = last_n
    if mentions == 0:
        report.fail(name, f"holds no entry of session {session_id}")
    if signed_through < last_n:
        first_unsigned = signed_through + 1 if signed_through else first_n
        report.warn(
            name,
            f"entries {first_unsigned}..{last_n} are not signed by the device yet "
            "(it signs its trail every minute and when it stops)",
        )
