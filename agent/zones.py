"""Camera zones, enforced in one place.

An ``interior`` camera is streamed only inside an ACTIVE emergency session
that names it. ``exterior`` cameras likewise, and, where the building's
policy says so (``[building] share_exterior``), continuously in a share
session, which can never carry an interior camera. Every decision about what
may leave the building goes through :func:`cameras_to_stream`; nothing else in
the agent chooses cameras.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.config import CameraConfig
from agent.emergency import Session


def is_share(session: Session) -> bool:
    """Whether ``session`` is a continuous exterior share rather than an emergency."""
    return session.started_by.get("kind") == "share"


def cameras_to_stream(
    cameras: Sequence[CameraConfig], session: Session | None
) -> tuple[CameraConfig, ...]:
    """The cameras that may be sent to the receiver in ``session`` right now."""
    if session is None or session.ended_at is not None:
        return ()
    named = set(session.cameras)
    share = is_share(session)
    return tuple(c for c in cameras if c.id in named and (c.zone == "exterior" or not share))


def cameras_to_share(cameras: Sequence[CameraConfig], *, share_exterior: bool) -> tuple[str, ...]:
    """The cameras a building shares outside emergencies: its exterior ones, if it chose to."""
    return tuple(c.id for c in cameras if share_exterior and c.zone == "exterior")
