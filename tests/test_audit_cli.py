"""``breakglass audit verify`` and ``breakglass audit report`` as the district runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import AuditLog
from breakglass import audit_cli
from breakglass.cli import main
from provisioning.keys import kid, new_private_key, public_pem
from receiver.access_log import AccessLog

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_795_860_000.0  # 2026-11-28T10:00:00Z


@dataclass
class Trail:
    path: Path
    pub: Path
    key: Ed25519PrivateKey


BUTTON = {"kind": "button", "button_id": "btn-1", "location": "Room 114"}
SUPER = {
    "kind": "trigger",
    "kid": "a1b2c3d4e5f60718",
    "role": "superintendent",
    "reason": "ongoing",
}
DISPATCH = {"kind": "trigger", "kid": "0f1e2d3c4b5a6978", "role": "dispatch", "reason": "all clear"}
CAMERAS = [{"id": "front-door", "zone": "exterior"}, {"id": "hallway-2", "zone": "interior"}]


def write_trail(path: Path, key: Ed25519PrivateKey, location: str = "Room 114") -> None:
    """Two emergencies as the daemon records them, and some other events."""
    ticks = count()  # one second per entry, checkpoints (after entry 8, on close) included
    audit = AuditLog(path, lambda: T0 + next(ticks), signer=key, checkpoint_every=8)
    rec = audit.record
    try:
        rec("button_press", button="btn-1", location=location, session="s-1", started=True)
        rec(
            "session_start",
            session="s-1",
            building="north-high",
            by={**BUTTON, "location": location},
            cameras=["front-door", "hallway-2"],
            expires_at=T0 + 3600,
        )
        rec("disclosure", session="s-1", receiver="https://rx.example:8443", device="pi-north-1",
            cameras=CAMERAS)  # fmt: skip
        rec("button_press", button="btn-2", location="Gym", session="s-1", started=False)
        rec("disclosure", session="s-1", receiver="https://rx.example:8443", device="pi-north-1",
            cameras=CAMERAS[1:])  # fmt: skip
        rec("camera_fault", camera="hallway-2", error="timeout")
        rec("trigger", result="accepted", code=None, kid=SUPER["kid"], role="superintendent",
            action="extend", via="uplink", reason="ongoing", session="s-1", detail="")  # fmt: skip
        rec("session_extend", session="s-1", by=SUPER, expires_at=T0 + 7200)
        rec("camera_recovered", camera="hallway-2")
        rec("session_end", session="s-1", reason="trigger", by=DISPATCH)
        rec("trigger", result="rejected", code="bad_signature", kid=None, role=None,
            action=None, via="local_api", reason=None, session=None, detail="bad sig")  # fmt: skip
        by = {**DISPATCH, "reason": "911 call: intruder reported"}
        rec("session_start", session="s-2", building="north-high", by=by,
            cameras=["front-door"], expires_at=T0 + 4000)  # fmt: skip
        rec("disclosure", session="s-2", receiver="https://rx.example:8443", device="pi-north-1",
            cameras=CAMERAS[:1])  # fmt: skip
        rec("session_end", session="s-2", reason="expired", by=None)
    finally:
        audit.close()


@pytest.fixture
def trail(tmp_path: Path) -> Trail:
    key = new_private_key(tmp_path / "device.key")
    pub = tmp_path / "device.pub"
    pub.write_bytes(public_pem(key.public_key()))
    path = tmp_path / "audit.log"
    write_trail(path, key)
    return Trail(path, pub, key)


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["audit", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_an_intact_trail(trail: Trail, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "verify", trail.path, "--device-key", trail.pub)
    assert (code, err) == (0, "")
    head = json.loads(trail.path.read_bytes().splitlines()[-1])["hash"]
    assert out == (
        f"{trail.path}: intact: 16 entries, 2 signed checkpoints (device key "
        f"{kid(trail.key.public_key())}), signed through entry 16, head {head}\n"
    )


def test_verify_names_file_line_and_entry_of_each_problem(
    trail: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = trail.path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"Room 114", b"Room 115")
    del lines[5]
    trail.path.write_bytes(b"".join(lines))
    code, out, _ = run(capsys, "verify", trail.path, "--device-key", trail.pub)
    assert code == 1
    assert out.splitlines() == [
        f"{trail.path}:2: entry 2: entry altered: its hash does not match its content",
        f"{trail.path}:6: entry 7: chain broken: entry 6 is missing (deleted or moved)",
        f"{trail.path}: NOT intact: 2 errors, the first at {trail.path}:2: entry 2: "
        "entry altered: its hash does not match its content",
    ]


def test_verify_against_a_reference_copy(
    trail: Trail, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "receiver-copy.log"
    copy.write_bytes(trail.path.read_bytes())
    code, _, _ = run(capsys, "verify", trail.path, "--device-key", trail.pub, "--reference", copy)
    assert code == 0
    lines = trail.path.read_bytes().splitlines(keepends=True)
    trail.path.write_bytes(b"".join(lines[:9]))  # whole entries cut off after a checkpoint
    code, out, _ = run(capsys, "verify", trail.path, "--device-key", trail.pub)
    assert code == 0  # alone it looks whole
    code, out, _ = run(capsys, "verify", trail.path, "--device-key", trail.pub, "--reference", copy)
    assert code == 1
    assert out.splitlines()[0] == (
        f"{trail.path}:9: entry 9: truncated after entry 9: the reference copy continues "
        "with entries 10..16 (from its line 10)"
    )


def test_verify_warns_of_an_unsigned_tail_and_a_torn_last_line_fails(
    trail: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    data = trail.path.read_bytes()
    last = data.splitlines(keepends=True)[-1]
    trail.path.write_bytes(data[: -len(last)])  # the agent is running: no closing checkpoint
    code, out, _ = run(capsys, "verify", trail.path, "--device-key", trail.pub)
    assert code == 0
    warning, summary = out.splitlines()
    assert warning.startswith(f"{trail.path}:10: entry 10: warning: entries 10..15 follow")
    assert "intact: 15 entries, 1 signed checkpoint (device key" in summary
    trail.path.write_bytes(data[: -len(last) // 2])
    code, out, _ = run(capsys, "verify", trail.path, "--device-key", trail.pub)
    assert code == 1
    assert f"{trail.path}:16: entry 16: cut off mid-entry" in out


def test_verify_with_another_key_fails(
    trail: Trail, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pub"
    other.write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    code, out, _ = run(capsys, "verify", trail.path, "--device-key", other)
    assert code == 1
    warning, first, *_ = out.splitlines()
    assert warning.startswith(f"{trail.path}:1: entry 1: warning: no signed checkpoint")
    assert first.startswith(f"{trail.path}:9: entry 9: checkpoint signed by key")
    assert f"NOT intact: 2 errors, the first at {trail.path}:9: entry 9:" in out


def test_unreadable_input_exits_2(
    trail: Trail,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = tmp_path / "nope.log"
    code, out, err = run(capsys, "verify", missing, "--device-key", trail.pub)
    assert (code, out) == (2, "")
    assert (
        err
        == f"breakglass: error: audit trail {missing}: cannot read (No such file or directory)\n"
    )
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key")
    code, _, err = run(capsys, "verify", trail.path, "--device-key", bad_key)
    assert code == 2
    assert "not a PEM public key" in err
    code, _, err = run(
        capsys, "verify", trail.path, "--device-key", trail.pub, "--reference", missing
    )
    assert code == 2
    assert f"reference {missing}: cannot read" in err
    monkeypatch.setattr(audit_cli, "MAX_TRAIL_BYTES", 1000)
    for command in (["verify", trail.path, "--device-key", trail.pub], ["report", trail.path]):
        code, _, err = run(capsys, *command)
        assert code == 2
        assert f"audit trail {trail.path}: larger than 1000 bytes" in err


def test_report_prints_each_session_disclosure_record(
    trail: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "report", trail.path, "--device-key", trail.pub)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"FERPA 34 CFR 99.32(a)(5) disclosure records in {trail.path}: 2 emergency sessions",
        "",
        "session s-1, building north-high",
        '  threat:       panic button btn-1 at "Room 114"',
        "  started:      2026-11-28T10:00:01Z, cameras front-door, hallway-2, "
        "expires 2026-11-28T11:00:00Z",
        '  pressed:      2026-11-28T10:00:00Z button btn-1 at "Room 114"',
        '  pressed:      2026-11-28T10:00:03Z button btn-2 at "Gym"',
        "  extended:     2026-11-28T10:00:07Z until 2026-11-28T12:00:00Z, by signed trigger, "
        'key a1b2c3d4e5f60718 (superintendent), reason "ongoing"',
        "  ended:        2026-11-28T10:00:10Z (trigger), by signed trigger, "
        'key 0f1e2d3c4b5a6978 (dispatch), reason "all clear"',
        "  disclosed to: receiver https://rx.example:8443 as device pi-north-1, "
        "from 2026-11-28T10:00:02Z",
        "  viewed by:    see the receiver's access log (--access-log)",
        "  cameras disclosed: front-door (exterior), hallway-2 (interior)",
        "",
        "session s-2, building north-high",
        "  threat:       signed trigger, key 0f1e2d3c4b5a6978 (dispatch), "
        'reason "911 call: intruder reported"',
        "  started:      2026-11-28T10:00:12Z, cameras front-door, expires 2026-11-28T11:06:40Z",
        "  ended:        2026-11-28T10:00:14Z (expired)",
        "  disclosed to: receiver https://rx.example:8443 as device pi-north-1, "
        "from 2026-11-28T10:00:13Z",
        "  viewed by:    see the receiver's access log (--access-log)",
        "  cameras disclosed: front-door (exterior)",
    ]


def test_report_as_json(trail: Trail, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "report", trail.path, "--json")
    assert code == 0
    assert "not verified" in err
    first, second = json.loads(out)
    assert first["session"] == "s-1"
    assert first["threat"] == BUTTON
    assert first["started"] == T0 + 1
    assert [e["by"] for e in first["extensions"]] == [SUPER]
    assert first["ended"] == {"t": T0 + 10, "reason": "trigger", "by": DISPATCH}
    assert first["recipients"] == [
        {"t": T0 + 2, "receiver": "https://rx.example:8443", "device": "pi-north-1"}
    ]
    assert first["viewers"] == []  # the officers are in the receiver's access log
    assert first["disclosed"] == CAMERAS
    assert second["threat"]["reason"] == "911 call: intruder reported"
    assert second["ended"]["by"] is None


def test_report_refuses_a_trail_that_fails_verification(
    trail: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    data = trail.path.read_bytes()
    trail.path.write_bytes(data.replace(b"Room 114", b"Room 999", 1))
    code, out, err = run(capsys, "report", trail.path, "--device-key", trail.pub)
    assert (code, out) == (1, "")
    assert f"{trail.path}:1: entry 1: entry altered" in err
    assert "fails verification; refusing to report from it" in err
    code, out, _ = run(capsys, "report", trail.path)  # unverified, on request
    assert code == 0
    assert "Room 999" in out


def write_access_log(path: Path, *, live: bool = True) -> None:
    """What a receiver logs while officers watch s-1 (and another building's s-9)."""
    ticks = count()
    log = AccessLog(path, clock=lambda: T0 + 20 + next(ticks))  # not started: writes at once
    officer = {"who": "diaz", "role": "officer", "login": "h-1", "remote": "10.0.0.7"}
    log.record("login", **officer)
    if live:
        log.record("live_open", session="s-1", camera="hallway-2", **officer)
    log.record("live_close", session="s-1", camera="hallway-2", duration_s=40.0, **officer)
    log.record("live_open", session="s-9", camera="gym", **officer)  # not this device's
    admin = {"who": "kim", "role": "admin", "login": "h-2", "remote": "10.0.0.9"}
    log.record("recording_playlist", session="s-1", camera="front-door", **admin)
    log.record("evidence_export", session="s-1", file="s-1.zip", sha256="ab" * 32, **admin)


def test_report_lists_who_viewed_each_session_from_the_access_log(
    trail: Trail, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    access = tmp_path / "access.log"
    write_access_log(access)
    code, out, err = run(
        capsys, "report", trail.path, "--device-key", trail.pub, "--access-log", access
    )
    assert code == 0, err
    assert "chain intact (6 entries" in err
    assert "3 views of these sessions" in err
    views = [line for line in out.splitlines() if "viewed by" in line]
    assert views == [
        "  viewed by:    diaz (officer), live_open camera hallway-2, 2026-11-28T10:00:21Z",
        "  viewed by:    kim (admin), recording_playlist camera front-door, 2026-11-28T10:00:24Z",
        "  viewed by:    kim (admin), evidence_export, 2026-11-28T10:00:25Z",
        "  viewed by:    nobody, in the access log given",  # s-2
    ]
    code, out, _ = run(capsys, "report", trail.path, "--access-log", access, "--json")
    first = json.loads(out)[0]
    assert first["viewers"][0] == {
        "t": T0 + 21,
        "who": "diaz",
        "role": "officer",
        "action": "live_open",
        "camera": "hallway-2",
    }


def test_report_refuses_an_access_log_whose_chain_is_broken(
    trail: Trail, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    access = tmp_path / "access.log"
    write_access_log(access)
    lines = access.read_bytes().splitlines(keepends=True)
    del lines[4]  # a view taken out of the log
    access.write_bytes(b"".join(lines))
    code, out, err = run(capsys, "report", trail.path, "--access-log", access)
    assert (code, out) == (1, "")
    assert f"{access}:5: entry 6 does not follow the one before" in err
    assert "the access log's chain is broken; refusing it" in err
    code, _, err = run(capsys, "report", trail.path, "--access-log", tmp_path / "nothing.log")
    assert code == 2
    assert "access log" in err


def test_report_checks_the_access_log_against_the_heads_the_device_anchored(
    trail: Trail, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    access = tmp_path / "access.log"
    write_access_log(access)
    head4 = json.loads(access.read_bytes().splitlines()[3])["hash"]
    ticks = count()  # the agent running on, told the head by its receiver
    audit = AuditLog(trail.path, lambda: T0 + 100 + next(ticks), signer=trail.key)
    try:
        rx = "https://rx.example:8443"
        audit.record("receiver_access_head", receiver=rx, entry=4, head=head4)
    finally:
        audit.close()
    args = ("report", trail.path, "--device-key", trail.pub, "--access-log")
    code, _, err = run(capsys, *args, access)
    assert code == 0, err
    assert "anchored it through entry 4 at 2026-11-28T10:01:40Z; 2 entries after" in err
    # Written again without the officer's live view: a sound chain, but not the anchored one.
    rewritten = tmp_path / "rewritten.log"
    write_access_log(rewritten, live=False)
    code, out, err = run(capsys, *args, rewritten)
    assert (code, out) == (1, "")
    assert "entry 4 is not the one the device anchored at 2026-11-28T10:01:40Z" in err
    assert "not the log the device anchored; refusing it" in err
    cut = tmp_path / "cut.log"
    cut.write_bytes(b"".join(access.read_bytes().splitlines(keepends=True)[:3]))
    code, out, err = run(capsys, *args, cut)
    assert (code, out) == (1, "")
    assert "no entry 4, which the device anchored at 2026-11-28T10:01:40Z: the log was cut" in err


def test_report_escapes_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = new_private_key(tmp_path / "device.key")
    write_trail(tmp_path / "audit.log", key, location="\x1b[2JRoom\n114")
    code, out, _ = run(capsys, "report", tmp_path / "audit.log")
    assert code == 0
    assert "\x1b" not in out
    assert 'panic button btn-1 at "\\x1b[2JRoom\\n114"' in out


def test_the_installed_command(trail: Trail) -> None:
    command = [sys.executable, "-m", "breakglass", "audit"]
    ok = subprocess.run(
        [*command, "verify", str(trail.path), "--device-key", str(trail.pub)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ": intact: 16 entries" in ok.stdout
    trail.path.write_bytes(trail.path.read_bytes().replace(b"pi-north-1", b"pi-south-9", 1))
    bad = subprocess.run(
        [*command, "report", str(trail.path), "--device-key", str(trail.pub)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (bad.returncode, bad.stdout) == (1, "")
    assert f"{trail.path}:3: entry 3: entry altered" in bad.stderr


def test_report_dates_late_entries_when_they_happened_and_lists_resumes_and_link_fetches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An entry the card could not take at once (written later, ``happened_at``) is dated
    when it happened; a resume after a reboot is in the record (``session_resumed``); a
    part file fetched through a player link is a view (it was not listed: only the
    link's playlist was)."""
    key = new_private_key(tmp_path / "device.key")
    pub = tmp_path / "device.pub"
    pub.write_bytes(public_pem(key.public_key()))
    path = tmp_path / "audit.log"
    ticks = count()
    audit = AuditLog(path, lambda: T0 + 100 + next(ticks), signer=key)
    try:
        audit.record("session_start", session="s-3", building="north-high", by=BUTTON,
                     cameras=["hallway-2"], expires_at=T0 + 3600, happened_at=T0)  # fmt: skip
        audit.record("session_resumed", session="s-3", reboot=True, why="clock_behind",
                     left_s=600.0, wall_left_s=-5.0, most_s=2600.0)  # fmt: skip
    finally:
        audit.close()
    access = tmp_path / "access.log"
    AccessLog(access, clock=lambda: T0 + 50).record(
        "player_link_fetch", who="diaz", role="officer", session="s-3", camera="hallway-2",
        remote="10.0.0.7", link="ab" * 8, file="hallway-2.0.mp4",
    )  # fmt: skip
    code, out, err = run(capsys, "report", path, "--device-key", pub, "--access-log", access)
    assert code == 0, err
    lines = out.splitlines()
    assert "  started:      2026-11-28T10:00:00Z, cameras hallway-2, " in "\n".join(lines)
    assert "  resumed:      2026-11-28T10:01:41Z after a reboot, 600.0 s left (clock_behind)" in (
        lines
    )
    assert (
        "  viewed by:    diaz (officer), player_link_fetch camera hallway-2, 2026-11-28T10:00:50Z"
        in lines
    )
