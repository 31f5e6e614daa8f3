"""Recording store: remux to fMP4, durability, sequence rules, resume, H.264 helpers.

All media is real libx264 output (tests/media.py); files are checked with the
system ffprobe.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import mmap
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver import evidence, seqranges
from receiver import run as run_module
from receiver.errors import (
    CorruptRecordingError,
    InvalidIdError,
    InvalidPacketError,
    MissingSpsError,
    RecordingClosedError,
    RecordingFailedError,
    SessionConflictError,
    TrackMismatchError,
    UnsupportedCodecError,
)
from receiver.fmp4 import avcc_from_moov, scan_file
from receiver.h264 import mse_codec_string, parameter_sets, split_nal_units
from receiver.parts import PartWriter
from receiver.recording import CameraRecording, Outcome, RecordingStore, SessionRecording, TrackInfo
from tests.media import META, PacketList, ffprobe_packets, ffprobe_stream, make_h264_packets

T0_US = 1_767_000_000_000_000  # some capture time in UTC µs
FRAME_US = 33_333


def make_track(
    packets: PacketList, camera: str = "cam1", first_seq: int = 0, live_seq: int | None = None
) -> TrackInfo:
    extradata = parameter_sets(packets[0][0]).annex_b()
    return TrackInfo(camera, "interior", "h264", 320, 240, 30.0, extradata, first_seq, live_seq)


class Collector:
    """A FragmentListener that keeps everything it is given."""

    def __init__(self) -> None:
        self.inits: list[bytes] = []
        self.fragments: list[tuple[bytes, bool, int]] = []
        self.ended = False

    def init_segment(self, data: bytes) -> None:
        self.inits.append(data)

    def media_fragment(self, data: bytes, keyframe: bool, capture_us: int) -> None:
        self.fragments.append((data, keyframe, capture_us))

    def end_of_stream(self) -> None:
        self.ended = True


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RecordingStore]:
    async with RecordingStore(tmp_path / "rec") as s:
        yield s


async def open_cam(
    store: RecordingStore, packets: PacketList, first_seq: int = 0, session: str = "s-1"
) -> tuple[SessionRecording, CameraRecording]:
    rec = await store.open_session(session, "dev-1", META, [make_track(packets, "cam1", first_seq)])
    return rec, rec.camera("cam1")


def feed_nowait(
    cam: CameraRecording, packets: PacketList, seqs: range, first_seq: int = 0, preroll: int = 30
) -> None:
    """Live packets into runs that are open already (no new part file needed)."""
    for seq in seqs:
        i = seq - first_seq
        payload, key = packets[i]
        done = cam.append_nowait(
            seq, T0_US + i * FRAME_US, key, payload, preroll=i < preroll, live=True
        )
        assert done is not None, f"seq {seq} needs a new part file"


async def feed(
    cam: CameraRecording,
    packets: PacketList,
    seqs: range,
    first_seq: int = 0,
    preroll: int = 30,
    live: bool = True,
) -> list[Outcome]:
    out = []
    for seq in seqs:
        i = seq - first_seq
        payload, key = packets[i]
        out.append(
            await cam.append(
                seq, T0_US + i * FRAME_US, key, payload, preroll=i < preroll, live=live
            )
        )
    return out


async def probe(path: Path) -> dict[str, Any]:
    return await asyncio.to_thread(ffprobe_stream, path)


def last_seq(cam: CameraRecording) -> int:
    return max(run.last_seq for run in cam.runs)


async def test_round_trip_durability_and_ffprobe(
    store: RecordingStore, packets: PacketList
) -> None:
    rec, cam = await open_cam(store, packets, first_seq=1000)
    seen = Collector()
    cam.add_listener(seen)
    assert cam.durable_seq == 999
    for n in range(1, 91):
        feed_nowait(cam, packets, range(999 + n, 1000 + n), first_seq=1000)
        # FFmpeg's one-frame delay is observed, not assumed: durable follows
        # the complete fragments the writer saw.
        assert await cam.flush() == 1000 + len(seen.fragments) - 1
        assert cam.durable_seq <= last_seq(cam)
    assert last_seq(cam) == 1089
    assert len(seen.fragments) == 89
    assert cam.durable_seq == 1088
    assert cam.ack_state(64) == (1088, ())
    assert (cam.frames_durable, cam.preroll_frames) == (89, 30)
    assert cam.first_durable_mono_ns is not None
    assert cam.first_live_durable_mono_ns is not None
    assert cam.first_live_durable_mono_ns >= cam.first_durable_mono_ns
    assert [k for _, k, _ in seen.fragments[:31]] == [True] + [False] * 29 + [True]
    assert [c for _, _, c in seen.fragments[:3]] == [T0_US + i * FRAME_US for i in range(3)]
    assert len(seen.inits) == 1
    assert seen.inits[0][4:8] == b"ftyp"

    await rec.close("all clear")
    assert cam.durable_seq == last_seq(cam) == 1089
    assert cam.frames_durable == 90
    assert seen.ended
    mp4 = rec.directory / "cam1.1000.mp4"
    info = await probe(mp4)
    assert info["codec_name"] == "h264"
    assert (info["width"], info["height"]) == (320, 240)
    assert int(info["nb_read_frames"]) == 90
    pkts = await asyncio.to_thread(ffprobe_packets, mp4)
    assert [p["flags"].startswith("K") for p in pkts] == [k for _, k in packets]
    assert int(pkts[1]["pts"]) == 3000  # 33 333 µs in 90 kHz ticks, rounded

    doc = json.loads((rec.directory / "session.json").read_text())
    assert doc["v"] == 2
    assert doc["close_reason"] == "all clear"
    (camera,) = doc["cameras"]
    assert camera["runs"] == [
        {"parts": [{"file": "cam1.1000.mp4", "first_seq": 1000, "first_capture_us": T0_US}]}
    ]
    assert (camera["gaps"], camera["bad_segments"], camera["first_live_seq"]) == ([], [], 1030)
    summary = store.sessions()[0]
    assert not summary.is_open
    cam_summary = summary.camera("cam1")
    assert cam_summary.mse_codec == mse_codec_string(packets[0][0])
    assert (cam_summary.complete, cam_summary.missing, cam_summary.live_frames) == (True, (), 60)
    with pytest.raises(RecordingClosedError):
        await cam.append(1090, T0_US + 90 * FRAME_US, False, packets[1][0])


async def test_duplicates_ignored_and_a_stray_non_keyframe_dropped(
    store: RecordingStore, packets: PacketList
) -> None:
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets, range(10))
    assert await feed(cam, packets, range(3, 10)) == [Outcome.DUPLICATE] * 7  # a resend
    # A P-frame that continues no run cannot start one: dropped (the agent resends
    # from a keyframe-aligned segment).
    assert await feed(cam, packets, range(11, 12)) == [Outcome.DROPPED]
    assert (cam.duplicates, cam.dropped, len(cam.runs)) == (7, 1, 1)
    await feed(cam, packets, range(10, 12))  # the run is still usable
    with pytest.raises(InvalidPacketError):
        await cam.append(12, T0_US, False, b"")
    await rec.close("done")
    assert int((await probe(rec.directory / "cam1.0.mp4"))["nb_read_frames"]) == 12


async def test_a_run_starts_at_a_keyframe_only(store: RecordingStore, packets: PacketList) -> None:
    _, cam = await open_cam(store, packets, first_seq=5)
    assert await cam.append(5, T0_US, False, packets[1][0]) is Outcome.DROPPED
    assert await cam.append(4, T0_US, True, packets[0][0]) is Outcome.DROPPED  # before the session
    assert cam.frames_durable == 0
    assert await cam.append(5, T0_US, True, packets[0][0]) is Outcome.APPENDED
    assert last_seq(cam) == 5


async def test_live_skips_ahead_and_backfill_closes_the_hole(
    store: RecordingStore, packets: PacketList
) -> None:
    """Live jumps to the next keyframe; the skipped seqs arrive later and fill the hole."""
    rec = await store.open_session("s-1", "dev-1", META, [make_track(packets, live_seq=30)])
    cam = rec.camera("cam1")
    seen = Collector()
    cam.add_listener(seen)
    await feed(cam, packets, range(30, 40))  # live from the press's GOP
    await feed(cam, packets, range(60, 90))  # the link was slow: live skipped 40..59
    await cam.flush()
    assert len(seen.inits) == 2  # the live feed follows the newest live run
    assert cam.ack_state(64) == (-1, ((30, 38), (60, 88)))  # nothing from seq 0 on yet
    assert await feed(cam, packets, range(40, 60), live=False) == [Outcome.APPENDED] * 20
    await cam.flush()  # the run reached the next one: it was finished, 59 is durable
    assert cam.ack_state(64) == (-1, ((30, 88),))
    await feed(cam, packets, range(0, 30), live=False)  # the older pre-roll, last
    await cam.flush()
    assert cam.ack_state(64) == (88, ())
    await rec.close("all clear")
    assert cam.ack_state(64) == (89, ())
    summary = rec.summary().camera("cam1")
    assert [(r.first_seq, r.last_seq) for r in summary.runs] == [(0, 29), (30, 59), (60, 89)]
    assert summary.complete
    assert (summary.preroll_frames, summary.live_frames) == (30, 60)
    counts = [int((await probe(part.path))["nb_read_frames"]) for part in summary.parts]
    assert counts == [30, 30, 30]  # every part decodes on its own, seqs in order


async def test_a_keyframe_in_a_hole_starts_a_run_that_ends_at_the_next_run(
    store: RecordingStore, packets: PacketList
) -> None:
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets, range(10))
    await feed(cam, packets, range(60, 70))
    assert await feed(cam, packets, range(30, 65), live=False) == (
        [Outcome.APPENDED] * 30 + [Outcome.DUPLICATE] * 5
    )
    await cam.flush()
    assert [(r.first_seq, r.last_seq, r.writable) for r in cam.runs] == [
        (0, 9, True),
        (30, 59, False),  # complete: finished
        (60, 69, True),
    ]
    acked, holds = cam.ack_state(64)
    assert (acked, holds) == (8, ((30, 68),))
    assert rec.summary().camera("cam1").missing == ((9, 29),)  # 9 waits for its fragment


async def test_declared_gap_moves_the_ack_and_finishes_the_run(
    store: RecordingStore, packets: PacketList
) -> None:
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets, range(20))
    await feed(cam, packets, range(30, 50))
    await cam.flush()
    assert cam.ack_state(64) == (18, ((30, 48),))
    await cam.declare_gap(20, 29, "evicted")
    await cam.declare_gap(20, 29, "evicted")  # said again after a reconnect: one record
    doc = json.loads((rec.directory / "session.json").read_text())
    assert doc["cameras"][0]["gaps"] == [{"first": 20, "last": 29, "reason": "evicted"}]
    await cam.flush()  # the run before the gap was finished: its last frame is durable
    assert cam.ack_state(64) == (48, ())
    summary = rec.summary().camera("cam1")
    assert (summary.complete, summary.missing_frames, len(summary.gaps)) == (True, 0, 1)


async def test_a_declared_gap_spares_what_was_recorded(
    store: RecordingStore, packets: PacketList
) -> None:
    """A device may declare lost what it never saw acknowledged (it judged from acks
    that had not come yet): the seqs recorded before the declaration stay footage, and
    only the rest is a gap. A range all recorded is no gap at all."""
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets, range(20))
    await feed(cam, packets, range(30, 50))
    await cam.declare_gap(10, 39, "lost")
    await cam.declare_gap(0, 9, "lost")
    doc = json.loads((rec.directory / "session.json").read_text())
    assert doc["cameras"][0]["gaps"] == [{"first": 20, "last": 29, "reason": "lost"}]
    await cam.flush()
    assert cam.ack_state(64) == (48, ())
    summary = rec.summary().camera("cam1")
    assert (summary.complete, summary.missing_frames, len(summary.gaps)) == (True, 0, 1)


def test_seq_ranges_match_a_set_model() -> None:
    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=8),
        st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=4),
        st.integers(0, 20),
    )
    def check(held_in: list[tuple[int, int]], gaps_in: list[tuple[int, int]], first: int) -> None:
        held = [(a, a + n) for a, n in held_in]
        gaps = [(a, a + n) for a, n in gaps_in]
        covered = {s for a, b in held + gaps for s in range(a, b + 1)}
        held_set = {s for a, b in held for s in range(a, b + 1)}
        acked = seqranges.cumulative(first, held + gaps)
        assert all(s in covered for s in range(first, acked + 1))
        assert acked + 1 not in covered
        holds = seqranges.holds_after(acked, held, 64)
        assert {s for a, b in holds for s in range(a, b + 1)} == {s for s in held_set if s > acked}
        assert all(a > acked + 1 for a, _ in holds)
        assert all(b + 1 < a for (_, b), (a, _) in itertools.pairwise(holds))
        top = max(held_set, default=first - 1)
        missing = {
            s for a, b in seqranges.missing(first, top, held + gaps) for s in range(a, b + 1)
        }
        assert missing == set(range(first, top + 1)) - covered

    check()
    assert seqranges.holds_after(0, [(2 * i, 2 * i) for i in range(1, 100)], 64)[-1] == (128, 128)


@pytest.mark.parametrize(
    "session_id",
    ["", "../etc", "a/b", ".hidden", "-x", "ok\n", "x" * 65, "a\\b", "ünicode", "a b"],
)
async def test_bad_session_ids_rejected(
    store: RecordingStore, packets: PacketList, session_id: str
) -> None:
    with pytest.raises(InvalidIdError) as info:
        await store.open_session(session_id, "dev-1", META, [make_track(packets)])
    assert isinstance(info.value, ValueError)
    assert not any(store.root.iterdir())


@pytest.mark.parametrize("camera_id", ["", "Cam1", "../c", "c.1", "c/d", "c\n", "_c", "c" * 33])
async def test_bad_camera_ids_rejected(
    store: RecordingStore, packets: PacketList, camera_id: str
) -> None:
    with pytest.raises(InvalidIdError):
        await store.open_session("s-1", "dev-1", META, [make_track(packets, camera_id)])
    assert not any(store.root.iterdir())


async def test_open_is_idempotent_and_checked(store: RecordingStore, packets: PacketList) -> None:
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets, range(5))
    again = await store.open_session("s-1", "dev-1", META, [make_track(packets)])
    assert again is rec
    assert again.camera("cam1") is cam
    assert last_seq(cam) == 4  # nothing reset
    assert store.get("s-1") is rec
    assert store.open_sessions() == [rec]
    with pytest.raises(SessionConflictError):
        await store.open_session("s-1", "dev-2", META, [make_track(packets)])
    exterior = TrackInfo("cam1", "exterior", "h264", 320, 240, 30.0, b"", 0)
    with pytest.raises(TrackMismatchError):
        await store.open_session("s-1", "dev-1", META, [exterior])
    # A camera set to another size while its agent restarted resumes the session.
    resized = TrackInfo("cam1", "interior", "h264", 640, 360, 30.0, b"", 0)
    assert await store.open_session("s-1", "dev-1", META, [resized]) is rec
    mjpeg = TrackInfo("cam2", "exterior", "mjpeg", 320, 240, 30.0, b"", 0)
    with pytest.raises(UnsupportedCodecError):
        await store.open_session("s-2", "dev-1", META, [mjpeg])


async def test_a_later_first_seq_is_a_declared_gap_in_a_new_part(
    store: RecordingStore, packets: PacketList
) -> None:
    """An older agent resumes the session with numbers above what it lost."""
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets, range(20))
    await store.open_session("s-2", "dev-1", META, [make_track(packets, first_seq=50)])
    with pytest.raises(TrackMismatchError):  # going back is never a resume
        await store.open_session("s-2", "dev-1", META, [make_track(packets, first_seq=10)])
    again = await store.open_session("s-1", "dev-1", META, [make_track(packets, first_seq=130)])
    assert again is rec
    await cam.flush()
    assert cam.frames_durable == 20  # the first run was finished and fsynced
    assert cam.durable_seq == 129  # seqs declared lost are settled: nothing will ever fill them
    assert cam.gaps[0].to_json() == {"first": 20, "last": 129, "reason": "lost"}
    for i, seq in enumerate(range(130, 160)):  # packets 30..59 start at a keyframe
        payload, key = packets[30 + i]
        await cam.append(seq, T0_US + (30 + i) * FRAME_US, key, payload, preroll=False, live=True)
    await rec.close("done")
    assert [p.first_seq for p in rec.summary().camera("cam1").parts] == [0, 130]
    assert cam.durable_seq == 159
    assert cam.frames_durable == 50
    parts = rec.summary().camera("cam1").parts
    frames = [int(ffprobe_stream(p.path)["nb_read_frames"]) for p in parts]
    assert frames == [20, 30]


async def test_group_commit_coalesces_fsyncs(
    store: RecordingStore, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cam = await open_cam(store, packets)
    await cam.flush()  # session.json is saved with the first flush; keep it out of the count
    entered = threading.Event()
    release = threading.Event()
    data_syncs: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith("cam1.0.mp4"):
            data_syncs.append(path)
            entered.set()
            assert release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    feed_nowait(cam, packets, range(10))
    first = asyncio.create_task(cam.flush())
    assert await asyncio.to_thread(entered.wait, 30)
    feed_nowait(cam, packets, range(10, 20))  # arrives while the fsync is in flight
    later = [asyncio.create_task(cam.flush()) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    # The thread goes on with the next round at once (the first took longer than the
    # commit gap): the first caller may already see it.
    assert await first in (8, 18)
    assert await asyncio.gather(*later) == [18] * 5
    assert len(data_syncs) == 2  # one in flight + one covering all later callers


class BlockedFsync:
    """``os.fsync`` of the camera's part file, the first call held until :meth:`release`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, part: str = "cam1.0.mp4") -> None:
        self.part = part
        self.calls = 0
        self.entered = threading.Event()
        self._release = threading.Event()
        self._real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(self.part):
            self.calls += 1
            if self.calls == 1:
                self.entered.set()
                assert self._release.wait(30)
        self._real(fd)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)

    def release(self) -> None:
        self._release.set()


async def test_the_fsync_thread_goes_on_while_fragments_wait(
    store: RecordingStore, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fragments made while a round's fsync runs are written and fsynced by the same
    # thread right after it (one hand-off to the thread for both rounds).
    _, cam = await open_cam(store, packets)
    await cam.flush()
    handoffs: list[int] = []
    real_rounds = run_module.Run._sync_rounds

    def rounds(self: run_module.Run, *args: Any) -> None:
        handoffs.append(1)
        real_rounds(self, *args)

    blocked = BlockedFsync(monkeypatch)
    monkeypatch.setattr(run_module.Run, "_sync_rounds", rounds)
    monkeypatch.setattr(run_module, "COMMIT_GAP_S", 0.0)
    monkeypatch.setattr(run_module, "ROUNDS_FOR_S", 60.0)
    feed_nowait(cam, packets, range(10))
    first = asyncio.create_task(cam.flush())
    await blocked.wait_entered()
    feed_nowait(cam, packets, range(10, 20))  # waits while the first round's fsync runs
    blocked.release()
    assert await first in (8, 18)
    assert await cam.flush() == 18
    assert (blocked.calls, len(handoffs)) == (2, 1)


async def test_a_cancelled_fsync_task_ends_its_waiters(
    store: RecordingStore, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cam = await open_cam(store, packets)
    await cam.flush()
    blocked = BlockedFsync(monkeypatch)
    feed_nowait(cam, packets, range(10))
    waiter = asyncio.create_task(cam.flush())
    await blocked.wait_entered()
    task = cam.runs[0]._fsync_task
    assert task is not None
    task.cancel()  # the receiver stopping
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert cam.runs[0]._fsync_task is None  # the waiter did not start another
    blocked.release()


async def test_unwritten_fragments_are_bounded_until_a_flush_writes_them(
    store: RecordingStore, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop makes fragments; the fsync's thread writes them. Past the bound the camera
    # says so (its connection is then not read until a flush wrote them).
    monkeypatch.setattr(run_module, "MAX_UNWRITTEN_BYTES", 20_000)
    _, cam = await open_cam(store, packets)
    await cam.flush()
    size = 0
    seq = 0
    while not cam.backlogged:
        feed_nowait(cam, packets, range(seq, seq + 1))
        size += len(packets[seq][0])
        seq += 1
        assert seq < len(packets), "never backlogged"
    assert size > 20_000
    await cam.flush()
    assert not cam.backlogged
    assert cam.durable_seq == seq - 2  # the last frame waits for its successor


async def test_resume_after_clean_restart(tmp_path: Path, packets: PacketList) -> None:
    root = tmp_path / "rec"
    async with RecordingStore(root) as store1:
        _, cam = await open_cam(store1, packets)
        await feed(cam, packets, range(45))
        await cam.flush()
    # The receiver stopped (aclose finished the part); the session stays open.
    async with RecordingStore(root) as store2:
        summary = store2.sessions()[0]
        assert summary.is_open
        assert summary.camera("cam1").frames_durable == 45
        assert not summary.camera("cam1").recording
        assert store2.live_feed("s-1", "cam1") is None
        rec, cam = await open_cam(store2, packets)
        assert rec.durable_by_camera() == {"cam1": 44}
        assert store2.live_feed("s-1", "cam1") is cam.live
        await feed(cam, packets, range(40, 90))  # the agent resends from its last ack
        assert cam.duplicates == 5
        await rec.close("all clear")
        parts = [p.path for p in store2.sessions()[0].camera("cam1").parts]
        assert [p.name for p in parts] == ["cam1.0.mp4", "cam1.45.mp4"]
        assert cam.frames_durable == 90
    infos = [await probe(p) for p in parts]
    assert [int(i["nb_read_packets"]) for i in infos] == [45, 45]
    assert all(i["codec_name"] == "h264" and i["width"] == 320 for i in infos)
    assert int(infos[0]["nb_read_frames"]) == 45
    # Part 1 starts mid-GOP (seq 45); from its keyframe at seq 60 on it decodes alone.
    assert int(infos[1]["nb_read_frames"]) >= 30
    # Its init has the run's parameter sets byte for byte (a stray zero byte on the PPS
    # made an evidence export take it for another stream and leave out 45..59).
    avccs = [avcc_from_moov(part.read_bytes()) for part in parts]
    assert avccs[0] is not None and avccs[0] == avccs[1]


async def test_new_parameter_sets_begin_a_part_of_their_own(
    store: RecordingStore, packets: PacketList
) -> None:
    """A camera set to another size while it streams: its first keyframe at the new size
    begins a part whose init segment describes it; the live feed gets that init."""
    larger = make_h264_packets(30, width=640, height=360)
    rec, cam = await open_cam(store, packets)
    listener = Collector()
    cam.add_listener(listener)
    await feed(cam, packets[:45] + larger, range(75))  # 640x360 from seq 45 on
    run = cam.runs[0]
    # x264 repeats the sets at every keyframe: the same again begin nothing new.
    assert not run.new_stream(larger[0][0]) and run.new_stream(packets[0][0])
    await rec.close("done")
    parts = [p.path for p in store.sessions()[0].camera("cam1").parts]
    assert [p.name for p in parts] == ["cam1.0.mp4", "cam1.45.mp4"]
    infos = [await probe(p) for p in parts]
    assert [(i["width"], i["height"], int(i["nb_read_frames"])) for i in infos] == [
        (320, 240, 45),
        (640, 360, 30),
    ]
    assert [avcc_from_moov(init) for init in listener.inits] == [
        avcc_from_moov(p.read_bytes()) for p in parts
    ]
    assert cam.mse_codec == mse_codec_string(larger[0][0])


@pytest.mark.parametrize("step_s", [20 * 3600, 2 * 3600, -600])
async def test_a_clock_step_inside_a_run_begins_a_part_of_its_own(
    store: RecordingStore, packets: PacketList, step_s: int
) -> None:
    """The device's clock stepped between two frames (a Pi syncing over NTP). Before, a
    step of over 13.26 h overflowed the 32-bit sample duration: the connection was cut at
    every frame after it, this emergency's and the next's; a step of hours made one frame
    last hours (HLS: one EXTINF of hours); a step back squashed every frame after it into
    a tick apart. Now the frame after the step begins a part, mid-GOP if need be, and
    every frame is recorded with the media time of its own part."""
    rec, cam = await open_cam(store, packets)
    for seq, (payload, key) in enumerate(packets[:60]):
        at = T0_US + seq * FRAME_US + (step_s * 1_000_000 if seq >= 40 else 0)
        assert await cam.append(seq, at, key, payload, preroll=False, live=True) in (
            Outcome.APPENDED,
        )
    await rec.close("done")
    parts = [p.path for p in store.sessions()[0].camera("cam1").parts]
    assert [p.name for p in parts] == ["cam1.0.mp4", "cam1.40.mp4"]
    probed = [await asyncio.to_thread(ffprobe_packets, p) for p in parts]
    assert [len(packets) for packets in probed] == [40, 20]
    for packets in probed:  # seconds, not hours; increasing at the frame rate
        times = [float(pk["pts_time"]) for pk in packets]
        assert times == sorted(times) and times[-1] - times[0] < 2.0


@pytest.mark.parametrize("damage", ["garbage", "cut"])
async def test_resume_after_crash_truncates_torn_tail(
    tmp_path: Path, packets: PacketList, damage: str
) -> None:
    async with RecordingStore(tmp_path / "live") as store1:
        _, cam = await open_cam(store1, packets)
        await feed(cam, packets, range(45))
        assert await cam.flush() == 43
        # What a crash leaves behind right now: copy the files as they are (a temporary
        # file of a metadata save in flight may vanish under the copy, as in a real crash).
        await asyncio.to_thread(
            shutil.copytree,
            tmp_path / "live",
            tmp_path / "crashed",
            ignore=lambda _dir, names: [n for n in names if n.endswith(".tmp")],
        )
    mp4 = tmp_path / "crashed" / "s-1" / "cam1.0.mp4"
    size = mp4.stat().st_size
    with mp4.open("ab") as f:
        if damage == "garbage":
            f.write(b"\x00\x00\x10\x00moof\x00\x00\x00\x10mfhd")  # a partial box
        else:
            f.truncate(size - 10)  # inside the last fragment's mdat
    expect_durable = 43 if damage == "garbage" else 42
    async with RecordingStore(tmp_path / "crashed") as store2:
        assert store2.sessions()[0].camera("cam1").durable_seq == expect_durable
        rec, cam = await open_cam(store2, packets)
        assert cam.durable_seq == expect_durable
        if damage == "garbage":
            assert mp4.stat().st_size == size
        await feed(cam, packets, range(expect_durable + 1, 90))
        await rec.close("all clear")
    p0 = await probe(mp4)
    p1 = await probe(mp4.with_name(f"cam1.{expect_durable + 1}.mp4"))
    assert int(p0["nb_read_packets"]) + int(p1["nb_read_packets"]) == 90
    assert int(p0["nb_read_frames"]) == expect_durable + 1


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        # schema 1 (a live and a pre-roll recording per camera): not read, never overwritten
        '{"v": 1, "session_id": "s-1", "device_id": "dev-1", "cameras": [], "prerolls": []}',
    ],
)
async def test_unreadable_session_json_is_not_overwritten(
    tmp_path: Path, packets: PacketList, text: str
) -> None:
    bad = tmp_path / "rec" / "s-1" / "session.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(text)
    async with RecordingStore(tmp_path / "rec") as store:
        assert store.sessions() == []
        with pytest.raises(CorruptRecordingError):
            await open_cam(store, packets)
    assert bad.read_text() == text


async def test_reopen_closed_session_continues(store: RecordingStore, packets: PacketList) -> None:
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets, range(30))
    await rec.close("all clear")
    again, cam2 = await open_cam(store, packets)
    assert again is rec
    assert cam2 is cam
    assert rec.is_open
    await feed(cam, packets, range(30, 40))  # late footage is still taken
    await rec.close("all clear again")
    assert cam.frames_durable == 40
    assert [p.file for p in cam.runs[0].parts] == ["cam1.0.mp4", "cam1.30.mp4"]


# -- H.264 and fMP4 helpers ----------------------------------------------------


async def test_mse_codec_string_from_real_x264(store: RecordingStore, packets: PacketList) -> None:
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets, range(3))
    init = cam.runs[0].init_segment
    await rec.close("done")
    info = await probe(rec.directory / "cam1.0.mp4")
    assert info["profile"] == "Constrained Baseline"
    expected = f"avc1.42c0{int(info['level']):02x}"
    assert mse_codec_string(packets[0][0]) == expected  # keyframe with in-band SPS
    assert mse_codec_string(parameter_sets(packets[0][0]).annex_b()) == expected
    assert init is not None
    assert init[4:8] == b"ftyp"
    with (rec.directory / "cam1.0.mp4").open("rb") as f:
        scan = scan_file(f)
    assert scan.avcc is not None
    assert mse_codec_string(scan.avcc) == expected  # avcC record from the moov
    with pytest.raises(MissingSpsError) as err:
        mse_codec_string(packets[1][0])  # a P-frame has no SPS
    assert isinstance(err.value, ValueError)


def test_an_evidence_file_goes_on_over_a_part_whose_pps_has_a_zero_more() -> None:
    """Parts an older receiver began mid-GOP have the run's PPS with a trailing zero byte
    in their avcC: the same stream, not one that calls for a file of its own."""
    sps = bytes.fromhex("6742c01eda0280bfe584000003000400000300f23c58ba80")
    avcc = bytes.fromhex("0142c01effe10018") + sps + bytes.fromhex("01000468ce0fc8")
    older = bytes.fromhex("0142c01effe10018") + sps + bytes.fromhex("01000568ce0fc800")
    assert evidence._same_sets(avcc, older)
    assert not evidence._same_sets(avcc, older[:-2] + b"\xc9\x00")  # another PPS
    assert not evidence._same_sets(avcc, None)


def test_split_nal_units_handles_both_start_codes() -> None:
    data = b"\x00\x00\x00\x01\x67\x42\x00\x00\x01\x68\xce\x00\x00\x00\x01\x65\x88\x00"
    assert split_nal_units(data) == [b"\x67\x42", b"\x68\xce", b"\x65\x88"]
    assert split_nal_units(b"no start code") == []


def test_emulation_prevention_in_sps_header() -> None:
    # profile 0x64, constraint byte 0x00, then "00 00 03 01": level 0x01 after removal.
    sps = b"\x00\x00\x00\x01\x67\x64\x00\x00\x03\x01\xff"
    assert mse_codec_string(sps) == "avc1.640000"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, packets: PacketList) -> bytes:
    """A closed 12-frame recording, as bytes."""

    async def record() -> bytes:
        async with RecordingStore(tmp_path_factory.mktemp("split")) as s:
            rec, cam = await open_cam(s, packets)
            await feed(cam, packets, range(12))
            await rec.close("done")
            return (rec.directory / "cam1.0.mp4").read_bytes()

    return asyncio.run(record())


def test_a_recording_is_one_fragment_per_frame(recorded: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(recorded)
    with path.open("rb") as f:
        scan = scan_file(f)
    assert (scan.samples, scan.fragments, scan.has_init) == (12, 12, True)
    assert avcc_from_moov(recorded) is not None


def test_scan_finds_complete_fragments_only(recorded: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.mp4"
    ends: list[int] = []
    for cut in range(0, len(recorded) + 1, 97):
        path.write_bytes(recorded[:cut])
        with path.open("rb") as f:
            scan = scan_file(f)
        assert scan.valid_end <= cut
        assert scan.samples == scan.fragments <= 12
        ends.append(scan.samples)
    assert ends == sorted(ends)  # more bytes never mean fewer samples
    with path.open("wb") as f:
        f.write(recorded)
    with path.open("rb") as f:
        full = scan_file(f)
    assert (full.samples, full.torn, full.has_init) == (12, False, True)


async def test_disk_full_fails_loud_and_recovers_on_reopen(
    store: RecordingStore, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full = False
    real_write = PartWriter.write

    def write(self: PartWriter, chunks: list[bytes]) -> int:
        if disk_full:
            real_write(self, [chunks[0][: len(chunks[0]) // 2]])  # a torn write, then no space
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, chunks)

    monkeypatch.setattr(PartWriter, "write", write)
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets, range(20))
    assert await cam.flush() == 18
    disk_full = True
    await feed(cam, packets, range(20, 21))  # made in memory; written with the next fsync
    with pytest.raises(RecordingFailedError):
        await cam.flush()
    with pytest.raises(RecordingFailedError):
        await feed(cam, packets, range(21, 22))  # the failed run takes nothing more
    with pytest.raises(RecordingFailedError):
        await cam.flush()
    assert cam.durable_seq == 18  # nothing acknowledged is lost, nothing more claimed
    disk_full = False
    again = await store.open_session("s-1", "dev-1", META, [make_track(packets)])
    assert again.camera("cam1") is cam
    assert cam.writable
    assert cam.durable_seq == 18
    await feed(cam, packets, range(19, 40))  # the agent resends what was never acked
    await rec.close("all clear")
    parts = rec.summary().camera("cam1").parts
    counts = [int((await probe(p.path))["nb_read_packets"]) for p in parts]
    assert counts == [19, 21]


async def test_durable_footage_leaves_the_page_cache(
    store: RecordingStore, packets: PacketList
) -> None:
    """Written once and read back rarely: after each fsync the part's pages are dropped
    from the page cache (all but the last, partial one), so a long ingest does not
    grow it (on this machine that made every byte written cost 3-4 times the CPU)."""
    rec, cam = await open_cam(store, packets)
    for n in range(60):
        feed_nowait(cam, packets, range(n, n + 1))
        await cam.flush()
    part = rec.directory / "cam1.0.mp4"
    out = await asyncio.to_thread(
        subprocess.run,
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", str(part)],
        capture_output=True,
        text=True,
        check=True,
    )
    resident, size = map(int, out.stdout.split())
    assert size > 16 * mmap.PAGESIZE
    assert resident <= mmap.PAGESIZE
    await rec.close("all clear")


async def test_a_part_begins_with_its_init_segment_made_off_the_loop(
    store: RecordingStore, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyAV probes a part's first packet for its init segment (10-17 ms for a 1080p
    keyframe): :meth:`CameraRecording.append` has it made in a worker thread, while the
    loop serves everyone else, and the packets after it wait their turn."""
    loop_thread = threading.current_thread()
    made_in: list[threading.Thread] = []
    started, release = threading.Event(), threading.Event()
    make_init = run_module.init_segment

    def held(template: bytes, capture_us: int, title: str) -> bytes:
        made_in.append(threading.current_thread())
        started.set()
        assert release.wait(10), "the loop was blocked: the init segment was made on it"
        return make_init(template, capture_us, title)

    monkeypatch.setattr(run_module, "init_segment", held)
    rec, cam = await open_cam(store, packets)
    payload, key = packets[0]
    # The live path asks not to begin a part on the loop: it queues the packet instead.
    assert cam.append_nowait(0, T0_US, key, payload, live=True, defer_init=True) is None
    first = asyncio.create_task(cam.append(0, T0_US, key, payload, preroll=False, live=True))
    assert await asyncio.to_thread(started.wait, 10)  # the loop runs on meanwhile
    assert made_in[0] is not loop_thread
    payload, key = packets[1]
    assert cam.append_nowait(1, T0_US + FRAME_US, key, payload, live=True) is None  # waits
    release.set()
    assert await first is Outcome.APPENDED
    assert await cam.append(1, T0_US + FRAME_US, key, payload, live=True) is Outcome.APPENDED
    feed_nowait(cam, packets, range(2, 40))
    assert await cam.flush() == 38
    await rec.close("all clear")
    assert int((await probe(rec.directory / "cam1.0.mp4"))["nb_read_frames"]) == 40
    assert len(made_in) == 1


async def test_an_empty_first_packet_is_refused_as_empty_on_either_path(
    store: RecordingStore, packets: PacketList
) -> None:
    _, cam = await open_cam(store, packets)
    with pytest.raises(InvalidPacketError, match="empty payload at seq 0"):
        await cam.append(0, T0_US, True, b"", live=True)
    with pytest.raises(InvalidPacketError, match="empty payload at seq 0"):
        cam.append_nowait(0, T0_US, True, b"", live=True)


async def test_a_cancelled_session_save_keeps_the_next_one_waiting_for_its_write(
    store: RecordingStore, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """session.json goes through one temporary file. A save whose caller is cancelled
    (a device's connection cut) goes on in its thread; the next save must not write that
    file beside it, or a mix of both would be installed (found by a review)."""
    from receiver import session_recording

    rec = await store.open_session("s-1", "dev-1", META, [make_track(packets)])
    write = session_recording._write_atomic
    release = threading.Event()
    started = threading.Semaphore(0)
    running: list[int] = []
    most = [0]

    def slow_write(path: Path, data: bytes) -> None:
        running.append(1)
        most[0] = max(most[0], len(running))
        started.release()
        try:
            if not release.wait(10):
                raise AssertionError("never released")
            write(path, data)
        finally:
            running.pop()

    monkeypatch.setattr(session_recording, "_write_atomic", slow_write)
    first = asyncio.create_task(rec._save())
    assert await asyncio.to_thread(started.acquire, True, 10)
    first.cancel()
    second = asyncio.create_task(rec._save())
    # The second waits for the first write, however long: it has not started one.
    assert not await asyncio.to_thread(started.acquire, True, 0.3)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert most[0] == 1
    saved = json.loads((store.root / "s-1" / "session.json").read_text())
    assert saved["session_id"] == "s-1"


async def test_frames_of_a_failed_fsync_are_not_counted_when_the_session_reopens(
    store: RecordingStore, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an EIO from fsync, Linux keeps the pages in the cache marked clean, never
    to be written; a rescan counted them, and the re-opened session acknowledged frames
    that were not on disk (found by a review). The part is cut to the last good fsync."""
    fsync, failing = os.fsync, [False]

    def fsync_failing_once(fd: int) -> None:
        if failing[0] and os.readlink(f"/proc/self/fd/{fd}").endswith(".mp4"):
            failing[0] = False
            raise OSError(errno.EIO, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_failing_once)
    _, cam = await open_cam(store, packets)
    await feed(cam, packets, range(20))
    acked = await cam.flush()
    assert acked == 18  # the muxer writes a frame when the next one arrives
    failing[0] = True
    await feed(cam, packets, range(20, 40))
    with pytest.raises(RecordingFailedError):
        await cam.flush()
    again = await store.open_session("s-1", "dev-1", META, [make_track(packets, "cam1")])
    assert again.camera("cam1").durable_seq == acked


async def test_what_a_restart_finds_on_disk_is_made_durable_before_it_is_reported(
    tmp_path: Path, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between a write and its fsync, the receiver left frames in the page cache;
    the next start counted them (welcome acks, the index) without an fsync, and a power
    cut then lost acknowledged footage (found by a review)."""
    async with RecordingStore(tmp_path / "rec") as first:
        _, cam = await open_cam(first, packets)
        await feed(cam, packets, range(20))
        await cam.flush()
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    async with RecordingStore(tmp_path / "rec") as again:
        held = again.get("s-1").camera("cam1").durable_seq
        assert held >= 18
    assert any(path.endswith("/s-1/cam1.0.mp4") for path in synced)


async def test_an_ack_moves_past_a_declared_gap_only_once_the_gap_is_on_disk(
    store: RecordingStore, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gap counted toward the ack while session.json was still being saved: a crash
    (or a full disk) then lost the record of it, and the ack the device had been sent
    was past footage the receiver neither holds nor has a reason for (found by a
    review)."""
    from receiver import session_recording

    rec = await store.open_session("s-1", "dev-1", META, [make_track(packets, live_seq=30)])
    cam = rec.camera("cam1")
    await feed(cam, packets, range(30, 50))
    await cam.flush()
    assert cam.durable_seq == -1  # 0..29 never came
    write = session_recording._write_atomic
    saving, release = threading.Event(), threading.Event()

    def slow_write(path: Path, data: bytes) -> None:
        saving.set()
        if not release.wait(10):
            raise AssertionError("never released")
        write(path, data)

    monkeypatch.setattr(session_recording, "_write_atomic", slow_write)
    declaring = asyncio.create_task(cam.declare_gap(0, 29, "lost"))
    assert await asyncio.to_thread(saving.wait, 10)
    assert cam.durable_seq == -1  # not before the gap is on disk
    release.set()
    await declaring
    assert cam.durable_seq == 48


async def test_a_part_whose_listing_failed_takes_no_footage(
    store: RecordingStore, packets: PacketList
) -> None:
    """The receiver cannot save session.json as a camera's new parameter sets begin a
    part (a full disk): that part is not listed, so nothing may go into it (acked
    there, it would be footage no listing finds after a restart) until a re-open."""
    larger = make_h264_packets(30, width=640, height=360)
    rec, cam = await open_cam(store, packets)
    await feed(cam, packets[:45], range(45))
    real_save = cam._save

    async def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    cam._save = full_disk
    with pytest.raises(OSError, match="No space"):
        await feed(cam, packets[:45] + larger, range(45, 46))
    cam._save = real_save
    with pytest.raises(RecordingFailedError):  # sent again: the part is still unlisted
        await feed(cam, packets[:45] + larger, range(45, 47))
    assert cam.durable_seq == 44
    await rec.close("done")
