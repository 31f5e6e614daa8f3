"""Evidence bundles: a session's footage with the device's chain of custody, signed.

:func:`build_bundle` writes one zip (layout in :mod:`receiver.evidence_format`)
for a session recorded under ``DATA/recordings/``, optionally for some of
its cameras and a capture time range (widened back to the keyframe at or
before its start, so the first frame decodes):

- the footage: each contiguous run of recorded seqs remuxed into a regular
  MP4 (index in front; the samples byte for byte as recorded, never
  re-encoded), its timestamps following the capture times the device signed;
  of a session still streaming, only what the device signed so far (its
  last second or so is signed a moment later);
- the device's checkpoints of its footage hash chain (:mod:`agent.chain`)
  that cover it, as the receiver received and checked them
  (:mod:`receiver.custody`), the device keys that signed them and the
  district's enrollment certificate for each, when there was one;
- the stretch of the receiver's copy of the device's audit trail
  (``DATA/audit/<device>.log``) from the session's first entry to the first
  signed audit checkpoint after its last one;
- the manifest: what all of this is and the SHA-256 of every file, signed
  with the receiver's evidence key (``DATA/evidence.key``, made on first use).

Nothing depends on the time of the export: the same recording gives the same
bundle, byte for byte. Blocking (files, PyAV): the web UI calls it through
``asyncio.to_thread``. ``breakglass evidence verify`` checks a bundle offline
(:mod:`receiver.evidence_verify`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import av
from av.container import OutputContainer
from av.video.stream import VideoStream

from agent.audit import CHECKPOINT as AUDIT_CHECKPOINT
from provisioning.documents import b64url, canonical
from provisioning.errors import KeyFileError
from provisioning.keys import kid as key_id
from provisioning.keys import load_public_key, public_pem
from receiver import custody, seqranges
from receiver.errors import MissingSpsError
from receiver.evidence_format import (
    BUNDLE_TYPE,
    MANIFEST,
    MANIFEST_CONTEXT,
    NO_SESSION_SEQS,
    README,
    RECEIVER_KEY,
    SIGNATURE,
    TIME_BASE,
    ZIP_TIME,
    EvidenceError,
    SessionSeqs,
    evidence_key,
    next_pts,
    owed_seqs,
    selected_bounds,
    session_seqs,
)
from receiver.fmp4 import scan_file
from receiver.h264 import parameter_sets
from receiver.run import capture_jump
from receiver.session_recording import read_session_json
from receiver.summaries import validate_camera_id, validate_session_id

__all__ = ["build_bundle"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_README = """\
breakglass evidence bundle
==========================

Check it, offline, with the breakglass tools:

    breakglass evidence verify BUNDLE.zip --device-key DEVICE.pub --receiver-key RECEIVER.pub
    (or --authority AUTHORITY.pub: the district's key that enrolled the device)

What each part is and how it is checked (manifest.json says which files):

- manifest.sig: Ed25519 signature of the receiver over
  "breakglass-evidence-manifest\\0" + the bytes of manifest.json.
  manifest.json lists the SHA-256 of every other file.
- footage/<camera>/<camera>.<first>-<last>.mp4: the camera's seqs first..last,
  sample i being seq first+i, samples as the camera encoded them
  (H.264, length-prefixed NAL units), 90 kHz timestamps from the capture times.
- chain/<camera>.jsonl: the device's signed checkpoints. Per camera, every packet
  is chained in seq order:
    link(seq) = SHA-256("breakglass-chain-v1\\0" || link(seq-1) || u64be seq ||
                        i64be capture_us || u8 flags (1 = keyframe) || digest)
  digest = SHA-256 over the sample's NAL units, each without trailing zero bytes
  and prefixed with its length as u32 big-endian (for a usual sample: SHA-256
  of the sample). A checkpoint signs, with the device key, the bytes
  "breakglass-chain-checkpoint\\0" + canonical JSON of
  {camera, device, first, head, kid, last, prev, v: 1} (prev/head in hex),
  and lists [capture_us, flags, digest] of each seq first..last.
- device/<kid>.pub, device/<kid>.enrollment.json: the device key(s), and the
  district's enrollment certificate for each when there was one.
- audit/<device>.log: the device's hash-chained, signed audit trail around the
  session (as the receiver received it).
"""


@dataclass(slots=True)
class _Part:
    file: str
    first_seq: int
    first_capture_us: int | None


@dataclass(slots=True)
class _Camera:
    id: str
    doc: dict[str, Any]
    runs: list[list[_Part]]


@dataclass(slots=True)
class _Footage:
    """One MP4 of the bundle."""

    file: str
    first_seq: int
    last_seq: int
    first_capture_us: int

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "frames": self.last_seq - self.first_seq + 1,
            "first_capture_us": self.first_capture_us,
        }


@dataclass(slots=True)
class _Staged:
    """The bundle's files while it is being made (relative name -> path on disk)."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files[name] = path
        return path

    def write(self, name: str, data: bytes) -> None:
        self.path(name).write_bytes(data)


def _us(when: datetime | None) -> int | None:
    if when is None:
        return None
    if when.tzinfo is None:
        raise EvidenceError(f"time {when.isoformat()} has no timezone")
    return (when - _EPOCH) // timedelta(microseconds=1)


def build_bundle(
    data_dir: Path,
    session_id: str,
    out: Path,
    *,
    cameras: Sequence[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Path:
    """Write the evidence bundle of a session to ``out`` (a new zip file); returns ``out``.

    ``cameras``: only these (default: every camera of the session); ``start`` /
    ``end``: only footage captured in that range (timezone-aware). Raises
    :class:`EvidenceError` (unknown session or camera, nothing to export,
    ``out`` exists) or :class:`receiver.errors.CorruptRecordingError`.
    """
    data_dir, out = Path(data_dir), Path(out)
    validate_session_id(session_id)
    start_us, end_us = _us(start), _us(end)
    if start_us is not None and end_us is not None and end_us < start_us:
        raise EvidenceError("the time range ends before it starts")
    if out.exists():
        raise EvidenceError(f"{out} exists; refusing to overwrite evidence")
    session_dir = data_dir / "recordings" / session_id
    doc = read_session_json(session_dir / "session.json")
    if doc is None:
        raise EvidenceError(f"no recording of session {session_id!r} in {data_dir}")
    chosen = _cameras(doc, cameras)
    device = str(doc["device_id"])
    # Footage of pupils: readable by the receiver's user only, whatever its umask (a
    # receiver run by hand has 022). A folder it creates is 0700, the bundle 0600.
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".evidence-") as tmp:
        staged = _Staged(Path(tmp))
        live = doc.get("closed_at") is None
        audit, seqs, end_signed = _audit_excerpt(staged, data_dir, device, session_id)
        entries = [
            _camera_entry(staged, session_dir, cam, start_us, end_us, seqs, live=live)
            for cam in chosen
        ]
        if not any(e["footage"] for e in entries):
            raise EvidenceError(f"session {session_id!r}: no footage in the selection")
        manifest = {
            "type": BUNDLE_TYPE,
            "v": 1,
            "session": {
                "id": session_id,
                "device": device,
                "meta": doc.get("meta", {}),
                "opened_at": doc.get("opened_at"),
                "closed_at": doc.get("closed_at"),
                "close_reason": doc.get("close_reason"),
            },
            "selection": {
                # Whether the device had not signed the session's end yet: still
                # streaming, or ended a moment ago (the device signs its trail every
                # minute); the verifier requires a signed end of a bundle that says it had.
                "open_session": live or not end_signed,
                "cameras": [c.id for c in chosen],
                "from_us": start_us,
                "to_us": end_us,
            },
            "chain": {"format": "breakglass-chain-v1", "digest": "h264-nal-units-u32be"},
            "cameras": entries,
            "device": {"id": device, "keys": _device_keys(staged, data_dir, session_dir, device)},
            "audit": audit,
        }
        key = evidence_key(data_dir)
        staged.write(RECEIVER_KEY, public_pem(key.public_key()))
        manifest["receiver"] = {"kid": key_id(key.public_key()), "file": RECEIVER_KEY}
        staged.write(README, _README.encode())
        manifest["files"] = [
            {"path": name, "sha256": sha256_file(path), "size": path.stat().st_size}
            for name, path in sorted(staged.files.items())
        ]
        body = canonical(manifest)
        sig = key.sign(MANIFEST_CONTEXT + body)
        signature = canonical({"kid": key_id(key.public_key()), "sig": b64url(sig)})
        _zip(out, {**staged.files}, {MANIFEST: body, SIGNATURE: signature})
    return out


def _cameras(doc: dict[str, Any], wanted: Sequence[str] | None) -> list[_Camera]:
    found: list[_Camera] = []
    for cam in doc.get("cameras", []):
        runs = [
            [
                _Part(str(p["file"]), int(p["first_seq"]), p.get("first_capture_us"))
                for p in r["parts"]
            ]
            for r in cam["runs"]
        ]
        found.append(_Camera(validate_camera_id(cam["camera_id"]), cam, runs))
    if wanted is None:
        return found
    by_id = {c.id: c for c in found}
    unknown = [c for c in wanted if c not in by_id]
    if unknown:
        raise EvidenceError(f"the session has no camera {', '.join(map(repr, unknown))}")
    return [by_id[c] for c in dict.fromkeys(wanted)]


def _camera_entry(
    staged: _Staged,
    session_dir: Path,
    cam: _Camera,
    start_us: int | None,
    end_us: int | None,
    seqs: SessionSeqs,
    *,
    live: bool,
) -> dict[str, Any]:
    records = custody.read_records(session_dir / custody.CHAIN_DIR / f"{cam.id}.jsonl")
    signed: dict[int, int] = {}  # seq -> capture time the device signed (for timestamps)
    for record in records:
        if record.ok:
            for seq, (capture_us, _, _) in record.checkpoint.iter_entries():
                signed.setdefault(seq, capture_us)
    # A session still streaming: up to the last seq signed yet (never its unsigned tail).
    upto = max(signed, default=-1) if live else None
    footage = _write_footage(staged, session_dir, cam, signed, start_us, end_us, upto)
    entry: dict[str, Any] = {
        key: cam.doc.get(key) for key in ("zone", "codec", "width", "height", "fps")
    }
    entry.update({"id": cam.id, "footage": [f.to_json() for f in footage]})
    held = [(f.first_seq, f.last_seq) for f in footage]
    # The checkpoints kept: those over the footage and the seq on either side of it (the
    # verifier sees by their capture times whether the footage reaches the range's
    # edges), and those over the camera's signed first and last seq in the session
    # (whether the range covers them): evidence_format.selected_bounds.
    ends = [s for s in (seqs.first.get(cam.id), seqs.last.get(cam.id)) if s is not None]
    spans = [(a - 1, b + 1) for a, b in held] + [(s, s) for s in ends]
    kept = sorted(
        (r for r in records if any(r.checkpoint.last >= a and r.checkpoint.first <= b
                                   for a, b in spans)),
        key=lambda r: (r.checkpoint.first, r.checkpoint.last, r.source, r.result),
    )  # fmt: skip
    captures: dict[int, int] = {}
    for r in kept:
        if r.ok:
            for seq, fields in r.checkpoint.iter_entries():
                captures.setdefault(seq, fields[0])
    bounds = selected_bounds(seqs, cam.id, start_us, end_us, held, captures.get)
    if not footage and bounds == (None, None):
        entry.update({"checkpoints": None, "gaps": [], "holes": []})
        return entry
    name = f"chain/{cam.id}.jsonl"
    unique = list(dict.fromkeys(custody.record_line(r) for r in kept))
    staged.write(name, b"".join(unique))
    entry["checkpoints"] = name
    files = [(footage[0].first_seq, footage[-1].last_seq)] if footage else []
    wanted = owed_seqs(files, sorted(captures.items()), start_us, end_us, bounds)
    entry["gaps"] = [
        g
        for g in cam.doc.get("gaps", [])
        if any(int(g["last"]) >= a and int(g["first"]) <= b for a, b in wanted)
    ]
    # What it lacks that the device did not declare lost either (receiver.evidence_format).
    declared = [(int(g["first"]), int(g["last"])) for g in entry["gaps"]]
    entry["holes"] = [
        list(r) for a, b in wanted for r in seqranges.missing(a, b, [*held, *declared])
    ]
    return entry


def _samples(
    session_dir: Path, part: _Part, signed: dict[int, int]
) -> Generator[tuple[int, bytes, bool, int, VideoStream], None, None]:
    """(seq, sample, keyframe, capture µs, stream) of a part's durable samples, in order."""
    path = session_dir / part.file
    with path.open("rb") as fh:
        count = scan_file(fh).samples
    if count == 0:
        return
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        tb = stream.time_base or TIME_BASE
        n = 0
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            seq = part.first_seq + n
            capture = signed.get(seq)
            if capture is None:  # not signed: the receiver's own clock mapping
                origin = part.first_capture_us or 0
                capture = origin + round(float((packet.pts or 0) * tb) * 1e6)
            yield seq, bytes(packet), bool(packet.is_keyframe), capture, stream
            n += 1
            if n >= count:
                return


class _Writer:
    """Remuxes one contiguous piece into a regular MP4 (samples untouched)."""

    def __init__(
        self, path: Path, template: VideoStream, first_seq: int, capture_us: int, fps: float
    ) -> None:
        self.path = path
        self.first_seq = self.last_seq = first_seq
        self.first_capture_us = self.last_capture_us = capture_us
        self.extradata = bytes(template.codec_context.extradata or b"")
        self._out: OutputContainer = av.open(
            str(path), "w", format="mp4", options={"movflags": "+faststart"}
        )
        self._stream = self._out.add_stream_from_template(template)
        self._stream.time_base = TIME_BASE
        created = _EPOCH + timedelta(microseconds=capture_us)
        self._out.metadata["creation_time"] = created.isoformat(timespec="microseconds")
        self._duration = round(90_000 / fps) if fps > 0 else 3000
        self._held: Any = None
        self._last_pts = -1
        self.frames = 0

    def add(self, seq: int, data: bytes, keyframe: bool, capture_us: int) -> None:
        self.last_capture_us = capture_us
        pts = next_pts(capture_us, self.first_capture_us, self._last_pts)
        packet = av.Packet(data)
        packet.stream = self._stream
        packet.time_base = TIME_BASE
        packet.pts = packet.dts = pts
        packet.is_keyframe = keyframe
        self._flush(pts)
        self._held = packet
        self._last_pts = pts
        self.last_seq = seq
        self.frames += 1

    def _flush(self, next_pts: int | None) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.duration = self._duration if next_pts is None else next_pts - int(held.pts or 0)
            self._out.mux_one(held)

    def close(self) -> None:
        self._flush(None)
        self._out.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._out.close()


def _write_footage(
    staged: _Staged,
    session_dir: Path,
    cam: _Camera,
    signed: dict[int, int],
    start_us: int | None,
    end_us: int | None,
    upto: int | None,
) -> list[_Footage]:
    """Remux the camera's recorded runs (in the time range, up to seq ``upto``) into MP4s."""
    pieces = _Pieces(staged, cam.id, float(cam.doc.get("fps") or 0), start_us)
    try:
        for run in sorted(cam.runs, key=lambda r: r[0].first_seq):
            for part in run:
                with contextlib.closing(_samples(session_dir, part, signed)) as samples:
                    for seq, data, key, capture, stream in samples:
                        if (end_us is not None and capture > end_us) or (
                            upto is not None and seq > upto
                        ):
                            break
                        pieces.add(seq, data, key, capture, stream)
        pieces.end()
    except BaseException:
        pieces.abort()
        raise
    return pieces.done


class _Pieces:
    """Cuts a camera's samples into the bundle's MP4s: one per stretch of consecutive seqs
    (runs recorded back to back, such as the pre-roll and the live run, make one)."""

    def __init__(self, staged: _Staged, camera: str, fps: float, start_us: int | None) -> None:
        self._staged, self._camera, self._fps, self._start_us = staged, camera, fps, start_us
        self._writer: _Writer | None = None
        #: Samples since the last keyframe before the range starts (its lead-in).
        self._lead_in: list[tuple[int, bytes, bool, int]] = []
        self.done: list[_Footage] = []

    def add(self, seq: int, data: bytes, key: bool, capture_us: int, stream: VideoStream) -> None:
        """One recorded sample, in seq order within a run."""
        item = (seq, data, key, capture_us)
        if self._writer is not None and seq != self._writer.last_seq + 1:
            self._finish()  # a hole: what follows is another file
        if self._lead_in and seq != self._lead_in[-1][0] + 1:
            self._lead_in = []
        if self._writer is None and self._start_us is not None and capture_us < self._start_us:
            self._lead_in = [item] if key else [*self._lead_in, item] if self._lead_in else []
            return
        writer = self._writer
        if writer is not None and not _same_sets(writer.extradata, stream.codec_context.extradata):
            self._finish()  # new SPS/PPS (a camera reconnected): a file of its own
            writer = None
        mid_gop = False
        if writer is not None and capture_jump(writer.last_capture_us, capture_us):
            # The device's clock stepped (or the camera stalled): a file of its own, from
            # this frame on (a step of over 13.26 h is no MP4 sample duration: the muxer
            # refused it and the whole export failed), as the receiver's parts are cut.
            self._finish()
            writer, mid_gop = None, True
        for seq2, data2, key2, at in [*self._lead_in, item]:
            if writer is None:
                if not key2 and not mid_gop:
                    continue  # nothing decodes before a keyframe
                tmp = self._staged.root / f".{self._camera}.{seq2}.mp4"
                writer = self._writer = _Writer(tmp, stream, seq2, at, self._fps)
            writer.add(seq2, data2, key2, at)
        self._lead_in = []

    def end(self) -> None:
        """No more samples."""
        self._finish()

    def _finish(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self.done.append(_finish(self._staged, self._camera, writer))

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def _finish(staged: _Staged, camera: str, writer: _Writer) -> _Footage:
    writer.close()
    name = f"footage/{camera}/{camera}.{writer.first_seq}-{writer.last_seq}.mp4"
    os.replace(writer.path, staged.path(name))
    return _Footage(name, writer.first_seq, writer.last_seq, writer.first_capture_us)


def _device_keys(
    staged: _Staged, data_dir: Path, session_dir: Path, device: str
) -> list[dict[str, Any]]:
    """The device keys the session's checkpoints were checked with (and certificates)."""
    keys = custody.read_keys(session_dir)
    if not keys:  # nothing signed yet: the allow-listed key, if any
        with contextlib.suppress(KeyFileError, OSError):
            pub = load_public_key(data_dir / "devices" / f"{device}.pub")
            keys = {key_id(pub): custody.DeviceKey(device, pub)}
    listed: list[dict[str, Any]] = []
    for kid, dk in sorted(keys.items()):
        name = f"device/{kid}.pub"
        staged.write(name, public_pem(dk.key))
        cert = None
        if dk.certificate is not None:
            cert = f"device/{kid}.enrollment.json"
            staged.write(cert, canonical(dict(dk.certificate)))
        listed.append({"kid": kid, "file": name, "certificate": cert})
    return listed


def _audit_excerpt(
    staged: _Staged, data_dir: Path, device: str, session_id: str
) -> tuple[dict[str, Any] | None, SessionSeqs, bool]:
    """The receiver's copy of the device's trail from the session's first entry to the
    first signed checkpoint after its last one (whole lines, as received), what its
    entries of the session say of its seqs (holes are declared by them), and whether the
    session's end is in it, signed (a checkpoint follows it)."""
    try:
        data = (data_dir / "audit" / f"{device}.log").read_bytes()
    except (FileNotFoundError, ValueError):
        return None, NO_SESSION_SEQS, False
    lines = data.split(b"\n")
    parsed: list[dict[str, Any] | None] = []
    for line in lines:
        try:
            obj = json.loads(line) if line else None
        except ValueError:
            obj = None
        parsed.append(obj if isinstance(obj, dict) else None)
    mine = [
        i for i, obj in enumerate(parsed) if obj is not None and obj.get("session") == session_id
    ]
    if not mine:
        return None, NO_SESSION_SEQS, False
    seqs = session_seqs(obj for i in mine if (obj := parsed[i]) is not None)
    first, last = mine[0], mine[-1]
    end_signed = False
    for i in range(last + 1, len(parsed)):
        obj = parsed[i]
        if obj is not None and obj.get("event") == AUDIT_CHECKPOINT:
            last = i
            end_signed = any(
                (e := parsed[j]) is not None and e.get("event") == "session_end" for j in mine
            )
            break
    excerpt = [line + b"\n" for line in lines[first : last + 1]]
    name = f"audit/{device}.log"
    staged.write(name, b"".join(excerpt))
    numbers = [obj["n"] for obj in parsed[first : last + 1] if obj is not None and "n" in obj]
    return (
        {
            "file": name,
            "first_n": numbers[0] if numbers else None,
            "last_n": numbers[-1] if numbers else None,
            "session_entries": len(mine),
        },
        seqs,
        end_signed,
    )


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _zip(out: Path, files: dict[str, Path], small: dict[str, bytes]) -> None:
    """Write the zip: members in name order, stored, fixed times; atomically."""
    partial = out.with_name(out.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
        ):
            for name in sorted({*files, *small}):
                info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                info.create_system = 3
                if name in small:
                    zf.writestr(info, small[name])
                else:
                    info.file_size = files[name].stat().st_size
                    with files[name].open("rb") as src, zf.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        with partial.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def _same_sets(avcc: bytes, other: bytes | None) -> bool:
    """Whether two parts' ``avcC`` records hold the same SPS and PPS. Not byte for byte:
    parts an older receiver began mid-GOP have a zero byte more on the PPS
    (:func:`receiver.run.make_part_init`)."""
    other = bytes(other or b"")
    if avcc == other:
        return True
    try:
        return parameter_sets(avcc) == parameter_sets(other)
    except MissingSpsError:
        return False
