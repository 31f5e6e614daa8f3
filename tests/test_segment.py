"""The sealed segment format: plaintext encoding, file names, age sealing (pyrage and the CLI)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pyrage
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import segment
from agent.segment import SegmentError, SegmentName, StreamDesc
from hardware import EncodedPacket
from provisioning.age_keys import new_identity, recipient_of
from tests.media import PacketList

STREAM = StreamDesc("h264", 320, 240, 30.0, b"\x00\x00\x00\x01\x67\x42\x00\x0d")
T0_NS = 1_767_000_000_000_000_000
FRAME_NS = 33_333_333
AGE = shutil.which("age") or "/usr/bin/age"


def numbered(
    packets: PacketList, camera: str = "hallway-2", first_seq: int = 0
) -> list[EncodedPacket]:
    """The test media as camera packets: consecutive seqs, frame-spaced capture times."""
    return [
        EncodedPacket(
            camera,
            first_seq + i,
            T0_NS + i * FRAME_NS,
            5_000_000_000 + i * FRAME_NS,
            key,
            "h264",
            payload,
            i * 3000 if i % 2 else None,
        )
        for i, (payload, key) in enumerate(packets)
    ]


def fields(pkt: EncodedPacket) -> tuple[object, ...]:
    """What a segment keeps of a packet (the monotonic clock only in the anchors)."""
    return (
        pkt.camera,
        pkt.seq,
        pkt.capture_ns,
        pkt.keyframe,
        pkt.codec,
        pkt.payload,
        pkt.source_ts_ns,
    )


def small_segment() -> bytes:
    pkts = [
        EncodedPacket("cam", 7 + i, T0_NS + i, i, i == 0, "h264", bytes([i]) * (i + 1), None)
        for i in range(3)
    ]
    return segment.encode(pkts, STREAM, "boot")[1]


# -- plaintext ---------------------------------------------------------------------------

records = st.lists(
    st.tuples(
        st.binary(max_size=600),
        st.booleans(),
        st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        st.integers(0, 10**12),
    ),
    min_size=1,
    max_size=12,
)


@given(records=records, first_seq=st.integers(0, 2**62), boot=st.text(max_size=20))
def test_encode_decode_round_trip(
    records: list[tuple[bytes, bool, int | None, int]], first_seq: int, boot: str
) -> None:
    pkts = []
    capture = T0_NS
    for i, (payload, key, ts, step) in enumerate(records):
        capture += step
        pkts.append(
            EncodedPacket("cam-1", first_seq + i, capture, 1000 + i, key, "h264", payload, ts)
        )
    header, plain = segment.encode(pkts, STREAM, boot)
    decoded_header, decoded = segment.decode(plain)
    assert decoded_header == header
    assert [fields(p) for p in decoded] == [fields(p) for p in pkts]
    assert (header.first_seq, header.last_seq, header.count) == (
        first_seq,
        first_seq + len(pkts) - 1,
        len(pkts),
    )
    assert header.first == segment.Anchor(pkts[0].capture_ns, 1000, pkts[0].source_ts_ns)
    assert header.last.mono_ns == 1000 + len(pkts) - 1
    assert (header.codec, header.width, header.extradata, header.boot_id) == (
        "h264",
        320,
        STREAM.extradata,
        boot,
    )


def test_real_h264_round_trip(packets: PacketList) -> None:
    pkts = numbered(packets[:30])
    header, plain = segment.encode(pkts, STREAM, "boot-1")
    assert plain.startswith(segment.MAGIC)
    _, decoded = segment.decode(plain)
    assert [fields(p) for p in decoded] == [fields(p) for p in pkts]
    assert header.first.mono_ns == pkts[0].mono_ns


def test_a_segment_names_the_agent_run_that_wrote_it(packets: PacketList) -> None:
    pkts = numbered(packets[:2])
    header, plain = segment.encode(pkts, STREAM, "boot-1", run="0123456789abcdef")
    assert segment.decode(plain)[0] == header and header.run == "0123456789abcdef"
    _, older = segment.encode(pkts, STREAM, "boot-1")  # from before the field: no run
    assert segment.decode(older)[0].run is None
    assert b'"run"' not in older


def test_encode_rejects_empty_gaps_and_mixed_cameras(packets: PacketList) -> None:
    pkts = numbered(packets[:4])
    with pytest.raises(SegmentError, match="at least one"):
        segment.encode([], STREAM, "b")
    with pytest.raises(SegmentError, match="consecutive"):
        segment.encode([pkts[0], pkts[2]], STREAM, "b")
    # Same count as the seq span, but not consecutive: 0, 0, 2.
    with pytest.raises(SegmentError, match="consecutive"):
        segment.encode([pkts[0], pkts[0], pkts[2]], STREAM, "b")
    other = numbered(packets[1:2], camera="front-door", first_seq=1)
    with pytest.raises(SegmentError, match="consecutive"):
        segment.encode([pkts[0], *other], STREAM, "b")


def test_decode_rejects_every_truncation() -> None:
    plain = small_segment()
    segment.decode(plain)
    for cut in range(len(plain)):
        with pytest.raises(SegmentError):
            segment.decode(plain[:cut])


def test_decode_rejects_bad_magic_and_oversize() -> None:
    plain = small_segment()
    with pytest.raises(SegmentError, match="magic"):
        segment.decode(b"BGSEG2\n" + plain[len(segment.MAGIC) :])
    with pytest.raises(SegmentError, match="limit"):
        segment.decode(plain + b"\0" * (segment.MAX_SEGMENT_BYTES + segment.MAX_HEADER_BYTES))
    head = b"{" * 10
    with pytest.raises(SegmentError, match="header length"):
        segment.decode(segment.MAGIC + struct.pack("<I", segment.MAX_HEADER_BYTES + 1) + head)


def _with_header(plain: bytes, change: dict[str, object]) -> bytes:
    pos = len(segment.MAGIC)
    (n,) = struct.unpack_from("<I", plain, pos)
    obj = json.loads(plain[pos + 4 : pos + 4 + n])
    obj.update(change)
    head = json.dumps(obj).encode()
    return segment.MAGIC + struct.pack("<I", len(head)) + head + plain[pos + 4 + n :]


def test_decode_rejects_non_consecutive_seqs() -> None:
    plain = small_segment()
    # The records say 7, 8, 9; a header that says the segment starts at 6 disagrees.
    with pytest.raises(SegmentError, match="out of order"):
        segment.decode(_with_header(plain, {"first_seq": 6}))
    # Swap the seq of the second record for 10 (a gap).
    pos = len(plain) - (segment.RECORD.size + 3) - (segment.RECORD.size + 2)
    assert struct.unpack_from("<Q", plain, pos)[0] == 8
    gap = plain[:pos] + struct.pack("<Q", 10) + plain[pos + 8 :]
    with pytest.raises(SegmentError, match="out of order"):
        segment.decode(gap)


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"codec": "hevc"},
        {"width": "wide"},
        {"width": float("inf")},
        {"anchors": []},
        {"extradata": "A"},
        {"count": 4},
    ],
)
def test_decode_rejects_bad_headers(change: dict[str, object]) -> None:
    with pytest.raises(SegmentError):
        segment.decode(_with_header(small_segment(), change))


def test_decode_rejects_deeply_nested_header() -> None:
    head = b"[" * 60_000
    with pytest.raises(SegmentError, match="malformed"):
        segment.decode(segment.MAGIC + struct.pack("<I", len(head)) + head)


# -- file names --------------------------------------------------------------------------


@given(
    seqs=st.tuples(st.integers(0, 10**19 - 1), st.integers(0, 10**19 - 1)).map(sorted),
    times=st.tuples(st.integers(0, 10**15 - 1), st.integers(0, 10**15 - 1)).map(sorted),
    size=st.integers(0, 10**12 - 1),
)
def test_name_round_trip(seqs: list[int], times: list[int], size: int) -> None:
    name = SegmentName(seqs[0], seqs[1], times[0], times[1], size)
    assert name.filename.endswith(segment.SUFFIX)
    assert SegmentName.parse(name.filename) == name


def test_name_is_zero_padded() -> None:
    name = SegmentName(1, 30, 1_767_000_000_000, 1_767_000_001_000, 5120)
    assert name.filename == "0000000000000001-0000000000000030-1767000000000-1767000001000-5120.age"


@pytest.mark.parametrize(
    "filename",
    [
        "",
        "notes.txt",
        "1-2-3-4-5.age.tmp",
        ".1-2-3-4-5.age.tmp",
        "1-2-3-4.age",
        "1-2-3-4-5-6.age",
        "1-2-3-4-5.AGE",
        "1-2-3-4-5.age\n",
        " 1-2-3-4-5.age",
        "-1-2-3-4-5.age",
        "a-2-3-4-5.age",
        "3-2-3-4-5.age",  # first seq after last
        "1-2-5-4-5.age",  # start after end
        "12345678901234567890-12345678901234567890-3-4-5.age",  # 20 digits
        "1-2-3-4-1234567890123.age",  # a 13-digit size
    ],
)
def test_name_rejects(filename: str) -> None:
    assert SegmentName.parse(filename) is None


# -- sealing -----------------------------------------------------------------------------


def test_seal_unseal_for_every_recipient() -> None:
    district, receiver, stranger = (pyrage.x25519.Identity.generate() for _ in range(3))
    plain = small_segment()
    sealed = segment.seal(plain, [district.to_public(), receiver.to_public()])
    assert plain not in sealed
    assert sealed.startswith(b"age-encryption.org/v1\n")
    assert segment.unseal(sealed, [district]) == plain
    assert segment.unseal(sealed, [receiver]) == plain
    with pytest.raises(SegmentError, match="cannot open"):
        segment.unseal(sealed, [stranger])
    with pytest.raises(SegmentError):
        segment.unseal(sealed[:-1], [district])
    with pytest.raises(SegmentError):
        segment.unseal(b"not age at all", [district])


def test_seal_into_streams_the_same_age_file() -> None:
    district, receiver = (pyrage.x25519.Identity.generate() for _ in range(2))
    recipients = [district.to_public(), receiver.to_public()]
    for plain in (b"", small_segment(), os.urandom(3 * 65536 + 7)):
        out = io.BytesIO()
        segment.seal_into(plain, recipients, out)
        sealed = out.getvalue()
        assert sealed.startswith(b"age-encryption.org/v1\n")
        assert segment.unseal(sealed, [district]) == plain
        assert segment.unseal(sealed, [receiver]) == plain
        assert len(sealed) <= segment.sealed_size_bound(len(plain), len(recipients))


def test_seal_into_without_streaming_in_pyrage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(pyrage, "encrypt_io")  # pyrage before 1.2
    identity = pyrage.x25519.Identity.generate()
    out = io.BytesIO()
    segment.seal_into(small_segment(), [identity.to_public()], out)
    assert segment.unseal(out.getvalue(), [identity]) == small_segment()


def test_parse_recipient() -> None:
    identity = pyrage.x25519.Identity.generate()
    text = str(identity.to_public())
    assert str(segment.parse_recipient(f" {text}\n", where="store.recipients[0]")) == text
    with pytest.raises(SegmentError, match=r"store\.recipients\[1\]"):
        segment.parse_recipient("age1nope", where="store.recipients[1]")


@pytest.mark.skipif(not Path(AGE).exists(), reason="the age CLI is not installed")
def test_age_cli_opens_a_sealed_segment(tmp_path: Path, packets: PacketList) -> None:
    district = new_identity(tmp_path / "district.key")
    new_identity(tmp_path / "other.key")
    receiver = pyrage.x25519.Identity.generate()
    _, plain = segment.encode(numbered(packets[:30]), STREAM, "boot-1")
    sealed_path = tmp_path / "seg.age"
    sealed_path.write_bytes(
        segment.seal(
            plain,
            [segment.parse_recipient(recipient_of(district), where="t"), receiver.to_public()],
        )
    )
    opened = subprocess.run(
        [AGE, "-d", "-i", str(tmp_path / "district.key"), str(sealed_path)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == plain
    refused = subprocess.run(
        [AGE, "-d", "-i", str(tmp_path / "other.key"), str(sealed_path)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert refused.returncode != 0
    assert refused.stdout == b""
