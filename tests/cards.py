"""A card that fails as a full one does, for the trail's real writes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from agent.audit import AuditLog


@contextlib.contextmanager
def full_card(audit: AuditLog) -> Iterator[None]:
    """The trail's file descriptor made to fail as a full card does (``/dev/full``: every
    write ENOSPC), then put back."""
    saved = os.dup(audit._fd)
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, audit._fd)
        yield
    finally:
        os.dup2(saved, audit._fd)
        os.close(saved)
        os.close(full)
