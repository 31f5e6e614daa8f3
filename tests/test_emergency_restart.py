"""An emergency's time left across an agent restart, whatever the Pi's wall clock did.

A Raspberry Pi has no real-time clock: after a power cut it boots hours (or months)
behind until NTP steps the clock, and NTP can step it back. Within one run the time
left is measured on the monotonic clock. Found by a review (s7): pressed with the
clock 2 h behind, NTP set it right, then systemd restarted the agent (a crash, an
update): the restart took the time left from the wall clock (``expires_at`` on the
stale clock minus the synced now) and ended a one-hour emergency seconds in as
"expired". The other way round (pressed on a right clock, restarted with the clock set
back) it got a whole duration again. A restart keeps the boot, and CLOCK_MONOTONIC
with it: emergency.json now carries the monotonic deadline and the boot id.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.daemon import Agent
from agent.emergency import RESUME_AT_LEAST_S, Emergency, Ended
from agent.statefile import read_json, write_json
from breakglass.demo import press_button, write_agent_config
from receiver.server import Receiver

pytestmark = pytest.mark.timeout(90)

HOUR = 3600.0
STALE, SYNCED = 1_767_225_600.0, 1_795_910_525.0  # fake-hwclock's date; NTP's, months later


# --- a restart within the same boot keeps exactly the time left ---


@pytest.mark.parametrize(
    ("before_s", "after_s"),
    [(-7200.0, 0.0), (0.0, -7200.0)],
    ids=["pressed-before-ntp-sync", "clock-set-back-before-restart"],
)
async def test_a_restart_keeps_the_time_left_whatever_the_wall_clock_did(
    tmp_path: Path, receiver: Receiver, before_s: float, after_s: float
) -> None:
    path = write_agent_config(tmp_path / "agent", receiver, fps=30)
    duration = load_config(path).session_duration_s
    async with Agent(load_config(path), clock=lambda: time.time() + before_s) as agent:
        await agent.capture.wait_packets(5)
        pressed_after = time.monotonic()
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        pressed_before = time.monotonic()
        session = agent.emergency.active
        assert session is not None
        await agent.wait_until(lambda: not agent.state_writer.pending)
    # The clock steps (NTP), then systemd starts the agent again: the same boot.
    clock = lambda: time.time() + after_s  # noqa: E731
    async with Agent(load_config(path), clock=clock) as again:
        again.alarm.expire()  # what housekeeping does first, every 0.5 s
        active = again.emergency.active
        assert active is not None and active.id == session.id, again.emergency.last
        # It ends when it would have without the restart: an hour after the press.
        assert again.emergency.tick(clock(), pressed_after + duration - 0.01) is None
        ended = again.emergency.tick(clock(), pressed_before + duration + 0.01)
        assert isinstance(ended, Ended) and ended.session.end_reason == "expired"
        again.streaming.stop(ended)


def test_the_monotonic_deadline_is_saved_and_kept_within_one_boot(tmp_path: Path) -> None:
    em = Emergency("lincoln", HOUR, boot="boot-1")
    em.press(STALE, "office", "Main office", ("hall",), mono=100.0)
    write_json(tmp_path / "e.json", em.to_json())  # saved at once: before any tick
    restored = Emergency.from_json("lincoln", HOUR, read_json(tmp_path / "e.json"), boot="boot-1")
    assert restored.active == em.active
    assert restored.tick(SYNCED, mono=200.0) is None  # months "later": 100 s later
    assert restored.time_left(SYNCED, 200.0) == pytest.approx(HOUR - 100)
    assert restored.tick(SYNCED - 86400, mono=HOUR + 99.9) is None
    assert restored.tick(SYNCED - 86400, mono=HOUR + 100.0) is not None


def test_a_deadline_found_by_a_tick_is_saved_and_survives_restarts_before_the_next(
    tmp_path: Path,
) -> None:
    """Anchored by a tick (no monotonic time at the press), and written again by a run
    that crashed before it ticked once: still the same deadline."""
    em = Emergency("lincoln", HOUR, boot="b")
    em.press(STALE, "office", "Main office", ("hall",))
    assert em.tick(STALE + 1, mono=51.0) is None  # an hour from the press: 50 + 3600
    doc = em.to_json()
    crashed = Emergency.from_json("lincoln", HOUR, json.loads(json.dumps(doc)), boot="b")
    again = Emergency.from_json("lincoln", HOUR, crashed.to_json(), boot="b")
    assert again.tick(SYNCED, mono=HOUR + 49.9) is None
    assert again.tick(SYNCED, mono=HOUR + 50.0) is not None


def test_an_extension_after_a_restart_gives_a_whole_duration_from_then() -> None:
    em = Emergency("lincoln", HOUR, boot="b")
    em.press(SYNCED, "office", "Main office", ("hall",), mono=0.0)
    restored = Emergency.from_json("lincoln", HOUR, em.to_json(), boot="b")
    restored.extend(STALE, {"kind": "trigger"}, mono=1000.0)
    assert restored.tick(STALE, mono=1000.0 + HOUR - 0.1) is None
    assert restored.tick(STALE, mono=1000.0 + HOUR) is not None


# --- after a reboot the monotonic clock starts again: the wall clock, bounded ---


def saved_at(seen_wall: float, seen_mono: float, pressed_mono: float = 0.0) -> dict[str, Any]:
    """emergency.json of a session pressed at mono ``pressed_mono`` (wall: ``seen_wall``
    minus the time since), last seen open at ``seen_wall``/``seen_mono`` on boot "b1"."""
    em = Emergency("lincoln", HOUR, boot="b1")
    em.press(seen_wall - (seen_mono - pressed_mono), "office", "Main office", ("hall",))
    em.tick(seen_wall - (seen_mono - pressed_mono), mono=pressed_mono)
    assert em.tick(seen_wall, mono=seen_mono) is None
    return em.to_json()


def after_reboot(doc: dict[str, Any]) -> Emergency:
    return Emergency.from_json("lincoln", HOUR, doc, boot="b2")


def test_after_a_reboot_on_a_clock_set_back_it_has_at_most_resume_at_least_s() -> None:
    """fake-hwclock: the clock comes back before the last time the session was seen
    open. The outage cannot be measured: it gets RESUME_AT_LEAST_S (review f2: it got
    what it had left at the cut, 2,600 s here, for an emergency that may have ended
    days ago), never more than it had left then."""
    doc = saved_at(SYNCED, seen_mono=1000.0)  # 1,000 s into it: 2,600 s left
    em = after_reboot(doc)
    assert em.tick(SYNCED - 3 * 86400, mono=20.0) is None
    assert em.time_left(SYNCED - 3 * 86400, 20.0) == pytest.approx(RESUME_AT_LEAST_S)


def test_after_a_reboot_on_a_right_clock_the_outage_counts() -> None:
    doc = saved_at(SYNCED, seen_mono=1000.0)
    em = after_reboot(doc)
    assert em.tick(SYNCED + 300, mono=20.0) is None  # five minutes without power
    assert em.time_left(SYNCED + 300, 20.0) == pytest.approx(HOUR - 1300)


def test_after_a_reboot_a_clock_that_says_it_expired_does_not_end_it_at_once() -> None:
    """Pressed on a stale clock, the power cut, the clock synced at boot: the wall clock
    says the session ended months ago, and cannot tell a clock step from a long outage.
    Ending a life-safety emergency on its word is the wrong way to be wrong: it streams
    on for RESUME_AT_LEAST_S (the police see it resumed and can extend or end it), never
    more than it had left at the cut."""
    doc = saved_at(STALE, seen_mono=1000.0)
    em = after_reboot(doc)
    assert em.tick(SYNCED, mono=20.0) is None
    assert em.time_left(SYNCED, 20.0) == pytest.approx(RESUME_AT_LEAST_S)
    assert em.tick(SYNCED + RESUME_AT_LEAST_S, mono=20.0 + RESUME_AT_LEAST_S) is not None

    nearly_over = saved_at(STALE, seen_mono=HOUR - 60)  # a minute left at the cut
    em = after_reboot(nearly_over)
    assert em.time_left(SYNCED, 20.0) == pytest.approx(60)
    expired = saved_at(STALE, seen_mono=HOUR - 0.2)
    expired["clock"]["left"] = 0.0  # it had no time left at the cut
    assert after_reboot(expired).tick(SYNCED, mono=20.0) is not None


def test_an_older_file_pressed_before_ntp_sync_is_not_ended_at_once_by_the_synced_clock() -> None:
    """emergency.json of an earlier version (no monotonic deadline, no boot): pressed on a
    stale clock, read on a synced one. It ended at once; now it streams on, bounded."""
    old = Emergency("lincoln", HOUR)
    old.press(STALE, "office", "Main office", ("hall",))
    doc = old.to_json()
    doc.pop("clock", None)
    em = Emergency.from_json("lincoln", HOUR, doc)
    assert em.tick(SYNCED, mono=5.0) is None
    assert em.tick(SYNCED, mono=5.0 + RESUME_AT_LEAST_S - 0.1) is None
    assert em.tick(SYNCED, mono=5.0 + RESUME_AT_LEAST_S) is not None
    # The documented rule otherwise: a clock behind the press gives RESUME_AT_LEAST_S,
    em = Emergency.from_json("lincoln", HOUR, doc)
    assert em.time_left(STALE - 86400, 5.0) == pytest.approx(RESUME_AT_LEAST_S)
    # and a right clock what is left.
    em = Emergency.from_json("lincoln", HOUR, doc)
    assert em.time_left(STALE + 1000, 5.0) == pytest.approx(HOUR - 1000)


@pytest.mark.parametrize(
    "damage",
    [
        lambda record: "x",
        lambda record: {**record, "deadline": "soon"},
        lambda record: {**record, "seen_at": None},
        lambda record: {**record, "extensions": "0"},
        lambda record: {k: v for k, v in record.items() if k != "boot"},
    ],
)
def test_a_damaged_clock_record_is_ignored(damage: Any) -> None:
    em = Emergency("lincoln", HOUR, boot="b")
    em.press(SYNCED, "office", "Main office", ("hall",), mono=0.0)
    doc = em.to_json()
    doc["clock"] = damage(doc["clock"])
    restored = Emergency.from_json("lincoln", HOUR, doc, boot="b")
    assert restored.active == em.active
    # As from an older version: the wall clock, bounded.
    assert restored.time_left(SYNCED + 10, 10.0) == pytest.approx(HOUR - 10)
