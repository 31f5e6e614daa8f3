"""The receiver's promise under a full or failing disk: nothing acknowledged is lost.

Disk failures are simulated in-process (``os.write``, ``os.writev``, ``os.fsync``
monkeypatched to fail for one kind of file); devices speak the real uplink to a
receiver on 127.0.0.1. Each test names the defect it pins down:

- the custody log (chain of custody) never calls a checkpoint held unless an
  fsync covered it, and never appends onto a torn line;
- a part whose write or fsync failed is cut to its last good fsync at once, so a
  restart before the device returns claims no frame that was never durable;
- a session folder holding part files but no (readable) ``session.json`` is
  never started over (no truncation, no deletion) and stays in the index;
- opening a session on a full disk leaks no descriptor and tells the device;
- a device whose footage cannot be recorded shows ``recording_failing``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import chain
from agent import protocol as p
from receiver import custody, parts, session_recording
from receiver.errors import CorruptRecordingError, RecordingFailedError
from receiver.h264 import parameter_sets
from receiver.index import LocalStorage
from receiver.presence import Presence
from receiver.recording import RecordingStore, TrackInfo
from receiver.server import Receiver
from tests.logins import logged_in
from tests.media import PacketList
from tests.test_backfill_ingest import FIRST, AgentEnd, enroll

pytestmark = pytest.mark.timeout(60)

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EIO = OSError(errno.EIO, "Input/output error")


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class DiskFault:
    """Make ``os.write``/``os.writev``/``os.fsync`` fail for files whose path ends with
    ``suffix``: ``times`` times (None: until :meth:`heal`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
        self.suffix = suffix
        self.failures: dict[str, OSError] = {}
        self.left: dict[str, int | None] = {}
        self.hit: dict[str, int] = {}
        for name in ("write", "writev", "fsync"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(name, real))

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(fd: int, *args: Any) -> Any:
            exc = self.failures.get(name)
            if exc is not None and _path_of(fd).endswith(self.suffix):
                left = self.left[name]
                if left is None or left > 0:
                    self.left[name] = None if left is None else left - 1
                    self.hit[name] = self.hit.get(name, 0) + 1
                    raise OSError(exc.errno, exc.strerror)
            return real(fd, *args)

        return call

    def fail(self, name: str, exc: OSError, times: int | None = None) -> None:
        self.failures[name], self.left[name] = exc, times

    def heal(self) -> None:
        self.failures.clear()


def _track(packets: PacketList, camera: str = "cam-a") -> TrackInfo:
    extradata = parameter_sets(packets[0][0]).annex_b()
    return TrackInfo(camera, "interior", "h264", 320, 240, 30.0, extradata, 0, 0)


def _digests(directory: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.glob("*.mp4"))
    }


async def _record(root: Path, packets: PacketList, session: str = "s1") -> None:
    """A closed-down (not closed) session of two cameras, 90 frames each, indexed."""
    async with RecordingStore(root) as store:
        storage = LocalStorage(store)
        await storage.start()
        try:
            tracks = [_track(packets, "cam-a"), _track(packets, "cam-b")]
            rec = await store.open_session(session, "dev-1", {}, tracks)
            for cam in rec.cameras.values():
                for i, (payload, key) in enumerate(packets):
                    await cam.append(i, 1_000_000 + i * 33_333, key, payload, live=True)
                await cam.flush()
            await rec._suspend()  # the last frames durable, as a receiver stop does
            await storage.sync()
        finally:
            await storage.aclose()


# -- 1. the custody log ---------------------------------------------------------------


def _checkpoint(key: Ed25519PrivateKey, first: int, n: int = 3) -> chain.Checkpoint:
    entries = chain.pack_entries([(1_000_000 + i, 0, bytes(32)) for i in range(n)])
    return chain.sign(key, "dev-1", "cam-a", first, chain.GENESIS, entries)


def _firsts(path: Path) -> list[int]:
    return [r.checkpoint.first for r in custody.read_records(path)]


def test_custody_record_whose_write_failed_is_written_when_resent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = custody.CustodyLog(tmp_path)
    record = custody.CustodyRecord(_checkpoint(Ed25519PrivateKey.generate(), 0), "uplink", "ok", 1)
    disk = DiskFault(monkeypatch, ".jsonl")
    disk.fail("write", ENOSPC)
    with pytest.raises(OSError, match="No space"):
        log.write([record])
    disk.heal()
    # The device got no chain_ack and sends it again: it must be written this time.
    assert log.write([record]) == 1
    assert _firsts(log.path("cam-a")) == [0]
    assert log.write([record]) == 0  # now it is held


def test_custody_record_whose_fsync_failed_is_cut_and_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = Ed25519PrivateKey.generate()
    log = custody.CustodyLog(tmp_path)
    log.write([custody.CustodyRecord(_checkpoint(key, 0), "uplink", "ok", 1)])
    size = log.path("cam-a").stat().st_size
    second = custody.CustodyRecord(_checkpoint(key, 3), "uplink", "ok", 2)
    disk = DiskFault(monkeypatch, ".jsonl")
    disk.fail("fsync", EIO, times=1)
    with pytest.raises(OSError, match="Input/output"):
        log.write([second])
    # What the failed fsync did not cover is not left to be read back as held.
    assert log.path("cam-a").stat().st_size == size
    fresh = custody.CustodyLog(tmp_path)  # after a restart: read from the file
    assert fresh.write([second]) == 1
    assert _firsts(log.path("cam-a")) == [0, 3]


def test_custody_appends_never_onto_a_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = Ed25519PrivateKey.generate()
    log = custody.CustodyLog(tmp_path)
    log.write([custody.CustodyRecord(_checkpoint(key, 0), "uplink", "ok", 1)])
    real_write = os.write
    calls = []

    def short_then_full(fd: int, data: bytes) -> int:
        if not _path_of(fd).endswith(".jsonl"):
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])  # a short write ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(OSError, match="No space"):
        log.write([custody.CustodyRecord(_checkpoint(key, 3), "uplink", "ok", 2)])
    monkeypatch.setattr(os, "write", real_write)
    # The cut back after the failure undid it; a crash could still leave such a line.
    with open(log.path("cam-a"), "ab") as f:
        f.write(b'{"torn": "by a crash')
    fresh = custody.CustodyLog(tmp_path)
    written = fresh.write(
        [
            custody.CustodyRecord(_checkpoint(key, 3), "uplink", "ok", 2),
            custody.CustodyRecord(_checkpoint(key, 6), "uplink", "ok", 3),
        ]
    )
    assert written == 2
    caplog.clear()
    assert _firsts(log.path("cam-a")) == [0, 3, 6]
    assert not caplog.records  # every line reads


def test_custody_key_whose_save_failed_is_saved_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = Ed25519PrivateKey.generate()
    key = custody.DeviceKey("dev-1", device.public_key())
    log = custody.CustodyLog(tmp_path)
    record = custody.CustodyRecord(_checkpoint(device, 0), "uplink", "ok", 1)
    disk = DiskFault(monkeypatch, "keys.json.tmp")
    disk.fail("write", ENOSPC)
    with pytest.raises(OSError, match="No space"):
        log.write([record], key)
    disk.heal()
    assert log.write([record], key) == 1
    assert set(custody.read_keys(tmp_path)) == {key.kid}


class ChainEnd(AgentEnd):
    """The agent's end, also keeping the chain acks."""

    def __init__(self, receiver: Receiver, key: Ed25519PrivateKey, device: str) -> None:
        super().__init__(receiver, key, device)
        self.chain_acks: list[p.ChainAck] = []

    async def __aenter__(self) -> ChainEnd:
        await super().__aenter__()
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                event = self.conn.receive(msg.data)
                if isinstance(event, p.Ack):
                    self.acks[event.camera] = event
                elif isinstance(event, p.ChainAck):
                    self.chain_acks.append(event)
                elif isinstance(event, p.Error):
                    self.errors.append(event)
                self.changed.notify()
        self.closed = True
        self.changed.notify()


async def test_a_checkpoint_not_written_is_never_chain_acked(
    tmp_path: Path, receiver: Receiver, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = enroll(receiver, tmp_path)
    entries = chain.pack_entries(
        [(1_000_000 + i, 0, chain.payload_digest("h264", packets[i][0])) for i in range(30)]
    )
    cp = chain.sign(key, "dev-1", "cam-a", FIRST, chain.GENESIS, entries)
    disk = DiskFault(monkeypatch, "/chain/cam-a.jsonl")
    async with ChainEnd(receiver, key, "dev-1") as dev:
        await dev.open("s-chain", packets, live=0)
        disk.fail("write", ENOSPC)
        await dev.send(chain.to_wire(cp, "s-chain", 0))
        await dev.changed.wait_until(lambda: dev.closed)
        assert [e.code for e in dev.errors] == ["recording_failed"]
        assert dev.chain_acks == []
    disk.heal()
    async with ChainEnd(receiver, key, "dev-1") as dev:  # the agent sends it again
        await dev.open("s-chain", packets, live=0)
        await dev.send(chain.to_wire(cp, "s-chain", 0))
        await dev.wait(lambda: bool(dev.chain_acks))
        assert [(a.first, a.last, a.result) for a in dev.chain_acks] == [(FIRST, FIRST + 29, "ok")]
    path = receiver.store.get("s-chain").directory / "chain" / "cam-a.jsonl"
    assert [(r.checkpoint.first, r.result) for r in custody.read_records(path)] == [(FIRST, "ok")]


# -- 2. a failed fsync is cut to the last good one at once -------------------------------


def _short_writev_then_enospc(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The next ``os.writev`` of a part file writes half its buffers (whole fragments
    among them), the one after fails with ENOSPC: how a disk fills up mid-round."""
    real = os.writev
    calls = {"n": 0}

    def writev(fd: int, buffers: list[Any]) -> int:
        if not _path_of(fd).endswith(".mp4") or calls["n"] >= 2:
            return real(fd, buffers)
        calls["n"] += 1
        if calls["n"] == 1:
            return real(fd, buffers[: max(1, len(buffers) // 2)])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", writev)
    return calls


@pytest.mark.parametrize("failing", ["fsync", "writev"])
async def test_a_restart_after_a_failed_write_claims_only_fsynced_frames(
    tmp_path: Path, packets: PacketList, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    root = tmp_path / "rec"
    disk = DiskFault(monkeypatch, ".mp4")
    async with RecordingStore(root) as store:
        rec = await store.open_session("s1", "dev-1", {}, [_track(packets)])
        cam = rec.camera("cam-a")
        for i in range(40):
            await cam.append(i, 1_000_000 + i * 33_333, packets[i][1], packets[i][0], live=True)
        good = await cam.flush()
        (run,) = cam.runs
        covered = run._synced
        if failing == "fsync":
            disk.fail("fsync", EIO, times=1)
        else:
            calls = _short_writev_then_enospc(monkeypatch)
        for i in range(40, 80):
            await cam.append(i, 1_000_000 + i * 33_333, packets[i][1], packets[i][0], live=True)
        with pytest.raises(RecordingFailedError):
            await cam.flush()
        if failing == "fsync":
            assert disk.hit == {"fsync": 1}
        else:
            assert calls["n"] == 2
        assert cam.durable_seq == good == 38
        # Cut at once, before the descriptor is released: a restart sees only this.
        assert (root / "s1" / "cam-a.0.mp4").stat().st_size == covered
    # The receiver stopped before the device came back to re-open the session.
    async with RecordingStore(root) as store:
        assert store.get("s1").durable_by_camera() == {"cam-a": good}
        storage = LocalStorage(store)
        await storage.start()
        try:
            (part,) = await storage.parts("s1", "cam-a")
            assert (part.frames, part.durable_size) == (good + 1, covered)
        finally:
            await storage.aclose()


# -- 3. and 4. a session folder without a readable session.json --------------------------


async def test_missing_session_json_never_starts_the_session_over(
    tmp_path: Path, packets: PacketList, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "rec"
    await _record(root, packets)
    sdir = root / "s1"
    (sdir / "session.json").unlink()  # lost (fsck, a partial restore, an operator)
    before = _digests(sdir)
    assert set(before) == {"cam-a.0.mp4", "cam-b.0.mp4"}
    caplog.set_level(logging.ERROR)
    async with RecordingStore(root) as store:
        assert "no session.json" in store.damaged["s1"]
        async with LocalStorage(store) as storage:
            (entry,) = await storage.sessions()  # still listed, from the index
            assert entry.session_id == "s1"
            assert entry.damaged is not None
            assert [p.frames for p in await storage.parts("s1", "cam-a")] == [90]
            with pytest.raises(CorruptRecordingError, match="nothing is overwritten"):
                await store.open_session("s1", "dev-1", {}, [_track(packets)])
    assert _digests(sdir) == before
    assert not (sdir / "session.json").exists()
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and "'s1'" in r.getMessage()
    ]
    assert len(errors) == 1  # once, however often the device comes back
    assert str(sdir) in errors[0]


async def test_corrupt_session_json_keeps_the_session_indexed(
    tmp_path: Path, packets: PacketList, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "rec"
    await _record(root, packets)
    sj = root / "s1" / "session.json"
    sj.write_bytes(sj.read_bytes()[:300])  # a damaged sector, a partial restore
    before = _digests(root / "s1")
    caplog.set_level(logging.ERROR)
    async with RecordingStore(root) as store, LocalStorage(store) as storage:
        assert store.sessions() == []
        (entry,) = await storage.sessions()
        assert entry.session_id == "s1"
        assert entry.device_id == "dev-1"
        assert entry.damaged is not None and "session.json" in entry.damaged
        assert [c.camera_id for c in entry.cameras] == ["cam-a", "cam-b"]
        assert (await storage.session("s1")).damaged == entry.damaged
        assert [p.frames for p in await storage.parts("s1", "cam-b")] == [90]
        with pytest.raises(CorruptRecordingError):
            await store.open_session("s1", "dev-1", {}, [_track(packets)])
    # Another start (the index kept it): still listed.
    async with RecordingStore(root) as store, LocalStorage(store) as storage:
        assert [e.session_id for e in await storage.sessions()] == ["s1"]
    assert _digests(root / "s1") == before
    # And with the index gone too, it is still listed, as damaged, with no cameras.
    for f in root.glob(".index.sqlite*"):
        f.unlink()
    async with RecordingStore(root) as store, LocalStorage(store) as storage:
        (stub,) = await storage.sessions()
        assert (stub.session_id, stub.cameras) == ("s1", ())
        assert stub.damaged is not None
    logged = [r.getMessage() for r in caplog.records if r.name == "receiver.recording"]
    assert len(logged) == 3  # once per start
    assert all(str(sj) in m for m in logged)


async def test_a_device_is_refused_with_corrupt_recording_and_nothing_is_touched(
    tmp_path: Path, packets: PacketList
) -> None:
    data = tmp_path / "receiver"
    await _record(data / "recordings", packets)
    sdir = data / "recordings" / "s1"
    (sdir / "session.json").unlink()
    before = _digests(sdir)
    async with Receiver(data, "127.0.0.1", 0) as rx:
        key = enroll(rx, tmp_path)
        for _ in range(2):  # it comes back: refused again, the same way
            async with AgentEnd(rx, key, "dev-1") as dev:
                extradata = parameter_sets(packets[0][0]).annex_b()
                cams = (
                    p.CameraDesc(0, "cam-a", "interior", "h264", 320, 240, 30.0, extradata, 0, 0),
                )
                await dev.send(p.SessionOpen("s1", "bldg", {"kind": "test"}, 1.0, 2.0, cams))
                await dev.changed.wait_until(lambda: dev.closed)
                assert [e.code for e in dev.errors] == ["corrupt_recording"]
        failing = rx.presence.devices["dev-1"]
        assert failing.failing_error is not None
        assert failing.failing_error.startswith("corrupt_recording")
    assert _digests(sdir) == before


def test_a_part_file_is_never_overwritten_nor_deleted_with_its_footage(
    tmp_path: Path, packets: PacketList
) -> None:
    full = tmp_path / "cam-a.0.mp4"
    asyncio.run(_record(tmp_path / "rec", packets))
    shutil.copy(tmp_path / "rec" / "s1" / "cam-a.0.mp4", full)
    digest = hashlib.sha256(full.read_bytes()).hexdigest()
    for rewrite in (False, True):
        with pytest.raises(CorruptRecordingError, match="not overwritten"):
            parts.open_part_file(full, False, rewrite=rewrite)
    assert parts.remove_empty_part(full) is False
    assert hashlib.sha256(full.read_bytes()).hexdigest() == digest
    # An empty one (created, never listed) is taken as it is; a part holding only its init
    # segment and a torn fragment is rewritten when that is what was planned.
    empty = tmp_path / "cam-a.5.mp4"
    empty.touch()
    os.close(parts.open_part_file(empty, False))
    torn = tmp_path / "cam-a.7.mp4"
    torn.write_bytes(full.read_bytes()[:900])
    with pytest.raises(CorruptRecordingError):
        parts.open_part_file(torn, False)
    os.close(parts.open_part_file(torn, False, rewrite=True))
    assert torn.stat().st_size == 0
    assert parts.remove_empty_part(torn) is True
    assert not torn.exists()


# -- 5. opening on a full disk -----------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_opening_on_a_full_disk_leaks_nothing_and_succeeds_later(
    tmp_path: Path, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = session_recording._write_atomic
    full = True

    def write_atomic(path: Path, data: bytes) -> None:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(session_recording, "_write_atomic", write_atomic)
    tracks = [_track(packets, f"cam-{i}") for i in range(4)]
    async with RecordingStore(tmp_path / "rec") as store:
        before = _open_fds()
        for _ in range(20):
            with pytest.raises(RecordingFailedError, match="No space"):
                await store.open_session("s-new", "dev-1", {}, tracks)
        assert _open_fds() == before
        full = False  # space came back: the same session opens, on the same empty files
        rec = await store.open_session("s-new", "dev-1", {}, tracks)
        cam = rec.camera("cam-0")
        for i in range(31):
            await cam.append(i, 1_000_000 + i * 33_333, packets[i][1], packets[i][0], live=True)
        assert await cam.flush() == 29


async def test_a_device_opening_on_a_full_disk_is_told_and_shown_failing(
    tmp_path: Path, receiver: Receiver, packets: PacketList, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = session_recording._write_atomic
    full = True

    def write_atomic(path: Path, data: bytes) -> None:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(session_recording, "_write_atomic", write_atomic)
    key = enroll(receiver, tmp_path)
    for _ in range(3):  # the agent reconnects every few seconds: never offline
        async with AgentEnd(receiver, key, "dev-1") as dev:
            await dev.open("s-full", packets, live=0)
            await dev.changed.wait_until(lambda: dev.closed)
            assert [e.code for e in dev.errors] == ["recording_failed"]
            assert "No space left on device" in dev.errors[0].detail
    entry = await _device(receiver)
    failing = entry["recording_failing"]
    assert failing is not None
    assert "No space left on device" in failing["error"]
    assert failing["since"] <= failing["last"]
    full = False
    async with AgentEnd(receiver, key, "dev-1") as dev:
        await dev.open("s-full", packets, live=0)
        await dev.live(0, packets, range(0, 31))
        await dev.wait(lambda: dev.acked(0)[0] >= FIRST + 29)
        assert dev.errors == []
        await receiver.presence.wait_for(lambda: not receiver.presence.failing())
        assert (await _device(receiver))["recording_failing"] is None


async def _device(rx: Receiver) -> dict[str, Any]:
    async with logged_in(rx) as http, http.get(rx.url + "v1/devices") as resp:
        assert resp.status == 200
        (device,) = (await resp.json())["devices"]
        assert isinstance(device, dict)
        return device


# -- 6. the recording failure as a fact of the device --------------------------------------


def test_presence_reports_a_recording_failure_until_footage_is_acknowledged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1_800_000_000.0]
    presence = Presence(clock=lambda: now[0])
    presence.recording_failed("dev-x", "never connected: not tracked")
    assert presence.failing() == []
    presence.connected("dev-1", building="b-1")
    (entry,) = presence.to_json()
    assert entry["recording_failing"] is None
    caplog.set_level(logging.INFO, logger="receiver.presence")
    presence.recording_failed("dev-1", "recording_failed: [Errno 28] No space left on device")
    now[0] += 10
    presence.disconnected("dev-1")
    presence.connected("dev-1")
    presence.recording_failed("dev-1", "recording_failed: [Errno 5] Input/output error")
    (entry,) = presence.to_json()
    assert entry["recording_failing"] == {
        "since": "2027-01-15T08:00:00Z",
        "last": "2027-01-15T08:00:10Z",
        "error": "recording_failed: [Errno 5] Input/output error",
    }
    assert entry["offline"] is False
    assert presence.failing() == ["dev-1"]
    presence.recording_works("dev-1")
    presence.recording_works("dev-1")
    assert presence.to_json()[0]["recording_failing"] is None
    lines = [r.getMessage() for r in caplog.records if "ecording" in r.getMessage()]
    assert len(lines) == 2  # one per transition
    assert "RECORDING FAILING" in lines[0] and "works again" in lines[1]
