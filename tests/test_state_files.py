"""Damaged state files never keep the agent, and its buttons, from arming.

A power cut cannot tear a state file (they are replaced atomically), but a failing SD
card, a software downgrade or a hand edit can leave one the agent cannot use. Each is
moved aside (``NAME.damaged-<time>``) and audited, and the agent starts without it: a
panic button press then starts an emergency as always (found by a review: every one
of these kept the agent from starting, and systemd restarted it into the same error).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon import Agent
from agent.statefile import SequenceReservations
from breakglass.demo import press_button, write_agent_config
from receiver.server import Receiver
from tests.cards import full_card

pytestmark = pytest.mark.timeout(60)

DAMAGED = [
    ("emergency.json", "{"),
    ("emergency.json", "[]"),
    ("emergency.json", '{"v": 1, "active": {}}'),
    ("emergency.json", '{"v": 2}'),
    ("owed.json", "{"),
    ("owed.json", "[1]"),
    ("owed.json", '{"s": {}}'),
    ("owed.json", '{"s": {"open": "{}", "first": {}, "acked": {}, "end": {}}}'),
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
