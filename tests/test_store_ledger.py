"""The store's observation ledger (agent/store_ledger.py): footage named ahead of a clock
set back ages by the time the agent has seen it, added up across restarts.

Found by a review (twelfth session, left then): footage from before a start aged by the
wall clock (its name) and at least by the time since that start. A Pi rebooted on a
stale date (no RTC) names its earlier footage days "in the future", and the time since
the start begins at 0 with every start: an agent restarted more often than every
``max_age_s`` kept it for ever. Real stores on temporary folders; the clocks are the
test's (a restart is a new store on the same folder; the monotonic clock of each run
starts anywhere).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import store_ledger
from agent.audit import AuditLog
from agent.store import RETAIN_EVERY_S, SegmentStore, StoredSegment
from agent.store_ledger import LEDGER_NAME, MAX_COHORTS, SAVE_EVERY_S, Cohort, Ledger, parse
from tests.media import PacketList, make_h264_packets
from tests.test_store import (
    DAY,
    FPS,
    FRAME_NS,
    GOP,
    PER_SEGMENT,
    T0_NS,
    Clock,
    Feed,
    Sealed,
    events,
    opened,
    push,
)

pytestmark = pytest.mark.timeout(60)

HOUR = 3600.0
#: The stale date a Pi without RTC boots on (a minute after the test's capture epoch).
STALE = T0_NS / 1e9 + 60
#: How far ahead of it the footage recorded before the reboot is named.
AHEAD = 5 * DAY


@pytest.fixture(scope="module")
def media() -> PacketList:
    """240 frames (8 s), 160x120, a keyframe every GOP frames (as tests/test_store.py)."""
    return make_h264_packets(240, 160, 120, fps=FPS, gop=GOP)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl", lambda: T0_NS / 1e9)
    yield log
    log.close()


def cohorts(root: Path) -> list[dict[str, Any]]:
    """The cohorts the ledger file holds, oldest first (checked as the store reads it);
    none if there is no file."""
    path = root / LEDGER_NAME
    if not path.exists():
        return []
    held = parse(json.loads(path.read_text()))
    return [{"bounds": dict(c.bounds), "observed_s": c.observed_s} for c in held]


def observed(root: Path) -> list[float]:
    return [c["observed_s"] for c in cohorts(root)]


async def record_ahead(root: Path, audit: AuditLog, media: PacketList) -> list[StoredSegment]:
    """Three segments of ``cam`` recorded on a clock that was right, :data:`AHEAD` of the
    stale date the Pi boots on next."""
    async with opened(root, audit, clock=Clock(STALE + AHEAD)) as run:
        push(run, Feed(media, "cam", offset_ns=int(AHEAD * 1e9)).take(3 * PER_SEGMENT))
    old = run.segments("cam")
    assert len(old) == 3
    assert all(s.name.end_ms / 1000 > STALE + AHEAD - 60 for s in old)
    return old


class Ticker:
    """Segments of a second camera, to know that a retention pass has run: the writer
    takes its jobs in order, so once the segment pushed after a pass is on disk, the
    pass is done. Its seqs continue across runs, as capture's do."""

    def __init__(self, media: PacketList) -> None:
        self.feed = Feed(media, "tick")
        self.at = 0.0  # retain_soon's clock
        self.sealed: Sealed | None = None
        self.store: SegmentStore | None = None

    async def start(self, store: SegmentStore, wall: Clock) -> None:
        """Seal a first segment in ``store`` (named by ``wall``), leaving a keyframe open."""
        self.store, self.sealed = store, Sealed(store)
        self.feed.seq = -(-self.feed.seq // PER_SEGMENT) * PER_SEGMENT  # at a keyframe
        self.feed.offset_ns = int(wall.t * 1e9) - T0_NS - self.feed.seq * FRAME_NS
        push(store, self.feed.take(PER_SEGMENT + 1))
        await self.sealed.wait(1)

    async def retain(self) -> None:
        """A retention pass (:meth:`SegmentStore.retain_soon`), and wait until it ran."""
        assert self.store is not None and self.sealed is not None
        self.at += RETAIN_EVERY_S
        assert self.store.retain_soon(self.at)
        n = len(self.sealed.segments)
        push(self.store, self.feed.take(PER_SEGMENT))
        await self.sealed.wait(n + 1)


# -- the defect --------------------------------------------------------------------------


async def test_footage_named_ahead_goes_once_daily_restarts_add_up_to_max_age(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Named five days ahead of a clock set back, restarted every 24 h: it went 72 h
    after no start (each start began its age at 0 again). It goes at the first pass once
    the runs add up to more than max_age_s (72 h), not before."""
    root = tmp_path / "store"
    old = await record_ahead(root, audit, media)
    ticker = Ticker(media)
    for day in range(3):  # restarted every 24 h, on the stale date each time
        wall, mono = Clock(STALE + day * DAY), Clock(500.0 + 7 * day)  # monotonic: anywhere
        async with opened(root, audit, clock=wall, monotonic=mono) as store:
            await ticker.start(store, wall)
            wall.t += DAY
            mono.t += DAY
            await ticker.retain()
            assert store.segments("cam") == old  # seen 24, 48, 72 h: not past 72 h
    assert observed(root) == [DAY, DAY, DAY]
    assert all(c["bounds"]["cam"] == old[-1].last_seq for c in cohorts(root))

    wall, mono = Clock(STALE + 3 * DAY), Clock(3.0)
    async with opened(root, audit, clock=wall, monotonic=mono) as store:
        await ticker.start(store, wall)
        await ticker.retain()
        assert store.segments("cam") == old  # exactly 72 h: kept
        wall.t += 1
        mono.t += 1
        await ticker.retain()
        assert store.segments("cam") == []
        assert store.segments("tick")  # this footage is younger: kept
    assert not any(s.path.exists() for s in old)
    assert any(e["newest_end_ms"] == old[-1].name.end_ms for e in events(audit, "segments_expired"))
    assert len(events(audit, "store_clock_behind")) == 4  # each start said it
    assert "cam" not in {cam for c in cohorts(root) for cam in c["bounds"]}  # gone with it


async def test_a_kill_loses_at_most_the_save_interval(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """The ledger is saved at the start, on a retention pass at most every SAVE_EVERY_S,
    and at close. A run killed (no close) loses what it saw since its last save: less
    than SAVE_EVERY_S, counted by no one (the footage goes that much later, never
    earlier)."""
    root = tmp_path / "store"
    old = await record_ahead(root, audit, media)
    ledger = root / LEDGER_NAME
    ticker = Ticker(media)
    wall, mono = Clock(STALE), Clock(100.0)
    async with opened(root, audit, clock=wall, monotonic=mono) as run1:
        await ticker.start(run1, wall)
        assert observed(root) == [0.0]  # this run's cohort, saved at the start
        assert ledger.stat().st_mode & 0o777 == 0o600
        mono.t = 100 + SAVE_EVERY_S - 1
        await ticker.retain()
        assert observed(root) == [0.0]  # not due yet
        mono.t = 100 + SAVE_EVERY_S
        await ticker.retain()
        assert observed(root) == [SAVE_EVERY_S]
        mono.t = 100 + 2 * SAVE_EVERY_S - 1
        await ticker.retain()
        killed = ledger.read_bytes()  # what the card holds if the agent is killed now
    assert observed(root) == [2 * SAVE_EVERY_S - 1]  # close saves all of it
    ledger.write_bytes(killed)  # ... but it was killed
    assert observed(root) == [SAVE_EVERY_S]

    # The kill's loss (SAVE_EVERY_S - 1 s) keeps it that much longer; never less.
    wall, mono = Clock(STALE + 2 * SAVE_EVERY_S), Clock(0.0)
    max_age = SAVE_EVERY_S + 100
    async with opened(root, audit, clock=wall, monotonic=mono, max_age_s=max_age) as run2:
        await ticker.start(run2, wall)
        mono.t = 100
        await ticker.retain()
        assert run2.segments("cam") == old
        mono.t = 100.5
        await ticker.retain()
        assert run2.segments("cam") == []


async def test_writing_segments_never_writes_the_ledger(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Per segment the store writes nothing more than before: the ledger is saved on
    the retention pass the agent asks for (once a minute at most), when due."""
    root = tmp_path / "store"
    await record_ahead(root, audit, media)
    ledger = root / LEDGER_NAME
    wall, mono = Clock(STALE), Clock(0.0)
    async with opened(root, audit, clock=wall, monotonic=mono) as store:
        ticker = Ticker(media)
        await ticker.start(store, wall)
        saved = ledger.read_bytes(), ledger.stat().st_mtime_ns, ledger.stat().st_ino
        mono.t = 10 * SAVE_EVERY_S  # long due
        sealed = ticker.sealed
        assert sealed is not None
        for n in range(2, 7):
            push(store, ticker.feed.take(PER_SEGMENT))
            await sealed.wait(n)
        assert (ledger.read_bytes(), ledger.stat().st_mtime_ns, ledger.stat().st_ino) == saved
        await ticker.retain()
        assert observed(root) == [10 * SAVE_EVERY_S]


# -- order: oldest first, by what is known of each ------------------------------------------


async def record_then_set_back_twice(
    root: Path, audit: AuditLog, media: PacketList
) -> tuple[list[StoredSegment], list[StoredSegment], Ticker]:
    """``a``: named AHEAD of the stale date, then seen 48 h by a run on the stale
    date, which recorded ``b`` at its end (named by that clock: before ``a``'s names,
    yet younger)."""
    feed = Feed(media, "cam", offset_ns=int(AHEAD * 1e9))
    async with opened(root, audit, clock=Clock(STALE + AHEAD)) as run_a:
        push(run_a, feed.take(3 * PER_SEGMENT))
    a = run_a.segments("cam")
    ticker = Ticker(media)
    wall, mono = Clock(STALE), Clock(50.0)
    async with opened(root, audit, clock=wall, monotonic=mono) as run_b:
        await ticker.start(run_b, wall)
        wall.t += 2 * DAY
        mono.t += 2 * DAY
        feed.seq = -(-feed.seq // PER_SEGMENT) * PER_SEGMENT
        feed.offset_ns = int(wall.t * 1e9) - T0_NS - feed.seq * FRAME_NS
        push(run_b, feed.take(3 * PER_SEGMENT))
    b = run_b.segments("cam")[len(a) :]
    assert len(b) == 3
    assert all(x.name.end_ms < y.name.end_ms for x in b for y in a)  # named before a
    assert observed(root) == [2 * DAY]
    return a, b, ticker


async def test_footage_seen_longest_goes_first_though_named_later(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Before the ledger, footage from before the start was in order of its names, and
    that order was its age's. Now ``a`` (named days ahead, seen 48 h before this start)
    is older than ``b`` (named before it, recorded at the end of those 48 h): retention
    stops at the first footage not yet expired, so by names it would keep ``a``."""
    root = tmp_path / "store"
    a, b, ticker = await record_then_set_back_twice(root, audit, media)
    wall, mono = Clock(b[-1].name.end_ms / 1000 + 10), Clock(9.0)  # the stale clock again
    async with opened(root, audit, clock=wall, monotonic=mono) as run_c:
        await ticker.start(run_c, wall)
        wall.t += DAY
        mono.t += DAY
        await ticker.retain()
        assert run_c.segments("cam") == a + b  # a: seen 72 h
        wall.t += 1
        mono.t += 1
        await ticker.retain()
        assert run_c.segments("cam") == b  # b: 24 h old
    assert not any(s.path.exists() for s in a)


async def test_a_clock_step_puts_the_footage_in_order_again(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Ordered at the start, ``a`` (seen 48 h) came before ``b`` (named seconds before
    the clock). NTP then steps the clock 95 h forward: ``b``'s name makes it the older,
    and it goes when its name says (not when ``a`` does, 47 h later)."""
    root = tmp_path / "store"
    a, b, ticker = await record_then_set_back_twice(root, audit, media)
    wall, mono = Clock(b[-1].name.end_ms / 1000 + 10), Clock(9.0)
    async with opened(root, audit, clock=wall, monotonic=mono, max_age_s=100 * HOUR) as run_c:
        await ticker.start(run_c, wall)
        wall.t = b[-1].name.end_ms / 1000 + 95 * HOUR  # NTP
        await ticker.retain()
        assert run_c.segments("cam") == a + b
        wall.t += 5 * HOUR + 60
        mono.t += 5 * HOUR + 60
        await ticker.retain()
        assert run_c.segments("cam") == a  # b: 100 h and a minute by its name; a: 53 h
        mono.t = 9.0 + 52 * HOUR
        wall.t = b[-1].name.end_ms / 1000 + 95 * HOUR + 52 * HOUR  # no step
        await ticker.retain()
        assert run_c.segments("cam") == a  # seen 100 h, and not by its name
        mono.t += 1
        wall.t += 1
        await ticker.retain()
        assert run_c.segments("cam") == []


# -- a damaged ledger -------------------------------------------------------------------


def tampered(text: str) -> str:
    """A digit changed: valid JSON, the checksum no longer matches."""
    doc = json.loads(text)
    doc["cohorts"][0]["observed_s"] = 10 * DAY
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (tampered, "checksum"),
        (lambda text: "[]", "not a ledger"),
        (lambda text: text.replace('"version": 1', '"version": 2'), "version 2"),
    ],
    ids=["torn", "tampered", "not-a-ledger", "other-version"],
)
async def test_a_damaged_ledger_is_audited_and_a_fresh_one_started(
    tmp_path: Path, audit: AuditLog, media: PacketList, damage: Any, why: str
) -> None:
    """A ledger that cannot be trusted counts nothing (the footage then ages as before
    the ledger: kept, never deleted early) and is audited; the store opens."""
    root = tmp_path / "store"
    old = await record_ahead(root, audit, media)
    ticker = Ticker(media)
    wall, mono = Clock(STALE), Clock(0.0)
    async with opened(root, audit, clock=wall, monotonic=mono) as run1:
        await ticker.start(run1, wall)
        mono.t += 2 * DAY
        wall.t += 2 * DAY
    assert observed(root) == [2 * DAY]
    ledger = root / LEDGER_NAME
    ledger.write_text(damage(ledger.read_text()))

    wall, mono = Clock(STALE + 2 * DAY), Clock(0.0)
    async with opened(root, audit, clock=wall, monotonic=mono) as run2:
        (said,) = events(audit, "store_ledger_unreadable")
        assert said["file"] == LEDGER_NAME
        assert why in said["error"]
        await ticker.start(run2, wall)
        assert cohorts(root)  # replaced at the start: it reads again
        mono.t += 1
        wall.t += 1
        await ticker.retain()
        assert run2.segments("cam") == old  # neither 10 days (tampered) nor 48 h + 1 s
        mono.t = 3 * DAY + 1
        await ticker.retain()
        assert run2.segments("cam") == []  # as before the ledger: 72 h after the start
    assert len(events(audit, "store_ledger_unreadable")) == 1
    assert events(audit, "store_foreign_file") == []


async def test_a_ledger_that_cannot_be_read_or_written_does_not_stop_the_store(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """A folder where the ledger belongs: neither read nor written. Said once each; the
    store records on, and footage from before the start ages as before the ledger."""
    root = tmp_path / "store"
    old = await record_ahead(root, audit, media)
    (root / LEDGER_NAME).mkdir()
    ticker = Ticker(media)
    wall, mono = Clock(STALE), Clock(0.0)
    async with opened(root, audit, clock=wall, monotonic=mono) as store:
        await ticker.start(store, wall)
        mono.t = SAVE_EVERY_S
        await ticker.retain()  # a save tried again: failed again, not said again
        mono.t = 3 * DAY + 1
        await ticker.retain()
        assert store.segments("cam") == []
        assert ticker.sealed is not None and len(ticker.sealed.segments) == 3  # recording on
    (unreadable,) = events(audit, "store_ledger_unreadable")
    assert "IsADirectoryError" in unreadable["error"]
    (unsaved,) = events(audit, "store_ledger_unsaved")
    assert unsaved["file"] == LEDGER_NAME
    assert not any(s.path.exists() for s in old)
    assert store.stats.write_errors == 0


# -- kept small ---------------------------------------------------------------------------


async def test_cohorts_go_with_their_footage(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """The clock right: footage goes by its name, as before; a cohort loses a camera
    once none of its footage is left, and goes once it holds none."""
    root = tmp_path / "store"
    a, b = Feed(media, "a"), Feed(media, "b", offset_ns=2 * DAY * 10**9)
    async with opened(root, audit, clock=Clock(STALE + 2 * DAY)) as run0:
        push(run0, a.take(2 * PER_SEGMENT))
        push(run0, b.take(2 * PER_SEGMENT))
    old_a, old_b = run0.segments("a"), run0.segments("b")
    assert (len(old_a), len(old_b)) == (2, 2)

    wall = Clock(old_a[-1].name.end_ms / 1000 + 72 * HOUR)  # a: 72 h old, b: a day
    mono = Clock(0.0)
    async with opened(root, audit, clock=wall, monotonic=mono) as run1:
        assert cohorts(root) == [
            {"bounds": {"a": old_a[-1].last_seq, "b": old_b[-1].last_seq}, "observed_s": 0.0}
        ]
        wall.t += 1
        mono.t += 1
        assert run1.retain_soon(0.0)
    assert run1.segments("a") == []  # by its name, as before the ledger
    assert run1.segments("b") == old_b
    assert cohorts(root) == [{"bounds": {"b": old_b[-1].last_seq}, "observed_s": 1.0}]

    wall.t = old_b[-1].name.end_ms / 1000 + 72 * HOUR + 1
    async with opened(root, audit, clock=wall, monotonic=Clock(5.0)) as run2:
        # The same footage as at the last start: one cohort, its time carried on.
        assert cohorts(root) == [{"bounds": {"b": old_b[-1].last_seq}, "observed_s": 1.0}]
        assert run2.retain_soon(0.0)
    assert run2.segments("b") == []
    assert cohorts(root) == []


async def test_daily_restarts_with_the_clock_right_keep_the_ledger_trivially_small(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """A week of daily restarts, recording, the clock right: what goes is what goes by
    the names (as before the ledger), and the ledger holds two cohorts, not seven."""
    root = tmp_path / "store"
    ticker = Ticker(media)
    written: list[StoredSegment] = []
    for day in range(7):
        wall, mono = Clock(STALE + day * DAY), Clock(1.0)
        async with opened(root, audit, clock=wall, monotonic=mono) as store:
            await ticker.start(store, wall)
            wall.t += DAY
            mono.t += DAY
            await ticker.retain()
            last_pass = wall.t
        written += [s for s in store.segments("tick") if s not in written]
        by_name = [s for s in written if last_pass - s.name.end_ms / 1000 <= 72 * HOUR]
        assert store.segments("tick") == by_name
        assert len(cohorts(root)) <= 2
    assert (root / LEDGER_NAME).stat().st_size < 1000
    assert events(audit, "store_ledger_unreadable") == events(audit, "store_foreign_file") == []


async def test_restarts_with_nothing_recorded_add_to_one_cohort(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Every camera down: each start finds the same footage; its time adds to one
    cohort (exactly), and the footage goes once the runs add up to 72 h."""
    root = tmp_path / "store"
    old = await record_ahead(root, audit, media)
    for run in range(5):
        mono = Clock(0.0)
        async with opened(root, audit, clock=Clock(STALE), monotonic=mono) as store:
            mono.t = 14 * HOUR
        assert store.segments("cam") == old
        assert observed(root) == [14 * HOUR * (run + 1)]
    mono = Clock(0.0)
    async with opened(root, audit, clock=Clock(STALE), monotonic=mono) as store:
        mono.t = 2 * HOUR + 1
        assert store.retain_soon(0.0)
    assert store.segments("cam") == []


async def test_the_number_of_cohorts_is_capped(
    tmp_path: Path, audit: AuditLog, media: PacketList
) -> None:
    """Restarted more often than the footage goes, recording each time: a cohort a start,
    at most MAX_COHORTS; the oldest merge (never making footage look older)."""
    root = tmp_path / "store"
    old = await record_ahead(root, audit, media)
    ticker = Ticker(media)
    runs = MAX_COHORTS + 4
    firsts = []  # the first seq of each run's ticks
    for _ in range(runs):
        wall, mono = Clock(STALE), Clock(0.0)
        async with opened(root, audit, clock=wall, monotonic=mono) as store:
            await ticker.start(store, wall)
            assert ticker.sealed is not None
            firsts.append(ticker.sealed.segments[0].first_seq)
            mono.t = 60.0
    held = cohorts(root)
    assert len(held) == MAX_COHORTS
    assert sum(c["observed_s"] for c in held) == 60.0 * runs  # merged: times added
    # The oldest footage was in every cohort: it lost nothing.
    assert all(c["bounds"]["cam"] == old[-1].last_seq for c in held)
    assert store.segments("cam") == old
    # What a run recorded was seen by the runs after it, at most.
    for seg in store.segments("tick"):
        run = bisect.bisect_right(firsts, seg.first_seq) - 1
        seen = sum(c["observed_s"] for c in held if c["bounds"].get("tick", -1) >= seg.last_seq)
        assert seen <= 60.0 * (runs - 1 - run)


# -- the ledger alone -----------------------------------------------------------------------

CAMERAS = ("a", "b", "c")


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Cohort], dict[str, list[int]]]:
    """Earlier cohorts, anything a file may hold, and the last seqs on disk per camera."""
    seqs = st.integers(0, 60)
    past = draw(
        st.lists(
            st.builds(
                Cohort,
                st.dictionaries(st.sampled_from(CAMERAS), seqs, max_size=3),
                st.floats(0, 1e6, allow_nan=False),
            ),
            max_size=2 * MAX_COHORTS,
        )
    )
    disk = draw(st.dictionaries(st.sampled_from(CAMERAS), st.lists(seqs, min_size=1, max_size=6)))
    return past, disk


def seen(past: list[Cohort], camera: str, last_seq: int) -> float:
    """The definition: the time of every cohort holding it."""
    return sum(c.observed_s for c in past if c.bounds.get(camera, -1) >= last_seq)


@settings(max_examples=200, deadline=None)
@given(histories(), st.floats(0, 1e5, allow_nan=False), st.sampled_from([2, 3, 5, MAX_COHORTS]))
def test_the_ledger_never_makes_footage_older(
    history: tuple[list[Cohort], dict[str, list[int]]], live: float, cap: int
) -> None:
    """Cut, merged and capped as it may be, no segment on disk accrues more than the
    cohorts holding it saw; below the cap exactly that. No bound stays above the highest
    seq on disk (what a run writes is above it), and a save reads back the same."""
    past, disk = history
    lowest = {cam: min(s) for cam, s in disk.items()}
    highest = {cam: max(s) for cam, s in disk.items()}
    ledger = Ledger(Path("/nonexistent/ledger.json"), max_cohorts=cap)
    ledger.past = list(past)
    ledger.start(lowest, highest)
    assert len(ledger.past) + bool(ledger.bounds) <= cap
    assert all(seq <= highest[cam] for c in ledger.past for cam, seq in c.bounds.items())
    exact = len(past) + 1 <= cap
    for cam, last_seqs in disk.items():
        for seq in last_seqs:
            got, want = ledger.accrued(cam, seq), seen(past, cam, seq)
            assert got <= want * (1 + 1e-12) + 1e-9
            if exact:
                assert got == pytest.approx(want, rel=1e-12, abs=1e-9)
    # A save holds this run's time too (rounded down to the ms), and it reads back.
    saved = parse(json.loads(json.dumps(ledger.doc(live))))
    for cam, last_seqs in disk.items():
        for seq in last_seqs:
            now = ledger.accrued(cam, seq) + live
            assert now - 1e-3 - 1e-9 * now <= seen(saved, cam, seq) <= now * (1 + 1e-12) + 1e-9
    # Footage deleted from the oldest end: what is left accrues the same.
    for cam, last_seqs in disk.items():
        rest = sorted(last_seqs)[1:]
        before = [ledger.accrued(cam, seq) for seq in rest]
        ledger.cut({**lowest, cam: min(rest, default=10**9)})
        assert [ledger.accrued(cam, seq) for seq in rest] == pytest.approx(before, rel=1e-12)
        lowest[cam] = min(rest, default=10**9)


def test_a_ledger_file_round_trips_and_refuses_what_it_did_not_write(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    ledger = Ledger(path)
    assert ledger.load() is None and ledger.past == []
    ledger.start({"cam": 5}, {"cam": 9})
    assert ledger.save(ledger.doc(12.3456))
    assert not ledger.save(ledger.doc(12.3456))  # the same: not written again
    fresh = Ledger(path)
    assert fresh.load() is None
    assert fresh.past == [Cohort({"cam": 9}, 12.345)]  # rounded down: never more
    for bounds, observed_s, why in (
        ({"cam": -1}, 1.0, "not seqs"),
        ({"cam": True}, 1.0, "not seqs"),
        ({"cam": 1.0}, 1.0, "not seqs"),
        ({"cam": 1}, math.inf, "not a duration"),
        ({"cam": 1}, -1.0, "not a duration"),
        ({"cam": 1}, "1", "not a duration"),
    ):
        body = [{"bounds": bounds, "observed_s": observed_s}]
        with pytest.raises(ValueError, match=why):  # its checksum right: refused all the same
            parse({"version": 1, "cohorts": body, "sha256": store_ledger._digest(body)})
    with pytest.raises(ValueError, match="not a ledger"):
        parse({"version": True, "cohorts": [], "sha256": store_ledger._digest([])})
