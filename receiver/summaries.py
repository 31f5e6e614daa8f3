"""Ids, part file names and the read-only summaries of recordings that the API shows.

Ids become directory and file names, so they are checked with strict
patterns (``fullmatch``: ``$`` would also accept a trailing newline).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver.errors import InvalidIdError, UnknownCameraError

__all__ = [
    "BadSegment",
    "CameraSummary",
    "DeclaredGap",
    "PartSummary",
    "RunSummary",
    "SessionSummary",
    "parse_part_file",
    "part_file",
    "validate_camera_id",
    "validate_device_id",
    "validate_session_id",
]

#: Valid session ids (also the names of session directories); use ``fullmatch``.
SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_CAMERA_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_PART_FILE = re.compile(r"([a-z0-9][a-z0-9_-]{0,31})\.(0|[1-9][0-9]{0,18})\.mp4")


def _validate(kind: str, pattern: re.Pattern[str], value: object) -> str:
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidIdError(f"invalid {kind} id {value!r} (must match {pattern.pattern})")
    return value


def validate_session_id(value: object) -> str:
    """Return ``value`` if it is a valid session id, else raise :class:`InvalidIdError`."""
    return _validate("session", SESSION_ID_RE, value)


def validate_camera_id(value: object) -> str:
    """Return ``value`` if it is a valid camera id, else raise :class:`InvalidIdError`."""
    return _validate("camera", _CAMERA_ID, value)


def validate_device_id(value: object) -> str:
    """Return ``value`` if it is a valid device id, else raise :class:`InvalidIdError`."""
    return _validate("device", _DEVICE_ID, value)


def part_file(camera_id: str, first_seq: int) -> str:
    """The file name of a camera's part that starts at ``first_seq``: ``<camera>.<seq>.mp4``."""
    return f"{camera_id}.{first_seq}.mp4"


def parse_part_file(name: str) -> tuple[str, int] | None:
    """``(camera_id, first_seq)`` of a part file name (``cam1.1200.mp4``), or None."""
    m = _PART_FILE.fullmatch(name)
    if m is None or int(m.group(2)) >= 2**63:
        return None
    return m.group(1), int(m.group(2))


@dataclass(frozen=True, slots=True)
class DeclaredGap:
    """Seqs ``first..last`` the device declared lost for good (``reason``: lost, evicted,
    or unreadable: a sealed segment this receiver could not open)."""

    first: int
    last: int
    reason: str

    def to_json(self) -> dict[str, object]:
        """As stored in ``session.json`` and shown by the API."""
        return {"first": self.first, "last": self.last, "reason": self.reason}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> DeclaredGap:
        """Read back; raises KeyError, TypeError or ValueError."""
        gap = cls(int(doc["first"]), int(doc["last"]), str(doc["reason"]))
        if gap.first > gap.last:
            raise ValueError(f"declared gap {gap.first}..{gap.last} is reversed")
        return gap


@dataclass(slots=True)
class BadSegment:
    """Footage the receiver could not record: a sealed segment it cannot open or
    trust, or a live packet no part can start with (``error`` starts ``live packet:``).

    Only the first seq is known (from the media header: the segment's own
    header is unreadable or untrusted); ``count`` says how often it arrived.
    """

    first_seq: int
    capture_us: int
    error: str
    count: int = 1

    def to_json(self) -> dict[str, object]:
        """As stored in ``session.json`` and shown by the API (``last_seq`` unknown)."""
        return {
            "first_seq": self.first_seq,
            "last_seq": None,
            "capture_us": self.capture_us,
            "error": self.error,
            "count": self.count,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BadSegment:
        """Read back; raises KeyError, TypeError or ValueError."""
        return cls(
            int(doc["first_seq"]), int(doc["capture_us"]), str(doc["error"]), int(doc["count"])
        )


@dataclass(frozen=True, slots=True)
class PartSummary:
    """One part file of a camera's recording: seqs ``first_seq..last_seq``."""

    file: str
    path: Path
    first_seq: int
    frames: int
    first_capture_us: int | None

    @property
    def last_seq(self) -> int:
        """The part's last durable seq."""
        return self.first_seq + self.frames - 1

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict (by file name, never by server path)."""
        return {
            "file": self.file,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "frames": self.frames,
            "first_capture_us": self.first_capture_us,
        }


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One run: contiguous seqs written in order, in one or more part files."""

    parts: tuple[PartSummary, ...]

    @property
    def first_seq(self) -> int:
        """The run's first seq (a keyframe)."""
        return self.parts[0].first_seq

    @property
    def last_seq(self) -> int:
        """The run's last durable seq."""
        return self.parts[-1].last_seq

    @property
    def frames(self) -> int:
        """Durable frames of the run."""
        return sum(p.frames for p in self.parts)

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "frames": self.frames,
            "parts": [p.to_json() for p in self.parts],
        }


@dataclass(frozen=True, slots=True)
class CameraSummary:
    """The state of one camera's recording, for the API."""

    camera_id: str
    zone: str
    codec: str
    #: RFC 6381 codec string for Media Source Extensions (None until an SPS was seen).
    mse_codec: str | None
    width: int
    height: int
    fps: float
    first_seq: int
    #: Cumulative: every seq from ``first_seq`` to this is durable or declared lost.
    durable_seq: int
    frames_durable: int
    preroll_frames: int
    live_frames: int
    #: The first seq captured after the press (None until one arrived).
    first_live_seq: int | None
    #: Whether the camera currently accepts packets.
    recording: bool
    #: Runs holding durable frames, in seq order.
    runs: tuple[RunSummary, ...]
    gaps: tuple[DeclaredGap, ...]
    bad_segments: tuple[BadSegment, ...]
    #: Ranges between ``first_seq`` and the last seq held that are neither held nor
    #: declared lost (the first 256), and how many seqs they are in all.
    missing: tuple[tuple[int, int], ...]
    missing_frames: int
    duplicates: int = 0
    dropped: int = 0
    #: time.monotonic_ns() when the first / first live packet became durable (latency figures).
    first_durable_mono_ns: int | None = None
    first_live_durable_mono_ns: int | None = None

    @property
    def parts(self) -> tuple[PartSummary, ...]:
        """Every part file holding frames, in seq order (play them one after the other)."""
        return tuple(p for run in self.runs for p in run.parts)

    @property
    def complete(self) -> bool:
        """Whether nothing is missing between ``first_seq`` and the last seq held."""
        return self.missing_frames == 0

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict (part files by name, never by server path)."""
        return {
            "camera_id": self.camera_id,
            "zone": self.zone,
            "codec": self.codec,
            "mse_codec": self.mse_codec,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "first_seq": self.first_seq,
            "durable_seq": self.durable_seq,
            "frames_durable": self.frames_durable,
            "preroll_frames": self.preroll_frames,
            "live_frames": self.live_frames,
            "first_live_seq": self.first_live_seq,
            "recording": self.recording,
            "runs": [r.to_json() for r in self.runs],
            "gaps": [g.to_json() for g in self.gaps],
            "bad_segments": [b.to_json() for b in self.bad_segments],
            "complete": self.complete,
            "missing": [list(m) for m in self.missing],
            "missing_frames": self.missing_frames,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "first_durable_mono_ns": self.first_durable_mono_ns,
            "first_live_durable_mono_ns": self.first_live_durable_mono_ns,
        }


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """The state of one session's recording, for the API."""

    session_id: str
    device_id: str
    meta: Mapping[str, object]
    opened_at: float
    closed_at: float | None
    close_reason: str | None
    cameras: tuple[CameraSummary, ...]

    @property
    def is_open(self) -> bool:
        """Whether the emergency session has not been closed."""
        return self.closed_at is None

    def camera(self, camera_id: str) -> CameraSummary:
        """The summary of one camera; raises :class:`UnknownCameraError`."""
        for cam in self.cameras:
            if cam.camera_id == camera_id:
                return cam
        raise UnknownCameraError(f"session {self.session_id!r} has no camera {camera_id!r}")

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "session_id": self.session_id,
            "device_id": self.device_id,
            "meta": dict(self.meta),
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "close_reason": self.close_reason,
            "open": self.is_open,
            "cameras": [c.to_json() for c in self.cameras],
        }
