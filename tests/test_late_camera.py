"""A camera with no footage yet when a session opens joins it as soon as it has some.

After a power cut the Pi is back in about 20 s, IP cameras take longer: a press right
after the agent starts, or an emergency resumed after a restart, opens its session
while a camera is still connecting. Found by a review (s2, s2b, s2c): such a camera was
left out of the emergency for good, silently; its footage sealed before a restart was
neither delivered nor declared lost, and a later restart declared it all lost, twice.

Real agent, real receiver on loopback; the late camera is the demo's ``hallway-2``,
held back by a gate the test opens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import CameraConfig, load_config
from agent.daemon import Agent, make_source
from agent.segment import SegmentName
from agent.uplink import SessionStream
from breakglass.demo import press_button, write_agent_config
from hardware import CameraSource, EncodedPacket
from receiver.recording import RecordingStore, TrackInfo
from receiver.server import Receiver
from receiver.summaries import DeclaredGap
from tests.emergencies import pressed
from tests.netproxy import TcpProxy, via_proxy
from tests.recordings import (
    assert_declared,
    assert_session_gapless,
    camera_summary,
    recorded_seqs,
)

pytestmark = pytest.mark.timeout(150)

LATE = "hallway-2"
BLOCK = 100_000  # agent.statefile.SequenceReservations.BLOCK: a restart numbers on from here


def gated(gates: dict[str, asyncio.Event]) -> Callable[[CameraConfig], CameraSource]:
    """Camera sources as configured; those named in ``gates`` yield nothing until their
    gate opens (an IP camera still booting), then stream as usual."""

    def factory(camera: CameraConfig) -> CameraSource:
        source = make_source(camera)
        if camera.id not in gates:
            return source
        gate = gates[camera.id]
        real = type(source)

        class Late(real):  # type: ignore[valid-type, misc]
            async def packets(self) -> AsyncIterator[EncodedPacket]:
                await gate.wait()
                async for packet in real.packets(self):
                    yield packet

        source.__class__ = Late
        return source

    return factory


async def packets_of(agent: Agent, camera: str, n: int) -> None:
    """Wait until ``camera`` delivered ``n`` more packets."""
    done = asyncio.Event()
    count = 0

    def sink(packet: EncodedPacket) -> None:
        nonlocal count
        if packet.camera == camera:
            count += 1
            if count >= n:
                done.set()

    unsubscribe = agent.capture.subscribe(sink)
    try:
        await done.wait()
    finally:
        unsubscribe()


async def within(agent: Agent, predicate: Callable[[], bool], timeout: float = 40) -> None:
    """Wait (re-checked on every ack) until ``predicate()`` holds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        await agent.uplink.wait_until(predicate)


def ids(stream: SessionStream) -> list[str]:
    return [c.id for c in stream.open.cameras]


def audited(config_state: Path, session: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in (config_state / "audit.log").read_text().splitlines()]
    return [e for e in entries if e.get("session") == session]


def disclosed_first(entries: list[dict[str, Any]]) -> dict[str, int]:
    first: dict[str, int] = {}
    for e in entries:
        if e["event"] == "disclosure":
            for cam in e["cameras"]:
                first[cam["id"]] = min(first.get(cam["id"], cam["first"]), cam["first"])
    return first


async def test_a_camera_that_starts_after_the_press_joins_the_emergency(
    tmp_path: Path, receiver: Receiver
) -> None:
    gate = asyncio.Event()
    path = write_agent_config(
        tmp_path / "agent", receiver, fps=30, preroll_s=2, store="segment_s = 1"
    )
    config = load_config(path)
    async with Agent(config, source_factory=gated({LATE: gate})) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        await packets_of(agent, "front-door", 30)
        press_button(agent)  # the hallway camera is still connecting
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None and LATE in session.cameras
        stream = agent.uplink.stream(session.id)
        assert stream is not None and ids(stream) == ["front-door"]
        await within(agent, lambda: stream.acked[0] > stream.open.cameras[0].live_seq + 15)

        gate.set()  # the camera comes up: it joins at the next index, live from then on
        await within(
            agent,
            lambda: (
                ids(stream) == ["front-door", LATE]
                and stream.acked[1] > stream.open.cameras[1].first_seq + 60
            ),
        )
        assert agent.uplink.stats.refusals == {}
        agent.end("all clear")
        async with asyncio.timeout(60):
            await agent.uplink.wait_settled(session.id)

    assert_session_gapless(receiver, stream)
    late = camera_summary(receiver, session.id, LATE)
    assert late is not None and late.first_seq == stream.open.cameras[1].first_seq
    entries = audited(config.state_dir, session.id)
    assert disclosed_first(entries) == {c.id: c.first_seq for c in stream.open.cameras}
    (end,) = [e for e in entries if e["event"] == "session_end"]
    assert {c["id"]: c["last"] for c in end["cameras"]} == {
        c.id: stream.end_seq[c.index] for c in stream.open.cameras
    }


async def test_a_camera_slow_after_a_restart_keeps_its_footage_and_rejoins(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A power cut mid-emergency with the link down, the hallway camera slow to come back
    after the restart, then a second restart with every camera up (the review's s2c)."""
    async with TcpProxy(receiver.port) as proxy:
        path = write_agent_config(
            tmp_path / "agent", receiver, fps=30, preroll_s=2, store="segment_s = 1"
        )
        config = load_config(via_proxy(path, receiver, proxy))
        store = config.store.directory
        async with Agent(config) as agent:
            session = await pressed(agent)
            stream = agent.uplink.stream(session.id)
            assert stream is not None and ids(stream) == ["front-door", LATE]
            first = {c.id: c.first_seq for c in stream.open.cameras}
            await within(agent, lambda: min(stream.acked) > stream.preroll_end[0] + 15)
            proxy.cut()  # footage nobody has received yet, sealed in the store
            await agent.capture.wait_packets(90)
        proxy.restore()
        sealed = last_sealed(store / LATE, below=BLOCK)
        assert sealed > stream.acked[1]

        gate = asyncio.Event()
        async with Agent(config, source_factory=gated({LATE: gate})) as again:
            await again.uplink.wait_until(lambda: again.uplink.stream(session.id) is not None)
            resumed = again.uplink.stream(session.id)
            assert resumed is not None
            assert ids(resumed) == ["front-door", LATE]
            late = ids(resumed).index(LATE)
            assert resumed.open.cameras[late].first_seq == first[LATE]
            # Its footage stays owed (pinned, in owed.json) while it is down...
            assert {p.camera for p in again.store.pins} == set(session.cameras)
            again.owed.refresh(again.uplink)
            assert again.owed.entries[session.id]["first"] == first
            gate.set()  # ... and once it is back it is live again, in the same session
            await within(again, lambda: resumed.newest(late) > BLOCK + 60)
        second = last_sealed(store / LATE, below=2 * BLOCK)
        assert second > BLOCK

        async with Agent(config) as third:  # a second restart, every camera up at once
            await third.uplink.wait_until(lambda: third.uplink.stream(session.id) is not None)
            final = third.uplink.stream(session.id)
            assert final is not None
            assert {c.id: c.first_seq for c in final.open.cameras} == first
            await within(third, lambda: min(map(final.newest, range(2))) > 2 * BLOCK + 30)
            third.end("all clear")
            async with asyncio.timeout(60):
                await third.uplink.wait_settled(session.id)

    late_seqs = recorded_seqs(receiver, session.id, LATE)
    # Nothing the agent stored was called lost: before the cut, during the second run.
    assert set(range(first[LATE], sealed + 1)) <= late_seqs
    back = min(s for s in late_seqs if s >= BLOCK)  # its first keyframe after the restart
    assert set(range(back, second + 1)) <= late_seqs
    summary = camera_summary(receiver, session.id, LATE)
    assert summary is not None and summary.first_seq == first[LATE]
    assert len(set(summary.gaps)) == len(summary.gaps), summary.gaps
    for gap in summary.gaps:
        assert not any(gap.first <= s <= gap.last for s in late_seqs), gap
    for cam in session.cameras:
        assert_declared(receiver, session.id, cam)
    entries = audited(config.state_dir, session.id)
    assert disclosed_first(entries) == first
    (end,) = [e for e in entries if e["event"] == "session_end"]
    assert {c["id"]: c["last"] for c in end["cameras"]} == {
        cam: max(recorded_seqs(receiver, session.id, cam)) for cam in session.cameras
    }


async def test_a_camera_that_never_comes_back_after_a_restart_is_delivered_from_the_store(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The emergency ends while the camera is still down after the restart: what the store
    holds of it goes out, and the session ends (signed) at its last stored seq."""
    async with TcpProxy(receiver.port) as proxy:
        path = write_agent_config(
            tmp_path / "agent", receiver, fps=30, preroll_s=2, store="segment_s = 1"
        )
        config = load_config(via_proxy(path, receiver, proxy))
        async with Agent(config) as agent:
            session = await pressed(agent)
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            first = {c.id: c.first_seq for c in stream.open.cameras}
            proxy.cut()
            await agent.capture.wait_packets(60)
        proxy.restore()
        sealed = last_sealed(config.store.directory / LATE, below=BLOCK)

        async with Agent(config, source_factory=gated({LATE: asyncio.Event()})) as again:
            await again.uplink.wait_until(lambda: again.uplink.stream(session.id) is not None)
            resumed = again.uplink.stream(session.id)
            assert resumed is not None and LATE in ids(resumed)
            await within(again, lambda: resumed.newest(0) > BLOCK + 30)
            again.end("all clear")
            async with asyncio.timeout(60):
                await again.uplink.wait_settled(session.id)

    assert set(range(first[LATE], sealed + 1)) == recorded_seqs(receiver, session.id, LATE)
    for cam in session.cameras:
        assert_declared(receiver, session.id, cam)
    (end,) = [e for e in audited(config.state_dir, session.id) if e["event"] == "session_end"]
    assert {c["id"]: c["last"] for c in end["cameras"]}[LATE] == sealed


def last_sealed(folder: Path, *, below: int) -> int:
    names = [SegmentName.parse(f.name) for f in folder.glob("*.age")]
    return max(n.last_seq for n in names if n is not None and n.last_seq < below)


async def test_a_later_first_seq_declares_the_seqs_before_it_lost_once(tmp_path: Path) -> None:
    """An agent that announces a later first seq than before says the seqs before it are
    lost: declared once, however often it opens the session so."""
    track = TrackInfo("cam", "interior", "h264", 640, 480, 30.0, b"", 100, 100)
    later = TrackInfo("cam", "interior", "h264", 640, 480, 30.0, b"", 300, 300)
    async with RecordingStore(tmp_path / "rx") as store:
        await store.open_session("s1", "dev", {}, [track])
        for _ in range(3):
            await store.open_session("s1", "dev", {}, [later])
        assert store.get("s1").camera("cam").gaps == [DeclaredGap(100, 299, "lost")]


def paused(
    camera_id: str, after: int, resume: asyncio.Event
) -> Callable[[CameraConfig], CameraSource]:
    """Camera sources as configured; ``camera_id`` stops after ``after`` packets until
    ``resume`` is set (a camera that went down, and came back)."""

    def factory(camera: CameraConfig) -> CameraSource:
        source = make_source(camera)
        if camera.id != camera_id:
            return source
        real = type(source)

        class Paused(real):  # type: ignore[valid-type, misc]
            async def packets(self) -> AsyncIterator[EncodedPacket]:
                n = 0
                async for packet in real.packets(self):
                    n += 1
                    if n == after:
                        await resume.wait()
                    yield packet

        source.__class__ = Paused
        return source

    return factory


async def test_footage_older_than_the_pre_roll_window_is_not_sent_as_pre_roll(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A camera down since before the pre-roll window still held what it sent last (the
    ring is trimmed when a packet arrives) and sent it as its pre-roll at a press:
    interior footage from before the window the agreement allows (review s13). Now none
    of it leaves: the camera joins at its next keyframe once it is back."""
    resume = asyncio.Event()
    path = write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=1)
    config = load_config(path)
    async with Agent(config, source_factory=paused(LATE, 20, resume)) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        await packets_of(agent, LATE, 19)  # then it goes down
        down = time.monotonic()
        while time.monotonic() - down < 1.5:  # longer than the window (real time must pass)
            await packets_of(agent, "front-door", 1)
        stale = agent.capture.seqs.peek(LATE)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        stream = agent.uplink.stream(session.id)
        assert stream is not None and ids(stream) == ["front-door"]  # nothing of LATE yet
        resume.set()
        await within(agent, lambda: ids(stream) == ["front-door", LATE])
        (late,) = [c for c in stream.open.cameras if c.id == LATE]
        assert late.first_seq >= stale  # none of what it sent before it went down
        agent.end("all clear")
        await agent.uplink.wait_settled(session.id)
