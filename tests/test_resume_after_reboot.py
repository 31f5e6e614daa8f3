"""An emergency resumed after a reboot on a clock behind gets at most RESUME_AT_LEAST_S,
and every resume is on the audit trail.

A Raspberry Pi has no real-time clock: after a power cut it boots on fake-hwclock's last
save, before the time the session was last seen open, until NTP steps it. Found by a
review (f2, f2b): such a clock "cannot measure the outage", and the resumed emergency got
the whole time it had left at the power cut (up to a duration, 3,300 s in the review)
although it may have ended days before the power came back, streaming the building's
interior cameras that long. It now gets at most RESUME_AT_LEAST_S (10 minutes), as a
clock that says the session is over does; the police can extend or end it. The agent
audits each resume (``session_resumed``: after a reboot or not, the time left it got and
why). A restart within the same boot keeps exactly the time left, as before.

Real agent, real receiver on loopback; emergency.json is edited between the runs only to
say "another boot" (the test cannot reboot the machine).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.daemon import Agent
from agent.emergency import RESUME_AT_LEAST_S, Emergency, Resumed
from breakglass.demo import write_agent_config
from receiver.server import Receiver
from tests.emergencies import pressed

pytestmark = pytest.mark.timeout(60)

HOUR = 3600.0
T0 = 1_790_000_000.0


def trail(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "state" / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def cut_at(seconds_in: float) -> dict[str, Any]:
    """emergency.json of a session pressed at T0 and last seen open ``seconds_in`` later,
    on boot "b1" (the power cut then)."""
    em = Emergency("lincoln", HOUR, boot="b1")
    em.press(T0, "office", "Main office", ("hall",), mono=100.0)
    assert em.tick(T0 + seconds_in, mono=100.0 + seconds_in) is None
    return em.to_json()


def test_a_clock_behind_the_power_cut_gives_at_most_resume_at_least_s() -> None:
    """The review's figures: pressed at T0, power cut at T0 + 300 s (3,300 s left), back on
    fake-hwclock's last hourly save (T0 - 1200 s). It got 3,300 s."""
    em = Emergency.from_json("lincoln", HOUR, cut_at(300), boot="b2")
    assert em.time_left(T0 - 1200, 5.0) == pytest.approx(RESUME_AT_LEAST_S)
    assert em.take_resumed() == Resumed(
        em.active.id if em.active else "", True, RESUME_AT_LEAST_S, "clock_behind", 4800, 3300
    )
    assert em.take_resumed() is None  # once
    assert em.tick(T0 - 1200, mono=5.0 + RESUME_AT_LEAST_S - 0.1) is None
    assert em.tick(T0 - 1200, mono=5.0 + RESUME_AT_LEAST_S) is not None


def test_the_bound_stays_what_it_had_left_at_the_cut() -> None:
    em = Emergency.from_json("lincoln", HOUR, cut_at(HOUR - 60), boot="b2")  # a minute left
    assert em.time_left(T0 - 1200, 5.0) == pytest.approx(60)


def test_a_clock_behind_a_press_the_file_holds_is_behind_too() -> None:
    """The clock reads after the last time the session was seen open in an older file
    (none saved: the start stands for it) but before a later press of the same session."""
    em = Emergency("lincoln", HOUR)
    em.press(T0, "office", "Main office", ("hall",))
    em.press(T0 + 900, "gym", "Gym", ("hall",))  # joined the open session 15 min in
    doc = em.to_json()
    doc.pop("clock", None)
    again = Emergency.from_json("lincoln", HOUR, doc, boot="b2")
    assert again.time_left(T0 + 100, 5.0) == pytest.approx(RESUME_AT_LEAST_S)
    resumed = again.take_resumed()
    assert resumed is not None and resumed.why == "clock_behind"


def test_police_can_still_extend_a_session_resumed_on_a_clock_behind() -> None:
    em = Emergency.from_json("lincoln", HOUR, cut_at(300), boot="b2")
    assert em.time_left(T0 - 1200, 5.0) == pytest.approx(RESUME_AT_LEAST_S)
    em.extend(T0 - 1100, {"kind": "trigger", "role": "dispatch"}, mono=105.0)
    assert em.time_left(T0 - 1100, 105.0) == pytest.approx(HOUR)


def test_the_other_rules_after_a_reboot_are_unchanged() -> None:
    right = Emergency.from_json("lincoln", HOUR, cut_at(300), boot="b2")
    assert right.time_left(T0 + 600, 5.0) == pytest.approx(HOUR - 600)  # 5 min without power
    assert (r := right.take_resumed()) is not None and r.why == "wall_clock"
    over = Emergency.from_json("lincoln", HOUR, cut_at(300), boot="b2")
    assert over.time_left(T0 + 2 * 86400, 5.0) == pytest.approx(RESUME_AT_LEAST_S)
    assert (r := over.take_resumed()) is not None and r.why == "clock_says_over"
    same = Emergency.from_json("lincoln", HOUR, cut_at(300), boot="b1")
    assert same.time_left(T0 - 86400, 500.0) == pytest.approx(HOUR - 400)  # exact
    assert (r := same.take_resumed()) is not None and (r.reboot, r.why) == (False, "same_boot")


def as_another_boot(state: Path) -> dict[str, Any]:
    """What a reboot changes in emergency.json: the boot it was saved in is not this one."""
    doc: dict[str, Any] = json.loads(state.read_text())
    doc["clock"]["boot"] = "a-boot-before-the-power-cut"
    state.write_text(json.dumps(doc))
    return doc


async def test_a_real_agent_rebooted_on_fake_hwclock_streams_10_minutes_and_audits_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=1)
    async with Agent(load_config(path)) as agent:
        session = await pressed(agent)
        await agent.wait_until(lambda: not agent.state_writer.pending)
    saved = as_another_boot(tmp_path / "agent" / "state" / "emergency.json")
    assert saved["clock"]["left"] > 3000  # it had nearly an hour left at the cut

    # Power back: the clock is fake-hwclock's last save, an hour before the cut.
    def clock() -> float:
        return time.time() - HOUR

    async with Agent(load_config(path), clock=clock) as again:
        again.alarm.expire()  # what housekeeping does first, every 0.5 s
        active = again.emergency.active
        assert active is not None and active.id == session.id
        left = again.emergency.time_left(clock(), time.monotonic())
        assert left is not None and RESUME_AT_LEAST_S - 5 < left <= RESUME_AT_LEAST_S
        await again.wait_until(lambda: again.uplink.stream(session.id) is not None)
        again.end("test done")
        await again.uplink.wait_settled(session.id)
    (entry,) = [e for e in trail(tmp_path / "agent") if e["event"] == "session_resumed"]
    assert entry["session"] == session.id
    assert (entry["reboot"], entry["why"]) == (True, "clock_behind")
    assert entry["left_s"] == pytest.approx(RESUME_AT_LEAST_S)
    assert entry["most_s"] > 3000 and entry["wall_left_s"] > entry["most_s"]


async def test_a_restart_in_the_same_boot_is_audited_and_keeps_the_time_left(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=1)
    async with Agent(load_config(path)) as agent:
        session = await pressed(agent)
        left_before = agent.emergency.time_left(time.time(), time.monotonic())
        await agent.wait_until(lambda: not agent.state_writer.pending)
    async with Agent(load_config(path)) as again:
        again.alarm.expire()
        left = again.emergency.time_left(time.time(), time.monotonic())
        assert left_before is not None and left is not None
        assert left_before - 30 < left <= left_before  # exactly what was left, less the restart
        again.end("test done")
        await again.uplink.wait_settled(session.id)
    (entry,) = [e for e in trail(tmp_path / "agent") if e["event"] == "session_resumed"]
    assert (entry["session"], entry["reboot"], entry["why"]) == (session.id, False, "same_boot")
    assert entry["wall_left_s"] is None
    assert left_before - 30 < entry["left_s"] <= left_before
