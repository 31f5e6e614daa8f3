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

__all__ = ["entry", "parse", "seq"]


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
    """``owed.json`` as the agent saves it, its seqs checked to be integers; ValueError
    for anything else (:func:`agent.statefile.read_state` sets the file aside)."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    out: dict[str, Any] = {}
    for sid, item in doc.items():
        if not isinstance(item, dict):
            raise ValueError(f"session {sid!r}: not a JSON object")
        event = p.decode_control(item["open"])
        if not isinstance(event, p.SessionOpen) or event.session != sid:
            raise ValueError(f"session {sid!r}: its session_open is not its own")
        cams = {c.id for c in event.cameras}
        for field in ("first", "acked", "end"):
            if not isinstance(item[field], dict) or not set(item[field]) <= cams:
                raise ValueError(f"session {sid!r}: {field} names other cameras")
        first = {cam: _seq(sid, "first", cam, item["first"].get(cam)) for cam in cams}
        acked = {cam: _seq(sid, "acked", cam, item["acked"].get(cam)) for cam in cams}
        end = {
            cam: None if value is None else _seq(sid, "end", cam, value)
            for cam, value in item["end"].items()
        }
        if not isinstance(item.get("chain", []), list):
            raise ValueError(f"session {sid!r}: chain is not a list")
        reason = item.get("close_reason")
        if reason is not None and not isinstance(reason, str):
            raise ValueError(f"session {sid!r}: close_reason {reason!r} is not text")
        out[sid] = {**item, "first": first, "acked": acked, "end": end}
    return out


def _seq(sid: str, field: str, cam: str, value: Any) -> int:
    try:
        return seq(value)
    except ValueError:
        raise ValueError(f"session {sid!r}: {field}[{cam!r}] is {value!r}, not a seq") from None


def seq(value: Any) -> int:
    """A saved seq: a JSON integer, not a string, float or bool (a pin compares them
    with ints on every write); ValueError otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a seq")
    return value
