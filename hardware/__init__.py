"""Devices: camera sources, the panic button and status indicators.

Knows nothing of policy or network. Hardware enters as a parameter
(a gpiozero pin factory, a camera URL), never as a global.

Camera sources: :class:`SyntheticCamera` (a test pattern), :class:`FileCamera`
(a video file, replayed), :class:`RtspCamera` (an IP camera) and
:class:`PiCamera` (the Pi camera module; picamera2 is imported only when one
is constructed).
"""

from hardware.av_source import FileCamera
from hardware.button import Debouncer, PanicButton, PressEvent, loop_callback
from hardware.camera import CameraSource, Codec, EncodedPacket, StreamInfo
from hardware.errors import (
    ButtonError,
    CameraConfigError,
    CameraConnectionError,
    CameraError,
    CameraStreamError,
    CameraTimeout,
    CameraUnavailable,
    EncoderUnavailable,
    HardwareError,
    LedError,
)
from hardware.led import PATTERNS, LedPattern, LedTiming, StatusLed
from hardware.picamera import PiCamera
from hardware.rtsp import RtspCamera, redact_url
from hardware.synthetic import SyntheticCamera

__all__ = [
    "PATTERNS",
    "ButtonError",
    "CameraConfigError",
    "CameraConnectionError",
    "CameraError",
    "CameraSource",
    "CameraStreamError",
    "CameraTimeout",
    "CameraUnavailable",
    "Codec",
    "Debouncer",
    "EncodedPacket",
    "EncoderUnavailable",
    "FileCamera",
    "HardwareError",
    "LedError",
    "LedPattern",
    "LedTiming",
    "PanicButton",
    "PiCamera",
    "PressEvent",
    "RtspCamera",
    "StatusLed",
    "StreamInfo",
    "SyntheticCamera",
    "loop_callback",
    "redact_url",
]
