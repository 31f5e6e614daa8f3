"""Retention policy (agent/retention.py): the documented rules as examples, then as properties."""

from __future__ import annotations

from collections.abc import Hashable

from hypothesis import given
from hypothesis import strategies as st

from agent.retention import Held, Plan, plan

DAY = 86_400.0


def h(key: Hashable, age_s: float, size: int = 10, *, pinned: bool = False) -> Held:
    """A segment whose footage is ``age_s`` seconds old."""
    return Held(key, age_s, size, pinned)


def decide(
    held: list[Held],
    quota: int = 1000,
    need: int = 0,
    max_age: float = DAY,
    room: int | None = None,
) -> Plan:
    return plan(held, max_age_s=max_age, quota_bytes=quota, need_bytes=need, room_bytes=room)


# -- rule 1: age ---------------------------------------------------------------------------


def test_expired_unpinned_go_and_pinned_stay() -> None:
    result = decide([h("old", DAY + 1), h("old-pinned", 3 * DAY, pinned=True), h("new", 10)])
    assert result.expired == ["old"]
    assert result.over_quota == result.pinned_lost == []


def test_exactly_max_age_is_kept() -> None:
    assert decide([h("edge", DAY)]).all() == []


# -- rule 2: quota -------------------------------------------------------------------------


def test_over_quota_oldest_unpinned_first() -> None:
    held = [h("c", 10), h("a", 30), h("b", 20), h("d", 5)]
    result = decide(held, quota=25)
    assert result.over_quota == ["a", "b"]
    assert result.expired == result.pinned_lost == []


def test_need_bytes_make_room_for_the_next_segment() -> None:
    held = [h("a", 30), h("b", 20), h("c", 10)]
    assert decide(held, quota=30).all() == []
    assert decide(held, quota=30, need=5).over_quota == ["a"]
    assert decide(held, quota=30, need=11).over_quota == ["a", "b"]


def test_oldest_means_earliest_end_across_cameras() -> None:
    held = [
        h(("cam-a", 1), 50),
        h(("cam-b", 1), 40),
        h(("cam-a", 2), 30),
        h(("cam-b", 2), 20),
    ]
    assert decide(held, quota=20).over_quota == [("cam-a", 1), ("cam-b", 1)]


def test_equal_ages_go_in_the_order_given() -> None:
    """The store gives every segment from before its start at least the age of the run
    (a clock set back must not keep them past their age): equal ages, in the order the
    store keeps them (oldest end first), and before anything written since."""
    held = [h("old-1", 100), h("old-2", 100), h("old-3", 100), h("new", 40)]
    assert decide(held, quota=20).over_quota == ["old-1", "old-2"]
    assert decide(held[::-1], quota=20).over_quota == ["old-3", "old-2"]
    assert decide(held, max_age=99).expired == ["old-1", "old-2", "old-3"]


def test_expired_count_towards_the_quota() -> None:
    # The expired segment frees its bytes, so nothing else has to go.
    result = decide([h("old", 2 * DAY, 50), h("new", 1, 50)], quota=50)
    assert result.expired == ["old"]
    assert result.over_quota == []


# -- rule 3: pinned only on a full disk, and only when nothing else is left ----------------


def test_pinned_skipped_while_unpinned_remain() -> None:
    held = [h("p1", 50, pinned=True), h("u1", 40), h("p2", 30, pinned=True), h("u2", 20)]
    result = decide(held, quota=20, room=20)
    assert result.over_quota == ["u1", "u2"]
    assert result.pinned_lost == []


def test_the_quota_never_takes_pinned_footage() -> None:
    """A quota is a wish, not a full disk: an emergency the receiver does not have yet
    keeps its footage beyond it, and the plan says by how much (found by a review:
    pinned footage went to the quota with the disk three quarters empty)."""
    held = [
        h("p1", 50, pinned=True),
        h("u1", 40),
        h("p2", 30, pinned=True),
        h("p3", 20, pinned=True),
    ]
    result = decide(held, quota=15)
    assert result.all() == ["u1"]
    assert result.over_quota_bytes == 30 - 15
    assert decide(held, quota=15, need=5).over_quota_bytes == 35 - 15
    assert decide(held, quota=40).over_quota_bytes == 0


def test_a_full_disk_takes_pinned_oldest_first_when_nothing_else_is_left() -> None:
    held = [
        h("p1", 50, pinned=True),
        h("u1", 40),
        h("p2", 30, pinned=True),
        h("p3", 20, pinned=True),
    ]
    result = decide(held, quota=1000, room=15)
    assert result.over_quota == ["u1"]
    assert result.pinned_lost == ["p1", "p2"]
    assert result.all() == ["u1", "p1", "p2"]
    assert decide(held, quota=1000, room=15, need=5).pinned_lost == ["p1", "p2"]
    assert decide(held, quota=1000, room=15, need=6).pinned_lost == ["p1", "p2", "p3"]


def test_a_full_disk_takes_only_the_room_it_needs_of_pinned_footage() -> None:
    """Unpinned footage goes to the quota as always; pinned footage only to the room."""
    held = [h("p1", 50, pinned=True), h("u1", 40), h("p2", 30, pinned=True), h("u2", 20)]
    result = decide(held, quota=5, room=15)
    assert result.over_quota == ["u1", "u2"]
    assert result.pinned_lost == ["p1"]
    assert result.over_quota_bytes == 10 - 5


def test_empty_store() -> None:
    assert decide([], quota=0, need=10).all() == []


# -- properties ----------------------------------------------------------------------------

segments = st.lists(
    st.tuples(
        st.floats(0, 4 * DAY, allow_nan=False),  # age
        st.integers(0, 200),  # size
        st.booleans(),  # pinned
    ),
    max_size=30,
)


def _held(items: list[tuple[float, int, bool]]) -> list[Held]:
    return [Held(i, age, size, pinned) for i, (age, size, pinned) in enumerate(items)]


@given(
    items=segments,
    quota=st.integers(0, 3000),
    need=st.integers(0, 400),
    room=st.none() | st.integers(0, 3000),
)
def test_properties(
    items: list[tuple[float, int, bool]], quota: int, need: int, room: int | None
) -> None:
    held = _held(items)
    by_key = {x.key: x for x in held}
    result = decide(held, quota=quota, need=need, room=room)
    deleted = result.all()
    assert len(deleted) == len(set(deleted))
    kept = [x for x in held if x.key not in set(deleted)]
    kept_unpinned = [x for x in kept if not x.pinned]

    # Expired unpinned segments always go; pinned ones never expire by age.
    assert set(result.expired) == {x.key for x in held if not x.pinned and x.age_s > DAY}
    assert all(not by_key[k].pinned for k in result.expired + result.over_quota)
    assert all(by_key[k].pinned for k in result.pinned_lost)

    # Never a pinned segment while an unpinned one remains, nor with room on the disk.
    if result.pinned_lost:
        assert kept_unpinned == []
        assert room is not None

    # Under the quota and the room (with the next segment) whenever unpinned footage is
    # left, and pinned footage within the room whenever that is possible at all.
    limit = quota if room is None else min(quota, room)
    used = sum(x.size for x in kept)
    if kept_unpinned:
        assert used + need <= limit
    if room is not None and room - need >= 0:
        assert used + need <= room
    assert result.over_quota_bytes == max(0, used + need - quota)
    # ... and no deeper than needed: keeping the last one taken would have been too much.
    lost = sum(by_key[k].size for k in result.pinned_lost)
    if result.over_quota:
        assert used + lost + by_key[result.over_quota[-1]].size + need > limit
    if result.pinned_lost:
        assert room is not None
        assert used + by_key[result.pinned_lost[-1]].size + need > room

    # Oldest first within each class.
    for taken, cls in ((result.over_quota, False), (result.pinned_lost, True)):
        for key in taken:
            assert all(by_key[key].age_s >= x.age_s for x in kept if x.pinned is cls), (
                "a newer segment went before an older one"
            )
