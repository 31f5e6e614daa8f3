"""The replay cache of accepted trigger nonces, in SQLite so it survives restarts.

A nonce is kept until no clock within the skew could take its trigger for
valid any more (``keep_until``, UTC seconds); then it is forgotten, so the
file stays small. Only triggers whose signature verified reach it, so its
growth is bounded by what enrolled keys sign. ``synchronous=FULL``: a nonce
is on disk before the trigger it belongs to takes effect.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path


class SqliteReplayCache:
    """:class:`provisioning.triggers.ReplayCache` on a SQLite file."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self._now = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, keep_until REAL NOT NULL)"
        )
        path.chmod(0o600)
        self.prune(clock())

    def seen(self, nonce: str) -> bool:
        """Whether an accepted trigger already carried ``nonce``."""
        row = self._db.execute("SELECT 1 FROM nonces WHERE nonce = ?", (nonce,)).fetchone()
        return row is not None

    def add(self, nonce: str, keep_until: float) -> None:
        """Remember ``nonce`` until ``keep_until`` (durably, before returning)."""
        # One transaction (one fsync) for the insert and the pruning: only accepted
        # triggers write, so a flood of bad ones never touches the disk here.
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM nonces WHERE keep_until < ?", (self._now(),))
            self._db.execute(
                "INSERT OR REPLACE INTO nonces (nonce, keep_until) VALUES (?, ?)",
                (nonce, keep_until),
            )

    def prune(self, now: float) -> None:
        """Forget nonces no clock would accept any more."""
        self._db.execute("DELETE FROM nonces WHERE keep_until < ?", (now,))

    def __len__(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM nonces").fetchone()
        return int(count)

    def close(self) -> None:
        """Close the database."""
        self._db.close()
