"""The pre-roll ring: the last N seconds of one camera, in RAM, GOP-aligned.

When an emergency starts, the receiver must get the footage from just before
the press, and it must be decodable from its first packet: so the ring always
starts at a keyframe and drops whole GOPs from its front. It is bounded twice:

- by time: it keeps the shortest keyframe-aligned suffix that spans at least
  ``seconds`` (the oldest keyframe kept is the newest one at or before
  ``newest - seconds``), measured on the monotonic clock (``mono_ns``), never on
  capture times: the Pi's wall clock steps (NTP), and a step back of 10 minutes
  kept every packet until the clock caught up (a press sent 54 s of interior
  footage from before it where ``preroll_s`` was 30), a step forward cut the
  ring to one GOP;
- by bytes: it never holds more than ``max_bytes``. If the newest GOP alone
  grows past the byte bound (a broken encoder that never sends a keyframe),
  the ring empties and waits for the next keyframe rather than hold a GOP it
  cannot start at. That is the only case where the newest packet is not kept.

With ``seconds = 0`` (``preroll_s = 0``) the ring holds the newest GOP only, and a
session's snapshot holds nothing from before the press (:meth:`PreRoll.snapshot`).

Pure code: no clocks (the packets' monotonic times are used), no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

from hardware import EncodedPacket


class PreRoll:
    """Ring of the most recent packets of one camera, starting at a keyframe."""

    def __init__(self, seconds: float, max_bytes: int) -> None:
        if seconds < 0 or max_bytes <= 0:
            raise ValueError("pre-roll needs seconds >= 0 and max_bytes > 0")
        self.window_ns = int(seconds * 1e9)
        self.max_bytes = max_bytes
        self._packets: deque[EncodedPacket] = deque()
        #: Index positions (absolute counters) of keyframes still in the ring.
        self._keys: deque[int] = deque()
        self._first = 0  # absolute counter of _packets[0]
        self._bytes = 0
        #: Monotonic time from which the oldest GOP goes: the second keyframe's + the window
        #: (the next GOP alone covers the window then). Compared once per packet.
        self._drop_at: float = math.inf
        self.dropped_gops = 0

    def __len__(self) -> int:
        return len(self._packets)

    @property
    def bytes(self) -> int:
        """Payload bytes held."""
        return self._bytes

    def push(self, packet: EncodedPacket) -> None:
        """Add the newest packet and trim the front to the bounds."""
        packets = self._packets
        if packet.keyframe:
            self._keys.append(self._first + len(packets))
            if len(self._keys) == 2:
                self._drop_at = packet.mono_ns + self.window_ns
        elif not packets:
            return  # nothing decodable to attach it to: wait for a keyframe
        packets.append(packet)
        self._bytes += len(packet.payload)
        if packet.mono_ns >= self._drop_at or self._bytes > self.max_bytes:
            self._trim(packet.mono_ns)

    def _drop_front_gop(self) -> None:
        self._keys.popleft()
        end = self._keys[0] if self._keys else self._first + len(self._packets)
        while self._first < end:
            self._bytes -= len(self._packets.popleft().payload)
            self._first += 1
        self.dropped_gops += 1
        keys = self._keys
        self._drop_at = (
            self._packets[keys[1] - self._first].mono_ns + self.window_ns
            if len(keys) > 1
            else math.inf
        )

    def _trim(self, newest_ns: int) -> None:
        # Time: drop the oldest GOP while the next GOP alone still covers the window.
        while newest_ns >= self._drop_at:
            self._drop_front_gop()
        # Bytes: drop whole GOPs from the front; a lone oversized GOP empties the ring.
        while self._bytes > self.max_bytes and self._keys:
            self._drop_front_gop()

    def snapshot(self, now_ns: int | None = None) -> list[EncodedPacket]:
        """The packets held, oldest first (starts at a keyframe, or is empty).

        With ``now_ns`` (the monotonic clock: a press), only what the window before then
        holds: the ring is trimmed when a packet arrives, so a camera that stopped sending
        still holds what it sent last, however old. From the newest keyframe at or
        before ``now_ns - window``, as the ring keeps (so up to one keyframe interval
        more than the window: H.264 cannot start mid-GOP); nothing if every packet is
        older (a camera down for 40 s before a press sent 44 s old interior footage as
        its pre-roll).

        With no window (``preroll_s = 0``: the school wants nothing from before a press),
        from the first keyframe at or after ``now_ns``: nothing from before it, so
        nothing until the camera's next keyframe (the caller asks again as packets come).
        """
        packets = self._packets
        if now_ns is None or not packets:
            return list(packets)
        keys = [key - self._first for key in self._keys]
        if not self.window_ns:
            after = next((k for k in keys if packets[k].mono_ns >= now_ns), None)
            return [] if after is None else list(itertools.islice(packets, after, None))
        cutoff = now_ns - self.window_ns
        if packets[-1].mono_ns < cutoff:
            return []
        j = 0  # the newest keyframe at or before the cutoff (or the first)
        while j + 1 < len(keys) and packets[keys[j + 1]].mono_ns <= cutoff:
            j += 1
        # ... unless its whole GOP is older (the camera was down in between): the next.
        if j + 1 < len(keys) and packets[keys[j + 1] - 1].mono_ns < cutoff:
            j += 1
        return list(itertools.islice(packets, keys[j], None))

    def newest_gop(self, now_ns: int, max_age_ns: int) -> list[EncodedPacket]:
        """From the newest keyframe on, if the newest packet is at most ``max_age_ns`` old
        at ``now_ns`` (else nothing: the camera is down). A share starts with it."""
        packets = self._packets
        if not packets or not self._keys or packets[-1].mono_ns < now_ns - max_age_ns:
            return []
        return list(itertools.islice(packets, self._keys[-1] - self._first, None))
