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
* a capture time is never later than the packet's arrival, unless the wall
  clock was set back (below);
* when the offset must grow by more than ``max_lag_ns`` (the source's clock
  runs slow against ours, or jumped backwards: a camera restart, a file
  loop), the clock re-anchors on the arrival time;
* the result never decreases, even across a re-anchor or a reconnect
  (:meth:`restart`), so consumers can rely on ordering.

The Pi's wall clock steps (it has no real-time clock; NTP sets it right after
a stale boot, and back when it ran ahead or a spoofed reply sets it back):

* a step forward is followed at once (capture times say UTC as soon as they can);
* a step back is not: capture times go on increasing with the packets' real
  spacing (the source's timestamps, else the monotonic clock), ``slew`` (10 %)
  slow, until they meet the wall clock again (a 10-minute step back takes
  100 minutes). They used to freeze at the last time before the step until the
  clock caught up: every frame of the step's length had one timestamp, and the
  receiver recorded minutes of video that played in an instant. Meanwhile they
  are at most the step ahead of the wall clock (and so later than the arrival),
  and that gap only shrinks. A step is seen in the arrival times (wall minus
  monotonic moved back by over :data:`STEP_NS`) or, without monotonic times, as
  a capture time more than ``max_lag_ns`` before the last. Less than that (a
  packet that came faster than any before it, a reconnect) holds the last time,
  as before.

Pure code: time comes in as arguments.
"""

from __future__ import annotations

__all__ = ["ArrivalClock"]

#: Wall minus monotonic time moving back by more than this between two packets is a
#: step of the wall clock (NTP slews it by at most 0.5 ms a second).
STEP_NS = 1_000_000


class ArrivalClock:
    """UTC capture times anchored to arrival, spaced by the source's timestamps."""

    def __init__(self, max_lag_ns: int = 1_000_000_000, slew: float = 0.1) -> None:
        if not 0 < slew < 1:
            raise ValueError("slew must be between 0 and 1")
        self._max_lag_ns = max_lag_ns
        self._slew = slew
        self._offset: int | None = None
        self._last = 0
        #: The previous packet's source timestamp (this connection), monotonic arrival,
        #: and arrival wall minus monotonic time.
        self._last_ts: int | None = None
        self._last_mono: int | None = None
        self._last_base: int | None = None
        #: Capture times run ahead of the wall clock (set back) until they meet it.
        self._slewing = False

    def restart(self) -> None:
        """Forget the anchor (a new connection: its timestamps start anew)."""
        self._offset = None
        self._last_ts = None

    def capture_ns(
        self, source_ts_ns: int | None, arrival_wall_ns: int, arrival_mono_ns: int | None = None
    ) -> int:
        """Capture time of a packet stamped ``source_ts_ns``, arrived at ``arrival_wall_ns``
        (``time.time_ns()``) and ``arrival_mono_ns`` (``time.monotonic_ns()``, if known).

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
        base = None if arrival_mono_ns is None else arrival_wall_ns - arrival_mono_ns
        stepped = (
            base is not None and self._last_base is not None and self._last_base - base > STEP_NS
        )
        if capture > self._last:
            self._slewing = False
        elif self._slewing or stepped or self._last - capture > self._max_lag_ns:
            # The wall clock was set back: go on at the real spacing, slewed, never back.
            self._slewing = True
            elapsed = self._elapsed(source_ts_ns, arrival_mono_ns)
            capture = self._last + elapsed - int(elapsed * self._slew)
        else:
            capture = self._last  # a faster packet re-anchored, or a reconnect: hold
        self._last = capture
        self._last_ts = source_ts_ns
        if arrival_mono_ns is not None:
            self._last_mono, self._last_base = arrival_mono_ns, base
        return capture

    def _elapsed(self, source_ts_ns: int | None, arrival_mono_ns: int | None) -> int:
        """Real time since the previous packet: the source's spacing when it has one
        (exact, whatever the jitter), never more than the monotonic clock allows."""
        mono = None
        if arrival_mono_ns is not None and self._last_mono is not None:
            mono = max(0, arrival_mono_ns - self._last_mono)
        if source_ts_ns is not None and self._last_ts is not None:
            spacing = source_ts_ns - self._last_ts
            if spacing >= 0:
                return spacing if mono is None else min(spacing, mono + self._max_lag_ns)
        return 0 if mono is None else mono
