"""Small pure helpers over H.264 byte streams (Annex-B and avcC).

No decoding: only start codes, NAL unit headers and the first bytes of the
sequence parameter set (SPS), which is all the receiver needs to name a
stream's codec for Media Source Extensions and to build muxer templates.
"""

from __future__ import annotations

from dataclasses import dataclass

from receiver.errors import MissingSpsError

__all__ = [
    "NAL_IDR",
    "NAL_PPS",
    "NAL_SPS",
    "ParameterSets",
    "annex_b_from_avcc",
    "has_sps",
    "leading_parameter_sets",
    "mse_codec_string",
    "nal_type",
    "parameter_sets",
    "split_nal_units",
]

#: NAL unit type of an IDR (keyframe) slice.
NAL_IDR = 5
#: NAL unit type of a sequence parameter set.
NAL_SPS = 7
#: NAL unit type of a picture parameter set.
NAL_PPS = 8

_START = b"\x00\x00\x01"


def split_nal_units(data: bytes) -> list[bytes]:
    """Split an Annex-B byte stream into NAL units, without their start codes.

    Accepts 3- and 4-byte start codes; bytes before the first start code and
    trailing zero bytes of each unit are dropped. Returns ``[]`` when there is
    no start code.
    """
    units: list[bytes] = []
    pos = data.find(_START)
    while pos != -1:
        begin = pos + 3
        nxt = data.find(_START, begin)
        end = len(data) if nxt == -1 else nxt
        unit = data[begin:end].rstrip(b"\x00")
        if unit:
            units.append(unit)
        pos = nxt
    return units


def nal_type(unit: bytes) -> int:
    """The ``nal_unit_type`` (low five bits of the header byte) of a NAL unit."""
    if not unit:
        raise ValueError("empty NAL unit")
    return unit[0] & 0x1F


@dataclass(frozen=True, slots=True)
class ParameterSets:
    """The first SPS and PPS found in some H.264 bytes (``None`` if absent)."""

    sps: bytes | None
    pps: bytes | None

    def annex_b(self) -> bytes:
        """The present parameter sets as Annex-B bytes (4-byte start codes)."""
        return b"".join(b"\x00\x00\x00\x01" + u for u in (self.sps, self.pps) if u)


def _is_avcc(data: bytes) -> bool:
    # An avcC record starts with configurationVersion 1; Annex-B starts with 0x00.
    return len(data) >= 7 and data[0] == 1


def annex_b_from_avcc(record: bytes) -> bytes:
    """Convert an avcC decoder configuration record to Annex-B SPS/PPS units."""
    if not _is_avcc(record):
        raise MissingSpsError("not an avcC record (configurationVersion must be 1)")
    out = bytearray()
    pos = 5
    try:
        for mask in (0x1F, 0xFF):  # SPS count is 5 bits, PPS count a full byte
            count = record[pos] & mask
            pos += 1
            for _ in range(count):
                size = int.from_bytes(record[pos : pos + 2], "big")
                unit = record[pos + 2 : pos + 2 + size]
                if len(unit) != size:
                    raise MissingSpsError("truncated avcC record")
                out += b"\x00\x00\x00\x01" + unit
                pos += 2 + size
    except IndexError:
        raise MissingSpsError("truncated avcC record") from None
    return bytes(out)


def parameter_sets(data: bytes) -> ParameterSets:
    """Find the first SPS and PPS in Annex-B bytes or an avcC record."""
    if _is_avcc(data):
        data = annex_b_from_avcc(data)
    sps: bytes | None = None
    pps: bytes | None = None
    for unit in split_nal_units(data):
        kind = unit[0] & 0x1F
        if kind == NAL_SPS and sps is None:
            sps = unit
        elif kind == NAL_PPS and pps is None:
            pps = unit
    return ParameterSets(sps, pps)


def leading_parameter_sets(data: bytes) -> ParameterSets:
    """The SPS and PPS in front of an Annex-B access unit's first slice (where encoders
    put them), found without reading on into the slices: cheap enough for every keyframe."""
    sps: bytes | None = None
    pps: bytes | None = None
    end = len(data)
    pos = data.find(_START)
    while pos != -1 and pos + 3 < end:
        begin = pos + 3
        kind = data[begin] & 0x1F
        if 1 <= kind <= 5:  # a slice: the parameter sets are behind
            break
        pos = data.find(_START, begin)
        unit = data[begin : end if pos == -1 else pos].rstrip(b"\x00")
        if kind == NAL_SPS and sps is None:
            sps = unit
        elif kind == NAL_PPS and pps is None:
            pps = unit
    return ParameterSets(sps, pps)


def has_sps(data: bytes) -> bool:
    """Whether the bytes (Annex-B or avcC) contain a sequence parameter set."""
    try:
        return parameter_sets(data).sps is not None
    except MissingSpsError:
        return False


def _rbsp_prefix(unit: bytes, n: int) -> bytes:
    """The first ``n`` bytes of a NAL unit with emulation-prevention bytes removed."""
    out = bytearray()
    zeros = 0
    for byte in unit:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
        if len(out) == n:
            break
    return bytes(out)


def mse_codec_string(extradata_or_keyframe: bytes) -> str:
    """The RFC 6381 codec string (``avc1.PPCCLL``) for Media Source Extensions.

    Takes codec extradata (Annex-B SPS/PPS or an avcC record) or a keyframe
    access unit with in-band SPS, and reads profile_idc, the constraint-flag
    byte and level_idc from the SPS. Raises :class:`MissingSpsError` (a
    ``ValueError``) when there is no usable SPS.
    """
    try:
        sps = parameter_sets(extradata_or_keyframe).sps
    except MissingSpsError as exc:
        raise MissingSpsError(f"no H.264 SPS found: {exc}") from None
    if sps is None:
        raise MissingSpsError(
            f"no H.264 SPS found in {len(extradata_or_keyframe)} bytes "
            "(expected Annex-B with start codes or an avcC record)"
        )
    head = _rbsp_prefix(sps, 4)
    if len(head) < 4:
        raise MissingSpsError(f"H.264 SPS too short ({len(sps)} bytes)")
    return f"avc1.{head[1]:02x}{head[2]:02x}{head[3]:02x}"
