"""Devices: camera sources, the panic button and status indicators.

Knows nothing of policy or network. Hardware enters as a parameter
(a gpiozero pin factory, a camera URL), never as a global.

Camera sources: :class:`SyntheticCamera` (a test pattern), :class:`FileCamera`
(a video file, replayed), :class:`RtspCamera` (an IP camera) and
:class:`PiCamera` (the Pi camera module; picamera2 is imported only when one
is constructed).

The camera sources load their heavy libraries (PyAV, numpy) with them, so
they are imported on first use (PEP 562): an agent whose cameras are all Pi
cameras never maps PyAV or numpy (about 28 MiB resident), and one without a
synthetic camera never loads numpy (about 11 MiB).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from hardware.av_source import FileCamera
    from hardware.picamera import PiCamera
    from hardware.rtsp import RtspCamera, redact_url
    from hardware.synthetic import SyntheticCamera

#: Names imported on first use, and the module that defines each.
_LAZY = {
    "FileCamera": "hardware.av_source",
    "PiCamera": "hardware.picamera",
    "RtspCamera": "hardware.rtsp",
    "redact_url": "hardware.rtsp",
    "SyntheticCamera": "hardware.synthetic",
}


def __getattr__(name: str) -> Any:
    """Import a camera source (and its libraries) the first time it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
