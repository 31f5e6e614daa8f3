"""Retention policy: which sealed segments to delete, decided without touching disk.

Rules (DESIGN.md "Storage on the agent"):
1. A segment older than ``max_age_s`` goes, unless it is pinned (part of an
   emergency the receiver has not acknowledged yet).
2. While the store holds more than ``quota_bytes`` (plus ``need_bytes``, the
   size of a segment about to be written), the oldest unpinned segment goes.
   The quota never takes pinned footage: while an emergency is unacknowledged
   the store may hold more than its quota (``Plan.over_quota_bytes`` says by
   how much, for the caller to report once).
3. Only a full disk takes pinned footage: given ``room_bytes`` (what the disk
   can hold of the store, the new segment included), the oldest unpinned
   segments go first, and only when none is left the oldest pinned ones, as
   many as the room needs: the caller must raise that as a loud fault
   (footage of an emergency lost).
Oldest means the greatest age, across all cameras; equal ages in the order given.
Ages are the caller's: how old each segment's footage is at least (since its
end), by whatever clock the caller trusts for it. :mod:`agent.store` does not
take the wall clock's word alone: a clock stepped forward would delete footage
early, one set back would keep it past ``max_age_s`` (see its docstring).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Held:
    """One stored segment as retention sees it."""

    key: Hashable
    age_s: float  # how old its footage is at least (its end), in seconds
    size: int
    pinned: bool


@dataclass(slots=True)
class Plan:
    """What to delete: expired and over-quota segments, and pinned ones forced out."""

    expired: list[Hashable] = field(default_factory=list)
    over_quota: list[Hashable] = field(default_factory=list)
    pinned_lost: list[Hashable] = field(default_factory=list)
    #: Bytes the store still holds beyond its quota (and ``need_bytes``) after the plan:
    #: pinned footage the quota may not take.
    over_quota_bytes: int = 0

    def all(self) -> list[Hashable]:
        """Every key to delete, in order."""
        return self.expired + self.over_quota + self.pinned_lost


def plan(
    held: Iterable[Held],
    *,
    max_age_s: float,
    quota_bytes: int,
    need_bytes: int = 0,
    room_bytes: int | None = None,
) -> Plan:
    """Decide deletions for ``held``. ``room_bytes``: the disk is full,
    it holds no more than this of the store (``need_bytes`` included), pinned footage
    too if nothing else is left (rule 3); ``None``: the disk has room, pinned footage
    stays whatever the quota."""
    result = Plan()
    keep: list[Held] = []
    # Oldest first; sorted() is stable, reversed too: equal ages keep the caller's order.
    for item in sorted(held, key=_age, reverse=True):
        if not item.pinned and item.age_s > max_age_s:
            result.expired.append(item.key)
        else:
            keep.append(item)
    used = sum(h.size for h in keep) + need_bytes
    limit = quota_bytes if room_bytes is None else min(quota_bytes, room_bytes)
    for item in keep:
        if used <= limit:
            break
        if not item.pinned:
            result.over_quota.append(item.key)
            used -= item.size
    if room_bytes is not None:
        for item in keep:
            if used <= room_bytes:
                break
            if item.pinned:
                result.pinned_lost.append(item.key)
                used -= item.size
    result.over_quota_bytes = max(0, used - quota_bytes)
    return result


def _age(item: Held) -> float:
    return item.age_s
