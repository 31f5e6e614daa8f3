"""What an evidence bundle is made of: its layout, signature, MP4 samples and the receiver's key.

Shared by the builder (:mod:`receiver.evidence`) and the offline verifier
(:mod:`receiver.evidence_verify`). A bundle is a zip (stored, not
compressed: the footage does not compress), its members in name order with
a fixed time stamp, so the same recording always gives the same bytes::

    manifest.json                       canonical JSON: what is in the bundle, and why
    manifest.sig                        the receiver's Ed25519 signature over it
    receiver.pub                        the receiver's evidence public key (PEM)
    device/<kid>.pub                    the device key(s) that signed the footage (PEM)
    device/<kid>.enrollment.json        the district's certificate for that key, if any
    footage/<camera>/<camera>.<first>-<last>.mp4   remuxed footage, seqs first..last
    chain/<camera>.jsonl                the device's checkpoints (receiver.custody lines)
    audit/<device>.log                  the device's audit trail around the session
    README.txt                          how to check all of it

``manifest.sig`` is ``{"kid", "sig"}``: ``sig`` is b64url of the Ed25519
signature over :data:`MANIFEST_CONTEXT` followed by the bytes of
``manifest.json`` exactly as stored.

Every member is stored (never compressed, never encrypted), back to back from
the zip's first byte to its central directory, then the end record, no
comment. Every MP4 holds one stream, a video track (nothing a player could
show instead; identity display matrices, no crop, no stretch), of one
camera's consecutive seqs ``first..last`` (sample ``i`` is seq ``first + i``),
named ``footage/<camera>/<camera>.<first>-<last>.mp4`` and listed under that
camera in the manifest, samples byte for byte as recorded (the camera's own
H.264, length-prefixed), in a 90 kHz time base where sample ``i`` has
``pts(i) = max(round((capture_us(i) - capture_us(0)) * 0.09), pts(i-1) + 1)``
(rounding half up), ``capture_us`` being the capture time the device signed:
the same rule the receiver's recordings follow (:mod:`receiver.run`).

A camera's ``holes`` are the seqs the bundle lacks and the device did not
declare lost (``gaps``): those between its files, and those the device
signed (in a checkpoint of the bundle) in the selected time range that the
receiver never recorded, and those from the camera's first seq (the device's
signed ``disclosure``) and to its last (its signed ``session_end``) when the
selection covers them or the camera's footage stops well short of the
selection's edge (:func:`selected_bounds`). The verifier computes them again
from the device's checkpoints and trail: a seq left out without being
declared is a failure.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Final, NamedTuple

import av
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.errors import KeyFileError
from provisioning.keys import kid, load_private_key, public_pem, write_secret
from receiver import seqranges
from receiver.errors import ExportError
from receiver.evidence_findings import iso

__all__ = [
    "EDGE_MARGIN_US",
    "MANIFEST",
    "MANIFEST_CONTEXT",
    "NO_SESSION_SEQS",
    "SIGNATURE",
    "EvidenceError",
    "Mp4Header",
    "Mp4Refused",
    "Mp4Sample",
    "SessionSeqs",
    "bound_reasons",
    "display_problem",
    "evidence_key",
    "next_pts",
    "open_mp4",
    "owed_seqs",
    "selected_bounds",
    "session_seqs",
]

log = logging.getLogger(__name__)

MANIFEST: Final = "manifest.json"
SIGNATURE: Final = "manifest.sig"
RECEIVER_KEY: Final = "receiver.pub"
README: Final = "README.txt"
MANIFEST_CONTEXT: Final = b"breakglass-evidence-manifest\x00"
BUNDLE_TYPE: Final = "breakglass-evidence"
#: The receiver's evidence signing key, in its data folder.
EVIDENCE_KEY_FILE: Final = "evidence.key"
#: Every stored member gets this time (zip's earliest): the bundle is deterministic.
ZIP_TIME: Final = (1980, 1, 1, 0, 0, 0)
TIME_BASE: Final = Fraction(1, 90_000)
#: Member names a bundle may have: relative, no "..", no backslashes.
NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:@-]+(/[A-Za-z0-9_.:@-]+)*")


class EvidenceError(ExportError, ValueError):
    """An export that cannot be made (unknown session, no footage, an existing file)."""


def safe_name(name: str) -> bool:
    """Whether ``name`` may be a bundle member (relative, plain, no parent references)."""
    return NAME_RE.fullmatch(name) is not None and ".." not in name.split("/")


def next_pts(capture_us: int, origin_us: int, last_pts: int) -> int:
    """The 90 kHz pts of a sample: rounded from its capture time, always increasing."""
    pts = ((capture_us - origin_us) * 9 + 50) // 100
    return pts if pts > last_pts else last_pts + 1


class Mp4Sample(NamedTuple):
    """One sample of an MP4's video track."""

    data: bytes
    keyframe: bool
    #: In the stream's time base (90 kHz in a bundle).
    pts: int
    #: Marked to be dropped by players (an edit list hides it): a bundle's never is.
    discard: bool


@dataclass(frozen=True, slots=True)
class Mp4Header:
    """What an MP4's one video track says about its samples."""

    codec: str
    length_size: int
    extradata: bytes
    #: Whether the stream's time base is 90 kHz (pts are in it either way).
    ninety_khz: bool


class Mp4Refused(ValueError):
    """An MP4 that holds something a player could show instead of the footage checked."""


#: The identity display matrix (16.16 fixed point; the last column 2.30), as the
#: exporter writes it in ``mvhd`` and ``tkhd``.
IDENTITY_MATRIX: Final = (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_MATRIX: Final = struct.Struct(">9i")
#: Boxes :func:`display_problem` descends into (a sample entry's children follow its
#: fields: 8 bytes of stsd's, 78 of a visual sample entry's).
_CONTAINERS: Final = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf"})
_SKIP: Final = {b"stsd": 8, b"avc1": 78, b"avc3": 78, b"encv": 78}
#: Boxes nested deeper than this, or more boxes than this: not an MP4 the exporter wrote.
_MAX_DEPTH: Final = 12
_MAX_BOXES: Final = 10_000


def display_problem(path: Path) -> str | None:
    """What in an MP4 tells a player to show its pictures other than as encoded (None:
    nothing): a display matrix in ``mvhd`` or ``tkhd`` other than the identity (a mirror,
    a rotation, a shift, a scale), a ``clap`` box (a crop) or a ``pasp`` box whose pixels
    are not square (a stretch). The device signs the samples, not these boxes. Reads the
    boxes' headers and those few fields only (never the media)."""
    with path.open("rb") as fh:
        walker = _BoxWalker(fh)
        walker.walk(0, fh.seek(0, 2), 0)
        return walker.found


class _BoxWalker:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.found: str | None = None
        self.count = 0

    def walk(self, start: int, end: int, depth: int) -> None:
        pos = start
        while pos + 8 <= end and self.found is None:
            self.count += 1
            if self.count > _MAX_BOXES or depth > _MAX_DEPTH:
                self.found = "boxes nested too deep or too many: not as the exporter writes"
                return
            self.fh.seek(pos)
            head = self.fh.read(16)
            box_size, kind = struct.unpack(">I4s", head[:8])
            header = 8
            if box_size == 1 and len(head) == 16:
                box_size, header = struct.unpack(">Q", head[8:16])[0], 16
            elif box_size == 0:
                box_size = end - pos
            if box_size < header or pos + box_size > end:
                return  # damaged: the demuxer says what it makes of it
            self.box(kind, pos + header, pos + box_size, depth)
            pos += box_size

    def box(self, kind: bytes, body: int, end: int, depth: int) -> None:
        name = kind.decode("latin-1")
        if kind in (b"mvhd", b"tkhd"):
            self.fh.seek(body)
            v1 = self.fh.read(1) == b"\x01"
            times = (28 if v1 else 16) if kind == b"mvhd" else (32 if v1 else 20)
            at = body + 4 + times + 16
            self.fh.seek(at)
            raw = self.fh.read(_MATRIX.size)
            if at + _MATRIX.size > end or len(raw) < _MATRIX.size:
                self.found = f"its {name} box is too short for a display matrix"
            elif (matrix := _MATRIX.unpack(raw)) != IDENTITY_MATRIX:
                self.found = (
                    f"its {name} box's display matrix is {list(matrix)}, not the identity: "
                    "players would show the picture transformed (mirrored, rotated, moved or "
                    "scaled)"
                )
        elif kind == b"clap":
            self.found = "it has a clap box: players would show the picture cropped"
        elif kind == b"pasp":
            self.fh.seek(body)
            spacing = self.fh.read(8)
            if end - body < 8 or spacing[:4] != spacing[4:]:
                self.found = (
                    "it has a pasp box whose pixels are not square: players would show the "
                    "picture stretched"
                )
        elif kind in _CONTAINERS:
            self.walk(body, end, depth + 1)
        elif kind in _SKIP:
            self.walk(body + _SKIP[kind], end, depth + 1)


@contextmanager
def open_mp4(path: Path) -> Iterator[tuple[Mp4Header, Iterator[Mp4Sample]]]:
    """The header and the samples (read one at a time, never all held) of an MP4 that holds
    exactly one stream, a video track, as a bundle's MP4s do: anything else (a second video
    track, an audio track) is a ValueError, since a player may show or play it instead of
    the footage checked; so is a display matrix other than the identity, a crop or a
    stretch (:func:`display_problem`): both :class:`Mp4Refused`. Read as MP4 whatever its
    bytes look like. Raises ``av.FFmpegError``, ``OSError`` or ValueError (also while
    iterating) when it cannot be read."""
    problem = display_problem(path)
    if problem is not None:
        raise Mp4Refused(problem)
    with av.open(str(path), format="mp4") as container:
        streams = list(container.streams)
        if len(streams) != 1 or streams[0].type != "video":
            kinds = ", ".join(str(s.type) for s in streams) or "none"
            raise Mp4Refused(
                f"holds {len(streams)} streams ({kinds}), not one video track: a player "
                "could show what is not the footage checked"
            )
        stream = container.streams.video[0]
        extradata = bytes(stream.codec_context.extradata or b"")
        length_size = (extradata[4] & 3) + 1 if len(extradata) > 4 and extradata[0] == 1 else 4
        header = Mp4Header(
            str(stream.codec_context.name), length_size, extradata, stream.time_base == TIME_BASE
        )

        def samples() -> Iterator[Mp4Sample]:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream packet
                yield Mp4Sample(
                    bytes(packet),
                    bool(packet.is_keyframe),
                    int(packet.pts or 0),
                    bool(packet.is_discard),
                )

        yield header, samples()


@dataclass(frozen=True, slots=True)
class SessionSeqs:
    """What the device's trail says of a session's seqs: each camera's first (its
    ``disclosure``: pre-roll included), its last (its ``session_end``), when the
    session ended and when it started (µs; None: not known)."""

    first: Mapping[str, int]
    last: Mapping[str, int]
    end_us: int | None
    start_us: int | None = None


NO_SESSION_SEQS: Final = SessionSeqs({}, {}, None)
#: A camera's footage in a bundle that begins this much after the selection's start (or
#: ends this much before its end) does not reach it: the seqs from the camera's signed
#: first seq (or to its signed last) are owed, unless the device's signed capture time of
#: the seq just outside the footage shows it outside the selection. About the most
#: footage the device ever leaves unsigned (it signs every second or so).
EDGE_MARGIN_US: Final = 1_000_000


def session_seqs(entries: Iterable[Mapping[str, Any]]) -> SessionSeqs:
    """The :class:`SessionSeqs` of a session's ``disclosure`` and ``session_end`` entries
    (the caller picks them: the exporter every one it has, the verifier the signed
    ones). Malformed cameras are skipped; the verifier reports them itself."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    end_us: int | None = None
    start_us: int | None = None
    for entry in entries:
        cams = entry.get("cameras")
        event = entry.get("event")
        t = entry.get("t")
        at = (
            round(t * 1e6)
            if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
            else None
        )
        if event == "session_end" and at is not None:
            end_us = max(end_us or 0, at)
        elif event == "session_start" and at is not None:
            start_us = at if start_us is None else min(start_us, at)
        for cam in cams if isinstance(cams, list) else ():
            if not isinstance(cam, dict) or not isinstance(cid := cam.get("id"), str):
                continue
            if event == "disclosure" and type(seq := cam.get("first")) is int and seq >= 0:
                first[cid] = min(first.get(cid, seq), seq)
            elif event == "session_end" and type(seq := cam.get("last")) is int and seq >= -1:
                last[cid] = max(last.get(cid, seq), seq)
    return SessionSeqs(first, last, end_us, start_us)


def owed_seqs(
    files: Sequence[tuple[int, int]],
    signed: Iterable[tuple[int, int]],
    from_us: int | None,
    to_us: int | None,
    bounds: tuple[int | None, int | None] = (None, None),
) -> list[tuple[int, int]]:
    """The seq ranges a camera's part of a bundle must account for (in a file, or declared
    missing): from its first file's first seq to its last file's last, and every seq a
    checkpoint signed (``signed``: (seq, capture µs)) captured within the selected range;
    ``bounds`` (see :func:`selected_bounds`) stretch that span to the camera's first
    and last seq in the session. The exporter declares the holes by this rule and the
    verifier checks them by it."""
    ends = [b for b in bounds if b is not None]
    spans = [(min(a for a, _ in files), max(b for _, b in files))] if files else []
    if ends:
        span = spans or [(min(ends), max(ends))]
        spans = [(min(span[0][0], *ends), max(span[0][1], *ends))]
    low = -math.inf if from_us is None else from_us
    high = math.inf if to_us is None else to_us
    run: list[int] | None = None  # the contiguous run of signed seqs being gathered
    for seq, capture_us in sorted(signed):
        if not low <= capture_us <= high:
            continue
        if run is not None and seq <= run[1] + 1:
            run[1] = max(run[1], seq)
            continue
        if run is not None:
            spans.append((run[0], run[1]))
        run = [seq, seq]
    if run is not None:
        spans.append((run[0], run[1]))
    return seqranges.merge(spans)


def selected_bounds(
    seqs: SessionSeqs,
    camera: str,
    from_us: int | None,
    to_us: int | None,
    held: Sequence[tuple[int, int]] = (),
    capture_of: Callable[[int], int | None] = lambda seq: None,
) -> tuple[int | None, int | None]:
    """The camera's first and last seq in the session (the device's signed disclosure and
    session_end), each if the bundle owes it (:func:`bound_reasons` says why)."""
    first, last = bound_reasons(seqs, camera, from_us, to_us, held, capture_of)
    return (None if first is None else first[0]), (None if last is None else last[0])


def bound_reasons(
    seqs: SessionSeqs,
    camera: str,
    from_us: int | None,
    to_us: int | None,
    held: Sequence[tuple[int, int]] = (),
    capture_of: Callable[[int], int | None] = lambda seq: None,
) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
    """The camera's first and last seq in the session (the device's signed disclosure and
    session_end), each with why the bundle owes it (None: it does not): the selected range
    covers it, or the camera's footage here (``held``: its files' seqs) stops well short of
    the range's edge on that side (:data:`EDGE_MARGIN_US`) while the signed seq lies
    beyond.

    Whether the range covers a seq is judged by its capture time as the device signed it
    (``capture_of``: from the bundle's checkpoints), else by the session's signed start
    (first) and end (last): a range from before the session started covers its first seq
    (the pre-roll is captured before the start, a camera that joined after it), a range to
    its end or later covers its last. Footage that stops short is judged by the signed
    capture times of its first and last seq, and of the seq just outside it (one
    captured outside the range shows the footage reaches the range's edge; the exporter
    widens a range back to the keyframe at or before its start, so its footage begins at
    or before the range). The exporter keeps the checkpoints these need and declares its
    holes by this rule; the verifier checks by it: a receiver-written range does not
    switch off the device's signed bounds."""
    first, last = seqs.first.get(camera), seqs.last.get(camera)
    if first is not None and last is not None and last < first:
        return None, None  # it streamed nothing (its last is its first - 1)
    low = min((a for a, _ in held), default=None)
    high = max((b for _, b in held), default=None)
    owe_first = owe_last = None
    if first is not None:
        at = capture_of(first)
        if from_us is None and (at is None or to_us is None or at <= to_us):
            why: str | None = "the export starts at the session's start"
        elif at is not None:
            why = (
                f"the device signed its capture at {iso(at)}, within the export's range"
                if (from_us is None or from_us <= at) and (to_us is None or at <= to_us)
                else None
            )
        elif from_us is not None and seqs.start_us is not None and from_us <= seqs.start_us:
            why = (
                f"the export's range starts at {iso(from_us)}, before the session's signed "
                f"start ({iso(seqs.start_us)})"
            )
        else:
            why = None
        if why is None and from_us is not None and low is not None and low > first:
            begins, before = capture_of(low), capture_of(low - 1)
            if (
                begins is not None
                and begins > from_us + EDGE_MARGIN_US
                and (before is None or before >= from_us)
            ):
                why = (
                    f"its footage here begins at {iso(begins)}, well after the export's range "
                    f"starts ({iso(from_us)})"
                )
        owe_first = None if why is None else (first, why)
    if last is not None:
        at = capture_of(last)
        if to_us is None and (at is None or from_us is None or from_us <= at):
            why = "the export runs to the session's end"
        elif at is not None:
            why = (
                f"the device signed its capture at {iso(at)}, within the export's range"
                if (from_us is None or from_us <= at) and (to_us is None or at <= to_us)
                else None
            )
        elif to_us is not None and seqs.end_us is not None and to_us >= seqs.end_us:
            why = (
                f"the export's range ends at {iso(to_us)}, after the session's signed end "
                f"({iso(seqs.end_us)})"
            )
        else:
            why = None
        if why is None and to_us is not None and high is not None and high < last:
            ends, after = capture_of(high), capture_of(high + 1)
            if (
                ends is not None
                and ends < to_us - EDGE_MARGIN_US
                and (after is None or after <= to_us)
            ):
                why = (
                    f"its footage here ends at {iso(ends)}, well before the export's range "
                    f"ends ({iso(to_us)})"
                )
        owe_last = None if why is None else (last, why)
    return owe_first, owe_last


def evidence_key(data_dir: Path) -> Ed25519PrivateKey:
    """The receiver's evidence signing key, ``DATA/evidence.key`` (0600), made on first use.

    Its public key signs every bundle's manifest (``breakglass evidence key``
    prints it). Two processes making it at once end up with the same one.
    """
    path = Path(data_dir) / EVIDENCE_KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_secret(
            tmp,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
            log.warning(
                "made the receiver's evidence signing key %s (kid %s); its public key:\n%s",
                path,
                kid(key.public_key()),
                public_pem(key.public_key()).decode().strip(),
            )
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        return load_private_key(path)
    except KeyFileError as exc:
        raise EvidenceError(f"receiver evidence key: {exc}") from exc
