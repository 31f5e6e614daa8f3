"""Errors raised by the hardware layer.

Every error names the device it is about (camera id, pin) so that a log line
or an audit entry says whose fault it is. Subclasses also inherit the matching
built-in, in the manner of ``gpiozero.exc`` (``GPIOPinMissing(GPIODeviceError,
ValueError)``), so callers that only know the built-ins still catch them.
"""

from __future__ import annotations

__all__ = [
    "ButtonError",
    "CameraConfigError",
    "CameraConnectionError",
    "CameraError",
    "CameraStreamError",
    "CameraTimeout",
    "CameraUnavailable",
    "EncoderUnavailable",
    "HardwareError",
    "LedError",
]


class HardwareError(Exception):
    """Base class of every error raised by :mod:`hardware`."""


class CameraError(HardwareError):
    """A camera source failed or was used wrongly (the message names the camera)."""


class CameraConfigError(CameraError, ValueError):
    """A camera was set up with bad arguments (size, frame rate, bitrate ...)."""


class EncoderUnavailable(CameraError, RuntimeError):
    """The video encoder a camera needs is missing or refused to open.

    A property of the installation (the FFmpeg build inside PyAV), not of the
    arguments: fix the environment, not the call.
    """


class CameraUnavailable(CameraError, ImportError):
    """The library a camera source needs is not installed here (picamera2, libcamera).

    Like :class:`EncoderUnavailable`, a property of the installation: the
    message says what to install.
    """


class CameraConnectionError(CameraError, OSError):
    """The camera could not be reached, or the connection to it was lost.

    The camera's side of the fault (refused, unreachable, hung up, a Pi camera
    that is absent or busy); a source that reconnects by itself records it as
    its ``last_error`` and keeps trying.
    """


class CameraTimeout(CameraConnectionError, TimeoutError):
    """The camera did not answer, or stopped sending, within the configured timeout."""


class CameraStreamError(CameraError, ValueError):
    """The camera answered with something unusable: not H.264, garbage, no SPS/PPS."""


class ButtonError(HardwareError, ValueError):
    """A panic button could not be set up: a bad pin, a pin in use, bad timings."""


class LedError(HardwareError, ValueError):
    """A status LED could not be set up: a bad pin, a pin in use, an incomplete pattern table."""


class BuzzerError(HardwareError, ValueError):
    """The optional buzzer could not be set up: a bad pin or a pin in use."""
