"""Durable, remux-only recordings of emergency sessions (the receiver's store).

Layout under the store's root::

    <session_id>/session.json                 metadata (tmp, fsync, rename, fsync dir)
    <session_id>/<camera_id>.<first_seq>.mp4  fragmented MP4: one part of a run of
                                              consecutive seqs from first_seq on

The uplink handler calls :meth:`RecordingStore.open_session` on
``session_open`` (idempotent: a reconnecting agent gets the same recording
and its durable sequence numbers), :meth:`CameraRecording.append` per media
frame, and acknowledges what :meth:`CameraRecording.ack_state` says after
:meth:`CameraRecording.flush`. Sessions recorded before a restart are indexed
by :meth:`RecordingStore.load` (read only) and resumed, each run in a new
part file, when their agent opens them again. A session closed by
``session_close`` can be re-opened by its device, so late footage is never
refused. A session folder holding part files with data but no readable
``session.json`` is never started over: it is :attr:`RecordingStore.damaged`,
left as it is, and its ``session_open`` raises :class:`CorruptRecordingError`.
Part files are created with ``O_EXCL`` and never truncated unless planned as
the rewrite of a part holding no complete fragment
(:func:`receiver.parts.open_part_file`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from receiver.camera_recording import CameraRecording, Outcome, TrackInfo
from receiver.errors import (
    CorruptRecordingError,
    InvalidMetadataError,
    ReceiverError,
    RecordingFailedError,
    UnknownSessionError,
)
from receiver.livefeed import LiveFeed
from receiver.parts import parts_with_data
from receiver.run import FragmentListener
from receiver.session_recording import SessionRecording, check_track, read_session_json
from receiver.summaries import (
    SESSION_ID_RE,
    CameraSummary,
    PartSummary,
    RunSummary,
    SessionSummary,
    parse_part_file,
    validate_camera_id,
    validate_device_id,
    validate_session_id,
)

__all__ = [
    "CameraRecording",
    "CameraSummary",
    "FragmentListener",
    "Outcome",
    "PartSummary",
    "RecordingStore",
    "RunSummary",
    "SessionKey",
    "SessionPage",
    "SessionRecording",
    "SessionSummary",
    "TrackInfo",
    "parse_part_file",
    "validate_camera_id",
    "validate_session_id",
]

_LOG = logging.getLogger(__name__)
#: A deleted session's folder while it is removed (no session id starts with a dot).
_DELETED = ".deleted-"

#: Where a session sorts in a listing: its opening time, then its id (ties are real:
#: two devices can open sessions in the same clock tick).
SessionKey = tuple[float, str]


def _key(rec: SessionRecording) -> SessionKey:
    return (rec.opened_at, rec.session_id)


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of a session listing, and the key to ask for the next (None: no more)."""

    sessions: list[SessionSummary]
    next: SessionKey | None


class RecordingStore:
    """All session recordings under one root directory.

    Use as ``async with RecordingStore(root) as store:`` (loads the index,
    closes every open camera on exit), or call :meth:`load` and
    :meth:`aclose` yourself. ``clock`` gives wall seconds for opened/closed
    times, ``mono_ns`` monotonic nanoseconds for durability figures.
    """

    def __init__(
        self,
        root: Path,
        *,
        clock: Callable[[], float] = time.time,
        mono_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.root = Path(root)
        self._clock = clock
        self._mono_ns = mono_ns
        self._sessions: dict[str, SessionRecording] = {}
        #: Sessions whose folder holds footage but whose ``session.json`` is unreadable
        #: or missing: why. Left as they are on disk (never overwritten, never pruned,
        #: kept in the index); a ``session_open`` of one is refused.
        self.damaged: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._subscribers: list[Callable[[str], None]] = []

    async def __aenter__(self) -> RecordingStore:
        await self.load()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def load(self) -> None:
        """Index the sessions already on disk (read only; torn tails are cut on resume).

        A session whose ``session.json`` is unreadable, or missing while its
        folder holds part files with data, is logged at ERROR, listed in
        :attr:`damaged` and left as it is: opening it raises
        :class:`CorruptRecordingError` rather than overwrite anything.
        """
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        names = await asyncio.to_thread(lambda: sorted(p.name for p in self.root.iterdir()))
        for name in names:
            if name.startswith(_DELETED):  # a deletion a crash interrupted: finished now
                await asyncio.to_thread(remove_tree, self.root / name)
        async with self._lock:
            for name in names:
                if name in self._sessions or SESSION_ID_RE.fullmatch(name) is None:
                    continue
                try:
                    rec = await self._load_one(name)
                except CorruptRecordingError as exc:
                    self._damaged(name, str(exc))
                    continue
                if rec is not None:
                    self._sessions[name] = rec
                    self.damaged.pop(name, None)

    def _damaged(self, session_id: str, why: str) -> None:
        """Note a session whose recording cannot be read: logged at ERROR once."""
        if self.damaged.get(session_id) != why:
            _LOG.error(
                "session %r: recording unreadable, left as it is on disk: %s. Its part "
                "files are kept (and stay in the index); its device is refused until "
                "session.json is repaired",
                session_id, why,
            )  # fmt: skip
        self.damaged[session_id] = why

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(session_id)`` on the loop whenever a session's recording changed.

        A change is a ``session.json`` save (new parts, gaps, open, close) or
        an fsync that made more frames durable. The callback must be quick and
        must not raise (it runs inside the recording's fsync path); returns the
        unsubscribe.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def _notify(self, session_id: str) -> None:
        for callback in list(self._subscribers):
            try:
                callback(session_id)
            except Exception:
                _LOG.exception("recording subscriber failed")

    async def _load_one(self, session_id: str) -> SessionRecording | None:
        """A session read from its folder; None if there is none (no ``session.json``
        and no part file holding data). Raises :class:`CorruptRecordingError`."""
        directory = self.root / session_id
        doc = await asyncio.to_thread(read_session_json, directory / "session.json")
        if doc is None:
            held = await asyncio.to_thread(parts_with_data, directory)
            if held:
                raise CorruptRecordingError(
                    f"{directory}: no session.json, but {len(held)} part file(s) holding "
                    f"data ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''})"
                )
            return None
        rec = SessionRecording._from_json(directory, doc, clock=self._clock, mono_ns=self._mono_ns)
        rec.on_change = self._notify
        for cam in rec.cameras.values():
            for run in cam.runs:
                await run._scan(repair=False)
        return rec

    async def open_session(
        self,
        session_id: str,
        device_id: str,
        meta: dict[str, object],
        tracks: list[TrackInfo],
    ) -> SessionRecording:
        """Open (or resume) a session's recording and make its cameras writable.

        Idempotent: an already open session is returned as it is, a known one
        (from before a restart, or closed) resumes with its durable sequence
        numbers. Each camera gets its part files for the track's ``live_seq`` and
        ``first_seq`` now (created and listed at once), so the live lane never
        waits behind the older pre-roll and neither waits for a metadata save.
        """
        validate_session_id(session_id)
        validate_device_id(device_id)
        ids = [t.camera_id for t in tracks]
        if not tracks or len(set(ids)) != len(ids):
            raise InvalidMetadataError(f"session {session_id!r}: need distinct cameras: {ids}")
        for track in tracks:
            check_track(track)
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidMetadataError(f"session {session_id!r}: meta is not JSON: {exc}") from exc
        async with self._lock:
            rec = self._sessions.get(session_id)
            if rec is None:
                try:
                    rec = await self._load_one(session_id)
                except CorruptRecordingError as exc:
                    # Never started over on top of footage the device was told is safe.
                    self._damaged(session_id, str(exc))
                    raise CorruptRecordingError(
                        f"session {session_id!r} cannot be resumed: its recording on this "
                        f"receiver is damaged ({exc}); nothing is overwritten"
                    ) from exc
                self.damaged.pop(session_id, None)
            if rec is None:
                rec = SessionRecording(
                    self.root / session_id,
                    session_id,
                    device_id,
                    dict(meta),
                    self._clock(),
                    clock=self._clock,
                    mono_ns=self._mono_ns,
                )
                rec.on_change = self._notify
            try:
                await rec._activate(device_id, tracks)
            except OSError as exc:  # our disk (full, failing): the device keeps its footage
                raise RecordingFailedError(
                    f"session {session_id!r}: cannot open its recording: {exc!r}"
                ) from exc
            self._sessions[session_id] = rec
            return rec

    def get(self, session_id: str) -> SessionRecording:
        """A known session (open, closed or from before a restart)."""
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSessionError(f"no recording for session {session_id!r}") from None

    def open_sessions(self) -> list[SessionRecording]:
        """Known sessions that have not been closed (including ones from before a restart)."""
        return [r for r in self._sessions.values() if r.is_open]

    def closed_sessions(self) -> list[SessionRecording]:
        """Known sessions that were closed."""
        return [r for r in self._sessions.values() if not r.is_open]

    async def delete(self, session_id: str) -> int:
        """Delete a closed session's recording (its folder, whole); the bytes freed.

        The folder is first renamed out of the store (``.deleted-SESSION``, a name no
        session has), so a crash halfway leaves no half a recording that would load; what
        is left of one is removed at the next :meth:`load`. Raises
        :class:`UnknownSessionError`, or :class:`ReceiverError` for an open session.
        """
        async with self._lock:
            rec = self.get(session_id)
            if rec.is_open:
                raise ReceiverError(f"session {session_id!r} is open: not deleted")
            doomed = self.root / f"{_DELETED}{session_id}"
            await asyncio.to_thread(os.replace, rec.directory, doomed)
            del self._sessions[session_id]
        self._notify(session_id)  # the index drops it
        try:
            return await asyncio.to_thread(remove_tree, doomed)
        except OSError as exc:  # out of the store already; the next start removes the rest
            _LOG.error("deleted session %r: %s not removed yet: %s", session_id, doomed, exc)
            return 0

    def live_feed(self, session_id: str, camera_id: str) -> LiveFeed | None:
        """The live feed of a camera that is recording now, else None."""
        rec = self._sessions.get(session_id)
        cam = None if rec is None else rec.cameras.get(camera_id)
        if cam is None or not cam.writable or cam.live is None or cam.live.closed:
            return None
        return cam.live

    def sessions(self) -> list[SessionSummary]:
        """Summaries of all known sessions, newest first."""
        recs = sorted(self._sessions.values(), key=_key, reverse=True)
        return [r.summary() for r in recs]

    def page(self, limit: int, before: SessionKey | None = None) -> SessionPage:
        """A page of sessions for a listing, newest first: without ``before`` every open
        session and the newest ``limit`` closed ones; with it, the ``limit`` closed
        sessions older than that key. Only the page's sessions are summarised.
        """
        if limit < 1:
            raise ValueError(f"page limit {limit} < 1")
        recs = sorted(self._sessions.values(), key=_key, reverse=True)
        if before is None:
            shown = [r for r in recs if r.is_open]
            closed = [r for r in recs if not r.is_open]
        else:
            shown = []
            closed = [r for r in recs if not r.is_open and _key(r) < before]
        page = closed[:limit]
        last = page[-1] if len(closed) > limit else None
        return SessionPage(
            [r.summary() for r in sorted([*shown, *page], key=_key, reverse=True)],
            None if last is None else _key(last),
        )

    async def aclose(self) -> None:
        """Finish every camera of every session (the sessions stay open on disk)."""
        async with self._lock:
            for rec in self._sessions.values():
                try:
                    await rec._suspend()
                except Exception:
                    _LOG.exception("session %r: suspending failed", rec.session_id)


def folder_bytes(path: Path) -> int:
    """The bytes the files under a folder hold (0: none, or no such folder)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def remove_tree(path: Path) -> int:
    """Delete a folder; the bytes its files held."""
    total = folder_bytes(path)
    shutil.rmtree(path)
    return total
