"""A receiver away for weeks while a building shares its exterior cameras (a session an
hour): the device owes a bounded number of shares, and a share is never pinned.

Before, every share stayed owed: past about 1,100 the saved list (``owed.json``)
outgrew its read limit, and a restart set it aside, an emergency's obligations with it
(its footage unpinned, free for retention to delete before the receiver had it). And a
share resumed after a restart was queued as an emergency: its exterior footage pinned
for as long as the receiver stayed away.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import chain as hash_chain
from agent import protocol as p
from agent.audit import AuditLog
from agent.checkpoints import Checkpoints
from agent.owed_sessions import OwedSessions
from agent.statefile import MAX_STATE_BYTES
from agent.uplink import MAX_OWED_SHARES, UplinkClient
from tests.test_store import T0_NS, opened
from tests.uplink import unconnected_uplink

pytestmark = pytest.mark.timeout(60)

CAMERAS = (
    p.CameraDesc(0, "front-door", "exterior", "h264", 1920, 1080, 30.0, b"", 0, 0),
    p.CameraDesc(1, "hallway-2", "interior", "h264", 1920, 1080, 30.0, b"", 0, 0),
)


def queue(uplink: UplinkClient, sid: str, kind: str, at: float, seq: int) -> None:
    """Queue an ended session of ``kind`` (``share``: its exterior camera only) whose
    footage the receiver has none of."""
    cams = CAMERAS[:1] if kind == "share" else CAMERAS
    by = {"kind": "share", "policy": "share_exterior"} if kind == "share" else {"kind": "button"}
    event = p.SessionOpen(sid, "b-1", by, at, at + 3600, cams)
    ends = {c.index: seq + 99 for c in cams}
    uplink.start_session(event, {}, end_seq=ends, emergency=kind != "share")
    uplink.end_session(sid, "rotated" if kind == "share" else "expired")


async def test_at_most_a_week_of_shares_is_owed_and_no_share_is_pinned(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", lambda: T0_NS / 1e9)
    async with opened(tmp_path / "store", audit) as store:
        uplink = unconnected_uplink(store=store)
        t0 = time.time() - 60 * 86400
        queue(uplink, "emergency", "button", t0, 0)
        extra = 30
        shares = [f"share-{i:04d}" for i in range(MAX_OWED_SHARES + extra)]
        for i, sid in enumerate(shares):  # weeks of hourly shares, the receiver away
            queue(uplink, sid, "share", t0 + 3600 * (i + 1), 100 * (i + 1))
        assert [s.id for s in uplink.streams] == ["emergency", *shares[extra:]]
        assert set(shares[:extra]) <= uplink.settled_ids  # given up: no longer owed
        assert len(store.pins) == 2  # the emergency's cameras only
        owed = OwedSessions(tmp_path / "owed.json")
        await owed.save(uplink)
        size = owed.path.stat().st_size
        assert size < MAX_STATE_BYTES // 2, size
        assert set(json.loads(owed.path.read_text())) == {"emergency", *shares[extra:]}

        # A restart: the emergency is pinned until it is queued again; no share is.
        for pin in list(store.pins):
            store.remove_pin(pin)
        again = OwedSessions(owed.path)
        assert again.load() is None
        again.pin(store)
        assert {pin.camera for pin in store.pins} == {"front-door", "hallway-2"}
        assert len(store.pins) == 2
        resumed = unconnected_uplink(store=store)
        key = Ed25519PrivateKey.generate()
        again.resume(resumed, store, Checkpoints(hash_chain.Chains("d-1", key), resumed), None)
        assert [s.id for s in resumed.streams] == ["emergency", *shares[extra:]]
        assert [s.share for s in resumed.streams] == [False] + [True] * MAX_OWED_SHARES
        assert all(not s.pins for s in resumed.streams if s.share)
        assert len(store.pins) == 2  # the emergency's own pins, the boot pins gone
    audit.flush()
    given_up = [
        json.loads(line)
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()
        if '"share_given_up"' in line
    ]
    assert [e["session"] for e in given_up] == shares[:extra]
