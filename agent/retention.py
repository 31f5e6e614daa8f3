"""Retention policy: which sealed segments to delete, decided without touching disk.

Rules (DESIGN.md "Storage on the agent"):
1. A segment older than ``max_age_s`` goes, unless it is pinned (part of an
   emergency the receiver has not acknowledged yet).
2. While the store holds more than ``quota_bytes`` (plus ``need_bytes``, the
   size of a segment about to be written), the oldest unpinned segment goes.
3. Only when no unpinned segment is left do pinned ones go, oldest first:
   the caller must raise that as a loud fault (footage of an emergency lost).
Oldest means earliest end time, across all cameras.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Held:
    """One stored segment as retention sees it."""

    key: Hashable
    end_s: float
    size: int
    pinned: bool


@dataclass(slots=True)
class Plan:
    """What to delete: expired and over-quota segments, and pinned ones forced out."""

    expired: list[Hashable] = field(default_factory=list)
    over_quota: list[Hashable] = field(default_factory=list)
    pinned_lost: list[Hashable] = field(default_factory=list)

    def all(self) -> list[Hashable]:
        """Every key to delete, in order."""
        return self.expired + self.over_quota + self.pinned_lost


def plan(
    held: Iterable[Held],
    *,
    now_s: float,
    max_age_s: float,
    quota_bytes: int,
    need_bytes: int = 0,
    spare_pinned: bool = False,
) -> Plan:
    """Decide deletions for ``held`` at ``now_s``; with ``spare_pinned`` rule 3 does not
    apply (a quota that is a wish, not a full disk)."""
    result = Plan()
    keep: list[Held] = []
    for item in sorted(held, key=lambda h: h.end_s):
        if not item.pinned and item.end_s < now_s - max_age_s:
            result.expired.append(item.key)
        else:
            keep.append(item)
    used = sum(h.size for h in keep)
    budget = quota_bytes - need_bytes
    for pinned_pass in (False,) if spare_pinned else (False, True):
        for item in keep:
            if used <= budget:
                return result
            if item.pinned is pinned_pass:
                (result.pinned_lost if pinned_pass else result.over_quota).append(item.key)
                used -= item.size
    return result
