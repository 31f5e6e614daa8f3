"""An evidence bundle's manifest: its fields type-checked, and the members against it.

:func:`parse_manifest` reads ``manifest.json`` (already parsed as JSON) into a
:class:`Manifest`, reporting every field that is missing or of the wrong type
(and leaving out what it cannot use). :func:`check_files` compares the
members with the manifest's list of files (missing, altered, extra);
:func:`check_references` fails every member the manifest refers to that its
list of files lacks;
:func:`check_roles` fails every listed member no part of the manifest refers
to, since nothing would check it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from receiver.evidence_findings import VerifyReport
from receiver.evidence_format import MANIFEST, README, SIGNATURE, safe_name
from receiver.evidence_zip import MemberError, Source
from receiver.seqranges import Range

__all__ = [
    "CHAIN_FORMAT",
    "Camera",
    "Footage",
    "Key",
    "ListedFile",
    "Manifest",
    "check_files",
    "check_references",
    "check_roles",
    "is_int",
    "is_time",
    "parse_manifest",
]

CHAIN_FORMAT: Final = {"format": "breakglass-chain-v1", "digest": "h264-nal-units-u32be"}
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ListedFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Footage:
    file: str
    first: int
    last: int
    frames: int
    first_capture_us: int


@dataclass(slots=True)
class Camera:
    id: str
    checkpoints: str | None
    footage: list[Footage]
    gaps: list[tuple[int, int, str]]
    holes: list[Range]


@dataclass(frozen=True, slots=True)
class Key:
    kid: str
    file: str
    certificate: str | None


@dataclass(slots=True)
class Manifest:
    session: str
    device: str
    opened_at: float | None
    closed: bool
    #: The device had not signed the session's end when it was exported (it streamed
    #: still, or had just ended): without it, a bundle must hold the signed end.
    open_session: bool
    #: The cameras the export selected (None: the field is malformed).
    selected: list[str] | None
    from_us: int | None
    to_us: int | None
    cameras: list[Camera]
    keys: list[Key]
    receiver: str | None
    audit: str | None
    files: list[ListedFile]


def is_int(value: Any, low: int = -(2**63), high: int = 2**63 - 1) -> bool:
    """Whether ``value`` is a JSON integer (not a bool) from ``low`` to ``high``."""
    return type(value) is int and low <= value <= high


def is_time(value: Any) -> TypeGuard[float]:
    """Whether ``value`` is a time (UTC seconds), as the manifest and audit entries say it."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e11


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
        if is_int(value, low) or (null and value is None):
            return value
        self.bad(f"{where}{key}", f"missing or not an integer (>= {low})")
        return None

    def get_time(self, parent: dict[str, Any], key: str, where: str) -> float | None:
        value = parent.get(key)
        if value is None:
            return None
        if is_time(value):
            return float(value)
        self.bad(f"{where}{key}", "not a time (UTC seconds)")
        return None


def parse_manifest(doc: dict[str, Any], report: VerifyReport) -> Manifest:
    """The manifest's fields; a failure for each missing or malformed one."""
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
    cameras: list[Camera] = []
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
        footage: list[Footage] = []
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
            footage.append(Footage(name, first, last, frames, capture))
        gaps: list[tuple[int, int, str]] = []
        for j, gap in enumerate(f.get_list(cam, "gaps", where)):
            if (
                isinstance(gap, dict)
                and is_int(gap.get("first"), 0)
                and is_int(gap.get("last"), 0)
                and gap["first"] <= gap["last"]
                and isinstance(gap.get("reason"), str)
            ):
                gaps.append((gap["first"], gap["last"], gap["reason"]))
            else:
                f.bad(f"{where}gaps[{j}]", "not {first, last, reason} (seqs in order)")
        holes: list[Range] = []
        for j, hole in enumerate(f.get_list(cam, "holes", where)):
            if (
                isinstance(hole, list)
                and len(hole) == 2
                and all(is_int(v, 0) for v in hole)
                and hole[0] <= hole[1]
            ):
                holes.append((hole[0], hole[1]))
            else:
                f.bad(f"{where}holes[{j}]", "not [first, last] (seqs in order)")
        checkpoints = f.get_str(cam, "checkpoints", where, null=True)
        cameras.append(Camera(cam_id, checkpoints, footage, gaps, holes))
    keys: list[Key] = []
    for i, item in enumerate(f.get_list(device_info, "keys", "device.")):
        at = f"device.keys[{i}]."
        if not isinstance(item, dict):
            f.bad(at[:-1], "not an object")
            continue
        kid, name = f.get_str(item, "kid", at), f.get_str(item, "file", at)
        cert = f.get_str(item, "certificate", at, null=True)
        if kid is not None and name is not None:
            keys.append(Key(kid, name, cert))
    receiver = f.get_str(f.get_obj(doc, "receiver", ""), "file", "receiver.")
    audit_info = doc.get("audit")
    audit_file = None
    if isinstance(audit_info, dict):
        audit_file = f.get_str(audit_info, "file", "audit.")
    elif audit_info is not None:
        f.bad("audit", "not an object or null")
    files: list[ListedFile] = []
    for i, item in enumerate(f.get_list(doc, "files", "")):
        at = f"files[{i}]"
        if (
            isinstance(item, dict)
            and isinstance(item.get("path"), str)
            and isinstance(item.get("sha256"), str)
            and _HEX64.fullmatch(item["sha256"])
            and is_int(item.get("size"), 0)
        ):
            files.append(ListedFile(item["path"], item["sha256"], item["size"]))
        else:
            f.bad(at, "not {path, sha256 (64 hex digits), size}")
    return Manifest(
        session=session_id,
        device=device,
        opened_at=f.get_time(session, "opened_at", "session."),
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


def check_files(source: Source, report: VerifyReport, manifest: Manifest) -> dict[str, int]:
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
            digest, size = source.sha256(name, item.size)
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


def _references(manifest: Manifest) -> dict[str, str]:
    """Every member the manifest refers to, and as what."""
    named: dict[str, str] = {}
    for cam in manifest.cameras:
        for item in cam.footage:
            named.setdefault(item.file, f"footage of camera {cam.id[:80]}")
        if cam.checkpoints is not None:
            named.setdefault(cam.checkpoints, f"the device's checkpoints of camera {cam.id[:80]}")
    for key in manifest.keys:
        named.setdefault(key.file, "a device key")
        if key.certificate is not None:
            named.setdefault(key.certificate, "a device key's enrollment certificate")
    if manifest.audit is not None:
        named.setdefault(manifest.audit, "the audit excerpt")
    if manifest.receiver is not None:
        named.setdefault(manifest.receiver, "the receiver's key")
    return named


def check_references(source: Source, report: VerifyReport, manifest: Manifest) -> None:
    """Every member the manifest refers to is in its list of files (with its SHA-256) and
    in the bundle: one that is neither was passed over by every check (a camera's footage
    listed as a file that exists nowhere stood for seqs never shown)."""
    listed = {f.path for f in manifest.files}
    for name, role in sorted(_references(manifest).items()):
        if name in listed:
            continue  # missing from the bundle: check_files says so
        if name in source.present:
            report.fail(
                name,
                f"the manifest names it as {role} but does not list it among its files: no "
                "SHA-256 of it is signed",
            )
        else:
            report.fail(
                name,
                f"missing: the manifest names it as {role}, but it is neither in the bundle "
                "nor among the manifest's files",
            )


def check_roles(report: VerifyReport, manifest: Manifest) -> None:
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
