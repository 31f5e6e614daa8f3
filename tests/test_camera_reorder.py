"""A camera sending B-frames is a fault, and says why (found by a review).

The agent passes H.264 through and times each frame in the order frames come
(decode order): a stream that reorders frames was recorded and exported with
times that stepped back and were held (groups of frames within microseconds,
then a jump), which players answer by dropping about a third of the frames,
and nothing said so. Such a camera now records on, in fault, until it sends
its frames in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.camera_watch import REORDER_CLEAR_S, ReorderWatch
from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import write_agent_config
from receiver.server import Receiver
from tests.test_camera_contract import write_video

pytestmark = pytest.mark.timeout(60)

MS = 1_000_000


def test_a_frame_shown_before_the_one_sent_ahead_of_it_is_out_of_order() -> None:
    watch = ReorderWatch()
    # I P B B P B B, by presentation time in decode order (x264 with two B-frames).
    order = [(0, True), (99, False), (33, False), (66, False), (199, False), (133, False)]
    seen = [watch.packet(ts * MS, key, i * MS) for i, (ts, key) in enumerate(order)]
    assert seen == [False, False, True, False, False, True]
    assert watch.seen_ns == 5 * MS and not watch.mended()
    later = 5 * MS + int(REORDER_CLEAR_S * 1e9)  # frames in order until then: not yet
    assert not watch.packet(300 * MS, False, later) and not watch.mended()
    assert not watch.packet(333 * MS, False, later + 1) and watch.mended()


def test_keyframes_stepping_back_and_sources_without_timestamps_are_not_judged() -> None:
    watch = ReorderWatch()
    # A file looping, a camera restarting its clock: its keyframe steps back.
    frames = [(0, True), (33, False), (66, False), (0, True), (33, False)]
    assert not any(watch.packet(ts * MS, key, 0) for ts, key in frames)
    assert not watch.packet(None, False, 0) and not watch.packet(5, False, 0)
    assert watch.seen_ns is None and watch.mended()
    watch.packet(900, False, 0)
    watch.restart()  # a source restarted: its clock begins anew, whatever its first frame
    assert not watch.packet(10, False, 0)


def audit_events(agent: Agent, name: str) -> list[dict[str, Any]]:
    lines = (agent.config.state_dir / "audit.log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == name]


@pytest.mark.parametrize("bframes", [2, 0])
async def test_a_camera_sending_b_frames_records_on_in_fault(tmp_path: Path, bframes: int) -> None:
    video = write_video(tmp_path / "clip.mp4", bframes=bframes)
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0) as rx:
        path = write_agent_config(tmp_path / "agent", rx, cameras=[("hall", "interior")])
        text = path.read_text().replace(
            'source = "synthetic"', f'source = "file"\npath = "{video}"'
        )
        path.write_text("\n".join(x for x in text.splitlines() if not x.startswith("fps")))
        async with Agent(load_config(path)) as agent:
            await agent.capture.wait_packets(10)  # the first B-frame is the third
            state = agent.capture.state["hall"]
            (camera,) = agent.status()["cameras"]
            if bframes:
                assert state.reorders_frames and camera["reorders_frames"]
                assert state.healthy and not state.fault  # it records on
                assert agent.device_state() == "fault"
                await agent.wait_until(lambda: bool(audit_events(agent, "camera_reorders_frames")))
                (entry,) = audit_events(agent, "camera_reorders_frames")
                assert entry["camera"] == "hall"
            else:
                assert not state.reorders_frames and not camera["reorders_frames"]
                assert agent.device_state() == "armed"
