"""Sessions still owed to the receiver, across restarts (``state/owed.json``).

DECISIONS.md, "Sessions owed to the receiver survive restarts": every session with
footage the receiver has not acknowledged is saved (its entry: :mod:`agent.owed`) on
start, on end and every 2 s while acks move. At the next start its footage is pinned
in the sealed store before the first segment is written (retention runs then), until
the session is queued on the uplink again with pins of its own: the active session
resumes live once its cameras run; every other one is queued with its saved ends and
delivered from the store alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from agent import owed
from agent import protocol as p
from agent.checkpoints import Checkpoints
from agent.emergency import Session
from agent.statefile import read_state, write_atomic
from agent.store import Pin, SegmentStore
from agent.uplink import SessionStream, UplinkClient

log = logging.getLogger(__name__)


class OwedSessions:
    """The sessions the receiver is owed, as saved in ``owed.json`` and since changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Session id -> its entry (:func:`agent.owed.entry`).
        self.entries: dict[str, Any] = {}
        #: The owed sessions' footage, pinned from owed.json at start until the sessions
        #: are queued again (with pins of their own): the cameras must run first.
        self.boot_pins: list[Pin] = []
        self._saved = ""

    def load(self) -> str | None:
        """Read what was saved (nothing owed without the file); why it was damaged (a
        damaged one is moved aside: nothing is owed then), or None."""
        none_owed: dict[str, Any] = {}
        self.entries, why = read_state(self.path, owed.parse, none_owed)
        return why

    def pin(self, store: SegmentStore) -> None:
        """Pin what the receiver is owed, as saved, until the sessions are queued again
        (an emergency's: a building's exterior share is never pinned)."""
        for sid, entry in self.entries.items():
            try:  # ints only (owed.parse checks them): a pin compares them on every write
                if _is_share(entry):
                    continue
                pins = [
                    Pin(
                        str(cam),
                        owed.seq(first),
                        _end(entry["end"].get(cam)),
                        owed.seq(entry["acked"][cam]),
                    )
                    for cam, first in entry["first"].items()
                ]
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.error("owed session %s: its saved entry is unreadable: %r", sid, exc)
                continue
            for pin in pins:
                store.add_pin(pin)
            self.boot_pins += pins

    def resume(
        self,
        uplink: UplinkClient,
        store: SegmentStore,
        checkpoints: Checkpoints,
        active: Session | None,
    ) -> None:
        """Queue every owed session that is not the ``active`` one (it resumes with live)."""
        for sid, entry in list(self.entries.items()):
            if uplink.stream(sid) is not None or (active is not None and active.id == sid):
                continue
            event = p.decode_control(entry["open"])
            assert isinstance(event, p.SessionOpen)
            ends: dict[int, int] = {}
            for c in event.cameras:
                end = entry["end"].get(c.id)
                if end is None:  # it was live when the agent stopped: up to what is stored
                    segs = store.segments(c.id)
                    end = max(entry["acked"].get(c.id, -1), segs[-1].last_seq if segs else -1)
                ends[c.index] = end
            acked = {c.index: entry["acked"][c.id] for c in event.cameras if c.id in entry["acked"]}
            share = _is_share(entry)  # never pinned
            stream = uplink.start_session(event, {}, acked=acked, end_seq=ends, emergency=not share)
            checkpoints.restore(stream, entry)
            uplink.end_session(stream.id, entry.get("close_reason") or "ended")
            log.warning("resuming delivery of ended session %s from the sealed store", sid)
        for pin in self.boot_pins:  # every owed session holds pins of its own now
            store.remove_pin(pin)
        self.boot_pins = []

    def remember(self, stream: SessionStream) -> None:
        """Record a session the receiver is owed, so a restart resumes it (the caller
        saves it)."""
        self.entries[stream.id] = owed.entry(stream)

    def refresh(self, uplink: UplinkClient) -> None:
        """Follow the uplink: delivered sessions leave; one not yet handed to the uplink
        (a restart waiting for its cameras) stays as it was saved."""
        live = {s.id: s for s in uplink.streams}
        kept = {k: v for k, v in self.entries.items() if k not in uplink.settled_ids}
        self.entries = kept | {sid: owed.entry(s) for sid, s in live.items()}

    async def save(self, uplink: UplinkClient) -> None:
        """Save the sessions owed, if they changed: read on the loop (the uplink changes
        its streams and their checkpoint queues there), written and fsynced in a worker
        thread."""
        self.refresh(uplink)
        text = json.dumps(self.entries, sort_keys=True, indent=1)
        if text != self._saved:
            await asyncio.to_thread(write_atomic, self.path, text.encode())
            self._saved = text


def _is_share(entry: dict[str, Any]) -> bool:
    """Whether a saved entry is a building's exterior share (not an emergency)."""
    event = p.decode_control(entry["open"])
    return isinstance(event, p.SessionOpen) and event.started_by.get("kind") == "share"


def _end(value: Any) -> int | None:
    """A saved end seq: None while the session streamed."""
    return None if value is None else owed.seq(value)
