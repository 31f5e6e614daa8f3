"""The SQLite recording index: consistent with the files, following the writer, rebuilt.

Recordings are real libx264 packets remuxed by the store's own writer; the
fragments the index lists are checked against the system ``ffprobe``.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest

from receiver.errors import UnknownCameraError, UnknownSessionError
from receiver.fmp4 import InitInfo, moof_timing, read_fragments, read_init
from receiver.h264 import parameter_sets
from receiver.index import INDEX_FILE, LocalStorage, UnknownPartError
from receiver.recording import CameraRecording, RecordingStore, SessionRecording, TrackInfo
from receiver.storage import RecordingStorage
from tests.media import META, PacketList, ffprobe_packets

T0_US = 1_767_000_000_000_000
FRAME_US = 33_333


def capture_us(seq: int) -> int:
    return T0_US + seq * FRAME_US


async def record(
    store: RecordingStore,
    packets: PacketList,
    seqs: dict[str, list[range]],
    session: str = "s-1",
) -> SessionRecording:
    """Open ``session`` with one camera per key of ``seqs`` and feed each its ranges."""
    extradata = parameter_sets(packets[0][0]).annex_b()
    tracks = [TrackInfo(c, "interior", "h264", 320, 240, 30.0, extradata, 0) for c in seqs]
    rec = await store.open_session(session, "dev-1", META, tracks)
    for camera, ranges in seqs.items():
        cam = rec.camera(camera)
        for rng in ranges:
            await feed(cam, packets, rng)
    return rec


async def feed(cam: CameraRecording, packets: PacketList, seqs: range) -> None:
    for seq in seqs:
        payload, key = packets[seq]
        await cam.append(seq, capture_us(seq), key, payload, preroll=False, live=True)


async def dump(storage: RecordingStorage) -> list[Any]:
    """Everything the storage lists, for comparing two indexes."""
    out: list[Any] = []
    for session in await storage.sessions():
        out.append(session)
        for cam in session.cameras:
            for part in await storage.parts(session.session_id, cam.camera_id):
                out.append((part, await storage.fragments(session.session_id, part.file)))
    return out


async def test_index_matches_the_files(tmp_path: Path, packets: PacketList) -> None:
    async with RecordingStore(tmp_path / "rec") as store:
        rec = await record(
            store, packets, {"cam1": [range(30), range(60, 90)], "cam2": [range(45)]}
        )
        await rec.close("all clear")
        async with LocalStorage(store) as storage:
            assert storage.path == store.root / INDEX_FILE
            assert storage.path.stat().st_mode & 0o777 == 0o640  # private, like the footage
            (session,) = await storage.sessions()
            assert (session.session_id, session.device_id) == ("s-1", "dev-1")
            assert session.closed_at == rec.closed_at and session.close_reason == "all clear"
            assert [c.camera_id for c in session.cameras] == ["cam1", "cam2"]
            assert not any(c.recording for c in session.cameras)
            for summary in rec.summary().cameras:
                cam = session.camera(summary.camera_id)
                assert (cam.first_seq, cam.durable_seq) == (summary.first_seq, summary.durable_seq)
                parts = await storage.parts("s-1", summary.camera_id)
                assert [(p.file, p.first_seq, p.last_seq, p.frames) for p in parts] == [
                    (p.file, p.first_seq, p.last_seq, p.frames) for p in summary.parts
                ]
                for part, on_disk in zip(parts, summary.parts, strict=True):
                    await check_part(storage, part.file, on_disk.path)
                    assert part.final
                    assert part.first_capture_us == capture_us(part.first_seq)
                    # Capture times go through the 90 kHz clock: within a tick (11 µs).
                    assert part.last_capture_us is not None
                    assert abs(part.last_capture_us - capture_us(part.last_seq)) <= 11
            assert [p.run for p in await storage.parts("s-1", "cam1")] == [0, 1]
            # The same rows a plain SQLite client sees.
            with sqlite3.connect(storage.path) as db:
                rows = db.execute(
                    "SELECT file, first_seq, last_seq, first_capture_us, last_capture_us, "
                    "durable_size FROM parts WHERE camera_id = 'cam2'"
                ).fetchall()
            assert rows == [
                (
                    "cam2.0.mp4",
                    0,
                    44,
                    capture_us(0),
                    parts[0].last_capture_us,
                    parts[0].durable_size,
                )
            ]
            with pytest.raises(UnknownSessionError):
                await storage.session("s-2")
            with pytest.raises(UnknownCameraError):
                await storage.parts("s-1", "cam3")
            with pytest.raises(UnknownPartError):
                await storage.part("s-1", "cam1.7.mp4")
            with pytest.raises(ValueError, match="outside"):
                await storage.read("s-1", "cam1.0.mp4", 0, 10**9)


async def check_part(storage: LocalStorage, file: str, path: Path) -> None:
    """The indexed fragments are the file's, packet for packet (per ffprobe)."""
    part = await storage.part("s-1", file)
    frags = await storage.fragments("s-1", file)
    pkts = await asyncio.to_thread(ffprobe_packets, path)
    assert len(frags) == len(pkts) == part.frames  # one fragment per frame
    for frag, pkt in zip(frags, pkts, strict=True):
        assert frag.offset < int(pkt["pos"]) < frag.end
        assert frag.decode_time == int(pkt["dts"]) and frag.samples == 1
        assert frag.keyframe == pkt["flags"].startswith("K")
    assert frags[0].offset == part.init_size
    assert all(a.end == b.offset for a, b in itertools.pairwise(frags))
    assert frags[-1].end == part.durable_size
    body = await storage.read("s-1", file, 0, part.durable_size)
    assert body == path.read_bytes()[: part.durable_size]
    # Ranges select the fragments they touch.
    middle = frags[5]
    picked = await storage.fragments("s-1", file, middle.offset + 1, middle.end + 1)
    assert picked == [middle, frags[6]]


async def test_index_follows_the_writer_and_only_durable_data(
    tmp_path: Path, packets: PacketList
) -> None:
    async with RecordingStore(tmp_path / "rec") as store, LocalStorage(store) as storage:
        rec = await record(store, packets, {"cam1": [range(10)]})
        cam = rec.camera("cam1")
        await cam.flush()
        await storage.sync()
        (part,) = await storage.parts("s-1", "cam1")
        assert (part.frames, part.final) == (9, False)  # frame 9's fragment waits for frame 10
        assert (await storage.session("s-1")).camera("cam1").recording
        for n in (20, 40, 60):
            await feed(cam, packets, range(cam.runs[0].last_seq + 1, n))
            await cam.flush()
            await storage.sync()
            (part,) = await storage.parts("s-1", "cam1")
            assert part.frames == cam.frames_durable == n - 1
            assert len(await storage.fragments("s-1", part.file)) == n - 1
        # Never read: the writer listed its fragments, and its init segment at first.
        assert storage.parts_read == 0
        # Made but not fsynced (the fsync's thread writes them): never in the index.
        await feed(cam, packets, range(60, 70))
        await storage.sync()
        (part,) = await storage.parts("s-1", "cam1")
        assert part.frames == 59
        assert cam.has_unflushed
        await rec.close("all clear")
        await storage.sync()
        (part,) = await storage.parts("s-1", "cam1")
        assert (part.frames, part.final) == (70, True)
        assert storage.parts_read == 0  # a finished part's last fragments are listed too
        session = await storage.session("s-1")
        assert session.closed_at is not None and not session.camera("cam1").recording
        await check_part(storage, part.file, rec.directory / part.file)
        # What the writer listed is what reading the files gives.
        async with LocalStorage(store, tmp_path / "from-files.sqlite") as rebuilt:
            assert rebuilt.rebuilt
            assert await dump(rebuilt) == await dump(storage)


async def test_index_is_rebuilt_after_deletion(tmp_path: Path, packets: PacketList) -> None:
    async with RecordingStore(tmp_path / "rec") as store:
        rec = await record(store, packets, {"cam1": [range(30), range(60, 90)]})
        await rec.close("all clear")
        async with LocalStorage(store) as storage:
            assert storage.rebuilt
            before = await dump(storage)
        storage.path.unlink()
        async with LocalStorage(store) as storage:
            assert (storage.rebuilt, storage.parts_read) == (True, 2)
            assert await dump(storage) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "old_schema", "table_dropped"])
async def test_a_damaged_index_is_rebuilt_from_the_files(
    tmp_path: Path, packets: PacketList, damage: str
) -> None:
    async with RecordingStore(tmp_path / "rec") as store:
        rec = await record(store, packets, {"cam1": [range(45)]})
        await rec.close("all clear")
        async with LocalStorage(store) as storage:
            before = await dump(storage)
        path = storage.path
        if damage == "garbage":
            path.write_bytes(b"this is not an SQLite database, it is footage? " * 100)
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[:700])
        else:
            with sqlite3.connect(path) as db:
                if damage == "old_schema":
                    db.execute("PRAGMA user_version=0")
                else:
                    db.execute("DROP TABLE fragment_batches")
        async with LocalStorage(store) as storage:
            assert storage.rebuilt
            assert await dump(storage) == before


async def test_the_index_survives_a_restart(tmp_path: Path, packets: PacketList) -> None:
    root = tmp_path / "rec"
    async with RecordingStore(root) as store:
        closed = await record(store, packets, {"cam1": [range(30)]}, session="s-closed")
        await closed.close("all clear")
        live = await record(store, packets, {"cam1": [range(40)], "cam2": [range(20)]})
        await live.flush()
        async with LocalStorage(store) as storage:
            pass  # closed before the store, as the receiver stops its app first
    # Stopping the store finished the open session's files: one more frame each.
    async with RecordingStore(root) as store, LocalStorage(store) as storage:
        assert not storage.rebuilt
        assert storage.parts_read == 2  # only the two parts that grew
        after = await dump(storage)
        for cam in ("cam1", "cam2"):
            (part,) = await storage.parts("s-1", cam)
            assert part.final and part.frames == store.get("s-1").camera(cam).frames_durable
            assert not (await storage.session("s-1")).camera(cam).recording
    async with RecordingStore(root) as store, LocalStorage(store) as storage:
        assert (storage.rebuilt, storage.parts_read) == (False, 0)
        assert await dump(storage) == after
    # A session deleted from disk leaves the index at the next start.
    shutil.rmtree(root / "s-closed")
    async with RecordingStore(root) as store, LocalStorage(store) as storage:
        assert [s.session_id for s in await storage.sessions()] == ["s-1"]


def test_read_fragments_stops_at_a_torn_tail(tmp_path: Path, packets: PacketList) -> None:
    async def make() -> Path:
        async with RecordingStore(tmp_path / "rec") as store:
            rec = await record(store, packets, {"cam1": [range(12)]})
            await rec.close("done")
            return rec.directory / "cam1.0.mp4"

    path = asyncio.run(make())
    data = path.read_bytes()
    with open(path, "rb") as f:
        init = read_init(f)
        assert init is not None and init.timescale == 90_000
        whole = read_fragments(f, init.size, 100, init)
    assert sum(fr.samples for fr in whole.fragments) == 12
    cut = whole.fragments[7].offset + 20  # inside the eighth moof
    path.write_bytes(data[:cut])
    with open(path, "rb") as f:
        torn = read_fragments(f, init.size, 100, init)
        assert torn.fragments == whole.fragments[:7]
        assert torn.end == whole.fragments[7].offset
        some = read_fragments(f, whole.fragments[2].offset, 3, init)
        assert some.fragments == whole.fragments[2:5]
        assert some.last_sample_time == whole.fragments[4].decode_time
    path.write_bytes(data[:100])  # not even an init segment
    with open(path, "rb") as f:
        assert read_init(f) is None


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def test_moof_timing_reads_every_sample_field() -> None:
    """Fields FFmpeg's muxer leaves to defaults, as another muxer may write them."""
    init = InitInfo(size=0, timescale=90_000, created_us=None, default_duration=1000)
    samples = [(3000, 10, 0x0200_0000), (3000, 10, 0x0101_0000), (3500, 10, 0x0101_0000)]
    trun = _box(
        b"trun",
        struct.pack(">IIi", 0x000701, 3, 0) + b"".join(struct.pack(">III", *s) for s in samples),
    )
    tfhd = _box(b"tfhd", struct.pack(">II", 0, 1))  # no defaults: trex's, or per sample
    tfdt_v0 = _box(b"tfdt", struct.pack(">II", 0, 5000))
    moof = _box(
        b"moof", _box(b"mfhd", struct.pack(">II", 0, 1)) + _box(b"traf", tfhd + tfdt_v0 + trun)
    )
    timing = moof_timing(moof, init)
    assert (timing.samples, timing.decode_time, timing.duration) == (3, 5000, 9500)
    assert (timing.last_sample_offset, timing.keyframe, timing.decode_time_at) == (6000, True, -1)
    # Durations from trex, a non-sync default overridden by first-sample flags, tfdt v1.
    trun = _box(b"trun", struct.pack(">IIiI", 0x000005, 4, 0, 0x0200_0000))
    tfhd = _box(b"tfhd", struct.pack(">III", 0x20, 1, 0x0101_0000))
    tfdt_v1 = _box(b"tfdt", struct.pack(">IQ", 0x0100_0000, 2**40))
    moof = _box(
        b"moof", _box(b"mfhd", struct.pack(">II", 0, 1)) + _box(b"traf", tfhd + tfdt_v1 + trun)
    )
    timing = moof_timing(moof, init)
    assert (timing.samples, timing.decode_time, timing.duration) == (4, 2**40, 4000)
    assert (timing.last_sample_offset, timing.keyframe) == (3000, True)
    assert struct.unpack_from(">Q", moof, timing.decode_time_at)[0] == 2**40
    without_first = _box(b"trun", struct.pack(">IIi", 0x000001, 4, 0))
    moof = _box(
        b"moof", _box(b"mfhd", struct.pack(">II", 0, 1)) + _box(b"traf", tfhd + without_first)
    )
    timing = moof_timing(moof, init)
    assert (timing.keyframe, timing.decode_time, timing.decode_time_at) == (False, None, -1)
    with pytest.raises(ValueError, match="overruns"):
        moof_timing(
            _box(b"moof", _box(b"traf", tfhd + _box(b"trun", struct.pack(">II", 0x100, 9)))), init
        )
