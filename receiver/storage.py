"""What readers of recordings (the HLS playlists, the viewer) need from storage.

:class:`RecordingStorage` is the read side: sessions, the parts of a
camera, the durable fragments of a part, and byte ranges of a part. Only
durable (fsynced) data is ever listed or read through it. The local-disk
implementation is :class:`receiver.index.LocalStorage` (part files under
``DATA/recordings/`` and an SQLite index of them, rebuilt from the files
when missing or damaged).

An S3-compatible object store could implement the same reads later. The
operations it needs, and how they map (one object per part file, key
``<session>/<camera>.<first_seq>.mp4``, plus ``<session>/session.json``):

- **put part**: start a multipart upload when a part file is created; its
  init segment (``ftyp`` + ``moov``) is the first bytes.
- **append**: upload the part's newly durable fragments (the byte range
  ``durable_size`` grew by, which the index computes anyway) as further
  parts of the upload, buffered to the store's minimum part size (5 MiB on
  S3; the last part may be smaller).
- **finish**: complete the upload when the part will not grow any more
  (:attr:`PartEntry.final`); ``session.json`` and the index are small
  objects replaced whole.
- **range read**: ``GET`` with ``Range: bytes=a-b`` (:meth:`RecordingStorage.read`).
- **list**: list keys by prefix (sessions, a session's parts) to rebuild
  the index, which stays the fast path for :meth:`RecordingStorage.sessions`,
  :meth:`RecordingStorage.parts` and :meth:`RecordingStorage.fragments`.

An uncompleted multipart upload is not readable, so while a part grows its
durable prefix would be served from the receiver's local disk (the writer
needs a local file anyway: the muxer writes and fsyncs it), and from the
object store once finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from receiver.errors import ReceiverError, UnknownCameraError
from receiver.fmp4 import FragmentInfo
from receiver.summaries import DeclaredGap

__all__ = [
    "CameraEntry",
    "FragmentInfo",
    "PartEntry",
    "RecordingStorage",
    "SessionEntry",
    "UnknownPartError",
]


class UnknownPartError(ReceiverError, LookupError):
    """The session has no part file of that name holding durable frames."""

    code = "unknown_recording"


@dataclass(frozen=True, slots=True)
class PartEntry:
    """One part file of a camera, as far as it is durable."""

    file: str
    camera_id: str
    #: Index of its run among the camera's runs (seq order); parts of one run share it.
    run: int
    first_seq: int
    #: Durable samples (frames); the part holds seqs ``first_seq .. first_seq + frames - 1``.
    frames: int
    #: UTC µs capture time of its first sample (its pts 0), None if it was never saved.
    first_capture_us: int | None
    #: UTC µs capture time of its last durable sample (None if unknown).
    last_capture_us: int | None
    #: The ``mvhd`` creation time (the first capture time in whole seconds), µs.
    created_us: int | None
    #: Bytes of the init segment at the start of the file.
    init_size: int
    #: Bytes from the start of the file to the end of its last durable fragment.
    durable_size: int
    #: Media timescale (ticks per second) of its track.
    timescale: int
    #: Decode time of its first sample (normally 0).
    base_time: int
    #: Whether the part will never grow (its run moved on, was finished, or the session closed).
    final: bool

    @property
    def last_seq(self) -> int:
        """The last durable seq (``first_seq - 1`` if none)."""
        return self.first_seq + self.frames - 1


@dataclass(frozen=True, slots=True)
class CameraEntry:
    """One camera of a session."""

    camera_id: str
    zone: str
    codec: str
    #: RFC 6381 codec string (None until an SPS was seen).
    mse_codec: str | None
    width: int
    height: int
    fps: float
    first_seq: int
    #: Cumulative: every seq from ``first_seq`` to this is durable or declared lost.
    durable_seq: int
    first_live_seq: int | None
    #: Whether the camera takes packets now (its part files may grow).
    recording: bool
    gaps: tuple[DeclaredGap, ...]

    def in_declared_gap(self, seq: int) -> bool:
        """Whether the device declared ``seq`` lost."""
        return any(g.first <= seq <= g.last for g in self.gaps)


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """One session and its cameras."""

    session_id: str
    device_id: str
    opened_at: float
    closed_at: float | None
    close_reason: str | None
    cameras: tuple[CameraEntry, ...]
    #: Why the session's recording cannot be read now (its ``session.json`` is
    #: unreadable or missing), else None. What the index held of it before is
    #: still listed (its part files are kept); the device is refused meanwhile.
    damaged: str | None = None

    def camera(self, camera_id: str) -> CameraEntry:
        """One camera; raises :class:`UnknownCameraError`."""
        for cam in self.cameras:
            if cam.camera_id == camera_id:
                return cam
        raise UnknownCameraError(f"session {self.session_id!r} has no camera {camera_id!r}")


class RecordingStorage(Protocol):
    """The reads the viewer and the HLS playlists need (see the module docstring).

    Ids are validated by the caller; unknown ones raise
    :class:`receiver.errors.UnknownSessionError` / ``UnknownCameraError``
    (both ``LookupError``).
    """

    async def sessions(self) -> list[SessionEntry]:
        """Every known session, newest first."""
        ...

    async def session(self, session_id: str) -> SessionEntry:
        """One session with its cameras."""
        ...

    async def parts(self, session_id: str, camera_id: str) -> list[PartEntry]:
        """A camera's parts holding durable frames, in seq order."""
        ...

    async def part(self, session_id: str, file: str) -> PartEntry:
        """One part by file name (:class:`UnknownPartError`, or ``UnknownSessionError``)."""
        ...

    async def fragments(
        self, session_id: str, file: str, start: int = 0, stop: int | None = None
    ) -> list[FragmentInfo]:
        """The part's durable fragments overlapping bytes ``[start, stop)``, in file order."""
        ...

    async def read(self, session_id: str, file: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of a part, within its durable size (raises ValueError if not)."""
        ...
