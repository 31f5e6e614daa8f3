"""RtspCamera against a real RTSP server (gst-rtsp-server) and misbehaving peers on 127.0.0.1.

Pass-through, reconnects after the camera dies or hangs, a camera that never
answers, one that answers garbage, one that is not H.264, and credentials
that never reach an error or a log line.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import av
import pytest

from hardware import (
    CameraConfigError,
    CameraConnectionError,
    CameraSource,
    CameraStreamError,
    CameraTimeout,
    EncodedPacket,
    RtspCamera,
    SyntheticCamera,
    redact_url,
)
from hardware._h264 import nal_types, split_nal_units
from tests.rtsp import RtspServer, rtsp_unavailable, silent_listener
from tests.test_synthetic_camera import decode

FPS, GOP = 30, 15
FAST = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.3}


@pytest.fixture
def needs_rtsp() -> None:
    if reason := rtsp_unavailable():
        pytest.skip(reason)


@pytest.fixture
def server(needs_rtsp: None) -> Iterator[RtspServer]:
    """A live H.264 camera: 320x240 at 30 fps, a keyframe every 15 frames."""
    with RtspServer() as srv:
        yield srv


class Consumer:
    """Reads a source on a task; packets arrive on an asyncio queue."""

    def __init__(self, cam: CameraSource) -> None:
        self.cam = cam
        self.queue: asyncio.Queue[EncodedPacket] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(), name=f"consume:{cam.camera_id}")

    async def _run(self) -> None:
        async for packet in self.cam.packets():
            self.queue.put_nowait(packet)

    async def next(self, timeout: float = 10) -> EncodedPacket:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def after(self, mono_ns: int, timeout: float = 10) -> EncodedPacket:
        """The first packet that arrived after ``mono_ns``."""
        async with asyncio.timeout(timeout):
            while (packet := await self.queue.get()).mono_ns <= mono_ns:
                pass
        return packet


@asynccontextmanager
async def consuming(cam: RtspCamera | SyntheticCamera) -> AsyncIterator[Consumer]:
    consumer = Consumer(cam)
    try:
        yield consumer
    finally:
        await cam.aclose()
        await asyncio.wait_for(consumer.task, 10)


async def until(cam: RtspCamera, condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait on the camera's own notifications until ``condition()`` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await cam.state_changed()


async def drain(cam: RtspCamera, timeout: float = 20) -> None:
    """Read the camera until its stream ends (it raises when it gives up)."""
    async with asyncio.timeout(timeout):
        async for _ in cam.packets():
            pass


# --- pass-through ---


async def test_passes_the_cameras_stream_through(needs_rtsp: None) -> None:
    # A shared media: our camera and a plain FFmpeg client see the same RTP stream.
    with RtspServer("--shared") as srv:
        loop = asyncio.get_running_loop()
        reference: list[bytes] = []
        first = asyncio.Event()

        def read_reference() -> None:
            options = {"rtsp_transport": "tcp"}
            with av.open(srv.url, options=options, timeout=(10, 10)) as container:
                for packet in container.demux(container.streams.video[0]):
                    reference.append(bytes(packet))
                    if len(reference) == 1:
                        loop.call_soon_threadsafe(first.set)
                    if len(reference) == 3 * FPS:
                        return

        reader = asyncio.create_task(asyncio.to_thread(read_reference), name="reference")
        await asyncio.wait_for(first.wait(), 20)
        cam = RtspCamera("lobby", srv.url, **FAST)
        async with consuming(cam) as consumer:
            packets = [await consumer.next()]
            while sum(p.keyframe for p in packets) < 3:
                packets.append(await consumer.next())
        await asyncio.wait_for(reader, 20)
    ours = packets[:-1]  # two whole GOPs
    # Not re-encoded: every access unit is byte for byte what the demuxer gave the other client.
    assert len(ours) == 2 * GOP
    assert all(p.payload in reference for p in ours)
    # The camera's own cadence and clock: a keyframe every 15 frames, 90 kHz steps of 1/30 s.
    assert [i for i, p in enumerate(packets) if p.keyframe] == [0, GOP, 2 * GOP]
    # (The first packet of a connection may come without a timestamp.)
    stamps = [p.source_ts_ns for p in ours[1:]]
    steps = {b - a for a, b in itertools.pairwise(stamps)}  # type: ignore[operator]
    assert steps <= {33_333_333, 33_333_334}
    # x264 as the server configured it: Constrained Baseline (profile_idc 66, constraint_set1).
    sps = split_nal_units(cam.info.extradata)[0]
    assert (sps[1], bool(sps[2] & 0x40)) == (66, True)
    assert (cam.info.width, cam.info.height, cam.info.fps) == (320, 240, 30.0)
    # Real-time delivery at the camera's rate.
    rate = (len(ours) - 1) / ((ours[-1].mono_ns - ours[0].mono_ns) / 1e9)
    assert rate == pytest.approx(FPS, rel=0.3)
    assert len(decode(packets)) == len(packets)


async def test_parameter_sets_from_the_sdp_are_prepended_to_keyframes(needs_rtsp: None) -> None:
    with RtspServer("--out-of-band") as srv:
        cam = RtspCamera("sdp-only", srv.url, **FAST)
        async with consuming(cam) as consumer:
            packets = [await consumer.next() for _ in range(GOP + 1)]
    for key in (packets[0], packets[GOP]):
        assert key.keyframe
        # After the access unit delimiter, which must stay first.
        assert nal_types(key.payload)[:3] == [9, 7, 8]
    assert nal_types(cam.info.extradata) == [7, 8]


# --- reconnects ---


async def test_reconnects_by_itself_after_the_camera_dies(server: RtspServer) -> None:
    cam = RtspCamera("gym", server.url, open_timeout_s=2, read_timeout_s=2, **FAST)
    async with consuming(cam) as consumer:
        for _ in range(5):
            await consumer.next()
        assert cam.connected
        server.kill()  # SIGKILL by PID: the camera lost power
        await until(cam, lambda: not cam.connected and cam.last_error is not None)
        assert isinstance(cam.last_error, CameraConnectionError)
        while_down = cam.reconnects
        back = time.monotonic_ns()
        await asyncio.to_thread(server.start)  # same port
        after = [await consumer.after(back)]
        after += [await consumer.next() for _ in range(GOP)]
        assert cam.connected
        assert cam.reconnects >= max(1, while_down)
    # The new connection starts at a keyframe that carries its SPS/PPS, and decodes.
    assert after[0].keyframe
    assert {7, 8, 5} <= set(nal_types(after[0].payload))
    assert len(decode(after)) == len(after)


async def test_a_camera_that_hangs_times_out_and_is_reconnected(server: RtspServer) -> None:
    cam = RtspCamera("attic", server.url, open_timeout_s=2, read_timeout_s=0.5, **FAST)
    async with consuming(cam) as consumer:
        await consumer.next()
        os.kill(server.pid, signal.SIGSTOP)  # the camera freezes, its TCP connection stays up
        frozen = time.monotonic_ns()
        try:
            await until(cam, lambda: isinstance(cam.last_error, TimeoutError))
        finally:
            resumed = time.monotonic_ns()
            os.kill(server.pid, signal.SIGCONT)
        assert isinstance(cam.last_error, CameraTimeout)
        assert "no packet within 0.5 s" in str(cam.last_error)
        # Nothing arrived during the freeze: FFmpeg's parser hands out the frame it held
        # when the read times out, which read as a packet (the camera "recovered") and
        # was stamped with the time of the stall (found by a review).
        during = []
        while (packet := await consumer.next()).mono_ns <= resumed:
            during.append(packet)
        assert all(p.mono_ns < frozen + 400_000_000 for p in during), [
            (p.mono_ns - frozen) / 1e9 for p in during
        ]
    assert packet.keyframe


# --- cameras that do not answer, or answer nonsense ---


async def test_a_silent_camera_times_out_and_others_are_unaffected() -> None:
    loop = asyncio.get_running_loop()
    with silent_listener() as sock:
        port = sock.getsockname()[1]
        url = f"rtsp://admin:hunter2@127.0.0.1:{port}/cam"
        # The read timeout (the socket's) below the open timeout, as the defaults are: it
        # ends the handshake first, which read as "not RTSP with H.264" (found by a review).
        silent = RtspCamera("roof", url, open_timeout_s=1.0, read_timeout_s=0.5, **FAST)
        other = SyntheticCamera("hall", width=160, height=120, fps=30)
        worst = 0.0
        async with consuming(silent), consuming(other) as healthy:
            start = time.monotonic()
            await healthy.next()
            await until(silent, lambda: silent.last_error is not None)
            first_error_s = time.monotonic() - start
            while silent.reconnects < 2:  # backing off and retrying on its own
                before = loop.time()
                await asyncio.wait_for(silent.state_changed(), 10)
                assert loop.time() - before < 1.0  # bounded by reconnect_max_s + a timeout
            healthy_packets = [await healthy.next() for _ in range(healthy.queue.qsize())]
            for a, b in itertools.pairwise(healthy_packets):
                worst = max(worst, (b.mono_ns - a.mono_ns) / 1e9)
            assert not silent.connected
    assert isinstance(silent.last_error, CameraTimeout)
    assert isinstance(silent.last_error, TimeoutError)
    assert first_error_s < 3
    assert "'roof'" in str(silent.last_error)
    assert f"rtsp://***@127.0.0.1:{port}/cam" in str(silent.last_error)
    assert "hunter2" not in str(silent.last_error)
    # The synthetic camera kept its pace the whole time (no frame interval much over 1/30 s).
    assert len(healthy_packets) >= 20
    assert worst < 0.25


async def test_garbage_from_the_camera_is_a_clear_stream_error(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    async def junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the OPTIONS request
        writer.write(b"\x00\xffGARBAGE \x13\x37 not RTSP at all\r\n\r\n" * 4)
        await writer.drain()
        writer.close()

    caplog.set_level(logging.DEBUG)
    server = await asyncio.start_server(junk, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        url = f"rtsp://admin:hunter2@127.0.0.1:{port}/cam?password=hunter3"
        cam = RtspCamera("cellar", url, give_up_after=2, **FAST)
        try:
            with pytest.raises(CameraStreamError) as info:
                await drain(cam)
        finally:
            await cam.aclose()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'cellar'" in message
    assert f"rtsp://***@127.0.0.1:{port}/cam?password=***" in message
    assert cam.last_error is info.value
    assert info.value.__cause__ is None  # FFmpeg's exception repeats the raw URL
    out, err = capfd.readouterr()
    for text in (message, caplog.text, out, err):
        assert "hunter" not in text


async def test_a_camera_that_is_not_h264_is_refused(needs_rtsp: None) -> None:
    with RtspServer("--codec", "jpeg") as srv:
        cam = RtspCamera("mjpeg-cam", srv.url, give_up_after=1, **FAST)
        try:
            with pytest.raises(CameraStreamError, match=r"'mjpeg-cam'.*mjpeg, not H\.264"):
                await drain(cam)
        finally:
            await cam.aclose()


# --- construction ---


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("rtsp://cam.local/stream", "rtsp://cam.local/stream"),
        ("rtsp://u:p%40ss@10.0.0.5:554/s?channel=1", "rtsp://***@10.0.0.5:554/s?channel=1"),
        ("rtsp://user@[fe80::1]:8554/s", "rtsp://***@[fe80::1]:8554/s"),
        ("rtsp://h/s?user=a&pwd=b&token=c", "rtsp://h/s?user=a&pwd=***&token=***"),
        # Cheap NVRs put them in the path (found by a review: they went to the log whole).
        (
            "rtsp://h:554/user=admin&password=hunter2&channel=1&stream=0.sdp",
            "rtsp://h:554/user=admin&password=***&channel=1&stream=0.sdp",
        ),
        ("rtsp://h/live;password=x;user=y", "rtsp://h/live;password=***;user=y"),
    ],
)
def test_redact_url(url: str, safe: str) -> None:
    assert redact_url(url) == safe


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("http://u:secret@cam/stream", {}),
        ("rtsp:///no-host", {}),
        ("rtsp://u:secret@cam/stream", {"open_timeout_s": 0}),
        ("rtsp://u:secret@cam/stream", {"reconnect_min_s": 5, "reconnect_max_s": 1}),
        ("rtsp://u:secret@cam/stream", {"give_up_after": 0}),
    ],
)
def test_bad_arguments_name_the_camera_not_the_password(url: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(CameraConfigError, match="'porch'") as info:
        RtspCamera("porch", url, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert "secret" not in str(info.value)


def test_force_keyframe_is_a_no_op_for_an_ip_camera() -> None:
    cam = RtspCamera("porch", "rtsp://127.0.0.1:1/cam")
    assert cam.force_keyframe() is False
    assert cam.info.extradata == b""
    assert not cam.connected
