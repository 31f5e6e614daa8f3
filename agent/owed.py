"""The sessions a device owes the receiver, as saved in ``state/owed.json``.

One entry per session with footage the receiver has not acknowledged (DECISIONS.md,
"Sessions owed to the receiver survive restarts"): its ``session_open`` (as sent),
per camera its first seq, last ack and end seq (null while it streams), why it
closed, and the chain checkpoints the receiver has not answered. The agent saves it
on start, on end and every 2 s while acks move, and resumes every session in it
after a restart.
"""

from __future__ import annotations

from typing import Any

from agent import chain as hash_chain
from agent import protocol as p
from agent.uplink import SessionStream

__all__ = ["entry", "parse"]


def entry(stream: SessionStream) -> dict[str, Any]:
    """The entry of one session the uplink still delivers (read it on the event loop:
    the uplink changes its acks and checkpoint queues there)."""
    cams = stream.open.cameras
    return {
        "open": p.encode_control(stream.open),
        "first": {c.id: c.first_seq for c in cams},
        "acked": {c.id: stream.acked[c.index] for c in cams},
        "end": {c.id: stream.end_seq[c.index] for c in cams},
        "close_reason": stream.close_reason,
        # Unanswered checkpoints of footage the receiver holds (at least in part): after a
        # restart they go again. What it does not hold yet comes from sealed segments,
        # which carry their own checkpoints.
        "chain": [
            hash_chain.record_json(cp)
            for c in cams
            for cp in (stream.chain[c.index] if c.index < len(stream.chain) else ())
            if cp.first <= stream.newest(c.index)
        ],
    }


def parse(doc: Any) -> dict[str, Any]:
    """``owed.json`` as the agent saves it; ValueError for anything else."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    for sid, item in doc.items():
        event = p.decode_control(item["open"])
        if not isinstance(event, p.SessionOpen) or event.session != sid:
            raise ValueError(f"session {sid!r}: its session_open is not its own")
        cams = {c.id for c in event.cameras}
        for field in ("first", "acked", "end"):
            if not isinstance(item[field], dict) or not set(item[field]) <= cams:
                raise ValueError(f"session {sid!r}: {field} names other cameras")
        for cam in cams:
            int(item["first"][cam])
            int(item["acked"][cam])
            if item["end"].get(cam) is not None:
                int(item["end"][cam])
        if not isinstance(item.get("chain", []), list):
            raise ValueError(f"session {sid!r}: chain is not a list")
    return doc
