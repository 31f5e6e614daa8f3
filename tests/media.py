"""Real H.264 test media, encoded with PyAV's libx264.

Generic helpers for any test that needs camera-like packets: Annex-B access
units as an IP camera or the Pi's hardware encoder would hand them over
(SPS/PPS repeated before every keyframe, no B-frames, baseline profile,
ultrafast + zerolatency). The picture is a moving pattern, so every frame
differs and the encoder produces real P-frames.
"""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.logging
import numpy as np

__all__ = [
    "PacketList",
    "decode_every_frame",
    "ffprobe_packets",
    "ffprobe_stream",
    "make_h264_packets",
]

#: ``(payload, keyframe)`` pairs in decode order.
PacketList = list[tuple[bytes, bool]]


def make_h264_packets(
    n: int, width: int = 320, height: int = 240, fps: int = 30, gop: int = 30
) -> PacketList:
    """Encode ``n`` frames and return them as ``(annex_b_access_unit, keyframe)``.

    Keyframes come exactly every ``gop`` frames (no scene-cut keyframes), each
    preceded by SPS and PPS in-band (``repeat-headers=1``). Width and height
    must be even (4:2:0).
    """
    if n < 1:
        raise ValueError(f"need at least one frame, got {n}")
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even, got {width}x{height}")
    enc = av.CodecContext.create("libx264", "w")
    assert isinstance(enc, av.VideoCodecContext)
    enc.width = width
    enc.height = height
    enc.pix_fmt = "yuv420p"
    enc.time_base = Fraction(1, fps)
    enc.framerate = Fraction(fps)
    enc.gop_size = gop
    enc.max_b_frames = 0
    enc.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "profile": "baseline",
        "x264-params": f"repeat-headers=1:keyint={gop}:min-keyint={gop}:scenecut=0",
    }
    packets: PacketList = []
    ys = np.arange(height, dtype=np.int32)[:, None]
    xs = np.arange(width, dtype=np.int32)[None, :]
    for i in range(n):
        luma = ((xs + 4 * i) ^ (ys + 2 * i)) & 0xFF
        img = np.repeat(luma.astype(np.uint8)[:, :, None], 3, axis=2)
        img[:, :, 1] = (xs * 255 // max(width - 1, 1)).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        packets.extend((bytes(p), p.is_keyframe) for p in enc.encode(frame))
    packets.extend((bytes(p), p.is_keyframe) for p in enc.encode(None))
    if len(packets) != n:
        raise AssertionError(f"encoder returned {len(packets)} packets for {n} frames")
    return packets


def _ffprobe(path: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        ["ffprobe", "-v", "error", *args, "-of", "json", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise AssertionError(f"ffprobe {path} failed: {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def ffprobe_stream(path: Path) -> dict[str, Any]:
    """The first stream of a media file per the system ``ffprobe``, frames counted.

    Has ``codec_name``, ``width``, ``height``, ``nb_read_frames`` (frames
    decoded) and ``nb_read_packets``. Blocking: call it through
    ``asyncio.to_thread`` from async tests.
    """
    doc = _ffprobe(path, "-show_streams", "-count_frames", "-count_packets")
    streams: list[dict[str, Any]] = doc["streams"]
    if not streams:
        raise AssertionError(f"ffprobe found no stream in {path}")
    return streams[0]


def ffprobe_packets(path: Path) -> list[dict[str, Any]]:
    """The packets of the first stream (``pts``, ``dts``, ``flags``, ``size`` ...)."""
    packets: list[dict[str, Any]] = _ffprobe(path, "-select_streams", "v:0", "-show_packets")[
        "packets"
    ]
    return packets


def decode_every_frame(path: Path) -> tuple[tuple[int, int], list[tuple[int, int]], list[str]]:
    """Decode every frame of the first video stream with PyAV.

    Returns the size the container declares, the size of each decoded frame,
    and the errors FFmpeg logged while decoding (a decoder that conceals broken
    slices logs them rather than raising).
    """
    level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture() as logs, av.open(str(path)) as container:
            stream = container.streams.video[0]
            declared = (stream.codec_context.width, stream.codec_context.height)
            sizes = [(f.width, f.height) for p in container.demux(stream) for f in p.decode()]
    finally:
        av.logging.set_level(level)
    return declared, sizes, [message.strip() for _, _, message in logs]


#: Session metadata as the ingest writes it, for recording and viewer tests.
META: dict[str, object] = {
    "building": "lincoln-high",
    "started_by": {"kind": "button", "button_id": "office", "location": "Main office"},
    "started_at": 1_767_000_030.0,
}
