"""Memory the agent hands back to the system between segments.

Every few seconds per camera the segment writer builds a segment's plaintext
and its sealed copy (a few MB each), then frees them. glibc's allocator takes
buffers that large from ``mmap`` at first, but after the first one is freed it
raises its threshold to that size, so the next ones come from the heap, where
freed memory stays in the process: on a Pi with eight cameras that is about
3 MiB of RSS held for nothing (``agent_rss_mb_8_cameras``: 80 -> 77 MiB over
the pre-roll). A fixed threshold (:func:`return_large_buffers`, as
``MALLOC_MMAP_THRESHOLD_`` would) keeps them on ``mmap``: each is returned the
moment it is freed. Smaller allocations (packets, Python objects) are not
affected; the cost is one ``mmap``/``munmap`` pair per large buffer.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Final

log = logging.getLogger(__name__)

#: mallopt's parameter number for the mmap threshold (glibc's malloc.h).
_M_MMAP_THRESHOLD: Final = -3
#: Buffers at least this large come from mmap and go back when freed.
THRESHOLD: Final = 128 * 1024


def return_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; whether it was set (False on a
    C library without ``mallopt``, such as musl, or off Linux: nothing changes)."""
    if sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
    return done
