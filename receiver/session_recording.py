"""One emergency session's recording: its metadata file and its cameras.

``session.json`` is replaced atomically (tmp, fsync, rename, fsync dir) and
always lists a camera's part file before the file gets any data.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from receiver.camera_recording import CameraRecording, PartInfo, TrackInfo
from receiver.errors import (
    CorruptRecordingError,
    InvalidMetadataError,
    SessionConflictError,
    TrackMismatchError,
    UnknownCameraError,
    UnsupportedCodecError,
)
from receiver.summaries import (
    CameraSummary,
    PartSummary,
    SessionSummary,
    parse_part_file,
    part_json,
    validate_camera_id,
    validate_session_id,
)

__all__ = ["SessionRecording", "check_track", "read_session_json"]

_LOG = logging.getLogger(__name__)
_SCHEMA = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """Create ``path`` if needed, durably (the parent folder is fsynced)."""
    if not path.exists():
        path.mkdir(parents=True)
        _fsync_dir(path.parent)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    _ensure_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def check_track(track: TrackInfo) -> None:
    """Raise unless ``track`` describes a camera the store can record."""
    validate_camera_id(track.camera_id)
    if track.codec != "h264":
        raise UnsupportedCodecError(
            f"camera {track.camera_id!r}: codec {track.codec!r} cannot be recorded (only h264)"
        )
    if not (
        isinstance(track.zone, str)
        and 0 < len(track.zone) <= 32
        and track.width > 0
        and track.height > 0
        and track.fps >= 0
        and track.first_seq >= 0
    ):
        raise InvalidMetadataError(f"camera {track.camera_id!r}: invalid track {track!r}")


class SessionRecording:
    """The recording of one emergency session: metadata and one recording per camera."""

    def __init__(
        self,
        directory: Path,
        session_id: str,
        device_id: str,
        meta: dict[str, object],
        opened_at: float,
        *,
        clock: Callable[[], float],
        mono_ns: Callable[[], int],
    ) -> None:
        self.session_id = session_id
        self.device_id = device_id
        self.meta = meta
        self.opened_at = opened_at
        self.closed_at: float | None = None
        self.close_reason: str | None = None
        #: Cameras by id, in the order they were announced (footage from the press on).
        self.cameras: dict[str, CameraRecording] = {}
        #: Each camera's pre-roll (footage from before the press), in ``<id>.preroll.mp4``.
        #: Recorded apart so that live footage never waits behind the pre-roll burst.
        self.prerolls: dict[str, CameraRecording] = {}
        self._dir = directory
        self._clock = clock
        self._mono_ns = mono_ns
        self._dirty = False
        self._save_lock = asyncio.Lock()

    @property
    def directory(self) -> Path:
        """The session's directory under the store root."""
        return self._dir

    @property
    def is_open(self) -> bool:
        """Whether the emergency session has not been closed."""
        return self.closed_at is None

    def camera(self, camera_id: str) -> CameraRecording:
        """One camera's recording; raises :class:`UnknownCameraError`."""
        try:
            return self.cameras[camera_id]
        except KeyError:
            raise UnknownCameraError(
                f"session {self.session_id!r} has no camera {camera_id!r}"
            ) from None

    def durable_seq(self, camera_id: str) -> int:
        """Every seq of the camera up to this one is durable (pre-roll, then live)."""
        cam = self.camera(camera_id)
        pre = self.prerolls.get(camera_id)
        if pre is not None and pre.durable_seq < cam.track.first_seq - 1:
            return pre.durable_seq
        return cam.durable_seq

    def durable_by_camera(self) -> dict[str, int]:
        """The last durable sequence number per camera (for the ``welcome`` message)."""
        return {cid: self.durable_seq(cid) for cid in self.cameras}

    def _all(self) -> list[CameraRecording]:
        return [*self.prerolls.values(), *self.cameras.values()]

    async def flush(self) -> dict[str, int]:
        """Flush every camera; return the durable sequence number per camera."""
        await asyncio.gather(*(cam.flush() for cam in self._all()))
        return self.durable_by_camera()

    async def close(self, reason: str) -> None:
        """End the session: finish and fsync every camera, record the close time."""
        if self.closed_at is not None:
            return
        for cam in self._all():
            await cam.close()
        self.closed_at = self._clock()
        self.close_reason = reason
        await self._save()

    def summary(self) -> SessionSummary:
        """A consistent snapshot of the session's state (pre-roll and live merged per camera)."""
        return SessionSummary(
            self.session_id,
            self.device_id,
            dict(self.meta),
            self.opened_at,
            self.closed_at,
            self.close_reason,
            tuple(self._camera_summary(cid, cam) for cid, cam in self.cameras.items()),
        )

    def _camera_summary(self, cid: str, cam: CameraRecording) -> CameraSummary:
        pre = self.prerolls.get(cid)
        both = [cam] if pre is None else [pre, cam]
        firsts = [c.first_durable_mono_ns for c in both if c.first_durable_mono_ns is not None]
        return CameraSummary(
            camera_id=cid,
            zone=cam.track.zone,
            codec=cam.track.codec,
            mse_codec=cam.mse_codec or (pre.mse_codec if pre else None),
            width=cam.track.width,
            height=cam.track.height,
            fps=cam.track.fps,
            first_seq=both[0].track.first_seq,
            durable_seq=self.durable_seq(cid),
            frames_durable=sum(c.frames_durable for c in both),
            preroll_frames=(pre.frames_durable if pre else 0) + cam.preroll_frames,
            live_frames=cam.live_frames,
            recording=cam.writable,
            parts=tuple(
                PartSummary(p.file, c.part_path(p), p.first_seq, p.first_capture_us)
                for c in both
                for p in c.parts
            ),
            first_durable_mono_ns=min(firsts, default=None),
            first_live_durable_mono_ns=cam.first_live_durable_mono_ns,
        )

    # -- internals used by the store ------------------------------------

    def _new_camera(
        self, track: TrackInfo, parts: list[PartInfo], live: int | None, *, preroll: bool = False
    ) -> None:
        where = self.prerolls if preroll else self.cameras
        where[track.camera_id] = CameraRecording(
            track,
            self._dir,
            parts,
            first_live_seq=live,
            mark_dirty=self._mark_dirty,
            save_metadata=self._save_if_dirty,
            mono_ns=self._mono_ns,
            stem=f"{track.camera_id}.preroll" if preroll else None,
        )

    async def _activate(
        self, device_id: str, tracks: list[TrackInfo], prerolls: list[TrackInfo]
    ) -> None:
        """Make the named cameras (and pre-rolls) writable, resuming each from what is on disk."""
        if device_id != self.device_id:
            raise SessionConflictError(
                f"session {self.session_id!r} belongs to device {self.device_id!r}, "
                f"not {device_id!r}"
            )
        lanes = [(self.cameras, tracks, False), (self.prerolls, prerolls, True)]
        for known_in, wanted_tracks, _ in lanes:
            for track in wanted_tracks:
                known = known_in.get(track.camera_id)
                if known is not None:
                    old = known.track
                    # A later first_seq is a resuming device that lost footage (skip_to).
                    if (old.codec, old.zone, old.width, old.height) != (
                        track.codec,
                        track.zone,
                        track.width,
                        track.height,
                    ) or track.first_seq < old.first_seq:
                        raise TrackMismatchError(
                            f"session {self.session_id!r}: camera {track.camera_id!r} was "
                            f"announced as {old!r}, now as {track!r}"
                        )
        resume: list[CameraRecording] = []
        for known_in, wanted_tracks, preroll in lanes:
            for track in wanted_tracks:
                if track.camera_id not in known_in:
                    self._new_camera(track, [], None, preroll=preroll)
            wanted = {t.camera_id for t in wanted_tracks}
            resume += [c for cid, c in known_in.items() if cid in wanted and not c.writable]
        for cam in resume:
            await cam.close()  # a failed camera: release its muxer and file
            await cam._scan(repair=True)
            cam._plan_part()
        if self.closed_at is not None:
            _LOG.warning("session %r re-opened by its device after close", self.session_id)
            self.closed_at = self.close_reason = None
        # Create the part files, then list them: the save's folder fsync covers their
        # names, and no data reaches them before this method returns.
        await asyncio.to_thread(_ensure_dir, self._dir)
        await asyncio.gather(*(cam._open_part(sync_dir=False) for cam in resume))
        await self._save()
        for track in tracks:
            await self.cameras[track.camera_id].skip_to(track.first_seq)
        for track in prerolls:
            await self.prerolls[track.camera_id].skip_to(track.first_seq)

    async def _suspend(self) -> None:
        """Finish every camera without ending the session (receiver shutdown)."""
        if not any(cam.has_open_file for cam in self._all()):
            return
        for cam in self._all():
            try:
                await cam.close()
            except Exception:
                _LOG.exception("session %r: closing camera %r", self.session_id, cam.camera_id)
        await self._save()

    def _mark_dirty(self) -> None:
        self._dirty = True

    async def _save_if_dirty(self) -> None:
        # Always take the lock: a save in flight may hold our change but not be durable yet.
        async with self._save_lock:
            if self._dirty:
                await self._save_locked()

    async def _save(self) -> None:
        async with self._save_lock:
            await self._save_locked()

    async def _save_locked(self) -> None:
        self._dirty = False
        data = json.dumps(self._to_json(), indent=1, sort_keys=True).encode()
        try:
            await asyncio.to_thread(_write_atomic, self._dir / "session.json", data)
        except BaseException:
            self._dirty = True
            raise

    def _to_json(self) -> dict[str, Any]:
        return {
            "v": _SCHEMA,
            "session_id": self.session_id,
            "device_id": self.device_id,
            "meta": self.meta,
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "close_reason": self.close_reason,
            "cameras": [_camera_json(cam) for cam in self.cameras.values()],
            "prerolls": [_camera_json(cam) for cam in self.prerolls.values()],
        }

    @classmethod
    def _from_json(
        cls,
        directory: Path,
        doc: dict[str, Any],
        *,
        clock: Callable[[], float],
        mono_ns: Callable[[], int],
    ) -> SessionRecording:
        try:
            if doc["v"] != _SCHEMA or doc["session_id"] != directory.name:
                raise CorruptRecordingError(f"{directory}: wrong schema or session id")
            rec = cls(
                directory,
                validate_session_id(doc["session_id"]),
                str(doc["device_id"]),
                dict(doc["meta"]),
                float(doc["opened_at"]),
                clock=clock,
                mono_ns=mono_ns,
            )
            rec.closed_at = None if doc["closed_at"] is None else float(doc["closed_at"])
            rec.close_reason = doc["close_reason"]
            entries = [(c, False) for c in doc["cameras"]]
            entries += [(c, True) for c in doc.get("prerolls", [])]
            for c, preroll in entries:
                track = TrackInfo(
                    validate_camera_id(c["camera_id"]),
                    str(c["zone"]),
                    str(c["codec"]),
                    int(c["width"]),
                    int(c["height"]),
                    float(c["fps"]),
                    base64.b64decode(c["extradata"], validate=True),
                    int(c["first_seq"]),
                )
                parts = [
                    PartInfo(str(p["file"]), int(p["first_seq"]), p["first_capture_us"])
                    for p in c["parts"]
                ]
                for p in parts:
                    parsed = parse_part_file(p.file)
                    if parsed is None or parsed[0] != track.camera_id:
                        raise CorruptRecordingError(f"{directory}: bad part file {p.file!r}")
                live = c["first_live_seq"]
                rec._new_camera(track, parts, None if live is None else int(live), preroll=preroll)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CorruptRecordingError):
                raise
            raise CorruptRecordingError(f"{directory}/session.json: {exc!r}") from exc
        return rec


def read_session_json(path: Path) -> dict[str, Any] | None:
    """The parsed ``session.json`` (None if absent); raises :class:`CorruptRecordingError`."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorruptRecordingError(f"{path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise CorruptRecordingError(f"{path}: not a JSON object")
    return doc


def _camera_json(cam: CameraRecording) -> dict[str, Any]:
    return {
        "camera_id": cam.track.camera_id,
        "zone": cam.track.zone,
        "codec": cam.track.codec,
        "width": cam.track.width,
        "height": cam.track.height,
        "fps": cam.track.fps,
        "extradata": base64.b64encode(cam.track.extradata).decode(),
        "first_seq": cam.track.first_seq,
        "first_live_seq": cam.first_live_seq,
        "parts": [part_json(p) for p in cam.parts],
    }
