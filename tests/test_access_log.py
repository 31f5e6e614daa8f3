"""The receiver's access log: a hash chain that shows edits, and writers that never fork it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from receiver.access_log import GENESIS, AccessLog, entry_hash, verify_file, verify_lines
from tests.logins import failing_access_log

CLI = [sys.executable, "-m", "breakglass"]


def write(path: Path, n: int) -> list[bytes]:
    with AccessLog(path, clock=lambda: 1_800_000_000.0) as log:
        for i in range(n):
            log.record("live_open", who=f"officer-{i}", role="officer", session="s-1",
                       camera="hallway-2", remote="127.0.0.1")  # fmt: skip
    return path.read_bytes().splitlines(keepends=True)


def test_entries_are_chained_canonical_json(tmp_path: Path) -> None:
    lines = write(tmp_path / "access.log", 3)
    entries = [json.loads(line) for line in lines]
    assert [e["n"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    assert entries[1]["prev"] == entries[0]["hash"]
    first = dict(entries[0])
    digest = first.pop("hash")
    assert entry_hash(first) == digest
    assert entries[0] == {
        "action": "live_open",
        "at": "2027-01-15T08:00:00.000Z",
        "camera": "hallway-2",
        "hash": digest,
        "login": None,
        "n": 1,
        "prev": GENESIS,
        "remote": "127.0.0.1",
        "role": "officer",
        "session": "s-1",
        "who": "officer-0",
    }
    result = verify_file(tmp_path / "access.log")
    assert (result.ok, result.entries, result.head) == (True, 3, entries[2]["hash"])


def test_verify_names_edited_deleted_reordered_and_torn_lines(tmp_path: Path) -> None:
    lines = write(tmp_path / "access.log", 4)
    edited = [*lines]
    edited[1] = edited[1].replace(b"officer-1", b"officer-9")
    assert [e[0] for e in verify_lines(edited).errors] == [2]
    assert "altered" in verify_lines(edited).errors[0][1]
    deleted = [lines[0], lines[2], lines[3]]
    assert verify_lines(deleted).errors[0][0] == 2
    reordered = [lines[0], lines[2], lines[1], lines[3]]
    assert {e[0] for e in verify_lines(reordered).errors} == {2, 3, 4}
    torn = [*lines[:3], lines[3][:20]]
    assert verify_lines(torn).errors == [(4, "unfinished last line (torn write)")]
    garbage = [lines[0], b"not json\n", *lines[2:]]
    assert verify_lines(garbage).errors[0] == (2, "not a JSON entry")


def test_a_torn_tail_is_cut_and_noted_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    lines = write(path, 2)
    with open(path, "ab") as f:
        f.write(b'{"action":"live_op')  # a crash in the middle of a write
    with AccessLog(path) as log:
        log.record("logout", who="officer-0")
    entries = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [e["action"] for e in entries] == ["live_open", "live_open", "log_torn_tail", "logout"]
    assert entries[2]["bytes"] == 18
    assert entries[2]["prev"] == json.loads(lines[1])["hash"]
    assert verify_file(path).ok


def test_two_writers_never_fork_the_chain(tmp_path: Path) -> None:
    """The server and the command line append to one log; flock keeps a single chain."""
    path = tmp_path / "access.log"
    a, b = AccessLog(path), AccessLog(path)
    with a, b:

        def burst(log: AccessLog, who: str) -> None:
            for i in range(200):
                log.record("recording_fetch", who=who, file=f"cam.{i}.mp4")

        threads = [threading.Thread(target=burst, args=(log, w)) for log, w in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a.flush_sync()
        b.flush_sync()
    result = verify_file(path)
    assert (result.ok, result.entries) == (True, 400), result.errors[:3]


async def test_flush_waits_until_durable(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    async with AccessLog(path) as log:
        for i in range(50):
            log.record("live_close", who="o", duration_s=float(i))
        await log.flush()
        assert len(path.read_bytes().splitlines()) == 50
    log.record("after_close", who="o")  # written at once, synchronously
    assert verify_file(path).entries == 51


async def test_durable_answers_for_one_entry_and_waits_out_a_failing_disk(
    tmp_path: Path,
) -> None:
    path = tmp_path / "access.log"
    async with AccessLog(path) as log:
        first = log.record("recording_fetch", who="o", file="a.mp4")
        assert await log.durable(first, 10)
        with failing_access_log(log):
            second = log.record("recording_fetch", who="o", file="b.mp4")
            assert second == first + 1
            assert not await log.durable(second, 0.2)  # not written: the caller withholds
            assert await log.durable(first, 0)  # what was written stays durable
            waiting = asyncio.create_task(log.durable(second, 10))
            await asyncio.sleep(0)  # it waits (not a time: one loop round)
            assert not waiting.done()
        log.record("recording_fetch", who="o", file="c.mp4")  # wakes the writer at once
        assert await waiting
        assert not log._waiters  # nobody is left waiting
    assert [json.loads(line)["file"] for line in path.read_text().splitlines()] == [
        "a.mp4", "b.mp4", "c.mp4"
    ]  # fmt: skip
    assert log.record("after_close", who="o") == 0  # written at once: nothing to wait for
    assert await log.durable(0, 0)


def test_an_entry_recorded_while_the_log_closes_is_written(tmp_path: Path) -> None:
    """Between the writer thread's end and close() returning, an entry was queued for a
    writer that had gone, and never written (found by a review)."""
    path = tmp_path / "access.log"
    log = AccessLog(path).start()
    writer = log._thread
    assert writer is not None
    with log._cond:  # what close() does first
        log._closing = True
        log._cond.notify_all()
    writer.join(10)
    log.record("live_close", who="o")  # close() has not returned yet
    log.close()
    assert verify_file(path).entries == 1


def test_unserialisable_fields_are_the_callers_error(tmp_path: Path) -> None:
    with AccessLog(tmp_path / "access.log") as log, pytest.raises(TypeError):
        log.record("x", who="o", thing=object())


def test_cli_access_verify(tmp_path: Path) -> None:
    data = tmp_path / "rx"
    data.mkdir()
    lines = write(data / "access.log", 3)
    ok = subprocess.run([*CLI, "receiver", "access", "verify", "--data", str(data)],
                        capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert ok.returncode == 0
    assert ok.stdout.strip() == f"OK: 3 entries, chain intact; head {json.loads(lines[2])['hash']}"
    (data / "access.log").write_bytes(lines[0] + lines[2])
    bad = subprocess.run([*CLI, "receiver", "access", "verify", "--data", str(data)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 1
    assert f"{data / 'access.log'}:2: entry number 3, expected 2" in bad.stdout
    assert "FAIL" in bad.stdout
