"""Opening sealed segments (:mod:`agent.segment`) with an age identity, within a bound.

Used by the ingest (the backfill lane) and by the district export. Blocking:
call :func:`open_segment` through ``asyncio.to_thread``. It decrypts with
``pyrage.decrypt_io`` into a writer that refuses more than a segment's
plaintext limit, rather than ``pyrage.decrypt``: the latter holds the GIL for
the whole file (about 35 ms for 12 MiB here), so the event loop would stall
even from a worker thread, and it has no output limit. Through a Python
writer the loop gets the GIL back every switch interval.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any, Final

import pyrage

from agent import segment
from hardware import EncodedPacket
from receiver.errors import BadSegmentError, WrongIdentityError

__all__ = ["MAX_PLAINTEXT_BYTES", "MAX_SEALED_BYTES", "open_segment", "unseal_bounded"]

#: The largest plaintext a segment may have (what :func:`agent.segment.decode` accepts).
MAX_PLAINTEXT_BYTES: Final = segment.MAX_SEGMENT_BYTES + segment.MAX_HEADER_BYTES
_CHUNK: Final = 64 * 1024
#: age adds a header (a stanza per recipient, a MAC), a 16-byte nonce and a 16-byte tag per
#: 64 KiB chunk; 64 KiB of header is far more than any recipient list we write.
MAX_SEALED_BYTES: Final = (
    MAX_PLAINTEXT_BYTES + 16 * (MAX_PLAINTEXT_BYTES // _CHUNK + 1) + 16 + _CHUNK
)


class _TooLarge(Exception):
    pass


class _BoundedSink:
    """A write-only file that keeps at most ``limit`` bytes, then refuses."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._size += len(data)
        if self._size > self._limit:
            raise _TooLarge
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing to flush (``decrypt_io`` may call it)."""


def unseal_bounded(sealed: bytes, identities: Iterable[Any]) -> bytes:
    """The plaintext of a sealed segment; never decrypts more than :data:`MAX_PLAINTEXT_BYTES`.

    Raises :class:`WrongIdentityError` if none of ``identities`` (pyrage X25519
    identities) opens it, :class:`BadSegmentError` if it is not a well-formed age
    file or too large.
    """
    if len(sealed) > MAX_SEALED_BYTES:
        raise BadSegmentError(f"sealed segment of {len(sealed)} bytes is over the limit")
    sink = _BoundedSink(MAX_PLAINTEXT_BYTES)
    try:
        pyrage.decrypt_io(io.BytesIO(sealed), sink, list(identities))
    except _TooLarge:
        raise BadSegmentError(
            f"sealed segment holds more than {MAX_PLAINTEXT_BYTES} bytes"
        ) from None
    except pyrage.DecryptError as exc:
        if "no matching keys" in str(exc).lower():
            raise WrongIdentityError("not sealed to this identity (no matching key)") from exc
        raise BadSegmentError(f"not a valid age file: {exc}") from exc
    except OSError as exc:  # pyrage reports a damaged payload as an I/O error
        raise BadSegmentError(f"age payload damaged: {exc}") from exc
    return b"".join(sink.parts)


def open_segment(
    sealed: bytes, identities: Iterable[Any]
) -> tuple[segment.SegmentHeader, list[EncodedPacket]]:
    """Header and packets of a sealed segment (see :func:`unseal_bounded`)."""
    plaintext = unseal_bounded(sealed, identities)
    try:
        return segment.decode(plaintext)
    except segment.SegmentError as exc:
        raise BadSegmentError(str(exc)) from exc
