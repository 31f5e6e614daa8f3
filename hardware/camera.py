"""The camera-source interface: every camera yields already-encoded packets.

A camera source is an async iterable of :class:`EncodedPacket`. Sources never
decode or re-encode on behalf of the agent; they hand over access units as the
encoder (or the IP camera) produced them. Sequence numbers are assigned by the
agent's capture fan-out, not by the source, so that they stay gapless per
camera and can continue across restarts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Codec = Literal["h264", "mjpeg"]


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What a receiver needs to set up a decoder for one camera's stream."""

    codec: Codec
    width: int
    height: int
    fps: float
    #: Codec extradata (for H.264 in Annex-B: SPS and PPS NAL units with start codes).
    extradata: bytes


@dataclass(frozen=True, slots=True)
class EncodedPacket:
    """One encoded access unit of one camera (DESIGN.md ``EncodedPacket``).

    ``seq`` is per camera and gapless; a source yields packets with ``seq=-1``
    and the capture fan-out numbers them. ``capture_ns`` is UTC wall-clock
    nanoseconds at capture; ``mono_ns`` is ``time.monotonic_ns()`` at capture
    (used for latency figures and ordering, never sent as wall time).
    """

    camera: str
    seq: int
    capture_ns: int
    mono_ns: int
    keyframe: bool
    codec: Codec
    payload: bytes
    #: The source's own presentation timestamp in nanoseconds (an RTSP camera's RTP
    #: clock, a file's pts, the Pi sensor timestamp), ``None`` when it has none. Kept in
    #: segment anchors so footage can be matched to the camera's own clock.
    source_ts_ns: int | None = None

    def numbered(self, seq: int) -> EncodedPacket:
        """The same packet with its per-camera sequence number assigned."""
        return EncodedPacket(
            self.camera,
            seq,
            self.capture_ns,
            self.mono_ns,
            self.keyframe,
            self.codec,
            self.payload,
            self.source_ts_ns,
        )


@runtime_checkable
class CameraSource(Protocol):
    """A camera: its stream description and an async stream of packets.

    ``packets()`` yields until the source is closed or the iterating task is
    cancelled. It must never block the event loop: encoding and device I/O
    happen on worker threads, handed back with ``loop.call_soon_threadsafe``.
    ``info`` is valid once the first packet was yielded (IP cameras learn
    their SPS/PPS only then).
    """

    @property
    def camera_id(self) -> str: ...

    @property
    def info(self) -> StreamInfo: ...

    def packets(self) -> AsyncIterator[EncodedPacket]: ...

    async def aclose(self) -> None: ...
