"""Capture times for packets that carry their source's own clock (RTP, file pts, sensor).

A camera that is not this machine stamps its frames with its own clock
(an RTSP camera's 90 kHz RTP clock, a file's pts, the Pi sensor's boot-time
timestamp), which says how far apart frames were taken but not when, in UTC.
Our clock says when each packet *arrived*, which includes network and
buffering delay that varies from packet to packet (bursts after a stall).

:class:`ArrivalClock` combines the two the way a receiver without RTCP sender
reports does: ``capture_ns = source_ts + offset``, where ``offset`` is the
smallest ``arrival_wall - source_ts`` seen so far, i.e. the packet with the
least delay defines the anchor. So

* spacing between packets follows the source's timestamps exactly (frame
  intervals survive jitter and bursts);
* a capture time is never later than the packet's arrival;
* when the offset must grow by more than ``max_lag_ns`` (the source's clock
  runs slow against ours, or jumped backwards: a camera restart, a file
  loop), the clock re-anchors on the arrival time;
* the result never decreases, even across a re-anchor or a reconnect
  (:meth:`restart`), so consumers can rely on ordering.

Pure code: time comes in as arguments.
"""

from __future__ import annotations

__all__ = ["ArrivalClock"]


class ArrivalClock:
    """UTC capture times anchored to arrival, spaced by the source's timestamps."""

    def __init__(self, max_lag_ns: int = 1_000_000_000) -> None:
        self._max_lag_ns = max_lag_ns
        self._offset: int | None = None
        self._last = 0

    def restart(self) -> None:
        """Forget the anchor (a new connection: its timestamps start anew)."""
        self._offset = None

    def capture_ns(self, source_ts_ns: int | None, arrival_wall_ns: int) -> int:
        """Capture time of a packet stamped ``source_ts_ns``, arrived at ``arrival_wall_ns``.

        ``source_ts_ns`` may be ``None`` (a packet without a timestamp): it is
        stamped with its arrival time and leaves the anchor alone.
        """
        if source_ts_ns is None:
            capture = arrival_wall_ns
        else:
            offset = arrival_wall_ns - source_ts_ns
            if (
                self._offset is None
                or offset < self._offset
                or offset - self._offset > self._max_lag_ns
            ):
                self._offset = offset
            capture = source_ts_ns + self._offset
        capture = max(capture, self._last)
        self._last = capture
        return capture
