"""A camera source that replays a pre-encoded H.264 stream in real time.

:class:`ReplayCamera` implements :class:`hardware.CameraSource`: it yields the
access units of an Annex-B file in a loop, paced at ``fps`` on the monotonic
clock, with fresh ``capture_ns``/``mono_ns`` and the file's keyframe flags.
The file is split into access units once (PyAV's raw H.264 demuxer, which
runs FFmpeg's parser) and kept in memory, so replaying costs no encoding and
no parsing: what remains is what the agent itself does with the packets.

No thread: the pacing is an ``asyncio.sleep`` until each frame is due, which
is fine for a source that only needs to be on time, not to synchronise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import av

from hardware import EncodedPacket, StreamInfo
from receiver.h264 import parameter_sets

__all__ = ["AccessUnits", "ReplayCamera", "load_access_units"]


@dataclass(frozen=True, slots=True)
class AccessUnits:
    """The access units of one H.264 stream, in decode order, and its description."""

    units: tuple[tuple[bytes, bool], ...]  # (Annex-B access unit, keyframe)
    width: int
    height: int
    extradata: bytes  # SPS and PPS of the first keyframe, behind four-byte start codes

    @property
    def keyframes(self) -> int:
        """How many access units are keyframes."""
        return sum(1 for _, key in self.units if key)

    @property
    def payload_bytes(self) -> int:
        """Total size of all access units."""
        return sum(len(unit) for unit, _ in self.units)


def load_access_units(path: Path) -> AccessUnits:
    """Split an Annex-B H.264 file into access units (blocking; call it once at start-up)."""
    units: list[tuple[bytes, bool]] = []
    with av.open(str(path), format="h264") as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        for packet in container.demux(stream):
            if packet.size:
                units.append((bytes(packet), bool(packet.is_keyframe)))
    if not units or not units[0][1]:
        raise ValueError(f"{path}: no access units, or the first is not a keyframe")
    extradata = parameter_sets(units[0][0]).annex_b()
    if not extradata:
        raise ValueError(f"{path}: the first keyframe carries no SPS/PPS")
    return AccessUnits(tuple(units), width, height, extradata)


class ReplayCamera:
    """A :class:`hardware.CameraSource` replaying :class:`AccessUnits` in real time, looping."""

    def __init__(self, camera_id: str, stream: AccessUnits, fps: float = 30.0) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self._id = camera_id
        self._stream = stream
        self._fps = fps
        self._info = StreamInfo("h264", stream.width, stream.height, fps, stream.extradata)
        self._closed = False
        #: Frames not sent because the loop was more than a second late (a real camera drops).
        self.frames_skipped = 0

    @property
    def camera_id(self) -> str:
        """The camera id, as given."""
        return self._id

    @property
    def info(self) -> StreamInfo:
        """Codec, size, rate and the SPS/PPS of the stream's first keyframe."""
        return self._info

    async def packets(self) -> AsyncGenerator[EncodedPacket, None]:
        """Yield the access units in a loop, each when it is due, until :meth:`aclose`."""
        units = self._stream.units
        period_ns = round(1e9 / self._fps)
        start = time.monotonic_ns()
        index = 0
        while not self._closed:
            due = start + index * period_ns
            now = time.monotonic_ns()
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
                if self._closed:
                    return
            elif now - due > 1_000_000_000:
                # More than a second late (a stalled loop): skip to a keyframe that is due
                # now, as a camera would, rather than burst the backlog.
                skipped = (now - due) // period_ns
                while not units[(index + skipped) % len(units)][1]:
                    skipped += 1
                self.frames_skipped += skipped
                index += skipped
                start = now - index * period_ns
            payload, keyframe = units[index % len(units)]
            yield EncodedPacket(
                self._id, -1, time.time_ns(), time.monotonic_ns(), keyframe, "h264", payload
            )
            index += 1

    async def aclose(self) -> None:
        """Stop yielding."""
        self._closed = True
