"""Store-and-forward end to end: nothing captured in an emergency is lost.

Real agent, real receiver, real TLS on loopback; a TCP proxy in between cuts
or throttles the link; a real agent process is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest

from agent import alarm, owed
from agent.config import CameraConfig, load_config
from agent.daemon import Agent, make_source
from agent.segment import SegmentName
from agent.uplink import SessionStream
from breakglass.demo import press_button, write_agent_config
from hardware import CameraSource, StreamInfo
from receiver.server import Receiver
from tests.clocks import ShiftedTime
from tests.emergencies import pressed
from tests.netproxy import TcpProxy, via_proxy
from tests.recordings import (
    assert_declared,
    assert_session_gapless,
    camera_summary,
    recorded_seqs,
)

pytestmark = pytest.mark.timeout(150)


async def test_a_30_second_network_cut_ends_gapless(tmp_path: Path, receiver: Receiver) -> None:
    async with TcpProxy(receiver.port) as proxy:
        path = write_agent_config(
            tmp_path / "agent", receiver, fps=30, preroll_s=2, store="segment_s = 1"
        )
        config = load_config(via_proxy(path, receiver, proxy))
        async with Agent(config) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(45)
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
            session = agent.emergency.active
            assert session is not None
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            await agent.uplink.wait_until(lambda: min(stream.acked) > stream.preroll_end[0] + 15)
            proxy.cut()
            acked_at_cut = list(stream.acked)
            # 30 s of footage captured with the link black-holed (the camera clock is
            # the measure: 900 frames at 30 fps), then the link returns.
            await agent.capture.wait_packets(900)
            assert list(stream.acked) == acked_at_cut or not agent.uplink.connected
            proxy.restore()
            await agent.uplink.wait_until(
                lambda: agent.uplink.connected and min(stream.acked) > max(acked_at_cut) + 900
            )
            agent.end("test finished")
            await agent.uplink.wait_settled(session.id)
            assert agent.uplink.stats.segments_sent > 0 or agent.uplink.stats.packets_sent > 1800
    assert_session_gapless(receiver, stream)


async def test_a_throttled_link_keeps_live_near_real_time_and_backfill_completes(
    tmp_path: Path, receiver: Receiver
) -> None:
    # One 720p30 camera; the link carries about 60 % of its rate: live must skip
    # ahead to stay near real time, and the rest comes afterwards.
    async with TcpProxy(receiver.port) as proxy:
        path = write_agent_config(
            tmp_path / "agent",
            receiver,
            fps=30,
            preroll_s=2,
            cameras=(("hallway-2", "interior"),),
            store="segment_s = 1",
        )
        via_proxy(path, receiver, proxy)
        path.write_text(
            path.read_text().replace("fps = 30\n", "fps = 30\nwidth = 1280\nheight = 720\n")
        )
        config = load_config(path)
        async with Agent(config) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(60)
            # Measure the camera's rate, then throttle the link below it before the press.
            before = agent.capture.prerolls["hallway-2"].snapshot()
            rate = sum(len(p.payload) for p in before[-60:]) / 2.0
            proxy.rate = rate * 0.6
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
            session = agent.emergency.active
            assert session is not None
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            lags: list[float] = []
            for _ in range(12):  # twelve seconds of throttled streaming
                await agent.capture.wait_packets(30)
                newest = agent.capture.prerolls["hallway-2"].snapshot()[-1]
                held = recorded_seqs(receiver, session.id, "hallway-2")
                lags.append((newest.seq - max(held, default=stream.preroll_end[0])) / 30)
            assert agent.uplink.stats.live_skips > 0
            # Live stays within a few seconds of real time while the link is too slow
            # (after the first seconds, when the pre-roll and the first GOPs share it).
            # Live skips only at a keyframe, once its oldest packet waited LIVE_LAG_S: the
            # lag saws between about one second and LIVE_LAG_S + a GOP + what is in
            # flight, and a skip landing just after a sample reads as one high sample.
            steady = lags[5:]
            assert max(steady) < 4.0, str(lags)
            assert sum(steady) / len(steady) < 2.5, str(lags)
            proxy.rate = None  # the link recovers: backfill completes
            agent.end("test finished")
            await agent.uplink.wait_settled(session.id)
    assert_session_gapless(receiver, stream)


class Child:
    """``python -m tests.agent_child``: its output read line by line on a thread."""

    def __init__(self, config: Path, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.agent_child", str(config), *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.lines: Queue[str] = Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.strip())

    async def expect(self, prefix: str, timeout: float = 60) -> str:
        """The rest of the first output line starting with ``prefix``."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    line = await asyncio.to_thread(self.lines.get, timeout=1)
                except Empty:
                    assert self.popen.poll() is None, f"agent exited {self.popen.returncode}"
                    continue
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


async def test_sigkill_mid_emergency_resumes_and_loses_at_most_the_open_segment(
    tmp_path: Path, receiver: Receiver, children: list[Child]
) -> None:
    async with TcpProxy(receiver.port) as proxy:
        path = write_agent_config(
            tmp_path / "agent", receiver, fps=30, preroll_s=2, store="segment_s = 1"
        )
        via_proxy(path, receiver, proxy)
        # The emergency expires by itself 20 s after the press: no trigger needed to end it
        # (the restart below comes about 10 s after the press, well inside it).
        path.write_text(path.read_text().replace("duration_s = 3600", "duration_s = 20"))
        config = load_config(path)
        cams = [c.id for c in config.cameras]
        first = Child(path, "--press")
        children.append(first)
        session_id = await first.expect("session ")
        await until(lambda: min(len(recorded_seqs(receiver, session_id, c)) for c in cams) >= 60)
        held_before = {c: recorded_seqs(receiver, session_id, c) for c in cams}

        # The link goes down; the agent keeps sealing footage nobody has received yet...
        proxy.cut()
        cut_ms = time.time_ns() // 1_000_000
        await until(
            lambda: min(len(sealed_since(config.store.directory / c, cut_ms)) for c in cams) >= 3
        )
        # ... and dies without a chance to clean up.
        first.kill()
        killed_ms = time.time_ns() // 1_000_000

        # A torn segment on the SD card (power cut mid-write, a bad sector): one the
        # receiver already holds. It is removed and audited; the rest is still served.
        acked_segments = [
            f for f in sorted((config.store.directory / cams[0]).glob("*.age"))
            if (n := SegmentName.parse(f.name)) is not None
            and set(range(n.first_seq, n.last_seq + 1)) <= held_before[cams[0]]
        ]  # fmt: skip
        torn = acked_segments[-1]
        torn.write_bytes(torn.read_bytes()[:100])

        proxy.restore()
        second = Child(path)
        children.append(second)
        assert await second.expect("resumed ") == session_id
        assert await second.expect("settled ", timeout=90) == session_id
        second.kill()

    audit = (config.state_dir / "audit.log").read_text()
    assert '"segment_torn"' in audit and torn.name in audit
    assert not torn.exists()
    for cam in cams:
        seqs = recorded_seqs(receiver, session_id, cam)
        assert held_before[cam] <= seqs  # nothing acknowledged before the kill is lost
        # Everything sealed before the kill reached the receiver after the restart...
        old = [n for f in (config.store.directory / cam).glob("*.age")
               if (n := SegmentName.parse(f.name)) is not None and n.first_seq < BLOCK]  # fmt: skip
        last_sealed = max(old, key=lambda n: n.last_seq)
        session_first = min(seqs)
        assert set(range(session_first, last_sealed.last_seq + 1)) <= seqs
        # ... and what is missing is at most the segment being written at the kill:
        # segment_s = 1 plus the rest of a one-second GOP, with a second of slack.
        assert killed_ms - last_sealed.end_ms <= 3000, killed_ms - last_sealed.end_ms
        # After the restart the session goes on in a new block of numbers, gapless.
        new = sorted(s for s in seqs if s >= BLOCK)
        assert new and new == list(range(new[0], new[-1] + 1))
        assert_declared(receiver, session_id, cam)


BLOCK = 100_000  # agent.statefile.SequenceReservations.BLOCK: a restart numbers on from here


def sealed_since(folder: Path, since_ms: int) -> list[SegmentName]:
    names = [SegmentName.parse(f.name) for f in folder.glob("*.age")]
    return [n for n in names if n is not None and n.start_ms >= since_ms]


async def until(predicate: Callable[[], bool], timeout: float = 60) -> None:
    """Poll a condition another process makes true (its files), bounded in time."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.1)


async def test_a_new_emergency_preempts_an_old_session_still_delivering(tmp_path: Path) -> None:
    """An ended session whose footage is still owed never delays a new emergency's live."""
    rx_dir = tmp_path / "receiver"
    async with Receiver(rx_dir, "127.0.0.1", 0) as first_rx:
        port = first_rx.port
        path = write_agent_config(tmp_path / "agent", first_rx, fps=30, preroll_s=2)
    async with Agent(load_config(path)) as agent:
        await agent.capture.wait_packets(30)
        press_button(agent)  # the receiver is down: nothing of this session is delivered
        await agent.wait_until(lambda: agent.emergency.active is not None)
        old = agent.emergency.active
        assert old is not None
        await agent.capture.wait_packets(30)
        agent.end("all clear")
        press_button(agent)  # a second emergency while the first is still owed
        await agent.wait_until(
            lambda: agent.emergency.active is not None and agent.emergency.active.id != old.id
        )
        new = agent.emergency.active
        assert new is not None
        assert [s.id for s in agent.uplink.streams] == [new.id, old.id]
        async with Receiver(rx_dir, "127.0.0.1", port) as receiver:
            stream = agent.uplink.stream(new.id)
            assert stream is not None
            await agent.uplink.wait_until(lambda: min(stream.acked) > stream.preroll_end[0])
            assert agent.uplink.stream(old.id) is not None  # still owed: it waits its turn
            agent.end("all clear")
            await agent.uplink.wait_settled(new.id)
            await agent.uplink.wait_settled(old.id)
    assert {s.session_id for s in receiver.store.sessions()} == {old.id, new.id}


async def test_the_owed_sessions_are_read_on_the_loop_that_changes_them(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uplink changes its streams (acks, checkpoint queues) on the event loop; the
    owed file is written in a worker thread, from what the loop read (reading there
    raced: "deque mutated during iteration")."""
    readers: set[int] = set()
    entry = owed.entry

    def reading(stream: SessionStream) -> dict[str, Any]:
        readers.add(threading.get_ident())
        return entry(stream)

    monkeypatch.setattr(owed, "entry", reading)
    path = write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=2)
    async with Agent(load_config(path)) as agent:
        session = await pressed(agent)
        await agent.uplink.wait_until(
            lambda: agent.owed_path.exists() and session.id in agent.owed_path.read_text()
        )
        agent.end("all clear")
        await agent.uplink.wait_settled(session.id)
    assert readers == {threading.get_ident()}


async def test_owed_footage_is_pinned_from_the_start_of_a_restart(tmp_path: Path) -> None:
    """After a restart the sessions owed resume once their cameras run; until then their
    footage is pinned as saved, or retention could evict it when the first segment is
    written (the receiver is down throughout: nothing is acknowledged)."""
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0) as gone:
        path = write_agent_config(tmp_path / "agent", gone, fps=30, preroll_s=2)
    async with Agent(load_config(path)) as agent:
        await agent.capture.wait_packets(30)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        await agent.capture.wait_packets(30)
    async with Agent(load_config(path)) as again:
        # No await since start: the session waits for its cameras, its pins are the saved.
        pinned = {(pin.camera, pin.last) for pin in again.store.pins}
        assert pinned == {(camera, None) for camera in session.cameras}  # still open
        await again.uplink.wait_until(lambda: again.uplink.stream(session.id) is not None)
        assert not again.owed.boot_pins
        stream = again.uplink.stream(session.id)
        assert stream is not None
        assert all(any(held is pin for pin in stream.pins) for held in again.store.pins)


async def test_a_session_resumes_when_a_camera_was_renamed_while_stopped(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A saved session naming a camera the config no longer has streams the cameras there
    are; waiting for the missing one ended the resume task (found by a review)."""
    path = write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=2)
    async with Agent(load_config(path)) as agent:
        session = await pressed(agent)
    path.write_text(path.read_text().replace('"hallway-2"', '"hallway-3"'))
    async with Agent(load_config(path)) as again:
        await again.uplink.wait_until(lambda: again.uplink.stream(session.id) is not None)
        stream = again.uplink.stream(session.id)
        assert stream is not None
        assert [c.id for c in stream.open.cameras] == ["front-door"]
        assert again.alive()


async def test_a_camera_that_does_not_say_its_rate_or_size_is_described_as_configured(
    tmp_path: Path, receiver: Receiver
) -> None:
    """An IP camera whose stream states no frame rate (PyAV says 0) or whose size is not
    known yet: the receiver refuses a session_open with a 0 in it, and the agent sent the
    same one again and again (found by a review)."""

    def vague(camera: CameraConfig) -> CameraSource:
        source = make_source(camera)
        real = type(source)

        class Vague(real):  # type: ignore[valid-type, misc]
            @property
            def info(self) -> StreamInfo:
                return dataclasses.replace(real.info.fget(self), fps=0.0, width=0)

        source.__class__ = Vague
        return source

    path = write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=2)
    async with Agent(load_config(path), source_factory=vague) as agent:
        session = await pressed(agent)
        stream = agent.uplink.stream(session.id)
        assert stream is not None
        await agent.uplink.wait_until(lambda: min(stream.acked) >= 0)
        assert not agent.uplink.stats.refusals
    cameras = {cid: c.track for cid, c in receiver.store.get(session.id).cameras.items()}
    config = {c.id: c for c in load_config(path).cameras}
    for camera_id, track in cameras.items():
        assert (track.width, track.fps) == (config[camera_id].width, config[camera_id].fps)


async def test_an_emergency_that_expired_while_the_agent_was_stopped_is_still_delivered(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent is down when its emergency expires (stopped for longer than the time
    left, in the same boot): at the restart the emergency ends at once, and the footage
    the receiver never got still goes out from the sealed store, by itself, and the
    session is signed to its last seq."""
    async with TcpProxy(receiver.port) as proxy:
        path = write_agent_config(
            tmp_path / "agent", receiver, fps=30, preroll_s=2, store="segment_s = 1"
        )
        config = load_config(via_proxy(path, receiver, proxy))
        async with Agent(config) as agent:
            session = await pressed(agent)
            await agent.uplink.wait_until(lambda: agent.uplink.stream(session.id) is not None)
            proxy.cut()  # the link goes first: footage nobody has received yet
            await agent.capture.wait_packets(60)
        proxy.restore()
        later = session.expires_at + 60 - time.time()  # back after the emergency expired
        # The monotonic clock went on as well: within a boot the session's time left is
        # measured on it, and a wall clock moved alone no longer ends it (test_emergency_restart).
        monkeypatch.setattr(alarm, "time", ShiftedTime(wall_s=later, mono_s=later))
        async with Agent(config, clock=lambda: time.time() + later) as again:
            async with asyncio.timeout(60):
                await again.uplink.wait_until(lambda: session.id in again.uplink.settled_ids)
            assert again.emergency.active is None
    for cam in session.cameras:
        names = [SegmentName.parse(f.name) for f in (config.store.directory / cam).glob("*.age")]
        last_sealed = max(n.last_seq for n in names if n is not None and n.first_seq < BLOCK)
        seqs = recorded_seqs(receiver, session.id, cam)
        assert set(range(min(seqs), last_sealed + 1)) <= seqs
        assert_declared(receiver, session.id, cam)
    ends = [
        json.loads(line)
        for line in (config.state_dir / "audit.log").read_text().splitlines()
        if '"session_end"' in line
    ]
    assert [e["session"] for e in ends] == [session.id]
    lasts = {c["id"]: c["last"] for c in ends[0]["cameras"]}
    assert lasts == {cam: max(recorded_seqs(receiver, session.id, cam)) for cam in session.cameras}


async def test_an_ended_session_still_owed_at_a_restart_is_delivered_to_its_end(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The emergency ended while the link was down, then the agent restarted: the session
    goes out from the sealed store to the last seq it had, not a seq less."""
    async with TcpProxy(receiver.port) as proxy:
        path = write_agent_config(
            tmp_path / "agent", receiver, fps=30, preroll_s=2, store="segment_s = 1"
        )
        config = load_config(via_proxy(path, receiver, proxy))
        async with Agent(config) as agent:
            # Two sessions, so that the owed one's seqs do not begin at 0.
            first = await pressed(agent)
            agent.end("all clear")
            await agent.uplink.wait_settled(first.id)
            session = await pressed(agent)
            await agent.uplink.wait_until(lambda: agent.uplink.stream(session.id) is not None)
            proxy.cut()
            await agent.capture.wait_packets(60)
            agent.end("all clear")
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            ends = dict(zip((c.id for c in stream.open.cameras), stream.end_seq, strict=True))
        proxy.restore()
        async with Agent(config) as again:
            async with asyncio.timeout(60):
                await again.uplink.wait_until(lambda: session.id in again.uplink.settled_ids)
    for cam, end in ends.items():
        assert end is not None
        seqs = recorded_seqs(receiver, session.id, cam)
        assert seqs and max(seqs) == end
        assert set(range(min(seqs), end + 1)) <= seqs
        assert_declared(receiver, session.id, cam)


async def test_a_damaged_sealed_segment_is_declared_lost_and_the_rest_still_flows(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Two emergencies while the link is down, then a restart; one sealed segment of the
    first is damaged on the SD card (one bit flipped: bit rot). The receiver cannot open
    it: its seqs are recorded as lost (unreadable), everything else of that session and
    all of the session queued behind it is delivered, and both settle."""
    async with TcpProxy(receiver.port) as proxy:
        path = write_agent_config(
            tmp_path / "agent", receiver, fps=30, preroll_s=2, store="segment_s = 1"
        )
        config = load_config(via_proxy(path, receiver, proxy))
        cams = [c.id for c in config.cameras]
        async with Agent(config) as agent:
            a = await pressed(agent)
            await agent.uplink.wait_until(lambda: agent.uplink.stream(a.id) is not None)
            proxy.cut()
            await agent.capture.wait_packets(150)  # five seconds nobody receives
            agent.end("all clear")
            press_button(agent)
            await agent.wait_until(
                lambda: agent.emergency.active is not None and agent.emergency.active.id != a.id
            )
            b = agent.emergency.active
            assert b is not None
            await agent.capture.wait_packets(60)
            agent.end("all clear")
            ends: dict[str, dict[str, int | None]] = {}
            firsts: dict[str, dict[str, int]] = {}
            for emergency in (a, b):
                stream = agent.uplink.stream(emergency.id)
                assert stream is not None
                ends[emergency.id] = {c.id: stream.end_seq[c.index] for c in stream.open.cameras}
                firsts[emergency.id] = {c.id: c.first_seq for c in stream.open.cameras}
                if emergency is a:
                    acked_a = {c.id: stream.acked[c.index] for c in stream.open.cameras}
        # Bit rot in one of A's segments of the first camera, well inside what is owed.
        owed = sorted(
            (
                (n, f)
                for f in (config.store.directory / cams[0]).glob("*.age")
                if (n := SegmentName.parse(f.name)) is not None
                and n.first_seq > acked_a[cams[0]] + 1
                and n.last_seq < (ends[a.id][cams[0]] or 0)
            ),
            key=lambda t: t[0].first_seq,
        )
        assert len(owed) >= 3, owed
        name, victim = owed[len(owed) // 2]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        proxy.restore()
        async with Agent(config) as again:
            async with asyncio.timeout(60):
                await again.uplink.wait_until(lambda: {a.id, b.id} <= again.uplink.settled_ids)
    for sid, cam_ends in ends.items():
        for cam, end in cam_ends.items():
            assert end is not None
            seqs = recorded_seqs(receiver, sid, cam)
            summary = camera_summary(receiver, sid, cam)
            assert summary is not None
            # B's pre-roll may reach back into A's footage, the damaged segment included.
            first, last = max(name.first_seq, firsts[sid][cam]), min(name.last_seq, end)
            if cam == cams[0] and first <= last:
                lost = set(range(first, last + 1))
                assert not seqs & lost
                assert seqs and max(seqs) == end
                assert set(range(firsts[sid][cam], end + 1)) - lost <= seqs
                assert [(g.first, g.last, g.reason) for g in summary.gaps] == [
                    (first, last, "unreadable")
                ]
                assert [bad.first_seq for bad in summary.bad_segments] == [name.first_seq]
                assert summary.missing == ()
            else:
                assert seqs and max(seqs) == end
                assert set(range(min(seqs), end + 1)) <= seqs
                assert_declared(receiver, sid, cam)
