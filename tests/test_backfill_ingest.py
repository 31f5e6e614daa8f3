"""Store-and-forward at the receiver, over the real TLS uplink, with a hand-driven agent end.

Live skips ahead, sealed segments (age, real H.264) fill the holes, the device
declares what is lost; the receiver acks cumulatively with ``holds``, records
bad segments without dropping the connection, and survives its own restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pyrage
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from agent.changes import Changes
from provisioning.keys import new_private_key, public_pem
from receiver import camera_ingest, sealed
from receiver.errors import BadSegmentError
from receiver.h264 import parameter_sets, split_nal_units
from receiver.recording import CameraSummary
from receiver.server import Receiver
from tests.logins import logged_in
from tests.media import PacketList, ffprobe_stream
from tests.segments import capture_us, seal
from tests.uplink import connect_device

pytestmark = pytest.mark.timeout(60)

FIRST = 1000  # every camera's first seq in these sessions: seq = FIRST + packet index
CAMERAS = ("cam-a", "cam-b")


@pytest.fixture
def district() -> Any:
    return pyrage.x25519.Identity.generate()


class AgentEnd:
    """The agent's side of the uplink, driven by hand: the test decides every message."""

    def __init__(self, receiver: Receiver, key: Ed25519PrivateKey, device: str) -> None:
        self.receiver, self.key, self.device = receiver, key, device
        self.conn = p.Uplink(p.Role.AGENT)
        self.acks: dict[int, p.Ack] = {}
        self.errors: list[p.Error] = []
        self.closed = False
        self.changed = Changes()

    async def __aenter__(self) -> AgentEnd:
        self.http = aiohttp.ClientSession()
        self.ws, self.welcome = await connect_device(
            self.http, self.receiver, self.conn, self.key, self.device, max_msg_size=0
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self._reader
        await self.http.close()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                event = self.conn.receive(msg.data)  # validates every ack (holds included)
                if isinstance(event, p.Ack):
                    self.acks[event.camera] = event
                elif isinstance(event, p.Error):
                    self.errors.append(event)
                self.changed.notify()
        self.closed = True
        self.changed.notify()

    async def send(self, event: p.Event) -> None:
        wire = self.conn.send(event)
        if isinstance(wire, bytes):
            await self.ws.send_bytes(wire)
        else:
            await self.ws.send_str(wire)

    async def open(self, session: str, packets: PacketList, live: int) -> None:
        """Open ``session`` with both cameras: first seq FIRST, live from FIRST + ``live``."""
        extradata = parameter_sets(packets[0][0]).annex_b()
        cams = tuple(
            p.CameraDesc(i, cid, "interior", "h264", 320, 240, 30.0, extradata, FIRST, FIRST + live)
            for i, cid in enumerate(CAMERAS)
        )
        await self.send(p.SessionOpen(session, "bldg", {"kind": "test"}, 1.0, 2.0, cams))

    async def live(self, cam: int, packets: PacketList, indexes: range) -> None:
        """Live packets ``indexes`` of camera ``cam`` (seq FIRST + index)."""
        for i in indexes:
            payload, key = packets[i]
            await self.send(
                p.Media(p.MediaKind.LIVE, cam, FIRST + i, capture_us(i), key, False, payload)
            )

    async def backfill(self, cam: int, first: int, data: bytes) -> None:
        """One sealed segment whose first packet is index ``first``."""
        await self.send(
            p.Media(
                p.MediaKind.BACKFILL_SEALED,
                cam,
                FIRST + first,
                capture_us(first),
                True,
                False,
                data,
            )
        )

    async def wait(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds; fails if the receiver closes the connection first."""
        await self.changed.wait_until(lambda: predicate() or self.closed)
        assert predicate(), f"connection closed; errors: {self.errors}"

    def acked(self, cam: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        ack = self.acks.get(cam)
        return (-1, ()) if ack is None else (ack.seq, ack.holds)


def enroll(receiver: Receiver, tmp_path: Path, device: str = "dev-1") -> Ed25519PrivateKey:
    key = new_private_key(tmp_path / f"{device}.key")
    (receiver.devices_dir / f"{device}.pub").write_bytes(public_pem(key.public_key()))
    return key


def recipients(receiver: Receiver, district: Any) -> list[Any]:
    return [district.to_public(), pyrage.x25519.Recipient.from_str(receiver.age_recipient)]


def segment_of(camera: str, packets: PacketList, first: int, last: int, to: list[Any]) -> bytes:
    return seal(camera, packets, first, last, to, first_seq=FIRST)[1]


async def frames_per_part(cam: CameraSummary) -> list[int]:
    return [
        int((await asyncio.to_thread(ffprobe_stream, part.path))["nb_read_frames"])
        for part in cam.parts
    ]


def runs(cam: CameraSummary) -> list[tuple[int, int]]:
    return [(r.first_seq, r.last_seq) for r in cam.runs]


async def test_live_skips_ahead_and_backfill_fills_the_hole(
    tmp_path: Path, receiver: Receiver, district: Any, packets: PacketList
) -> None:
    """Pre-roll and the skipped GOP arrive sealed, after live: the recording is gapless."""
    to = recipients(receiver, district)
    async with AgentEnd(receiver, enroll(receiver, tmp_path), "dev-1") as dev:
        await dev.open("s-skip", packets, live=30)
        await dev.live(0, packets, range(30, 45))  # live from the press's GOP ...
        await dev.live(0, packets, range(60, 90))  # ... skips 45..59 to the next keyframe
        await dev.live(1, packets, range(30, 90))  # the other camera keeps up
        # Nothing from the first seq on yet: holds say what live already delivered.
        await dev.wait(lambda: dev.acked(0) == (FIRST - 1, ((1030, 1043), (1060, 1088))))
        await dev.backfill(0, 30, segment_of("cam-a", packets, 30, 59, to))  # 30..44 held
        await dev.wait(lambda: dev.acked(0) == (FIRST - 1, ((1030, 1088),)))
        await dev.backfill(0, 0, segment_of("cam-a", packets, 0, 29, to))  # the pre-roll
        await dev.backfill(1, 0, segment_of("cam-b", packets, 0, 29, to))
        await dev.wait(lambda: dev.acked(0)[0] == 1088 and dev.acked(1)[0] == 1088)
        await dev.backfill(0, 0, segment_of("cam-a", packets, 0, 29, to))  # resent: ignored
        await dev.live(0, packets, range(80, 90))
        await dev.send(p.SessionClose("s-skip", "all clear"))
        await dev.wait(lambda: dev.acked(0) == (1089, ()) and dev.acked(1) == (1089, ()))
        assert dev.errors == []
    summary = receiver.store.get("s-skip").summary()
    for cam in summary.cameras:
        assert cam.complete, cam
        assert (cam.first_seq, cam.durable_seq, cam.frames_durable) == (1000, 1089, 90)
        assert not cam.gaps
        assert not cam.bad_segments
        assert await frames_per_part(cam) == [p.frames for p in cam.parts]  # every one decodes
    cam_a, cam_b = summary.cameras
    assert runs(cam_a) == [(1000, 1029), (1030, 1059), (1060, 1089)]
    assert cam_a.duplicates == 15 + 30 + 10
    assert runs(cam_b) == [(1000, 1029), (1030, 1089)]
    assert cam_b.duplicates == 0


async def test_declared_gap_moves_the_ack_past_it(
    tmp_path: Path, receiver: Receiver, packets: PacketList
) -> None:
    async with AgentEnd(receiver, enroll(receiver, tmp_path), "dev-1") as dev:
        await dev.open("s-gap", packets, live=0)
        await dev.live(0, packets, range(0, 30))
        await dev.live(0, packets, range(60, 90))
        await dev.wait(lambda: dev.acked(0) == (1028, ((1060, 1088),)))
        await dev.send(p.Gap("s-gap", 0, 1030, 1059, "evicted"))
        # Recorded durably, the run before it finished: the ack jumps over the gap.
        await dev.wait(lambda: dev.acked(0) == (1088, ()))
        doc = json.loads((receiver.store.get("s-gap").directory / "session.json").read_text())
        assert doc["cameras"][0]["gaps"] == [{"first": 1030, "last": 1059, "reason": "evicted"}]
        await dev.send(p.SessionClose("s-gap", "all clear"))
        await dev.wait(lambda: dev.acked(0) == (1089, ()))
    async with logged_in(receiver) as http, http.get(receiver.url + "api/sessions") as resp:
        (session,) = (await resp.json())["sessions"]
    cam = session["cameras"][0]
    assert cam["gaps"] == [{"first": 1030, "last": 1059, "reason": "evicted"}]
    assert (cam["complete"], cam["missing"], cam["durable_seq"]) == (True, [], 1089)
    assert [(r["first_seq"], r["last_seq"]) for r in cam["runs"]] == [(1000, 1029), (1060, 1089)]


async def test_bad_segments_are_recorded_and_the_connection_stays_up(
    tmp_path: Path,
    receiver: Receiver,
    district: Any,
    packets: PacketList,
    caplog: pytest.LogCaptureFixture,
) -> None:
    to = recipients(receiver, district)
    good = segment_of("cam-a", packets, 0, 29, to)
    damaged = good[:-100] + bytes([good[-100] ^ 1]) + good[-99:]
    bad = {  # first packet index -> a segment the receiver cannot record
        0: damaged,
        30: segment_of("cam-a", packets, 30, 59, [district.to_public()]),  # not for us
        60: segment_of("cam-b", packets, 60, 89, to),  # another camera's
        45: b"not an age file at all",
    }
    caplog.set_level(logging.ERROR, logger="receiver")
    async with AgentEnd(receiver, enroll(receiver, tmp_path), "dev-1") as dev:
        await dev.open("s-bad", packets, live=30)
        await dev.live(0, packets, range(30, 60))
        await dev.live(1, packets, range(30, 60))
        for first, data in bad.items():
            await dev.backfill(0, first, data)
        await dev.backfill(0, 0, damaged)  # again: counted, not listed twice
        # Neither camera nor the connection is disturbed: live goes on, acks go on.
        await dev.live(0, packets, range(60, 90))
        await dev.live(1, packets, range(60, 90))
        await dev.wait(
            lambda: dev.acked(0)[1] == ((1030, 1088),) and dev.acked(1)[1] == ((1030, 1088),)
        )
        await dev.backfill(0, 0, good)  # the agent goes on: the real segment still fills in
        await dev.wait(lambda: dev.acked(0) == (1088, ()))
        assert not dev.closed
        assert dev.errors == []
        await dev.send(p.SessionClose("s-bad", "all clear"))
        await dev.wait(lambda: dev.acked(0) == (1089, ()))
    cam = receiver.store.get("s-bad").summary().camera("cam-a")
    found = {b.first_seq: (b.count, b.capture_us, b.error.split(":")[0]) for b in cam.bad_segments}
    assert found == {
        1000: (2, capture_us(0), "age payload damaged"),
        1030: (1, capture_us(30), "not sealed to this identity (no matching key)"),
        1060: (1, capture_us(60), "segment of camera 'cam-b'"),
        1045: (1, capture_us(45), "not a valid age file"),
    }
    assert cam.complete
    assert not receiver.store.get("s-bad").summary().camera("cam-b").bad_segments
    doc = json.loads((receiver.store.get("s-bad").directory / "session.json").read_text())
    assert doc["cameras"][0]["bad_segments"][0] == {
        "first_seq": 1000,
        "last_seq": None,
        "capture_us": capture_us(0),
        "error": "age payload damaged: decryption error",
        "count": 2,
    }
    errors = [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]
    assert len(errors) == 5
    assert all("device dev-1 session s-bad camera cam-a" in e for e in errors)
    assert {e.split("seqs ")[1].split(" ")[0] for e in errors} == {
        "1000..?",
        "1030..?",
        "1045..?",
        "1060..?",
    }


async def test_a_segment_that_cannot_be_opened_ends_the_run_before_it_and_is_declared(
    tmp_path: Path, receiver: Receiver, district: Any, packets: PacketList
) -> None:
    """Bit rot in a sealed segment: the run it would have continued is finished at once
    (its last frame durable, so the ack reaches the seq before the segment: the device
    sees exactly where the damage begins), and the gap the device then declares ``lost``
    is recorded as ``unreadable``. The ack stopped one frame short of the damaged
    segment before, for good, and a session's backfill with it (found by a review)."""
    to = recipients(receiver, district)
    good = segment_of("cam-a", packets, 30, 59, to)
    damaged = good[:-100] + bytes([good[-100] ^ 1]) + good[-99:]
    async with AgentEnd(receiver, enroll(receiver, tmp_path), "dev-1") as dev:
        await dev.open("s-rot", packets, live=90)
        await dev.backfill(0, 0, segment_of("cam-a", packets, 0, 29, to))
        await dev.backfill(0, 30, damaged)
        await dev.wait(lambda: dev.acked(0) == (1029, ()))
        await dev.send(p.Gap("s-rot", 0, 1030, 1059, "lost"))
        await dev.backfill(0, 60, segment_of("cam-a", packets, 60, 89, to))
        await dev.send(p.SessionClose("s-rot", "all clear"))
        await dev.wait(lambda: dev.acked(0) == (1089, ()))
        assert dev.errors == []
    cam = receiver.store.get("s-rot").summary().camera("cam-a")
    assert [(b.first_seq, b.error.split(":")[0]) for b in cam.bad_segments] == [
        (1030, "age payload damaged")
    ]
    assert cam.complete and cam.missing == ()
    assert runs(cam) == [(1000, 1029), (1060, 1089)]
    doc = json.loads((receiver.store.get("s-rot").directory / "session.json").read_text())
    assert doc["cameras"][0]["gaps"] == [{"first": 1030, "last": 1059, "reason": "unreadable"}]


async def test_a_live_packet_waits_for_the_segment_before_it(
    tmp_path: Path,
    receiver: Receiver,
    district: Any,
    packets: PacketList,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A segment ends mid-GOP; live P-frames follow at once. While the segment is being
    opened (held here), they queue behind it: overtaking, they would fit no run and be
    dropped. The other camera is not held up meanwhile."""
    release = threading.Event()
    opening = threading.Event()
    real_open = sealed.open_segment

    def held_open(data: bytes, identities: list[Any]) -> Any:
        opening.set()
        assert release.wait(30)
        return real_open(data, identities)

    monkeypatch.setattr(camera_ingest, "open_segment", held_open)
    to = recipients(receiver, district)
    async with AgentEnd(receiver, enroll(receiver, tmp_path), "dev-1") as dev:
        await dev.open("s-order", packets, live=60)
        await dev.backfill(0, 0, segment_of("cam-a", packets, 0, 44, to))
        await dev.live(0, packets, range(45, 60))  # from RAM: P-frames continuing it
        await asyncio.to_thread(opening.wait, 30)
        await dev.live(1, packets, range(60, 76))
        await dev.wait(lambda: dev.acked(1)[1] == ((1060, 1074),))  # not held up
        assert dev.acked(0) == (FIRST - 1, ())  # the ack at the session_open: nothing yet
        release.set()
        # In order: the segment, then the P-frames, reach the live run: one complete run.
        await dev.wait(lambda: dev.acked(0) == (1059, ()))
        await dev.send(p.SessionClose("s-order", "all clear"))
        await dev.wait(lambda: dev.acked(1) == (FIRST - 1, ((1060, 1075),)))
        assert dev.errors == []
    cam = receiver.store.get("s-order").summary().camera("cam-a")
    assert (cam.dropped, cam.duplicates) == (0, 0)
    assert runs(cam) == [(1000, 1059)]
    assert await frames_per_part(cam) == [60]


async def test_receiver_restart_mid_session_then_backfill_continues(
    tmp_path: Path, district: Any, packets: PacketList
) -> None:
    data = tmp_path / "receiver"
    async with Receiver(data, "127.0.0.1", 0) as first:
        key = enroll(first, tmp_path)
        recipient = first.age_recipient
        to = recipients(first, district)
        async with AgentEnd(first, key, "dev-1") as dev:
            await dev.open("s-restart", packets, live=30)
            await dev.live(0, packets, range(30, 60))
            await dev.wait(lambda: dev.acked(0)[1] == ((1030, 1058),))
    assert (data / "age.key").stat().st_mode & 0o777 == 0o600
    async with Receiver(data, "127.0.0.1", 0) as second:
        assert second.age_recipient == recipient  # the same identity: old segments still open
        async with AgentEnd(second, key, "dev-1") as dev:
            assert dev.welcome.acked == {"s-restart": {"cam-a": FIRST - 1, "cam-b": FIRST - 1}}
            await dev.open("s-restart", packets, live=60)  # resumed: live goes on at 60
            # Right after session_open: what is held beyond the cumulative ack.
            await dev.wait(lambda: dev.acked(0) == (FIRST - 1, ((1030, 1059),)))
            await dev.live(0, packets, range(60, 90))
            await dev.backfill(0, 0, segment_of("cam-a", packets, 0, 29, to))
            await dev.wait(lambda: dev.acked(0) == (1088, ()))
            await dev.send(p.SessionClose("s-restart", "all clear"))
            await dev.wait(lambda: dev.acked(0) == (1089, ()))
        cam = second.store.get("s-restart").summary().camera("cam-a")
    assert cam.complete
    # The run from 1030 goes on in a new part file (at a keyframe here).
    assert runs(cam) == [(1000, 1029), (1030, 1089)]
    assert [part.first_seq for part in cam.parts] == [1000, 1030, 1060]
    assert await frames_per_part(cam) == [30, 30, 30]


def test_sealed_plaintext_is_bounded(district: Any) -> None:
    """Never more than a segment's plaintext limit is decrypted, whatever the file says."""
    big = pyrage.encrypt(bytes(sealed.MAX_PLAINTEXT_BYTES + 1000), [district.to_public()])
    assert len(big) <= sealed.MAX_SEALED_BYTES  # small enough to be tried ...
    with pytest.raises(BadSegmentError, match="holds more than"):
        sealed.unseal_bounded(big, [district])  # ... and cut off at the bound
    with pytest.raises(BadSegmentError, match="over the limit"):
        sealed.unseal_bounded(bytes(sealed.MAX_SEALED_BYTES + 1), [district])


def _garbled_keyframe(keyframe: bytes) -> bytes:
    """``keyframe`` with its SPS and IDR slices replaced by bytes no decoder can read (the
    NAL headers stay valid: what a camera sending garbage looks like to the agent)."""
    rnd = random.Random(7)
    units = split_nal_units(keyframe)
    return b"".join(
        b"\x00\x00\x00\x01"
        + (u[:1] + bytes(rnd.randrange(1, 256) for _ in u[1:]) if u[0] & 0x1F in (5, 7) else u)
        for u in units
    )


async def test_a_live_keyframe_no_part_can_begin_with_spares_the_connection(
    tmp_path: Path, receiver: Receiver, packets: PacketList, caplog: pytest.LogCaptureFixture
) -> None:
    """One camera's garbage at a part's start is that camera's bad footage: the device's
    other camera, its connection and that camera's next good keyframe go on."""
    garbage = _garbled_keyframe(packets[30][0])
    caplog.set_level(logging.ERROR, logger="receiver")
    async with AgentEnd(receiver, enroll(receiver, tmp_path), "dev-1") as dev:
        await dev.open("s-garbage", packets, live=30)
        for _ in range(2):  # sent again (the device resends what was not acked): counted
            await dev.send(
                p.Media(p.MediaKind.LIVE, 0, FIRST + 30, capture_us(30), True, False, garbage)
            )
        await dev.live(0, packets, range(31, 60))  # its GOP: no run to append to, dropped
        await dev.live(1, packets, range(30, 90))
        await dev.live(0, packets, range(60, 90))  # the next keyframe begins a part
        await dev.wait(
            lambda: dev.acked(0)[1] == ((1060, 1088),) and dev.acked(1)[1] == ((1030, 1088),)
        )
        assert not dev.closed
        assert dev.errors == []
    cam = receiver.store.get("s-garbage").summary().camera("cam-a")
    assert [(b.first_seq, b.count, b.error) for b in cam.bad_segments] == [
        (1030, 2, "live packet: camera 'cam-a': cannot read H.264 at seq 1030: unreadable SPS")
    ]
    # No run, nor part file, was begun for the garbage.
    assert [part.path.name for part in cam.parts] == ["cam-a.1060.mp4"]
    logged = [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]
    assert len(logged) == 1  # once a minute at most
    assert "camera cam-a: live packet seq 1030 not recorded: " in logged[0]
