"""One emergency session's recording: its metadata file and its cameras.

``session.json`` is replaced atomically (tmp, fsync, rename, fsync dir) and
always lists a camera's part file before the file gets any data. Schema 2
(runs per camera, declared gaps, bad segments); schema 1 files (one live and
one pre-roll recording per camera) are not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from receiver.camera_json import camera_from_json, camera_json, camera_summary
from receiver.camera_recording import CameraRecording, TrackInfo
from receiver.errors import (
    CorruptRecordingError,
    InvalidMetadataError,
    SessionConflictError,
    TrackMismatchError,
    UnknownCameraError,
    UnsupportedCodecError,
)
from receiver.parts import remove_empty_part
from receiver.summaries import SessionSummary, validate_camera_id, validate_session_id

__all__ = ["SessionRecording", "check_track", "read_session_json"]

_LOG = logging.getLogger(__name__)
_SCHEMA = 2
#: How long bookkeeping changes wait before session.json is rewritten.
METADATA_DELAY_S = 1.0


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
        and (track.live_seq is None or track.live_seq >= track.first_seq)
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
        #: Cameras by id, in the order they were announced.
        self.cameras: dict[str, CameraRecording] = {}
        self._dir = directory
        self._clock = clock
        self._mono_ns = mono_ns
        self._dirty = False
        self._save_lock = asyncio.Lock()
        self._meta_task: asyncio.Task[None] | None = None
        #: Called on the loop with the session id after a save or a durable frame (the index).
        self.on_change: Callable[[str], None] | None = None

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

    def durable_by_camera(self) -> dict[str, int]:
        """The cumulative durable seq per camera (for the ``welcome`` message)."""
        return {cid: cam.durable_seq for cid, cam in self.cameras.items()}

    async def flush(self) -> dict[str, int]:
        """Flush every camera; return the cumulative durable seq per camera."""
        await asyncio.gather(*(cam.flush() for cam in self.cameras.values()))
        return self.durable_by_camera()

    async def close(self, reason: str) -> None:
        """End the session: finish and fsync every camera, record the close time."""
        if self.closed_at is not None:
            return
        self.closed_at = self._clock()
        self.close_reason = reason
        await self._finish_cameras()

    def summary(self) -> SessionSummary:
        """A consistent snapshot of the session's state."""
        return SessionSummary(
            self.session_id,
            self.device_id,
            dict(self.meta),
            self.opened_at,
            self.closed_at,
            self.close_reason,
            tuple(camera_summary(cam, self._dir) for cam in self.cameras.values()),
        )

    # -- internals used by the store ------------------------------------

    def _new_camera(self, track: TrackInfo) -> CameraRecording:
        cam = CameraRecording(
            track,
            self._dir,
            first_live_seq=None,
            mark_dirty=self._mark_dirty,
            save_soon=self._save_soon,
            save=self._save,
            mono_ns=self._mono_ns,
        )
        cam.on_durable = self._changed
        return cam

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.session_id)

    async def _activate(self, device_id: str, tracks: list[TrackInfo]) -> None:
        """Make the named cameras writable, resuming each from what is on disk."""
        if device_id != self.device_id:
            raise SessionConflictError(
                f"session {self.session_id!r} belongs to device {self.device_id!r}, "
                f"not {device_id!r}"
            )
        for track in tracks:
            known = self.cameras.get(track.camera_id)
            if known is not None:
                old = known.track
                # A later first_seq is an older agent declaring the seqs before it lost.
                # The size may change (an IP camera set to another resolution while the
                # agent restarted): each part's own init segment describes its frames.
                if (old.codec, old.zone) != (track.codec, track.zone) or (
                    track.first_seq < old.first_seq
                ):
                    raise TrackMismatchError(
                        f"session {self.session_id!r}: camera {track.camera_id!r} was "
                        f"announced as {old!r}, now as {track!r}"
                    )
                if (old.width, old.height) != (track.width, track.height):
                    _LOG.warning(
                        "session %r camera %r: now %dx%d (announced %dx%d at the start)",
                        self.session_id, track.camera_id, track.width, track.height,
                        old.width, old.height,
                    )  # fmt: skip
        for track in tracks:
            if track.camera_id not in self.cameras:
                self.cameras[track.camera_id] = self._new_camera(track)
        if self.closed_at is not None:
            _LOG.warning("session %r re-opened by its device after close", self.session_id)
            self.closed_at = self.close_reason = None
        async with contextlib.AsyncExitStack() as locks:
            cams = [self.cameras[t.camera_id] for t in sorted(tracks, key=lambda t: t.camera_id)]
            for cam in cams:
                await locks.enter_async_context(cam._lock)
            planned = [run for t in tracks for run in await self.cameras[t.camera_id]._prepare(t)]
            # Create the part files, then list them: the save's folder fsync covers their
            # names, and no data reaches them before this method returns.
            try:
                await asyncio.to_thread(_ensure_dir, self._dir)
                opened = await asyncio.gather(
                    *(run._open_part(sync_dir=False) for run in planned), return_exceptions=True
                )
                for result in opened:
                    if isinstance(result, BaseException):
                        raise result
                await self._save()
            except BaseException:
                # Not activated (a full disk, a failing one): release the part files just
                # opened, or every retry of the device leaks their descriptors. They are
                # empty and unlisted; the next open takes them again.
                for run in planned:
                    with contextlib.suppress(Exception):
                        await run.close()
                raise

    async def _suspend(self) -> None:
        """Finish every camera without ending the session (receiver shutdown)."""
        if not any(cam.writable or cam.has_open_file for cam in self.cameras.values()):
            return
        await self._finish_cameras()

    async def _finish_cameras(self) -> None:
        gone: list[str] = []
        for cam in self.cameras.values():
            try:
                gone += await cam.close()
            except Exception:
                _LOG.exception("session %r: closing camera %r", self.session_id, cam.camera_id)
        if self._meta_task is not None:
            self._meta_task.cancel()  # saved right here instead
        await self._save()
        # Parts that never got a frame: unlisted first, then deleted (never one holding a
        # complete fragment, whatever the count in memory says).
        for name in gone:
            await asyncio.to_thread(remove_empty_part, self._dir / name)

    def _mark_dirty(self) -> None:
        self._dirty = True

    def _save_soon(self) -> None:
        # Debounced: the first seconds of a session are when acks matter most, and
        # its session.json rewrites (two fsyncs each) would compete with the data's.
        if self._meta_task is None or self._meta_task.done():
            self._meta_task = asyncio.create_task(self._save_later(), name="session.json")
            self._meta_task.add_done_callback(_retrieve)

    async def _save_later(self) -> None:
        await asyncio.sleep(METADATA_DELAY_S)
        # Shielded: cancelling must never leave a half-done write beside the next save.
        await asyncio.shield(self._save_if_dirty())

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
        write = asyncio.ensure_future(
            asyncio.to_thread(_write_atomic, self._dir / "session.json", data)
        )
        try:
            await asyncio.shield(write)
        except BaseException:
            self._dirty = True
            # A cancelled caller leaves the write going on in its thread: keep the lock
            # until it ends, or the next save would write the same temporary file beside
            # it and install a mix of both.
            while not write.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({write})
            if not write.cancelled():
                write.exception()  # retrieved: what is raised here is the caller's reason
            raise
        self._changed()

    def _to_json(self) -> dict[str, Any]:
        return {
            "v": _SCHEMA,
            "session_id": self.session_id,
            "device_id": self.device_id,
            "meta": self.meta,
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "close_reason": self.close_reason,
            "cameras": [camera_json(cam) for cam in self.cameras.values()],
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
                raise CorruptRecordingError(
                    f"{directory}: session.json schema {doc['v']!r} (expected {_SCHEMA}) "
                    "or a wrong session id"
                )
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
            for entry in doc["cameras"]:
                cam = camera_from_json(
                    entry,
                    directory,
                    mark_dirty=rec._mark_dirty,
                    save_soon=rec._save_soon,
                    save=rec._save,
                    mono_ns=mono_ns,
                )
                cam.on_durable = rec._changed
                rec.cameras[cam.camera_id] = cam
        except (KeyError, TypeError, ValueError) as exc:
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


def _retrieve(task: asyncio.Task[None]) -> None:
    # Nobody awaits the debounced save: its error is logged, never silently lost.
    if not task.cancelled() and (exc := task.exception()) is not None:
        _LOG.error("saving session.json failed: %r", exc)
