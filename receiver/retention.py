"""How long the receiver keeps recordings, and the deletion that follows.

The agreement a town signs keeps footage a limited time. On the school's
side the agent's sealed buffer does that (72 h); on the police side the
receiver keeps what was pushed to it:

- **Shares** (a building's exterior cameras shared outside emergencies,
  ``started_by.kind == "share"``) are routine footage: deleted
  :attr:`KeepPolicy.shares_s` after they closed (default 30 days).
- **Emergencies** are evidence: kept (no rule deletes them) unless the agency
  sets :attr:`KeepPolicy.emergencies_s` (its records-retention schedule).

Only closed sessions go, whole: the recording (part files, ``session.json``,
the device's chain of custody), its rows in the index, and the evidence
bundles exported of it (``DATA/exports/SESSION-*.zip``, copies of the same
footage). Each deletion is in the access log (``recording_deleted``: the
session, device, kind, when it closed, the bytes and files removed, and the
rule), so "where did this footage go" has an answer. The rule that picks the
sessions (:func:`due`) is pure; :class:`Retention` runs it every
:data:`CHECK_S` on the receiver's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from receiver.access_log import AccessLog
from receiver.errors import ReceiverError
from receiver.recording import RecordingStore
from receiver.session_recording import SessionRecording

log = logging.getLogger(__name__)

DAY_S: Final = 86_400.0
#: Shares are kept this long after they closed unless configured.
SHARES_DEFAULT_S: Final = 30 * DAY_S
#: How often the receiver looks for recordings past their time.
CHECK_S: Final = 600.0


@dataclass(frozen=True, slots=True)
class KeepPolicy:
    """How long closed sessions are kept (seconds after they closed; None: kept)."""

    shares_s: float | None = SHARES_DEFAULT_S
    emergencies_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("shares_s", "emergencies_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}: expected seconds > 0 or None, got {value!r}")

    def keep_s(self, share: bool) -> float | None:
        """How long a closed session of that kind is kept."""
        return self.shares_s if share else self.emergencies_s


def is_share(rec: SessionRecording) -> bool:
    """Whether ``rec`` is a continuous exterior share, not an emergency."""
    started_by = rec.meta.get("started_by")
    return isinstance(started_by, dict) and started_by.get("kind") == "share"


def due(recs: Iterable[SessionRecording], policy: KeepPolicy, now: float) -> list[str]:
    """The closed sessions whose time is up, oldest first."""
    out: list[tuple[float, str]] = []
    for rec in recs:
        keep = policy.keep_s(is_share(rec))
        if keep is None or rec.closed_at is None:
            continue
        if rec.closed_at + keep <= now:
            out.append((rec.closed_at, rec.session_id))
    return [sid for _, sid in sorted(out)]


class Retention:
    """Deletes the recordings :func:`due` picks, each one logged."""

    def __init__(
        self,
        store: RecordingStore,
        exports: Path,
        access_log: AccessLog,
        policy: KeepPolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.exports = exports
        self.access_log = access_log
        self.policy = policy
        self.clock = clock
        self.deleted = 0

    async def run(self, every_s: float = CHECK_S) -> None:
        """Check now, then every ``every_s``, until cancelled; a failed pass is logged."""
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("recording retention pass failed")
            await asyncio.sleep(every_s)

    async def check(self) -> list[str]:
        """Delete every recording past its time now; the ids deleted."""
        now = self.clock()
        done = []
        for sid in due(self.store.closed_sessions(), self.policy, now):
            try:
                rec = self.store.get(sid)
                share = is_share(rec)
                closed_at = rec.closed_at
                freed = await self.store.delete(sid)
            except ReceiverError as exc:  # reopened by its device meanwhile: kept
                log.info("recording %s not deleted: %s", sid, exc)
                continue
            except OSError as exc:  # its folder could not be moved: kept, tried next pass
                log.error("recording %s not deleted: %s", sid, exc)
                continue
            exported = await asyncio.to_thread(_remove_exports, self.exports, sid)
            keep = self.policy.keep_s(share)
            self.access_log.record(
                "recording_deleted", who=None, session=sid, device=rec.device_id,
                kind="share" if share else "emergency", closed_at=closed_at,
                bytes=freed + sum(size for _, size in exported),
                exports=[name for name, _ in exported],
                rule=f"kept {keep / DAY_S:g} days after it closed" if keep else None,
            )  # fmt: skip
            log.warning(
                "recording %s (%s of %s) deleted: kept %.4g days after it closed",
                sid, "share" if share else "emergency", rec.device_id, (keep or 0) / DAY_S,
            )  # fmt: skip
            self.deleted += 1
            done.append(sid)
        return done


def _remove_exports(exports: Path, session_id: str) -> list[tuple[str, int]]:
    """Delete the evidence bundles exported of ``session_id``: (name, bytes) of each."""
    removed = []
    prefix = session_id + "-"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(exports):
            if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                try:
                    os.unlink(entry.path)
                except OSError as exc:
                    log.error("exported bundle %s not deleted: %s", entry.path, exc)
                    continue
                removed.append((entry.name, size))
    return removed
