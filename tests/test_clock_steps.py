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
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import write_agent_config
from hardware import synthetic
from provisioning.keys import load_private_key
from receiver.evidence import build_bundle
from receiver.evidence_format import evidence_key
from receiver.evidence_verify import VerifyReport, verify_bundle
from receiver.server import Receiver
from tests.clocks import ShiftedTime
from tests.emergencies import pressed
from tests.media import ffprobe_packets

pytestmark = pytest.mark.timeout(120)

DAY_NS = 20 * 3600 * 10**9  # more than 2**32 ticks of 90 kHz (13.26 h)


@dataclass(frozen=True)
class Stepped:
    """An emergency recorded across a clock step: where, which, and its checked bundle."""

    receiver: Receiver
    session: str
    connects: int
    report: VerifyReport


async def emergency_across_a_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before_ns: int, after_ns: int
) -> Stepped:
    """Press with the agent's (and its camera's) clock ``before_ns`` off, stream, step it
    to ``after_ns`` off (NTP), stream 40 frames more of each camera (within 30 s), end,
    sign the trail; the bundle of the session, verified."""
    clock = ShiftedTime()
    clock.wall_ns = before_ns
    monkeypatch.setattr(synthetic, "time", clock)
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0) as receiver:
        config = load_config(write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=2))
        async with Agent(config, clock=clock.time) as agent:
            session = await pressed(agent)
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            live = {c.index: c.live_seq for c in stream.open.cameras}
            await agent.uplink.wait_until(
                lambda: all(stream.acked[i] >= seq + 20 for i, seq in live.items())
            )
            clock.wall_ns = after_ns
            stepped = {c.index: agent.capture.seqs.peek(c.id) for c in stream.open.cameras}
            async with asyncio.timeout(30):  # was, a day on: the connection cut every frame
                await agent.uplink.wait_until(
                    lambda: all(stream.acked[i] >= seq + 40 for i, seq in stepped.items())
                )
            connects = agent.uplink.stats.connects
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
    return Stepped(receiver, session.id, connects, report)


async def test_a_step_of_most_of_a_day_mid_emergency_is_recorded_whole_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NTP syncs a clock that was most of a day behind.
    got = await emergency_across_a_step(tmp_path, monkeypatch, 0, DAY_NS)
    assert got.connects == 1  # never cut
    recording = got.receiver.store.get(got.session).summary()
    for camera in recording.cameras:
        parts = [p.path for p in camera.parts]
        assert len(parts) >= 2, parts  # the step began a part
        for part in parts:
            times = [float(pk["pts_time"]) for pk in ffprobe_packets(part)]
            assert times == sorted(times) and times[-1] - times[0] < 60
    assert got.report.ok, [str(f) for f in got.report.errors]


async def test_a_step_back_mid_emergency_verifies_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Pi whose clock ran five minutes ahead is set back by NTP mid-emergency: its
    capture times slew back to UTC, so genuine frames carry times after the session's
    signed end time. Verification failed them as "footage of another time"; the signed
    last seq of each camera bounds the session, so it is a warning."""
    got = await emergency_across_a_step(tmp_path, monkeypatch, 300 * 10**9, 0)
    assert got.report.ok, [str(f) for f in got.report.errors]
    assert any("clock stepped back" in f.what for f in got.report.warnings)
