"""The emergency state machine and its persistence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import CameraConfig
from agent.emergency import Emergency, Ended, Repeated, Started, State
from agent.statefile import SequenceReservations, read_json, write_json
from agent.zones import cameras_to_stream

CAMS = (
    CameraConfig("front", "exterior", "synthetic"),
    CameraConfig("hall", "interior", "synthetic"),
)


def test_press_opens_second_press_does_not_end_expiry_does() -> None:
    em = Emergency("lincoln", 60)
    assert em.state is State.IDLE
    started = em.press(100.0, "office", "Main office", ("front", "hall"))
    assert isinstance(started, Started)
    assert started.session.expires_at == 160.0
    assert started.session.started_by["location"] == "Main office"
    again = em.press(110.0, "gym", "Gym", ("front", "hall"))
    assert isinstance(again, Repeated) and em.state is State.ACTIVE
    assert len(em.active.presses) == 2 if em.active else False
    assert em.tick(159.9) is None
    ended = em.tick(160.0)
    assert isinstance(ended, Ended) and ended.session.end_reason == "expired"
    assert em.state is State.IDLE and em.last is not None


def test_an_open_session_lasts_its_time_whatever_the_wall_clock_does() -> None:
    """A Pi without a battery-backed clock: pressed at a stale boot time, the clock is set
    right (months ahead) a minute later; the session still ends an hour after the press.
    Extended with the clock set back, it still gets its hour; a session resumed after a
    restart with a clock far behind lasts at most one duration."""
    em = Emergency("lincoln", 3600)
    stale, synced = 1_767_225_600.0, 1_795_910_525.0  # fake-hwclock's date; NTP's
    em.press(stale, "office", "Main office", ("hall",))
    assert em.tick(stale, mono=10.0) is None  # seen: an hour left, on the monotonic clock
    assert em.tick(synced, mono=70.0) is None  # the clock jumped months ahead: still open
    assert em.tick(synced + 3000, mono=3609.0) is None
    ended = em.tick(synced + 3001, mono=3610.0)
    assert ended is not None and ended.session.end_reason == "expired"

    em.press(synced, "office", "Main office", ("hall",))
    assert em.tick(synced, mono=5000.0) is None
    em.extend(synced - 86400, {"kind": "trigger"})  # set back a day: expiry stays later
    assert em.tick(synced - 86400, mono=6000.0) is None  # re-anchored: an hour from now
    assert em.tick(synced - 86400, mono=9599.0) is None
    assert em.tick(synced - 86400, mono=9600.0) is not None

    restored = Emergency("lincoln", 3600)
    restored.press(synced, "office", "Main office", ("hall",))  # saved before a power cut
    assert restored.tick(stale, mono=1.0) is None  # boots months behind: at most an hour
    assert restored.tick(stale, mono=3601.0) is not None


def test_state_survives_a_restart(tmp_path: Path) -> None:
    em = Emergency("lincoln", 60)
    started = em.press(100.0, "office", "Main office", ("front", "hall"))
    write_json(tmp_path / "e.json", em.to_json())
    restored = Emergency.from_json("lincoln", 60, read_json(tmp_path / "e.json"))
    assert restored.active == started.session


def test_interior_cameras_stream_only_in_an_active_session() -> None:
    em = Emergency("lincoln", 60)
    assert cameras_to_stream(CAMS, em.active) == ()
    em.press(1.0, "office", "x", ("front", "hall"))
    assert [c.id for c in cameras_to_stream(CAMS, em.active)] == ["front", "hall"]
    ended = em.end(2.0, "all clear")
    assert ended is not None
    assert cameras_to_stream(CAMS, ended.session) == ()
    assert cameras_to_stream(CAMS, em.active) == ()


def test_sequence_numbers_never_repeat_across_restarts(tmp_path: Path) -> None:
    seqs = SequenceReservations(tmp_path / "seq.json")
    used = [seqs.next("cam") for _ in range(5)]
    assert used == [0, 1, 2, 3, 4]
    after_crash = SequenceReservations(tmp_path / "seq.json")
    assert after_crash.next("cam") > max(used)
    assert after_crash.next("other") == 0


def test_a_failed_reservation_hands_out_no_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block was counted before its write: after a failed write (a full card) the
    next numbers were handed out unreserved, and a restart handed them out again (found
    by a review)."""
    from agent import statefile

    seqs = SequenceReservations(tmp_path / "seq.json")
    write, failing = statefile.write_json, [True]

    def full_card(path: Path, doc: object) -> None:
        if failing[0]:
            failing[0] = False
            raise OSError(28, "No space left on device")
        write(path, doc)

    monkeypatch.setattr(statefile, "write_json", full_card)
    with pytest.raises(OSError, match="No space left"):
        seqs.next("cam")
    used = [seqs.next("cam") for _ in range(3)]  # reserved on disk this time
    assert SequenceReservations(tmp_path / "seq.json").next("cam") > max(used)


def test_a_chattering_button_keeps_the_saved_session_small() -> None:
    """Review l2: every press was saved with the session; a button chattering 16 times a
    second took emergency.json past its 1 MiB limit in 20 minutes (refused at the next
    start). The session keeps its first and latest presses; the audit trail has all."""
    from agent.emergency import MAX_PRESSES_KEPT

    em = Emergency("lincoln", 3600)
    for i in range(20_000):
        em.press(1000.0 + i * 0.06, "office", "Main office", ("cam",))
    assert em.active is not None
    times = [p["at"] for p in em.active.presses]
    assert len(times) == MAX_PRESSES_KEPT
    assert times[0] == 1000.0 and times[-1] == 1000.0 + 19_999 * 0.06
    assert len(json.dumps(em.to_json())) < 20_000
