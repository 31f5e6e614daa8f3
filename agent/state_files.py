"""The agent's state files in ``state_dir`` (written whole or not at all: :mod:`agent.statefile`).

- ``emergency.json``: the emergency (:meth:`agent.emergency.Emergency.to_json`),
  written after every change, and ``owed.json``: the sessions still owed to the
  receiver (:mod:`agent.owed_sessions`), saved with it. Both are written off the
  event loop, in order (:class:`StateWriter`);
- ``sequences.json`` (and its backup): the cameras' sequence reservations, never
  below what the sealed store holds (:func:`sequence_reservations`).

A damaged file is moved aside and audited (``state_damaged``); the agent, and its
buttons, start without it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from agent.audit import AuditLog
from agent.config import CameraConfig
from agent.emergency import Emergency
from agent.owed_sessions import OwedSessions
from agent.statefile import (
    SequenceReservations,
    backup_path,
    check_sequences,
    read_state,
    write_json,
)
from agent.store import SegmentStore
from agent.uplink import UplinkClient

log = logging.getLogger(__name__)


def state_damaged(audit: AuditLog, path: Path, why: str | None) -> None:
    """Audit a state file found damaged (``why``; None: it was not)."""
    if why is not None:
        audit.record_soon("state_damaged", file=path.name, error=why)


class StateWriter:
    """Writes ``emergency.json``, then ``owed.json``, on a worker thread, in order.

    A write that fails (a card gone read-only, an I/O error) is logged and audited
    once (``state_write_failed``, then ``state_write_recovered``) and :attr:`failed`
    says why until a write succeeds: the agent's housekeeping writes again every
    few seconds meanwhile, and the LED shows a fault. Before, the failure was lost
    in the task, and an emergency ended meanwhile came back after a restart.
    """

    def __init__(
        self,
        path: Path,
        emergency: Emergency,
        owed: OwedSessions,
        uplink: UplinkClient,
        audit: AuditLog,
        *,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.emergency = emergency
        self.owed = owed
        self.uplink = uplink
        self.audit = audit
        self.on_change = on_change
        #: The writes asked for and not done (the agent never stops half way through one).
        self.pending: set[asyncio.Task[None]] = set()
        #: Why the last write failed; None once one succeeded.
        self.failed: str | None = None
        self._lock = asyncio.Lock()
        #: What ``emergency.json`` holds as this process last wrote it (None: not yet).
        self._written: dict[str, Any] | None = None

    def persist(self) -> None:
        """Write the state as it is when the write's turn comes (in a task)."""
        task = asyncio.create_task(self._write(), name="persist-emergency")
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _write(self) -> None:
        # Small JSON, fsynced, on a worker thread so the loop keeps streaming. The lock
        # keeps writes in order, and each writes the state as it is when its turn comes.
        async with self._lock:
            try:
                doc = self.emergency.to_json()
                # The same state is not written again (an exterior share keeps the
                # periodic save going all day: 43,200 fsyncs a day on the SD card).
                if doc != self._written or self.failed is not None:
                    await asyncio.to_thread(write_json, self.path, doc)
                    self._written = doc
                await self.owed.save(self.uplink)
            except OSError as exc:
                why = f"{type(exc).__name__}: {exc}"[:300]
                if self.failed is None:
                    log.critical(
                        "state files in %s not saved (%s): a restart now would not know the"
                        " emergency's latest state; writing again every few seconds",
                        self.path.parent,
                        why,
                    )
                    self.audit.record_soon("state_write_failed", error=why)
                    self.failed = why
                    self.on_change()
                return
            if self.failed is not None:
                log.warning("state files in %s saved again", self.path.parent)
                self.audit.record_soon("state_write_recovered", error=self.failed)
                self.failed = None
                self.on_change()


def sequence_reservations(
    path: Path, store: SegmentStore, cameras: Iterable[CameraConfig], audit: AuditLog
) -> SequenceReservations:
    """The cameras' sequence numbers: never below the sealed store's, so no seq is used
    twice (a store holding two segments of one seq sends the wrong footage)."""
    copies = (path, backup_path(path))
    for copy in copies:  # one damaged copy (set aside here): the other has it all
        _, why = read_state(copy, check_sequences, None)
        state_damaged(audit, copy, why)
    present = any(copy.exists() for copy in copies)
    # Never below what the store holds; without either copy (damaged, or a state
    # folder wiped while the store stayed) two blocks above: what a run used beyond it.
    margin = 0 if present else 2 * SequenceReservations.BLOCK
    floor = {}
    for camera in cameras:
        segs = store.segments(camera.id)
        if segs:
            floor[camera.id] = segs[-1].last_seq + 1 + margin
    return SequenceReservations(path, floor)
