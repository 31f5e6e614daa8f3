"""Damaged state files never keep the agent, and its buttons, from arming.

A power cut cannot tear a state file (they are replaced atomically), but a failing SD
card, a software downgrade or a hand edit can leave one the agent cannot use. Each is
moved aside (``NAME.damaged-<time>``) and audited, and the agent starts without it: a
panic button press then starts an emergency as always (found by a review: every one
of these kept the agent from starting, and systemd restarted it into the same error).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pyrage
import pytest

from agent import protocol as p
from agent import segment
from agent.audit import AuditLog
from agent.config import load_config
from agent.daemon import Agent
from agent.messages import CameraDesc, SessionOpen
from agent.owed_sessions import OwedSessions
from agent.statefile import SequenceReservations
from agent.store import Pin, SegmentStore
from breakglass.demo import press_button, write_agent_config
from hardware import EncodedPacket
from receiver.server import Receiver
from tests.cards import full_card

pytestmark = pytest.mark.timeout(60)

T0_NS = 1_767_000_000_000_000_000


def owed_doc(first: object = 0, acked: object = -1, end: object = 1000) -> str:
    """owed.json as the agent saves it: one ended session of camera ``cam-a``, its seqs
    as given."""
    cam = CameraDesc(0, "cam-a", "interior", "h264", 160, 120, 30.0, b"", 0, 0)
    opened = SessionOpen("s1", "bldg", {"kind": "button"}, T0_NS / 1e9, T0_NS / 1e9 + 3600, (cam,))
    entry = {
        "open": p.encode_control(opened),
        "first": {"cam-a": first},
        "acked": {"cam-a": acked},
        "end": {"cam-a": end},
        "close_reason": "ended",
        "chain": [],
    }
    return json.dumps({"s1": entry})


DAMAGED = [
    ("emergency.json", "{"),
    ("emergency.json", "[]"),
    ("emergency.json", '{"v": 1, "active": {}}'),
    ("emergency.json", '{"v": 2}'),
    ("owed.json", "{"),
    ("owed.json", "[1]"),
    ("owed.json", '{"s": {}}'),
    ("owed.json", '{"s": {"open": "{}", "first": {}, "acked": {}, "end": {}}}'),
    ("owed.json", owed_doc(end="1000")),  # a seq that is not a JSON integer
    ("owed.json", owed_doc(acked=True)),
    ("sequences.json", "{"),
    ("sequences.json", '{"front-door": null}'),
    ("sequences.json", '{"front-door": "x"}'),
    ("trigger-keys.json", "{"),
    ("trigger-keys.json", "[]"),
]


def audited(agent: Agent) -> list[dict[str, object]]:
    return [json.loads(line) for line in agent.audit.path.read_text().splitlines()]


@pytest.mark.parametrize(("name", "content"), DAMAGED)
async def test_a_damaged_state_file_is_set_aside_and_the_button_works(
    tmp_path: Path, receiver: Receiver, name: str, content: str
) -> None:
    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    state = load_config(path).state_dir
    state.mkdir(parents=True, exist_ok=True)
    (state / name).write_text(content)
    async with Agent(load_config(path)) as agent:
        await agent.capture.wait_packets(10)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        await agent.uplink.wait_until(lambda: agent.uplink.stream(session.id) is not None)
    (aside,) = state.glob(f"{name}.damaged-*")
    assert aside.read_text() == content  # kept for whoever looks into it
    entries = audited(agent)
    if name == "trigger-keys.json":
        (refused,) = [e for e in entries if e["event"] == "keylist_refused"]
        assert (refused["source"], refused["code"]) == ("state", "damaged")
    else:
        (damaged,) = [e for e in entries if e["event"] == "state_damaged"]
        assert damaged["file"] == name


@pytest.mark.parametrize("damage", ["damaged", "gone"])
async def test_sequence_numbers_without_their_file_start_above_the_stored_ones(
    tmp_path: Path, receiver: Receiver, damage: str
) -> None:
    """Damaged, or gone (a state folder wiped while the store stayed): numbering started
    at 0 again, and the store held two segments of one seq (found by a review)."""
    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    async with Agent(load_config(path)) as agent:
        await agent.capture.wait_packets(60)
    stored = max(s.last_seq for s in agent.store.segments("front-door"))
    state = load_config(path).state_dir
    for name in ("sequences.json", "sequences.backup.json"):  # both copies
        if damage == "damaged":
            (state / name).write_text('{"front-door": "x"}')
        else:
            (state / name).unlink()
    async with Agent(load_config(path)) as again:
        await again.capture.wait_packets(1)
        first = again.capture.seqs.peek("front-door")
    assert first > stored + SequenceReservations.BLOCK  # above all a run may have used


async def test_a_damaged_sequences_file_with_an_emptied_store_numbers_on(
    tmp_path: Path, receiver: Receiver
) -> None:
    """With the sealed store emptied (retention took it all) the reservations were the
    only record of the numbers used: a damaged sequences.json started numbering at 0
    again, reusing numbers the receiver and the audit trail already hold. Its second
    copy keeps them."""
    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    async with Agent(load_config(path)) as agent:
        await agent.capture.wait_packets(10)
        used = agent.capture.seqs.peek("front-door")
    cfg = load_config(path)
    shutil.rmtree(cfg.store.directory)
    (cfg.state_dir / "sequences.json").write_text("{")
    async with Agent(load_config(path)) as again:
        await again.capture.wait_packets(1)
        first = again.capture.seqs.peek("front-door")
    assert first >= SequenceReservations.BLOCK > used  # above the reserved block
    assert list(cfg.state_dir.glob("sequences.json.damaged-*"))


async def test_a_failed_state_write_is_loud_retried_and_an_ended_emergency_stays_ended(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state write that failed (a card gone read-only) was lost in its task: nothing
    logged or audited, and when it was the write of an emergency's end, emergency.json
    kept the session open and a restart started streaming it again. Now it is audited,
    the LED shows a fault, and housekeeping writes again until it succeeds."""
    from agent import state_files

    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    cfg = load_config(path)
    write, failing = state_files.write_json, [False]

    def card(target: Path, doc: object) -> None:
        if failing[0]:
            raise OSError(30, "Read-only file system")
        write(target, doc)

    monkeypatch.setattr(state_files, "write_json", card)
    async with Agent(cfg) as agent:
        await agent.capture.wait_packets(5)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        await agent.wait_until(lambda: not agent.state_writer.pending)
        failing[0] = True
        assert agent.alarm.end("all clear") is not None
        await agent.wait_until(lambda: agent.state_writer.failed is not None)
        assert agent._faulty()
        assert json.loads((cfg.state_dir / "emergency.json").read_text())["active"] is not None
        failing[0] = False  # the card is back: housekeeping writes again by itself
        await agent.wait_until(lambda: agent.state_writer.failed is None)
    assert json.loads((cfg.state_dir / "emergency.json").read_text())["active"] is None
    events = [e["event"] for e in audited(agent)]
    assert events.count("state_write_failed") == 1
    assert events.index("state_write_failed") < events.index("state_write_recovered")


async def test_the_same_emergency_state_is_not_written_again(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review l4: with an exterior share the periodic save rewrote and fsynced an
    unchanged emergency.json every 2 s (43,200 times a day on the SD card)."""
    from agent import state_files

    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    written: list[object] = []
    write = state_files.write_json

    def counted(target: Path, doc: object) -> None:
        if target.name == "emergency.json":
            written.append(doc)
        write(target, doc)

    monkeypatch.setattr(state_files, "write_json", counted)
    async with Agent(load_config(path)) as agent:
        for _ in range(3):  # what housekeeping does while a share streams
            agent.state_writer.persist()
            await asyncio.gather(*agent.state_writer.pending)
        assert len(written) <= 1  # at most the first
        await agent.capture.wait_packets(5)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        await asyncio.gather(*agent.state_writer.pending)
        assert written and written[-1]["active"] is not None  # type: ignore[index]
        agent.end("test over")


async def test_a_press_while_the_audit_trail_cannot_be_written_reaches_it_afterwards(
    tmp_path: Path, receiver: Receiver
) -> None:
    """With the state volume full, a press still streamed to the police (it must), but its
    ``button_press``, ``session_start`` and ``disclosure`` entries were dropped with a log
    line (review f7): the district's trail never had them. They wait in RAM now, the LED
    shows a fault, and housekeeping writes them, in order, as soon as the card takes
    writes again."""
    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    cfg = load_config(path)
    async with Agent(cfg) as agent:
        await agent.capture.wait_packets(5)
        agent.audit.flush()
        with full_card(agent.audit):
            press_button(agent)
            await agent.wait_until(lambda: agent.streaming.live_stream is not None)
            await agent.wait_until(lambda: agent.audit.held >= 3)
            assert agent._faulty() and agent.emergency.active is not None
        await agent.wait_until(lambda: not agent.audit.held)  # housekeeping wrote them
        assert not agent._faulty()
    late = [e["event"] for e in audited(agent) if "happened_at" in e]
    assert late[:3] == ["button_press", "session_start", "disclosure"], late


async def write_two_cameras(store: SegmentStore) -> None:
    """Three segments of ``cam-a`` (the owed session's) and of ``cam-b`` (in none), and
    close: the store runs retention, and so checks the pins, before each write."""
    stream = segment.StreamDesc("h264", 160, 120, 30.0, b"\x00\x00\x00\x01\x67")
    for cam in ("cam-a", "cam-b"):
        for seq in range(91):
            t = T0_NS + seq * 33_333_333
            store.push(EncodedPacket(cam, seq, t, 0, seq % 30 == 0, "h264", b"x" * 500), stream)
    await store.close()


def small_store(tmp_path: Path, audit: AuditLog) -> SegmentStore:
    """A store over its quota from its second segment on: every write checks the pins."""
    return SegmentStore(
        tmp_path / "store",
        [pyrage.x25519.Identity.generate().to_public()],
        audit=audit,
        boot_id="b",
        segment_s=1.0,
        quota_bytes=40_000,
        clock=lambda: T0_NS / 1e9 + 60,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("end", "1000"), ("end", 1000.0), ("acked", True), ("first", "0"), ("first", None)],
)
async def test_owed_seqs_that_are_not_integers_set_the_file_aside(
    tmp_path: Path, field: str, value: object
) -> None:
    """owed.json's seqs were only checked to convert to int: ``"end": {"cam-a": "1000"}``
    was accepted, pinned as the string it was, and every write of every camera failed in
    retention (TypeError, comparing it with a seq) until the pins were dropped (found by
    a review). Now the file is damaged: set aside, saying which field, as any other."""
    path = tmp_path / "owed.json"
    path.write_text(owed_doc(**{field: value}))
    owed = OwedSessions(path)
    why = owed.load()
    assert why is not None
    assert f"session 's1': {field}['cam-a'] is {value!r}, not a seq" in why
    assert owed.entries == {}
    (aside,) = tmp_path.glob("owed.json.damaged-*")
    assert aside.read_text() == owed_doc(**{field: value})
    audit = AuditLog(tmp_path / "audit.jsonl", time.time)
    store = small_store(tmp_path, audit)
    try:
        await asyncio.to_thread(store.open)
        owed.pin(store)
        assert store.pins == []
        await write_two_cameras(store)
    finally:
        audit.close()
    assert store.stats.write_errors == 0
    assert store.cameras() == ["cam-a", "cam-b"]


async def test_owed_seqs_are_pinned_as_integers_and_every_camera_writes(tmp_path: Path) -> None:
    path = tmp_path / "owed.json"
    path.write_text(owed_doc(first=0, acked=-1, end=1000))
    owed = OwedSessions(path)
    assert owed.load() is None
    audit = AuditLog(tmp_path / "audit.jsonl", time.time)
    store = small_store(tmp_path, audit)
    try:
        await asyncio.to_thread(store.open)
        owed.pin(store)
        assert store.pins == [Pin("cam-a", 0, 1000, -1)]
        await write_two_cameras(store)
    finally:
        audit.close()
    assert store.stats.write_errors == 0
    assert store.segments("cam-a")[0].first_seq == 0  # pinned: the quota kept it
    assert store.segments("cam-b")[0].first_seq > 0  # not pinned: the quota took it

    # An entry that is not as parsed (a bug) is not pinned either: it is checked again.
    owed.entries["s1"]["end"]["cam-a"] = "1000"
    pinned = list(store.pins)
    owed.pin(store)
    assert store.pins == pinned
