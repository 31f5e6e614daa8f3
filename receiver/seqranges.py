"""Sequence-number range arithmetic for acks and completeness (pure functions).

A range is ``(first, last)``, both inclusive. What a camera holds is a set of
such ranges (one per part file), what the device declared lost another; the
cumulative ack, the ``holds`` beyond it and the missing ranges are computed
from them here, with no I/O, so the rules can be tested on their own.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Range", "count_below", "cumulative", "holds_after", "merge", "missing"]

Range = tuple[int, int]


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, disjoint ranges covering the same seqs; touching ranges are joined."""
    out: list[Range] = []
    for first, last in sorted(r for r in ranges if r[0] <= r[1]):
        if out and first <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def cumulative(first_seq: int, covered: Iterable[Range]) -> int:
    """The largest N such that every seq ``first_seq..N`` is covered (``first_seq - 1`` if none).

    Seqs below ``first_seq`` do not matter: a range reaching into them counts from
    ``first_seq`` on.
    """
    n = first_seq - 1
    for first, last in merge(covered):
        if first > n + 1:
            break
        n = max(n, last)
    return n


def holds_after(acked: int, held: Iterable[Range], limit: int) -> tuple[Range, ...]:
    """The merged ``held`` ranges entirely above ``acked + 1``, lowest first, at most ``limit``.

    A range that reaches ``acked + 1`` would have been part of the cumulative ack,
    so everything returned starts at ``acked + 2`` or later (what the wire requires).
    """
    out: list[Range] = []
    for first, last in merge(held):
        if last <= acked:
            continue
        if first <= acked + 1:
            first = acked + 2
            if first > last:
                continue
        out.append((first, last))
        if len(out) == limit:
            break
    return tuple(out)


def missing(first_seq: int, last_seq: int, covered: Iterable[Range]) -> list[Range]:
    """The ranges of ``first_seq..last_seq`` that no covered range contains."""
    out: list[Range] = []
    n = first_seq
    for first, last in merge(covered):
        if last < n:
            continue
        if first > last_seq:
            break
        if first > n:
            out.append((n, first - 1))
        n = last + 1
        if n > last_seq:
            return out
    if n <= last_seq:
        out.append((n, last_seq))
    return out


def count_below(ranges: Iterable[Range], bound: int) -> int:
    """How many seqs of the (disjoint) ``ranges`` are below ``bound``."""
    return sum(max(0, min(last, bound - 1) - first + 1) for first, last in ranges)
