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

Every member is stored (never compressed, never encrypted). Every MP4 holds
one stream, a video track (nothing a player could show instead), of one
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
receiver never recorded, and, when the selection reaches the session's start or
end, those from the camera's first seq (the device's signed ``disclosure``)
and to its last (its signed ``session_end``). The verifier computes them
again from the device's checkpoints and trail: a seq left out without being
declared is a failure.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final, NamedTuple

import av
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.errors import KeyFileError
from provisioning.keys import kid, load_private_key, public_pem, write_secret
from receiver import seqranges
from receiver.errors import ExportError

__all__ = [
    "MANIFEST",
    "MANIFEST_CONTEXT",
    "NO_SESSION_SEQS",
    "SIGNATURE",
    "EvidenceError",
    "Mp4Header",
    "Mp4Sample",
    "SessionSeqs",
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


@contextmanager
def open_mp4(path: Path) -> Iterator[tuple[Mp4Header, Iterator[Mp4Sample]]]:
    """The header and the samples (read one at a time, never all held) of an MP4 that holds
    exactly one stream, a video track, as a bundle's MP4s do: anything else (a second video
    track, an audio track) is a ValueError, since a player may show or play it instead of
    the footage checked. Read as MP4 whatever its bytes look like. Raises
    ``av.FFmpegError``, ``OSError`` or ValueError (also while iterating) when it cannot be
    read."""
    with av.open(str(path), format="mp4") as container:
        streams = list(container.streams)
        if len(streams) != 1 or streams[0].type != "video":
            kinds = ", ".join(str(s.type) for s in streams) or "none"
            raise ValueError(
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
    ``disclosure``: pre-roll included), its last (its ``session_end``) and when the
    session ended (µs; None: not known)."""

    first: Mapping[str, int]
    last: Mapping[str, int]
    end_us: int | None


NO_SESSION_SEQS: Final = SessionSeqs({}, {}, None)


def session_seqs(entries: Iterable[Mapping[str, Any]]) -> SessionSeqs:
    """The :class:`SessionSeqs` of a session's ``disclosure`` and ``session_end`` entries
    (the caller picks them: the exporter every one it has, the verifier the signed
    ones). Malformed cameras are skipped; the verifier reports them itself."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    end_us: int | None = None
    for entry in entries:
        cams = entry.get("cameras")
        event = entry.get("event")
        t = entry.get("t")
        if event == "session_end" and isinstance(t, (int, float)) and math.isfinite(t):
            end_us = max(end_us or 0, round(t * 1e6))
        for cam in cams if isinstance(cams, list) else ():
            if not isinstance(cam, dict) or not isinstance(cid := cam.get("id"), str):
                continue
            if event == "disclosure" and type(seq := cam.get("first")) is int and seq >= 0:
                first[cid] = min(first.get(cid, seq), seq)
            elif event == "session_end" and type(seq := cam.get("last")) is int and seq >= -1:
                last[cid] = max(last.get(cid, seq), seq)
    return SessionSeqs(first, last, end_us)


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
    seqs: SessionSeqs, camera: str, from_us: int | None, to_us: int | None
) -> tuple[int | None, int | None]:
    """The camera's first and last seq in the session, each if the selection reaches it:
    the first when nothing before the session's end is left out (no ``from``), the last
    when the selection runs to the session's end (no ``to``, or one past its end)."""
    first, last = seqs.first.get(camera), seqs.last.get(camera)
    if first is not None and last is not None and last < first:
        return None, None  # it streamed nothing (its last is its first - 1)
    reaches_end = to_us is None or (seqs.end_us is not None and to_us >= seqs.end_us)
    return (first if from_us is None else None), (last if reaches_end else None)


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
