"""Devices: camera sources, the panic button and status indicators.

Knows nothing of policy or network. Hardware enters as a parameter
(a gpiozero pin factory, a camera URL), never as a global.
"""

from hardware.button import Debouncer, PanicButton, PressEvent, loop_callback
from hardware.camera import CameraSource, Codec, EncodedPacket, StreamInfo
from hardware.errors import (
    ButtonError,
    CameraConfigError,
    CameraError,
    EncoderUnavailable,
    HardwareError,
    LedError,
)
from hardware.led import PATTERNS, LedPattern, LedTiming, StatusLed
from hardware.synthetic import SyntheticCamera

__all__ = [
    "PATTERNS",
    "ButtonError",
    "CameraConfigError",
    "CameraError",
    "CameraSource",
    "Codec",
    "Debouncer",
    "EncodedPacket",
    "EncoderUnavailable",
    "HardwareError",
    "LedError",
    "LedPattern",
    "LedTiming",
    "PanicButton",
    "PressEvent",
    "StatusLed",
    "StreamInfo",
    "SyntheticCamera",
    "loop_callback",
]
