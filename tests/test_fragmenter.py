"""The part file's fragments are FFmpeg's, byte for byte.

:class:`receiver.fragmenter.Fragmenter` replaced PyAV's mov muxer on the
receiver's hot path; FFmpeg (through PyAV, with the options the receiver
used) is the oracle: the same frames and timestamps must give the same file,
the ``mfra`` at its end included. ffprobe reads the result.
"""

from __future__ import annotations

import itertools
import random
from io import BytesIO
from pathlib import Path

import av
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.fragmenter import Fragmenter, avcc_from_annex_b
from receiver.run import MUX_OPTIONS, TIME_BASE, init_segment
from tests.media import PacketList, ffprobe_packets, make_h264_packets

CREATED_US = 1_795_000_000_000_000
TITLE = "cam1 from seq 0"


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)


def ffmpeg_file(packets: PacketList, dts: list[int], durations: list[int]) -> bytes:
    """What FFmpeg's mov muxer writes for these frames, as the receiver used to call it."""
    sink = _Sink()
    with av.open(BytesIO(packets[0][0]), format="h264") as src:
        out = av.open(sink, "w", format="mp4", options=MUX_OPTIONS)
        stream = out.add_stream_from_template(src.streams.video[0])
    stream.time_base = TIME_BASE
    out.metadata["creation_time"] = init_creation_time()
    stream.metadata["title"] = TITLE
    for (payload, key), t, d in zip(packets, dts, durations, strict=True):
        packet = av.Packet(payload)
        packet.stream = stream
        packet.time_base = TIME_BASE
        packet.pts = packet.dts = t
        packet.duration = d
        packet.is_keyframe = key
        out.mux_one(packet)
    out.close()
    return bytes(sink.data)


def init_creation_time() -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(CREATED_US / 1e6, UTC).isoformat(timespec="microseconds")


def our_file(packets: PacketList, dts: list[int], durations: list[int]) -> bytes:
    init = init_segment(packets[0][0], CREATED_US, TITLE)
    frag = Fragmenter(len(init))
    out = bytearray(init)
    for (payload, key), t, d in zip(packets, dts, durations, strict=True):
        out += frag.add(t, d, key, payload) or b""
    last, mfra = frag.finish()
    out += (last or b"") + mfra
    return bytes(out)


def timing(n: int, rng: random.Random, jitter: int) -> tuple[list[int], list[int]]:
    """Decode times from 0 (the receiver's first pts) and the durations the receiver sets."""
    dts = [0]
    for _ in range(n - 1):
        dts.append(dts[-1] + max(1, 3000 + rng.randint(-jitter, jitter)))
    durations = [3000] + [b - a for a, b in itertools.pairwise(dts)]
    return dts, durations


@pytest.fixture(scope="module")
def packets() -> PacketList:
    return make_h264_packets(70, width=320, height=240, gop=30)


def test_the_same_file_as_ffmpeg(packets: PacketList, tmp_path: Path) -> None:
    dts, durations = timing(len(packets), random.Random(1), 0)
    ours = our_file(packets, dts, durations)
    assert ours == ffmpeg_file(packets, dts, durations)
    path = tmp_path / "part.mp4"
    path.write_bytes(ours)
    probed = ffprobe_packets(path)
    assert len(probed) == len(packets)
    assert [p["flags"].startswith("K") for p in probed] == [k for _, k in packets]


def test_jittered_clocks_and_a_single_frame(packets: PacketList) -> None:
    rng = random.Random(7)
    for n in (1, 2, 31, len(packets)):
        dts, durations = timing(n, rng, 2900)
        assert our_file(packets[:n], dts, durations) == ffmpeg_file(packets[:n], dts, durations)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    prefix=st.binary(max_size=6),
    zeros=st.integers(0, 3),
)
def test_odd_annex_b_is_converted_as_ffmpeg_does(
    packets: PacketList, data: st.DataObject, prefix: bytes, zeros: int
) -> None:
    # Three-byte start codes, bytes before the first start code, trailing zeros, an
    # empty unit between two start codes: what cameras send, converted as FFmpeg does.
    n = data.draw(st.integers(2, 6))
    odd: PacketList = []
    for k, (payload, key) in enumerate(packets[:n]):
        body = payload.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01") if k % 2 else payload
        if data.draw(st.booleans()):
            body = body[:4] + b"\x00\x00\x01" + body[4:] if k else body
        odd.append((prefix.replace(b"\x01", b"\x02") + body + b"\x00" * zeros, key))
    dts, durations = timing(n, random.Random(n), 100)
    assert our_file(odd, dts, durations) == ffmpeg_file(odd, dts, durations)


def test_avcc_units() -> None:
    data = b"\xaa\x00\x00\x00\x01\x67\x42\x00\x00\x00\x01\x68\xce\x00\x00\x00\x00\x01\x65\x88\x00"
    got = b"".join(bytes(u) for u in avcc_from_annex_b(data))
    assert got == (
        b"\x00\x00\x00\x02\x67\x42"
        + b"\x00\x00\x00\x03\x68\xce\x00"  # a unit keeps all but one zero before a start code
        + b"\x00\x00\x00\x03\x65\x88\x00"  # and its trailing zeros at the end
    )
    assert avcc_from_annex_b(b"no start code") == []
