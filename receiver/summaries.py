"""Ids and the read-only summaries of recordings that the API shows.

Ids become directory and file names, so they are checked with strict
patterns (``fullmatch``: ``$`` would also accept a trailing newline).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from receiver.camera_recording import PartInfo
from receiver.errors import InvalidIdError, UnknownCameraError

__all__ = [
    "CameraSummary",
    "PartSummary",
    "SessionSummary",
    "parse_part_file",
    "part_json",
    "validate_camera_id",
    "validate_device_id",
    "validate_session_id",
]

#: Valid session ids (also the names of session directories); use ``fullmatch``.
SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_CAMERA_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_PART_FILE = re.compile(r"([a-z0-9][a-z0-9_-]{0,31})(?:\.preroll)?(?:\.([1-9][0-9]{0,5}))?\.mp4")


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


def parse_part_file(name: str) -> tuple[str, int] | None:
    """``(camera_id, part_index)`` of a part file (``c.2.mp4``, ``c.preroll.mp4``), or None."""
    m = _PART_FILE.fullmatch(name)
    return None if m is None else (m.group(1), int(m.group(2) or 0))


def part_json(part: PartSummary | PartInfo) -> dict[str, object]:
    """A part file as stored in ``session.json`` and shown by the API."""
    return {
        "file": part.file,
        "first_seq": part.first_seq,
        "first_capture_us": part.first_capture_us,
    }


@dataclass(frozen=True, slots=True)
class PartSummary:
    """One part file of a camera's recording."""

    file: str
    path: Path
    first_seq: int
    first_capture_us: int | None


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
    durable_seq: int
    frames_durable: int
    preroll_frames: int
    live_frames: int
    #: Whether the camera currently accepts packets.
    recording: bool
    parts: tuple[PartSummary, ...]
    #: time.monotonic_ns() when the first / first live packet became durable (latency figures).
    first_durable_mono_ns: int | None = None
    first_live_durable_mono_ns: int | None = None

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
            "recording": self.recording,
            "parts": [part_json(p) for p in self.parts],
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
