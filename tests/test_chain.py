"""The footage hash chain (agent/chain.py): digests, checkpoints, and where they travel."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import replace
from pathlib import Path

import av
import pyrage
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import chain, segment
from agent.audit import AuditLog
from agent.store import SegmentStore
from hardware import EncodedPacket
from provisioning.keys import kid
from receiver.camera_ingest import _segment_claim
from receiver.parts import PartInfo
from receiver.run import Run
from tests.media import PacketList

KEY = Ed25519PrivateKey.generate()
KEYS = {kid(KEY.public_key()): KEY.public_key()}
T0 = 1_767_000_000_000_000


class _Host:
    """What a receiver Run needs of its camera (test double of the recording)."""

    camera_id = "cam"
    fps = 30.0

    def parameter_sets(self) -> bytes:
        return b""

    def learn_parameter_sets(self, data: bytes) -> None:
        pass

    def mark_dirty(self) -> None:
        pass

    def save_metadata_soon(self) -> None:
        pass

    def committed(self, run: Run) -> None:
        pass


def _variant(i: int, data: bytes) -> bytes:
    """Annex-B as cameras really send it: AUDs, 3-byte start codes, trailing zeros."""
    if i % 4 == 1:
        return b"\x00\x00\x00\x01\x09\xf0" + data
    if i % 4 == 2:
        return data.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01")
    if i % 4 == 3:
        return data + b"\x00\x00"
    return data


async def test_the_digest_of_a_packet_is_the_digest_of_its_mp4_sample(
    tmp_path: Path, packets: PacketList
) -> None:
    """What the agent hashes (Annex-B) is what a verifier hashes in the receiver's MP4."""
    sent = [(_variant(i, data), key) for i, (data, key) in enumerate(packets[:40])]
    run = Run(_Host(), tmp_path, [PartInfo("cam.0.mp4", 0)])
    await run._open_part()
    for seq, (data, key) in enumerate(sent):
        run.append(seq, T0 + seq * 33_333, key, data)
    await run.close()
    with av.open(str(tmp_path / "cam.0.mp4")) as container:
        stream = container.streams.video[0]
        samples = [(bytes(pk), pk.is_keyframe) for pk in container.demux(stream) if pk.size]
    assert len(samples) == len(sent)
    for (data, key), (sample, sample_key) in zip(sent, samples, strict=True):
        assert chain.sample_digest(sample) == chain.payload_digest("h264", data)
        assert sample_key == key
    assert chain.sample_digest(b"\x00\x00\x00\x09abc") is None  # a length past the end


def feed(c: chain.CameraChain, keys: list[bool], first: int = 100) -> list[chain.Checkpoint]:
    made: list[chain.Checkpoint] = []
    for i, key in enumerate(keys):
        digest = chain.payload_digest("h264", b"\x00\x00\x01\x65" + i.to_bytes(4, "big"))
        made += c.add(first + i, T0 + i * 33_333, key, digest)
    return made


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.booleans(), min_size=1, max_size=200),
    every=st.integers(1, 40),
    data=st.data(),
)
def test_checkpoints_tile_the_chain_and_verify(
    keys: list[bool], every: int, data: st.DataObject
) -> None:
    c = chain.CameraChain("dev", "cam", KEY, every=every, keep_us=10**12)
    made = feed(c, keys)
    made += c.cut(100 + len(keys) - 1)
    # Consecutive ranges, each chained from the one before, each cut at a keyframe, every
    # ``every`` packets or at the end; each verifies on its own.
    assert made[0].first == 100 and made[0].prev == chain.GENESIS
    assert made[-1].last == 100 + len(keys) - 1 and made[-1].head == c.head
    for before, after in itertools.pairwise(made):
        assert after.first == before.last + 1 and after.prev == before.head
    for cp in made:
        assert cp.count <= every
        assert chain.check(cp, KEYS) is None
        assert all(not keys[s - 100] for s in range(cp.first + 1, cp.last + 1))
    # Any range it still knows can be signed on its own (a sealed segment's).
    a = data.draw(st.integers(100, 100 + len(keys) - 1))
    b = data.draw(st.integers(a, 100 + len(keys) - 1))
    span = c.span(a, b)
    assert span is not None
    entries = b"".join(cp.entries for cp in made)[(a - 100) * chain.ENTRY.size :]
    entries = entries[: (b - a + 1) * chain.ENTRY.size]
    assert chain.check(chain.from_claim(chain.claim_json(span), "cam", entries), KEYS) is None


def test_arrival_order_does_not_matter() -> None:
    """Checkpoints are checked one by one, by seq: shuffled, they verify all the same."""
    c = chain.CameraChain("dev", "cam", KEY, every=7)
    made = feed(c, [i % 20 == 0 for i in range(90)])
    made += c.cut(189)
    shuffled = made[:]
    random.Random(4).shuffle(shuffled)
    assert all(chain.check(cp, KEYS) is None for cp in shuffled)
    by_seq = {seq: f for cp in shuffled for seq, f in cp.iter_entries()}
    assert sorted(by_seq) == list(range(100, 190))


def test_cut_signs_exactly_up_to_the_end_of_a_session() -> None:
    c = chain.CameraChain("dev", "cam", KEY, every=30)
    made = feed(c, [i % 10 == 0 for i in range(25)])  # checkpoints 100..109, 110..119
    assert [(cp.first, cp.last) for cp in made] == [(100, 109), (110, 119)]
    (end,) = c.cut(122)  # the open range, to the session's last seq
    assert (end.first, end.last, end.prev) == (120, 122, made[-1].head)
    assert c.cut(122) == [] and c.cut(119) == []  # a checkpoint ends there already
    (inner,) = c.cut(114)  # inside a signed range: a shorter one, same start
    assert (inner.first, inner.last) == (110, 114) and chain.check(inner, KEYS) is None
    more = feed(c, [False, False, True], first=125)
    assert [(cp.first, cp.last) for cp in more] == [(123, 126)]  # closed by the keyframe
    assert c.cut(10**6) == []  # nothing is signed ahead of what was chained
    (jumped,) = feed(c, [False], first=500)  # a seq jump closes the open range first
    assert (jumped.first, jumped.last) == (127, 127)


def test_a_clock_step_forward_keeps_what_the_chain_must_still_sign() -> None:
    """Recent checkpoints were kept by capture time: the device's clock stepping forward
    (NTP on a Pi) dropped them all at once, and the segments being sealed then, and a
    session's pre-roll, could not be signed ("chain no longer known"). Now they are kept
    by the monotonic clock, and by count."""
    mono = [0]
    c = chain.CameraChain("dev", "cam", KEY, every=30, keep_us=40_000_000, mono_ns=lambda: mono[0])
    made = feed(c, [i % 30 == 0 for i in range(60)])  # 100..129, 130..159
    day = 20 * 3600 * 1_000_000
    digest = chain.payload_digest("h264", b"\x00\x00\x01\x65\xff")
    mono[0] += 2_000_000_000  # two seconds later, captured most of a day "later"
    made += c.add(160, T0 + day, True, digest)
    assert c.since(100) == made
    assert c.span(100, 159) is not None
    mono[0] += 41_000_000_000  # past keep_us on the monotonic clock: now they may go
    c.add(161, T0 + day + 33_333, True, digest)
    assert [cp.first for cp in c.recent] == [160]


def test_the_chain_keeps_at_most_keep_us_at_the_highest_frame_rate() -> None:
    """A file replayed at full speed makes checkpoints faster than real time: they are
    bounded by count too."""
    c = chain.CameraChain("dev", "cam", KEY, every=30, keep_us=1_000_000, mono_ns=lambda: 0)
    feed(c, [i % 30 == 0 for i in range(3000)])
    assert sum(cp.count for cp in c.recent) <= 240 + 30


def test_refusal_codes() -> None:
    (cp,) = feed(chain.CameraChain("dev", "cam", KEY, every=5), [True] + [False] * 4)
    other = Ed25519PrivateKey.generate().public_key()
    assert chain.check(cp, {kid(other): other}) == "unknown_key"
    bad_sig = bytearray(cp.sig)
    bad_sig[5] ^= 1
    assert chain.check(_replace(cp, sig=bytes(bad_sig)), KEYS) == "bad_signature"
    entries = bytearray(cp.entries)
    entries[0] ^= 1  # the first packet's capture time
    assert chain.check(_replace(cp, entries=bytes(entries)), KEYS) == "bad_chain"
    assert chain.check(_replace(cp, entries=cp.entries[: chain.ENTRY.size]), KEYS) == "bad_chain"


def _replace(cp: chain.Checkpoint, **changes: object) -> chain.Checkpoint:
    return replace(cp, **changes)  # type: ignore[arg-type]


def test_records_round_trip_and_refuse_what_is_not_one() -> None:
    (cp,) = feed(chain.CameraChain("dev", "cam", KEY, every=3), [True, False, False])
    assert chain.from_record(chain.record_json(cp)) == cp
    good = chain.record_json(cp)
    for bad in (
        {**good, "prev": "AB" * 32},
        {**good, "first": True},
        {**good, "last": good["first"] - 1},
        {**good, "entries": [[1, 2, "00" * 32]]},
        {**good, "kid": "nothex"},
        {**good, "sig": "***"},
        {k: v for k, v in good.items() if k != "device"},
    ):
        with pytest.raises(ValueError, match="checkpoint"):
            chain.from_record(bad)


async def test_a_sealed_segment_carries_the_checkpoint_of_its_range(
    tmp_path: Path, packets: PacketList
) -> None:
    identity = pyrage.x25519.Identity.generate()
    chains = chain.Chains("dev", KEY)

    def attest(camera: str, first: int, last: int) -> dict[str, object] | None:
        span = chains.span(camera, first, last)
        return None if span is None else chain.claim_json(span)

    audit = AuditLog(tmp_path / "audit.log", lambda: 0.0)
    store = SegmentStore(
        tmp_path / "store",
        [identity.to_public()],
        audit=audit,
        boot_id="b",
        segment_s=0.9,
        clock=lambda: T0 / 1e6 + 10,  # the footage is recent: retention keeps it
        attest=attest,
    )
    await asyncio.to_thread(store.open)
    desc = segment.StreamDesc("h264", 320, 240, 30.0, b"")
    try:
        for seq, (data, key) in enumerate(packets[:61]):
            pkt = EncodedPacket("cam", seq, (T0 + seq * 33_333) * 1000, 0, key, "h264", data)
            chains.add("cam", seq, pkt.capture_ns // 1000, key, "h264", data)
            store.push(pkt, desc)
    finally:
        await store.close()
        audit.close()
    segs = store.segments("cam")
    assert [(s.first_seq, s.last_seq) for s in segs] == [(0, 29), (30, 59), (60, 60)]
    for seg in segs:
        header, found = segment.decode(segment.unseal(SegmentStore.read(seg), [identity]))
        assert header.chain is not None
        cp = _segment_claim(header, found, "cam")  # as the receiver reads it
        assert (cp.first, cp.last) == (seg.first_seq, seg.last_seq)
        assert chain.check(cp, KEYS) is None
