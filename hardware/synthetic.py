"""A synthetic camera: a moving test pattern, encoded live with libx264.

Used by the demo and by tests that need real H.264 without a camera. Each
frame shows the camera's own colour (derived from its id), a bouncing box and
scrolling bars (so consecutive frames differ), the label, and a burned-in
frame counter and UTC clock, drawn with the tiny bitmap font below (no PIL).

Threading: rendering and encoding run in ONE dedicated worker thread per
camera (not the loop's default executor, which other blocking work shares).
The thread paces itself on the monotonic clock (frame ``i`` is due at
``start + i / fps``), sleeps with ``threading.Event.wait`` so that
:meth:`SyntheticCamera.aclose` stops it at once, and hands every packet to the
event loop with ``loop.call_soon_threadsafe``; it never touches any other
asyncio object.

Back-pressure: a live camera cannot wait for its reader, so the thread never
blocks on the consumer. Packets queue on the loop side, bounded to about
``max_buffered_s`` of video; when the consumer falls that far behind, the
oldest whole GOP is dropped (``hardware._bridge``, shared by every camera
source). If the worker itself falls behind real time (an overloaded CPU), it
skips the frames it missed instead of bursting, as a real camera would.
"""

from __future__ import annotations

import asyncio
import colorsys
import hashlib
import threading
import time
from fractions import Fraction
from typing import Final

import av
import av.error
import numpy as np
import numpy.typing as npt
from av.video.frame import PictureType

from hardware._bridge import ThreadedSource
from hardware._clock import ArrivalClock
from hardware._h264 import parameter_sets
from hardware._settings import check_encoding
from hardware.camera import EncodedPacket, StreamInfo
from hardware.errors import EncoderUnavailable

__all__ = ["SyntheticCamera"]

_ENCODER: Final = "libx264"

# 5x7 bitmap font: seven rows per glyph, bit 4 is the leftmost pixel.
_FONT_HEX = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F",
    "3": "1F02040201110E", "4": "02060A121F0202", "5": "1F101E0101110E",
    "6": "0608101E11110E", "7": "1F010204080808", "8": "0E11110E11110E",
    "9": "0E11110F01020C", ":": "000C0C000C0C00", ".": "00000000000C0C",
    "-": "0000001F000000", "_": "0000000000001F", "/": "01010204081010",
    " ": "00000000000000", "#": "0A0A1F0A1F0A0A", "?": "0E110102040004",
    "A": "0E11111F111111", "B": "1E11111E11111E", "C": "0E11101010110E",
    "D": "1C12111111121C", "E": "1F10101E10101F", "F": "1F10101E101010",
    "G": "0E11101711110F", "H": "1111111F111111", "I": "0E04040404040E",
    "J": "0702020202120C", "K": "11121418141211", "L": "1010101010101F",
    "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E",
    "P": "1E11111E101010", "Q": "0E11111115120D", "R": "1E11111E141211",
    "S": "0F10100E01011E", "T": "1F040404040404", "U": "1111111111110E",
    "V": "11111111110A04", "W": "1111111515150A", "X": "11110A040A1111",
    "Y": "1111110A040404", "Z": "1F01020408101F",
}  # fmt: skip

BoolArray = npt.NDArray[np.bool_]
U8Array = npt.NDArray[np.uint8]


def _glyph(hex_rows: str) -> BoolArray:
    rows = [int(hex_rows[k : k + 2], 16) for k in range(0, 14, 2)]
    bits = np.array([[(r >> (4 - c)) & 1 for c in range(5)] for r in rows], dtype=np.bool_)
    # One blank column on the right spaces the characters.
    return np.pad(bits, ((0, 0), (0, 1)))


_GLYPHS = {ch: _glyph(rows) for ch, rows in _FONT_HEX.items()}


def _text_mask(text: str, scale: int) -> BoolArray:
    """A boolean bitmap of ``text`` (upper-cased; unknown characters as '?')."""
    glyphs = [_GLYPHS.get(ch, _GLYPHS["?"]) for ch in text.upper()] or [_GLYPHS[" "]]
    mask = np.concatenate(glyphs, axis=1)
    return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)


def _camera_yuv(camera_id: str) -> tuple[int, int, int]:
    """A stable, distinct colour per camera id, as BT.601 limited-range YUV."""
    hue = hashlib.sha256(camera_id.encode()).digest()[0] / 256
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.55)
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    u = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    v = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    return round(y), round(u), round(v)


class _Pattern:
    """Renders frames of the test pattern straight into yuv420p (no colour conversion)."""

    def __init__(self, width: int, height: int, fps: float, camera_id: str, label: str) -> None:
        self._w, self._h, self._fps = width, height, fps
        self._scale = max(1, min(height // 120, width // 160))
        line_h = 9 * self._scale
        self._band_h = min(height, (self._scale + 2 * line_h + 1) & ~1)
        self._line2_y = self._scale + line_h
        y, u, v = _camera_yuv(camera_id)
        n = width * height
        self._base: U8Array = np.empty(n * 3 // 2, dtype=np.uint8)
        self._base[:n] = y
        self._base[n : n * 5 // 4] = u
        self._base[n * 5 // 4 :] = v
        by, bu, bv = self._planes(self._base)
        by[: self._band_h] = 16
        bu[: self._band_h // 2] = 128
        bv[: self._band_h // 2] = 128
        self._draw_text(by, label, self._scale)
        # Bars: a luma offset repeated every 32 px, sliced at a moving offset.
        self._bars: U8Array = np.where((np.arange(width + 64) // 16) % 2 == 0, 40, 0).astype(
            np.uint8
        )
        self._bars_top = height - max(2, height // 6)
        self._box = max(2, (height // 5) & ~1)

    def _planes(self, buf: U8Array) -> tuple[U8Array, U8Array, U8Array]:
        w, h, n = self._w, self._h, self._w * self._h
        return (
            buf[:n].reshape(h, w),
            buf[n : n * 5 // 4].reshape(h // 2, w // 2),
            buf[n * 5 // 4 :].reshape(h // 2, w // 2),
        )

    def _draw_text(self, luma: U8Array, text: str, top: int) -> None:
        mask = _text_mask(text, self._scale)
        mh, mw = min(mask.shape[0], self._h - top), min(mask.shape[1], self._w - self._scale)
        if mh > 0 and mw > 0:
            region = luma[top : top + mh, self._scale : self._scale + mw]
            region[mask[:mh, :mw]] = 235

    def render(self, index: int, capture_ns: int) -> U8Array:
        """Frame ``index`` captured at ``capture_ns`` (UTC), as a (h*3/2, w) array."""
        buf = self._base.copy()
        y, u, v = self._planes(buf)
        # Bouncing box: a triangle wave across the width, one pass every 2 s.
        span = max(2, self._w - self._box)
        step = max(2, round(span / (2 * self._fps)))
        pos = (index * step) % (2 * span)
        x = (pos if pos < span else 2 * span - pos) & ~1
        top = ((self._band_h + self._bars_top - self._box) // 2) & ~1
        y[top : top + self._box, x : x + self._box] = 235
        u[top // 2 : (top + self._box) // 2, x // 2 : (x + self._box) // 2] = 128
        v[top // 2 : (top + self._box) // 2, x // 2 : (x + self._box) // 2] = 128
        # Scrolling bars along the bottom.
        offset = (index * 4) % 32
        y[self._bars_top :] += self._bars[offset : offset + self._w]
        secs, rest = divmod(capture_ns, 1_000_000_000)
        tm = time.gmtime(secs)
        clock = f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}.{rest // 1_000_000:03d}"
        self._draw_text(y, f"#{index:06d} {clock} UTC", self._line2_y)
        return buf.reshape(self._h * 3 // 2, self._w)


class SyntheticCamera(ThreadedSource):
    """A :class:`~hardware.camera.CameraSource` that renders and encodes a test pattern.

    H.264 Constrained Baseline (plays in Chromium through MSE), no B-frames,
    an IDR every ``keyframe_interval_s`` (no scene-cut keyframes), each
    keyframe carrying SPS and PPS, Annex-B payloads, one access unit per
    packet. ``bitrate`` (bit/s) caps the rate with a one-second VBV buffer;
    ``None`` uses x264's default constant quality. ``label`` (default: the
    camera id) is burned into the picture. ``max_buffered_s`` bounds the
    packets waiting for the consumer (see the module docstring).

    The worker thread starts on the first :meth:`packets` call; packets are
    meant for one consumer (the agent's capture fan-out). Close with
    :meth:`aclose` or ``async with``.
    """

    _kind = "synthetic"

    def __init__(
        self,
        camera_id: str,
        *,
        width: int = 640,
        height: int = 480,
        fps: float = 15.0,
        keyframe_interval_s: float = 1.0,
        bitrate: int | None = None,
        label: str | None = None,
        max_buffered_s: float = 2.0,
    ) -> None:
        check_encoding(
            f"synthetic camera {camera_id!r}",
            width=width,
            height=height,
            fps=fps,
            keyframe_interval_s=keyframe_interval_s,
            bitrate=bitrate,
            max_buffered_s=max_buffered_s,
        )
        try:
            av.Codec(_ENCODER, "w")
        except av.codec.codec.UnknownCodecError as exc:
            raise EncoderUnavailable(
                f"synthetic camera {camera_id!r}: PyAV has no {_ENCODER} encoder"
            ) from exc
        super().__init__(camera_id, max_buffered_s=max_buffered_s)
        self._width, self._height, self._fps = width, height, float(fps)
        self._gop = max(1, round(fps * keyframe_interval_s))
        self._bitrate = bitrate
        self._label = camera_id if label is None else label
        self._initial_info = StreamInfo("h264", width, height, self._fps, b"")
        self._frames_skipped = 0
        self._keyframe_wanted = threading.Event()

    @property
    def keyframe_interval(self) -> int:
        """Frames per GOP: ``round(fps * keyframe_interval_s)``."""
        return self._gop

    @property
    def frames_skipped(self) -> int:
        """Frames never rendered because the worker fell behind real time."""
        return self._frames_skipped

    def force_keyframe(self) -> bool:
        """Encode the next frame as an IDR (with SPS/PPS); thread-safe. Returns ``True``.

        The regular cadence restarts from that keyframe (x264 counts the
        keyframe interval from the last IDR).
        """
        self._keyframe_wanted.set()
        return True

    # --- the worker thread ---

    def _open_encoder(self) -> av.VideoCodecContext:
        rate = Fraction(self._fps).limit_denominator(1001)
        ctx = av.CodecContext.create(_ENCODER, "w")
        ctx.width, ctx.height, ctx.pix_fmt = self._width, self._height, "yuv420p"
        ctx.framerate, ctx.time_base = rate, 1 / rate
        ctx.gop_size, ctx.max_b_frames = self._gop, 0
        options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "profile": "baseline",  # x264 emits Constrained Baseline (avc1.42C0xx)
            "forced-idr": "1",  # a forced keyframe is an IDR, a valid join point
            "x264-params": f"keyint={self._gop}:min-keyint={self._gop}:scenecut=0"
            ":bframes=0:repeat-headers=1",
        }
        if self._bitrate is not None:
            ctx.bit_rate = self._bitrate
            options |= {"maxrate": str(self._bitrate), "bufsize": str(self._bitrate)}
        ctx.options = options
        ctx.open()
        return ctx

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            encoder = self._open_encoder()
        except (av.error.FFmpegError, ValueError) as exc:
            error = EncoderUnavailable(f"{self._describe()}: {_ENCODER} did not open: {exc}")
            self._post(loop, self._queue.fail, error)
            return
        self._encode_loop(loop, encoder)
        # The encoder is released with its last reference when this returns;
        # with zerolatency x264 holds no delayed frames worth flushing.

    def _encode_loop(self, loop: asyncio.AbstractEventLoop, encoder: av.VideoCodecContext) -> None:
        pattern = _Pattern(self._width, self._height, self._fps, self._id, self._label)
        stamps: dict[int, tuple[int, int]] = {}
        clock = ArrivalClock()  # a wall clock set back does not take capture times back
        have_info = False
        start = time.monotonic()
        index = 0
        while True:
            delay = start + index / self._fps - time.monotonic()
            if delay > 0:
                if self._stop.wait(delay):
                    return
            elif self._stop.is_set():
                return
            elif (behind := int(-delay * self._fps)) > 0:
                index += behind
                self._frames_skipped += behind
            wall_ns, mono_ns = time.time_ns(), time.monotonic_ns()
            capture_ns = clock.capture_ns(None, wall_ns, mono_ns)
            frame = av.VideoFrame.from_ndarray(pattern.render(index, capture_ns), format="yuv420p")
            frame.pts = index
            if self._keyframe_wanted.is_set():
                self._keyframe_wanted.clear()
                frame.pict_type = PictureType.I
            stamps[index] = (capture_ns, mono_ns)
            for out in encoder.encode(frame):
                payload = bytes(out)
                pts = index if out.pts is None else out.pts
                cap, mono = stamps.pop(pts, (capture_ns, mono_ns))
                info = None
                if out.is_keyframe and not have_info:
                    sets = parameter_sets(payload)
                    info = StreamInfo("h264", self._width, self._height, self._fps, sets)
                    have_info = True
                packet = EncodedPacket(self._id, -1, cap, mono, out.is_keyframe, "h264", payload)
                self._emit(loop, packet, info)
            index += 1
