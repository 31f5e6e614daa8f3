"""The sealed segment store: every camera's recent footage, on disk, unreadable here.

Theory of operation. Capture hands every numbered packet to :meth:`SegmentStore.push`
(on the event loop; it only appends to the camera's open segment in RAM). At
the first keyframe after ``segment_s`` seconds the open segment is closed and
queued to ONE writer thread, which encodes it (:mod:`agent.segment`), seals it
with age to the configured recipients, and writes it crash-safely: a hidden
temporary file (age streams into it: no sealed copy in memory), fsync, rename
to its final name (which carries the size, known only now), fsync of the
folder. Only whole, sealed segments ever carry a final name; the device holds
no key that opens them. What a crash loses is the open segment (a few seconds)
and the queue of the writer (normally empty).

The index (per camera, segments in seq order) is rebuilt from file names at
start: no segment is opened (10k segments: about 0.3 s on a 2-core VM).
Temporary files and files whose size differs from the size in their name are
torn leftovers: removed and audited. Files that are not ours, and folders the
scan cannot read, are audited and left alone: the agent starts. A name whose
capture times run backwards (older versions wrote one when the clock stepped
back inside a segment) is renamed with its two times in order, and audited.
A segment's capture times never run backwards: a packet stamped before the one
it follows starts a new segment.

Retention (:mod:`agent.retention`) runs in the writer thread for each
segment (before its rename, with room for it), again on a full disk, and
whenever the agent asks (:meth:`SegmentStore.retain_soon`, once a minute: with
every camera down no segment is written, yet old footage must still go).
Segments that overlap a :class:`Pin` (an emergency's range of a camera) and
that the receiver has not acknowledged are pinned: the quota never takes them
(the store then holds more than its quota, reported once per episode); only a
full disk (below ``min_free_bytes`` free, or ENOSPC) does, and only when
nothing else is left, with a loud ``segment_pinned_evicted`` audit entry. Age
expiry is audited in summary (``segments_expired``: the first of a run at
once, then at most one an hour, and at close), not per segment.

Retention does not trust the wall clock. A Pi has no battery-backed clock: it
boots on a stale date and records until NTP steps it forward (days, months);
a reboot without NTP sets it back again. The names carry the wall clock's
capture times, as other tools parse them; what retention trusts is in memory,
and in a small ledger beside the segments (:mod:`agent.store_ledger`):

- Footage written in this run ages by the monotonic clock since its write
  (:attr:`SegmentStore.monotonic`): a step forward no longer ages it out at
  once, a step back no longer keeps it past its age. It is evicted in write
  order, after all footage from before this run.
- Footage from before this run (found by the scan) ages by the wall clock
  against the end time in its name, and is at least as old as the time the
  store has seen it: this run (the monotonic clock since the scan) and the
  earlier runs the ledger counted (their monotonic time, added up across
  restarts; power-off time is not counted). It goes once the agent has run
  ``max_age_s`` with it, whatever the clock says and however often it
  restarts. Evicted first, oldest first (by the older of the two ages).
- Footage from before this run that ends more than a day after the wall clock
  (set back: a reboot on a stale date) is audited once per episode
  (``store_clock_behind``). A ledger that cannot be read is audited
  (``store_ledger_unreadable``) and started afresh; one that cannot be written
  (``store_ledger_unsaved``, once) is tried again. Either way footage is then
  kept longer, never deleted earlier.

Not covered (nothing in memory knows): footage of a previous run recorded on a
stale clock, when the clock has been set right since. Its names say it is old,
and it goes by them.

The store keeps its segments in retention's order and its byte total, so the
policy is given only the oldest segments it can need: a store at its quota
(8 GiB is about 4000 segments of a 4 Mbit/s camera) decides in 0.1 ms, not
by sorting every segment for every segment written (14 ms at 4000, 0.4 s at
100k, on a 2-core VM). A segment written goes to the end of that order. While
an emergency's pinned footage holds it over its quota, every segment is
checked against the pins instead (4000: about 18 ms).
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import os
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyrage

from agent import retention, segment, store_ledger
from agent.audit import AuditLog
from agent.messages import MAX_PAYLOAD_BYTES
from hardware import EncodedPacket

log = logging.getLogger(__name__)

#: An open segment is closed at a keyframe once this big, even before segment_s.
TARGET_SEGMENT_BYTES: Final = 4 * 1024 * 1024
#: Sealed segments waiting for the writer beyond this are dropped (a stalled disk).
MAX_PENDING_BYTES: Final = 64 * 1024 * 1024
#: A file named as a segment but larger is foreign: the uplink could not carry it (a
#: media frame's payload limit; the store's own segments stay well below it).
MAX_SEALED_BYTES: Final = MAX_PAYLOAD_BYTES
#: :meth:`SegmentStore.retain_soon` queues a retention pass at most this often.
RETAIN_EVERY_S: Final = 60.0
#: Footage from before this run ending this far after the wall clock: the clock is behind.
CLOCK_BEHIND_S: Final = 86_400.0
#: Age expiry is audited in summary: the first of a run at once, then at most this often.
EXPIRED_AUDIT_EVERY_S: Final = 3600.0
#: Footage from before this run is put in retention's order again when the wall clock
#: has stepped more than this since it was last (:meth:`SegmentStore._order`).
RESORT_STEP_S: Final = 1.0

#: Retention's order of a segment (:meth:`SegmentStore._order`).
_Key = tuple[int, float, int, int, int]


@dataclass(frozen=True, slots=True)
class StoredSegment:
    """One sealed segment on disk."""

    camera: str
    name: segment.SegmentName
    path: Path

    @property
    def first_seq(self) -> int:
        """First sequence number inside."""
        return self.name.first_seq

    @property
    def last_seq(self) -> int:
        """Last sequence number inside."""
        return self.name.last_seq


@dataclass(slots=True)
class Pin:
    """An emergency's claim on a camera's footage: ``first..last`` until acknowledged."""

    camera: str
    first: int
    last: int | None = None  # None while the emergency streams
    acked: int = -1
    holds: tuple[tuple[int, int], ...] = ()

    def protects(self, seg: StoredSegment) -> bool:
        """Whether ``seg`` holds footage of this pin the receiver does not have yet."""
        if seg.camera != self.camera or seg.last_seq < self.first:
            return False
        if self.last is not None and seg.first_seq > self.last:
            return False
        start = max(seg.first_seq, self.first, self.acked + 1)
        end = seg.last_seq if self.last is None else min(seg.last_seq, self.last)
        for first, last in self.holds:
            if first <= start <= last:
                start = last + 1
        return start <= end


@dataclass(slots=True)
class _Open:
    """A camera's segment being filled, and what push checks for every packet."""

    stream: segment.StreamDesc  # the stream of the packets in it
    first_ns: int  # capture time of its first packet
    last_ns: int  # capture time of its last packet: the next one may not be earlier
    next_seq: int  # the seq the next packet must have to join it
    packets: list[EncodedPacket] = field(default_factory=list)
    nbytes: int = 0
    touched_ns: int = 0  # time.monotonic_ns() of the last packet added


#: A closed segment for the writer: its packets, their stream, the device's chain
#: checkpoint, and the bytes it added to ``_pending_bytes`` (the writer takes back these).
_Job = tuple[list[EncodedPacket], segment.StreamDesc, Mapping[str, Any] | None, int]


class _Retain:
    """A retention pass for the writer, with no segment to write."""


_RETAIN: Final = _Retain()


@dataclass(slots=True)
class _Expired:
    """Segments age expiry deleted since its last audit entry."""

    count: int = 0
    bytes: int = 0
    oldest_end_ms: int = 0
    newest_end_ms: int = 0

    def add(self, seg: StoredSegment) -> None:
        end = seg.name.end_ms
        self.oldest_end_ms = end if not self.count else min(self.oldest_end_ms, end)
        self.newest_end_ms = end if not self.count else max(self.newest_end_ms, end)
        self.count += 1
        self.bytes += seg.name.size


@dataclass(slots=True)
class StoreStats:
    """Counters for status, metrics and benchmarks."""

    segments_written: int = 0
    bytes_written: int = 0
    media_bytes: int = 0
    evicted: int = 0
    pinned_evicted: int = 0
    dropped: int = 0
    torn_removed: int = 0
    write_errors: int = 0


class SegmentStore:
    """Per-camera sealed segments with retention. Use :meth:`open` then :meth:`close`."""

    def __init__(
        self,
        directory: Path,
        recipients: list[pyrage.x25519.Recipient],
        *,
        audit: AuditLog,
        boot_id: str,
        segment_s: float = 4.0,
        max_age_s: float = 72 * 3600,
        quota_bytes: int = 8 * 1024**3,
        min_free_bytes: int = 0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        attest: Callable[[str, int, int], Mapping[str, Any] | None] | None = None,
    ) -> None:
        """``clock`` is the wall clock (capture times are its); ``monotonic`` ages the
        footage this run writes, and bounds the age of older footage from below.
        ``attest(camera, first_seq, last_seq)``, called on the event loop as a segment
        closes, gives the device's signed chain checkpoint to put in its header."""
        if not recipients:
            raise ValueError("a segment store needs at least one age recipient")
        self.directory = directory
        self.recipients = recipients
        self.audit = audit
        self.boot_id = boot_id
        #: This run of the agent (a store is opened once per start): in every segment, so
        #: an export tells seqs a restart skipped from footage gone missing.
        self.run_id = secrets.token_hex(8)
        self.segment_s = segment_s
        self.max_age_s = max_age_s
        self.quota_bytes = quota_bytes
        #: Unpinned footage is evicted before the disk has less than this free (the audit
        #: trail and the state files share it).
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self.monotonic = monotonic
        self._attest = attest
        self.stats = StoreStats()
        self.pins: list[Pin] = []
        self._index: dict[str, list[StoredSegment]] = {}  # per camera, in seq order
        #: Every indexed segment in retention's order (:meth:`_order`): the first
        #: ``_n_scanned``, from before this run, oldest first; then this run's, as written.
        self._by_age: list[StoredSegment] = []
        self._n_scanned = 0
        #: The wall clock at the scan as the segments from before this run were last
        #: put in order for it (:meth:`_sort_scanned`: it changes as the clock steps).
        self._sorted_for = 0.0
        #: End times (ms) of the segments from before this run, ascending.
        self._scanned_ends: list[int] = []
        #: How long the footage from before this run was seen in earlier runs: the
        #: ledger, and what it said at the scan (:meth:`_age`, :meth:`_order`).
        self._ledger = store_ledger.Ledger(directory / store_ledger.LEDGER_NAME)
        self._accrued: Callable[[str, int], float] = lambda camera, last_seq: 0.0
        self._ledger_saved_at: float | None = None  # monotonic time of its last save
        self._ledger_failing = False  # whether its last save failed (said once)
        #: This run's segments: (write number, monotonic time of the write).
        self._stamps: dict[StoredSegment, tuple[int, float]] = {}
        self._writes = 0
        self._scanned_at: float | None = None  # monotonic time of the scan
        self._rank: dict[str, int] = {}  # a camera's position in the scanned index
        self._used = 0  # bytes of the indexed segments
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | _Retain | None] = queue.SimpleQueue()
        self._retained_at: float | None = None  # retain_soon's clock at its last pass
        #: Whether pinned footage holds the store over its quota (the writer's: said once).
        self._over_quota = False
        #: Whether footage from before this run ends days after the clock (said once).
        self._clock_behind = False
        self._expired = _Expired()  # expiry not audited yet (the writer's)
        self._expired_said: float | None = None  # monotonic time of its last audit entry
        self._pending_bytes = 0
        #: Per camera, first seqs of sealed-to-be segments queued for the writer (FIFO).
        self._queued: dict[str, deque[int]] = {}
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[StoredSegment], None]] = []

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        """Rebuild the index from disk and start the writer (blocking: run in a thread)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._scan()
        self._thread = threading.Thread(target=self._writer, name="segment-writer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Seal every open segment, let the writer finish, and stop it."""
        for camera in list(self._open):
            self._seal_open(camera)
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def on_sealed(self, listener: Callable[[StoredSegment], None]) -> Callable[[], None]:
        """Call ``listener(segment)`` on the event loop after each segment is on disk."""
        loop = asyncio.get_running_loop()

        def bridge(seg: StoredSegment) -> None:
            loop.call_soon_threadsafe(listener, seg)

        self._listeners.append(bridge)
        return lambda: self._listeners.remove(bridge)

    # -- capture side (event loop) -------------------------------------------------

    def push(self, packet: EncodedPacket, stream: segment.StreamDesc) -> None:
        """Add one numbered packet to its camera's open segment."""
        cur = self._open.get(packet.camera)
        # Its record too: a segment of thousands of small packets (a camera without a
        # keyframe for minutes) must still fit what a reader accepts.
        size = len(packet.payload) + segment.RECORD.size
        # 0.95: a keyframe a hair before segment_s closes it, not one GOP later.
        if cur is not None and (
            packet.seq != cur.next_seq
            or (stream is not cur.stream and stream != cur.stream)  # a new stream: new segment
            or cur.nbytes + size > segment.MAX_SEGMENT_BYTES
            # The clock stepped back (NTP, a restarted source): a name is start <= end.
            or packet.capture_ns < cur.last_ns
            or (
                packet.keyframe
                and (
                    packet.capture_ns - cur.first_ns >= self.segment_s * 0.95e9
                    or cur.nbytes >= TARGET_SEGMENT_BYTES
                )
            )
        ):
            self._seal_open(packet.camera)
            cur = None
        if cur is None:
            cur = self._open[packet.camera] = _Open(
                stream, packet.capture_ns, packet.capture_ns, packet.seq
            )
        cur.packets.append(packet)
        cur.nbytes += size
        cur.next_seq = packet.seq + 1
        cur.last_ns = packet.capture_ns
        cur.stream = stream
        cur.touched_ns = time.monotonic_ns()

    def seal_idle(self, now_ns: int, idle_s: float) -> list[str]:
        """Seal every open segment no packet joined for ``idle_s`` (a camera that went
        silent, cut perhaps: its last seconds must reach the disk, not wait in RAM for a
        packet that may never come); returns the cameras sealed. On the loop."""
        idle = [
            camera
            for camera, cur in self._open.items()
            if cur.packets and now_ns - cur.touched_ns > idle_s * 1e9
        ]
        for camera in idle:
            log.warning("camera %s silent for %g s: its open segment is sealed", camera, idle_s)
            self._seal_open(camera)
        return idle

    def retain_soon(self, now_s: float) -> bool:
        """Have the writer thread apply retention (age, quota) now, if it did not on
        this call's account in the last :data:`RETAIN_EVERY_S` of ``now_s`` (a monotonic
        clock); whether it was queued. Retention otherwise runs only as a segment is
        written: with every camera down, footage past its age would stay on the card.
        The agent calls this every few seconds once its owed footage is pinned (not
        :meth:`open`: that runs before the pins are back). On the loop; never waits."""
        if self._thread is None:
            return False
        if self._retained_at is not None and now_s - self._retained_at < RETAIN_EVERY_S:
            return False
        self._retained_at = now_s
        self._jobs.put(_RETAIN)
        return True

    def open_first_seq(self, camera: str) -> int | None:
        """First seq of the camera's footage not on disk yet: queued for the writer, or
        in the segment still being filled. Backfill waits for it rather than declare it lost.
        """
        with self._lock:
            return self._unsealed_first(camera)

    def locate(self, camera: str, seq: int) -> tuple[StoredSegment | None, int | None]:
        """:meth:`find` and :meth:`open_first_seq` as one view, under one lock: where
        backfill looks for ``seq``.

        The writer indexes a segment and only then takes it off its queue; two separate
        calls could miss it in both places, and backfill would declare footage lost that
        is on disk.
        """
        with self._lock:
            return self._find(camera, seq), self._unsealed_first(camera)

    def _unsealed_first(self, camera: str) -> int | None:
        queued = self._queued.get(camera)
        if queued:
            return queued[0]
        cur = self._open.get(camera)  # the loop's (so is the caller)
        return cur.packets[0].seq if cur is not None and cur.packets else None

    def _seal_open(self, camera: str) -> None:
        cur = self._open.pop(camera, None)
        if cur is None or not cur.packets:
            return
        desc = cur.stream  # the stream of the packets in it, not of the next one
        with self._lock:
            self._pending_bytes += cur.nbytes
            dropping = self._pending_bytes > MAX_PENDING_BYTES
        if dropping:  # the disk is stalled: keep capturing, say loudly what is lost
            with self._lock:
                self._pending_bytes -= cur.nbytes
            self.stats.dropped += 1
            self.audit.record_soon(
                "segment_dropped",
                camera=camera,
                first_seq=cur.packets[0].seq,
                last_seq=cur.packets[-1].seq,
                reason="writer_backlog",
            )
            return
        chain: Mapping[str, Any] | None = None
        if self._attest is not None:
            try:
                chain = self._attest(camera, cur.packets[0].seq, cur.packets[-1].seq)
            except Exception:  # a chain bug must never cost the footage
                log.exception("segment of %s: no chain checkpoint", camera)
        with self._lock:
            self._queued.setdefault(camera, deque()).append(cur.packets[0].seq)
        self._jobs.put((cur.packets, desc, chain, cur.nbytes))

    def add_pin(self, pin: Pin) -> None:
        """Protect an emergency's footage from retention until it is acknowledged."""
        with self._lock:
            self.pins.append(pin)

    def remove_pin(self, pin: Pin) -> None:
        """The receiver holds everything of ``pin``: its footage may age out normally."""
        with self._lock:  # this pin, not an equal one (a resumed session's may be equal)
            self.pins = [held for held in self.pins if held is not pin]

    # -- queries (any thread) ------------------------------------------------------

    def segments(self, camera: str) -> list[StoredSegment]:
        """The camera's sealed segments in seq order (a copy)."""
        with self._lock:
            return list(self._index.get(camera, ()))

    def cameras(self) -> list[str]:
        """Cameras with footage on disk."""
        with self._lock:
            return sorted(c for c, segs in self._index.items() if segs)

    def find(self, camera: str, seq: int) -> StoredSegment | None:
        """The sealed segment holding ``seq``, else the first one after it, else ``None``."""
        with self._lock:
            return self._find(camera, seq)

    def _find(self, camera: str, seq: int) -> StoredSegment | None:
        segs = self._index.get(camera, [])
        i = bisect.bisect_right(segs, seq - 1, key=_last_seq)
        return segs[i] if i < len(segs) else None

    def forget(self, seg: StoredSegment, reason: str) -> None:
        """Take a segment that cannot be read (its file vanished or fails) out of the
        index, loudly, so backfill declares its range lost instead of retrying it (on the
        loop). A segment the writer evicted meanwhile is already out: nothing to say."""
        with self._lock:
            if not self._unindex(seg):
                return
        log.error("segment %s cannot be read, forgotten: %s", seg.path.name, reason)
        self.audit.record_soon(
            "segment_unreadable",
            camera=seg.camera,
            first_seq=seg.first_seq,
            last_seq=seg.last_seq,
            reason=reason[:200],
        )

    def used_bytes(self) -> int:
        """Bytes of sealed segments on disk."""
        with self._lock:
            return self._used

    @staticmethod
    def read(seg: StoredSegment) -> bytes:
        """The sealed bytes of a segment (blocking: call from a worker thread)."""
        return seg.path.read_bytes()

    # -- start-up scan -------------------------------------------------------------

    def _scan(self) -> None:
        # Every file found is at least as old as this (the lower bound of its age).
        scanned_at = self.monotonic()
        index: dict[str, list[StoredSegment]] = {}
        with os.scandir(self.directory) as top:
            for cam_entry in top:
                if not cam_entry.is_dir(follow_symlinks=False):
                    if cam_entry.name not in store_ledger.LEDGER_FILES:
                        self._foreign(Path(cam_entry.path))
                    continue
                segs = index.setdefault(cam_entry.name, [])
                try:
                    with os.scandir(cam_entry.path) as files:
                        for entry in files:
                            self._scan_one(cam_entry.name, entry, segs)
                except OSError as exc:  # one folder must never keep the agent from starting
                    self._unreadable(Path(cam_entry.path), exc)
        for segs in index.values():
            segs.sort(key=_first_seq)
        why = self._ledger.load()
        if why is not None:
            self._ledger_damaged(why)
        lowest = {cam: min(map(_last_seq, segs)) for cam, segs in index.items() if segs}
        highest = {cam: max(map(_last_seq, segs)) for cam, segs in index.items() if segs}
        now_s, now_mono = self.clock(), self.monotonic()
        with self._lock:
            self._index = index
            self._rank = {camera: rank for rank, camera in enumerate(index)}
            self._by_age = [s for segs in index.values() for s in segs]
            self._n_scanned = len(self._by_age)
            self._scanned_ends = sorted(map(_end_ms, self._by_age))
            self._stamps = {}
            self._scanned_at = scanned_at
            self._used = sum(s.name.size for s in self._by_age)
            self._ledger.start(lowest, highest)
            self._accrued = self._ledger.accrual()
            self._sort_scanned(self._wall_at_scan(now_s, now_mono))
            ahead = self._ahead_of_clock(now_s)
        log.info("segment store %s: %d segment(s) indexed", self.directory, self._n_scanned)
        self._clock_episode(ahead, now_s)
        # Now, before this run writes a segment: no bound the file holds may stay above
        # the highest seq on disk (store_ledger: what this run writes is above it).
        self._save_ledger(now_mono)

    def _scan_one(self, camera: str, entry: os.DirEntry[str], segs: list[StoredSegment]) -> None:
        path = Path(entry.path)
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            self._remove_torn(camera, path, "unfinished write")
            return
        name = segment.SegmentName.parse(entry.name)
        backwards = name is None and (name := _backwards_name(entry.name)) is not None
        # Larger than the uplink carries: not one of ours (sent, the uplink would refuse
        # it as too large and reconnect, again and again).
        if name is None or name.size > MAX_SEALED_BYTES or not entry.is_file(follow_symlinks=False):
            self._foreign(path)
            return
        size = entry.stat(follow_symlinks=False).st_size
        if size != name.size:
            self._remove_torn(camera, path, f"size {size} bytes, expected {name.size}")
            return
        if backwards:
            path = self._rename_backwards(camera, path, name)
        segs.append(StoredSegment(camera, name, path))

    def _rename_backwards(self, camera: str, path: Path, name: segment.SegmentName) -> Path:
        """Give a segment whose name's times run backwards (an older version's, written
        across a clock step back) the name of its times in order, so that retention,
        backfill and the export tool see it; its path (the old one if it cannot be)."""
        new = path.with_name(name.filename)
        try:
            if new.exists():
                raise FileExistsError(errno.EEXIST, "a segment has that name", str(new))
            os.rename(path, new)
            _fsync_dir(path.parent)
        except OSError as exc:  # indexed as it lies: retention still deletes it in time
            log.error("segment %s not renamed to %s: %s", _printable(str(path)), new.name, exc)
        renamed = path if path.exists() else new
        log.warning(
            "segment %s: capture times backwards in its name, now %s",
            _printable(str(path)),
            renamed,
        )
        self.audit.record(
            "segment_renamed",
            camera=_printable(camera),
            file=path.name,
            to=renamed.name,
            reason="capture times backwards in its name",
        )
        return renamed

    def _remove_torn(self, camera: str, path: Path, why: str) -> None:
        try:
            path.unlink()
        except OSError as exc:
            log.error("cannot remove torn segment %s: %s", _printable(str(path)), exc)
        self.stats.torn_removed += 1
        log.warning("removed torn segment %s (%s)", _printable(str(path)), why)
        self.audit.record(
            "segment_torn", camera=_printable(camera), file=_printable(path.name), reason=why
        )

    def _foreign(self, path: Path) -> None:
        log.warning(  # printable: a name need not be UTF-8
            "segment store: %s is not a breakglass segment; left alone", _printable(str(path))
        )
        self.audit.record("store_foreign_file", file=self._relative(path))

    def _unreadable(self, folder: Path, exc: OSError) -> None:
        """A folder of the store the scan cannot read (a root-only ``lost+found``, a
        technician's copy): said, left alone; what it held so far stays indexed."""
        log.error("segment store: cannot read %s (%s); left alone", _printable(str(folder)), exc)
        self.audit.record(
            "store_unreadable",
            file=self._relative(folder),
            error=f"{type(exc).__name__}: {exc.strerror or exc}"[:200],
        )

    def _relative(self, path: Path) -> str:
        """``path`` relative to the store, as text the trail can hold (:func:`_printable`)."""
        return _printable(str(path.relative_to(self.directory)))

    # -- the observation ledger (agent.store_ledger) -----------------------------------

    def _ledger_damaged(self, why: str) -> None:
        """The ledger could not be read: said; a fresh one counts from this start."""
        log.error(
            "segment store: its ledger %s cannot be read (%s): a fresh one is started; "
            "footage from before this start ages by its names and from this start",
            self._ledger.path,
            why,
        )
        self.audit.record("store_ledger_unreadable", file=store_ledger.LEDGER_NAME, error=why)

    def _save_ledger(self, now_mono: float) -> None:
        """Save how long this run has seen the footage found at its start, cutting the
        ledger to the footage on disk first: at the start, on a retention pass every
        :data:`~agent.store_ledger.SAVE_EVERY_S` and at close (the opening thread's,
        then the writer's). A failure is logged, audited once, and tried again."""
        if self._scanned_at is None:
            return
        with self._lock:
            lowest = {cam: segs[0].last_seq for cam, segs in self._index.items() if segs}
            self._ledger.cut(lowest)
            doc = self._ledger.doc(now_mono - self._scanned_at)
        self._ledger_saved_at = now_mono
        try:
            self._ledger.save(doc)
        except Exception as exc:  # a card gone read-only must not stop the writer
            why = f"{type(exc).__name__}: {exc}"[:200]
            log.error("segment store: ledger %s not saved: %s", self._ledger.path, why)
            if not self._ledger_failing:
                self._ledger_failing = True
                self.audit.record("store_ledger_unsaved", file=store_ledger.LEDGER_NAME, error=why)
            return
        if self._ledger_failing:
            self._ledger_failing = False
            log.warning("segment store: ledger %s saved again", self._ledger.path)

    # -- writer thread ---------------------------------------------------------------

    def _writer(self) -> None:
        try:
            self._write_jobs()
        finally:
            self._say_expired(self.monotonic(), flush=True)
            self._save_ledger(self.monotonic())

    def _write_jobs(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, _Retain):
                try:
                    self._enforce(need_bytes=0)
                except Exception:  # the writer must outlive any one pass
                    log.exception("retention pass failed")
                now_mono = self.monotonic()
                saved_at = self._ledger_saved_at
                if saved_at is None or now_mono - saved_at >= store_ledger.SAVE_EVERY_S:
                    self._save_ledger(now_mono)
                continue
            # Exactly what _seal_open added (payloads and their records): anything else
            # drifts, and a backlog that never drains drops every segment.
            packets, desc, chain, nbytes = job
            stored: StoredSegment | None = None
            try:
                stored = self._write(packets, desc, chain)
            except Exception as exc:  # the writer must outlive any one segment
                self.stats.write_errors += 1
                log.exception("segment of %s not written", packets[0].camera)
                self.audit.record(
                    "segment_lost",
                    camera=packets[0].camera,
                    first_seq=packets[0].seq,
                    last_seq=packets[-1].seq,
                    reason=f"{type(exc).__name__}: {exc}"[:200],
                )
            finally:
                with self._lock:
                    self._pending_bytes -= nbytes
                    self._queued[packets[0].camera].popleft()
            if stored is not None:  # told after the queue moved on: one consistent view
                for listener in list(self._listeners):
                    try:
                        listener(stored)
                    except RuntimeError as exc:  # its loop is closed; it is on disk anyway
                        log.warning("on_sealed listener not called: %s", exc)

    def _write(
        self,
        packets: list[EncodedPacket],
        desc: segment.StreamDesc,
        chain: Mapping[str, Any] | None,
    ) -> StoredSegment:
        camera = packets[0].camera
        _, plain = segment.encode(packets, desc, self.boot_id, chain=chain, run=self.run_id)
        first, last = packets[0], packets[-1]
        folder = self.directory / camera
        tmp = folder / f".{first.seq:016d}-{last.seq:016d}.tmp"
        bound = segment.sealed_size_bound(len(plain), len(self.recipients))
        free = _free_bytes(self.directory) if self.min_free_bytes else None
        if free is not None and self.min_free_bytes + bound > free:
            # Room for the trail and the state files: the disk is as good as full.
            self._enforce(
                need_bytes=bound, headroom=free - self.min_free_bytes, why="free space floor"
            )
        for attempt in range(3):
            try:
                size = _seal_durably(folder, tmp, plain, self.recipients)
                break
            except OSError as exc:
                if exc.errno != errno.ENOSPC or attempt == 2:
                    raise
                log.error("disk full writing %s: evicting to make room", tmp)
                self._enforce(need_bytes=bound, headroom=0)
        name = segment.SegmentName(
            first.seq, last.seq, first.capture_ns // 1_000_000, last.capture_ns // 1_000_000, size
        )
        stored = StoredSegment(camera, name, folder / name.filename)
        try:
            # Retention as if before the write: the index does not hold the new segment yet.
            self._enforce(need_bytes=size)
            os.replace(tmp, stored.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            _fsync_dir(folder)
        except OSError as exc:  # the file is whole under its name: keep it, say so
            log.error("segment %s: its folder not fsynced (%s): the name may not survive "
                      "a power cut", stored.path.name, exc)  # fmt: skip
        written_at = self.monotonic()
        with self._lock:
            self._unindex(stored)  # the same name written again: the file was replaced
            bisect.insort(self._index.setdefault(camera, []), stored, key=_first_seq)
            # The newest in retention's order: after all that is indexed.
            self._stamps[stored] = (self._writes, written_at)
            self._writes += 1
            self._by_age.append(stored)
            self._used += size
        self.stats.segments_written += 1
        self.stats.bytes_written += size
        self.stats.media_bytes += sum(len(p.payload) for p in packets)
        return stored

    def _order(self, seg: StoredSegment) -> _Key:
        """Retention's order (under the lock): the segments from before this run first,
        oldest first (:meth:`_sort_scanned`); then this run's, in the order written. A
        clock set back cannot put this run's footage before older footage."""
        stamp = self._stamps.get(seg)
        if stamp is None:
            return self._scanned_order(seg)
        return 1, 0.0, stamp[0], 0, 0

    def _scanned_order(self, seg: StoredSegment) -> _Key:
        oldest = max(
            self._sorted_for - seg.name.end_ms / 1000, self._accrued(seg.camera, seg.last_seq)
        )
        return 0, -oldest, seg.name.end_ms, self._rank[seg.camera], seg.name.first_seq

    def _sort_scanned(self, wall_at_scan: float) -> None:
        """Put the segments from before this run in order of :meth:`_age` for a wall
        clock that read ``wall_at_scan`` at the scan (under the lock).

        Their age is ``live + max(wall_at_scan - end, accrued)`` (``live``: the time
        since the scan, the same for all of them; ``accrued``: what the ledger saw of
        them before this start, fixed for the run). Ordered by the second term, oldest
        first, then by end time, then as listed in the index (camera, seq), ages do
        not rise along the order until the wall clock steps (:meth:`_enforce` sorts
        again then). With no time accrued that is the order of end times, whatever
        the clock: footage named ahead of it comes last, as before the ledger.
        """
        n = self._n_scanned
        self._sorted_for = wall_at_scan  # the keys are this, and _accrued: fixed for the run
        self._by_age[:n] = sorted(self._by_age[:n], key=self._scanned_order)

    def _wall_at_scan(self, now_s: float, now_mono: float) -> float:
        """What the wall clock read at the scan, as it reads now (it may have stepped)."""
        assert self._scanned_at is not None
        return now_s - (now_mono - self._scanned_at)

    def _age(self, seg: StoredSegment, now_s: float, now_mono: float) -> float:
        """How old ``seg``'s footage is at least, in seconds (under the lock).

        This run's by the monotonic clock since its write: the wall clock may have
        stepped since (forward: it would look days old; back: young for days).
        Older footage by the wall clock (its name's end), and at least as old as the
        time the store has seen it: since the scan found it, plus what the ledger
        (:mod:`agent.store_ledger`) saw of it in earlier runs. A clock set back keeps
        it no longer than ``max_age_s`` of the agent's running time, however often it
        restarts. Never more than its true age, so nothing goes early; neither rises
        along :meth:`_order` (that is retention's order)."""
        stamp = self._stamps.get(seg)
        if stamp is not None:
            return now_mono - stamp[1]
        assert self._scanned_at is not None
        seen = now_mono - self._scanned_at + self._accrued(seg.camera, seg.last_seq)
        return max(now_s - seg.name.end_ms / 1000, seen)

    def _unindex(self, seg: StoredSegment) -> bool:
        """Take ``seg`` out of the index (under the lock); whether it was in it."""
        if not _remove(self._index.get(seg.camera, []), seg, _first_seq):
            return False
        if self._by_age[0] is seg:  # retention takes the oldest: no search
            del self._by_age[0]
        else:
            _remove(self._by_age, seg, self._order)
        if self._stamps.pop(seg, None) is None:
            self._n_scanned -= 1
            ends = self._scanned_ends
            del ends[bisect.bisect_left(ends, seg.name.end_ms)]
        self._used -= seg.name.size
        return True

    def _ahead_of_clock(self, now_s: float) -> tuple[int, int] | None:
        """Segments from before this run ending more than :data:`CLOCK_BEHIND_S` after
        ``now_s`` (the wall clock was set back), and the newest end (ms); ``None``
        if none does. Under the lock."""
        ends = self._scanned_ends
        limit_ms = (now_s + CLOCK_BEHIND_S) * 1000
        if not ends or ends[-1] <= limit_ms:
            return None
        return len(ends) - bisect.bisect_right(ends, limit_ms), ends[-1]

    def _clock_episode(self, ahead: tuple[int, int] | None, now_s: float) -> None:
        """Say once that footage from before this run ends days after the wall clock."""
        if (ahead is not None) == self._clock_behind:
            return
        self._clock_behind = ahead is not None
        now_ms = int(now_s * 1000)
        if ahead is None:
            log.info("segment store: the wall clock is no longer behind its footage")
            return
        count, newest_ms = ahead
        log.warning(
            "segment store: %d segment(s) from before this start end more than a day after "
            "the wall clock (newest %.1f days ahead): the clock was set back (a reboot on a "
            "stale date?); they go %g h after this start at the latest",
            count,
            (newest_ms - now_ms) / 86_400_000,
            self.max_age_s / 3600,
        )
        self.audit.record(
            "store_clock_behind", segments=count, newest_end_ms=newest_ms, clock_ms=now_ms
        )

    def _say_expired(self, now_mono: float, *, flush: bool = False) -> None:
        """Audit the age expiry since the last entry: the first of a run at once, then
        at most every :data:`EXPIRED_AUDIT_EVERY_S` (routine expiry is a segment per
        write at most), all of it with ``flush``. The writer's."""
        done = self._expired
        said = self._expired_said
        if not done.count or (
            not flush and said is not None and now_mono - said < EXPIRED_AUDIT_EVERY_S
        ):
            return
        self._expired, self._expired_said = _Expired(), now_mono
        log.info(
            "age expiry: %d segment(s), %d bytes, ends %d..%d ms",
            done.count,
            done.bytes,
            done.oldest_end_ms,
            done.newest_end_ms,
        )
        self.audit.record(
            "segments_expired",
            count=done.count,
            bytes=done.bytes,
            oldest_end_ms=done.oldest_end_ms,
            newest_end_ms=done.newest_end_ms,
            max_age_s=self.max_age_s,
        )

    def _enforce(
        self, *, need_bytes: int, headroom: int | None = None, why: str = "disk full"
    ) -> None:
        """Delete what retention says, making room for ``need_bytes`` within the quota.
        Given ``headroom`` the disk is full (``why``: ENOSPC, or its free-space floor):
        it takes only ``headroom`` bytes more than the store holds, and room for
        ``need_bytes`` is made within that, pinned footage too once nothing else is left
        (loudly)."""
        now_s, now_mono = self.clock(), self.monotonic()
        with self._lock:
            ahead = self._ahead_of_clock(now_s)
            if self._n_scanned and self._ledger.accrues:
                wall_at_scan = self._wall_at_scan(now_s, now_mono)
                if abs(wall_at_scan - self._sorted_for) > RESORT_STEP_S:  # it stepped
                    self._sort_scanned(wall_at_scan)
            pins: dict[str, list[Pin]] = {}
            for pin in self.pins:
                pins.setdefault(pin.camera, []).append(pin)
            used = self._used
            quota = self.quota_bytes
            room = None if headroom is None else used + headroom
            # retention.plan deletes from the oldest end: it is given only the oldest
            # segments, as many as it can need (every expired one, and unpinned ones
            # at least as big as the excess), and the quota less what the rest holds.
            # Same decision as over everything; a store at its quota no longer sorts
            # all its segments (tens of thousands) for every segment it writes. With
            # room on the disk pinned ones cannot go: they are part of the rest (an
            # emergency's footage over the quota is walked, not handed over, each time).
            excess = used + need_bytes - (quota if room is None else min(quota, room))
            candidates: list[retention.Held] = []
            unpinned = 0
            # Ages do not rise along the order: the expired ones are a prefix of it.
            for seg in self._by_age:
                age_s = None  # not needed for pinned footage walked past (over the quota)
                if unpinned >= excess:
                    age_s = self._age(seg, now_s, now_mono)
                    if not age_s > self.max_age_s:
                        break
                pinned = any(p.protects(seg) for p in pins.get(seg.camera, ()))
                if pinned and room is None:
                    continue
                if age_s is None:
                    age_s = self._age(seg, now_s, now_mono)
                candidates.append(retention.Held(seg, age_s, seg.name.size, pinned))
                unpinned += 0 if pinned else seg.name.size
        self._clock_episode(ahead, now_s)
        rest = used - sum(h.size for h in candidates)
        decision = retention.plan(
            candidates,
            max_age_s=self.max_age_s,
            quota_bytes=quota - rest,
            need_bytes=need_bytes,
            room_bytes=None if room is None else room - rest,
        )
        pinned_lost = set(map(id, decision.pinned_lost))
        expired = set(map(id, decision.expired))
        for key in decision.all():
            assert isinstance(key, StoredSegment)
            gone = self._delete(
                key, pinned=id(key) in pinned_lost, expired=id(key) in expired, why=why
            )
            if gone and id(key) in expired:
                self._expired.add(key)
        self._say_expired(now_mono)
        if headroom is None and (decision.over_quota_bytes > 0) != self._over_quota:
            self._quota_episode(decision.over_quota_bytes, quota)

    def _quota_episode(self, over: int, quota: int) -> None:
        """Say once that unacknowledged emergency footage holds the store over its
        quota (the quota does not take it), and once that it is within it again."""
        self._over_quota = over > 0
        if self._over_quota:
            log.warning(
                "segment store over its quota of %d bytes by %d: unacknowledged emergency "
                "footage is kept until the receiver has it (only a full disk takes it)",
                quota,
                over,
            )
            self.audit.record("store_over_quota", quota_bytes=quota, over_bytes=over)
        else:
            log.info("segment store within its quota of %d bytes again", quota)
            self.audit.record("store_within_quota", quota_bytes=quota)

    def _delete(self, seg: StoredSegment, *, pinned: bool, expired: bool, why: str) -> bool:
        """Delete ``seg``'s file and take it out of the index; whether it is gone."""
        try:
            seg.path.unlink(missing_ok=True)
        except OSError as exc:  # one broken camera folder must not stop every camera's writes
            log.error("cannot delete segment %s: %s", seg.path, exc)
            return False
        with self._lock:
            self._unindex(seg)
        self.stats.evicted += 1
        if pinned:
            self.stats.pinned_evicted += 1
            log.critical("%s: evicted UNACKNOWLEDGED emergency footage %s", why, seg.path.name)
            self.audit.record(
                "segment_pinned_evicted",
                camera=seg.camera,
                first_seq=seg.first_seq,
                last_seq=seg.last_seq,
                reason=why,
            )
        elif not expired:
            log.info("quota: evicted %s/%s", seg.camera, seg.path.name)
        return True


def _backwards_name(filename: str) -> segment.SegmentName | None:
    """The name an older version gave a segment across a clock step back (its start
    after its end), with its two capture times in order; ``None`` if it is not one."""
    m = segment.NAME_RE.fullmatch(filename)
    if m is None:
        return None
    first, last, start, end, size = (int(g) for g in m.groups())
    if first > last or start <= end:
        return None
    return segment.SegmentName(first, last, end, start, size)


def _printable(name: str) -> str:
    """A file name as UTF-8 text: bytes that are not UTF-8 (``os.fsdecode`` makes them
    surrogates, which no UTF-8 encoder takes) as ``\\xNN`` escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _first_seq(seg: StoredSegment) -> int:
    return seg.name.first_seq


def _end_ms(seg: StoredSegment) -> int:
    return seg.name.end_ms


def _last_seq(seg: StoredSegment) -> int:
    return seg.name.last_seq


def _remove(
    segs: list[StoredSegment], seg: StoredSegment, key: Callable[[StoredSegment], Any]
) -> bool:
    """Remove ``seg`` from ``segs`` (sorted by ``key``); whether it was there."""
    k = key(seg)
    for i in range(bisect.bisect_left(segs, k, key=key), len(segs)):
        if segs[i] == seg:
            del segs[i]
            return True
        if key(segs[i]) != k:
            break
    return False


class _FileWriter:
    """A file descriptor as the writer age streams into: every write completes or raises.

    pyrage aborts the process on a short write and reports a writer's
    exception only as text, so this loops until everything is written, counts
    the bytes, and keeps the OSError for the caller (ENOSPC must stay ENOSPC).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes, /) -> int:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.error = exc
            raise
        self.size += len(data)
        return len(data)


def _seal_durably(
    folder: Path, tmp: Path, plain: bytes, recipients: list[pyrage.x25519.Recipient]
) -> int:
    """Seal ``plain`` into the file ``tmp`` and fsync it; returns the file's size."""
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        _fsync_dir(folder.parent)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        out = _FileWriter(fd)
        try:
            segment.seal_into(plain, recipients, out)
        except pyrage.EncryptError:
            if out.error is not None:
                raise out.error from None
            raise
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return out.size


def _free_bytes(folder: Path) -> int | None:
    """Bytes free for an unprivileged writer on ``folder``'s file system (None: unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
