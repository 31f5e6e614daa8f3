"""What the capture loop watches in each camera's packets, beyond their arrival.

- :class:`KeyframeWatch`: the keyframe interval. A press sends the pre-roll
  from a keyframe, so up to one interval more than ``preroll_s``; an IP camera
  keeps its own GOP, often 4-10 s, which the district must know of.
- :class:`ReorderWatch`: frames out of presentation order (H.264 B-frames). The
  agent passes a camera's H.264 through and gives each frame its capture time in
  the order frames arrive (decode order); a stream that reorders frames gets
  times that step back and are held (:mod:`hardware._clock`), and is recorded
  with wrong frame timing, which players answer by dropping frames. The
  camera's encoder must be set without B-frames; until it is, the camera is in
  fault (it still records: degraded footage beats none in an emergency).

Pure code: packets' times come in as arguments.
"""

from __future__ import annotations

__all__ = [
    "KEYFRAME_GAP_S",
    "KEYFRAME_OK_MAX_S",
    "KEYFRAME_OK_S",
    "KEYFRAME_SLACK_S",
    "REORDER_CLEAR_S",
    "KeyframeWatch",
    "ReorderWatch",
    "keyframe_limit_s",
]

#: A keyframe interval this long is accepted whatever ``preroll_s`` (the encoders we
#: drive use at most this: :data:`agent.config.MAX_KEYFRAME_INTERVAL_S`), and one up to
#: ``preroll_s`` up to :data:`KEYFRAME_OK_MAX_S` (the install guide's 1-2 s).
KEYFRAME_OK_S = 1.0
KEYFRAME_OK_MAX_S = 2.0
#: Measurement jitter allowed over the limit (an IP camera's keyframes arrive unevenly).
KEYFRAME_SLACK_S = 0.25
#: A pause between two packets this long (a reconnect, a stall) is not measured as a GOP.
KEYFRAME_GAP_S = 2.0
#: A camera that sent no frame out of order for this long is taken as set right again.
REORDER_CLEAR_S = 60.0


def keyframe_limit_s(preroll_s: float) -> float:
    """The longest keyframe interval the agent takes without saying so: ``preroll_s``
    (a press then sends at most twice the pre-roll agreed), but at least 1 s and at most
    2 s (so a 30 s pre-roll does not hide a 20 s GOP)."""
    return max(KEYFRAME_OK_S, min(preroll_s, KEYFRAME_OK_MAX_S))


class KeyframeWatch:
    """One camera's keyframe interval, measured on the packets' monotonic times.

    An interval spanning a pause of :data:`KEYFRAME_GAP_S` (a reconnect) is not one;
    one over the limit must be seen twice in a row (a GOP the source dropped whole when
    the agent lagged, or a late keyframe, is not the camera's setting).
    """

    __slots__ = ("_key_ns", "_last_ns", "_over", "interval_s", "limit_ns", "said")

    def __init__(self, limit_s: float) -> None:
        self.limit_ns = int((limit_s + KEYFRAME_SLACK_S) * 1e9)
        #: The last interval measured, in seconds (None: none yet).
        self.interval_s: float | None = None
        #: The interval was found too long (said once).
        self.said = False
        self._key_ns: int | None = None
        self._last_ns: int | None = None
        self._over = 0

    def reset(self) -> None:
        """The source restarted: the next keyframe starts a new measurement."""
        self._key_ns = self._last_ns = None
        self._over = 0

    def packet(self, mono_ns: int, keyframe: bool) -> float | None:
        """Note a packet; the interval (seconds) the first time it is found too long."""
        last, self._last_ns = self._last_ns, mono_ns
        if last is not None and mono_ns - last > KEYFRAME_GAP_S * 1e9:
            self._key_ns, self._over = None, 0
        if not keyframe:
            return None
        start, self._key_ns = self._key_ns, mono_ns
        if start is None:
            return None
        interval = mono_ns - start
        self.interval_s = interval / 1e9
        self._over = self._over + 1 if interval > self.limit_ns else 0
        if self._over < 2 or self.said:
            return None
        self.said = True
        return self.interval_s


class ReorderWatch:
    """Whether a camera sends frames out of presentation order (B-frames).

    A frame that is no keyframe and carries an earlier source timestamp than the
    frame before it was sent ahead of one it is shown after. A keyframe may step
    back (a file looping, a camera restarting its clock): not counted. Sources
    without their own timestamps (``None``) are never judged.
    """

    __slots__ = ("_last_mono", "_last_ts", "seen_ns")

    def __init__(self) -> None:
        self._last_ts: int | None = None
        self._last_mono = 0
        #: Monotonic time (ns) of the last frame found out of order (None: never).
        self.seen_ns: int | None = None

    def restart(self) -> None:
        """The source restarted: its timestamps begin anew (what was seen still counts)."""
        self._last_ts = None

    def packet(self, source_ts_ns: int | None, keyframe: bool, mono_ns: int) -> bool:
        """Note a packet; whether it came out of presentation order."""
        last, self._last_ts, self._last_mono = self._last_ts, source_ts_ns, mono_ns
        if source_ts_ns is None or last is None or keyframe or source_ts_ns >= last:
            return False
        self.seen_ns = mono_ns
        return True

    def mended(self) -> bool:
        """Whether the camera has sent frames, none out of order, for
        :data:`REORDER_CLEAR_S` since the last that was (or none ever was). Judged on
        frames: a camera gone silent is not said to be set right."""
        return self.seen_ns is None or self._last_mono - self.seen_ns > REORDER_CLEAR_S * 1e9
