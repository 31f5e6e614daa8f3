"""The hash-chained audit trail: verification, tampering, torn lines, threads, file mode."""

from __future__ import annotations

import json
import stat
import threading
from itertools import count
from pathlib import Path

import pytest

from agent.audit import GENESIS, AuditChain, AuditLog, verify_chain


def clock() -> float:
    return 1_767_000_000.0


def trail(path: Path, events: int) -> list[bytes]:
    """A trail of ``events`` entries at ``path``; returns its lines."""
    audit = AuditLog(path, clock)
    try:
        for i in range(events):
            audit.record("camera_fault", camera=f"cam-{i}", reason="test", n_try=i)
    finally:
        audit.close()
    return path.read_bytes().splitlines()


def test_chain_verifies(tmp_path: Path) -> None:
    lines = trail(tmp_path / "audit.jsonl", 5)
    entries, head = verify_chain(lines)
    assert entries == 5
    last = json.loads(lines[-1])
    assert head == last["hash"]
    first = json.loads(lines[0])
    assert (first["n"], first["prev"], first["event"], first["camera"]) == (
        1,
        GENESIS,
        "camera_fault",
        "cam-0",
    )
    assert verify_chain([]) == (0, GENESIS)


def test_sans_io_chain_matches_the_file(tmp_path: Path) -> None:
    lines = trail(tmp_path / "audit.jsonl", 2)
    chain = AuditChain()
    for i, line in enumerate(lines):
        assert (
            chain.entry(
                clock(), "camera_fault", {"camera": f"cam-{i}", "reason": "test", "n_try": i}
            )
            == line + b"\n"
        )


def test_edit_is_detected_with_the_line_number(tmp_path: Path) -> None:
    lines = trail(tmp_path / "audit.jsonl", 5)
    obj = json.loads(lines[2])
    obj["camera"] = "someone-else"
    edited = [*lines[:2], json.dumps(obj).encode(), *lines[3:]]
    with pytest.raises(ValueError, match="audit line 3: entry altered"):
        verify_chain(edited)


def test_edit_with_a_recomputed_hash_breaks_the_next_line(tmp_path: Path) -> None:
    lines = trail(tmp_path / "audit.jsonl", 5)
    obj = json.loads(lines[1])
    obj.pop("hash")
    obj["reason"] = "nothing happened"
    forged = AuditChain(1, json.loads(lines[0])["hash"]).entry(
        obj.pop("t"), obj.pop("event"), {k: v for k, v in obj.items() if k not in ("n", "prev")}
    )
    with pytest.raises(ValueError, match="audit line 3: chain broken"):
        verify_chain([lines[0], forged.rstrip(b"\n"), *lines[2:]])


def test_removal_is_detected_with_the_line_number(tmp_path: Path) -> None:
    lines = trail(tmp_path / "audit.jsonl", 5)
    with pytest.raises(ValueError, match="audit line 2: chain broken"):
        verify_chain([lines[0], *lines[2:]])
    with pytest.raises(ValueError, match="audit line 1: chain broken"):
        verify_chain(lines[1:])


def test_reordering_is_detected_with_the_line_number(tmp_path: Path) -> None:
    lines = trail(tmp_path / "audit.jsonl", 5)
    with pytest.raises(ValueError, match="audit line 4: chain broken"):
        verify_chain([*lines[:3], lines[4], lines[3]])


@pytest.mark.parametrize("junk", [b"", b"not json", b"[1, 2]", b"42", b'{"n": 2}'])
def test_junk_lines_are_named(tmp_path: Path, junk: bytes) -> None:
    lines = trail(tmp_path / "audit.jsonl", 3)
    with pytest.raises(ValueError, match="audit line 2: not an audit entry"):
        verify_chain([lines[0], junk, *lines[1:]])


def test_torn_last_line_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = trail(path, 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])  # a power cut in the middle of the third entry

    audit = AuditLog(path, clock)
    try:
        audit.record("agent_started", boot_id="b2")
        audit.record("segment_torn", camera="cam", file="x.age", reason="test")
    finally:
        audit.close()

    after = path.read_bytes().splitlines()
    assert after[:2] == lines[:2]
    assert after[2] == lines[2][:-24]  # the fragment stays, on a line of its own
    new = [json.loads(x) for x in after[3:]]
    assert [(e["n"], e["event"]) for e in new] == [(3, "agent_started"), (4, "segment_torn")]
    assert new[0]["prev"] == json.loads(lines[1])["hash"]
    with pytest.raises(ValueError, match="audit line 3: not an audit entry"):
        verify_chain(after)
    assert verify_chain([*after[:2], *after[3:]]) == (4, new[1]["hash"])


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail(path, 2)
    lines = trail(path, 2)
    assert verify_chain(lines)[0] == 4


def test_records_from_many_threads_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ticks = count()
    audit = AuditLog(path, lambda: 1_767_000_000.0 + next(ticks) / 1000)
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        start.wait()
        for j in range(25):
            audit.record("segment_lost", camera=f"cam-{i}", first_seq=j, last_seq=j)

    threads = [threading.Thread(target=worker, args=(i,), name=f"audit-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit.close()
    lines = path.read_bytes().splitlines()
    assert verify_chain(lines)[0] == 200
    seen = {(e["camera"], e["first_seq"]) for e in map(json.loads, lines)}
    assert len(seen) == 200


def test_file_mode_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"
    trail(path, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_oversize_entry_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, clock)
    try:
        audit.record("ok")
        audit.record("too_big", detail="x" * 20_000)
        audit.record("ok_again")
    finally:
        audit.close()
    assert "not written" in caplog.text
    lines = path.read_bytes().splitlines()
    assert verify_chain(lines)[0] == 2
    assert [json.loads(x)["event"] for x in lines] == ["ok", "ok_again"]


def test_record_soon_keeps_call_order_and_close_writes_it_all(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", clock=lambda: 0.0)
    for i in range(50):
        log.record_soon("camera_fault", i=i)
    log.close()  # waits for the queued entries
    lines = (tmp_path / "audit.log").read_bytes().splitlines()
    assert [json.loads(line)["i"] for line in lines] == list(range(50))
    assert verify_chain(lines)[0] == 50
