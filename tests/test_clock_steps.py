"""The device's clock steps during an emergency: what the police get is whole and verifies.

A Raspberry Pi has no real-time clock: after a power cut it runs on the time it last
saved until NTP steps its clock, by hours or days, at any moment. Here the synthetic
camera's capture clock and the agent's clock step together mid-emergency (a real agent
and receiver on 127.0.0.1). Found by a review (s10): a step of over 13.26 h overflowed
a 32-bit MP4 sample duration at the receiver, which cut the device's connection at
every frame after it (this emergency and the next lost nearly everything), and the
evidence export refused the step too.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import press_button, write_agent_config
from hardware import synthetic
from provisioning.keys import load_private_key
from receiver.evidence import build_bundle
from receiver.evidence_format import evidence_key
from receiver.evidence_verify import verify_bundle
from receiver.server import Receiver
from tests.clocks import ShiftedTime
from tests.media import ffprobe_packets

pytestmark = pytest.mark.timeout(120)

DAY_NS = 20 * 3600 * 10**9  # more than 2**32 ticks of 90 kHz (13.26 h)


async def test_a_step_of_most_of_a_day_mid_emergency_is_recorded_whole_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ShiftedTime()
    monkeypatch.setattr(synthetic, "time", clock)
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0) as receiver:
        path = write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=2)
        config = load_config(path)
        async with Agent(config, clock=clock.time) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(30)
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
            session = agent.emergency.active
            assert session is not None
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            cams = {c.index: c.id for c in stream.open.cameras}
            live = {c.index: c.live_seq for c in stream.open.cameras}
            await agent.uplink.wait_until(
                lambda: all(stream.acked[i] >= seq + 20 for i, seq in live.items())
            )
            clock.wall_ns = DAY_NS  # NTP syncs a clock that was most of a day behind
            stepped = {i: agent.capture.seqs.peek(cam) for i, cam in cams.items()}
            async with asyncio.timeout(30):  # was: the connection cut at every frame
                await agent.uplink.wait_until(
                    lambda: all(stream.acked[i] >= seq + 40 for i, seq in stepped.items())
                )
            assert agent.uplink.stats.connects == 1  # never cut
            agent.end("test finished")
            await agent.uplink.wait_settled(session.id)
            await asyncio.to_thread(agent.audit.checkpoint)
            agent.uplink.audit_recorded()
            await agent.uplink.wait_until(lambda: agent.uplink.audit_acked >= agent.audit.head_n)
        recording = receiver.store.get(session.id).summary()
        for camera in recording.cameras:
            parts = [p.path for p in camera.parts]
            assert len(parts) >= 2, parts  # the step began a part
            for part in parts:
                times = [float(pk["pts_time"]) for pk in ffprobe_packets(part)]
                assert times == sorted(times) and times[-1] - times[0] < 60
    bundle = await asyncio.to_thread(
        build_bundle, receiver.data_dir, session.id, tmp_path / "bundle.zip"
    )
    report = verify_bundle(
        bundle,
        device_key=load_private_key(config.device_key).public_key(),
        receiver_key=evidence_key(receiver.data_dir).public_key(),
    )
    assert report.ok, [str(f) for f in report.errors]


async def test_a_step_back_mid_emergency_verifies_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Pi whose clock ran five minutes ahead is set back by NTP mid-emergency: its
    capture times slew back to UTC, so genuine frames carry times after the session's
    signed end time. Verification failed them as "footage of another time"; the signed
    last seq of each camera bounds the session, so it is a warning."""
    clock = ShiftedTime(wall_s=300)
    monkeypatch.setattr(synthetic, "time", clock)
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0) as receiver:
        config = load_config(write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=2))
        async with Agent(config, clock=clock.time) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(30)
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
            session = agent.emergency.active
            assert session is not None
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            live = {c.index: c.live_seq for c in stream.open.cameras}
            await agent.uplink.wait_until(
                lambda: all(stream.acked[i] >= seq + 20 for i, seq in live.items())
            )
            clock.wall_ns = 0  # NTP sets the clock back to UTC
            cams = {c.index: c.id for c in stream.open.cameras}
            stepped = {i: agent.capture.seqs.peek(cam) for i, cam in cams.items()}
            await agent.uplink.wait_until(
                lambda: all(stream.acked[i] >= seq + 20 for i, seq in stepped.items())
            )
            agent.end("test finished")
            await agent.uplink.wait_settled(session.id)
            await asyncio.to_thread(agent.audit.checkpoint)
            agent.uplink.audit_recorded()
            await agent.uplink.wait_until(lambda: agent.uplink.audit_acked >= agent.audit.head_n)
    bundle = await asyncio.to_thread(
        build_bundle, receiver.data_dir, session.id, tmp_path / "bundle.zip"
    )
    report = verify_bundle(
        bundle,
        device_key=load_private_key(config.device_key).public_key(),
        receiver_key=evidence_key(receiver.data_dir).public_key(),
    )
    assert report.ok, [str(f) for f in report.errors]
    assert any("clock stepped back" in f.what for f in report.warnings)
