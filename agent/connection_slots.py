"""Who holds a site's connections: caps per address group and in all, and who gives way.

A sans-IO account of connection slots (:class:`ConnectionSlots`), counted from
the TCP accept: at most ``cap`` connections in all and ``per_group`` from one
:func:`address_group` (an IPv4 address, an IPv6 /64). At a cap a connection
that has not proven itself (TLS handshake or first request unfinished), or else
one idle after a request, gives its slot up to the new one; only a cap held by
busy connections refuses. :class:`agent.lan_guard.GuardedSite` (the agent's
Local API, and the receiver's listener through ``receiver/listener.py``) does
the I/O; the receiver's login limiter and uplink handshake limiter count by
:func:`address_group` too.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

__all__ = ["ConnectionSlots", "Slot", "Stage", "address_group"]


def address_group(host: str) -> str:
    """The group a client address is counted in (connections per address, and which
    group gives up an unproven connection first): an IPv4 address as it is, an IPv6
    address as its /64 (one subscriber's prefix holds 2^64 addresses), an IPv4-mapped
    IPv6 address as the IPv4 address; anything else as given (at most 64 characters),
    and no address at all as ``-``. The receiver's login limiter counts by it too
    (``receiver.accounts.address_key``)."""
    if not host:
        return "-"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class Stage(enum.Enum):
    """Where a connection is in its life, as far as its slot goes."""

    #: Accepted; its TLS handshake is not done.
    HANDSHAKE = "TLS handshake unfinished"
    #: TLS done; no request of it whole yet.
    FRESH = "no request yet"
    #: A request whole (headers and body) and not answered yet, or a WebSocket.
    BUSY = "serving a request"
    #: Answered; waiting for its next request (keep-alive), or a next one not whole.
    IDLE = "idle after a request"


class Slot:
    """One connection's place in :class:`ConnectionSlots` (from the TCP accept on)."""

    __slots__ = (
        "conn",
        "freed",
        "group",
        "host",
        "opened",
        "requests",
        "since",
        "stage",
        "started",
        "task",
        "transport",
    )

    def __init__(self, host: str, group: str, now: float) -> None:
        self.host = host
        self.group = group
        self.opened = now
        #: When it entered its stage.
        self.since = now
        self.stage = Stage.HANDSHAKE
        #: Counted free (closed, cut or evicted): never counted again.
        self.freed = False
        #: Requests begun on it (a request's callbacks carry its number).
        self.requests = 0
        self.conn: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None
        #: The TLS transport, once the handshake is done.
        self.transport: asyncio.Transport | None = None
        #: Whether its handshake task began (one cancelled before has its socket closed).
        self.started = False


class _Tier:
    """Evictable slots of one kind: each group's oldest first, and the groups by how
    many they hold (the largest found in O(1): buckets by size)."""

    def __init__(self) -> None:
        self._groups: dict[str, OrderedDict[Slot, None]] = {}
        self._by_size: dict[int, OrderedDict[str, None]] = {}
        self._top = 0
        self.count = 0

    def add(self, slot: Slot) -> None:
        slots = self._groups.setdefault(slot.group, OrderedDict())
        slots[slot] = None
        self.count += 1
        self._resize(slot.group, len(slots) - 1, len(slots))

    def discard(self, slot: Slot) -> None:
        slots = self._groups.get(slot.group)
        if slots is None or slot not in slots:
            return
        del slots[slot]
        self.count -= 1
        self._resize(slot.group, len(slots) + 1, len(slots))
        if not slots:
            del self._groups[slot.group]

    def _resize(self, group: str, old: int, new: int) -> None:
        if old:
            bucket = self._by_size[old]
            del bucket[group]
            if not bucket:
                del self._by_size[old]
        if new:
            self._by_size.setdefault(new, OrderedDict())[group] = None
        self._top = max(self._top, new)
        while self._top and self._top not in self._by_size:  # sizes move by one
            self._top -= 1

    def oldest_in(self, group: str) -> Slot | None:
        slots = self._groups.get(group)
        return next(iter(slots)) if slots else None

    def victim(self) -> Slot | None:
        """The oldest slot of the group that holds the most (of those, the one that
        reached that many first)."""
        if not self._top:
            return None
        return self.oldest_in(next(iter(self._by_size[self._top])))


class ConnectionSlots:
    """Who holds the connections a site may keep: at most ``cap`` in all and
    ``per_group`` from one :func:`address_group`, counted from the TCP accept.

    A connection not yet proven (:attr:`Stage.HANDSHAKE`, :attr:`Stage.FRESH`), then
    one idle after a request (:attr:`Stage.IDLE`), gives its slot up to a new one at a
    cap: within the new one's group at the per-group cap, else the oldest of the group
    holding the most of them. Only when every slot concerned is :attr:`Stage.BUSY` (a
    request whole and not yet answered, or a WebSocket) is the new one refused.
    Accounting only: the caller closes what :meth:`admit` evicts. A slot is counted
    free once (:meth:`free`), whatever reports its end and how often.
    """

    def __init__(
        self,
        cap: int,
        per_group: int,
        *,
        group: Callable[[str], str] = address_group,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap = cap
        self.per_group = per_group
        self.group = group
        self.clock = clock
        #: Slots held now.
        self.open = 0
        self._held: Counter[str] = Counter()
        self._new = _Tier()
        self._idle = _Tier()

    def held_by(self, host: str) -> int:
        """Slots held now by ``host``'s group."""
        return self._held.get(self.group(host), 0)

    @property
    def evictable(self) -> int:
        """Slots held now that a new connection may take."""
        return self._new.count + self._idle.count

    def admit(self, host: str) -> tuple[Slot | None, Slot | None, str | None]:
        """A slot for a connection from ``host``, the slot evicted to make room for it
        (already counted free), and the cap that was reached (``per_address``,
        ``total``, or None); no slot when that cap is held by busy connections only."""
        group = self.group(host)
        reason: str | None = None
        victim: Slot | None = None
        if self._held[group] >= self.per_group:
            reason = "per_address"
            victim = self._new.oldest_in(group) or self._idle.oldest_in(group)
        elif self.open >= self.cap:
            reason = "total"
            victim = self._new.victim() or self._idle.victim()
        if reason is not None:
            if victim is None:
                return None, None, reason
            self.free(victim)
        slot = Slot(host, group, self.clock())
        self.open += 1
        self._held[group] += 1
        self._new.add(slot)
        return slot, victim, reason

    def free(self, slot: Slot) -> bool:
        """Count ``slot`` free; whether it was held until now (False the second time)."""
        if slot.freed:
            return False
        slot.freed = True
        if slot.stage is not Stage.BUSY:
            self._tier(slot.stage).discard(slot)
        self.open -= 1
        self._held[slot.group] -= 1
        if self._held[slot.group] <= 0:
            del self._held[slot.group]
        return True

    def tls_done(self, slot: Slot) -> None:
        """Its TLS handshake is done (it keeps its place among the unproven)."""
        if not slot.freed and slot.stage is Stage.HANDSHAKE:
            slot.stage = Stage.FRESH
            slot.since = self.clock()

    def request_began(self, slot: Slot, *, whole: bool) -> int:
        """A request's headers are in (``whole``: its body too); the request's number."""
        slot.requests += 1
        if whole:
            self._move(slot, Stage.BUSY)
        elif slot.stage is Stage.BUSY:  # the next one on a keep-alive connection
            self._move(slot, Stage.IDLE)
        return slot.requests

    def body_whole(self, slot: Slot, request: int) -> None:
        """Request ``request``'s body is whole: the connection is serving it."""
        if request == slot.requests:
            self._move(slot, Stage.BUSY)

    def request_ended(self, slot: Slot, request: int) -> None:
        """Request ``request`` was answered (or given up): idle until the next."""
        if request == slot.requests:
            self._move(slot, Stage.IDLE)

    def _tier(self, stage: Stage) -> _Tier:
        return self._idle if stage is Stage.IDLE else self._new

    def _move(self, slot: Slot, stage: Stage) -> None:
        if slot.freed or (slot.stage is Stage.BUSY and stage is Stage.BUSY):
            return
        if slot.stage is not Stage.BUSY:
            self._tier(slot.stage).discard(slot)
        if stage is not Stage.BUSY:
            self._tier(stage).add(slot)  # at the end: idle from now
        slot.stage = stage
        slot.since = self.clock()
