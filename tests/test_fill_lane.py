"""The fill lane against the real sealed store while its writer moves a segment to disk.

The store's writer thread indexes a segment, then takes it off its queue. The fill
lane, on the event loop, asks where a seq is: on disk, or still on its way. If the
writer finished between two separate questions, the seq was in neither answer and
the lane declared footage lost that was on disk (found by a review: the store had
``find`` and ``open_first_seq`` and the lane called one after the other).
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from agent import protocol as p
from agent.audit import AuditLog
from agent.store import SegmentStore, StoredSegment
from agent.uplink import SessionStream, UplinkClient, _SentSegment
from hardware import EncodedPacket
from tests.media import make_h264_packets
from tests.test_store import (
    IDENTITY,
    PER_SEGMENT,
    SEGMENT_S,
    STREAM,
    T0_NS,
    Feed,
    Sealed,
    opened,
)
from tests.uplink import unconnected_uplink

pytestmark = pytest.mark.timeout(60)


class WriterFinishesAfterALookup(SegmentStore):
    """A store whose writer runs only when told, right after the next lookup returns:
    the moment a thread switch may let the real writer thread run."""

    armed = False

    def _finish_writing(self) -> None:
        if self.armed:
            self.armed = False
            self._jobs.put(None)
            self._writer()  # this thread: everything queued goes to disk, then it returns

    def find(self, camera: str, seq: int) -> StoredSegment | None:
        found = super().find(camera, seq)
        self._finish_writing()
        return found

    def locate(self, camera: str, seq: int) -> tuple[StoredSegment | None, int | None]:
        found = super().locate(camera, seq)
        self._finish_writing()
        return found

    def open_first_seq(self, camera: str) -> int | None:
        first = super().open_first_seq(camera)
        self._finish_writing()
        return first


def ended_session(store: SegmentStore, end_seq: int) -> tuple[UplinkClient, SessionStream]:
    """An uplink owing one camera's ended session, seqs 0..``end_seq``, planned as on a
    connection: the receiver holds nothing and RAM none of it (after a restart, or RAM
    trimmed), so everything comes from the store."""
    uplink = unconnected_uplink(store=store)
    camera = p.CameraDesc(0, "cam", "interior", "h264", 160, 120, 30.0, b"", 0, 0)
    open_ = p.SessionOpen(
        "s-1", "b-1", {"kind": "button"}, time.time(), time.time() + 60, (camera,)
    )
    stream = uplink.start_session(open_, {}, end_seq={0: end_seq})
    uplink._plan(stream)
    return uplink, stream


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl", lambda: T0_NS / 1e9)
    yield log
    log.close()


def test_footage_on_its_way_to_disk_is_waited_for_not_declared_lost(
    tmp_path: Path, audit: AuditLog
) -> None:
    store = WriterFinishesAfterALookup(
        tmp_path / "store",
        [IDENTITY.to_public()],
        audit=audit,
        boot_id="boot-1",
        segment_s=SEGMENT_S,
        clock=lambda: T0_NS / 1e9 + 60,
    )
    store.directory.mkdir()
    store._scan()  # open() without its writer thread: this test runs the writer
    feed = Feed(make_h264_packets(3 * PER_SEGMENT, 160, 120, fps=30, gop=PER_SEGMENT // 2))
    for pkt in feed.take(PER_SEGMENT + 1):  # seals 0..39 (queued), opens 40..
        store.push(pkt, STREAM)
    assert store.segments("cam") == []

    uplink, stream = ended_session(store, PER_SEGMENT - 1)

    store.armed = True
    first = uplink._fill_item(stream)
    assert store.segments("cam") != []  # the writer did finish during the decision
    assert not isinstance(first, tuple) or not isinstance(first[1], p.Gap), first
    item = first or uplink._fill_item(stream)
    assert item is not None
    cam, what = item
    assert cam == 0
    assert isinstance(what, StoredSegment)
    assert (what.first_seq, what.last_seq) == (0, PER_SEGMENT - 1)


async def test_a_segment_gone_before_it_is_sent_is_declared_lost_not_skipped(
    tmp_path: Path, audit: AuditLog
) -> None:
    """A segment found, then unreadable when its turn to be sent came (evicted, or a
    failing card): its range is owed again and, existing nowhere, declared lost. It was
    skipped without a word, and stayed in flight for the rest of the connection."""
    feed = Feed(make_h264_packets(3 * PER_SEGMENT, 160, 120, fps=30, gop=PER_SEGMENT // 2))
    async with opened(tmp_path / "store", audit) as store:
        sealed = Sealed(store)
        for pkt in feed.take(2 * PER_SEGMENT + 1):
            store.push(pkt, STREAM)
        first, second = await sealed.wait(2)
        uplink, stream = ended_session(store, 2 * PER_SEGMENT - 1)
        assert uplink._fill_item(stream) == (0, first)
        first.path.unlink()
        no_socket = cast(Any, None)  # the read fails before anything is sent
        await uplink._send_segment(no_socket, no_socket, 0, first)
        assert not uplink._lanes[0].inflight
        assert uplink._fill_item(stream) == (0, p.Gap("s-1", 0, 0, PER_SEGMENT - 1, "lost"))
        assert uplink._fill_item(stream) == (0, second)
        assert store.find("cam", 0) == second
    entries = [json.loads(line) for line in audit.path.read_text().splitlines()]
    (unreadable,) = [e for e in entries if e["event"] == "segment_unreadable"]
    assert (unreadable["first_seq"], unreadable["last_seq"]) == (0, PER_SEGMENT - 1)
    assert "FileNotFoundError" in unreadable["reason"]


def test_acks_for_a_session_not_planned_yet_leave_the_planned_lanes_alone() -> None:
    """The fill lanes belong to the session planned on the connection. Once it settles,
    the next session is the head before the writer plans it; its acks (or a reconnect's
    welcome) indexed the old lanes by camera: an IndexError that ended the uplink for
    good (found by a review)."""
    uplink = unconnected_uplink()

    def session(sid: str, cameras: int) -> p.SessionOpen:
        descs = tuple(
            p.CameraDesc(i, f"cam{i}", "interior", "h264", 64, 64, 10.0, b"", 0, 0)
            for i in range(cameras)
        )
        return p.SessionOpen(sid, "b-1", {"kind": "button"}, 1.0, 2.0, descs)

    first = uplink.start_session(session("A", 1), {}, acked={0: 9}, end_seq={0: 10})
    uplink.start_session(session("C", 3), {}, acked={0: 0, 1: 0, 2: 0}, end_seq={0: 5, 1: 5, 2: 5})
    first.close_reason, first.close_sent = "ended", True
    uplink._plan(first)
    uplink._opened_on_conn = "A"  # as the writer does once it sent A's session_open
    uplink._on_ack(p.Ack("A", 0, 10))  # A settles: C is the head, not planned yet
    assert uplink.stream("A") is None
    uplink._on_ack(p.Ack("C", 2, 3))
    stream = uplink.stream("C")
    assert stream is not None
    assert stream.acked == [0, 0, 3]

    # A reconnect: the welcome settles and acknowledges before anything is planned.
    uplink._opened_on_conn = None
    uplink.start_session(session("D", 4), {}, acked={}, end_seq={c: 5 for c in range(4)})
    uplink._resume(p.Welcome({"C": {"cam2": 4}, "D": {"cam3": 2}}, 5.0, 0))
    d = uplink.stream("D")
    assert d is not None
    assert d.acked[3] == 2


async def test_a_segment_unreadable_for_now_is_tried_again_not_declared_lost(
    tmp_path: Path, audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error is not a missing file: the segment stays in the store (it was
    forgotten, its bytes out of the quota, its footage declared lost while on disk) and
    the lane tries it again after a pause, not in a loop (found by a review)."""
    feed = Feed(make_h264_packets(3 * PER_SEGMENT, 160, 120, fps=30, gop=PER_SEGMENT // 2))
    async with opened(tmp_path / "store", audit) as store:
        sealed = Sealed(store)
        for pkt in feed.take(PER_SEGMENT + 1):
            store.push(pkt, STREAM)
        (first,) = await sealed.wait(1)
        uplink, stream = ended_session(store, PER_SEGMENT - 1)
        assert uplink._fill_item(stream) == (0, first)

        def failing(seg: StoredSegment) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(SegmentStore, "read", staticmethod(failing))
        no_socket = cast(Any, None)  # the read fails before anything is sent
        await uplink._send_segment(no_socket, no_socket, 0, first)
        assert uplink._fill_item(stream) is None  # paused: not read again at once
        assert store.find("cam", 0) == first  # still the store's
        uplink._lanes[0].paused_until = 0.0  # the pause is over
        assert uplink._fill_item(stream) == (0, first)


def planned(end_seq: int) -> tuple[UplinkClient, SessionStream]:
    """An uplink with no store owing one camera's ended session, planned on a connection."""
    uplink = unconnected_uplink()
    camera = p.CameraDesc(0, "cam", "interior", "h264", 160, 120, 30.0, b"", 0, 0)
    open_ = p.SessionOpen(
        "s-1", "b-1", {"kind": "button"}, time.time(), time.time() + 60, (camera,)
    )
    stream = uplink.start_session(open_, {}, end_seq={0: end_seq})
    uplink._plan(stream)
    uplink._opened_on_conn = stream.id
    return uplink, stream


def test_a_segment_before_footage_the_receiver_held_already_is_not_declared_lost() -> None:
    """After a restart the agent knew nothing the receiver held: the live run from seq 30
    of the connection before (its acks never came). The fill lane sent the sealed
    segment 0..29 and then 30 on; the receiver's first ack (at the session_open) showed
    30.. held and 0 not yet. That was taken as proof that the receiver got past the
    segment without recording it, and 0..29 was declared lost though recorded (a CI
    failure under load). What the receiver held before this plan's footage is no proof."""
    uplink, stream = planned(299)
    uplink._lanes[0].unproven.append(_SentSegment(0, 29, "0-29.age", followed=True))
    uplink._on_ack(p.Ack("s-1", 0, -1, ((30, 150),)))  # at the session_open
    uplink._on_ack(p.Ack("s-1", 0, -1, ((30, 180),)))
    assert stream.unrecorded[0] == []
    uplink._on_ack(p.Ack("s-1", 0, 180))  # it was recorded after all
    assert stream.unrecorded[0] == [] and uplink._lanes[0].unproven == []


def test_a_segment_the_receiver_got_past_is_declared_lost() -> None:
    """The damaged-segment case the rule is for: nothing held at the session_open, then
    the seq after the segment held and its first owed seq not."""
    uplink, stream = planned(299)
    uplink._lanes[0].unproven.append(_SentSegment(0, 29, "0-29.age", followed=True))
    uplink._on_ack(p.Ack("s-1", 0, -1))  # at the session_open: nothing yet
    uplink._on_ack(p.Ack("s-1", 0, -1, ((30, 59),)))
    assert stream.unrecorded[0] == [(0, 29)]
    assert uplink.stats.segments_unrecorded == 1


def test_ram_of_all_sessions_together_stays_within_one_budget() -> None:
    """Review l1: the budget was per session. With the receiver away and an exterior share
    rotating hourly, each ended share kept its 64 MiB: RAM grew by that every hour."""
    uplink = unconnected_uplink(unacked_max_bytes=10_000)

    def share(sid: str) -> p.SessionOpen:
        cam = p.CameraDesc(0, "front", "exterior", "h264", 64, 64, 10.0, b"", 0, 0)
        return p.SessionOpen(sid, "b-1", {"kind": "share"}, 1.0, 2.0, (cam,))

    seq = 0
    for hour in range(12):
        stream = uplink.start_session(share(f"share-{hour}"), {}, emergency=False)
        for _ in range(20):  # 20 x 1000 bytes an "hour": twice the budget
            uplink.push(stream, 0, EncodedPacket("front", seq, seq, seq, True, "h264", b"x" * 1000))
            seq += 1
        uplink.end_session(stream.id, "rotated")
        assert sum(s.ram_bytes for s in uplink.streams) <= 10_000
    assert len(uplink.streams) == 12  # each still owed to the receiver (from the store)
    *older, newest = uplink.streams
    assert newest.ram_bytes == 10_000 and all(s.ram_bytes == 0 for s in older)
