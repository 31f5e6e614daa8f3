"""The hash-chained audit trail: verification, tampering, torn lines, threads, file mode,
signed checkpoints and the district's verification of a whole trail."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
import subprocess
import threading
from itertools import count
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import audit as audit_module
from agent.audit import (
    CHECKPOINT_CONTEXT,
    GENESIS,
    MAX_LINE_BYTES,
    AuditChain,
    AuditLog,
    TrailReport,
    canonical_json,
    checkpoint_message,
    split_lines,
    verify_chain,
    verify_trail,
)
from provisioning.keys import kid, load_private_key, load_public_key, new_private_key, public_pem
from provisioning.keys import verify as verify_signature
from tests.cards import full_card


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


def test_an_event_cannot_carry_the_chains_own_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, clock)
    try:
        with pytest.raises(ValueError, match=r"cannot carry \['n'\]"):
            audit.record_soon("receiver_access_head", n=4, head="ab" * 32)  # the caller sees it
        audit.record("clash", hash="ab" * 32)  # record() never raises: logged, not written
        audit.record("ok")
    finally:
        audit.close()
    assert "not written" in caplog.text
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["ok"]
    assert verify_chain(lines)[0] == 1


def test_record_soon_keeps_call_order_and_close_writes_it_all(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", clock=lambda: 0.0)
    for i in range(50):
        log.record_soon("camera_fault", i=i)
    log.close()  # waits for the queued entries
    lines = (tmp_path / "audit.log").read_bytes().splitlines()
    assert [json.loads(line)["i"] for line in lines] == list(range(50))
    assert verify_chain(lines)[0] == 50


def test_flush_waits_for_what_record_soon_queued(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", clock=lambda: 0.0)
    for i in range(20):
        log.record_soon("camera_fault", i=i)
    log.flush()  # the trail stays open
    lines = (tmp_path / "audit.log").read_bytes().splitlines()
    assert [json.loads(line)["i"] for line in lines] == list(range(20))
    log.record_soon("camera_recovered")
    log.close()
    assert len((tmp_path / "audit.log").read_bytes().splitlines()) == 21


# -- signed checkpoints -------------------------------------------------------------------


@pytest.fixture
def device(tmp_path: Path) -> Ed25519PrivateKey:
    return new_private_key(tmp_path / "keys" / "device.key")


def signed_trail(
    path: Path, key: Ed25519PrivateKey, events: int, every: int = 4, *, running: bool = False
) -> list[bytes]:
    """``events`` entries signed by ``key`` every ``every``; the file's lines (with their
    newlines) once closed, or, ``running``, as they were before the close."""
    ticks = count()
    audit = AuditLog(
        path, lambda: 1_767_000_000.0 + next(ticks), signer=key, checkpoint_every=every
    )
    try:
        for i in range(events):
            audit.record("camera_fault", camera=f"cam-{i}", reason="test")
        before_close = split_lines(path.read_bytes())
    finally:
        audit.close()
    return before_close if running else split_lines(path.read_bytes())


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_checkpoints_are_chain_entries_signed_by_the_device(
    tmp_path: Path, device: Ed25519PrivateKey
) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 10)
    entries = [json.loads(x) for x in lines]
    checkpoints = [e["n"] for e in entries if e["event"] == "checkpoint"]
    assert checkpoints == [5, 10, 13]  # after every 4 entries, and on close
    assert verify_chain(x.rstrip(b"\n") for x in lines)[0] == 13
    public = device.public_key()
    for e in entries:
        if e["event"] != "checkpoint":
            continue
        before = entries[e["n"] - 2]
        assert (e["covers"], e["head"], e["kid"]) == (before["n"], before["hash"], kid(public))
        assert e["head"] == e["prev"]
        message = CHECKPOINT_CONTEXT + (
            f'{{"covers":{e["covers"]},"head":"{e["head"]}","kid":"{e["kid"]}"}}'.encode()
        )
        assert message == checkpoint_message(e["covers"], e["head"], e["kid"])
        assert "=" not in e["sig"]
        assert verify_signature(public, unb64url(e["sig"]), message)


def test_keys_from_files_sign_and_verify(tmp_path: Path) -> None:
    new_private_key(tmp_path / "device.key")
    (tmp_path / "device.pub").write_bytes(
        public_pem(load_private_key(tmp_path / "device.key").public_key())
    )
    lines = signed_trail(tmp_path / "audit.log", load_private_key(tmp_path / "device.key"), 5)
    report = verify_trail(lines, load_public_key(tmp_path / "device.pub"))
    assert report.ok
    assert report.problems == ()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl(1)")
def test_openssl_made_key_signs_and_openssl_verifies_a_checkpoint(tmp_path: Path) -> None:
    key, pub = tmp_path / "k.pem", tmp_path / "pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
    key.chmod(0o600)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True)
    lines = signed_trail(tmp_path / "audit.log", load_private_key(key), 3)
    assert verify_trail(lines, load_public_key(pub)).ok
    last = json.loads(lines[-1])
    (tmp_path / "msg").write_bytes(checkpoint_message(last["covers"], last["head"], last["kid"]))
    (tmp_path / "sig").write_bytes(unb64url(last["sig"]))
    done = subprocess.run(
        [
            *("openssl", "pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin"),
            *("-in", tmp_path / "msg", "-sigfile", tmp_path / "sig"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Signature Verified Successfully" in done.stdout


def test_checkpoint_on_open_only_when_something_is_unsigned(
    tmp_path: Path, device: Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.log"
    AuditLog(path, clock, signer=device).close()
    assert path.read_bytes() == b""  # nothing to sign
    trail(path, 3)  # written by a log without a signer
    audit = AuditLog(path, clock, signer=device)
    try:
        entries = [json.loads(x) for x in path.read_bytes().splitlines()]
        assert [(e["n"], e["event"]) for e in entries][-1] == (4, "checkpoint")
        assert entries[-1]["covers"] == 3
        assert audit.checkpoint() is False  # never two in a row
        audit.record("agent_started")
        assert audit.head_n == 5
        assert audit.checkpoint() is True
        assert audit.checkpoint() is False
    finally:
        audit.close()
    before = path.read_bytes()
    AuditLog(path, clock, signer=device).close()
    assert path.read_bytes() == before  # it ended in a checkpoint: no new one
    report = verify_trail(split_lines(before), device.public_key())
    assert (report.entries, report.checkpoints, report.signed) == (6, 2, 6)
    # the three entries written without a signer are signed by the checkpoint after them
    assert report.problems == ()


def test_record_cannot_forge_a_checkpoint(
    tmp_path: Path, device: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path, clock, signer=device)
    try:
        audit.record("checkpoint", kid="x", covers=0, head=GENESIS, sig="")
        audit.record("ok")
    finally:
        audit.close()
    assert "not written" in caplog.text
    assert [json.loads(x)["event"] for x in path.read_bytes().splitlines()] == ["ok", "checkpoint"]
    with pytest.raises(ValueError, match="at least 1"):
        AuditLog(path, clock, signer=device, checkpoint_every=0)


def test_checkpoint_soon_runs_after_what_is_queued(
    tmp_path: Path, device: Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path, clock, signer=device, checkpoint_every=1000)
    for i in range(5):
        audit.record_soon("camera_fault", i=i)
    audit.checkpoint_soon()
    audit.close()
    events = [json.loads(x)["event"] for x in path.read_bytes().splitlines()]
    assert events == ["camera_fault"] * 5 + ["checkpoint"]  # close had nothing left to sign


# -- verification -------------------------------------------------------------------------


def only_error(report: TrailReport) -> tuple[int | None, int | None, str]:
    assert len(report.errors) == 1, report.problems
    p = report.errors[0]
    return p.line, p.entry, p.what


def test_intact_trail(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 10)
    report = verify_trail(lines, device.public_key())
    assert report.ok
    assert report.problems == ()
    assert report.first_error is None
    assert (report.entries, report.checkpoints, report.signed) == (13, 3, 13)
    assert report.head == json.loads(lines[-1])["hash"]
    assert verify_trail([], device.public_key()) == TrailReport(0, 0, 0, GENESIS, ())
    # lines without their newlines (bytes.splitlines()) verify the same
    assert verify_trail([x.rstrip(b"\n") for x in lines], device.public_key()) == report


def test_unsigned_tail_is_a_warning(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    running = signed_trail(tmp_path / "audit.log", device, 6, running=True)  # agent running
    report = verify_trail(running, device.public_key())
    assert report.ok
    assert report.signed == 5
    [warning] = report.warnings
    assert (warning.line, warning.entry) == (6, 6)
    assert "entries 6..7 follow the last signed checkpoint (entry 5)" in warning.what

    unsigned = split_lines(b"\n".join(trail(tmp_path / "plain.log", 3)) + b"\n")
    report = verify_trail(unsigned, device.public_key())
    assert report.ok
    assert [(w.line, w.what) for w in report.warnings] == [
        (1, "no signed checkpoint: entries 1..3 are not signed by the device")
    ]


@pytest.mark.parametrize("target", [2, 5], ids=["entry", "checkpoint"])
def test_every_flipped_byte_is_found_on_its_line(
    tmp_path: Path, device: Ed25519PrivateKey, target: int
) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 10)
    data = b"".join(lines)
    start = len(b"".join(lines[: target - 1]))
    for i in range(start, start + len(lines[target - 1])):  # its newline included
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        report = verify_trail(split_lines(bytes(flipped)), device.public_key())
        first = report.first_error
        assert first is not None, f"byte {i - start} of line {target} flipped unnoticed"
        assert first.line == target, (i - start, report.problems)


def test_an_edit_is_one_error_and_the_rest_still_checks(
    tmp_path: Path, device: Ed25519PrivateKey
) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 10)
    lines[1] = lines[1].replace(b"cam-1", b"cam-X")
    lines[7] = lines[7].replace(b"cam-6", b"cam-Y")
    report = verify_trail(lines, device.public_key())
    assert [(p.line, p.entry) for p in report.errors] == [(2, 2), (8, 8)]
    assert all("entry altered" in p.what for p in report.errors)
    assert report.first_error == report.errors[0]
    assert report.checkpoints == 3  # the signatures cover the hashes, which still chain


def test_an_edit_with_recomputed_hash_breaks_the_next_link(
    tmp_path: Path, device: Ed25519PrivateKey
) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 10)
    obj = json.loads(lines[1])
    forged = AuditChain(1, obj["prev"]).entry(
        obj["t"], obj["event"], {"camera": "cam-X", "reason": obj["reason"]}
    )
    report = verify_trail([lines[0], forged, *lines[2:]], device.public_key())
    line, entry, what = only_error(report)
    assert (line, entry) == (3, 3)
    assert what.startswith("chain broken: prev is not the hash of entry 2 (line 2)")


def test_deleted_entry(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 10)
    report = verify_trail([*lines[:2], *lines[3:]], device.public_key())
    assert only_error(report) == (3, 4, "chain broken: entry 3 is missing (deleted or moved)")
    report = verify_trail(lines[3:], device.public_key())
    assert only_error(report) == (1, 4, "chain broken: entries 1..3 are missing (deleted or moved)")


def test_swapped_entries(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 10)
    report = verify_trail([lines[0], lines[2], lines[1], *lines[3:]], device.public_key())
    assert [(p.line, p.entry) for p in report.errors] == [(2, 3), (3, 2)]
    assert report.errors[0].what == (
        "chain broken: entries out of order (entry 2 is on line 3, after entry 3)"
    )
    assert report.errors[1].what == "out of order: belongs before line 2"


def test_repeated_entry(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 10)
    report = verify_trail([*lines[:4], lines[2], *lines[4:]], device.public_key())
    assert only_error(report) == (5, 3, "out of order or repeated: comes after entry 4")


@pytest.mark.parametrize("cut", [1, 40, -2], ids=["first-byte", "middle", "before-newline"])
def test_file_truncated_mid_line(tmp_path: Path, device: Ed25519PrivateKey, cut: int) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 10)
    whole = b"".join(lines[:7])
    torn = whole + lines[7][:cut]
    report = verify_trail(split_lines(torn), device.public_key())
    line, entry, what = only_error(report)
    assert (line, entry) == (8, 8)
    assert what.startswith("cut off mid-entry")
    [warning] = report.warnings  # entries 6..7 after the checkpoint at 5
    assert (warning.line, warning.entry) == (6, 6)


def test_whole_entries_truncated_are_found_against_a_reference(
    tmp_path: Path, device: Ed25519PrivateKey
) -> None:
    full = signed_trail(tmp_path / "audit.log", device, 10)
    cut = full[:10]  # ends in the checkpoint at 10: on its own it looks whole
    assert verify_trail(cut, device.public_key()).problems == ()
    report = verify_trail(cut, device.public_key(), reference=full)
    assert only_error(report) == (
        10,
        10,
        "truncated after entry 10: the reference copy continues with entries 11..13 "
        "(from its line 11)",
    )
    # an older copy as the reference: the newer file holds all of it
    assert verify_trail(full, device.public_key(), reference=cut).problems == ()
    assert verify_trail(full, device.public_key(), reference=full).problems == ()
    # nothing at all
    report = verify_trail([], device.public_key(), reference=full)
    assert only_error(report)[2].startswith("truncated after entry 0")


def test_a_reference_that_diverges_is_an_error(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    ours = signed_trail(tmp_path / "a.log", device, 10)
    other = AuditLog(tmp_path / "b.log", clock, signer=device, checkpoint_every=4)
    try:
        other.record("camera_fault", camera="cam-0", reason="test")
        other.record("camera_fault", camera="elsewhere", reason="test")
    finally:
        other.close()
    reference = split_lines((tmp_path / "b.log").read_bytes())
    report = verify_trail(ours, device.public_key(), reference=reference)
    line, entry, what = only_error(report)
    assert (line, entry) == (2, 2)  # the first entries are the same
    assert what == (
        "differs from the reference copy (its line 2): the two trails diverge from here on"
    )


def test_a_broken_reference_is_reported_as_such(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    full = signed_trail(tmp_path / "audit.log", device, 10)
    report = verify_trail(full, device.public_key(), reference=[*full[:3], *full[4:]])
    [problem] = report.errors
    assert (problem.in_reference, problem.line, problem.entry) == (True, 4, 5)


def forge_checkpoint(
    chain: AuditChain, signer: Ed25519PrivateKey, claimed_kid: str, head: str | None = None
) -> bytes:
    """A checkpoint entry as a forger would write it: valid hash, chosen kid (and head)."""
    signed_head = chain.head if head is None else head
    sig = signer.sign(checkpoint_message(chain.n, signed_head, claimed_kid))
    body = {
        "covers": chain.n,
        "head": signed_head,
        "kid": claimed_kid,
        "sig": base64.urlsafe_b64encode(sig).rstrip(b"=").decode(),
        "n": chain.n + 1,
        "t": 1.0,
        "event": "checkpoint",
        "prev": chain.head,
    }
    digest = hashlib.sha256(canonical_json(body)).hexdigest()
    chain.n, chain.head = chain.n + 1, digest
    return canonical_json({**body, "hash": digest}) + b"\n"


def test_checkpoints_signed_by_another_key(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    intruder = Ed25519PrivateKey.generate()
    # a whole trail rewritten and signed with another key
    lines = signed_trail(tmp_path / "audit.log", intruder, 10)
    report = verify_trail(lines, device.public_key())
    assert [(p.line, p.entry) for p in report.errors] == [(5, 5), (10, 10), (13, 13)]
    assert report.errors[0].what == (
        f"checkpoint signed by key {kid(intruder.public_key())!r}, "
        f"not by the device key {kid(device.public_key())!r}"
    )
    assert report.checkpoints == 0
    assert "no signed checkpoint" in report.warnings[0].what
    # ... or claiming the device's key id
    chain = AuditChain()
    forged = [chain.entry(2.0, "camera_fault", {"camera": "c"}) for _ in range(3)]
    forged.append(forge_checkpoint(chain, intruder, kid(device.public_key())))
    report = verify_trail(forged, device.public_key())
    assert only_error(report) == (
        4,
        4,
        "checkpoint signature does not verify: not signed by the device key",
    )
    # a device signature over some other head does not sign this chain
    chain = AuditChain()
    other = [chain.entry(2.0, "camera_fault", {"camera": "c"}) for _ in range(3)]
    other.append(forge_checkpoint(chain, device, kid(device.public_key()), head="f" * 64))
    line, entry, what = only_error(verify_trail(other, device.public_key()))
    assert (line, entry) == (4, 4)
    assert what.startswith("checkpoint signs entry 3 with head 'ffffff")
    assert what.endswith("but follows entry 3")


def test_resumed_log_after_a_torn_line(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.log"
    lines = signed_trail(path, device, 5)  # 1..4, checkpoint 5, 6, checkpoint 7 (close)
    data = b"".join(lines)
    path.write_bytes(data[:-30])  # a power cut in the middle of the last checkpoint
    report = verify_trail(split_lines(path.read_bytes()), device.public_key())
    assert only_error(report)[:2] == (7, 7)

    audit = AuditLog(path, clock, signer=device, checkpoint_every=4)
    try:  # opening signs entry 6 again, on a line of its own
        audit.record("agent_started", boot_id="b2")
    finally:
        audit.close()
    after = split_lines(path.read_bytes())
    assert after[6] == lines[6][:-30] + b"\n"
    assert [json.loads(x)["event"] for x in after[7:]] == [
        "checkpoint",
        "agent_started",
        "checkpoint",
    ]
    report = verify_trail(after, device.public_key())
    assert report.ok
    assert (report.entries, report.checkpoints, report.signed) == (9, 3, 9)
    [warning] = report.problems
    assert (warning.error, warning.line, warning.entry) == (False, 7, 7)
    assert warning.what.startswith("torn entry")


def test_resume_after_a_whole_entry_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = trail(path, 3)
    path.write_bytes(path.read_bytes()[:-1])  # the cut fell between the entry and "\n"
    audit = AuditLog(path, clock)
    try:
        assert audit.head_n == 3
        audit.record("agent_started")
    finally:
        audit.close()
    after = path.read_bytes().splitlines()
    assert after[:3] == lines
    assert verify_chain(after)[0] == 4


def test_resume_finds_the_last_entry_far_from_the_end(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    trail(path, 2)
    with path.open("ab") as fh:  # junk lines, longer together than the first read of the end
        fh.write((b"x" * 1000 + b"\n") * 200)
    audit = AuditLog(path, clock)
    try:
        assert audit.head_n == 2
        audit.record("agent_started")
    finally:
        audit.close()
    last = json.loads(path.read_bytes().splitlines()[-1])
    assert (last["n"], last["event"]) == (3, "agent_started")


def test_a_trail_of_many_entries_resumes_from_its_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    trail(path, 600)
    lines = trail(path, 1)
    assert verify_chain(lines)[0] == 601


def test_oversized_and_deeply_nested_lines(tmp_path: Path, device: Ed25519PrivateKey) -> None:
    lines = signed_trail(tmp_path / "audit.log", device, 2)
    huge = b'{"n":' + b"1" * MAX_LINE_BYTES + b"}\n"
    nested = b"[" * 8000 + b"]" * 8000 + b"\n"
    report = verify_trail([lines[0], huge, nested, *lines[1:]], device.public_key())
    assert [(p.line, p.error) for p in report.problems] == [(2, True), (3, True)]
    assert report.problems[0].what == f"longer than {MAX_LINE_BYTES} bytes: not an audit entry"
    assert report.problems[1].what == "not an audit entry (cannot be parsed)"
    assert (report.entries, report.signed) == (3, 3)  # the chain around them still checks


def test_entries_the_card_cannot_take_are_held_and_written_in_order_once_it_can(
    tmp_path: Path, device: Ed25519PrivateKey
) -> None:
    """A full card dropped each entry with a log line: a disclosure to the police while
    the state volume was full never reached the district's trail (review f7). They are
    held in RAM now, written first, in order, once the card takes writes, each with
    when it happened; a durable record meanwhile says it is not on the trail, and is
    not held (what it records does not happen)."""
    path = tmp_path / "audit.log"
    ticks = count()
    audit = AuditLog(path, lambda: 1_767_000_000.0 + next(ticks), signer=device)
    try:
        audit.record("agent_started")
        with full_card(audit):
            audit.record("button_press", button="office")
            audit.record("disclosure", session="s-1", cameras=[{"id": "hall"}])
            # Not held: the picture it would record is not given.
            assert not audit.record_durable("camera_check", camera="door")
            assert audit.held == 2 and audit.failing is not None
            assert not audit.retry()
        assert audit.retry() and audit.held == 0 and audit.failing is None
        audit.record("session_end", session="s-1")
    finally:
        audit.close()
    lines = path.read_bytes().splitlines()
    entries = [json.loads(x) for x in lines]
    events = [e["event"] for e in entries if e["event"] != "checkpoint"]
    assert events == ["agent_started", "button_press", "disclosure", "session_end"]
    late = [e for e in entries if "happened_at" in e]
    assert [e["event"] for e in late] == ["button_press", "disclosure"]
    assert all(e["happened_at"] < e["t"] for e in late)
    assert verify_trail(lines, device.public_key()).ok


def test_past_what_is_held_the_trail_says_how_many_were_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "MAX_HELD", 2)
    audit = AuditLog(tmp_path / "audit.log", clock)
    try:
        with full_card(audit):
            for i in range(5):
                audit.record("camera_fault", camera=f"cam-{i}")
            assert audit.held == 5
        audit.record("agent_started")  # writes what waits first
    finally:
        audit.close()
    entries = [json.loads(x) for x in (tmp_path / "audit.log").read_bytes().splitlines()]
    assert [(e["event"], e.get("camera"), e.get("count")) for e in entries] == [
        ("camera_fault", "cam-0", None),
        ("camera_fault", "cam-1", None),
        ("audit_entries_lost", None, 3),
        ("agent_started", None, None),
    ]
