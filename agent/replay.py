"""The replay cache of accepted trigger nonces, in SQLite so it survives restarts.

A nonce is kept until no clock within the skew could take its trigger for
valid any more (``keep_until``, UTC seconds), and then :data:`RETAIN_S`
longer; then it is forgotten, so the file stays small. Only triggers whose
signature verified reach it, so its growth is bounded by what enrolled keys
sign. ``synchronous=FULL``: a nonce is on disk before the trigger it belongs
to takes effect.

Forgotten by what clock? A Pi has no RTC; its wall clock comes from NTP, which
any host on the LAN can spoof. Forgetting by the wall clock alone, a clock
stepped forward (a day, or to 2099) and then any accepted trigger or a
restart emptied the cache, and once the clock was corrected a trigger
accepted seconds before the step was accepted again. So the cache keeps a
**mark** in the same file: the latest wall time it has seen, except that it
never moves ahead of the clock and never faster than :data:`CATCH_UP` times
the monotonic clock while the agent runs (a restart, which has no monotonic
reference, moves it not at all). A nonce is forgotten only once both the
clock and the mark are :data:`RETAIN_S` past its ``keep_until``. A step of
the clock moves the mark by no more than the time that really went by, so
no nonce is forgotten early, and after the correction its trigger is still
``replayed``. Setting the clock back is caught too, by up to :data:`RETAIN_S`
(at least half of it after a long forward step): the nonces are still there.

A clock set back further than :data:`RETAIN_S` would still meet a nonce the
cache forgot (review t5: an ``end`` accepted 25 h before ended a new emergency
once the clock was set back into its window). So the cache answers
:meth:`SqliteReplayCache.forgotten_before`: the mark less :data:`RETAIN_S`.
Every nonce it ever forgot was kept until before that (the mark only moves
forward), and the verifier refuses a trigger whose window ended before it
(``expired``): exactly the triggers the cache can no longer judge, whatever the
clock reads now. A window that ended less than a day before the mark is still
judged by its nonce, so a clock behind the mark by less than a day (the usual
case after a power cut: fake-hwclock's last save) refuses nothing new.

A mark made from a wrong clock is bounded the same way as before: one ahead of
the clock (made on first start from a clock set to 2099) refuses the triggers
more than a day older than it (dispatch signs in the device's time), and once
the clock has read before the mark for :data:`REBASE_S` of running time the
mark is taken back to the clock (moving it back only keeps nonces longer; it
also takes back what :meth:`forgotten_before` refuses, so a clock held back
for a whole day without a break is the one step this does not catch). A mark
behind the real time (after the device was off) only keeps nonces longer until
it catches up.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from provisioning.triggers import SKEW_S

log = logging.getLogger(__name__)

#: How long a nonce is kept past ``keep_until``, by both the clock and the mark.
RETAIN_S: Final = 24 * 3600.0
#: The mark advances at most this many seconds per second of the monotonic clock (more
#: than one, so a mark that fell behind the real time while the device was off catches up).
CATCH_UP: Final = 2.0
#: A clock that has read before the mark for this long (monotonic) is taken as the mark.
REBASE_S: Final = 24 * 3600.0


class SqliteReplayCache:
    """:class:`provisioning.triggers.ReplayCache` on a SQLite file.

    ``clock`` is the wall clock the triggers are judged by (UTC seconds), ``mono``
    the device's monotonic clock (seconds; it only measures the time between two looks).
    """

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float],
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._now = clock
        self._mono = mono
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, keep_until REAL NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS mark (id INTEGER PRIMARY KEY CHECK (id = 1), wall REAL)"
        )
        path.chmod(0o600)
        now = clock()
        row = self._db.execute("SELECT wall FROM mark WHERE id = 1").fetchone()
        saved = None if row is None else row[0]
        # A new file (or one from before the mark): the clock is all there is to go by.
        if isinstance(saved, int | float) and math.isfinite(saved):
            self._mark = float(saved)
        else:
            self._mark = now
        self._looked = mono()
        self._behind_since: float | None = None
        self.prune()

    @property
    def mark(self) -> float:
        """The latest wall time seen, as far as the monotonic clock vouches for it."""
        return self._mark

    def forgotten_before(self) -> float:
        """A time (UTC seconds) such that every nonce this cache forgot was kept until
        before it: a trigger whose window ended earlier may be one it accepted and no
        longer knows, and must be refused. Reads the clocks (moving the mark), saves nothing."""
        self._look()
        return self._mark - RETAIN_S

    def seen(self, nonce: str) -> bool:
        """Whether an accepted trigger already carried ``nonce``."""
        row = self._db.execute("SELECT 1 FROM nonces WHERE nonce = ?", (nonce,)).fetchone()
        return row is not None

    def add(self, nonce: str, keep_until: float) -> None:
        """Remember ``nonce`` until ``keep_until`` (durably, before returning)."""
        # One transaction (one fsync) for the insert, the pruning and the mark: only
        # accepted triggers write, so a flood of bad ones never touches the disk here.
        forget_before = self._look()
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM nonces WHERE keep_until < ?", (forget_before,))
            self._db.execute(
                "INSERT OR REPLACE INTO nonces (nonce, keep_until) VALUES (?, ?)",
                (nonce, keep_until),
            )
            self._save_mark()

    def prune(self) -> None:
        """Forget nonces neither the clock nor the mark would let a trigger reuse."""
        forget_before = self._look()
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM nonces WHERE keep_until < ?", (forget_before,))
            self._save_mark()

    def _look(self) -> float:
        """Read the clocks, move the mark, and answer: forget what was kept until before."""
        now, mono = self._now(), self._mono()
        allowed = self._mark + CATCH_UP * max(0.0, mono - self._looked)
        self._looked = mono
        if now >= self._mark:
            self._mark = max(self._mark, min(now, allowed))
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = mono
            if self._mark - now > SKEW_S:
                log.warning(
                    "the clock reads %.0f s before the latest time the replay cache has seen:"
                    " trigger nonces are kept until it is past that again",
                    self._mark - now,
                )
        elif mono - self._behind_since >= REBASE_S:
            log.warning(
                "the clock has read before the replay cache's mark for %.0f s: the mark"
                " goes back %.0f s to the clock",
                mono - self._behind_since,
                self._mark - now,
            )
            self._mark, self._behind_since = now, None
        return min(now, self._mark) - RETAIN_S

    def _save_mark(self) -> None:
        self._db.execute("INSERT OR REPLACE INTO mark (id, wall) VALUES (1, ?)", (self._mark,))

    def __len__(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM nonces").fetchone()
        return int(count)

    def close(self) -> None:
        """Save the mark and close the database."""
        try:
            self._look()
            with self._db:
                self._db.execute("BEGIN")
                self._save_mark()
        except sqlite3.Error as exc:  # closing must not fail: the nonces are on disk
            log.error("replay cache: saving its mark at close: %s", exc)
        self._db.close()
