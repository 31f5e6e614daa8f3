"""Small pure helpers over Annex-B H.264 bytes: NAL units and parameter sets.

No decoding: only start codes and NAL unit headers, which is all a camera
source needs to hand over self-contained access units (a keyframe must carry
its SPS and PPS so that a receiver can join there). The receiver has its own
copy of the few it needs (``receiver/h264.py``): ``hardware`` imports no other
package of the project.
"""

from __future__ import annotations

__all__ = [
    "NAL_AUD",
    "NAL_IDR",
    "NAL_PPS",
    "NAL_SPS",
    "nal_types",
    "parameter_sets",
    "split_nal_units",
    "valid_annex_b",
    "with_parameter_sets",
]

NAL_IDR = 5
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9

_START = b"\x00\x00\x01"
_START4 = b"\x00\x00\x00\x01"


def split_nal_units(data: bytes) -> list[bytes]:
    """The NAL units of Annex-B bytes, without start codes (3- or 4-byte)."""
    units: list[bytes] = []
    pos = data.find(_START)
    while pos >= 0:
        begin = pos + 3
        nxt = data.find(_START, begin)
        # A four-byte start code leaves its leading zero on the previous unit.
        unit = data[begin:nxt].rstrip(b"\x00") if nxt >= 0 else data[begin:]
        if unit:
            units.append(unit)
        pos = nxt
    return units


def nal_types(data: bytes) -> list[int]:
    """``nal_unit_type`` of every NAL unit of Annex-B bytes, in order."""
    return [unit[0] & 0x1F for unit in split_nal_units(data)]


def valid_annex_b(data: bytes) -> bool:
    """Whether ``data`` starts with a start code and every NAL header is well formed.

    Catches garbage and length-prefixed (AVCC) payloads that slipped through;
    a well-formed header is no proof that the slice decodes.
    """
    if not (data.startswith(_START) or data.startswith(_START4)):
        return False
    units = split_nal_units(data)
    # forbidden_zero_bit must be 0; type 0 is unspecified and never sent by encoders.
    return bool(units) and all(u[0] & 0x80 == 0 and u[0] & 0x1F != 0 for u in units)


def parameter_sets(data: bytes) -> bytes:
    """The SPS and PPS units of Annex-B bytes, each once, behind four-byte start codes.

    Some cameras repeat them within one access unit (the encoder's and the
    RTP payloader's copies); a description needs each one once.
    """
    units = [u for u in split_nal_units(data) if u[0] & 0x1F in (NAL_SPS, NAL_PPS)]
    return b"".join(_START4 + unit for unit in dict.fromkeys(units))


def with_parameter_sets(access_unit: bytes, sets: bytes) -> bytes:
    """``access_unit`` with ``sets`` (Annex-B SPS+PPS) in front of its first slice.

    Placed after a leading access unit delimiter, which must stay first
    (H.264 7.4.1.2.3). Returns the unit unchanged if it already has an SPS.
    """
    units = split_nal_units(access_unit)
    if not sets or any(u[0] & 0x1F == NAL_SPS for u in units):
        return access_unit
    if units and units[0][0] & 0x1F == NAL_AUD:
        return _START4 + units[0] + sets + b"".join(_START4 + u for u in units[1:])
    return sets + access_unit
