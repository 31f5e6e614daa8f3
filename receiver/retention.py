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
bundles exported of it (``DATA/exports/SESSION/``, copies of the same
footage). Each deletion is in the access log (``recording_deleted``: the
session, device, kind, when it closed, the bytes removed, and the rule),
durable before anything is removed, so "where did this footage go" has an
answer even after a crash; while the log cannot be written nothing is
deleted. A session being exported (:meth:`Retention.hold`) waits for the
next pass. The rule that picks the
sessions (:func:`due`) is pure; :class:`Retention` runs it every
:data:`CHECK_S` on the receiver's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from receiver.access_log import AccessLog
from receiver.errors import ReceiverError
from receiver.recording import RecordingStore, folder_bytes
from receiver.session_recording import SessionRecording

log = logging.getLogger(__name__)

DAY_S: Final = 86_400.0
#: Shares are kept this long after they closed unless configured.
SHARES_DEFAULT_S: Final = 30 * DAY_S
#: How often the receiver looks for recordings past their time.
CHECK_S: Final = 600.0
#: How long a deletion waits for its access-log entry to be durable.
LOG_WAIT_S: Final = 10.0


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
    """Deletes the recordings :func:`due` picks, each one logged before it goes."""

    def __init__(
        self,
        store: RecordingStore,
        exports: Path,
        access_log: AccessLog,
        policy: KeepPolicy,
        *,
        clock: Callable[[], float] = time.time,
        log_wait_s: float = LOG_WAIT_S,
    ) -> None:
        self.store = store
        self.exports = exports
        self.access_log = access_log
        self.policy = policy
        self.clock = clock
        self.log_wait_s = log_wait_s
        self.deleted = 0
        #: Sessions being exported now (:meth:`hold`): not deleted until let go.
        self._held: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, session_id: str) -> Iterator[None]:
        """Keep ``session_id`` while the block runs (an evidence export reads it)."""
        self._held[session_id] += 1
        try:
            yield
        finally:
            self._held[session_id] -= 1
            if not self._held[session_id]:
                del self._held[session_id]

    async def run(self, every_s: float = CHECK_S) -> None:
        """Check now, then every ``every_s``, until cancelled; a failed pass is logged."""
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("recording retention pass failed")
            await asyncio.sleep(every_s)

    async def _logged(self) -> bool:
        """Whether everything recorded in the access log so far is durable (waiting at
        most :attr:`log_wait_s`, on a thread of its own)."""
        try:
            await asyncio.to_thread(self.access_log.flush_sync, self.log_wait_s)
        except TimeoutError:
            return False
        return True

    async def check(self) -> list[str]:
        """Delete every recording past its time now; the ids deleted. Nothing goes while
        the access log cannot be written: each deletion's entry is durable before it."""
        now = self.clock()
        due_now = [
            s for s in due(self.store.closed_sessions(), self.policy, now) if s not in self._held
        ]
        if not due_now:
            return []
        if not await self._logged():
            log.error("recordings past their time kept: the access log cannot be written")
            return []
        done = []
        for sid in due_now:
            try:
                rec = self.store.get(sid)
            except ReceiverError:
                continue
            if not rec.closed_at or sid in self._held:  # reopened, or exported meanwhile
                continue
            share = is_share(rec)
            keep = self.policy.keep_s(share)
            folder = self.exports / sid
            sizes = [
                await asyncio.to_thread(folder_bytes, rec.directory),
                await asyncio.to_thread(folder_bytes, folder),
            ]
            self.access_log.record(
                "recording_deleted", who=None, session=sid, device=rec.device_id,
                kind="share" if share else "emergency", closed_at=rec.closed_at,
                bytes=sizes[0] + sizes[1], exported_bytes=sizes[1],
                rule=f"kept {keep / DAY_S:g} days after it closed" if keep else None,
            )  # fmt: skip
            if not await self._logged():
                log.error("recording %s kept: its deletion is not in the access log", sid)
                self.access_log.record(
                    "recording_kept", who=None, session=sid, reason="access_log_unavailable"
                )
                break
            if sid in self._held:  # an export began while the entry was made durable
                self.access_log.record(
                    "recording_kept", who=None, session=sid, reason="being exported"
                )
                continue
            try:
                await self.store.delete(sid)
            except (ReceiverError, OSError) as exc:  # reopened meanwhile, or not movable
                log.error("recording %s not deleted: %s", sid, exc)
                self.access_log.record(
                    "recording_kept", who=None, session=sid, reason=str(exc)[:200]
                )
                continue
            await asyncio.to_thread(_remove_folder, folder)
            log.warning(
                "recording %s (%s of %s) deleted: kept %.4g days after it closed",
                sid, "share" if share else "emergency", rec.device_id, (keep or 0) / DAY_S,
            )  # fmt: skip
            self.deleted += 1
            done.append(sid)
        return done


def _remove_folder(folder: Path) -> None:
    """Delete a session's exported bundles (its folder under ``DATA/exports``)."""
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("exported bundles %s not deleted: %s", folder, exc)
