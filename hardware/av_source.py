"""Camera sources built on PyAV demuxing: never decoding, never re-encoding.

:class:`AccessUnitReader` turns the packets of one demuxed H.264 stream
into what every :class:`~hardware.camera.CameraSource` hands over: Annex-B
access units whose keyframes carry SPS and PPS. MP4 and Matroska store
length-prefixed NAL units (AVCC) with the parameter sets out of band in an
avcC record; FFmpeg's own ``h264_mp4toannexb`` bitstream filter converts
those (and re-inserts the parameter sets before IDRs) and passes Annex-B
input (MPEG-TS, raw ``.h264``, RTSP) through unchanged. Many IP cameras send
SPS/PPS only in the SDP (``sprop-parameter-sets``); the reader then prepends
the stream's parameter sets to each keyframe itself, so any keyframe is a
place where a receiver can join.

:class:`FileCamera` replays a video file through the reader (for demos and
replay benchmarks); :class:`hardware.rtsp.RtspCamera` reads a network
camera through it.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import av.error
from av.bitstream import BitStreamFilterContext
from av.video.stream import VideoStream

from hardware._bridge import ThreadedSource
from hardware._clock import ArrivalClock
from hardware._h264 import parameter_sets, valid_annex_b, with_parameter_sets
from hardware.camera import EncodedPacket, StreamInfo
from hardware.errors import CameraConfigError, CameraError, CameraStreamError

__all__ = ["AccessUnit", "AccessUnitReader", "FileCamera", "size_from_keyframe"]

#: An access unit as the reader yields it: (Annex-B payload, keyframe, pts in ns or None).
AccessUnit = tuple[bytes, bool, int | None]

_NS = 1_000_000_000
#: A keyframe is decoded, on the camera's thread, to see that the camera sends H.264 at
#: all (valid NAL headers say nothing of what follows them): the first of a
#: connection, the first after new parameter sets, then one every this many seconds.
KEYFRAME_CHECK_S = 60.0
#: Checked keyframes in a row that do not decode before the camera is in fault (one
#: may have lost packets on the way).
KEYFRAME_CHECK_FAILURES = 3
#: How long a paced file camera may take to see that it was stopped.
_STOP_CHECK_NS = 100_000_000


class AccessUnitReader:
    """The packets of one demuxed H.264 stream as self-contained Annex-B access units.

    ``where`` names the camera in errors. Raises :class:`CameraStreamError`
    when the stream is not H.264 or its description is broken; :meth:`units`
    raises it for a packet that is not H.264 at all. Not thread-safe: one
    reader per worker thread.
    """

    def __init__(self, stream: VideoStream, where: str) -> None:
        ctx = stream.codec_context
        if ctx.name != "h264":
            raise CameraStreamError(f"{where}: sends {ctx.name or 'an unknown codec'}, not H.264")
        self._where = where
        # Annex-B extradata (RTSP's sprop-parameter-sets): ours to prepend to
        # keyframes that lack them. An avcC record (MP4, MKV: first byte 1) is
        # the filter's business; it puts the parameter sets in band itself.
        extradata = ctx.extradata or b""
        self._sets = b"" if extradata[:1] == b"\x01" else parameter_sets(extradata)
        self._bsf = BitStreamFilterContext("h264_mp4toannexb", stream)
        self._check = _KeyframeCheck(where)
        self._time_base = stream.time_base
        self._size = (ctx.width, ctx.height)
        rate = stream.guessed_rate or stream.average_rate
        #: Frames per second as the stream describes it; 0.0 when it does not say.
        self.fps = float(rate) if rate else 0.0

    def units(self, packet: av.Packet[VideoStream]) -> Iterator[AccessUnit]:
        """The access units in one demuxed packet (usually exactly one)."""
        if packet.size == 0:
            return  # an empty packet would tell the filter the stream has ended
        for out in self._bsf.filter(packet):
            payload = bytes(out)
            if not payload:
                continue
            if not valid_annex_b(payload):
                raise CameraStreamError(
                    f"{self._where}: a {len(payload)}-byte packet holds no valid H.264 NAL units"
                )
            keyframe = bool(out.is_keyframe)
            if keyframe:
                in_band = parameter_sets(payload)
                if in_band:
                    if in_band != self._sets:
                        self._check.due_now()
                        if self._sets:
                            self._size = (0, 0)  # another size, maybe: read it from the SPS
                    self._sets = in_band  # the camera's current parameter sets win
                elif self._sets:
                    payload = with_parameter_sets(payload, self._sets)
                else:
                    raise CameraStreamError(
                        f"{self._where}: a keyframe without SPS/PPS, and none out of band"
                    )
                self._check(payload)
            ts = out.pts if out.pts is not None else out.dts
            yield payload, keyframe, self._to_ns(ts)

    def _to_ns(self, ts: int | None) -> int | None:
        tb = self._time_base
        if ts is None or tb is None:
            return None
        return ts * tb.numerator * _NS // tb.denominator

    def info(self, keyframe: bytes) -> StreamInfo:
        """The stream's description, given one of its keyframes (as :meth:`units` gave it)."""
        if not all(self._size):
            # The demuxer did not probe the size (we keep probing short so the
            # first packet comes at once): read it from the keyframe's SPS.
            self._size = size_from_keyframe(keyframe)
        return StreamInfo("h264", *self._size, self.fps, self._sets)


class _KeyframeCheck:
    """Decodes a keyframe now and then (:data:`KEYFRAME_CHECK_S`); raises
    :class:`CameraStreamError` once :data:`KEYFRAME_CHECK_FAILURES` checked in a row
    did not decode. A camera sending garbage behind valid NAL headers was recorded as
    healthy footage, its keyframes included."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._due = 0.0  # monotonic time of the next check: the first keyframe's
        self._failures = 0

    def due_now(self) -> None:
        """Check the next keyframe (new parameter sets)."""
        self._due = 0.0

    def __call__(self, keyframe: bytes) -> None:
        now = time.monotonic()
        if now < self._due:
            return
        error = decode_error(keyframe)
        if error is None:
            self._failures, self._due = 0, now + KEYFRAME_CHECK_S
            return
        self._failures += 1  # the next keyframe is checked too
        if self._failures >= KEYFRAME_CHECK_FAILURES:
            raise CameraStreamError(
                f"{self._where}: {self._failures} keyframes in a row do not decode ({error}): "
                "the camera does not send valid H.264"
            )


def decode_error(keyframe: bytes) -> str | None:
    """Why FFmpeg's H.264 decoder makes no picture of ``keyframe`` (None: it does)."""
    ctx = av.CodecContext.create("h264", "r")
    ctx.thread_count = 1  # one picture: no decoding threads to start and stop
    # An error, not a concealed picture: FFmpeg makes a picture of random slices too.
    ctx.options = {"err_detect": "explode"}
    try:
        frames = [*ctx.decode(av.Packet(keyframe)), *ctx.decode(None)]
    except av.error.FFmpegError as exc:
        return str(exc)
    if not any(frame.width > 0 for frame in frames):
        return "no picture"
    return None


def size_from_keyframe(keyframe: bytes) -> tuple[int, int]:
    """Width and height from a keyframe's SPS, via FFmpeg's raw H.264 demuxer."""
    try:
        with av.open(io.BytesIO(keyframe), format="h264") as container:
            ctx = container.streams.video[0].codec_context
            return ctx.width, ctx.height
    except (av.error.FFmpegError, IndexError):
        return 0, 0


class FileCamera(ThreadedSource):
    """A :class:`~hardware.camera.CameraSource` replaying a video file, passthrough.

    H.264 in MP4, Matroska, MPEG-TS or a raw Annex-B ``.h264`` file. With
    ``realtime=True`` packets come when their timestamps say (paced on the
    monotonic clock, re-anchored rather than bursting if the worker falls a
    second behind); with ``realtime=False`` as fast as the consumer takes
    them (for benchmarks; nothing is dropped then). With ``loop=True`` the
    file starts over at its end and the timestamps keep increasing
    (``source_ts_ns`` continues from the end of the previous pass);
    otherwise :meth:`packets` ends after the last packet. ``fps`` sets the
    rate of a raw ``.h264`` file, whose packets carry no timestamps (default:
    what the SPS says, else 25). ``capture_ns`` follows the same rule as for
    RTSP (``hardware._clock``). :meth:`force_keyframe` is a no-op (``False``).
    """

    _kind = "file"

    def __init__(
        self,
        camera_id: str,
        path: str | os.PathLike[str],
        *,
        loop: bool = True,
        realtime: bool = True,
        fps: float | None = None,
        max_buffered_s: float = 2.0,
    ) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise CameraConfigError(f"file camera {camera_id!r}: no such file: {self._path}")
        if fps is not None and not 0 < fps <= 240:
            raise CameraConfigError(f"file camera {camera_id!r}: fps must be in (0, 240]: {fps}")
        if max_buffered_s <= 0:
            raise CameraConfigError(f"file camera {camera_id!r}: max_buffered_s must be > 0")
        self._loop, self._realtime, self._fps = loop, realtime, fps
        super().__init__(camera_id, max_buffered_s=max_buffered_s, lossless=not realtime)
        self._initial_info = StreamInfo("h264", 0, 0, fps or 0.0, b"")

    def _describe(self) -> str:
        return f"file camera {self._id!r} ({self._path.name})"

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        pacer = _Pacer(self._realtime)
        clock = ArrivalClock()
        offset_ns = 0
        try:
            while not self._stop.is_set():
                played_ns = self._play(loop, pacer, clock, offset_ns)
                if played_ns is None:
                    return
                if not self._loop:
                    self._post(loop, self._queue.end)
                    return
                offset_ns += played_ns
        except CameraError as exc:
            self._post(loop, self._queue.fail, exc)
        except (av.error.FFmpegError, OSError) as exc:
            reason = getattr(exc, "strerror", None) or repr(exc)
            self._post(loop, self._queue.fail, CameraStreamError(f"{self._describe()}: {reason}"))

    def _play(
        self, loop: asyncio.AbstractEventLoop, pacer: _Pacer, clock: ArrivalClock, offset_ns: int
    ) -> int | None:
        """One pass over the file; the span of timestamps it covered, ``None`` if stopped."""
        with av.open(str(self._path)) as container:
            if not container.streams.video:
                raise CameraStreamError(f"{self._describe()}: no video stream")
            stream = container.streams.video[0]
            reader = AccessUnitReader(stream, self._describe())
            fps = reader.fps = self._fps or reader.fps or 25.0
            described = self._info
            frame_ns = round(_NS / fps)
            first: int | None = None
            rel = -frame_ns  # timestamp of the last unit, relative to the first
            for packet in container.demux(stream):
                for payload, keyframe, ts_ns in reader.units(packet):
                    if first is None:
                        if not keyframe:
                            continue  # a pass starts at a keyframe, or it would not decode
                        first = ts_ns if ts_ns is not None else 0
                    # Raw .h264 has no timestamps: one frame interval after the last.
                    rel = rel + frame_ns if ts_ns is None else ts_ns - first
                    source_ts = offset_ns + rel
                    if not pacer.wait_until(source_ts, self._stop):
                        return None
                    info = reader.info(payload) if keyframe else None
                    if info is not None:  # only a changed description travels
                        info, described = (None if info == described else info), info
                    wall, mono = time.time_ns(), time.monotonic_ns()
                    unit = EncodedPacket(
                        self._id,
                        -1,
                        clock.capture_ns(source_ts, wall, mono),
                        mono,
                        keyframe,
                        "h264",
                        payload,
                        source_ts,
                    )
                    self._emit(loop, unit, info)
                    if self._stop.is_set():
                        return None
            if first is None:
                raise CameraStreamError(f"{self._describe()}: no H.264 keyframe in the file")
            return rel + frame_ns


class _Pacer:
    """Releases packets when their timestamps are due on the monotonic clock."""

    def __init__(self, realtime: bool, max_late_ns: int = _NS) -> None:
        self._realtime = realtime
        self._max_late_ns = max_late_ns
        self._start: int | None = None  # monotonic ns at which timestamp 0 is due

    def wait_until(self, ts_ns: int, stop: threading.Event) -> bool:
        """Wait until ``ts_ns`` is due; ``False`` if ``stop`` was set meanwhile."""
        if not self._realtime:
            return not stop.is_set()
        now = time.monotonic_ns()
        if self._start is None or now - (self._start + ts_ns) > self._max_late_ns:
            # First packet, or a second behind (a stalled machine): re-anchor, never burst.
            self._start = now - ts_ns
        delay = self._start + ts_ns - now
        while delay > 0:
            # time.sleep, one nanosleep, where stop.wait(delay) costs a condition
            # variable's wake-up: about 1.5 times the CPU, at every frame of every
            # file camera. ``stop`` is seen within _STOP_CHECK_NS.
            time.sleep(min(delay, _STOP_CHECK_NS) / _NS)
            if stop.is_set():
                return False
            delay = self._start + ts_ns - time.monotonic_ns()
        return not stop.is_set()
