"""Recordings on local disk with an SQLite index: the default :class:`RecordingStorage`.

The part files and ``session.json`` under ``DATA/recordings/`` are the
truth; the index (``DATA/recordings/.index.sqlite`` by default: a name no
session id can take) is derived from them, for readers that should not walk
files: sessions, cameras, part files (first/last seq, first/last capture
time, durable bytes) and every durable fragment of every part (offset,
size, decode time, duration, keyframe), which the HLS playlists cut into
segments. Fragments are stored packed, a row per batch (what one round added
to a part, at most ``MAX_BATCH``): a row per fragment was a trip through
sqlite3, and a hand-off of the GIL between the index's thread and the event
loop, for each of the thousands a round adds at full ingest rate.

Theory of operation. :class:`LocalStorage` subscribes to the
:class:`RecordingStore` (a ``session.json`` save, or an fsync that made
more frames durable, marks a session dirty). A background task takes a
snapshot of each dirty session on the loop (the writer's in-memory state:
which frames are durable, which part may still grow, and the fragments it
made durable since the last snapshot, as :class:`Fragmenter` listed them,
and the part's init segment), then, in a worker thread, writes the rows in
one transaction. Where the writer's list does not join what the index holds
(after a restart, a list cut short), it reads the newly durable fragments'
``moof`` boxes from the part file instead (never past the durable
frames: bytes written but not yet fsynced are never indexed). Snapshots of one
session are applied in order, one at a time, and at most one round every
``FOLLOW_INTERVAL_S``: a stream fsyncs many times a second, and reading
each fsync's few fragments apart cost the receiver a third of its CPU at
full ingest rate (the index is for playlists and listings, whose segments
last seconds; the MSE live view does not use it).

On start the index is checked (schema version, ``PRAGMA quick_check``); a
missing, unreadable or foreign file is deleted and rebuilt from the files
(the store has read every ``session.json`` and counted every part's
fragments). Every start reconciles each known session with its rows:
parts whose durable frame count is unchanged are not read again, so a
restart costs one query per session. Sessions no longer on disk are
dropped from the index; a session whose folder is still there but whose
``session.json`` is unreadable or missing (:attr:`RecordingStore.damaged`)
keeps its rows, and is listed marked damaged (:attr:`SessionEntry.damaged`),
with no cameras if it was never indexed: its part files are kept, and the
index is then what still lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import sys
import threading
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from receiver.errors import UnknownSessionError
from receiver.fmp4 import FRAGMENT_FIELDS, FragmentInfo, parse_init, read_fragments, read_init
from receiver.recording import RecordingStore, SessionRecording
from receiver.storage import CameraEntry, PartEntry, SessionEntry, UnknownPartError
from receiver.summaries import DeclaredGap, parse_part_file, validate_session_id

__all__ = ["INDEX_FILE", "LocalStorage", "UnknownPartError"]

_LOG = logging.getLogger(__name__)

#: The index's file name under the store's root (a leading dot: never a session id).
INDEX_FILE = ".index.sqlite"
#: Bumped when the tables change; an index of another version is rebuilt.
SCHEMA_VERSION = 2
#: The index follows the writer in rounds at least this far apart (see above).
FOLLOW_INTERVAL_S = 0.5
#: Fragments per row of ``fragment_batches`` at most (a part read whole from its file is
#: split, so that a range of it is found without unpacking all of it).
MAX_BATCH = 4096

_SCHEMA = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closed_at REAL,
    close_reason TEXT,
    meta TEXT NOT NULL
);
CREATE TABLE cameras (
    session_id TEXT NOT NULL REFERENCES sessions ON DELETE CASCADE,
    camera_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    zone TEXT NOT NULL,
    codec TEXT NOT NULL,
    mse_codec TEXT,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    fps REAL NOT NULL,
    first_seq INTEGER NOT NULL,
    durable_seq INTEGER NOT NULL,
    first_live_seq INTEGER,
    recording INTEGER NOT NULL,
    gaps TEXT NOT NULL,
    PRIMARY KEY (session_id, camera_id)
);
CREATE TABLE parts (
    id INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    camera_id TEXT NOT NULL,
    file TEXT NOT NULL,
    run INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    first_capture_us INTEGER,
    created_us INTEGER,
    init_size INTEGER NOT NULL,
    durable_size INTEGER NOT NULL,
    timescale INTEGER NOT NULL,
    base_time INTEGER NOT NULL,
    last_time INTEGER NOT NULL,
    last_capture_us INTEGER GENERATED ALWAYS AS
        (first_capture_us + (last_time - base_time) * 1000000 / timescale) VIRTUAL,
    final INTEGER NOT NULL,
    UNIQUE (session_id, file),
    FOREIGN KEY (session_id, camera_id) REFERENCES cameras ON DELETE CASCADE
);
CREATE INDEX parts_by_camera ON parts (session_id, camera_id, first_seq);
-- Consecutive fragments of a part from byte `offset` on: `data` holds, per fragment,
-- offset, size, samples, decode_time, duration, keyframe (0/1) and decode_time_at,
-- each a little-endian int64.
CREATE TABLE fragment_batches (
    part_id INTEGER NOT NULL REFERENCES parts ON DELETE CASCADE,
    offset INTEGER NOT NULL,
    count INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (part_id, offset)
) WITHOUT ROWID;
"""
_TABLES = {"sessions", "cameras", "parts", "fragment_batches"}
# Literal SQL only (no string building): every value goes in as a parameter.
_PARTS_OF_CAMERA = (
    "SELECT id, file, camera_id, run, first_seq, frames, first_capture_us, created_us, "
    "last_capture_us, init_size, durable_size, timescale, base_time, final FROM parts "
    "WHERE session_id = ? AND camera_id = ? ORDER BY first_seq"
)
_PART_BY_FILE = (
    "SELECT id, file, camera_id, run, first_seq, frames, first_capture_us, created_us, "
    "last_capture_us, init_size, durable_size, timescale, base_time, final FROM parts "
    "WHERE session_id = ? AND file = ?"
)
_BATCHES_FROM = (
    "SELECT data FROM fragment_batches WHERE part_id = ? AND offset >= ? AND offset < ? "
    "ORDER BY offset"
)
_INSERT_BATCH = "INSERT INTO fragment_batches (part_id, offset, count, data) VALUES (?, ?, ?, ?)"
_SESSIONS = (
    "SELECT session_id, device_id, opened_at, closed_at, close_reason FROM sessions "
    "WHERE ? IS NULL OR session_id = ? ORDER BY opened_at DESC, session_id"
)
_CAMERAS = (
    "SELECT session_id, camera_id, zone, codec, mse_codec, width, height, fps, first_seq, "
    "durable_seq, first_live_seq, recording, gaps FROM cameras "
    "WHERE ? IS NULL OR session_id = ? ORDER BY session_id, position"
)


# -- snapshots taken on the loop ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PartSnap:
    camera_id: str
    file: str
    run: int
    first_seq: int
    frames: int
    first_capture_us: int | None
    final: bool
    #: Fragments the writer made durable since the last snapshot, from the part's frame
    #: ``written_from`` on, flat (``FRAGMENT_FIELDS`` values each): the part file need
    #: not be read for them; nor for its init segment, when it is the writer's.
    written_from: int = 0
    written: array[int] = field(default_factory=lambda: array("q"))
    init: bytes | None = None


@dataclass(frozen=True, slots=True)
class _SessionSnap:
    session_id: str
    directory: Path
    device_id: str
    opened_at: float
    closed_at: float | None
    close_reason: str | None
    meta: str
    cameras: tuple[CameraEntry, ...]
    parts: tuple[_PartSnap, ...]


def _snapshot(rec: SessionRecording) -> _SessionSnap:
    """The writer's state of one session: runs on the loop, never in a thread."""
    cameras: list[CameraEntry] = []
    parts: list[_PartSnap] = []
    for cam in rec.cameras.values():
        t = cam.track
        cameras.append(
            CameraEntry(
                t.camera_id,
                t.zone,
                t.codec,
                cam.mse_codec,
                t.width,
                t.height,
                t.fps,
                t.first_seq,
                cam.durable_seq,
                cam.first_live_seq,
                cam.writable,
                tuple(cam.gaps),
            )
        )
        runs = [run for run in cam.runs if run.frames_durable]
        for index, run in enumerate(runs):
            # Only the last part of a run with an open (or failed, not yet repaired)
            # file may grow; everything else is final.
            growing = run.has_open_file or run.failed
            for part in run.parts:
                if part.frames:
                    last = part is run.parts[-1]
                    init, written_from, written = (
                        run.take_written() if last else (None, 0, array("q"))
                    )
                    parts.append(
                        _PartSnap(
                            t.camera_id,
                            part.file,
                            index,
                            part.first_seq,
                            part.frames,
                            part.first_capture_us,
                            not (growing and last),
                            written_from,
                            written,
                            init,
                        )
                    )
    return _SessionSnap(
        rec.session_id,
        rec.directory,
        rec.device_id,
        rec.opened_at,
        rec.closed_at,
        rec.close_reason,
        json.dumps(rec.meta, sort_keys=True),
        tuple(cameras),
        tuple(parts),
    )


# -- the database (blocking; every method runs in a worker thread) -----------------


@dataclass(slots=True)
class _Row:
    """A part's row, as far as applying a snapshot needs it."""

    id: int
    frames: int
    init_size: int
    durable_size: int
    created_us: int | None
    timescale: int
    base_time: int
    last_time: int


@dataclass(slots=True)
class _Scan:
    """What reading a part file added to its row."""

    frames: int
    init_size: int
    durable_size: int
    created_us: int | None
    timescale: int
    base_time: int
    last_time: int
    #: The fragments added, flat (``FRAGMENT_FIELDS`` values each).
    fragments: array[int]
    #: Whether the row's fragments are replaced (read from the start) or appended to.
    replace: bool


class _IndexDb:
    """One SQLite connection shared by worker threads under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.rebuilt = False
        self._conn = self._open()

    def _connect(self) -> sqlite3.Connection:
        # Private like the recordings (0640); SQLite gives its -wal and -shm the same mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640))
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # Derived data: losing the last commits to a power cut only means a reconcile.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        reason = "missing"
        if existed:
            try:
                conn = self._connect()
                problem = _check(conn)
                if problem is None:
                    return conn
                conn.close()
                reason = problem
            except sqlite3.DatabaseError as exc:
                reason = f"unreadable ({exc})"
            _LOG.warning("recording index %s is %s: rebuilding it from files", self.path, reason)
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    self.path.with_name(self.path.name + suffix).unlink()
        else:
            _LOG.info("recording index %s is missing: building it from the files", self.path)
        self.rebuilt = True
        conn = self._connect()
        with conn:
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- writing ----------------------------------------------------------

    def session_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT session_id FROM sessions")}

    def drop_sessions(self, session_ids: Iterable[str]) -> None:
        with self._lock, self._conn:
            for sid in session_ids:
                self._conn.execute("DELETE FROM parts WHERE session_id = ?", (sid,))
                self._conn.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))

    def apply(self, snap: _SessionSnap) -> int:
        """Bring one session's rows up to ``snap``; returns the part files read."""
        with self._lock:
            rows = {
                r[0]: _Row(*r[1:])
                for r in self._conn.execute(
                    "SELECT file, id, frames, init_size, durable_size, created_us, timescale, "
                    "base_time, last_time FROM parts WHERE session_id = ?",
                    (snap.session_id,),
                )
            }
        # Read the files outside the lock: readers go on meanwhile (one apply at a time).
        scans: dict[str, _Scan | None] = {}
        read = 0
        for part in snap.parts:
            row = rows.get(part.file)
            if row is None or part.frames != row.frames:
                scan = _from_writer(part, row)
                if scan is None:
                    scan = _scan(snap.directory / part.file, part.frames, row)
                    read += 1
                scans[part.file] = scan
        with self._lock, self._conn:
            self._write_session(snap)
            listed = {p.file for p in snap.parts}
            for file, row in rows.items():
                if file not in listed:
                    self._conn.execute("DELETE FROM parts WHERE id = ?", (row.id,))
            for part in snap.parts:
                self._write_part(snap.session_id, part, rows.get(part.file), scans.get(part.file))
        return read

    def _write_session(self, snap: _SessionSnap) -> None:
        c = self._conn
        c.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) DO UPDATE "
            "SET device_id = excluded.device_id, opened_at = excluded.opened_at, "
            "closed_at = excluded.closed_at, close_reason = excluded.close_reason, "
            "meta = excluded.meta",
            (
                snap.session_id,
                snap.device_id,
                snap.opened_at,
                snap.closed_at,
                snap.close_reason,
                snap.meta,
            ),
        )
        ids = {cam.camera_id for cam in snap.cameras}
        for (known,) in c.execute(
            "SELECT camera_id FROM cameras WHERE session_id = ?", (snap.session_id,)
        ).fetchall():
            if known not in ids:
                c.execute(
                    "DELETE FROM cameras WHERE session_id = ? AND camera_id = ?",
                    (snap.session_id, known),
                )
        for position, cam in enumerate(snap.cameras):
            c.execute(
                # An upsert, not INSERT OR REPLACE: a replaced row would cascade to its parts.
                "INSERT INTO cameras VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (session_id, camera_id) DO UPDATE SET position = excluded.position, "
                "zone = excluded.zone, codec = excluded.codec, mse_codec = excluded.mse_codec, "
                "width = excluded.width, height = excluded.height, fps = excluded.fps, "
                "first_seq = excluded.first_seq, durable_seq = excluded.durable_seq, "
                "first_live_seq = excluded.first_live_seq, recording = excluded.recording, "
                "gaps = excluded.gaps",
                (
                    snap.session_id,
                    cam.camera_id,
                    position,
                    cam.zone,
                    cam.codec,
                    cam.mse_codec,
                    cam.width,
                    cam.height,
                    cam.fps,
                    cam.first_seq,
                    cam.durable_seq,
                    cam.first_live_seq,
                    cam.recording,
                    json.dumps([g.to_json() for g in cam.gaps]),
                ),
            )

    def _write_part(
        self, session_id: str, part: _PartSnap, row: _Row | None, scan: _Scan | None
    ) -> None:
        c = self._conn
        if row is None and scan is None:
            return  # unreadable and never indexed: left out (logged by _scan)
        if scan is None:
            assert row is not None
            if part.frames != row.frames:  # the file no longer matches: index what it held
                _LOG.warning("%s/%s: kept its indexed fragments", session_id, part.file)
            c.execute(
                "UPDATE parts SET camera_id = ?, run = ?, first_capture_us = ?, final = ? "
                "WHERE id = ?",
                (part.camera_id, part.run, part.first_capture_us, part.final, row.id),
            )
            return
        values = (
            part.camera_id,
            part.run,
            part.first_seq,
            part.first_seq + scan.frames - 1,
            scan.frames,
            part.first_capture_us,
            scan.created_us,
            scan.init_size,
            scan.durable_size,
            scan.timescale,
            scan.base_time,
            scan.last_time,
            part.final,
        )
        if row is None:
            cur = c.execute(
                "INSERT INTO parts (camera_id, run, first_seq, last_seq, frames, first_capture_us, "
                "created_us, init_size, durable_size, timescale, base_time, last_time, final, "
                "session_id, file) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*values, session_id, part.file),
            )
            assert cur.lastrowid is not None
            part_id = cur.lastrowid
        else:
            part_id = row.id
            c.execute(
                "UPDATE parts SET camera_id = ?, run = ?, first_seq = ?, last_seq = ?, frames = ?, "
                "first_capture_us = ?, created_us = ?, init_size = ?, durable_size = ?, "
                "timescale = ?, base_time = ?, last_time = ?, final = ? WHERE id = ?",
                (*values, part_id),
            )
            if scan.replace:
                c.execute("DELETE FROM fragment_batches WHERE part_id = ?", (part_id,))
        flat, step = scan.fragments, MAX_BATCH * FRAGMENT_FIELDS
        c.executemany(
            _INSERT_BATCH,
            [
                (part_id, flat[at], len(batch) // FRAGMENT_FIELDS, _blob(batch))
                for at in range(0, len(flat), step)
                if (batch := flat[at : at + step])
            ],
        )

    # -- reading ----------------------------------------------------------

    def sessions(self, session_id: str | None = None) -> list[SessionEntry]:
        with self._lock:
            sessions = self._conn.execute(_SESSIONS, (session_id, session_id)).fetchall()
            cameras = self._conn.execute(_CAMERAS, (session_id, session_id)).fetchall()
        by_session: dict[str, list[CameraEntry]] = {}
        for r in cameras:
            by_session.setdefault(r[0], []).append(
                CameraEntry(
                    camera_id=r[1],
                    zone=r[2],
                    codec=r[3],
                    mse_codec=r[4],
                    width=r[5],
                    height=r[6],
                    fps=r[7],
                    first_seq=r[8],
                    durable_seq=r[9],
                    first_live_seq=r[10],
                    recording=bool(r[11]),
                    gaps=tuple(DeclaredGap.from_json(g) for g in json.loads(r[12])),
                )
            )
        return [
            SessionEntry(
                session_id=r[0],
                device_id=r[1],
                opened_at=r[2],
                closed_at=r[3],
                close_reason=r[4],
                cameras=tuple(by_session.get(r[0], ())),
            )
            for r in sessions
        ]

    def parts(self, session_id: str, camera_id: str) -> list[PartEntry]:
        with self._lock:
            rows = self._conn.execute(_PARTS_OF_CAMERA, (session_id, camera_id)).fetchall()
        return [_part_entry(r) for r in rows]

    def part(self, session_id: str, file: str) -> PartEntry | None:
        with self._lock:
            row = self._conn.execute(_PART_BY_FILE, (session_id, file)).fetchone()
        return None if row is None else _part_entry(row)

    def fragments(
        self, session_id: str, file: str, start: int, stop: int | None
    ) -> list[FragmentInfo]:
        with self._lock:
            row = self._conn.execute(
                "SELECT id FROM parts WHERE session_id = ? AND file = ?", (session_id, file)
            ).fetchone()
            if row is None:
                return []
            # From the batch holding byte `start` (fragments are back to back).
            first = self._conn.execute(
                "SELECT max(offset) FROM fragment_batches WHERE part_id = ? AND offset <= ?",
                (row[0], start),
            ).fetchone()[0]
            end = 2**63 - 1 if stop is None else stop
            blobs = self._conn.execute(
                _BATCHES_FROM, (row[0], start if first is None else first, end)
            ).fetchall()
        out: list[FragmentInfo] = []
        for (blob,) in blobs:
            fields = zip(*[iter(_unblob(blob))] * FRAGMENT_FIELDS, strict=True)
            out.extend(
                FragmentInfo(o, n, k, t, d, bool(key), at)
                for o, n, k, t, d, key, at in fields
                if o < end and o + n > start
            )
        return out


def _blob(values: array[int]) -> bytes:
    """Flat fragment values as stored: little-endian int64s."""
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array("q", values)
    swapped.byteswap()
    return swapped.tobytes()


def _unblob(blob: bytes) -> array[int]:
    values = array("q")
    values.frombytes(blob)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def _flat(fragments: Iterable[FragmentInfo]) -> array[int]:
    """Fragments flat, ``FRAGMENT_FIELDS`` values each (their fields in order)."""
    values = array("q")
    for f in fragments:
        values.extend(
            (f.offset, f.size, f.samples, f.decode_time, f.duration, f.keyframe, f.decode_time_at)
        )
    return values


def _check(conn: sqlite3.Connection) -> str | None:
    """Why an existing index cannot be used (None: it can)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        return f"of schema {version}, not {SCHEMA_VERSION}"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables >= _TABLES:
        return f"missing tables {sorted(_TABLES - tables)}"
    result = conn.execute("PRAGMA quick_check").fetchone()[0]
    return None if result == "ok" else f"damaged ({result})"


def _part_entry(r: tuple[Any, ...]) -> PartEntry:
    return PartEntry(
        file=r[1],
        camera_id=r[2],
        run=r[3],
        first_seq=r[4],
        frames=r[5],
        first_capture_us=r[6],
        created_us=r[7],
        last_capture_us=r[8],
        init_size=r[9],
        durable_size=r[10],
        timescale=r[11],
        base_time=r[12],
        final=bool(r[13]),
    )


def _from_writer(part: _PartSnap, row: _Row | None) -> _Scan | None:
    """What the writer says it added to a part since ``row`` (or since its init segment,
    for a part not yet indexed), if that is all of it."""
    have = 0 if row is None else row.frames
    if part.frames <= have:
        return None
    f = FRAGMENT_FIELDS
    skip = have - part.written_from
    new = part.written[skip * f : (part.frames - part.written_from) * f] if skip >= 0 else None
    if new is None or len(new) != (part.frames - have) * f:
        return None  # the writer's list does not join the row: read the file
    if row is None:
        if part.init is None:
            return None
        try:
            init = parse_init(part.init)
        except ValueError:
            return None
        if new[0] != init.size:
            return None
        init_size, created_us, timescale, base_time = (
            init.size, init.created_us, init.timescale, new[3]
        )  # fmt: skip
    else:
        if new[0] != row.durable_size:
            return None
        init_size, created_us, timescale, base_time = (
            row.init_size, row.created_us, row.timescale, row.base_time
        )  # fmt: skip
    last = new[-f:]
    return _Scan(
        part.frames,
        init_size,
        last[0] + last[1],
        created_us,
        timescale,
        base_time,
        last[3],  # one sample per fragment: its last sample's decode time
        new,
        replace=row is None,
    )


def _scan(path: Path, frames: int, row: _Row | None) -> _Scan | None:
    """Read a part's durable fragments: from where ``row`` ends, or from the start.

    Reads at most ``frames`` samples in all, so bytes that are written but
    not yet durable are never indexed. None if the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            init = read_init(f)
            if init is None:
                _LOG.warning("%s: no complete init segment; not indexed", path)
                return None
            if row is not None and frames > row.frames and row.init_size == init.size:
                found = read_fragments(f, row.durable_size, frames - row.frames, init)
                if found.fragments and found.fragments[0].offset == row.durable_size:
                    got = row.frames + sum(fr.samples for fr in found.fragments)
                    return _Scan(
                        got,
                        init.size,
                        found.end,
                        init.created_us,
                        init.timescale,
                        row.base_time,
                        row.last_time if found.last_sample_time is None else found.last_sample_time,
                        _flat(found.fragments),
                        replace=False,
                    )
            found = read_fragments(f, init.size, frames, init)
    except OSError as exc:
        _LOG.warning("%s: cannot be read (%s); not indexed", path, exc)
        return None
    got = sum(fr.samples for fr in found.fragments)
    if got != frames:
        _LOG.warning("%s: %d durable frames expected, %d found in the file", path, frames, got)
    base = found.fragments[0].decode_time if found.fragments else 0
    return _Scan(
        got,
        init.size,
        found.end,
        init.created_us,
        init.timescale,
        base,
        base if found.last_sample_time is None else found.last_sample_time,
        _flat(found.fragments),
        replace=True,
    )


# -- the storage -------------------------------------------------------------------


class LocalStorage:
    """Recordings on local disk (a :class:`RecordingStore`) with an SQLite index.

    Implements :class:`receiver.storage.RecordingStorage`.

    Use as ``async with LocalStorage(store) as storage:`` after the store was
    loaded (or call :meth:`start` and :meth:`aclose`). ``path`` defaults to
    ``<store root>/.index.sqlite``.
    """

    def __init__(self, store: RecordingStore, path: Path | None = None) -> None:
        self.store = store
        self.path = Path(path) if path is not None else store.root / INDEX_FILE
        self._db: _IndexDb | None = None
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._unsubscribe: Callable[[], None] | None = None
        #: Whether :meth:`start` found the index missing or unusable and rebuilt it.
        self.rebuilt = False
        #: Part files read (wholly or their new fragments) since start: a restart reads none,
        #: nor does following a writer that listed what it wrote (:meth:`Run.take_written`).
        self.parts_read = 0

    async def __aenter__(self) -> LocalStorage:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open (or rebuild) the index, reconcile it with the store, follow the store."""
        self._db = db = await asyncio.to_thread(_IndexDb, self.path)
        self.rebuilt = db.rebuilt
        self._unsubscribe = self.store.subscribe(self._changed)
        known = {s.session_id for s in self.store.sessions()}
        # A damaged session (its session.json unreadable or missing, its folder and part
        # files still there) keeps its rows: the index is then all that lists its footage.
        gone = await asyncio.to_thread(db.session_ids) - known - set(self.store.damaged)
        if gone:
            await asyncio.to_thread(db.drop_sessions, gone)
        self._dirty |= known
        await self.sync()
        self._task = asyncio.create_task(self._follow(), name="recording index")

    async def aclose(self) -> None:
        """Stop following the store, apply what is pending, close the index."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            # Not cancelled: a cancelled wait would leave its worker thread writing while
            # the final sync below starts another.
            self._stopping = True
            self._stop.set()
            self._wake.set()
            await self._task
            self._task = None
        db, self._db = self._db, None
        if db is not None:
            try:
                await self._sync_with(db)
            finally:
                await asyncio.to_thread(db.close)

    def _changed(self, session_id: str) -> None:
        self._dirty.add(session_id)
        self._wake.set()

    async def _follow(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.sync()  # a session that fails is logged and tried again later
            except Exception:
                _LOG.exception("updating the recording index failed")
            # Changes meanwhile gather for the next round (a stop ends the wait at once).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), FOLLOW_INTERVAL_S)

    async def sync(self) -> None:
        """Apply every change the store reported so far (the background task does this too)."""
        if self._db is not None:
            await self._sync_with(self._db)

    async def _sync_with(self, db: _IndexDb) -> None:
        async with self._sync_lock:
            failed: list[str] = []
            try:
                while self._dirty:
                    batch = sorted(self._dirty)
                    self._dirty.clear()
                    for n, sid in enumerate(batch):
                        try:
                            rec = self.store.get(sid)
                        except UnknownSessionError:
                            if sid not in self.store.damaged:  # deleted (retention)
                                await asyncio.to_thread(db.drop_sessions, [sid])
                            continue
                        snap = _snapshot(rec)  # on the loop: the writer mutates its state here
                        try:
                            self.parts_read += await asyncio.to_thread(db.apply, snap)
                        except Exception:
                            # One session's trouble must not keep the others out of the index.
                            _LOG.exception("indexing session %r failed", sid)
                            failed.append(sid)
                        except BaseException:
                            self._dirty.update(batch[n:])
                            raise
            finally:
                self._dirty.update(failed)  # tried again with the next change or start

    def _open_db(self) -> _IndexDb:
        if self._db is None:
            raise RuntimeError("LocalStorage is not started")
        return self._db

    # -- RecordingStorage --------------------------------------------------

    async def sessions(self) -> list[SessionEntry]:
        """Every indexed session, newest first; damaged ones marked (see
        :attr:`SessionEntry.damaged`), listed even if never indexed."""
        found = await asyncio.to_thread(self._open_db().sessions)
        return await self._mark_damaged(found, None)

    async def session(self, session_id: str) -> SessionEntry:
        """One session; raises :class:`UnknownSessionError`."""
        found = await asyncio.to_thread(self._open_db().sessions, session_id)
        found = await self._mark_damaged(found, session_id)
        if not found:
            raise UnknownSessionError(f"no recording for session {session_id!r}")
        return found[0]

    async def _mark_damaged(
        self, found: list[SessionEntry], session_id: str | None
    ) -> list[SessionEntry]:
        damaged = self.store.damaged
        if session_id is not None:
            damaged = {k: v for k, v in damaged.items() if k == session_id}
        if not damaged:
            return found
        out = [
            replace(e, damaged=damaged[e.session_id]) if e.session_id in damaged else e
            for e in found
        ]
        listed = {e.session_id for e in found}
        stubs = [
            SessionEntry(sid, "", when, None, None, (), why)
            for sid, why in damaged.items()
            if sid not in listed
            if (when := await asyncio.to_thread(_folder_time, self.store.root / sid)) is not None
        ]
        if not stubs:
            return out
        return sorted([*out, *stubs], key=lambda e: (-e.opened_at, e.session_id))

    async def parts(self, session_id: str, camera_id: str) -> list[PartEntry]:
        """A camera's parts holding durable frames, in seq order."""
        (await self.session(session_id)).camera(camera_id)  # raises for unknown ids
        return await asyncio.to_thread(self._open_db().parts, session_id, camera_id)

    async def part(self, session_id: str, file: str) -> PartEntry:
        """One part; raises :class:`UnknownPartError` (or ``UnknownSessionError``)."""
        found = await asyncio.to_thread(self._open_db().part, session_id, file)
        if found is None:
            await self.session(session_id)
            raise UnknownPartError(f"session {session_id!r} has no recording file {file!r}")
        return found

    async def fragments(
        self, session_id: str, file: str, start: int = 0, stop: int | None = None
    ) -> list[FragmentInfo]:
        """The part's durable fragments overlapping bytes ``[start, stop)``."""
        return await asyncio.to_thread(self._open_db().fragments, session_id, file, start, stop)

    async def read(self, session_id: str, file: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of a part file, within its durable size."""
        part = await self.part(session_id, file)
        if not 0 <= start <= stop <= part.durable_size:
            raise ValueError(f"{file}: bytes {start}..{stop} outside 0..{part.durable_size}")
        # Both names are checked again here: they become a path.
        validate_session_id(session_id)
        if parse_part_file(file) is None:
            raise UnknownPartError(f"no recording file {file!r}")
        path = self.store.root / session_id / file
        return await asyncio.to_thread(_read_range, path, start, stop)


def _read_range(path: Path, start: int, stop: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(stop - start)
    if len(data) != stop - start:
        raise OSError(f"{path}: {stop - start} bytes expected at {start}, read {len(data)}")
    return data


def _folder_time(path: Path) -> float | None:
    """A session folder's modification time (None: it is gone)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None
