"""An evidence bundle's footage, checked against the checkpoints the device signed.

:func:`signed_entries` reads each camera's checkpoints (``chain/<camera>.jsonl``)
and keeps the entries of those a trusted device key signed and whose entries
fold to their signed head: seq -> (capture time, flags, payload digest).
:func:`check_footage` compares every sample of every MP4 with the entry of its
seq, and the seqs a camera's files hold with those the device signed: a seq
left out of the bundle must be declared missing (the manifest's ``gaps`` and
``holes``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import av
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import chain
from receiver import seqranges
from receiver.custody import parse_record
from receiver.evidence_audit import Trail
from receiver.evidence_findings import MAX_FINDINGS_PER_PART, VerifyReport, iso
from receiver.evidence_format import (
    MANIFEST,
    NO_SESSION_SEQS,
    Mp4Refused,
    SessionSeqs,
    bound_reasons,
    next_pts,
    open_mp4,
    owed_seqs,
)
from receiver.evidence_manifest import Camera, Footage, Manifest
from receiver.evidence_zip import MemberError, Source, shallow

__all__ = ["Signed", "check_footage", "signed_entries"]

#: A checkpoint line: at most 256 entries of about 90 bytes each, and its fields.
MAX_CHAIN_LINE: Final = 1024 * 1024
#: A frame is the session's if captured before the device's signed session_end entry
#: (written after the session's last frame, on the same clock), with this margin.
SESSION_END_MARGIN_US: Final = 2_000_000
#: What the device signed of a seq: (capture_us, flags, payload digest).
_Entry = tuple[int, int, bytes]
#: Per camera id, its signed entries by seq.
Signed = dict[str, dict[int, _Entry]]


def signed_entries(
    source: Source,
    report: VerifyReport,
    manifest: Manifest,
    keys: dict[str, Ed25519PublicKey],
) -> Signed:
    """Per camera, seq -> (capture_us, flags, digest) from every checkpoint that verifies."""
    signed: Signed = {}
    for cam in manifest.cameras:
        entries = signed.setdefault(cam.id, {})
        name = cam.checkpoints
        if name is None or not source.holds(name):
            continue  # reported as missing (check_files, check_references)
        failed = 0  # lines that failed: a genuine file has none (reading on costs CPU only)
        try:
            for number, line in source.lines(name, MAX_CHAIN_LINE):
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
    manifest: Manifest,
    cam: Camera,
    keys: dict[str, Ed25519PublicKey],
    entries: dict[int, _Entry],
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
        shallow(line)
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


def check_footage(
    source: Source,
    report: VerifyReport,
    manifest: Manifest,
    signed: Signed,
    readable: dict[str, int],
    trail: Trail | None,
    tmp: Path,
) -> None:
    """Every camera's MP4s (``readable``: those that may be copied to ``tmp``, at most
    the size given) against ``signed``, and its seqs left out."""
    end_us = None if trail is None else trail.end_us
    seqs = NO_SESSION_SEQS if trail is None else trail.seqs
    seen: set[str] = set()
    for cam in manifest.cameras:
        part = f"camera {cam.id}"
        entries = signed.get(cam.id, {})
        held: list[seqranges.Range] = []
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
            # Where the device signed the camera's last seq of the session, that bounds it
            # whatever its clock did (a clock stepped back, or slewing back to UTC, stamps
            # genuine frames after the end's time): a late capture time is a warning then.
            strict = seqs.last.get(cam.id) is None
            found = _one_file(source, report, item, entries, readable, end_us, tmp, strict)
            if found is not None:
                latest = found if latest is None else max(latest, found)
        reach = -1
        for a, b in sorted(held):
            if a <= reach:
                report.fail(part, f"seqs {a}..{min(b, reach)} are in two of its files")
            reach = max(reach, b)
        _check_session_seqs(report, manifest, part, held, seqs, cam.id, trail)
        # Every seq between its files, every seq signed in the time range, and those from
        # the session's first seq and to its last (signed), is in a file or declared
        # missing: the device's checkpoints and trail show what it had.
        ordered = sorted(entries)
        captured = ((seq, entries[seq][0]) for seq in ordered)
        reasons = bound_reasons(
            seqs, cam.id, manifest.from_us, manifest.to_us, held, _captures(entries)
        )
        bounds = (reasons[0] and reasons[0][0], reasons[1] and reasons[1][0])
        wanted = owed_seqs(held, captured, manifest.from_us, manifest.to_us, bounds)
        declared = [(a, b) for a, b, _ in cam.gaps] + cam.holes
        left_out = [r for a, b in wanted for r in seqranges.missing(a, b, [*held, *declared])]
        if left_out:
            signed_out = _Seqs()
            for a, b in left_out:
                for seq in ordered[bisect_left(ordered, a) : bisect_right(ordered, b)]:
                    signed_out.add(seq)
            report.fail(
                part,
                f"seqs {_show(left_out)}: not in the bundle, and not declared missing"
                + (f" (the device signed seqs {signed_out} of them)" if signed_out else "")
                + _edges(left_out, reasons),
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
                f"({iso(start_us)}, the device's signed session_start; the last frame "
                f"{iso(latest)}): none of the emergency itself",
            )
        capture_of = _captures(entries)
        for first, last, reason in cam.gaps:
            report.warn(
                part,
                f"seqs {first}..{last} declared {reason[:80]!r} by the receiver (what it "
                "says the device reported: the device does not sign it): not in the bundle"
                + _span(capture_of(first - 1), capture_of(last + 1)),
            )
        for first, last in cam.holes:
            report.warn(
                part, f"seqs {first}..{last} not in the recording (declared by the receiver)"
            )


def _span(before_us: int | None, after_us: int | None) -> str:
    """How long a declared gap lasted by the signed capture times around it: a restart
    skips the rest of its block of reserved numbers, so the seq count overstates it."""
    if before_us is None or after_us is None or after_us < before_us:
        return ""
    return f"; {(after_us - before_us) / 1e6:.1f} s between the signed frames around it"


def _captures(entries: dict[int, _Entry]) -> Callable[[int], int | None]:
    """A seq's capture time as the device signed it (None: not signed in the bundle)."""

    def capture_of(seq: int) -> int | None:
        entry = entries.get(seq)
        return None if entry is None else entry[0]

    return capture_of


def _edges(
    left_out: list[seqranges.Range],
    reasons: tuple[tuple[int, str] | None, tuple[int, str] | None],
) -> str:
    """Why the seqs at the session's edges are owed, if some left out are there."""
    first, last = reasons
    why = []
    if first is not None and any(a <= first[0] <= b for a, b in left_out):
        why.append(
            f"from the camera's first seq in the session, {first[0]} (the device's signed "
            f"disclosure): {first[1]}"
        )
    if last is not None and any(a <= last[0] <= b for a, b in left_out):
        why.append(
            f"to the camera's last seq in the session, {last[0]} (the device's signed "
            f"session_end): {last[1]}"
        )
    return f"; owed {'; and '.join(why)}" if why else ""


def _check_session_seqs(
    report: VerifyReport,
    manifest: Manifest,
    part: str,
    held: list[seqranges.Range],
    seqs: SessionSeqs,
    camera: str,
    trail: Trail | None,
) -> None:
    """Footage outside the camera's first..last seq of the session (the device's signed
    disclosure and session_end) is another session's; a closed session whose end does
    not sign the camera's last seq cannot show a cut tail (an older agent)."""
    first, last = seqs.first.get(camera), seqs.last.get(camera)
    before = [(a, min(b, first - 1)) for a, b in held if first is not None and a < first]
    after = [(max(a, last + 1), b) for a, b in held if last is not None and b > last]
    if before:
        report.fail(
            part,
            f"seqs {_show(before)}: before the camera's first seq in the session ({first}, "
            "the device's signed disclosure): footage of another time",
        )
    if after:
        report.fail(
            part,
            f"seqs {_show(after)}: after the camera's last seq in the session ({last}, the "
            "device's signed session_end): footage of another time",
        )
    if trail is not None and trail.end_us is not None and last is None:
        report.warn(
            part,
            "the device's signed session_end does not give the camera's last seq (an older "
            "agent): footage cut from the session's end could go unnoticed",
        )


def _one_file(
    source: Source,
    report: VerifyReport,
    item: Footage,
    entries: dict[int, _Entry],
    readable: dict[str, int],
    end_us: int | None,
    tmp: Path,
    strict: bool = True,
) -> int | None:
    """Check one MP4; the latest capture time of its samples that verified."""
    name, first, frames = item.file, item.first, item.frames
    report.frames += frames
    if not source.holds(name):
        return None  # reported as missing (check_files, check_references)
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
    except Mp4Refused as exc:
        report.fail(name, f"refused: {exc}")
        return None
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
    if late and end_us is not None and strict:
        report.fail(
            name,
            f"seqs {late}: captured after the session ended ({iso(end_us)}, the device's "
            "signed session_end): footage of another time",
        )
    elif late and end_us is not None:
        report.warn(
            name,
            f"seqs {late}: captured after the session ended ({iso(end_us)}, the device's "
            "signed session_end) by the device's clock, within the session's signed last "
            "seq: the device's clock stepped back (or ran ahead) during the session",
        )
    return latest
