"""PiCamera on a real Raspberry Pi with a camera module (opt-in: see README.md here).

Skipped unless ``BREAKGLASS_HARDWARE=1`` and picamera2 imports. Wiring from
the environment: ``BREAKGLASS_PI_CAMERA_NUM``, ``BREAKGLASS_PI_SIZE``
(``WIDTHxHEIGHT``), ``BREAKGLASS_PI_FPS``.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import threading
import time
from contextlib import aclosing

import av
import pytest

from hardware import CameraError, CameraSource, EncodedPacket, PiCamera
from hardware._h264 import nal_types, valid_annex_b

if os.environ.get("BREAKGLASS_HARDWARE") != "1":
    pytest.skip("hardware tests run only with BREAKGLASS_HARDWARE=1", allow_module_level=True)
pytest.importorskip("picamera2", reason="picamera2 does not import (see tests/hardware/README.md)")

CAMERA_NUM = int(os.environ.get("BREAKGLASS_PI_CAMERA_NUM", "0"))
WIDTH, HEIGHT = (int(v) for v in os.environ.get("BREAKGLASS_PI_SIZE", "1280x720").split("x"))
FPS = float(os.environ.get("BREAKGLASS_PI_FPS", "30"))


def camera(name: str, keyframe_interval_s: float = 0.5) -> PiCamera:
    return PiCamera(
        name,
        width=WIDTH,
        height=HEIGHT,
        fps=FPS,
        bitrate=2_000_000,
        keyframe_interval_s=keyframe_interval_s,
        camera_num=CAMERA_NUM,
    )


async def take(cam: PiCamera, n: int, timeout: float = 20) -> list[EncodedPacket]:
    out: list[EncodedPacket] = []
    async with asyncio.timeout(timeout), aclosing(cam.packets()) as packets:
        async for packet in packets:
            out.append(packet)
            if len(out) == n:
                break
    return out


async def test_real_packets_decode_at_the_configured_size() -> None:
    async with camera("pi-real") as cam:
        assert isinstance(cam, CameraSource)
        packets = await take(cam, round(FPS))
        info = cam.info
    assert packets[0].keyframe
    assert {7, 8, 5} <= set(nal_types(packets[0].payload))
    assert all(valid_annex_b(p.payload) for p in packets)
    assert (info.width, info.height, info.fps) == (WIDTH, HEIGHT, FPS)
    assert nal_types(info.extradata) == [7, 8]
    decoder = av.CodecContext.create("h264", "r")
    frames = [f for p in packets for f in decoder.decode(av.Packet(p.payload))]
    frames += decoder.decode(None)
    assert len(frames) == len(packets)
    assert {(f.width, f.height) for f in frames} == {(WIDTH, HEIGHT)}


async def test_keyframe_cadence_and_timestamps() -> None:
    async with camera("pi-cadence", keyframe_interval_s=0.5) as cam:
        packets = await take(cam, round(2 * FPS) + 1)
    gop = round(FPS * 0.5)
    keys = [i for i, p in enumerate(packets) if p.keyframe]
    assert keys[0] == 0
    assert all(abs((b - a) - gop) <= 1 for a, b in itertools.pairwise(keys))
    assert [p.capture_ns for p in packets] == sorted(p.capture_ns for p in packets)
    assert [p.mono_ns for p in packets] == sorted(p.mono_ns for p in packets)
    sensor = [p.source_ts_ns for p in packets]
    assert all(isinstance(ts, int) for ts in sensor)
    steps = [b - a for a, b in itertools.pairwise(sensor)]  # type: ignore[operator]
    assert all(step > 0 for step in steps)
    assert sum(steps) / len(steps) == pytest.approx(1e9 / FPS, rel=0.1)
    assert abs(packets[0].capture_ns - time.time_ns()) < 10e9


async def test_force_keyframe_gives_an_idr_soon() -> None:
    async with camera("pi-force", keyframe_interval_s=30) as cam:
        head = await take(cam, 10)
        assert cam.force_keyframe() is True
        tail = await take(cam, 10)
    assert [p.keyframe for p in head] == [True] + [False] * 9
    forced = [p for p in tail if p.keyframe]
    assert forced
    assert {7, 8, 5} <= set(nal_types(forced[0].payload))


async def test_aclose_is_prompt_and_the_camera_can_be_reopened() -> None:
    cam = camera("pi-close")
    await take(cam, 5)
    start = time.monotonic()
    await cam.aclose()
    assert time.monotonic() - start < 3
    assert not [t for t in threading.enumerate() if t.name == "pi-camera:pi-close"]
    await cam.aclose()
    with pytest.raises(CameraError, match="pi-close"):
        await take(cam, 1)
    async with camera("pi-again") as again:
        assert len(await take(again, 3)) == 3


def test_the_encoder_matches_the_platform() -> None:
    platform = importlib.import_module("picamera2.platform")
    expected = (
        "H264Encoder" if platform.get_platform() == platform.Platform.VC4 else "LibavH264Encoder"
    )
    assert camera("pi-encoder").encoder_name == expected
