"""Sealed segments for tests: real H.264 (tests/media.py) sealed with age, as an agent does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent import segment
from hardware import EncodedPacket
from receiver.h264 import NAL_PPS, NAL_SPS, nal_type, parameter_sets, split_nal_units
from tests.media import PacketList

__all__ = [
    "FRAME_US",
    "T0_US",
    "capture_us",
    "encoded",
    "seal",
    "store_segment",
    "without_parameter_sets",
]

T0_US = 1_767_000_000_000_000  # capture time of packet 0, UTC µs
FRAME_US = 33_333


def capture_us(i: int) -> int:
    """Capture time of the ``i``-th packet (30 fps)."""
    return T0_US + i * FRAME_US


def encoded(
    camera: str, packets: PacketList, first: int, last: int, first_seq: int
) -> list[EncodedPacket]:
    """Packets ``first..last`` as the agent's capture numbers them (seq = first_seq + i)."""
    return [
        EncodedPacket(
            camera,
            first_seq + i,
            capture_us(i) * 1000,
            i * FRAME_US * 1000,
            packets[i][1],
            "h264",
            packets[i][0],
        )
        for i in range(first, last + 1)
    ]


def seal(
    camera: str,
    packets: PacketList,
    first: int,
    last: int,
    recipients: Sequence[Any],
    *,
    first_seq: int = 0,
    boot_id: str = "boot-1",
    size: tuple[int, int] = (320, 240),
    extradata_from: int = 0,
    in_band: bool = True,
    run: str | None = None,
) -> tuple[segment.SegmentHeader, bytes]:
    """A sealed segment of packets ``first..last`` (header, file bytes).

    The stream's extradata is the SPS/PPS of packet ``extradata_from``. With
    ``in_band=False`` the payloads carry no SPS/PPS (only the extradata does), as
    from an RTSP camera that sends them out of band (``sprop-parameter-sets``).
    """
    extradata = parameter_sets(packets[extradata_from][0]).annex_b()
    stream = segment.StreamDesc("h264", size[0], size[1], 30.0, extradata)
    pkts = encoded(camera, packets, first, last, first_seq)
    if not in_band:
        pkts = [replace(p, payload=without_parameter_sets(p.payload)) for p in pkts]
    header, plaintext = segment.encode(pkts, stream, boot_id, run=run)
    return header, segment.seal(plaintext, recipients)


def without_parameter_sets(access_unit: bytes) -> bytes:
    """An Annex-B access unit without its SPS and PPS NAL units."""
    return b"".join(
        b"\x00\x00\x00\x01" + unit
        for unit in split_nal_units(access_unit)
        if nal_type(unit) not in (NAL_SPS, NAL_PPS)
    )


def store_segment(store: Path, header: segment.SegmentHeader, sealed: bytes) -> Path:
    """Write a sealed segment into an agent-style store: ``<store>/<camera>/<name>.age``."""
    name = segment.SegmentName(
        header.first_seq,
        header.last_seq,
        header.first.capture_ns // 1_000_000,
        header.last.capture_ns // 1_000_000,
        len(sealed),
    )
    path = store / header.camera / name.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sealed)
    return path
