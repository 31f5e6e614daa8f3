"""Checking an evidence bundle offline: every part, and that the footage is the device's.

:func:`verify_bundle` reads a bundle (the zip, or a folder it was unpacked
into) and reports a :class:`Finding` for each problem, naming the part:

1. the members: none missing, none extra, none altered (SHA-256 and size
   against the manifest), no unsafe or repeated names, none compressed or
   encrypted (the exporter stores them: nothing else is read), every one with
   its place in the manifest (an MP4 no camera lists is never checked);
2. the manifest's signature, with the receiver key given (``receiver_key``)
   or else the one in the bundle (a warning says it was not given), and the
   type of every field it has;
3. the device key(s): the given one (``device_key``) must be the bundle's;
   with ``authority``, each must come with the district's enrollment
   certificate for this device, valid when the session opened;
4. the device's checkpoints: each signed by a trusted device key, its
   entries folding to its head (:func:`agent.chain.check`);
5. the footage: every sample of every MP4 (one video track, nothing else),
   by its seq, against the entry the device signed (payload digest, keyframe
   flag), its timestamp against the signed capture time, the sample count
   against the manifest; a sample no checkpoint covers is a failure too
   (nothing but the receiver vouches for it). Every seq a checkpoint of the
   bundle signed in the selected time range, and every seq between a
   camera's files, is in the footage or declared missing (``gaps``, the
   device's word; ``holes``, the receiver's): a warning names each declared
   one, one left out without a word is a failure;
6. the audit excerpt: hash chain, and the device's signed audit checkpoints;
   from its signed entries, that the bundle holds every camera the device
   disclosed in the session (a camera left out of the export's selection is
   a warning) and none it did not, and no frame captured after the device
   ended the session.

What the device does not sign cannot be checked: which session a checkpoint
belongs to (it binds device, camera, seqs and capture times, not the
session), how long the pre-roll before the session's start was, and whether
a session's last checkpoints were left out together with their footage.

Errors mean a check failed; warnings are facts a reader should know (a key
taken from the bundle itself, footage the device declared lost, audit
entries not signed yet, an export of part of a session). At most
:data:`MAX_FINDINGS_PER_PART` findings are listed per part (then a count).
Sans-IO apart from reading the bundle.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import tempfile
import zipfile
import zlib
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate
from pathlib import Path
from typing import Any, Final, TypeGuard

import av
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import audit, chain
from provisioning.documents import DocumentError, b64url_decode, canonical
from provisioning.enrollment import parse_enrollment
from provisioning.errors import KeyFileError
from provisioning.keys import kid as key_id
from provisioning.keys import public_key_from_pem, raw_public, verify
from receiver import seqranges
from receiver.custody import parse_record
from receiver.evidence_format import (
    BUNDLE_TYPE,
    MANIFEST,
    MANIFEST_CONTEXT,
    README,
    SIGNATURE,
    next_pts,
    open_mp4,
    safe_name,
)

__all__ = ["BundleInputError", "Finding", "VerifyReport", "verify_bundle"]

MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024
MAX_SMALL_FILE: Final = 256 * 1024 * 1024
MAX_KEY_FILE: Final = 64 * 1024
#: A checkpoint line: at most 256 entries of about 90 bytes each, and its fields.
MAX_CHAIN_LINE: Final = 1024 * 1024
MAX_AUDIT_LINE: Final = 4 * audit.MAX_LINE_BYTES
#: Findings listed per part (then one saying how many more), and in all.
MAX_FINDINGS_PER_PART: Final = 20
MAX_FINDINGS: Final = 2000
#: A frame is the session's if captured before the device's signed session_end entry
#: (written after the session's last frame, on the same clock), with this margin.
SESSION_END_MARGIN_US: Final = 2_000_000
CHAIN_FORMAT: Final = {"format": "breakglass-chain-v1", "digest": "h264-nal-units-u32be"}
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
#: Nothing in a bundle nests JSON half as deep.
MAX_JSON_DEPTH: Final = 64
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"')
_DEPTH_STEP: Final = [1 if c in b"[{" else -1 if c in b"]}" else 0 for c in range(256)]
_Range = tuple[int, int]


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
    #: Findings listed per part, and those not listed: part -> [errors, warnings].
    _listed: Counter[str] = field(default_factory=Counter, repr=False)
    _unlisted: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.error]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.error]

    @property
    def ok(self) -> bool:
        """No check failed."""
        return not self.errors and not any(e for e, _ in self._unlisted.values())

    def fail(self, part: str, what: str) -> None:
        self._add(Finding(part, what))

    def warn(self, part: str, what: str) -> None:
        self._add(Finding(part, what, error=False))

    def _add(self, finding: Finding) -> None:
        if self._listed[finding.part] < MAX_FINDINGS_PER_PART and len(self.findings) < MAX_FINDINGS:
            self._listed[finding.part] += 1
            self.findings.append(finding)
            return
        counts = self._unlisted.setdefault(finding.part, [0, 0])
        counts[0 if finding.error else 1] += 1

    def finish(self) -> None:
        """Say how many findings were not listed (each part's, then those of parts with
        none listed)."""
        unlisted, self._unlisted = self._unlisted, {}
        rest = [0, 0, 0]
        for part, (errors, warnings) in sorted(unlisted.items()):
            if self._listed[part]:
                self.findings.append(
                    Finding(
                        part, f"and {errors + warnings} more like these, not listed", errors > 0
                    )
                )
            else:
                rest = [rest[0] + errors, rest[1] + warnings, rest[2] + 1]
        if rest[2]:
            self.findings.append(
                Finding(
                    "bundle",
                    f"and {rest[0] + rest[1]} more findings about {rest[2]} more parts, not listed",
                    rest[0] > 0,
                )
            )


# -- reading a bundle ---------------------------------------------------------------------


class MemberError(Exception):
    """A member cannot be read (damaged, refused, larger than allowed)."""


#: What reading a zip member may raise besides OSError (a damaged or hostile zip).
_ZIP_ERRORS: Final = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
)


class _Source:
    """The members of a bundle, from a zip or a folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        #: Every member name, as often as it occurs.
        self.names: list[str] = []
        #: Size as the zip (or the file system) declares it.
        self.sizes: dict[str, int] = {}
        #: Members that are never read, and why (compressed, encrypted).
        self.refused: dict[str, str] = {}
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    name = p.relative_to(path).as_posix()
                    self.names.append(name)
                    self.sizes[name] = p.stat().st_size
        elif path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise BundleInputError(f"{path}: not a zip file ({exc})") from exc
            except UnicodeDecodeError as exc:
                raise BundleInputError(
                    f"{path}: a member's name is marked UTF-8 but is not ({exc}): "
                    "not a bundle the exporter wrote"
                ) from exc
            except _ZIP_ERRORS as exc:
                raise BundleInputError(f"{path}: not a readable zip file ({exc})") from exc
            for info in self._zip.infolist():
                name = info.filename
                if info.is_dir() and info.file_size == 0:
                    continue
                self.names.append(name)
                self.sizes[name] = info.file_size
                if info.flag_bits & 0x1:
                    self.refused[name] = "encrypted"
                elif info.compress_type != zipfile.ZIP_STORED:
                    self.refused[name] = f"compressed (zip method {info.compress_type})"
                elif info.compress_size != info.file_size:
                    self.refused[name] = "its two sizes in the zip differ"
                else:
                    self.refused.pop(name, None)
        else:
            raise BundleInputError(f"{path}: no such file or folder")
        self.present = set(self.names)
        self.counts = Counter(self.names)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def chunks(self, name: str, limit: int) -> Iterator[bytes]:
        """A member's bytes, 1 MiB at a time; MemberError when it cannot be read (or when it
        is larger than ``limit``), possibly after some chunks."""
        if name in self.refused:
            raise MemberError(f"not read: {self.refused[name]}")
        size = 0
        try:
            zf = self._zip
            with zf.open(name) if zf is not None else (self.path / name).open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise MemberError(f"larger than {limit} bytes; not read further")
                    yield chunk
        except _ZIP_ERRORS as exc:
            raise MemberError(f"damaged in the zip: {exc}") from exc

    def read(self, name: str, limit: int) -> bytes:
        """A member's bytes; MemberError if larger than ``limit`` or unreadable."""
        return b"".join(self.chunks(name, limit))

    def local(self, name: str, folder: Path, limit: int) -> Path:
        """A path to the member on disk (copied out of a zip, at most ``limit`` bytes;
        MemberError if it is larger or damaged there)."""
        if self._zip is None:
            return self.path / name
        dest = folder / name.replace("/", "__")
        try:
            with dest.open("wb") as out:
                for chunk in self.chunks(name, limit):
                    out.write(chunk)
        except MemberError:
            dest.unlink(missing_ok=True)
            raise
        return dest


def _lines(source: _Source, name: str, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """``(number, line)`` of a member read a chunk at a time (``None``: a line longer than
    ``limit``); MemberError if it cannot be read."""
    number, buf, long = 0, bytearray(), False
    for chunk in source.chunks(name, MAX_SMALL_FILE):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            number += 1
            if not long:
                buf += chunk[start:end]
            yield number, None if long or len(buf) > limit else bytes(buf)
            buf.clear()
            long, start = False, end + 1
        if not long:
            buf += chunk[start:]
            if len(buf) > limit:
                long = True
                buf.clear()
    if buf or long:
        yield number + 1, None if long else bytes(buf)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _shallow(data: bytes) -> None:
    """ValueError if JSON ``data`` nests deeper than :data:`MAX_JSON_DEPTH` (checked before
    parsing: a parser at the recursion limit breaks whatever else runs then, finalizers)."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return
    bare = _JSON_STRING.sub(b"", data)
    if max(accumulate(map(_DEPTH_STEP.__getitem__, bare)), default=0) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")


def _json(data: bytes) -> Any:
    """Strict JSON (no NaN or Infinity, not deeply nested); ValueError for anything else."""
    _shallow(data)
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def _sha256(source: _Source, name: str, limit: int) -> tuple[str, int]:
    """SHA-256 and size of a member; MemberError if it cannot be read (or exceeds ``limit``)."""
    h, size = hashlib.sha256(), 0
    for chunk in source.chunks(name, limit):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


# -- the manifest, its fields checked -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _File:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class _Footage:
    file: str
    first: int
    last: int
    frames: int
    first_capture_us: int


@dataclass(slots=True)
class _Camera:
    id: str
    checkpoints: str | None
    footage: list[_Footage]
    gaps: list[tuple[int, int, str]]
    holes: list[_Range]


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    file: str
    certificate: str | None


@dataclass(slots=True)
class _Manifest:
    session: str
    device: str
    opened_at: float | None
    closed: bool
    open_session: bool
    #: The cameras the export selected (None: the field is malformed).
    selected: list[str] | None
    from_us: int | None
    to_us: int | None
    cameras: list[_Camera]
    keys: list[_Key]
    receiver: str | None
    audit: str | None
    files: list[_File]


def _is_int(value: Any, low: int = -(2**63), high: int = 2**63 - 1) -> bool:
    return type(value) is int and low <= value <= high


class _Fields:
    """Reads the manifest's fields; each missing or of the wrong type is a failure."""

    def __init__(self, report: VerifyReport) -> None:
        self.report = report

    def bad(self, where: str, what: str) -> None:
        self.report.fail(MANIFEST, f"{where}: {what}")

    def get_obj(self, parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        value = parent.get(key)
        if isinstance(value, dict):
            return value
        self.bad(f"{where}{key}", "missing or not an object")
        return {}

    def get_list(self, parent: dict[str, Any], key: str, where: str) -> list[Any]:
        value = parent.get(key)
        if isinstance(value, list):
            return value
        self.bad(f"{where}{key}", "missing or not a list")
        return []

    def get_str(self, parent: dict[str, Any], key: str, where: str, *, null: bool = False) -> Any:
        value = parent.get(key)
        if isinstance(value, str) or (null and value is None):
            return value
        self.bad(f"{where}{key}", "missing or not a string")
        return None

    def get_int(
        self,
        parent: dict[str, Any],
        key: str,
        where: str,
        *,
        low: int = -(2**63),
        null: bool = False,
    ) -> Any:
        value = parent.get(key)
        if _is_int(value, low) or (null and value is None):
            return value
        self.bad(f"{where}{key}", f"missing or not an integer (>= {low})")
        return None

    def get_number(self, parent: dict[str, Any], key: str, where: str) -> float | None:
        value = parent.get(key)
        if value is None:
            return None
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e11:
            return float(value)
        self.bad(f"{where}{key}", "not a time (UTC seconds)")
        return None


def _parse_manifest(doc: dict[str, Any], report: VerifyReport) -> _Manifest:
    f = _Fields(report)
    if doc.get("v") != 1:
        f.bad("v", f"version {str(doc.get('v'))[:20]} is not one this verifier knows (1)")
    if doc.get("chain") != CHAIN_FORMAT:
        f.bad("chain", f"not the chain format this verifier knows ({CHAIN_FORMAT})")
    session = f.get_obj(doc, "session", "")
    session_id = f.get_str(session, "id", "session.") or "?"
    device_info = f.get_obj(doc, "device", "")
    device = f.get_str(device_info, "id", "device.") or "?"
    if session.get("device") != device:
        f.bad("session.device", "is not device.id")
    selection = f.get_obj(doc, "selection", "")
    open_session = selection.get("open_session")
    if not isinstance(open_session, bool):
        f.bad("selection.open_session", "missing or not true/false")
    selected_raw = selection.get("cameras")
    selected = (
        [c for c in selected_raw if isinstance(c, str)] if isinstance(selected_raw, list) else None
    )
    if selected is None or len(selected) != len(selected_raw or ()):
        f.bad("selection.cameras", "missing or not a list of camera ids")
        selected = None
    cameras: list[_Camera] = []
    for i, cam in enumerate(f.get_list(doc, "cameras", "")):
        where = f"cameras[{i}]."
        if not isinstance(cam, dict):
            f.bad(f"cameras[{i}]", "not an object")
            continue
        cam_id = f.get_str(cam, "id", where)
        if cam_id is None:
            continue
        if any(c.id == cam_id for c in cameras):
            f.bad(f"{where}id", f"camera {cam_id[:80]} is listed twice")
            continue
        footage: list[_Footage] = []
        for j, item in enumerate(f.get_list(cam, "footage", where)):
            at = f"{where}footage[{j}]."
            if not isinstance(item, dict):
                f.bad(at[:-1], "not an object")
                continue
            values = (
                f.get_str(item, "file", at),
                f.get_int(item, "first_seq", at, low=0),
                f.get_int(item, "last_seq", at, low=0),
                f.get_int(item, "frames", at, low=1),
                f.get_int(item, "first_capture_us", at),
            )
            name, first, last, frames, capture = values
            if any(v is None for v in values):
                continue
            if last != first + frames - 1:
                f.bad(at[:-1], f"seqs {first}..{last} are not {frames} frames")
                continue
            footage.append(_Footage(name, first, last, frames, capture))
        gaps: list[tuple[int, int, str]] = []
        for j, gap in enumerate(f.get_list(cam, "gaps", where)):
            if (
                isinstance(gap, dict)
                and _is_int(gap.get("first"), 0)
                and _is_int(gap.get("last"), 0)
                and gap["first"] <= gap["last"]
                and isinstance(gap.get("reason"), str)
            ):
                gaps.append((gap["first"], gap["last"], gap["reason"]))
            else:
                f.bad(f"{where}gaps[{j}]", "not {first, last, reason} (seqs in order)")
        holes: list[_Range] = []
        for j, hole in enumerate(f.get_list(cam, "holes", where)):
            if (
                isinstance(hole, list)
                and len(hole) == 2
                and all(_is_int(v, 0) for v in hole)
                and hole[0] <= hole[1]
            ):
                holes.append((hole[0], hole[1]))
            else:
                f.bad(f"{where}holes[{j}]", "not [first, last] (seqs in order)")
        checkpoints = f.get_str(cam, "checkpoints", where, null=True)
        cameras.append(_Camera(cam_id, checkpoints, footage, gaps, holes))
    keys: list[_Key] = []
    for i, item in enumerate(f.get_list(device_info, "keys", "device.")):
        at = f"device.keys[{i}]."
        if not isinstance(item, dict):
            f.bad(at[:-1], "not an object")
            continue
        kid, name = f.get_str(item, "kid", at), f.get_str(item, "file", at)
        cert = f.get_str(item, "certificate", at, null=True)
        if kid is not None and name is not None:
            keys.append(_Key(kid, name, cert))
    receiver = f.get_str(f.get_obj(doc, "receiver", ""), "file", "receiver.")
    audit_info = doc.get("audit")
    audit_file = None
    if isinstance(audit_info, dict):
        audit_file = f.get_str(audit_info, "file", "audit.")
    elif audit_info is not None:
        f.bad("audit", "not an object or null")
    files: list[_File] = []
    for i, item in enumerate(f.get_list(doc, "files", "")):
        at = f"files[{i}]"
        if (
            isinstance(item, dict)
            and isinstance(item.get("path"), str)
            and isinstance(item.get("sha256"), str)
            and _HEX64.fullmatch(item["sha256"])
            and _is_int(item.get("size"), 0)
        ):
            files.append(_File(item["path"], item["sha256"], item["size"]))
        else:
            f.bad(at, "not {path, sha256 (64 hex digits), size}")
    return _Manifest(
        session=session_id,
        device=device,
        opened_at=f.get_number(session, "opened_at", "session."),
        closed=session.get("closed_at") is not None,
        open_session=open_session is True,
        selected=selected,
        from_us=f.get_int(selection, "from_us", "selection.", null=True),
        to_us=f.get_int(selection, "to_us", "selection.", null=True),
        cameras=cameras,
        keys=keys,
        receiver=receiver,
        audit=audit_file,
        files=files,
    )


# -- the checks -------------------------------------------------------------------------------


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
    counts = source.counts
    for name in sorted(n for n, c in counts.items() if c > 1):
        report.fail(name, "appears more than once in the bundle (which one is the evidence?)")
    for name in sorted(counts):
        if not safe_name(name):
            report.fail(name, "not a plain relative name; not read")
    for name, why in sorted(source.refused.items()):
        report.fail(name, f"{why}: the exporter stores every member as it is; not read")
    if MANIFEST not in source.present:
        report.fail(MANIFEST, "missing: nothing can be checked")
        return
    try:
        body = source.read(MANIFEST, MAX_MANIFEST_BYTES)
        doc = _json(body)
        if not isinstance(doc, dict) or doc.get("type") != BUNDLE_TYPE:
            raise ValueError("not a breakglass evidence manifest")
    except (MemberError, ValueError) as exc:
        report.fail(MANIFEST, f"unreadable: {exc}")
        return
    manifest = _parse_manifest(doc, report)
    report.session = manifest.session
    _selection(report, manifest)
    readable = _check_files(source, report, manifest)
    _check_signature(source, report, manifest, body, receiver_key)
    keys = _trusted_device_keys(source, report, manifest, device_key, authority)
    trail = _audit(source, report, manifest, keys)
    signed = _checkpoints(source, report, manifest, keys)
    _footage(source, report, manifest, signed, readable, trail, tmp)
    _check_cameras(report, manifest, trail)
    _check_roles(source, report, manifest)


def _selection(report: VerifyReport, manifest: _Manifest) -> None:
    """Facts of the export: part of a session is not all of it."""
    if manifest.open_session:
        report.warn(
            "selection",
            "exported while the session was still streaming: what the device signed after "
            "that is not in it",
        )
    if manifest.from_us is not None or manifest.to_us is not None:
        start = "its start" if manifest.from_us is None else _iso(manifest.from_us)
        end = "its end" if manifest.to_us is None else _iso(manifest.to_us)
        report.warn(
            "selection", f"only the footage captured from {start} to {end} (the export's range)"
        )


def _check_files(source: _Source, report: VerifyReport, manifest: _Manifest) -> dict[str, int]:
    """Missing, altered and extra members; the listed ones that may be read (not larger
    than the manifest says), with the size it says."""
    readable: dict[str, int] = {}
    listed: set[str] = set()
    for item in manifest.files:
        name = item.path
        if name in listed:
            report.fail(MANIFEST, f"lists {name} more than once")
            continue
        listed.add(name)
        if name not in source.present:
            report.fail(name, "missing (listed in the manifest, not in the bundle)")
            continue
        if not safe_name(name) or name in source.refused or source.counts[name] > 1:
            continue  # reported already
        declared = source.sizes[name]
        if declared != item.size:
            report.fail(name, f"altered: {declared} bytes, the manifest says {item.size} bytes")
            if declared > item.size:
                continue  # never copied out (footage): nothing bigger than the manifest says
        readable[name] = item.size
        if declared != item.size:
            continue
        try:
            digest, size = _sha256(source, name, item.size)
        except MemberError as exc:
            report.fail(name, f"altered: its bytes no longer match the zip's own checksum ({exc})")
            continue
        if digest != item.sha256 or size != item.size:
            report.fail(
                name,
                f"altered: SHA-256 {digest[:16]}... ({size} bytes), the manifest says "
                f"{item.sha256[:16]}... ({item.size} bytes)",
            )
    for name in sorted(source.present - listed - {MANIFEST, SIGNATURE}):
        report.fail(name, "extra: not listed in the manifest")
    report.files = len(listed)
    return readable


def _load_key(source: _Source, report: VerifyReport, name: str | None) -> Ed25519PublicKey | None:
    if name is None:
        return None  # reported as malformed
    if name not in source.present or not safe_name(name):
        report.fail(name, "key file missing")
        return None
    try:
        return public_key_from_pem(source.read(name, MAX_KEY_FILE), where=name)
    except (KeyFileError, MemberError, ValueError, UnsupportedAlgorithm) as exc:
        report.fail(name, f"not an Ed25519 public key: {exc}")
        return None


def _check_signature(
    source: _Source,
    report: VerifyReport,
    manifest: _Manifest,
    body: bytes,
    given: Ed25519PublicKey | None,
) -> None:
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
        sig_doc = _json(source.read(SIGNATURE, MAX_KEY_FILE))
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


def _trusted_device_keys(
    source: _Source,
    report: VerifyReport,
    manifest: _Manifest,
    given: Ed25519PublicKey | None,
    authority: Ed25519PublicKey | None,
) -> dict[str, Ed25519PublicKey]:
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
                _shallow(raw)
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


def _checkpoints(
    source: _Source,
    report: VerifyReport,
    manifest: _Manifest,
    keys: dict[str, Ed25519PublicKey],
) -> dict[str, dict[int, tuple[int, int, bytes]]]:
    """Per camera, seq -> (capture_us, flags, digest) from every checkpoint that verifies."""
    signed: dict[str, dict[int, tuple[int, int, bytes]]] = {}
    for cam in manifest.cameras:
        entries = signed.setdefault(cam.id, {})
        name = cam.checkpoints
        if name is None or name not in source.present or not safe_name(name):
            continue  # reported as missing
        failed = 0  # lines that failed: a genuine file has none (reading on costs CPU only)
        try:
            for number, line in _lines(source, name, MAX_CHAIN_LINE):
                if not _checkpoint_line(report, manifest, cam, keys, entries, name, number, line):
                    failed += 1
                    if failed >= MAX_FINDINGS_PER_PART:
                        report.fail(name, f"line {number}: too many bad lines; the rest not read")
                        break
        except MemberError as exc:
            report.fail(name, str(exc))
    return signed


def _checkpoint_line(
    report: VerifyReport,
    manifest: _Manifest,
    cam: _Camera,
    keys: dict[str, Ed25519PublicKey],
    entries: dict[int, tuple[int, int, bytes]],
    name: str,
    number: int,
    line: bytes | None,
) -> bool:
    """Check one line; False if a check failed on it."""
    if line == b"":
        return True
    if line is None:
        report.fail(name, f"line {number}: longer than any checkpoint ({MAX_CHAIN_LINE} bytes)")
        return False
    try:
        _shallow(line)
        record = parse_record(line)
    except ValueError as exc:
        report.fail(name, f"line {number}: not a checkpoint: {exc}")
        return False
    cp = record.checkpoint
    if cp.device != manifest.device or cp.camera != cam.id:
        report.fail(
            name,
            f"line {number}: a checkpoint of {cp.device[:80]}/{cp.camera[:80]}, not of this camera",
        )
        return False
    if not record.ok:
        report.warn(
            name,
            f"line {number}: seqs {cp.first}..{cp.last}: refused by the receiver when it "
            f"arrived ({record.result[:80]}); not used",
        )
        return True
    problem = chain.check(cp, keys)
    if problem is not None:
        why = {
            "unknown_key": f"signed by key {cp.kid}, not a trusted device key",
            "bad_signature": "the device's signature does not verify (altered)",
            "bad_chain": "its entries do not chain to its signed head (altered)",
        }[problem]
        report.fail(name, f"line {number}: checkpoint of seqs {cp.first}..{cp.last}: {why}")
        return False
    report.checkpoints += 1
    agree = True
    for seq, fields in cp.iter_entries():
        known = entries.setdefault(seq, fields)
        if known != fields:
            report.fail(name, f"line {number}: seq {seq}: two signed checkpoints disagree")
            agree = False
    return agree


class _Seqs:
    """Increasing seqs, kept as ranges."""

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []

    def add(self, seq: int) -> None:
        if self.ranges and self.ranges[-1][1] + 1 == seq:
            self.ranges[-1][1] = seq
        else:
            self.ranges.append([seq, seq])

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __str__(self) -> str:
        return _show(self.ranges)


def _show(ranges: Iterable[Iterable[int]]) -> str:
    """``a..b, c`` of ranges (the first 8)."""
    out = [f"{a}" if a == b else f"{a}..{b}" for a, b in ranges]
    more = f" and {len(out) - 8} more ranges" if len(out) > 8 else ""
    return ", ".join(out[:8]) + more


def _iso(us: int) -> str:
    """A time in µs since the epoch, as ISO-8601 UTC (or as µs, if no date can say it)."""
    try:
        return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return f"{us} µs after 1970"


def _footage(
    source: _Source,
    report: VerifyReport,
    manifest: _Manifest,
    signed: dict[str, dict[int, tuple[int, int, bytes]]],
    readable: dict[str, int],
    trail: _Trail | None,
    tmp: Path,
) -> None:
    end_us = None if trail is None else trail.end_us
    seen: set[str] = set()
    for cam in manifest.cameras:
        part = f"camera {cam.id}"
        entries = signed.get(cam.id, {})
        held: list[_Range] = []
        latest: int | None = None
        for item in cam.footage:
            if item.file in seen:
                report.fail(item.file, "listed as footage more than once")
                continue
            seen.add(item.file)
            expected = f"footage/{cam.id}/{cam.id}.{item.first}-{item.last}.mp4"
            if item.file != expected:
                report.fail(
                    item.file, f"the manifest lists it as {expected[:200]}: named for other footage"
                )
            held.append((item.first, item.last))
            found = _one_file(source, report, item, entries, readable, end_us, tmp)
            if found is not None:
                latest = found if latest is None else max(latest, found)
        reach = -1
        for a, b in sorted(held):
            if a <= reach:
                report.fail(part, f"seqs {a}..{min(b, reach)} are in two of its files")
            reach = max(reach, b)
        # Every seq between its files, and every seq signed in the time range, is in a file
        # or declared missing: the device's checkpoints show what it had.
        wanted: list[_Range] = []
        if held:
            wanted.append((min(a for a, _ in held), max(b for _, b in held)))
        ordered = sorted(entries)
        for seq in ordered:
            capture_us = entries[seq][0]
            if (manifest.from_us is None or capture_us >= manifest.from_us) and (
                manifest.to_us is None or capture_us <= manifest.to_us
            ):
                wanted.append((seq, seq))
        declared = [(a, b) for a, b, _ in cam.gaps] + cam.holes
        left_out = [
            r
            for a, b in seqranges.merge(wanted)
            for r in seqranges.missing(a, b, [*held, *declared])
        ]
        if left_out:
            signed_out = _Seqs()
            for a, b in left_out:
                for seq in ordered[bisect_left(ordered, a) : bisect_right(ordered, b)]:
                    signed_out.add(seq)
            report.fail(
                part,
                f"seqs {_show(left_out)}: not in the bundle, and not declared missing"
                + (f" (the device signed seqs {signed_out} of them)" if signed_out else ""),
            )
        start_us = None if trail is None else trail.start_us
        if (
            start_us is not None
            and latest is not None
            and latest < start_us
            and (manifest.to_us is None or manifest.to_us >= start_us)
        ):
            report.warn(
                part,
                f"its footage here was all captured before the session started "
                f"({_iso(start_us)}, the device's signed session_start; the last frame "
                f"{_iso(latest)}): none of the emergency itself",
            )
        for first, last, reason in cam.gaps:
            report.warn(
                part,
                f"seqs {first}..{last} declared {reason[:80]!r} by the device: "
                "no footage of them exists",
            )
        for first, last in cam.holes:
            report.warn(part, f"seqs {first}..{last} not in the recording")


def _one_file(
    source: _Source,
    report: VerifyReport,
    item: _Footage,
    entries: dict[int, tuple[int, int, bytes]],
    readable: dict[str, int],
    end_us: int | None,
    tmp: Path,
) -> int | None:
    """Check one MP4; the latest capture time of its samples that verified."""
    name, first, frames = item.file, item.first, item.frames
    report.frames += frames
    if name not in source.present or not safe_name(name):
        return None  # reported as missing
    if name not in readable:
        report.fail(name, "not read, so not checked against the device's checkpoints")
        return None
    first_entry = entries.get(first)
    if first_entry is not None and first_entry[0] != item.first_capture_us:
        report.fail(MANIFEST, f"{name}: first_capture_us is not the capture time the device signed")
    uncovered, altered, keyflag, timing, hidden, late = (_Seqs() for _ in range(6))
    count = verified = 0
    latest: int | None = None
    path: Path | None = None
    try:
        path = source.local(name, tmp, readable[name])
        with open_mp4(path) as (header, samples):
            if header.codec != "h264":
                report.fail(name, f"holds {header.codec[:40]} video, not H.264")
                return None
            if not header.ninety_khz:
                report.fail(name, "timestamps are not in a 90 kHz time base")
            last_pts, origin = -1, None
            for i, sample in enumerate(samples):
                count += 1
                seq = first + i
                if i >= frames:
                    continue  # counted: more samples than the manifest says
                if sample.discard:
                    hidden.add(seq)
                entry = entries.get(seq)
                if entry is None:
                    uncovered.add(seq)
                    origin = None  # timestamps are checked only from signed capture times
                    continue
                capture_us, flags, digest = entry
                if chain.sample_digest(sample.data, header.length_size) != digest:
                    altered.add(seq)
                    continue
                if bool(flags & chain.FLAG_KEYFRAME) != sample.keyframe:
                    keyflag.add(seq)
                    continue
                if i == 0:
                    origin, last_pts = capture_us, -1
                if origin is not None:
                    if sample.pts != next_pts(capture_us, origin, last_pts):
                        timing.add(seq)
                    last_pts = sample.pts
                if end_us is not None and capture_us > end_us + SESSION_END_MARGIN_US:
                    late.add(seq)
                latest = capture_us if latest is None else max(latest, capture_us)
                verified += 1
    except (av.FFmpegError, OSError, ValueError, MemberError) as exc:
        report.fail(name, f"unreadable as MP4: {exc}")
        return None
    finally:
        if path is not None and path.parent == tmp:
            path.unlink(missing_ok=True)  # a copy out of the zip: one at a time on disk
    report.frames_verified += verified
    if count != frames:
        report.fail(name, f"holds {count} samples, the manifest says {frames} (truncated?)")
    if altered:
        report.fail(name, f"seqs {altered}: not the footage the device signed (altered)")
    if keyflag:
        report.fail(name, f"seqs {keyflag}: keyframe flag differs from the signed one")
    if timing:
        report.fail(name, f"seqs {timing}: timestamps differ from the signed capture times")
    if hidden:
        report.fail(name, f"seqs {hidden}: marked for players to skip (an edit list hides them)")
    if uncovered:
        report.fail(
            name,
            f"seqs {uncovered}: no device checkpoint covers them "
            "(only the receiver vouches for this footage)",
        )
    if late and end_us is not None:
        report.fail(
            name,
            f"seqs {late}: captured after the session ended ({_iso(end_us)}, the device's "
            "signed session_end): footage of another time",
        )
    return latest


@dataclass(slots=True)
class _Trail:
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


def _audit(
    source: _Source,
    report: VerifyReport,
    manifest: _Manifest,
    keys: dict[str, Ed25519PublicKey],
) -> _Trail | None:
    """Check the excerpt; what its signed entries say of the session (None: nothing)."""
    name = manifest.audit
    if name is None:
        report.warn(
            "audit",
            "no audit entries of this session in the receiver's copy: the cameras and the "
            "session's end cannot be checked against the device's trail",
        )
        return None
    if name not in source.present or not safe_name(name):
        return None  # reported as missing
    prev: str | None = None
    signed_through = 0
    first_n = last_n = 0
    mentions = 0
    #: (n, event, entry) of the session's own entries.
    mine: list[tuple[int, str, dict[str, Any]]] = []
    try:
        for number, raw in _lines(source, name, MAX_AUDIT_LINE):
            if raw == b"":
                continue
            where = f"line {number}"
            try:
                if raw is None:
                    raise ValueError("too long")
                entry = _json(raw)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                digest = entry.pop("hash", None)
                if not isinstance(digest, str) or type(entry.get("n")) is not int:
                    raise ValueError("no entry number or hash")
                computed = hashlib.sha256(canonical(entry)).hexdigest()
            except (ValueError, RecursionError):
                report.fail(name, f"{where}: not an audit entry")
                return None
            if computed != digest:
                report.fail(name, f"{where}: entry {entry['n']}: altered (its hash does not match)")
                return None
            if prev is not None and (entry.get("prev") != prev or entry["n"] != last_n + 1):
                report.fail(name, f"{where}: entry {entry['n']}: the chain is broken before it")
                return None
            prev, last_n = digest, entry["n"]
            first_n = first_n or last_n
            if entry.get("session") == manifest.session:
                mentions += 1
                if entry.get("event") in ("session_start", "session_end", "disclosure"):
                    mine.append((last_n, str(entry["event"]), entry))
            if entry.get("event") == audit.CHECKPOINT:
                if not _audit_checkpoint_ok(entry, last_n, keys):
                    report.fail(
                        name,
                        f"{where}: audit checkpoint {last_n}: not signed by a trusted device key",
                    )
                    return None
                signed_through = last_n
    except MemberError as exc:
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
    manifest: _Manifest,
    name: str,
    mine: list[tuple[int, str, dict[str, Any]]],
    signed_through: int,
) -> _Trail:
    trail = _Trail()
    for n, event, entry in mine:
        if n > signed_through:
            if event == "disclosure":
                trail.disclosures_signed = False
            continue
        where = f"entry {n} ({event})"
        if event == "session_start":
            cams = entry.get("cameras")
            if not isinstance(cams, list) or not all(isinstance(c, str) for c in cams):
                report.fail(name, f"{where}: its cameras are not a list of ids")
                continue
            trail.started = [*(trail.started or []), *cams]
            t = entry.get("t")
            if _is_time(t) and trail.start_us is None:
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
            if _is_time(t):
                end_us = round(t * 1e6)
                trail.end_us = end_us if trail.end_us is None else max(trail.end_us, end_us)
    if trail.end_us is None and manifest.closed:
        report.warn(
            name,
            "the session's end is not among the device's signed entries: the footage's "
            "capture times cannot be checked against it",
        )
    return trail


def _is_time(value: Any) -> TypeGuard[float]:
    """Whether ``value`` is an audit entry's time (UTC seconds)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e11


def _check_cameras(report: VerifyReport, manifest: _Manifest, trail: _Trail | None) -> None:
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


def _check_roles(source: _Source, report: VerifyReport, manifest: _Manifest) -> None:
    """Every member has its place in the manifest: one it does not refer to is never
    checked (footage no camera lists is not compared with any checkpoint)."""
    roles = {MANIFEST, SIGNATURE, README}
    roles.update(n for n in (manifest.receiver, manifest.audit) if n is not None)
    for key in manifest.keys:
        roles.update(n for n in (key.file, key.certificate) if n is not None)
    for cam in manifest.cameras:
        roles.update(f.file for f in cam.footage)
        if cam.checkpoints is not None:
            roles.add(cam.checkpoints)
    for name in sorted({f.path for f in manifest.files} - roles):  # unlisted: extra
        if name.startswith("footage/"):
            report.fail(
                name,
                "footage no camera of the manifest lists: never checked against the device's "
                "checkpoints",
            )
        else:
            report.fail(name, "no part of the manifest refers to it: its content is not checked")
