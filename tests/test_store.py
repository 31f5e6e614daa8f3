"""The sealed segment store on real files: layout, recovery, retention, pins, faults."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pyrage
import pytest

from agent import segment
from agent import store as store_module
from agent.audit import AuditLog, verify_chain
from agent.segment import StreamDesc
from agent.store import MAX_SEALED_BYTES, RETAIN_EVERY_S, Pin, SegmentStore, StoredSegment
from hardware import EncodedPacket
from tests.media import PacketList, make_h264_packets

IDENTITY = pyrage.x25519.Identity.generate()
T0_NS = 1_767_000_000_000_000_000
FPS = 30
FRAME_NS = 1_000_000_000 // FPS
GOP = 20  # a keyframe every 0.67 s: with segment_s=1 a segment closes at the 2nd keyframe
SEGMENT_S = 1.0
PER_SEGMENT = 2 * GOP  # packets in every segment closed by push
STREAM = StreamDesc("h264", 160, 120, float(FPS), b"\x00\x00\x00\x01\x67")
WAIT_S = 10
DAY = 86_400


class Clock:
    """A clock the test sets: the store's wall clock (``clock``) or monotonic one."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def media() -> PacketList:
    """240 frames (8 s), 160x120, a keyframe every GOP frames."""
    return make_h264_packets(240, 160, 120, fps=FPS, gop=GOP)


class Feed:
    """One camera's packets, numbered and timed like capture does, cycling the media."""

    def __init__(self, media: PacketList, camera: str = "cam", offset_ns: int = 0) -> None:
        self.media = media
        self.camera = camera
        self.offset_ns = offset_ns
        self.seq = 0

    def take(self, n: int) -> list[EncodedPacket]:
        """The next ``n`` packets."""
        out = []
        for _ in range(n):
            payload, key = self.media[self.seq % len(self.media)]
            t = self.seq * FRAME_NS
            out.append(
                EncodedPacket(
                    self.camera, self.seq, T0_NS + self.offset_ns + t, t, key, "h264", payload, t
                )
            )
            self.seq += 1
        return out


class Sealed:
    """Segments reported by ``store.on_sealed``, and a bounded wait for more."""

    def __init__(self, store: SegmentStore) -> None:
        self.segments: list[StoredSegment] = []
        self._changed = asyncio.Event()
        self.unsubscribe = store.on_sealed(self._add)

    def _add(self, seg: StoredSegment) -> None:
        self.segments.append(seg)
        self._changed.set()

    async def wait(self, n: int) -> list[StoredSegment]:
        """Wait until ``n`` segments were sealed in all."""
        async with asyncio.timeout(WAIT_S):
            while len(self.segments) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.segments


@contextlib.asynccontextmanager
async def opened(directory: Path, audit: AuditLog, **kwargs: Any) -> AsyncIterator[SegmentStore]:
    """An open store (sealed to IDENTITY), closed on exit."""
    store = SegmentStore(
        directory,
        [IDENTITY.to_public()],
        audit=audit,
        boot_id="boot-1",
        segment_s=kwargs.pop("segment_s", SEGMENT_S),
        clock=kwargs.pop("clock", lambda: T0_NS / 1e9 + 60),  # the footage is a minute old
        **kwargs,
    )
    await asyncio.to_thread(store.open)
    try:
        yield store
    finally:
        async with asyncio.timeout(WAIT_S):
            await store.close()


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl", lambda: T0_NS / 1e9)
    yield log
    log.close()


def events(audit: AuditLog, name: str | None = None) -> list[dict[str, Any]]:
    """The trail's entries (of one event), after checking its chain."""
    lines = audit.path.read_bytes().splitlines()
    verify_chain(lines)
    entries = [json.loads(x) for x in lines]
    return [e for e in entries if name is None or e["event"] == name]


def push(store: SegmentStore, packets: list[EncodedPacket], stream: StreamDesc = STREAM) -> None:
    for pkt in packets:
        store.push(pkt, stream)


async def seal_first(store: SegmentStore, sealed: Sealed, feed: Feed) -> StoredSegment:
    """Push a segment and the keyframe that closes it; the segment, once it is on disk."""
    push(store, feed.take(PER_SEGMENT + 1))
    return (await sealed.wait(1))[0]


def open_segment(seg: StoredSegment) -> tuple[segment.SegmentHeader, list[EncodedPacket]]:
    return segment.decode(segment.unseal(SegmentStore.read(seg), [IDENTITY]))


def on_disk(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- layout ------------------------------------------------------------------------------


async def test_segments_are_gop_aligned_consecutive_and_gapless(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    feed = Feed(media)
    pushed = feed.take(len(media) - 5)
    async with opened(tmp_path / "store", audit) as store:
        sealed = Sealed(store)
        push(store, pushed)
        await sealed.wait(len(pushed) // PER_SEGMENT)
        assert store.open_first_seq("cam") == len(pushed) // PER_SEGMENT * PER_SEGMENT
    segs = store.segments("cam")
    assert sealed.segments == segs  # each reported once it was on disk, in order
    assert len(segs) == len(pushed) // PER_SEGMENT + 1  # close() sealed the open one

    got: list[EncodedPacket] = []
    for i, seg in enumerate(segs):
        header, packets = open_segment(seg)
        assert packets[0].keyframe, f"segment {i} does not start with a keyframe"
        assert (header.first_seq, header.last_seq, header.count) == (
            seg.first_seq,
            seg.last_seq,
            len(packets),
        )
        assert (header.camera, header.width, header.extradata) == ("cam", 160, STREAM.extradata)
        assert header.run == store.run_id  # this start of the store (an export tells restarts)
        assert seg.name.start_ms == packets[0].capture_ns // 1_000_000
        assert seg.name.end_ms == packets[-1].capture_ns // 1_000_000
        assert seg.path.stat().st_size == seg.name.size
        assert stat.S_IMODE(seg.path.stat().st_mode) == 0o600
        if i + 1 < len(segs):
            # Closed at the first keyframe at least segment_s after its start.
            nxt = pushed[seg.last_seq + 1]
            assert nxt.keyframe
            assert nxt.capture_ns - packets[0].capture_ns >= SEGMENT_S * 1e9
            assert not any(
                p.keyframe and p.capture_ns - packets[0].capture_ns >= SEGMENT_S * 1e9
                for p in packets[1:]
            )
        got.extend(packets)
    assert [(p.seq, p.capture_ns, p.keyframe, p.payload, p.source_ts_ns) for p in got] == [
        (p.seq, p.capture_ns, p.keyframe, p.payload, p.source_ts_ns) for p in pushed
    ]
    assert on_disk(tmp_path / "store" / "cam") == sorted(s.path.name for s in segs)
    assert store.stats.segments_written == len(segs)
    assert store.stats.media_bytes == sum(len(p.payload) for p in pushed)
    assert store.stats.bytes_written == sum(s.name.size for s in segs) == store.used_bytes()
    assert events(audit) == []


async def test_short_writes_still_write_the_whole_segment(
    tmp_path: Path, audit: AuditLog, media: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    # age streams into the file; pyrage aborts the process on a short write, so the
    # store must finish every write itself (as os.write may on a nearly full disk).
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:1000]))
    feed = Feed(media)
    async with opened(tmp_path / "store", audit) as store:
        first = await seal_first(store, Sealed(store), feed)
    _, packets = open_segment(first)
    assert [p.payload for p in packets] == [payload for payload, _ in media[:PER_SEGMENT]]
    assert first.path.stat().st_size == first.name.size
    assert store.stats.write_errors == 0


async def test_close_seals_the_open_segment(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    async with opened(tmp_path / "store", audit) as store:
        push(store, Feed(media).take(7))
        assert store.segments("cam") == []
        assert store.open_first_seq("cam") == 0
    (seg,) = store.segments("cam")
    assert (seg.first_seq, seg.last_seq) == (0, 6)
    assert [p.seq for p in open_segment(seg)[1]] == list(range(7))


async def test_a_new_stream_starts_a_new_segment(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    feed = Feed(media)
    bigger = StreamDesc("h264", 320, 240, float(FPS), b"\x00\x00\x00\x01\x67\x42")
    async with opened(tmp_path / "store", audit) as store:
        push(store, feed.take(GOP))
        push(store, feed.take(GOP), bigger)  # the camera came back at another size
    first, second = store.segments("cam")
    assert (first.first_seq, first.last_seq, second.first_seq) == (0, GOP - 1, GOP)
    assert open_segment(first)[0].width == 160
    assert open_segment(second)[0].width == 320


async def test_a_clock_step_back_starts_a_new_segment(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Capture times are the wall clock's (NTP steps it; a restarted RTSP source starts a
    new one): a segment whose packets went back in time was named with its start after
    its end, which the next start took for a foreign file, never retained nor deleted
    (found by a review). A packet stamped before the one it follows starts a segment."""
    packets = Feed(media).take(PER_SEGMENT)
    back = 2 * 10**9  # after packet 10, 2 s back: no keyframe due, one segment before
    stepped = packets[:10] + [
        dataclasses.replace(p, capture_ns=p.capture_ns - back) for p in packets[10:]
    ]
    async with opened(tmp_path / "store", audit) as store:
        push(store, stepped)
    segs = store.segments("cam")
    assert [(s.first_seq, s.last_seq) for s in segs] == [(0, 9), (10, PER_SEGMENT - 1)]
    assert all(s.name.start_ms <= s.name.end_ms for s in segs)
    assert [p.capture_ns for s in segs for p in open_segment(s)[1]] == [
        p.capture_ns for p in stepped
    ]
    async with opened(tmp_path / "store", audit) as again:
        assert again.segments("cam") == segs
    assert events(audit, "store_foreign_file") == []


async def test_queries(tmp_path: Path, audit: AuditLog, media: PacketList) -> None:
    async with opened(tmp_path / "store", audit) as store:
        push(store, Feed(media, "b").take(3 * PER_SEGMENT))
        push(store, Feed(media, "a").take(5))
    assert store.cameras() == ["a", "b"]
    segs = store.segments("b")
    assert store.find("b", 0) == segs[0]
    assert store.find("b", PER_SEGMENT - 1) == segs[0]
    assert store.find("b", PER_SEGMENT) == segs[1]
    assert store.find("b", 10**6) is None
    assert store.find("nobody", 0) is None


# -- start-up scan -----------------------------------------------------------------------


async def test_reopen_rebuilds_the_index_identically(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    async with opened(tmp_path / "store", audit) as store:
        push(store, Feed(media, "a").take(3 * PER_SEGMENT + 3))
        push(store, Feed(media, "b", offset_ns=FRAME_NS // 2).take(PER_SEGMENT + 1))
    before = {cam: store.segments(cam) for cam in store.cameras()}
    async with opened(tmp_path / "store", audit) as again:
        assert again.cameras() == ["a", "b"]
        assert {cam: again.segments(cam) for cam in again.cameras()} == before
        assert again.used_bytes() == store.used_bytes()
    assert again.stats.torn_removed == 0
    assert events(audit) == []


async def test_open_removes_torn_leftovers_and_leaves_foreign_files(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    root = tmp_path / "store"
    async with opened(root, audit) as store:
        push(store, Feed(media).take(2 * PER_SEGMENT + 1))
    whole, cut, last = store.segments("cam")
    with cut.path.open("r+b") as f:
        f.truncate(cut.name.size - 100)
    leftover = root / "cam" / f".{last.path.name}.tmp"
    leftover.write_bytes(b"half a segment")
    foreign_in_camera = root / "cam" / "notes.txt"
    foreign_in_camera.write_text("not footage")
    foreign_top = root / "README"
    foreign_top.write_text("not a camera")
    # Named as a segment, and as large as its name says, but larger than any the store
    # writes: sent, the uplink would refuse it and reconnect again and again (a review).
    huge = segment.SegmentName(900, 999, 1, 2, MAX_SEALED_BYTES + 1)
    with (root / "cam" / huge.filename).open("wb") as f:
        f.truncate(huge.size)  # sparse: no 12 MiB written

    async with opened(root, audit) as again:
        assert again.segments("cam") == [whole, last]
    assert again.stats.torn_removed == 2
    assert not cut.path.exists()
    assert not leftover.exists()
    assert foreign_in_camera.read_text() == "not footage"
    assert foreign_top.read_text() == "not a camera"
    torn = {e["file"]: e for e in events(audit, "segment_torn")}
    assert set(torn) == {cut.path.name, leftover.name}
    assert torn[cut.path.name]["camera"] == "cam"
    assert "expected" in torn[cut.path.name]["reason"]
    assert {e["file"] for e in events(audit, "store_foreign_file")} == {
        "README",
        "cam/notes.txt",
        f"cam/{huge.filename}",
    }


async def test_a_name_with_its_times_backwards_is_renamed_and_retained(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Older versions named a segment across a clock step back with its start after its
    end: the scan renames it with its times in order (audited) and retention deletes it
    in time, where it was left alone as foreign, forever (found by a review)."""
    root = tmp_path / "store"
    async with opened(root, audit) as store:
        push(store, Feed(media).take(2 * PER_SEGMENT))
    first, second = store.segments("cam")
    n = first.name
    backwards = dataclasses.replace(n, start_ms=n.end_ms, end_ms=n.start_ms).filename
    assert segment.SegmentName.parse(backwards) is None
    first.path.rename(root / "cam" / backwards)

    async with opened(root, audit) as again:
        assert again.segments("cam") == [first, second]
    assert on_disk(root / "cam") == sorted([first.path.name, second.path.name])
    (renamed,) = events(audit, "segment_renamed")
    assert (renamed["camera"], renamed["file"], renamed["to"]) == ("cam", backwards, n.filename)
    assert events(audit, "store_foreign_file") == []

    later = second.name.end_ms / 1000 + 61
    async with opened(root, audit, max_age_s=60, clock=lambda: later) as last:
        assert last.retain_soon(0.0)
    assert last.segments("cam") == []
    assert on_disk(root / "cam") == []


async def test_a_folder_the_scan_cannot_read_is_audited_and_the_store_opens(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """A folder in the store the agent cannot read (a root-only ``lost+found`` on a
    mounted card, a technician's copy) raised out of ``open()``: the agent never started
    and the panic button was dead (found by a review). It is audited and left alone.

    The tests run as root, which reads any folder: here opening it fails because its
    path is longer than the kernel opens (ENAMETOOLONG), a real OSError all the same."""
    deep = tmp_path
    while len(str(deep)) < 3680:
        deep /= "d" * 200
    root = deep / ("s" * (3900 - len(str(deep)) - 1))  # segments still fit under it
    feed = Feed(media)
    async with opened(root, audit) as store:
        push(store, feed.take(2 * PER_SEGMENT))
    before = store.segments("cam")
    unreadable = "x" * 255  # listed by the scan; its own path is 4156 characters
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir(unreadable, dir_fd=fd)
    finally:
        os.close(fd)
    (root / "notes.txt").write_text("the scan goes on past the folder")
    with pytest.raises(OSError, match="too long") as failed:
        os.scandir(root / unreadable)
    assert failed.value.errno == errno.ENAMETOOLONG

    async with opened(root, audit) as again:
        assert again.segments("cam") == before  # the other folders are indexed
        assert again.cameras() == ["cam"]
        push(again, feed.take(PER_SEGMENT))  # and it writes (close seals it)
    *old, new = again.segments("cam")
    assert old == before
    assert (new.first_seq, new.last_seq) == (2 * PER_SEGMENT, 3 * PER_SEGMENT - 1)
    (said,) = events(audit, "store_unreadable")
    assert said["file"] == unreadable
    assert said["error"] == "OSError: File name too long"
    assert [e["file"] for e in events(audit, "store_foreign_file")] == ["notes.txt"]


async def test_a_file_name_that_is_not_utf8_is_audited(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """A foreign or torn file whose name is not UTF-8 was never audited: its name (with
    surrogates, as Python decodes it) could not be written to the trail, and the entry
    was dropped (found by a review). Its bytes are in the entry as ``\\xNN`` escapes."""
    root = tmp_path / "store"
    async with opened(root, audit) as store:
        push(store, Feed(media).take(PER_SEGMENT))
    (seg,) = store.segments("cam")
    folder = os.fsencode(root / "cam")
    (root / "cam" / os.fsdecode(b"notes-\xff.txt")).write_text("not footage")
    (root / "cam" / os.fsdecode(b".caf\xe9.tmp")).write_bytes(b"half a segment")
    (root / os.fsdecode(b"copie-\xe9t\xe9")).write_text("not a camera")

    async with opened(root, audit) as again:
        assert again.segments("cam") == [seg]
    assert {e["file"] for e in events(audit, "store_foreign_file")} == {
        "cam/notes-\\xff.txt",
        "copie-\\xe9t\\xe9",
    }
    (torn,) = events(audit, "segment_torn")
    assert (torn["camera"], torn["file"]) == ("cam", ".caf\\xe9.tmp")
    assert sorted(os.listdir(folder)) == sorted([b"notes-\xff.txt", os.fsencode(seg.path.name)])

    # Any other string the trail cannot encode is escaped too, never dropped.
    audit.record("store_foreign_file", file=os.fsdecode(b"\xff"))
    assert events(audit)[-1]["file"] == "\\udcff"


# -- retention ---------------------------------------------------------------------------


async def test_retention_by_age(tmp_path: Path, audit: AuditLog, media: PacketList) -> None:
    """Footage this run wrote ages by the monotonic clock since its write: the wall
    clock stepping forward a day ages nothing out, nor does one set back keep it."""
    wall, mono = Clock(T0_NS / 1e9), Clock(1000.0)
    feed = Feed(media)
    async with opened(tmp_path / "store", audit, max_age_s=60, clock=wall, monotonic=mono) as store:
        sealed = Sealed(store)
        first = await seal_first(store, sealed, feed)  # written at 1000
        mono.t = 1010.0
        push(store, feed.take(PER_SEGMENT))
        second = (await sealed.wait(2))[1]
        wall.t += DAY  # NTP: a day forward
        mono.t = 1020.0
        push(store, feed.take(PER_SEGMENT))
        await sealed.wait(3)
        assert first.path.exists()  # a minute old at most, whatever the wall clock says
        mono.t = 1060.5  # the first is too old, the second is not
        push(store, feed.take(PER_SEGMENT))
        await sealed.wait(4)
        assert not first.path.exists()
        assert store.segments("cam") == sealed.segments[1:]
        wall.t -= 10 * DAY  # set back: the second looks ten days younger
        mono.t = 1070.5
        push(store, feed.take(PER_SEGMENT))
        await sealed.wait(5)
        assert not second.path.exists()
        assert store.segments("cam") == sealed.segments[2:]
    assert store.stats.evicted == 2
    assert events(audit, "segment_pinned_evicted") == []


async def test_retention_runs_with_no_segment_written(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Retention ran only as a segment was written: with every camera down, footage
    stayed on the card past its age (found by a review). The agent asks for a pass
    every few seconds (a minute apart at most); it runs on the writer thread, and not in
    open(), which runs before the agent pins the footage the receiver is owed."""
    root = tmp_path / "store"
    async with opened(root, audit) as store:
        push(store, Feed(media).take(3 * PER_SEGMENT))
    a, b, c = store.segments("cam")
    assert not store.retain_soon(0.0)  # closed: no writer
    now = c.name.end_ms / 1000 + 10 * 86_400  # ten days later, every camera down
    owed = Pin("cam", b.first_seq, b.last_seq)
    async with opened(root, audit, max_age_s=72 * 3600, clock=lambda: now) as again:
        assert again.segments("cam") == [a, b, c]
        again.add_pin(owed)
        assert again.retain_soon(1000.0)
        assert not again.retain_soon(1000.0 + RETAIN_EVERY_S - 1)
        assert again.retain_soon(1000.0 + RETAIN_EVERY_S)
    # close() let the writer finish what was queued
    assert again.segments("cam") == [b]
    assert on_disk(root / "cam") == [b.path.name]
    assert again.used_bytes() == b.name.size
    assert again.stats.evicted == 2
    assert events(audit, "segment_pinned_evicted") == []


async def test_quota_evicts_the_oldest_first_across_cameras(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    a, b = Feed(media, "a"), Feed(media, "b", offset_ns=500_000_000)
    async with opened(tmp_path / "store", audit) as store:
        sealed = Sealed(store)
        one = await seal_first(store, sealed, a)
        store.quota_bytes = int(3.5 * one.name.size)  # about three segments
        # Both cameras in capture order, so segments are written in order of end time.
        merged = sorted(
            itertools.chain(a.take(6 * PER_SEGMENT), b.take(7 * PER_SEGMENT)),
            key=lambda p: p.capture_ns,
        )
        push(store, merged)
        written = await sealed.wait(13)
        kept = [*store.segments("a"), *store.segments("b")]
        assert 2 <= len(kept) <= 4
        assert store.used_bytes() <= store.quota_bytes
        gone = [s for s in written if s not in kept]
        assert gone and all(not s.path.exists() for s in gone)
        assert all(s.path.exists() for s in kept)
        assert max(s.name.end_ms for s in gone) <= min(s.name.end_ms for s in kept)
        assert {s.camera for s in gone} == {"a", "b"}
        assert store.stats.evicted == len(gone)
    assert events(audit, "segment_pinned_evicted") == []


# -- clock steps: a Pi has no battery-backed clock --------------------------------------


async def test_a_clock_step_forward_ages_out_none_of_this_runs_footage(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """A Pi boots on a stale date (fake-hwclock) and records until NTP steps its clock
    forward, 90 days here: all it recorded before looked 90 days old and went at the
    next write, unaudited (found by a review). What this run wrote ages by the
    monotonic clock since it was written."""
    wall = Clock(T0_NS / 1e9 + 60)  # the stale date: the capture times are its
    feed = Feed(media)
    async with opened(tmp_path / "store", audit, clock=wall) as store:  # 72 h
        sealed = Sealed(store)
        push(store, feed.take(3 * PER_SEGMENT + 1))
        before = await sealed.wait(3)
        wall.t += 90 * DAY  # NTP synchronised
        feed.offset_ns = 90 * DAY * 10**9
        push(store, feed.take(PER_SEGMENT))
        await sealed.wait(4)
        assert store.retain_soon(0.0)
    assert store.segments("cam") == sealed.segments  # close() sealed the open one
    assert len(sealed.segments) == 5
    assert all(s.path.exists() for s in before)
    assert store.stats.evicted == 0
    assert events(audit, "segments_expired") == []


async def test_a_clock_set_back_does_not_make_the_quota_take_the_newest_footage(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """A reboot with no NTP sets the clock back to the stale date: the footage of the
    run before it (ten days on that clock) looked newer than this run's, and the quota
    took this run's first (found by a review). Footage from before this run goes
    first, oldest first; that it ends days after the clock is said once."""
    root = tmp_path / "store"
    feed = Feed(media, offset_ns=10 * DAY * 10**9)
    async with opened(root, audit, clock=Clock(T0_NS / 1e9 + 10 * DAY + 60)) as run1:
        push(run1, feed.take(3 * PER_SEGMENT))
    old = run1.segments("cam")
    assert len(old) == 3
    feed.offset_ns = 0  # rebooted: the clock is at the stale date again
    async with opened(root, audit) as run2:
        run2.quota_bytes = run1.used_bytes() * 3 // 2  # about four and a half segments
        sealed = Sealed(run2)
        push(run2, feed.take(3 * PER_SEGMENT))
    new = sealed.segments
    assert len(new) == 3
    assert all(s.name.end_ms < o.name.end_ms for s in new for o in old)
    kept = run2.segments("cam")
    assert kept[-3:] == new  # the newest footage stays
    assert kept[:-3] == old[len(old) - len(kept) + 3 :]  # the old run's oldest went
    assert not old[0].path.exists()
    assert run2.used_bytes() <= run2.quota_bytes
    (behind,) = events(audit, "store_clock_behind")
    assert (behind["segments"], behind["newest_end_ms"]) == (3, old[-1].name.end_ms)
    assert behind["clock_ms"] == (T0_NS // 10**9 + 60) * 1000


async def test_footage_from_before_a_clock_set_back_goes_at_most_max_age_after_the_start(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Aged by a clock set back ten days, the old run's footage would stay ten days
    past its age. It is at least as old as this run: it goes ``max_age_s`` after the
    start at the latest, never earlier (pinned footage not at all)."""
    root = tmp_path / "store"
    async with opened(root, audit, clock=Clock(T0_NS / 1e9 + 10 * DAY + 60)) as run1:
        push(run1, Feed(media, offset_ns=10 * DAY * 10**9).take(3 * PER_SEGMENT))
    a, b, c = run1.segments("cam")
    wall, mono = Clock(T0_NS / 1e9 + 60), Clock(5000.0)  # rebooted on the stale date
    feed = Feed(media, "other")
    async with opened(root, audit, max_age_s=3600, clock=wall, monotonic=mono) as run2:
        run2.add_pin(Pin("cam", b.first_seq, b.last_seq))  # owed to the receiver
        sealed = Sealed(run2)
        mono.t = 5000.0 + 3600  # an hour since the start: no more, yet
        wall.t += 3600
        first = await seal_first(run2, sealed, feed)
        assert run2.segments("cam") == [a, b, c]
        mono.t += 1
        wall.t += 1  # still ten days before the old footage's end
        push(run2, feed.take(PER_SEGMENT))
        await sealed.wait(2)
        assert run2.segments("cam") == [b]
        assert run2.segments("other") == [first, sealed.segments[1]]
    assert not a.path.exists() and not c.path.exists()
    assert run2.stats.pinned_evicted == 0
    (behind,) = events(audit, "store_clock_behind")  # once, not per pass
    assert (behind["segments"], behind["newest_end_ms"]) == (3, c.name.end_ms)
    (expired,) = events(audit, "segments_expired")
    assert (expired["count"], expired["bytes"]) == (2, a.name.size + c.name.size)
    assert (expired["oldest_end_ms"], expired["newest_end_ms"]) == (a.name.end_ms, c.name.end_ms)


async def test_age_expiry_is_audited_in_summary(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Age expiry deleted footage without a word in the trail, however much went at
    once (a clock stepped forward: days of it; found by a review). An entry says what
    went: the first expiry of a run at once, then at most one an hour, and at close."""
    root = tmp_path / "store"
    feed = Feed(media)
    async with opened(root, audit) as store:
        push(store, feed.take(3 * PER_SEGMENT))
    a, b, c = store.segments("cam")
    later = c.name.end_ms / 1000 + 4 * DAY
    async with opened(root, audit, clock=lambda: later) as again:
        assert again.retain_soon(0.0)
    assert again.segments("cam") == []
    (entry,) = events(audit, "segments_expired")
    assert (entry["count"], entry["bytes"]) == (3, a.name.size + b.name.size + c.name.size)
    assert (entry["oldest_end_ms"], entry["newest_end_ms"]) == (a.name.end_ms, c.name.end_ms)

    # Routine expiry: a segment per write, not an entry per segment.
    mono = Clock(0.0)
    async with opened(root, audit, max_age_s=100, clock=lambda: later, monotonic=mono) as last:
        sealed = Sealed(last)
        await seal_first(last, sealed, feed)
        for n, at in enumerate([10.0, 20.0, 100.5, 110.5, 120.5], start=2):
            mono.t = at
            push(last, feed.take(PER_SEGMENT))
            await sealed.wait(n)
        assert last.stats.evicted == 3
    assert [e["count"] for e in events(audit, "segments_expired")] == [3, 1, 2]


def test_pin_protects() -> None:
    name = segment.SegmentName(100, 199, 0, 1, 10)
    seg = StoredSegment("cam", name, Path("x"))
    assert Pin("cam", 150).protects(seg)
    assert Pin("cam", 0, 100).protects(seg)
    assert not Pin("other", 150).protects(seg)
    assert not Pin("cam", 200).protects(seg)
    assert not Pin("cam", 0, 99).protects(seg)
    assert Pin("cam", 0, acked=198).protects(seg)
    assert not Pin("cam", 0, acked=199).protects(seg)
    assert not Pin("cam", 0, 150, acked=150).protects(seg)
    assert Pin("cam", 0, acked=120, holds=((121, 180),)).protects(seg)
    assert not Pin("cam", 0, acked=120, holds=((121, 180), (181, 250))).protects(seg)
    assert not Pin("cam", 0, 160, acked=120, holds=((121, 170),)).protects(seg)
    assert Pin("cam", 0, acked=120, holds=((130, 250),)).protects(seg)  # 121..129 missing


async def test_pin_protects_until_acknowledged(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    feed = Feed(media)
    pin = Pin("cam", PER_SEGMENT, 2 * PER_SEGMENT - 1)  # the second segment, exactly
    async with opened(tmp_path / "store", audit) as store:
        store.pins.append(pin)
        sealed = Sealed(store)
        one = await seal_first(store, sealed, feed)
        store.quota_bytes = int(2.5 * one.name.size)
        push(store, feed.take(5 * PER_SEGMENT))
        written = await sealed.wait(6)
        pinned = written[1]
        assert store.segments("cam")[0] == pinned  # older than everything else, still there
        assert not written[0].path.exists() and not written[2].path.exists()

        pin.acked = PER_SEGMENT + 10
        pin.holds = ((PER_SEGMENT + 11, 2 * PER_SEGMENT - 2),)  # the last packet is missing
        push(store, feed.take(PER_SEGMENT))
        await sealed.wait(7)
        assert pinned.path.exists()

        pin.holds = ((PER_SEGMENT + 11, 2 * PER_SEGMENT + 5),)
        push(store, feed.take(PER_SEGMENT))
        await sealed.wait(8)
        assert not pinned.path.exists()
        assert pinned not in store.segments("cam")
    assert events(audit, "segment_pinned_evicted") == []
    assert store.stats.pinned_evicted == 0


async def test_the_quota_spares_pinned_footage_and_says_so_once(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """The quota took an unacknowledged emergency's footage with plenty of room on the
    disk (found by a review): only a full disk may. Over the quota because of it, the
    store says so once, and once again when it is back within it."""
    feed = Feed(media)
    pin = Pin("cam", 0)  # an emergency streaming since seq 0, nothing acked
    async with opened(tmp_path / "store", audit) as store:
        store.add_pin(pin)
        sealed = Sealed(store)
        one = await seal_first(store, sealed, feed)
        store.quota_bytes = int(2.5 * one.name.size)
        push(store, feed.take(4 * PER_SEGMENT))
        written = await sealed.wait(5)
        assert store.segments("cam") == written
        assert all(s.path.exists() for s in written)
        assert store.used_bytes() > store.quota_bytes

        pin.acked = written[-1].last_seq  # the receiver has it all: the quota applies
        push(store, feed.take(PER_SEGMENT))
        await sealed.wait(6)
        assert store.used_bytes() <= store.quota_bytes
        assert not written[0].path.exists()
    assert events(audit, "segment_pinned_evicted") == []
    assert store.stats.pinned_evicted == 0
    (over,) = events(audit, "store_over_quota")
    (within,) = events(audit, "store_within_quota")
    assert over["n"] < within["n"]
    assert over["quota_bytes"] == store.quota_bytes and over["over_bytes"] > 0


class FakeDisk:
    """A disk of ``capacity`` bytes holding the store alone: what ``_free_bytes`` says,
    and ENOSPC from a segment's write that does not fit."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capacity: int) -> None:
        self.capacity = capacity
        self.store: SegmentStore | None = None
        self.enospc = 0
        self.lowest_free = capacity
        seal = store_module._seal_durably

        def sealing(folder: Path, tmp: Path, plain: bytes, recipients: Any) -> int:
            size = seal(folder, tmp, plain, recipients)
            if size > self.free():
                tmp.unlink()
                self.enospc += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            self.lowest_free = min(self.lowest_free, self.free() - size)
            return size

        monkeypatch.setattr(store_module, "_seal_durably", sealing)
        monkeypatch.setattr(store_module, "_free_bytes", lambda _folder: self.free())

    def free(self) -> int:
        assert self.store is not None
        return self.capacity - self.store.used_bytes()


@pytest.mark.parametrize("floor", [False, True], ids=["enospc", "free_floor"])
async def test_a_full_disk_takes_pinned_footage_loudly_and_capture_continues(
    tmp_path: Path,
    audit: AuditLog,
    media: PacketList,
    monkeypatch: pytest.MonkeyPatch,
    floor: bool,
) -> None:
    """Only a full disk takes pinned footage: ENOSPC, or less free than the floor the
    audit trail and the state files need (there, the loss must still be written down),
    oldest first, as little as the new segment needs, each loudly."""
    feed = Feed(media)
    async with opened(tmp_path / "store", audit) as store:
        sealed = Sealed(store)
        one = await seal_first(store, sealed, feed)
    size = one.name.size
    min_free = 2 * size if floor else 0
    disk = FakeDisk(monkeypatch, int(6.5 * size))
    async with opened(tmp_path / "store", audit, min_free_bytes=min_free) as store:
        disk.store = store
        store.add_pin(Pin("cam", 0))  # nothing acked
        sealed = Sealed(store)
        push(store, feed.take(8 * PER_SEGMENT))
        written = await sealed.wait(8)
        kept = store.segments("cam")
        assert kept[-1] == written[-1]
        assert kept[0].first_seq > 0
        assert [s.first_seq for s in kept] == sorted(s.first_seq for s in kept)
        # As little as needed: one more segment would not have fitted.
        assert store.used_bytes() + 2 * size > disk.capacity - min_free
    assert store.stats.write_errors == 0
    assert events(audit, "segment_lost") == []
    lost = events(audit, "segment_pinned_evicted")
    assert lost and store.stats.pinned_evicted == len(lost)
    assert lost[0]["first_seq"] == 0
    assert {e["reason"] for e in lost} == {"free space floor" if floor else "disk full"}
    if floor:  # the floor held: no segment ever hit a full disk
        assert disk.enospc == 0
        assert disk.lowest_free >= min_free
    else:
        assert disk.enospc > 0


# -- faults ------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder`` (root only), unmounted on exit."""
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True, timeout=30)


async def test_full_disk_evicts_the_oldest_and_keeps_capturing(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    feed = Feed(media)
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        async with opened(disk / "store", audit) as store:
            sealed = Sealed(store)
            one = await seal_first(store, sealed, feed)
            fits = (1 << 20) // one.name.size
            total = fits + 6
            push(store, feed.take((total - 1) * PER_SEGMENT))
            written = await sealed.wait(total)  # every segment was written, none lost
            kept = store.segments("cam")
            assert store.stats.evicted > 0
            assert written[0] not in kept
            assert kept[-1] == written[-1]
            assert kept == written[len(written) - len(kept) :]  # the oldest went
            assert on_disk(disk / "store" / "cam") == sorted(s.path.name for s in kept)
        assert store.stats.write_errors == 0
        assert events(audit, "segment_lost") == []


async def test_unpinned_footage_goes_before_the_disk_is_short_of_its_free_floor(
    tmp_path: Path, audit: AuditLog, media: PacketList, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the quota, the store leaves ``min_free_bytes`` to the audit trail and the
    state files beside it: it evicts before the disk is full, never pinned footage."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    feed = Feed(media)
    floor = 1 << 20
    with small_filesystem(tmp_path / "disk", "2m") as disk:
        async with opened(disk / "store", audit, min_free_bytes=floor) as store:
            sealed = Sealed(store)
            one = await seal_first(store, sealed, feed)
            total = 2 * (2 << 20) // one.name.size  # twice what the whole disk holds
            push(store, feed.take((total - 1) * PER_SEGMENT))
            written = await sealed.wait(total)
            st = os.statvfs(disk)
            assert st.f_bavail * st.f_frsize >= floor - one.name.size
            assert store.stats.evicted > 0 and store.stats.pinned_evicted == 0
            assert store.segments("cam")[-1] == written[-1]
    assert not [r for r in caplog.records if "disk full" in r.getMessage()]


async def test_audit_trail_on_a_full_disk_keeps_its_chain(tmp_path: Path) -> None:
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    with small_filesystem(tmp_path / "disk", "64k") as disk:
        audit = AuditLog(disk / "audit.jsonl", lambda: T0_NS / 1e9)
        try:
            audit.record("agent_started")
            filler = disk / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                chunk = 4096
                while chunk:
                    try:
                        os.write(fd, b"\0" * chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        chunk //= 2
            finally:
                os.close(fd)
            for i in range(40):  # fills the trail's last page, then fails
                audit.record("segment_lost", camera="cam", first_seq=i, reason="disk full")
            filler.unlink()
            for i in range(3):
                audit.record("disk_ok", n_try=i)
        finally:
            audit.close()
        lines = (disk / "audit.jsonl").read_bytes().splitlines()
    whole = [x for x in lines if x.endswith(b"}")]
    assert len(lines) - len(whole) <= 1  # at most one fragment of a short write
    entries, _ = verify_chain(whole)
    # None lost: those the full disk refused were held, then written first, in order.
    assert entries == len(whole) == 44
    events = [json.loads(x) for x in whole]
    assert [e.get("first_seq") for e in events[1:41]] == list(range(40))
    assert any("happened_at" in e for e in events[1:41])
    assert [e["event"] for e in events[-3:]] == ["disk_ok"] * 3


async def test_writer_survives_a_failing_write(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    root = tmp_path / "store"
    a, b = Feed(media, "a"), Feed(media, "b")
    async with opened(root, audit) as store:
        sealed = Sealed(store)
        await seal_first(store, sealed, a)
        (root / "a").rename(tmp_path / "a-moved")
        (root / "a").write_text("the camera folder is now a file")
        push(store, a.take(PER_SEGMENT))  # this segment cannot be written
        push(store, b.take(PER_SEGMENT + 1))  # ... and then another camera's can
        await sealed.wait(2)
        assert sealed.segments[-1].camera == "b"
        (root / "a").unlink()
        (tmp_path / "a-moved").rename(root / "a")
        push(store, a.take(PER_SEGMENT))
        await sealed.wait(3)
        assert sealed.segments[-1].camera == "a"
    assert store.stats.write_errors == 1
    (lost,) = events(audit, "segment_lost")
    assert (lost["camera"], lost["first_seq"], lost["last_seq"]) == (
        "a",
        PER_SEGMENT,
        2 * PER_SEGMENT - 1,
    )
    assert "NotADirectoryError" in lost["reason"]
    assert [s.first_seq for s in store.segments("a")] == [0, 2 * PER_SEGMENT, 3 * PER_SEGMENT]


async def test_a_segment_that_cannot_be_deleted_does_not_stop_other_cameras(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    root = tmp_path / "store"
    mono = Clock(0.0)
    a, b = Feed(media, "a"), Feed(media, "b", offset_ns=120 * 10**9)
    async with opened(root, audit, max_age_s=100, monotonic=mono) as store:
        sealed = Sealed(store)
        old = await seal_first(store, sealed, a)
        (root / "a").rename(tmp_path / "a-moved")
        (root / "a").write_text("the camera folder is now a file")
        mono.t += 101  # camera a's segment expired, and cannot be deleted
        push(store, b.take(PER_SEGMENT + 1))
        await sealed.wait(2)
        assert sealed.segments[-1].camera == "b"
        assert store.segments("a") == [old]
        (root / "a").unlink()
        (tmp_path / "a-moved").rename(root / "a")
        push(store, b.take(PER_SEGMENT))
        await sealed.wait(3)
        assert store.segments("a") == []
        assert not old.path.exists()
    assert store.stats.write_errors == 0
    assert events(audit, "segment_lost") == []


async def test_a_long_run_without_a_keyframe_is_split_into_segments_a_reader_opens(
    tmp_path: Path, audit: AuditLog
) -> None:
    """Split at the size bound, counting each packet's record too: 3,147 packets of 4 kB
    made a segment over the bound every reader enforces (the receiver's backfill and the
    district's export refused it; found by a review)."""
    from receiver.sealed import open_segment as receiver_opens

    count = segment.MAX_SEGMENT_BYTES // 4000 + 2
    async with opened(tmp_path / "store", audit, segment_s=4.0) as store:
        for seq in range(count):
            t = seq * FRAME_NS
            store.push(
                EncodedPacket("cam", seq, T0_NS + t, t, seq == 0, "h264", bytes(4000)), STREAM
            )
    segs = store.segments("cam")
    assert len(segs) == 2
    assert (segs[0].first_seq, segs[-1].last_seq) == (0, count - 1)
    for seg in segs:
        _, packets = await asyncio.to_thread(receiver_opens, SegmentStore.read(seg), [IDENTITY])
        assert len(packets) == seg.last_seq - seg.first_seq + 1


async def test_a_camera_gone_silent_has_its_last_seconds_sealed(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Only the next packet (or a close) sealed an open segment: a camera cut by an
    intruder kept its last seconds in RAM only, lost to a power cut (found by a
    review). The agent's housekeeping seals what no packet joined for a while."""
    feed = Feed(media)
    async with opened(tmp_path / "store", audit) as store:
        sealed = Sealed(store)
        push(store, feed.take(PER_SEGMENT + 10))  # one segment sealed, 10 packets open
        await sealed.wait(1)
        now = time.monotonic_ns()
        assert store.seal_idle(now, 2.0) == []  # it just sent them
        assert store.seal_idle(now + 3 * 10**9, 2.0) == ["cam"]
        await sealed.wait(2)
        assert store.open_first_seq("cam") is None
        assert [(s.first_seq, s.last_seq) for s in store.segments("cam")] == [
            (0, PER_SEGMENT - 1),
            (PER_SEGMENT, PER_SEGMENT + 9),
        ]


async def test_a_segment_whose_folder_fsync_failed_is_kept(
    tmp_path: Path, audit: AuditLog, media: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is whole under its name once renamed: a failed fsync of its folder left
    it on disk, out of the index and the quota, audited as lost (found by a review)."""
    fsync_dir, calls = store_module._fsync_dir, []

    def failing_once(folder: Path) -> None:
        if folder.name == "cam":  # the camera's folder, after a segment's rename
            calls.append(folder)
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error")
        fsync_dir(folder)

    monkeypatch.setattr(store_module, "_fsync_dir", failing_once)
    feed = Feed(media)
    async with opened(tmp_path / "store", audit) as store:
        sealed = Sealed(store)
        push(store, feed.take(PER_SEGMENT + 1))
        (seg,) = await sealed.wait(1)
        assert store.find("cam", 0) == seg
        assert store.used_bytes() == seg.path.stat().st_size
    assert not events(audit, "segment_lost")


async def test_the_writer_backlog_drains_to_zero(
    tmp_path: Path, audit: AuditLog, media: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment counts its packets' records in the writer's backlog, and the writer gave
    back only their payloads: 29 bytes a packet stayed behind, and after hours (2.7 h at
    8 cameras) the backlog looked full and every segment was dropped, an emergency's too
    (found by a review). Here the backlog has room for one segment at a time."""
    feed = Feed(media)
    chunks = [feed.take(PER_SEGMENT) for _ in range(len(media) // PER_SEGMENT)]
    biggest = max(sum(len(p.payload) + segment.RECORD.size for p in c) for c in chunks)
    monkeypatch.setattr(store_module, "MAX_PENDING_BYTES", biggest)
    async with opened(tmp_path / "store", audit) as store:
        sealed = Sealed(store)
        for n, chunk in enumerate(chunks):
            push(store, chunk)  # its first packet, a keyframe, seals the segment before
            await sealed.wait(n)  # written: nothing is queued
            assert store._pending_bytes == 0
            assert store.open_first_seq("cam") == chunk[0].seq
    assert store._pending_bytes == 0
    assert store.stats.dropped == 0
    assert store.stats.segments_written == len(chunks)
    assert events(audit, "segment_dropped") == []
