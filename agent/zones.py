"""Camera zones, enforced in one place.

An ``interior`` camera is streamed only inside an ACTIVE emergency session
that names it; ``exterior`` cameras likewise (a per-building policy to share
exterior cameras continuously comes with the emergency policy work). Every
decision about what may leave the building goes through
:func:`cameras_to_stream`; nothing else in the agent chooses cameras.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.config import CameraConfig
from agent.emergency import Session


def cameras_to_stream(
    cameras: Sequence[CameraConfig], session: Session | None
) -> tuple[CameraConfig, ...]:
    """The cameras that may be sent to the receiver right now."""
    if session is None or session.ended_at is not None:
        return ()
    named = set(session.cameras)
    return tuple(c for c in cameras if c.id in named)
