"""The hardware a configuration names: camera sources and the gpiozero pin factory.

Each source's module is imported when a camera needs it, and a camera that cannot
be opened never keeps the agent from arming (:func:`open_source`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.audit import AuditLog
from agent.capture import RetryingSource
from agent.config import CameraConfig
from hardware import CameraError, CameraSource, StreamInfo

log = logging.getLogger(__name__)


def make_source(camera: CameraConfig) -> CameraSource:
    """The camera source a config entry describes.

    Each source's module is imported here, when a camera needs it: PyAV (RTSP,
    file, synthetic), numpy (synthetic) and picamera2 are loaded only by an
    agent that has such a camera.
    """
    if camera.source == "rtsp":
        from hardware.rtsp import RtspCamera

        assert camera.url is not None  # the config requires it
        return RtspCamera(camera.id, camera.url)
    if camera.source == "file":
        from hardware.av_source import FileCamera

        assert camera.path is not None
        return FileCamera(camera.id, camera.path)
    if camera.source == "picamera":
        from hardware.picamera import PiCamera

        return PiCamera(
            camera.id,
            width=camera.width,
            height=camera.height,
            fps=camera.fps,
            keyframe_interval_s=camera.keyframe_interval_s,
        )
    from hardware.synthetic import SyntheticCamera

    return SyntheticCamera(
        camera.id,
        width=camera.width,
        height=camera.height,
        fps=camera.fps,
        keyframe_interval_s=camera.keyframe_interval_s,
    )


def open_source(
    camera: CameraConfig, factory: Callable[[CameraConfig], CameraSource], audit: AuditLog
) -> CameraSource:
    """``factory(camera)``, or where that fails a source that tries again each time the
    capture task (re)starts it; the failure is logged and audited."""
    try:
        return factory(camera)
    except CameraError as exc:  # a broken camera never keeps the agent from arming
        log.error("camera %s: %s", camera.id, exc)
        audit.record_soon("camera_fault", camera=camera.id, error=str(exc)[:300])
        info = StreamInfo("h264", camera.width, camera.height, camera.fps, b"")
        return RetryingSource(camera.id, lambda: factory(camera), exc, info)


def make_pin_factory(name: str | None) -> Any:
    """The gpiozero pin factory named in config (``None``: gpiozero's own choice)."""
    if name is None:
        return None
    if name == "mock":
        from gpiozero.pins.mock import MockFactory

        return MockFactory()
    if name == "lgpio":
        from gpiozero.pins.lgpio import LGPIOFactory

        return LGPIOFactory()
    if name == "rpigpio":
        from gpiozero.pins.rpigpio import RPiGPIOFactory

        return RPiGPIOFactory()
    if name == "pigpio":
        from gpiozero.pins.pigpio import PiGPIOFactory

        return PiGPIOFactory()
    from gpiozero.pins.native import NativeFactory

    return NativeFactory()
