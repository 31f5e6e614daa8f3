"""The replay cache against a wall clock that jumps (a Pi has no RTC; NTP can be spoofed).

Found by a review: nonces were forgotten by the wall clock alone, so a forward step of
the clock followed by any accepted trigger (or a restart) emptied the cache, and once
the clock was corrected an ``end`` trigger accepted 30 s earlier was accepted again.
Wall and monotonic clocks are injected; the cache is a real SQLite file.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.replay import CATCH_UP, REBASE_S, RETAIN_S, SqliteReplayCache
from provisioning import documents as d
from provisioning.keys import raw_public
from provisioning.triggers import (
    MAX_LIFETIME_S,
    SKEW_S,
    Accepted,
    Challenges,
    Keyring,
    parse_key_list,
    sign_key_list,
    sign_trigger,
    verify_trigger,
)

T = 1_800_000_000
Y2099 = 4_070_908_800
BUILDING = "lincoln"
DAY = 86_400.0


class Device:
    """A device's verifier with its SQLite replay cache, on clocks the test moves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wall = float(T)
        self.mono = 1000.0
        authority, self.dispatch = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        key = {
            "key": d.b64url(raw_public(self.dispatch.public_key())),
            "role": "dispatch",
            "buildings": "all",
            "label": "911",
        }
        keys = sign_key_list(authority, 1, [key], iat=T - 10, exp=Y2099 + 10**7)
        self.keyring = Keyring()
        self.keyring.install(parse_key_list(keys, authority.public_key()), T)
        self.challenges = Challenges()
        self.cache = self.start()

    def start(self) -> SqliteReplayCache:
        """Start the agent (again): a new process, so a new monotonic clock."""
        self.mono += 12_345.0
        return SqliteReplayCache(self.path, lambda: self.wall, lambda: self.mono)

    def restart(self) -> None:
        self.cache.close()
        self.cache = self.start()

    def at(self, wall: float, *, after_s: float) -> None:
        """The wall clock now reads ``wall``; ``after_s`` really went by."""
        self.wall, self.mono = float(wall), self.mono + after_s

    def trigger(self, action: str = "end") -> dict[str, str]:
        """A trigger signed now (by the device's clock, as a signer in step with it)."""
        reason = "all clear" if action == "end" else "drill"
        return sign_trigger(
            self.dispatch, action=action, building=BUILDING, reason=reason, now=int(self.wall)
        )

    def verify(self, envelope: dict[str, str]) -> str:
        result = verify_trigger(
            json.dumps(envelope),
            building=BUILDING,
            keyring=self.keyring,
            now=self.wall,
            mono=self.mono,
            replay=self.cache,
            challenges=self.challenges,
        )
        return "accepted" if isinstance(result, Accepted) else result.code


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    dev = Device(tmp_path / "state" / "replay.sqlite")
    yield dev
    dev.cache.close()


def test_a_forward_step_then_an_accepted_trigger_forgets_nothing(device: Device) -> None:
    end = device.trigger("end")
    assert device.verify(end) == "accepted"
    device.at(T + 10, after_s=10)
    assert device.verify(end) == "replayed"
    device.at(T + DAY, after_s=5)  # a spoofed NTP step: one day ahead
    assert device.verify(device.trigger("start")) == "accepted"  # pruned, before
    device.at(T + 30, after_s=5)  # the clock is corrected
    assert device.verify(end) == "replayed"
    assert device.cache.mark <= T + CATCH_UP * 20  # twice the 20 s that went by, at most


def test_a_forward_step_then_a_restart_forgets_nothing(device: Device) -> None:
    end = device.trigger("end")
    assert device.verify(end) == "accepted"
    device.at(T + 7 * DAY, after_s=3)
    device.restart()  # pruned by the new clock, before
    device.restart()
    device.at(T + 40, after_s=3)
    assert device.verify(end) == "replayed"
    assert len(device.cache) == 1


def test_a_step_to_2099_shuts_nothing_out_and_forgets_nothing(device: Device) -> None:
    end = device.trigger("end")
    assert device.verify(end) == "accepted"
    device.at(Y2099, after_s=20)
    assert device.verify(device.trigger("start")) == "accepted"  # signed "in 2099" too
    device.restart()
    device.at(T + 60, after_s=20)  # corrected
    assert device.verify(end) == "replayed"
    fresh = device.trigger("start")
    assert device.verify(fresh) == "accepted"  # nothing refused for the mark's sake
    assert device.verify(fresh) == "replayed"
    assert device.cache.mark < T + 120


def test_a_clock_set_back_within_a_day_meets_the_nonce(device: Device) -> None:
    end = device.trigger("end")
    assert device.verify(end) == "accepted"
    device.at(T + 12 * 3600, after_s=12 * 3600)  # twelve hours really went by
    assert device.verify(device.trigger("start")) == "accepted"  # pruned, before
    device.restart()
    device.at(T + 30, after_s=60)  # then someone sets the clock back half a day
    assert device.verify(end) == "replayed"


def test_nonces_are_forgotten_once_the_clock_and_the_mark_are_past_them(
    device: Device,
) -> None:
    for i in range(3):
        device.at(T + i, after_s=1)
        assert device.verify(device.trigger("start")) == "accepted"
    kept = T + 2 + MAX_LIFETIME_S + SKEW_S  # the last one's keep_until
    # Ten days off, then the clock is right at once: the mark has only the uptime.
    device.restart()
    device.at(T + 10 * DAY, after_s=0)
    device.cache.prune()
    assert len(device.cache) == 3
    assert device.cache.mark < kept
    # The mark catches up at most CATCH_UP times the running time: in ten days it has.
    device.at(T + 20 * DAY, after_s=10 * DAY)
    device.cache.prune()
    assert device.cache.mark == T + 20 * DAY
    assert len(device.cache) == 0
    # ... and not before both are RETAIN_S past keep_until.
    device.at(T + 20 * DAY, after_s=1)
    assert device.verify(device.trigger("start")) == "accepted"
    device.at(T + 20 * DAY + MAX_LIFETIME_S + SKEW_S + RETAIN_S - 1, after_s=DAY)
    device.cache.prune()
    assert len(device.cache) == 1
    device.at(device.wall + 2, after_s=2)
    device.cache.prune()
    assert len(device.cache) == 0


def test_a_mark_made_from_a_clock_in_2099_goes_back_to_the_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wall, mono = [float(Y2099)], [0.0]
    path = tmp_path / "replay.sqlite"
    cache = SqliteReplayCache(path, lambda: wall[0], lambda: mono[0])  # first start, spoofed
    assert cache.mark == Y2099
    wall[0] = T  # corrected
    with caplog.at_level(logging.WARNING, logger="agent.replay"):
        cache.add("n" * 22, T + 360)
    assert "kept until it is past that again" in caplog.text
    assert cache.seen("n" * 22)
    mono[0] += REBASE_S  # a day of the clock reading before the mark
    wall[0] = T + REBASE_S
    cache.prune()
    assert cache.mark == T + REBASE_S  # taken back to the clock
    # From here a forward step is caught again, across a restart too.
    cache.add("m" * 22, T + REBASE_S + 360)
    wall[0], mono[0] = Y2099, mono[0] + 5
    cache.close()
    cache = SqliteReplayCache(path, lambda: wall[0], lambda: mono[0])
    cache.add("o" * 22, Y2099 + 360)
    assert cache.seen("m" * 22)
    cache.close()


def test_a_damaged_mark_is_replaced_by_the_clock(tmp_path: Path) -> None:
    path = tmp_path / "replay.sqlite"
    SqliteReplayCache(path, lambda: float(T)).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE mark SET wall = 'soon' WHERE id = 1")
    db.close()
    cache = SqliteReplayCache(path, lambda: float(T + 5))
    assert cache.mark == T + 5
    cache.close()
