"""One JPEG still of a camera, from its pre-roll, for a technician checking the aim.

The pre-roll starts at a keyframe, so decoding it from the start always
works; the newest decoded picture is scaled down to at most
:data:`MAX_WIDTH` pixels wide and encoded with FFmpeg's MJPEG encoder (PyAV),
so no image library is needed. CPU-bound: call it in a worker thread.

PyAV is imported on the first snapshot, not with the agent: it is about
17 MiB resident, and an agent whose cameras are Pi cameras never needs it
otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Final

from hardware import EncodedPacket

MAX_WIDTH: Final = 640
QUALITY: Final = 6  # MJPEG qscale: 2 best .. 31 worst; about 20-40 KB at 640x480


class SnapshotError(ValueError):
    """No picture could be made (``code``: ``no_footage`` or ``undecodable``)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def jpeg_from_packets(
    packets: Sequence[EncodedPacket], extradata: bytes = b"", *, max_width: int = MAX_WIDTH
) -> bytes:
    """The newest picture in ``packets`` (Annex-B H.264 from a keyframe on) as a JPEG."""
    import av  # lazy: see the module docstring

    start = next((i for i in range(len(packets) - 1, -1, -1) if packets[i].keyframe), None)
    if start is None:
        raise SnapshotError("no_footage", "the camera has no keyframe in its pre-roll yet")
    decoder = av.CodecContext.create("h264", "r")
    if extradata:
        decoder.extradata = extradata
    picture = None
    try:
        for packet in packets[start:]:
            for frame in decoder.decode(av.Packet(packet.payload)):
                picture = frame
        for frame in decoder.decode(None):
            picture = frame
    except av.error.FFmpegError as exc:
        raise SnapshotError("undecodable", f"H.264 decoding failed: {exc}") from exc
    if picture is None:
        raise SnapshotError("undecodable", "the decoder gave no picture")
    width = min(max_width, picture.width) // 2 * 2
    height = max(2, round(picture.height * width / picture.width) // 2 * 2)
    scaled = picture.reformat(width=width, height=height, format="yuvj420p")
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
    encoder.time_base = Fraction(1, 25)
    encoder.options = {"qmin": str(QUALITY), "qmax": str(QUALITY)}
    scaled.pts = 0
    out = b"".join(bytes(p) for p in encoder.encode(scaled))
    out += b"".join(bytes(p) for p in encoder.encode(None))
    return out
