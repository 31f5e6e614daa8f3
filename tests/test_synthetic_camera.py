"""SyntheticCamera: real libx264 output, real-time pacing, a free event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing

import av
import numpy as np
import pytest

from hardware import (
    CameraConfigError,
    CameraError,
    CameraSource,
    EncodedPacket,
    StreamInfo,
    SyntheticCamera,
)

W, H = 320, 240  # small frames keep the tests quick


async def take(cam: SyntheticCamera, n: int) -> list[EncodedPacket]:
    """The next ``n`` packets of ``cam``."""
    out: list[EncodedPacket] = []
    async with aclosing(cam.packets()) as packets:
        async for packet in packets:
            out.append(packet)
            if len(out) == n:
                break
    return out


def nal_types(data: bytes) -> list[int]:
    """NAL unit types of an Annex-B byte string."""
    types = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        types.append(data[i + 3] & 0x1F)
        i = data.find(b"\x00\x00\x01", i + 3)
    return types


def decode(packets: list[EncodedPacket]) -> list[av.VideoFrame]:
    decoder = av.CodecContext.create("h264", "r")
    frames: list[av.VideoFrame] = []
    for packet in packets:
        frames.extend(decoder.decode(av.Packet(packet.payload)))
    frames.extend(decoder.decode(None))
    return frames


def camera_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("synthetic-camera:")]


async def test_is_a_camera_source() -> None:
    async with SyntheticCamera("cam-a", width=W, height=H) as cam:
        assert isinstance(cam, CameraSource)
        assert cam.camera_id == "cam-a"


async def test_keyframe_first_and_cadence() -> None:
    async with SyntheticCamera("cam-a", fps=30, keyframe_interval_s=0.5, width=W, height=H) as cam:
        assert cam.keyframe_interval == 15
        packets = await take(cam, 46)
    assert [i for i, p in enumerate(packets) if p.keyframe] == [0, 15, 30, 45]
    for p in packets:
        assert p.camera == "cam-a"
        assert p.seq == -1
        assert p.codec == "h264"
        # Each keyframe carries SPS and PPS and is an IDR (a join point).
        if p.keyframe:
            assert {7, 8, 5} <= set(nal_types(p.payload))
        else:
            assert 5 not in nal_types(p.payload)


async def test_timestamps_and_real_time_pacing() -> None:
    async with SyntheticCamera("cam-a", fps=30, width=W, height=H) as cam:
        start = time.monotonic()
        wall_start = time.time_ns()
        packets = await take(cam, 15)
        elapsed = time.monotonic() - start
    # Frames 0..14 are due at 0 .. 14/30 s: ~0.47 s in real time, not at once.
    assert elapsed >= 0.4
    assert elapsed < 10
    captures = [p.capture_ns for p in packets]
    monos = [p.mono_ns for p in packets]
    assert captures == sorted(captures)
    assert len(set(captures)) == len(captures)
    assert monos == sorted(monos)
    assert len(set(monos)) == len(monos)
    assert captures[0] >= wall_start - 1_000_000_000
    # Spacing follows the frame rate on average.
    assert (monos[-1] - monos[0]) / 14 == pytest.approx(1e9 / 30, rel=0.5)


async def test_payloads_are_annex_b_and_decode_to_moving_frames() -> None:
    async with SyntheticCamera("cam-a", fps=30, width=640, height=480) as cam:
        packets = await take(cam, 10)
    assert all(p.payload.startswith(b"\x00\x00\x00\x01") for p in packets)
    frames = decode(packets)
    assert len(frames) == 10
    assert {(f.width, f.height) for f in frames} == {(640, 480)}
    a, b = (f.to_ndarray(format="gray") for f in frames[4:6])
    assert not np.array_equal(a, b)


async def test_cameras_have_distinct_colours() -> None:
    async with (
        SyntheticCamera("cam-a", width=W, height=H) as one,
        SyntheticCamera("cam-b", width=W, height=H) as two,
    ):
        first = [decode(await take(cam, 1))[0].to_ndarray(format="rgb24") for cam in (one, two)]
    # Sample the background below the text band.
    assert not np.array_equal(first[0][150, 5], first[1][150, 5])


async def test_info_has_sps_and_pps() -> None:
    async with SyntheticCamera("cam-a", fps=15, width=W, height=H) as cam:
        assert cam.info == StreamInfo("h264", 320, 240, 15.0, b"")
        [first] = await take(cam, 1)
        info = cam.info
    assert isinstance(info, StreamInfo)
    assert (info.codec, info.width, info.height, info.fps) == ("h264", 320, 240, 15.0)
    assert info.extradata.startswith(b"\x00\x00\x00\x01")
    assert nal_types(info.extradata) == [7, 8]
    assert info.extradata in first.payload
    # Constrained Baseline: profile_idc 66 with constraint_set1 (Chromium MSE plays it).
    sps = info.extradata[4:]
    assert sps[1] == 66
    assert sps[2] & 0x40


async def test_force_keyframe() -> None:
    async with SyntheticCamera("cam-a", fps=30, keyframe_interval_s=100, width=W, height=H) as cam:
        head = await take(cam, 5)
        assert [p.keyframe for p in head] == [True, False, False, False, False]
        cam.force_keyframe()
        # A frame or two may already be in flight; the next rendered one is an IDR.
        tail = await take(cam, 4)
    forced = [p for p in tail if p.keyframe]
    assert len(forced) == 1
    assert {7, 8, 5} <= set(nal_types(forced[0].payload))
    assert len(decode(head + tail)) == 9


async def test_event_loop_is_never_blocked() -> None:
    loop = asyncio.get_running_loop()
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            worst = max(worst, loop.time() - before - 0.01)

    async with (
        SyntheticCamera("cam-a", fps=30, width=640, height=480) as one,
        SyntheticCamera("cam-b", fps=30, width=640, height=480) as two,
    ):
        tick = asyncio.create_task(ticker(), name="ticker")
        await asyncio.gather(take(one, 30), take(two, 30))
        done.set()
        await tick
    assert worst < 0.1


async def test_aclose_stops_the_thread_promptly() -> None:
    # At 0.5 fps the worker spends ~2 s waiting for the next frame: aclose must interrupt it.
    cam = SyntheticCamera("slow-cam", fps=0.5, width=W, height=H)
    await take(cam, 1)
    assert "synthetic-camera:slow-cam" in camera_threads()
    start = time.monotonic()
    await cam.aclose()
    assert time.monotonic() - start < 1.0
    assert "synthetic-camera:slow-cam" not in camera_threads()
    with pytest.raises(CameraError, match="slow-cam"):
        await take(cam, 1)
    await cam.aclose()  # idempotent


async def test_aclose_ends_a_waiting_consumer() -> None:
    cam = SyntheticCamera("cam-a", fps=0.5, width=W, height=H)
    got: list[EncodedPacket] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for packet in cam.packets():
            got.append(packet)
            first.set()

    task = asyncio.create_task(consume(), name="consumer")
    await first.wait()
    await cam.aclose()
    await asyncio.wait_for(task, 5)
    assert len(got) == 1


async def test_slow_consumer_loses_whole_gops_only() -> None:
    # GOP of 6 packets, buffer of 12: a consumer that stalls for 1 s (30 frames) loses GOPs.
    async with SyntheticCamera(
        "cam-a", fps=30, keyframe_interval_s=0.2, max_buffered_s=0.2, width=W, height=H
    ) as cam:
        [first] = await take(cam, 1)
        await asyncio.sleep(1.0)  # the stall under test, not synchronisation
        rest = await take(cam, 12)
        assert cam.packets_dropped > 0
    assert first.keyframe
    # What follows the stall starts at a keyframe and still decodes.
    assert rest[0].keyframe
    assert len(decode([first, *rest])) == 13


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 321, "height": 240},
        {"width": 8, "height": 8},
        {"fps": 0},
        {"keyframe_interval_s": 0},
        {"bitrate": 0},
    ],
)
def test_bad_arguments_name_the_camera(kwargs: dict[str, float]) -> None:
    with pytest.raises(CameraConfigError, match="bad-cam") as info:
        SyntheticCamera("bad-cam", **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


async def test_bitrate_caps_the_stream() -> None:
    async with SyntheticCamera("cam-a", fps=30, bitrate=200_000, width=W, height=H) as cam:
        packets = await take(cam, 30)
    assert sum(len(p.payload) for p in packets) * 8 < 2 * 200_000
