"""Forged and hostile audit trails and access logs, as a review found them: JSON lines put
between a signed trail's entries (taken for torn writes, then reported), an unsigned tail
reported like signed facts, hostile JSON that crashed the district's tools, and trails of
many bad lines that cost 130 MB of memory per MB."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from agent.audit import MAX_LISTED, AuditChain, AuditLog, canonical_json, verify_trail
from breakglass.audit_cli import read_trail
from provisioning.keys import load_public_key, new_private_key, public_pem
from receiver.access_log import AccessLog, verify_lines
from tests.test_audit_cli import SUPER, T0, Trail, run, write_access_log, write_trail


@pytest.fixture
def trail(tmp_path: Path) -> Trail:
    key = new_private_key(tmp_path / "device.key")
    pub = tmp_path / "device.pub"
    pub.write_bytes(public_pem(key.public_key()))
    path = tmp_path / "audit.log"
    write_trail(path, key)  # 16 entries: checkpoints at 9 and 16
    return Trail(path, pub, key)


def json_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def chained(path: Path, event: str, **fields: object) -> bytes:
    """The entry after the file's last one, as anyone can compute it (no key needed)."""
    last = json.loads(path.read_bytes().splitlines()[-1])
    return AuditChain(last["n"], last["hash"]).entry(last["t"] + 1, event, fields)


# -- 1. a line that parses as a JSON object is no torn write --------------------------------


def test_json_objects_put_into_a_signed_trail_are_errors_and_never_reported(
    trail: Trail, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = tmp_path / "receiver-copy.log"
    shutil.copy(trail.path, reference)
    lines = trail.path.read_bytes().splitlines(keepends=True)
    start = {
        "event": "session_start",
        "session": "s-1",
        "building": "north-high",
        "by": {**SUPER, "reason": "FORGED"},
        "cameras": ["locker-room"],
        "t": T0 + 1,
    }
    end = {"event": "session_end", "session": "s-1", "reason": "FORGED", "by": None, "t": T0}
    trail.path.write_bytes(
        b"".join([*lines[:2], json_line(start), *lines[2:5], json_line(end), *lines[5:]])
    )
    args = ("--device-key", trail.pub)
    code, out, _ = run(capsys, "verify", trail.path, *args, "--reference", reference)
    assert code == 1  # it was "intact", with three warnings of torn entries
    inserted = "inserted line: a whole JSON object but no audit entry"
    assert out.splitlines()[:2] == [
        f"{trail.path}:3: entry 3: {inserted} (it lacks a valid n, t, event, prev or hash); "
        "a write cut short never leaves one",
        f"{trail.path}:7: entry 6: {inserted} (it lacks a valid n, t, event, prev or hash); "
        "a write cut short never leaves one",
    ]
    assert "NOT intact: 2 errors" in out
    code, out, err = run(capsys, "report", trail.path, *args)
    assert (code, out) == (1, "")
    assert "refusing to report from it" in err
    code, out, err = run(capsys, "report", trail.path)  # unverified: entries only
    assert code == 0
    assert "FORGED" not in out
    assert "locker-room" not in out
    assert "2 lines of" in err


def test_a_torn_write_is_still_a_warning_and_the_report_holds_only_whole_entries(
    trail: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    data = trail.path.read_bytes()
    cut = chained(trail.path, "session_start", session="s-3", building="north-high",
                  by=SUPER, cameras=["gym"], expires_at=T0 + 9000)  # fmt: skip
    trail.path.write_bytes(data + cut[:-40])  # a power cut in the middle of the write
    ticks = count()
    audit = AuditLog(trail.path, lambda: T0 + 50 + next(ticks), signer=trail.key)
    try:  # the agent starts again: the chain goes on from entry 16, on a line of its own
        audit.record("button_press", button="btn-1", location="Room 114", session="s-4",
                     started=True)  # fmt: skip
    finally:
        audit.close()
    code, out, err = run(capsys, "report", trail.path, "--device-key", trail.pub)
    assert code == 0, err
    assert err == (
        f"{trail.path}:17: entry 17: warning: torn entry (a write cut short, e.g. by a power "
        "cut); the chain continues after it with nothing missing\n"
    )
    assert "s-3" not in out  # never written whole
    assert "session s-4, building null" in out
    assert "NOT SIGNED" not in out


# -- 2. the unsigned tail ---------------------------------------------------------------------


def test_the_report_tells_signed_facts_from_the_unsigned_tail(
    trail: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = chained(trail.path, "session_extend", session="s-1", expires_at=T0 + 86400 * 30,
                     by={**SUPER, "reason": "FORGED"})  # fmt: skip
    with trail.path.open("ab") as fh:
        fh.write(forged)
    forged = chained(trail.path, "disclosure", session="s-1", receiver="wss://FORGED.example",
                     device="pi-north-1", cameras=[{"id": "gym", "zone": "interior"}])  # fmt: skip
    with trail.path.open("ab") as fh:
        fh.write(forged)
    args = ("--device-key", trail.pub)
    code, out, _ = run(capsys, "verify", trail.path, *args)
    assert code == 0  # a warning: the agent may be running
    code, out, _ = run(capsys, "report", trail.path, *args)
    assert code == 0
    signed, unsigned = out.split("\nNOT SIGNED: ")
    assert "FORGED" not in signed
    assert "gym" not in signed
    assert unsigned.splitlines() == [
        "entries 17..18 follow the last signed checkpoint (entry 16). The device has not "
        "signed them, so anyone able to write the file could have made them; what they say "
        "is not part of the records above:",
        "",
        "session s-1: NOT SIGNED",
        "  extended:     2026-11-28T10:00:16Z until 2026-12-28T10:00:00Z, by signed trigger, "
        'key a1b2c3d4e5f60718 (superintendent), reason "FORGED"',
        "  disclosed to: receiver wss://FORGED.example as device pi-north-1, "
        "from 2026-11-28T10:00:17Z",
        "  cameras disclosed: gym (interior)",
    ]
    code, out, _ = run(capsys, "report", trail.path, *args, "--json")
    records = json.loads(out)
    assert [(r["session"], r["signed"]) for r in records] == [
        ("s-1", True),
        ("s-2", True),
        ("s-1", False),
    ]
    assert [e["by"]["reason"] for e in records[0]["extensions"]] == ["ongoing"]
    assert [e["by"]["reason"] for e in records[2]["extensions"]] == ["FORGED"]


def test_a_running_agents_unsigned_session_is_labelled(
    trail: Trail, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ticks = count()
    audit = AuditLog(trail.path, lambda: T0 + 100 + next(ticks), signer=trail.key)
    try:  # opening signs nothing new (entry 16 is a checkpoint); the session is not signed yet
        audit.record("session_start", session="s-5", building="north-high", by=SUPER,
                     cameras=["front-door"], expires_at=T0 + 3700)  # fmt: skip
        running = tmp_path / "running.log"
        shutil.copy(trail.path, running)
    finally:
        audit.close()
    code, out, _ = run(capsys, "report", running, "--device-key", trail.pub)
    assert code == 0
    head, tail = out.split("\nNOT SIGNED: ")
    assert head.startswith(f"FERPA 34 CFR 99.32(a)(5) disclosure records in {running}: 2 ")
    assert "s-5" not in head
    assert tail.startswith("entries 17..17 follow the last signed checkpoint (entry 16).")
    assert "session s-5, building north-high: NOT SIGNED" in tail
    assert "viewed by:    see the receiver's access log (--access-log)" in tail
    code, out, _ = run(capsys, "report", trail.path, "--device-key", trail.pub)  # closed
    assert "NOT SIGNED" not in out
    assert "session s-5, building north-high" in out


# -- 3. hostile JSON ------------------------------------------------------------------------


def test_hostile_access_log_lines_are_named_not_raised(
    trail: Trail, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    access = tmp_path / "access.log"
    write_access_log(access)
    genuine = access.read_bytes()
    nan = b'{"hash":"x","n":7,"prev":"y","v":NaN}\n'
    nested = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    for label, line in (("nan", nan), ("nested", nested)):
        access.write_bytes(genuine + line)
        result = verify_lines(access.read_bytes().splitlines(keepends=True))
        why = "NaN is not JSON" if label == "nan" else "nested too deeply"
        assert result.errors == [(7, f"not a JSON entry ({why})")], label
        code, out, err = run(capsys, "report", trail.path, "--access-log", access)
        assert (code, out) == (1, ""), label
        assert f"{access}:7: not a JSON entry ({why})" in err
        assert "the access log's chain is broken; refusing it" in err


def test_deeply_nested_and_nan_values_of_a_valid_entry_are_reported_safely(
    trail: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    deep: object = "bottom"
    for _ in range(600):
        deep = [deep]
    forged = chained(trail.path, "session_extend", session="s-2", by={"kind": deep},
                     expires_at=float("nan"))  # fmt: skip
    with trail.path.open("ab") as fh:
        fh.write(forged)

    def strict(name: str) -> object:
        raise ValueError(name)

    for args in ((), ("--device-key", trail.pub)):
        code, out, err = run(capsys, "report", trail.path, "--json", *args)
        assert code == 0, err
        records = json.loads(out, parse_constant=strict)  # valid JSON: no NaN
        [extension] = records[-1]["extensions"]
        assert extension["expires_at"] == "nan"
        depth, value = 0, extension["by"]["kind"]
        while isinstance(value, list):
            depth, value = depth + 1, value[0]
        assert value == "(nested too deeply)"
        assert depth < 20
        code, out, err = run(capsys, "report", trail.path, *args)
        assert code == 0, err
        assert "(time nan)" in out


# -- 4. memory and output do not grow with the number of bad lines --------------------------


def test_many_bad_lines_cost_neither_memory_nor_output(
    trail: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = 100_000
    with trail.path.open("ab") as fh:
        fh.write(b"x\n" * bad)
    key = load_public_key(trail.pub)
    tracemalloc.start()
    try:
        report = verify_trail(read_trail(trail.path), key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The file is 200 kB, read a MiB at a time. A finding per line was some 30 MB, and
    # reading was read(256 MiB + 1), which sets all of that aside.
    assert peak < 2_000_000, peak
    assert report.error_count == bad
    assert len(report.problems) == MAX_LISTED + 1
    summary = report.problems[-1]
    assert (summary.line, summary.unlisted) == (17 + MAX_LISTED, bad - MAX_LISTED)
    assert summary.what == (
        f"{bad - MAX_LISTED} more lines that are not audit entries "
        f"(lines {17 + MAX_LISTED}..{16 + bad}), not listed one by one"
    )
    code, out, _ = run(capsys, "verify", trail.path, "--device-key", trail.pub)
    assert code == 1
    assert len(out.splitlines()) == MAX_LISTED + 2
    assert f"NOT intact: {bad} errors, the first at {trail.path}:17:" in out


def test_an_access_log_of_many_bad_lines_lists_a_few(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with AccessLog(path, clock=lambda: T0) as log:
        log.record("login", who="diaz", role="officer")
    lines = [*path.read_bytes().splitlines(keepends=True), *[b"x\n"] * 10_000]
    result = verify_lines(lines)
    assert not result.ok
    assert len(result.errors) == 101
    assert result.unlisted == 9_900
    assert result.errors[-1] == (
        102,
        "9900 more problems, not listed one by one (lines 102..10001)",
    )


def test_canonical_entries_round_trip() -> None:
    """The premise of telling a torn write from an inserted line: no proper prefix of a
    canonical entry line parses as JSON."""
    line = AuditChain().entry(T0, "session_end", {"session": "s-1", "reason": "x", "by": None})
    assert line == canonical_json(json.loads(line)) + b"\n"
    for cut in range(1, len(line) - 1):
        with pytest.raises(json.JSONDecodeError):
            json.loads(line[:cut])
