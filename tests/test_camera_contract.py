"""One contract for every camera source that can run here, plus what is specific to each.

The contract (``hardware.camera.CameraSource``): the first packet is a
keyframe carrying SPS and PPS; payloads are Annex-B access units; ``info``
never raises and, once a packet was yielded, describes the stream; capture
and monotonic times never decrease; a GOP decodes with FFmpeg's H.264
decoder; ``aclose`` ends a waiting consumer and the worker thread promptly,
and a second ``aclose`` is harmless.

Each source runs once per module (:func:`sample`): it streams until its
second keyframe while a consumer task collects, then is closed, and the
tests check what was recorded. Sources: the synthetic camera, files (MP4
and Matroska store AVCC with out-of-band parameter sets, MPEG-TS and raw
``.h264`` are Annex-B; one with B-frames; one replayed as fast as
possible), and a real RTSP camera (gst-rtsp-server) with parameter sets
in band and only in the SDP.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, aclosing
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from hardware import (
    CameraConfigError,
    CameraError,
    CameraSource,
    CameraStreamError,
    CameraUnavailable,
    EncodedPacket,
    FileCamera,
    PiCamera,
    RtspCamera,
    StreamInfo,
    SyntheticCamera,
)
from hardware._bridge import PacketQueue
from hardware._clock import ArrivalClock
from hardware._h264 import (
    nal_types,
    parameter_sets,
    split_nal_units,
    valid_annex_b,
    with_parameter_sets,
)
from hardware.av_source import size_from_keyframe
from hardware.picamera import INSTALL_HINT, FrameBridge
from tests.media import make_h264_packets
from tests.rtsp import RtspServer, rtsp_unavailable
from tests.test_synthetic_camera import decode

W, H, FPS, GOP = 320, 240, 30, 15
SECOND = 1_000_000_000


def write_video(path: Path, frames: int = 2 * GOP, *, bframes: int = 0) -> Path:
    """Encode a moving pattern with libx264 straight into ``path`` (format from the suffix)."""
    fmt = "h264" if path.suffix == ".h264" else None
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.options = {
            "preset": "ultrafast",
            "x264-params": f"keyint={GOP}:min-keyint={GOP}:scenecut=0:bframes={bframes}",
        }
        xs = np.arange(W, dtype=np.int32)[None, :]
        ys = np.arange(H, dtype=np.int32)[:, None]
        for i in range(frames):
            luma = (((xs + 5 * i) ^ (ys + 3 * i)) & 0xFF).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.stack([luma] * 3, axis=2), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def needs_rtsp() -> None:
    if reason := rtsp_unavailable():
        pytest.skip(reason)


@dataclass
class Sample:
    """What one source did, start to close."""

    camera_id: str
    is_source: bool
    info_before: StreamInfo
    info_after_first: StreamInfo | None
    packets: list[EncodedPacket]
    consumer_ended: bool
    aclose_s: float
    threads_after: list[str]
    reopen_error: Exception | None


def camera_threads(camera_id: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith(f"-camera:{camera_id}")]


async def run_sample(cam: SyntheticCamera | FileCamera | RtspCamera) -> Sample:
    """Stream until the second keyframe, then close while the consumer still waits."""
    is_source = isinstance(cam, CameraSource)
    before = cam.info
    got: list[EncodedPacket] = []
    after_first: list[StreamInfo] = []
    enough = asyncio.Event()

    async def consume() -> None:
        async for packet in cam.packets():
            got.append(packet)
            if len(got) == 1:
                after_first.append(cam.info)
            if len(got) > 1 and packet.keyframe:
                enough.set()

    consumer = asyncio.create_task(consume(), name="contract-consumer")
    try:
        await asyncio.wait_for(enough.wait(), 30)
    finally:
        start = time.monotonic()
        await cam.aclose()
        aclose_s = time.monotonic() - start
    try:
        await asyncio.wait_for(consumer, 5)
        ended = True
    except TimeoutError:
        ended = False
    await cam.aclose()  # a second close is harmless
    reopen: Exception | None = None
    try:
        async with aclosing(cam.packets()) as again:
            await anext(again)
    except CameraError as exc:
        reopen = exc
    end = next(i for i, p in enumerate(got) if i and p.keyframe)
    return Sample(
        cam.camera_id,
        is_source,
        before,
        after_first[0] if after_first else None,
        got[: end + 1],
        ended,
        aclose_s,
        camera_threads(cam.camera_id),
        reopen,
    )


SOURCES = [
    "synthetic",
    "file-mp4",
    "file-mkv-fast",
    "file-ts-fast",
    "file-h264-fast",
    "file-bframes-fast",
    "rtsp",
    "rtsp-out-of-band",
]


@pytest.fixture(scope="module", params=SOURCES)
def sample(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Sample:
    kind: str = request.param
    tmp = tmp_path_factory.mktemp(kind)
    with ExitStack() as stack:
        make: Callable[[], SyntheticCamera | FileCamera | RtspCamera]
        if kind == "synthetic":

            def make() -> SyntheticCamera:
                return SyntheticCamera(
                    "contract-synthetic", width=W, height=H, fps=FPS, keyframe_interval_s=0.5
                )
        elif kind.startswith("file-"):
            ext = kind.split("-")[1]
            path = write_video(
                tmp / f"clip.{'mp4' if ext == 'bframes' else ext}",
                bframes=2 if ext == "bframes" else 0,
            )

            def make() -> FileCamera:
                return FileCamera(f"contract-{kind}", path, realtime=not kind.endswith("-fast"))
        else:
            needs_rtsp()
            options = ("--out-of-band",) if kind == "rtsp-out-of-band" else ()
            server = stack.enter_context(RtspServer(*options))

            def make() -> RtspCamera:
                return RtspCamera(
                    f"contract-{kind}", server.url, open_timeout_s=10, read_timeout_s=5
                )

        return asyncio.run(run_sample(make()))


def test_is_a_camera_source(sample: Sample) -> None:
    assert sample.is_source
    assert sample.camera_id.startswith("contract-")


def test_first_packet_is_a_keyframe_with_parameter_sets(sample: Sample) -> None:
    first = sample.packets[0]
    assert first.keyframe
    assert {7, 8, 5} <= set(nal_types(first.payload))  # SPS, PPS, IDR slice
    for packet in sample.packets:
        assert (packet.camera, packet.seq, packet.codec) == (sample.camera_id, -1, "h264")


def test_payloads_are_annex_b(sample: Sample) -> None:
    for packet in sample.packets:
        assert packet.payload.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01"))
        assert valid_annex_b(packet.payload)
        if packet.keyframe:
            assert {7, 8} <= set(nal_types(packet.payload))


def test_info_describes_the_stream_once_a_packet_was_yielded(sample: Sample) -> None:
    assert isinstance(sample.info_before, StreamInfo)  # read before streaming: did not raise
    info = sample.info_after_first
    assert info is not None
    assert (info.codec, info.width, info.height) == ("h264", W, H)
    assert info.fps == pytest.approx(FPS)
    assert nal_types(info.extradata) == [7, 8]
    assert info.extradata.startswith(b"\x00\x00\x00\x01")
    # The SPS/PPS described are those of the stream's keyframes.
    assert set(split_nal_units(info.extradata)) <= set(split_nal_units(sample.packets[0].payload))


def test_capture_and_monotonic_times_never_decrease(sample: Sample) -> None:
    captures = [p.capture_ns for p in sample.packets]
    monos = [p.mono_ns for p in sample.packets]
    assert captures == sorted(captures)
    assert monos == sorted(monos)
    assert abs(captures[0] - time.time_ns()) < 120 * SECOND
    for packet in sample.packets:
        assert packet.source_ts_ns is None or isinstance(packet.source_ts_ns, int)


def test_a_gop_decodes(sample: Sample) -> None:
    frames = decode(sample.packets)
    assert len(frames) == len(sample.packets)
    assert {(f.width, f.height) for f in frames} == {(W, H)}


def test_aclose_is_prompt_ends_the_consumer_and_can_repeat(sample: Sample) -> None:
    assert sample.aclose_s < 1.0
    assert sample.consumer_ended
    assert sample.threads_after == []
    assert isinstance(sample.reopen_error, CameraError)
    assert sample.camera_id in str(sample.reopen_error)


# --- FileCamera beyond the contract ---


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One second of 320x240 at 30 fps in MP4, keyframes at 0 and 15."""
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4")


async def take(cam: CameraSource, n: int) -> list[EncodedPacket]:
    """The next ``n`` packets of ``cam`` (its stream is closed after them)."""
    async with aclosing(cam.packets()) as packets:
        return [await anext(packets) for _ in range(n)]


async def test_file_loops_with_increasing_timestamps(clip: Path) -> None:
    async with FileCamera("loop", clip, realtime=False) as cam:
        packets = await asyncio.wait_for(take(cam, 3 * 2 * GOP + 1), 20)
    assert [i for i, p in enumerate(packets) if p.keyframe] == list(range(0, 6 * GOP + 1, GOP))
    stamps = [p.source_ts_ns for p in packets]
    assert all(isinstance(ts, int) for ts in stamps)
    steps = {b - a for a, b in itertools.pairwise(stamps)}  # type: ignore[operator]
    # One frame interval everywhere, across the loop boundaries too (mp4 ticks round it).
    assert max(steps) - min(steps) < 1_000_000
    assert sum(steps) / len(steps) == pytest.approx(SECOND / FPS, rel=0.01)
    assert packets[2 * GOP].payload == packets[0].payload  # the same file, passed through


async def test_file_in_real_time_is_paced_by_its_timestamps(clip: Path) -> None:
    async with FileCamera("paced", clip) as cam:
        start = time.monotonic()
        packets = await asyncio.wait_for(take(cam, 16), 20)
        elapsed = time.monotonic() - start
    assert elapsed == pytest.approx(15 / FPS, abs=0.25)
    span = packets[-1].capture_ns - packets[0].capture_ns
    assert span == pytest.approx(15 * SECOND / FPS, rel=0.1)


async def test_file_without_loop_ends(clip: Path) -> None:
    async with FileCamera("once", clip, loop=False, realtime=False) as cam:
        packets = [p async for p in cam.packets()]
    assert len(packets) == 2 * GOP


async def test_raw_h264_takes_the_given_rate(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.h264", frames=GOP)
    async with FileCamera("raw", path, realtime=False, fps=10) as cam:
        packets = await asyncio.wait_for(take(cam, 3), 20)
        assert cam.info.fps == 10
    assert [p.source_ts_ns for p in packets] == [0, SECOND // 10, 2 * SECOND // 10]


async def test_file_that_is_not_h264_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuvj420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((H, W, 3), np.uint8), format="rgb24")
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    async with FileCamera("mjpeg-file", path) as cam:
        with pytest.raises(CameraStreamError, match=r"mjpeg-file.*mjpeg, not H\.264"):
            await asyncio.wait_for(take(cam, 1), 20)


async def test_file_with_garbage_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "clip.ts"
    path.write_bytes(bytes(range(256)) * 64)
    async with FileCamera("junk-file", path) as cam:
        with pytest.raises(CameraStreamError, match="junk-file"):
            await asyncio.wait_for(take(cam, 1), 20)


def _garbled(payload: bytes, seed: int) -> bytes:
    """An access unit whose slices are random bytes behind valid NAL headers (SPS and
    PPS kept): what a broken camera or encoder can send."""
    rnd = random.Random(seed)
    return b"".join(
        b"\x00\x00\x00\x01"
        + (u if u[0] & 0x1F in (7, 8) else u[:1] + bytes(rnd.randrange(1, 256) for _ in u[1:]))
        for u in split_nal_units(payload)
    )


@pytest.mark.parametrize("garbled", ["all", "one keyframe"])
async def test_a_file_whose_keyframes_do_not_decode_is_a_stream_error(
    tmp_path: Path, garbled: str
) -> None:
    """Keyframes are decoded now and then: a camera that sends garbage behind valid NAL
    headers is a fault after three in a row; one damaged keyframe is not."""
    packets = make_h264_packets(120)  # keyframes at 0, 30, 60, 90
    units = [
        _garbled(data, i) if garbled == "all" or i == 30 else data
        for i, (data, _) in enumerate(packets)
    ]
    path = tmp_path / "clip.h264"
    path.write_bytes(b"".join(units))
    async with FileCamera("garbled", path, loop=False, realtime=False) as cam:
        if garbled == "all":
            with pytest.raises(CameraStreamError, match=r"garbled.*3 keyframes in a row do not"):
                await asyncio.wait_for(take(cam, 120), 30)
        else:
            # FFmpeg's parser cuts the garbled unit in pieces of its own: no count to check.
            await asyncio.wait_for(take(cam, 120), 30)


async def test_a_stream_that_changes_size_is_described_as_it_is_now(tmp_path: Path) -> None:
    """New parameter sets in band (a camera set to another size): the description
    follows, size and extradata together."""
    # One GOP each; the first longer than the file camera's queue (32): the worker cannot
    # have read the second's description yet when the first packet is taken.
    small, large = make_h264_packets(60, gop=60), make_h264_packets(30, width=640, height=360)
    path = tmp_path / "clip.h264"
    path.write_bytes(b"".join(data for data, _ in small + large))
    async with (
        FileCamera("resized", path, loop=False, realtime=False) as cam,
        aclosing(cam.packets()) as packets,
    ):
        await anext(packets)
        assert (cam.info.width, cam.info.height) == (320, 240)
        async for packet in packets:
            if packet.keyframe:  # the first at the new size (one GOP each)
                break
        assert (cam.info.width, cam.info.height) == (640, 360)
        assert cam.info.extradata == parameter_sets(large[0][0])


def test_file_camera_arguments(tmp_path: Path) -> None:
    with pytest.raises(CameraConfigError, match="gone"):
        FileCamera("gone", tmp_path / "missing.mp4")
    path = write_video(tmp_path / "clip.ts", frames=1)
    with pytest.raises(CameraConfigError, match="fps") as info:
        FileCamera("bad-fps", path, fps=0)
    assert isinstance(info.value, ValueError)
    assert FileCamera("no-encoder", path).force_keyframe() is False


# --- shared pieces behind every source ---


def test_arrival_clock_follows_source_spacing_through_jitter() -> None:
    clock = ArrivalClock()
    frame = SECOND // 30
    # Packets 1-3 arrive in a burst after packet 0 was delayed 50 ms less than them.
    arrivals = [1000 * SECOND, 1000 * SECOND + 4 * frame, 1000 * SECOND + 4 * frame + 1000]
    stamps = [clock.capture_ns(i * frame, at) for i, at in enumerate(arrivals)]
    assert stamps == [1000 * SECOND, 1000 * SECOND + frame, 1000 * SECOND + 2 * frame]
    # A packet that came faster than the first one moves the anchor back to its arrival.
    assert clock.capture_ns(3 * frame, 1000 * SECOND + 2 * frame) == 1000 * SECOND + 2 * frame


def test_arrival_clock_reanchors_and_never_goes_back() -> None:
    clock = ArrivalClock(max_lag_ns=SECOND)
    assert clock.capture_ns(10 * SECOND, 500 * SECOND) == 500 * SECOND
    # The source's clock jumped back (a camera restart): re-anchor on arrival.
    assert clock.capture_ns(0, 501 * SECOND) == 501 * SECOND
    clock.restart()
    # After a reconnect, a packet stamped earlier than the last capture is clamped.
    assert clock.capture_ns(5 * SECOND, 500 * SECOND) == 501 * SECOND
    assert clock.capture_ns(None, 502 * SECOND) == 502 * SECOND


def test_annex_b_checks_and_parameter_sets(h264: list[tuple[bytes, bool]]) -> None:
    keyframe, delta = h264[0][0], h264[1][0]
    assert valid_annex_b(keyframe)
    assert valid_annex_b(delta)
    assert not valid_annex_b(b"\x00\x00\x00\x01\xe5junk")  # forbidden_zero_bit set
    assert not valid_annex_b(len(delta).to_bytes(4, "big") + delta[4:])  # length-prefixed
    assert not valid_annex_b(bytes(range(256)))
    sets = parameter_sets(keyframe)
    assert nal_types(sets) == [7, 8]
    assert parameter_sets(sets + sets) == sets  # each once
    bare = b"".join(b"\x00\x00\x00\x01" + u for u in split_nal_units(keyframe) if u[0] & 31 == 5)
    aud = b"\x00\x00\x00\x01\x09\xf0"
    assert nal_types(with_parameter_sets(aud + bare, sets)) == [9, 7, 8, *nal_types(bare)]
    assert with_parameter_sets(keyframe, sets) == keyframe  # already has them
    assert size_from_keyframe(keyframe) == (W, H)
    assert size_from_keyframe(b"junk") == (0, 0)


def packet_at(ms: int, keyframe: bool) -> EncodedPacket:
    return EncodedPacket("q", -1, ms * 1_000_000, ms * 1_000_000, keyframe, "h264", b"")


async def test_queue_drops_whole_gops_when_the_consumer_lags() -> None:
    queue = PacketQueue("q", max_buffered_s=0.1)
    for i in range(30):  # 30 packets 10 ms apart, a keyframe every 10
        queue.put(packet_at(10 * i, i % 10 == 0))
    # Whenever more than 100 ms wait and a later keyframe exists, the oldest GOP goes.
    assert queue.dropped == 20
    first = await queue.get()
    assert first is not None
    assert first.keyframe
    assert first.mono_ns == 200 * 1_000_000


async def test_queue_without_a_second_keyframe_resyncs_at_the_next_one() -> None:
    queue = PacketQueue("q", max_buffered_s=0.1)
    for i in range(42):  # one keyframe, then 41 P-frames: more than 4 x 100 ms
        queue.put(packet_at(10 * i, i == 0))
    assert queue.dropped == 42
    queue.put(packet_at(430, False))  # undecodable without its keyframe: dropped
    queue.put(packet_at(440, True))
    queue.end()
    got = [await queue.get(), await queue.get()]
    assert got[0] is not None
    assert got[0].mono_ns == 440 * 1_000_000
    assert got[1] is None


# --- Hand-off latency: an idle agent's packets reach the loop in batches ---


async def test_a_held_hand_off_delivers_every_packet_in_batches_then_promptly() -> None:
    async with SyntheticCamera("held", width=W, height=H, fps=FPS) as cam:
        cam.set_handoff(0.25)
        arrivals: list[tuple[EncodedPacket, int]] = []
        async with aclosing(cam.packets()) as packets:
            async with asyncio.timeout(20):
                while len(arrivals) < 2 * FPS:
                    packet = await anext(packets)
                    arrivals.append((packet, time.monotonic_ns()))
                cam.set_handoff(0)
                prompt: list[tuple[EncodedPacket, int]] = []
                while len(prompt) < FPS:
                    packet = await anext(packets)
                    prompt.append((packet, time.monotonic_ns()))
    held_waits = [(at - p.mono_ns) / 1e9 for p, at in arrivals[FPS // 2 :]]
    # Each batch's first packet waited about 0.25 s for its batch; none waits far longer.
    assert max(held_waits) > 0.2
    assert max(held_waits) < 1.0
    monos = [p.mono_ns for p, _ in arrivals + prompt]
    assert monos == sorted(set(monos))  # nothing lost, doubled or reordered at the switch
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(monos)]
    assert max(gaps) < 3 / FPS
    prompt_waits = [(at - p.mono_ns) / 1e9 for p, at in prompt[FPS // 2 :]]
    assert max(prompt_waits) < 0.15  # one by one again (a frame period, and a loaded loop)


async def test_a_source_that_ends_hands_over_its_held_packets_first(clip: Path) -> None:
    async with FileCamera("held-end", clip, loop=False) as cam:
        cam.set_handoff(60)  # longer than the clip: only the end can flush them
        async with asyncio.timeout(20):
            packets = [p async for p in cam.packets()]
    assert len(packets) == 2 * GOP
    assert [p.keyframe for p in packets].count(True) == 2


def test_a_hand_off_latency_is_checked() -> None:
    cam = SyntheticCamera("held-bad", width=W, height=H, fps=FPS)
    with pytest.raises(ValueError, match="hand-off latency"):
        cam.set_handoff(-1)


# --- PiCamera off the Pi: the lazy import and our Output bridge ---


def test_pi_camera_without_picamera2_says_what_to_install() -> None:
    with pytest.raises(CameraUnavailable, match=r"'hall'.*breakglass\[pi\]") as info:
        PiCamera("hall")
    assert isinstance(info.value, ImportError)
    assert "python3-picamera2" in str(info.value)
    assert "--system-site-packages" in INSTALL_HINT


def test_a_picamera2_that_fails_to_import_is_this_cameras_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """apt's picamera2 built against numpy 1 under a venv's numpy 2 raises ValueError on
    import: the camera is unavailable (the agent arms without it), not the agent down."""
    (tmp_path / "picamera2").mkdir()
    (tmp_path / "picamera2" / "__init__.py").write_text(
        'raise ValueError("numpy.dtype size changed, may indicate binary incompatibility")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "picamera2", raising=False)
    with pytest.raises(CameraUnavailable, match=r"'hall'.*numpy\.dtype size changed"):
        PiCamera("hall")


def test_pi_camera_arguments_are_checked_before_the_import() -> None:
    with pytest.raises(CameraConfigError, match=r"'hall'.*even"):
        PiCamera("hall", width=641)


@pytest.fixture(scope="module")
def h264() -> list[tuple[bytes, bool]]:
    return make_h264_packets(31, width=W, height=H, gop=15)


async def test_frame_bridge_hands_frames_to_the_loop(h264: list[tuple[bytes, bool]]) -> None:
    loop = asyncio.get_running_loop()
    got: list[tuple[EncodedPacket, StreamInfo | None, bool]] = []
    done = asyncio.Event()

    def emit(packet: EncodedPacket, info: StreamInfo | None) -> None:
        # As ThreadedSource._emit does: the encoder thread only posts to the loop.
        loop.call_soon_threadsafe(receive, packet, info)

    def receive(packet: EncodedPacket, info: StreamInfo | None) -> None:
        got.append((packet, info, threading.current_thread() is threading.main_thread()))
        if len(got) == len(h264):
            done.set()

    bridge = FrameBridge("pi-cam", emit, size=(W, H), fps=30.0, origin_us=lambda: 7_000_000)

    def encoder_thread() -> None:
        # picamera2 calls outputframe(frame, keyframe, timestamp_us_since_first, packet, audio).
        bridge.outputframe(h264[1][0], False, 0, None, False)  # before any keyframe: dropped
        bridge.outputframe(b"aac", True, 0, None, True)  # audio: ignored
        for i, (payload, key) in enumerate(h264):
            bridge.outputframe(memoryview(payload), key, 40_000 + i * 33_333, None, False)

    thread = threading.Thread(target=encoder_thread, name="encoder-thread")
    thread.start()
    await asyncio.to_thread(thread.join)
    await asyncio.wait_for(done.wait(), 10)
    packets = [p for p, _, _ in got]
    assert [p.payload for p in packets] == [payload for payload, _ in h264]
    assert [p.keyframe for p in packets] == [key for _, key in h264]
    assert all(on_loop for _, _, on_loop in got)
    # The description travels once, with the first keyframe (the SPS/PPS stay the same).
    infos = [info for _, info, _ in got]
    assert infos[0] == StreamInfo("h264", W, H, 30.0, infos[0].extradata if infos[0] else b"")
    assert infos[0] is not None
    assert nal_types(infos[0].extradata) == [7, 8]
    assert infos[1:] == [None] * (len(h264) - 1)
    # Sensor time: the encoder's first timestamp plus the frame's offset from it.
    assert [p.source_ts_ns for p in packets[:2]] == [7_040_000_000, 7_073_333_000]
    assert [p.capture_ns for p in packets] == sorted(p.capture_ns for p in packets)
    assert len(decode(packets)) == len(h264)
