"""The Raspberry Pi camera, through picamera2 and the Pi's H.264 encoder.

picamera2 (and the libcamera bindings under it) exist only on Raspberry Pi
OS, so this module imports them lazily, in :class:`PiCamera`'s constructor:
importing :mod:`hardware` works anywhere, and a missing install is a clear
:class:`~hardware.errors.CameraUnavailable` at configuration time.

The encoder is chosen once, as picamera2 itself does
(``picamera2/encoders/__init__.py``): the VideoCore hardware encoder
(``H264Encoder``, V4L2) where the platform has one (Pi 4 and earlier), the
libav software encoder (``LibavH264Encoder``, libx264) on the Pi 5, which has
none. Both repeat SPS/PPS before every keyframe and put one keyframe every
``keyframe_interval_s``.

Encoded frames reach us through our own picamera2 ``Output`` (its whole
interface is ``outputframe(frame, keyframe, timestamp, packet, audio)``),
called on picamera2's encoder thread: :class:`FrameBridge` copies the frame,
timestamps it and hands it to the loop with ``call_soon_threadsafe``, nothing
else. Not ``CircularOutput``: that is a delay line, and the agent keeps its
own pre-roll.

Threads: one lifecycle thread per camera (``"pi-camera:<id>"``) opens,
configures and starts the camera, then waits for :meth:`PiCamera.aclose` and
stops and closes it, so the blocking picamera2 calls never run on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from hardware._bridge import ThreadedSource
from hardware._clock import ArrivalClock
from hardware._h264 import parameter_sets
from hardware._settings import check_encoding
from hardware.camera import EncodedPacket, StreamInfo
from hardware.errors import CameraConfigError, CameraConnectionError, CameraUnavailable

__all__ = ["INSTALL_HINT", "FrameBridge", "PiCamera"]

#: How to get picamera2, for error messages.
INSTALL_HINT = (
    "install the 'pi' extra on Raspberry Pi OS: sudo apt install python3-picamera2, "
    "a venv made with --system-site-packages, then pip install 'breakglass[pi]'"
)

Emit = Callable[[EncodedPacket, StreamInfo | None], None]


class FrameBridge:
    """The body of our picamera2 ``Output``: one encoded frame in, one packet to the loop.

    ``emit(packet, info)`` must be thread-safe (it posts to the loop).
    ``origin_us()`` gives the sensor timestamp (µs) of the encoder's first
    frame, since picamera2 passes each frame's ``timestamp`` relative to it.
    Frames before the first keyframe are dropped (they would not decode);
    audio packets are ignored. Cooperative: mixed in before picamera2's
    ``Output``, ``super().__init__()`` initialises that.
    """

    def __init__(
        self,
        camera_id: str,
        emit: Emit,
        *,
        size: tuple[int, int],
        fps: float,
        origin_us: Callable[[], int | None],
    ) -> None:
        super().__init__()
        self._camera_id, self._emit_packet = camera_id, emit
        self._size, self._fps, self._origin_us = size, fps, origin_us
        self._clock = ArrivalClock()
        self._joined = False
        self._sent_sets = b""

    def outputframe(
        self,
        frame: Any,
        keyframe: bool = True,
        timestamp: int | None = None,
        packet: Any = None,
        audio: bool = False,
    ) -> None:
        """picamera2's ``Output`` hook, on the encoder's thread: hand the frame over."""
        if audio or frame is None:
            return
        wall, mono = time.time_ns(), time.monotonic_ns()
        if not (self._joined or keyframe):
            return
        self._joined = True
        # The hardware encoder passes a view of a buffer it reuses as soon as we return.
        payload = bytes(frame)
        source_ts = None
        if timestamp is not None:
            source_ts = (timestamp + (self._origin_us() or 0)) * 1000
        info = None
        if keyframe and (sets := parameter_sets(payload)) != self._sent_sets:
            self._sent_sets = sets
            info = StreamInfo("h264", *self._size, self._fps, sets)
        capture = self._clock.capture_ns(source_ts, wall, mono)
        self._emit_packet(
            EncodedPacket(self._camera_id, -1, capture, mono, keyframe, "h264", payload, source_ts),
            info,
        )


@dataclass(frozen=True, slots=True)
class _Api:
    """The picamera2 pieces we use, imported once."""

    picamera2: ModuleType
    encoder: type[Any]
    encoder_name: str
    output: type[Any]


@functools.cache
def _load_api() -> _Api:
    picamera2 = importlib.import_module("picamera2")
    outputs = importlib.import_module("picamera2.outputs")
    platform = importlib.import_module("picamera2.platform")
    if platform.get_platform() == platform.Platform.VC4:
        encoder = importlib.import_module("picamera2.encoders.h264_encoder").H264Encoder
    else:  # Pi 5: no hardware H.264 encoder
        encoder = importlib.import_module("picamera2.encoders").LibavH264Encoder
    output = type("BreakglassOutput", (FrameBridge, outputs.Output), {})
    return _Api(picamera2, encoder, encoder.__name__, output)


class PiCamera(ThreadedSource):
    """A :class:`~hardware.camera.CameraSource` for a Raspberry Pi camera module.

    ``width`` x ``height`` at ``fps``, H.264 at ``bitrate`` bit/s with an IDR
    every ``keyframe_interval_s``; ``camera_num`` picks the camera on a Pi
    with several. Raises :class:`~hardware.errors.CameraUnavailable` (an
    ``ImportError``) when picamera2 or libcamera is not installed; a camera
    that is absent or busy fails :meth:`packets` with
    :class:`~hardware.errors.CameraConnectionError`. :meth:`force_keyframe`
    asks the encoder for an IDR (picamera2 0.3.32 and later; ``False``
    before).
    """

    _kind = "pi"

    def __init__(
        self,
        camera_id: str,
        *,
        width: int = 1280,
        height: int = 720,
        fps: float = 30.0,
        bitrate: int = 4_000_000,
        keyframe_interval_s: float = 1.0,
        camera_num: int = 0,
        max_buffered_s: float = 2.0,
    ) -> None:
        check_encoding(
            f"pi camera {camera_id!r}",
            width=width,
            height=height,
            fps=fps,
            keyframe_interval_s=keyframe_interval_s,
            bitrate=bitrate,
            max_buffered_s=max_buffered_s,
        )
        if camera_num < 0:
            raise CameraConfigError(f"pi camera {camera_id!r}: camera_num must be >= 0")
        try:
            self._api = _load_api()
        except Exception as exc:  # x86: no libcamera (ImportError); numpy 2 vs apt: ValueError
            # Whatever picamera2's import raises, it is this camera's fault, not the agent's.
            raise CameraUnavailable(
                f"pi camera {camera_id!r}: picamera2 is not usable here ({exc}); {INSTALL_HINT}"
            ) from exc
        super().__init__(camera_id, max_buffered_s=max_buffered_s)
        self._size, self._fps, self._bitrate = (width, height), float(fps), bitrate
        self._initial_info = StreamInfo("h264", width, height, self._fps, b"")
        self._gop = max(1, round(fps * keyframe_interval_s))
        self._camera_num = camera_num
        self._encoder: Any = None

    @property
    def encoder_name(self) -> str:
        """``H264Encoder`` (the VideoCore hardware encoder) or ``LibavH264Encoder`` (Pi 5)."""
        return self._api.encoder_name

    def force_keyframe(self) -> bool:
        """Ask the encoder for an IDR (with SPS/PPS) as soon as possible; thread-safe.

        ``False`` if the camera is not recording yet or picamera2 predates
        ``force_key_frame()``.
        """
        request = getattr(self._encoder, "force_key_frame", None)
        if request is None:
            return False
        request()
        return True

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        api = self._api
        try:
            camera = api.picamera2.Picamera2(self._camera_num)
        except (IndexError, RuntimeError, OSError) as exc:  # no such camera, or it is busy
            error = CameraConnectionError(f"{self._describe()}: cannot open camera: {exc!r}")
            self._post(loop, self._queue.fail, error)
            return
        try:
            config = camera.create_video_configuration(
                main={"size": self._size, "format": "YUV420"}, controls={"FrameRate": self._fps}
            )
            camera.configure(config)
            encoder = api.encoder(
                bitrate=self._bitrate, repeat=True, iperiod=self._gop, framerate=self._fps
            )
            output = api.output(
                self._id,
                functools.partial(self._emit, loop),
                size=self._size,
                fps=self._fps,
                origin_us=lambda: encoder.firsttimestamp,
            )
            camera.start_recording(encoder, output)
            self._encoder = encoder
            try:
                self._stop.wait()
            finally:
                self._encoder = None
                camera.stop_recording()
        finally:
            camera.close()
