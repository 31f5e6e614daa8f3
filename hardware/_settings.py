"""Checks of the settings every encoding camera shares (size, rate, GOP, bitrate, buffer)."""

from __future__ import annotations

from hardware.errors import CameraConfigError

__all__ = ["check_encoding"]


def check_encoding(
    where: str,
    *,
    width: int,
    height: int,
    fps: float,
    keyframe_interval_s: float,
    bitrate: int | None,
    max_buffered_s: float,
) -> None:
    """Raise :class:`CameraConfigError` naming ``where`` and the first bad setting."""
    problem = None
    if width < 16 or height < 16 or width % 2 or height % 2:
        problem = f"width and height must be even and >= 16, got {width}x{height}"
    elif not 0 < fps <= 240:
        problem = f"fps must be in (0, 240], got {fps}"
    elif keyframe_interval_s <= 0:
        problem = f"keyframe_interval_s must be > 0, got {keyframe_interval_s}"
    elif bitrate is not None and bitrate <= 0:
        problem = f"bitrate must be a positive number of bit/s, got {bitrate}"
    elif max_buffered_s <= 0:
        problem = f"max_buffered_s must be > 0, got {max_buffered_s}"
    if problem is not None:
        raise CameraConfigError(f"{where}: {problem}")
