"""The store's observation ledger: how long the footage found at a start has been seen.

:mod:`agent.store` ages footage from before its start by the wall clock (the end
time in its name) and, at least, by how long this run has been up. A Pi's wall
clock can be days behind its footage (a reboot on a stale date, no RTC): the
name then says nothing, and "this run" restarts at 0 with every start, so an
agent restarted more often than every ``max_age_s`` kept such footage for ever.
This ledger, a small file in the store's folder (:data:`LEDGER_NAME`, written
whole or not at all by :func:`agent.statefile.write_json`), lets that lower
bound add up across restarts.

Sequence numbers continue across restarts and only grow, and a run never
writes a seq at or below the highest on disk at its start (the agent reserves
its numbers above the store's: :func:`agent.state_files.sequence_reservations`).
So the footage present at a start is a *cohort*, ``{camera: highest last seq on
disk}``: a segment of that camera whose last seq is at or below the bound was
captured before that start. Each run adds its cohort and records how long it has
been up (``observed_s``, monotonic). A segment's *accrued* age is the sum of
``observed_s`` over the cohorts that hold it (bound >= its last seq). Runs do
not overlap in time and each came after the capture of what its cohort holds,
so the sum is at most the footage's true age: time powered off, and what a run
did not save before it was killed (at most :data:`SAVE_EVERY_S`), is not counted.
Nothing is deleted early on its account; a ledger that cannot be read counts
nothing (the store audits it and starts a fresh one).

Kept small, and never in a way that makes footage look older:

- At a start every earlier cohort is cut to the footage on disk: a bound is
  lowered to the camera's highest last seq on disk (nothing above it is on
  disk, so no accrued age changes, and nothing written later, above it, can ever
  fall under it), and a camera with no segment at or below its bound is dropped
  (it holds nothing). The same cut (lowest seqs) runs at every save. A cohort
  left with no camera, or with no observed time (a run killed before its first
  save), goes.
- Neighbouring cohorts with the same bounds are one, their times added (exact).
- At most :data:`MAX_COHORTS` (this run's included): beyond it the two oldest
  become one, with per camera the lower of their bounds (a camera in only one of
  them is dropped) and their times added. A segment the merged cohort holds was
  in both, so its accrued age is unchanged; one that was in only one of them
  loses that one's time (it looks younger, never older).
- The file carries a SHA-256 of its cohorts: a flipped digit on the card must
  not make footage look older than it is.

In the usual case (the clock right) the file holds a cohort per start of the
last ``max_age_s`` (their footage is gone after that), and it is written at a
start, every :data:`SAVE_EVERY_S` on the store's retention pass, and at close:
never per segment.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.statefile import read_json, write_json

#: The ledger's file in the store's top folder (not a camera id: those start [a-z0-9]).
LEDGER_NAME: Final = ".ledger.json"
#: The store's top-folder names that are the ledger's (its file, and the temporary
#: file of a write a crash cut short): the scan leaves them alone, unaudited.
LEDGER_FILES: Final = frozenset({LEDGER_NAME, f".{LEDGER_NAME}.tmp"})
#: Cohorts kept at most, this run's included (a few KB per camera).
MAX_COHORTS: Final = 32
#: The store saves this run's observed time at most this often (and at close).
SAVE_EVERY_S: Final = 300.0
VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Cohort:
    """The footage on disk at one start (per camera, its highest last seq), and how
    long the store has seen it: ``observed_s`` seconds."""

    bounds: Mapping[str, int]
    observed_s: float


def parse(doc: Any) -> list[Cohort]:
    """The cohorts of a ledger file's JSON, oldest first; ValueError if it is not one."""
    if not isinstance(doc, dict) or type(doc.get("version")) is not int:
        raise ValueError("not a ledger")
    if doc["version"] != VERSION:
        raise ValueError(f"ledger version {doc['version']}, expected {VERSION}")
    body = doc.get("cohorts")
    if not isinstance(body, list):
        raise ValueError("no list of cohorts")
    if doc.get("sha256") != _digest(body):
        raise ValueError("its checksum does not match its cohorts")
    cohorts = []
    for item in body:
        bounds = item.get("bounds") if isinstance(item, dict) else None
        observed = item.get("observed_s") if isinstance(item, dict) else None
        if not isinstance(bounds, dict) or not all(
            type(seq) is int and seq >= 0 for seq in bounds.values()
        ):
            raise ValueError(f"a cohort's bounds are not seqs: {str(item)[:80]}")
        if (
            not isinstance(observed, int | float)
            or isinstance(observed, bool)
            or not 0 <= observed < math.inf
        ):
            raise ValueError(f"a cohort's observed time is not a duration: {observed!r}")
        cohorts.append(Cohort(dict(bounds), float(observed)))
    return cohorts


def to_doc(cohorts: list[Cohort]) -> dict[str, Any]:
    """The JSON of a ledger file holding ``cohorts`` (oldest first)."""
    body = [{"bounds": dict(sorted(c.bounds.items())), "observed_s": c.observed_s} for c in cohorts]
    return {"version": VERSION, "cohorts": body, "sha256": _digest(body)}


def _digest(body: Any) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _floor_ms(seconds: float) -> float:
    """``seconds`` rounded down to the millisecond: what is saved is never more."""
    return math.floor(max(0.0, seconds) * 1000) / 1000


def _holding(bounds: Mapping[str, int], lowest: Mapping[str, int]) -> dict[str, int]:
    """``bounds`` of the cameras whose lowest last seq on disk is at or below them."""
    return {cam: seq for cam, seq in bounds.items() if cam in lowest and lowest[cam] <= seq}


class Ledger:
    """The cohorts of earlier starts and this run's; the file at ``path``.

    Not thread-safe: the store calls it under its lock (and saves from one thread).
    """

    def __init__(self, path: Path, *, max_cohorts: int = MAX_COHORTS) -> None:
        if max_cohorts < 2:
            raise ValueError("a ledger keeps at least two cohorts")
        self.path = path
        self.max_cohorts = max_cohorts
        #: Cohorts of earlier starts, oldest first.
        self.past: list[Cohort] = []
        #: This run's cohort: per camera, the highest last seq on disk at its start.
        #: It holds every segment found at the start.
        self.bounds: dict[str, int] = {}
        #: Observed time of this run's cohort before this start: earlier cohorts with
        #: the same bounds, merged into it.
        self.base_s = 0.0
        #: Per camera, the earlier cohorts' bounds ascending, and for each position
        #: the sum of observed_s from it to the end (one more: 0).
        self._tables: dict[str, tuple[list[int], list[float]]] = {}
        #: What the file holds (a save of the same is skipped); None: damaged.
        self._saved: dict[str, Any] | None = to_doc([])

    def load(self) -> str | None:
        """Read the file (none: no cohorts). A damaged or unreadable one counts
        nothing, is replaced at the next save, and is what this returns, as text for
        the audit trail (None: nothing wrong)."""
        try:
            doc = read_json(self.path)
            self.past = [] if doc is None else parse(doc)
        except Exception as exc:  # whatever the contents: never a store that cannot open
            self.past = []
            self._saved = None
            return f"{type(exc).__name__}: {exc}"[:200]
        self._saved = to_doc(self.past)
        return None

    def start(self, lowest: Mapping[str, int], highest: Mapping[str, int]) -> None:
        """Begin this run's cohort, ``highest`` (per camera, the highest last seq on
        disk), after cutting the earlier ones to the footage on disk (``lowest``: per
        camera, the lowest last seq), and keep at most ``max_cohorts``."""
        past = []
        for cohort in self.past:
            holding = _holding(cohort.bounds, lowest)
            bounds = {cam: min(seq, highest[cam]) for cam, seq in holding.items()}
            if bounds and cohort.observed_s > 0:
                past.append(Cohort(bounds, cohort.observed_s))
        self.past, self.bounds, self.base_s = past, dict(highest), 0.0
        self._merge_equal()
        while len(self.past) + bool(self.bounds) > self.max_cohorts:
            older, newer = self.past[0], self.past[1]
            both = {
                cam: min(seq, newer.bounds[cam])
                for cam, seq in older.bounds.items()
                if cam in newer.bounds
            }
            self.past[:2] = [Cohort(both, older.observed_s + newer.observed_s)] if both else []
        self._tables = _tables(self.past)

    def cut(self, lowest: Mapping[str, int]) -> None:
        """Drop what holds no segment on disk any more (``lowest``: per camera, the
        lowest last seq indexed). No segment's accrued age changes."""
        self.past = [
            Cohort(bounds, cohort.observed_s)
            for cohort in self.past
            if (bounds := _holding(cohort.bounds, lowest))
        ]
        self.bounds = _holding(self.bounds, lowest)
        if not self.bounds:
            self.base_s = 0.0
        self._merge_equal()
        self._tables = _tables(self.past)

    @property
    def accrues(self) -> bool:
        """Whether any segment found at the start accrued time before it."""
        return bool(self.past) or self.base_s > 0

    def accrued(self, camera: str, last_seq: int) -> float:
        """Seconds the segment of ``camera`` ending at ``last_seq`` was seen before this
        start (this run's time comes on top: every segment found at the start is in
        this run's cohort)."""
        return self.accrual()(camera, last_seq)

    def accrual(self) -> Callable[[str, int], float]:
        """:meth:`accrued` as the ledger is now. :meth:`cut` changes no segment's
        accrued age, but may add the same times in another order (another last bit):
        the store keeps its order by this, fixed for the run."""
        own, base, tables = self.bounds, self.base_s, self._tables  # never changed in place

        def accrued(camera: str, last_seq: int) -> float:
            total = base if own.get(camera, -1) >= last_seq else 0.0
            table = tables.get(camera)
            if table is not None:
                bounds, sums = table
                total += sums[bisect.bisect_left(bounds, last_seq)]
            return total

        return accrued

    def doc(self, live_s: float) -> dict[str, Any]:
        """The file's JSON with this run up for ``live_s`` seconds."""
        cohorts = list(self.past)
        if self.bounds:
            cohorts.append(Cohort(dict(self.bounds), _floor_ms(self.base_s + live_s)))
        return to_doc(cohorts)

    def save(self, doc: dict[str, Any]) -> bool:
        """Write ``doc`` (:meth:`doc`) unless the file holds it already; whether it was
        written. Raises OSError."""
        if doc == self._saved:
            return False
        write_json(self.path, doc)
        self._saved = doc
        return True

    def _merge_equal(self) -> None:
        """Make neighbouring cohorts with the same bounds one, their times added."""
        merged: list[Cohort] = []
        for cohort in self.past:
            if merged and merged[-1].bounds == cohort.bounds:
                cohort = Cohort(cohort.bounds, merged.pop().observed_s + cohort.observed_s)
            merged.append(cohort)
        if merged and self.bounds and merged[-1].bounds == self.bounds:
            self.base_s += merged.pop().observed_s
        self.past = merged


def _tables(past: list[Cohort]) -> dict[str, tuple[list[int], list[float]]]:
    per_camera: dict[str, list[tuple[int, float]]] = {}
    for cohort in past:
        for cam, seq in cohort.bounds.items():
            per_camera.setdefault(cam, []).append((seq, cohort.observed_s))
    tables = {}
    for cam, entries in per_camera.items():
        entries.sort()
        sums = [0.0] * (len(entries) + 1)
        for i in range(len(entries) - 1, -1, -1):
            sums[i] = sums[i + 1] + entries[i][1]
        tables[cam] = ([seq for seq, _ in entries], sums)
    return tables
