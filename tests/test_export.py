"""District export from a copy of an agent's store: real sealed segments, ffprobe, the age CLI."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyrage
import pytest

import receiver.export
from agent import segment
from hardware import EncodedPacket
from provisioning.age_keys import new_identity, recipient_of
from receiver.errors import BadSegmentError, ExportError, NoFootageError, WrongIdentityError
from receiver.export import (
    ExportReport,
    Hole,
    SegmentConflictError,
    UnreadableSegment,
    export_footage,
)
from receiver.h264 import parameter_sets
from tests.media import (
    PacketList,
    decode_every_frame,
    ffprobe_packets,
    ffprobe_stream,
    make_h264_packets,
)
from tests.segments import FRAME_US, capture_us, seal, store_segment

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-m", "breakglass.footage_cli", "footage", "export"]


def at(i: int) -> datetime:
    """The capture time of packet ``i``."""
    return datetime.fromtimestamp(capture_us(i) / 1e6, UTC)


@pytest.fixture(scope="module")
def footage() -> PacketList:
    """Six seconds at 30 fps, 160x120, a keyframe every 30 frames."""
    return make_h264_packets(180, width=160, height=120)


@pytest.fixture(scope="module")
def district(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The district's age identity file (0600) and identity."""
    path = tmp_path_factory.mktemp("district") / "district.key"
    return path, new_identity(path)


@pytest.fixture
def store(tmp_path: Path, footage: PacketList, district: tuple[Path, Any]) -> Path:
    """A copy of an SD card: camera ``hall``, six one-second segments, sealed twice."""
    receiver = pyrage.x25519.Identity.generate()
    to = [district[1].to_public(), receiver.to_public()]
    for first in range(0, 180, 30):
        header, sealed = seal("hall", footage, first, first + 29, to, size=(160, 120))
        store_segment(tmp_path / "store", header, sealed)
    (tmp_path / "store" / "hall" / ".tmp-half-written").write_bytes(b"torn")  # not a segment
    return tmp_path / "store"


def segment_file(store: Path, first: int) -> Path:
    (path,) = (store / "hall").glob(f"{first:016d}-*.age")
    return path


def damage(path: Path) -> None:
    """Flip a bit in the age payload (its MAC then fails)."""
    data = bytearray(path.read_bytes())
    data[-50] ^= 1
    path.write_bytes(bytes(data))


def second_copy(path: Path) -> Path:
    """The same segment again under its unpadded name (a careless copy of the card)."""
    name = segment.SegmentName.parse(path.name)
    assert name is not None
    copy = path.with_name(
        f"{name.first_seq}-{name.last_seq}-{name.start_ms}-{name.end_ms}-{name.size}.age"
    )
    shutil.copyfile(path, copy)
    return copy


def pts_of(seq: int) -> int:
    """The pts (90 kHz from the first frame) of packet ``seq`` exported from seq 0."""
    return (seq * FRAME_US * 1000 * 9 + 50_000) // 100_000


async def test_export_is_a_seekable_h264_mp4_from_the_keyframe_before_start(
    tmp_path: Path, store: Path, district: tuple[Path, Any]
) -> None:
    out = tmp_path / "evidence.mp4"
    report = export_footage(store, district[1], "hall", at(45), at(120), out)
    # From the keyframe at 30 (before 45) to the frame captured at 120.
    assert (report.first_seq, report.last_seq, report.frames) == (30, 120, 91)
    assert (report.segments, report.holes, report.complete) == (4, (), True)
    assert report.first_capture == at(30)
    info = ffprobe_stream(out)
    assert (info["codec_name"], info["width"], info["height"]) == ("h264", 160, 120)
    assert int(info["nb_read_frames"]) == 91
    assert float(info["duration"]) == pytest.approx(91 / 30, abs=0.002)
    pkts = ffprobe_packets(out)
    assert pkts[0]["flags"].startswith("K")
    assert [int(p["pts"]) for p in pkts[:2]] == [0, 3000]
    data = out.read_bytes()
    assert data[4:8] == b"ftyp"
    moov_at = int.from_bytes(data[0:4], "big")
    assert data[moov_at + 4 : moov_at + 8] == b"moov"  # index in front: seekable when streamed
    assert not list(tmp_path.glob("*.partial"))


async def test_export_reports_declared_and_undeclared_holes(
    tmp_path: Path, footage: PacketList, district: tuple[Path, Any]
) -> None:
    to = [district[1].to_public()]
    store = tmp_path / "store"
    for first in (0, 30, 90):  # 60..89 deleted from the card
        store_segment(store, *seal("hall", footage, first, first + 29, to, size=(160, 120)))
    # 120..149 was being written when the agent restarted: the next boot goes on at 150.
    header, sealed = seal("hall", footage, 150, 179, to, boot_id="boot-2", size=(160, 120))
    store_segment(store, header, sealed)
    out = tmp_path / "evidence.mp4"
    report = export_footage(store, district[1], "hall", at(0), at(179), out)
    assert report.holes == (Hole(60, 89, declared=False), Hole(120, 149, declared=True))
    assert (report.frames, report.complete) == (120, False)
    assert int(ffprobe_stream(out)["nb_read_frames"]) == 120  # decodes across the holes


async def test_a_restart_without_a_reboot_is_told_from_footage_gone_missing(
    tmp_path: Path, footage: PacketList, district: tuple[Path, Any]
) -> None:
    """An agent restarted (systemd, an update, a crash) goes on numbering at its next
    reserved block, in the same OS boot: that hole is the restart's, sized by time, not
    99,970 frames "missing from the store" (found by a review)."""
    to = [district[1].to_public()]
    store = tmp_path / "store"
    store_segment(store, *seal("hall", footage, 0, 29, to, size=(160, 120), run="run-1"))
    later = seal("hall", footage, 30, 59, to, first_seq=100_000 - 30, size=(160, 120), run="run-2")
    store_segment(store, *later)
    out = tmp_path / "evidence.mp4"
    report = export_footage(store, district[1], "hall", at(0), at(59), out)
    assert report.holes == (Hole(30, 99_999, declared=True),)
    assert report.holes[0].seconds == pytest.approx(FRAME_US / 1e6)  # the next frame on time
    done = run_cli(
        "--store", str(store), "--camera", "hall", "--identity", str(district[0]),
        "--from", at(0).isoformat(), "--to", at(59).isoformat(), "--out", str(tmp_path / "b.mp4"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "seqs 30..99999 skipped across an agent restart, 0.0 s between the frames" in (
        done.stderr
    )
    assert "missing from the store" not in done.stderr


async def test_export_errors_are_clear_and_leave_no_file(
    tmp_path: Path, store: Path, footage: PacketList
) -> None:
    stranger = pyrage.x25519.Identity.generate()
    out = tmp_path / "evidence.mp4"
    with pytest.raises(WrongIdentityError, match="not sealed to this identity"):
        export_footage(store, stranger, "hall", at(0), at(60), out)
    # Each says what there is instead: the range the camera's segments hold, the cameras.
    with pytest.raises(NoFootageError, match=r"time range; it holds 20\d\d-.* to 20\d\d-"):
        export_footage(store, stranger, "hall", at(400), at(500), out)
    with pytest.raises(NoFootageError, match=r"no segments of this camera .*; the store has hall"):
        export_footage(store, stranger, "door", at(0), at(60), out)
    assert not out.exists()
    assert not list(tmp_path.glob("*.partial"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def test_cli_exports_and_fails_with_one_line_and_its_exit_code(
    tmp_path: Path, store: Path, district: tuple[Path, Any]
) -> None:
    key = str(district[0])
    base = ["--store", str(store), "--camera", "hall"]
    out = tmp_path / "a.mp4"
    done = run_cli(
        *base,
        "--identity",
        key,
        "--from",
        at(60).isoformat(),
        "--to",
        "1767000002.5",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "exported 16 frames of hall (seqs 60..75" in done.stdout
    assert int(ffprobe_stream(out)["nb_read_frames"]) == 16

    open_key = tmp_path / "open.key"
    shutil.copy(district[0], open_key)
    open_key.chmod(0o644)
    stranger = tmp_path / "stranger.key"
    new_identity(stranger)
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    damage(segment_file(broken, 0))
    cases = [
        (["--identity", str(open_key)], 2, "too open"),
        (["--identity", str(tmp_path / "nope.key")], 2, "cannot read"),
        (["--identity", str(stranger)], 1, "not sealed to this identity"),
        (["--identity", key, "--camera", "../hall"], 2, "invalid camera id"),
        (
            ["--identity", key, "--from", "2026-11-28T10:00:00"],
            2,
            "--from: '2026-11-28T10:00:00' has no timezone",
        ),
        (["--identity", key, "--to", "noon"], 2, "--to: 'noon' is neither ISO-8601"),
        (["--identity", key, "--from", "1767001000", "--to", "1767002000"], 1, "no segment"),
        # The only segment of the range cannot be read: nothing to export.
        (["--identity", key, "--store", str(broken), "--to", "1767000000.5"], 1, "is corrupt"),
    ]
    for extra, code, message in cases:
        args = [
            *base,
            "--from",
            "1767000000",
            "--to",
            "1767000004",
            "--out",
            str(tmp_path / "b.mp4"),
        ]
        for i in range(0, len(extra), 2):  # later options win: override the defaults
            args += extra[i : i + 2]
        failed = run_cli(*args)
        assert failed.returncode == code, (extra, failed.stderr)
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, failed.stderr)
        assert "AGE-SECRET-KEY" not in failed.stderr + failed.stdout
        assert not (tmp_path / "b.mp4").exists()


def test_report_counts() -> None:
    report = ExportReport("c", Path("x"), 1, 3, 0, 4, at(0), at(4), (Hole(1, 2, False),))
    assert (report.complete, report.holes[0].frames) == (False, 2)


@pytest.mark.skipif(shutil.which("age") is None, reason="needs the age CLI (apt-get install age)")
def test_age_cli_opens_a_segment_with_the_district_identity(
    tmp_path: Path, footage: PacketList, district: tuple[Path, Any]
) -> None:
    """The standard tool is enough for the district: no breakglass code needed to decrypt."""
    receiver = tmp_path / "receiver.key"
    to = [
        pyrage.x25519.Recipient.from_str(recipient_of(district[1])),
        new_identity(receiver).to_public(),
    ]
    header, sealed = seal("hall", footage, 0, 29, to, size=(160, 120))
    path = store_segment(tmp_path / "store", header, sealed)
    for key in (district[0], receiver):
        opened = subprocess.run(
            ["age", "-d", "-i", str(key), str(path)], capture_output=True, timeout=30, check=False
        )
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout.startswith(segment.MAGIC)
        decoded, packets = segment.decode(opened.stdout)
        assert (decoded.camera, decoded.first_seq, decoded.last_seq) == ("hall", 0, 29)
        assert [p.payload for p in packets] == [payload for payload, _ in footage[:30]]
    stranger = tmp_path / "stranger.key"
    new_identity(stranger)
    for args in (["-d", str(path)], ["-d", "-i", str(stranger), str(path)]):
        refused = subprocess.run(["age", *args], capture_output=True, timeout=30, check=False)
        assert refused.returncode != 0
        assert not refused.stdout


# -- a stream change in the range: one file per stream description ---------------------

SMALL, BIG = (160, 120), (320, 240)


@pytest.fixture(scope="module")
def big_footage() -> PacketList:
    """Two seconds at 320x240 (keyframes at 0 and 30): the same camera, resized."""
    return make_h264_packets(60, width=320, height=240)


def resized_store(
    root: Path,
    footage: PacketList,
    big_footage: PacketList,
    to: list[Any],
    *,
    in_band: bool = True,
    big_from: int = 0,
) -> Path:
    """Seqs 0..29 at 160x120, 30..59 at 320x240 (``big_footage[big_from:]``), 60..89 at
    160x120 again: three segments, each with its own stream description."""
    mixed = footage[:30] + big_footage[big_from : big_from + 30] + footage[60:90]
    keyframe = next(i for i in range(30, 60) if mixed[i][1])
    for first, size, params in ((0, SMALL, 0), (30, BIG, keyframe), (60, SMALL, 60)):
        header, sealed = seal(
            "hall", mixed, first, first + 29, to, size=size, extradata_from=params, in_band=in_band
        )
        store_segment(root / "store", header, sealed)
    return root / "store"


@pytest.mark.parametrize("in_band", [True, False], ids=["sps-in-band", "sps-out-of-band"])
def test_a_stream_change_goes_on_in_a_new_file_each_described_as_it_is(
    tmp_path: Path,
    footage: PacketList,
    big_footage: PacketList,
    district: tuple[Path, Any],
    in_band: bool,
) -> None:
    store = resized_store(
        tmp_path, footage, big_footage, [district[1].to_public()], in_band=in_band
    )
    out = tmp_path / "case.mp4"
    report = export_footage(store, district[1], "hall", at(0), at(89), out)
    # The first file ends where the stream changes: every frame in it decodes, at its size.
    assert decode_every_frame(out) == (SMALL, [SMALL] * 30, [])
    assert [(f.path, f.first_seq, f.last_seq, f.frames) for f in report.files] == [
        (out, 0, 29, 30),
        (tmp_path / "case-2.mp4", 30, 59, 30),
        (tmp_path / "case-3.mp4", 60, 89, 30),
    ]
    assert (report.out, report.frames, report.first_seq, report.last_seq) == (out, 90, 0, 89)
    assert (report.holes, report.undecodable, report.complete) == ((), (), True)
    for f, size in zip(report.files, (SMALL, BIG, SMALL), strict=True):
        assert (f.codec, (f.width, f.height), f.size) == ("h264", size, f.path.stat().st_size)
        assert f.first_capture == at(f.first_seq) and f.last_capture == at(f.last_seq)
        info = ffprobe_stream(f.path)
        assert (info["codec_name"], info["width"], info["height"]) == ("h264", *size)
        assert int(info["nb_read_frames"]) == 30
        declared, frames, errors = decode_every_frame(f.path)
        assert (declared, frames, errors) == (size, [size] * 30, [])
        # Each file's time starts at its first frame; its creation time says when that was.
        assert int(ffprobe_packets(f.path)[0]["pts"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "case-2.mp4",
        "case-3.mp4",
        "case.mp4",
        "store",
    ]


def test_frames_of_a_new_stream_before_its_first_keyframe_are_reported_not_muxed(
    tmp_path: Path, footage: PacketList, big_footage: PacketList, district: tuple[Path, Any]
) -> None:
    # The 320x240 segment starts mid-GOP: seqs 30..44 have no keyframe before them.
    store = resized_store(tmp_path, footage, big_footage, [district[1].to_public()], big_from=15)
    out = tmp_path / "case.mp4"
    report = export_footage(store, district[1], "hall", at(0), at(89), out)
    assert [(f.path.name, f.first_seq, f.last_seq) for f in report.files] == [
        ("case.mp4", 0, 29),
        ("case-2.mp4", 45, 59),
        ("case-3.mp4", 60, 89),
    ]
    assert (report.undecodable, report.holes, report.complete) == (((30, 44),), (), False)
    declared, frames, errors = decode_every_frame(tmp_path / "case-2.mp4")
    assert (declared, frames, errors) == (BIG, [BIG] * 15, [])


def test_an_existing_later_file_name_is_refused_before_and_while_exporting(
    tmp_path: Path,
    footage: PacketList,
    big_footage: PacketList,
    district: tuple[Path, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = resized_store(tmp_path, footage, big_footage, [district[1].to_public()])
    out = tmp_path / "case.mp4"
    older = tmp_path / "case-2.mp4"
    older.write_bytes(b"an earlier export")
    with pytest.raises(ExportError, match=r"case-2\.mp4 exists; refusing to overwrite"):
        export_footage(store, district[1], "hall", at(0), at(89), out)
    older.unlink()

    # case-3.mp4 appears while the export runs (after the check at its start).
    real_read = receiver.export._read

    def racing_read(name: segment.SegmentName, *args: Any) -> Any:
        if name.first_seq == 60:
            (tmp_path / "case-3.mp4").write_bytes(b"another officer's export")
        return real_read(name, *args)

    monkeypatch.setattr(receiver.export, "_read", racing_read)
    with pytest.raises(ExportError, match=r"case-3\.mp4 exists; refusing to overwrite"):
        export_footage(store, district[1], "hall", at(0), at(89), out)
    # All or nothing: case.mp4 and case-2.mp4 were taken back, the other file is intact.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case-3.mp4", "store"]
    assert (tmp_path / "case-3.mp4").read_bytes() == b"another officer's export"


def test_cli_names_every_file_with_its_seqs_and_size(
    tmp_path: Path, footage: PacketList, big_footage: PacketList, district: tuple[Path, Any]
) -> None:
    store = resized_store(tmp_path, footage, big_footage, [district[1].to_public()])
    out = tmp_path / "case.mp4"
    done = run_cli(
        *("--store", str(store), "--camera", "hall", "--identity", str(district[0])),
        *("--from", at(0).isoformat(), "--to", at(89).isoformat(), "--out", str(out)),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("exported 90 frames of hall (seqs 0..89")
    assert "into 3 files (the stream changed" in lines[0]
    for line, name, seqs, size in zip(
        lines[1:],
        ("case.mp4", "case-2.mp4", "case-3.mp4"),
        ("0..29", "30..59", "60..89"),
        ("160x120", "320x240", "160x120"),
        strict=True,
    ):
        path = tmp_path / name
        assert line.startswith(f"  {path}: seqs {seqs} (30 frames")
        assert line.endswith(f"h264 {size}, {path.stat().st_size} bytes")
    assert done.stderr == ""
    helped = run_cli("--help")
    assert "F.mp4, then F-2.mp4, F-3.mp4" in " ".join(helped.stdout.split())


# -- a card holding a seq twice ---------------------------------------------------------


def test_a_segment_on_the_card_twice_is_written_once_and_counted(
    tmp_path: Path, footage: PacketList, district: tuple[Path, Any]
) -> None:
    to = [district[1].to_public()]
    store = tmp_path / "store"
    for first in (0, 30, 60):
        store_segment(store, *seal("hall", footage, first, first + 29, to, size=SMALL))
    copy = second_copy(segment_file(store, 30))
    out = tmp_path / "evidence.mp4"
    report = export_footage(store, district[1], "hall", at(0), at(89), out)
    # Each seq once, at its capture time (no clamped pts hiding a repeat).
    assert [int(p["pts"]) for p in ffprobe_packets(out)] == [pts_of(i) for i in range(90)]
    assert (report.frames, report.first_seq, report.last_seq) == (90, 0, 89)
    assert (report.duplicates, report.duplicate_segments) == (30, (copy,))
    assert (report.holes, report.complete, report.segments) == ((), True, 4)


def test_overlapping_segments_write_each_seq_once(
    tmp_path: Path, footage: PacketList, district: tuple[Path, Any]
) -> None:
    to = [district[1].to_public()]
    store = tmp_path / "store"
    for first, last in ((0, 59), (30, 89)):
        store_segment(store, *seal("hall", footage, first, last, to, size=SMALL))
    out = tmp_path / "evidence.mp4"
    report = export_footage(store, district[1], "hall", at(0), at(89), out)
    assert [int(p["pts"]) for p in ffprobe_packets(out)] == [pts_of(i) for i in range(90)]
    assert (report.frames, report.duplicates, report.complete) == (90, 30, True)
    assert report.duplicate_segments == (segment_file(store, 30),)
    assert int(ffprobe_stream(out)["nb_read_frames"]) == 90


def test_two_versions_of_a_seq_are_an_error_naming_both_files(
    tmp_path: Path, footage: PacketList, district: tuple[Path, Any]
) -> None:
    to = [district[1].to_public()]
    store = tmp_path / "store"
    for first in (0, 30, 60):
        store_segment(store, *seal("hall", footage, first, first + 29, to, size=SMALL))
    # Other footage under seqs 30..59 (seqs reused after a restart, say).
    other = footage[:30] + footage[90:120]
    header, sealed = seal("hall", other, 30, 59, to, size=SMALL)
    name = segment.SegmentName.parse(store_segment(tmp_path / "elsewhere", header, sealed).name)
    assert name is not None
    reused = store / "hall" / f"30-59-{name.start_ms}-{name.end_ms}-{name.size}.age"
    reused.write_bytes(sealed)
    out = tmp_path / "evidence.mp4"
    with pytest.raises(SegmentConflictError) as caught:
        export_footage(store, district[1], "hall", at(0), at(89), out)
    message = str(caught.value)
    assert "seq 30 is held with different footage" in message
    assert str(segment_file(store, 30)) in message and str(reused) in message
    # The first 30 frames were being written: nothing of them is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "store"]


# -- publishing: never overwrite, never leave a partial file, synced --------------------


def test_a_file_appearing_at_the_output_during_the_export_is_not_replaced(
    tmp_path: Path, store: Path, district: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "evidence.mp4"
    real_read = receiver.export._read

    def racing_read(name: segment.SegmentName, *args: Any) -> Any:
        if name.first_seq == 30 and not out.exists():
            out.write_bytes(b"EVIDENCE EXPORTED BY ANOTHER OFFICER")
        return real_read(name, *args)

    monkeypatch.setattr(receiver.export, "_read", racing_read)
    with pytest.raises(ExportError, match=r"evidence\.mp4 exists; refusing to overwrite"):
        export_footage(store, district[1], "hall", at(0), at(59), out)
    assert out.read_bytes() == b"EVIDENCE EXPORTED BY ANOTHER OFFICER"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.mp4", "store"]


def test_a_file_named_like_the_old_partial_file_is_left_alone(
    tmp_path: Path, store: Path, district: tuple[Path, Any]
) -> None:
    out = tmp_path / "evidence.mp4"
    someones = tmp_path / "evidence.mp4.partial"
    someones.write_bytes(b"someone's file")
    export_footage(store, district[1], "hall", at(0), at(59), out)
    assert someones.read_bytes() == b"someone's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "evidence.mp4",
        "evidence.mp4.partial",
        "store",
    ]
    assert int(ffprobe_stream(out)["nb_read_frames"]) == 60


def test_the_file_and_its_folder_are_synced_before_the_export_returns(
    tmp_path: Path, store: Path, district: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "evidence.mp4"
    export_footage(store, district[1], "hall", at(0), at(59), out)
    for path in (out, tmp_path):  # the file (linked: same inode) and its directory entry
        st = path.stat()
        assert (st.st_dev, st.st_ino) in synced, path


def test_without_hard_links_the_name_is_still_claimed_exclusively(
    tmp_path: Path, store: Path, district: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FAT/exFAT USB stick has no hard links (link() fails with EPERM)."""

    def no_link(src: Any, dst: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", str(dst))

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "evidence.mp4"
    report = export_footage(store, district[1], "hall", at(0), at(59), out)
    assert (report.frames, int(ffprobe_stream(out)["nb_read_frames"])) == (60, 60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.mp4", "store"]

    real_read = receiver.export._read
    second = tmp_path / "second.mp4"

    def racing_read(name: segment.SegmentName, *args: Any) -> Any:
        if name.first_seq == 30 and not second.exists():
            second.write_bytes(b"another export")
        return real_read(name, *args)

    monkeypatch.setattr(receiver.export, "_read", racing_read)
    with pytest.raises(ExportError, match=r"second\.mp4 exists; refusing to overwrite"):
        export_footage(store, district[1], "hall", at(0), at(59), second)
    assert second.read_bytes() == b"another export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.mp4", "second.mp4", "store"]


# -- a segment that cannot be read --------------------------------------------------------


def test_an_unreadable_segment_is_skipped_and_named_the_rest_exported(
    tmp_path: Path, store: Path, district: tuple[Path, Any]
) -> None:
    middle, last = segment_file(store, 30), segment_file(store, 150)
    damage(middle)
    damage(last)
    out = tmp_path / "evidence.mp4"
    report = export_footage(store, district[1], "hall", at(0), at(179), out)
    assert (report.frames, report.first_seq, report.last_seq) == (120, 0, 149)
    assert report.holes == (Hole(30, 59, declared=False, unreadable=(middle,)),)
    assert [(u.path, u.first_seq, u.last_seq, u.covered) for u in report.unreadable] == [
        (middle, 30, 59, False),
        (last, 150, 179, False),
    ]
    assert all("is corrupt" in u.reason and str(u.path) in u.reason for u in report.unreadable)
    assert not report.complete
    assert int(ffprobe_stream(out)["nb_read_frames"]) == 120


def test_an_unreadable_segment_with_a_good_copy_on_the_card_loses_nothing(
    tmp_path: Path, store: Path, district: tuple[Path, Any]
) -> None:
    damaged = second_copy(segment_file(store, 30))
    damage(damaged)
    report = export_footage(store, district[1], "hall", at(0), at(89), tmp_path / "e.mp4")
    assert report.unreadable == (
        UnreadableSegment(damaged, 30, 59, report.unreadable[0].reason, covered=True),
    )
    assert (report.frames, report.holes, report.duplicates, report.complete) == (90, (), 0, True)


def test_nothing_readable_raises_the_first_segments_error(
    tmp_path: Path, store: Path, district: tuple[Path, Any]
) -> None:
    for first in (0, 30):
        damage(segment_file(store, first))
    out = tmp_path / "evidence.mp4"
    with pytest.raises(BadSegmentError, match=r"0000000000000000-.* is corrupt"):
        export_footage(store, district[1], "hall", at(0), at(40), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_cli_says_loudly_what_was_skipped_and_exits_3(
    tmp_path: Path, store: Path, district: tuple[Path, Any]
) -> None:
    damaged = segment_file(store, 30)
    damage(damaged)
    copy = second_copy(segment_file(store, 60))
    out = tmp_path / "evidence.mp4"
    done = run_cli(
        *("--store", str(store), "--camera", "hall", "--identity", str(district[0])),
        *("--from", at(0).isoformat(), "--to", at(89).isoformat(), "--out", str(out)),
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("exported 60 frames of hall (seqs 0..89")
    assert f"  {out}: seqs 0..89 (60 frames" in done.stdout
    err = done.stderr.splitlines()
    assert f"seqs 30..59 (30 frames, 1.0 s) in unreadable segment {damaged}" in err[0]
    assert any("30 frames are on the card twice" in e and str(copy) in e for e in err)
    assert any(f"SKIPPED seqs 30..59: segment {damaged} is corrupt" in e for e in err)
    assert err[-1].startswith("breakglass: error: export INCOMPLETE: 1 segment")
    assert "(seqs 30..59)" in err[-1]
    assert int(ffprobe_stream(out)["nb_read_frames"]) == 60


def test_cli_refuses_two_versions_of_a_seq_in_one_line(
    tmp_path: Path, footage: PacketList, district: tuple[Path, Any]
) -> None:
    to = [district[1].to_public()]
    store = tmp_path / "store"
    store_segment(store, *seal("hall", footage, 0, 29, to, size=SMALL))
    header, sealed = seal("hall", footage[:10] + footage[100:130], 10, 39, to, size=SMALL)
    store_segment(store, header, sealed)
    out = tmp_path / "evidence.mp4"
    done = run_cli(
        *("--store", str(store), "--camera", "hall", "--identity", str(district[0])),
        *("--from", at(0).isoformat(), "--to", at(39).isoformat(), "--out", str(out)),
    )
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert "seq 10 is held with different footage by" in line
    assert str(segment_file(store, 0)) in line and str(segment_file(store, 10)) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize("step_s", [20 * 3600, -600])
def test_a_clock_step_on_the_agent_goes_on_in_a_new_file(
    tmp_path: Path, footage: PacketList, district: tuple[Path, Any], step_s: int
) -> None:
    """The agent's clock stepped between two frames (NTP on a Pi without a real-time
    clock). A step forward of over 13 h was no MP4 sample duration: the muxer refused
    it and the export failed; a step back squashed every frame after it a tick apart.
    Now the frame after the step begins the next file, even mid-GOP."""
    receiver = pyrage.x25519.Identity.generate()
    to = [district[1].to_public(), receiver.to_public()]
    stream = segment.StreamDesc("h264", 160, 120, 30.0, parameter_sets(footage[0][0]).annex_b())
    for first in (0, 45):  # the agent seals its segment at a step
        pkts = [
            EncodedPacket(
                "hall",
                i,
                (capture_us(i) + (step_s * 1_000_000 if i >= 45 else 0)) * 1000,
                i * FRAME_US * 1000,
                footage[i][1],
                "h264",
                footage[i][0],
            )
            for i in range(first, first + 45)
        ]
        header, plaintext = segment.encode(pkts, stream, "boot-1")
        store_segment(tmp_path / "store", header, segment.seal(plaintext, to))
    out = tmp_path / "hall.mp4"
    stepped = [capture_us(i) + step_s * 1_000_000 for i in (45, 89)]
    report = export_footage(
        tmp_path / "store",
        district[1],
        "hall",
        datetime.fromtimestamp(min(capture_us(0), stepped[0]) / 1e6, UTC),
        datetime.fromtimestamp(max(capture_us(44), stepped[1]) / 1e6, UTC),
        out,
    )
    assert [(f.first_seq, f.last_seq) for f in report.files] == [(0, 44), (45, 89)]
    for f in report.files:
        times = [float(p["pts_time"]) for p in ffprobe_packets(f.path)]
        assert len(times) == f.last_seq - f.first_seq + 1
        assert times == sorted(times) and times[-1] - times[0] < 2.0


def test_after_a_clock_step_back_the_footage_captured_in_range_again_is_exported(
    tmp_path: Path, footage: PacketList, district: tuple[Path, Any]
) -> None:
    """NTP stepped the agent's clock back 3 s at seq 90: seqs 90..149 were captured in the
    same two seconds as 0..59. An export of those seconds has both; it stopped at the first
    frame after the range and left out the later ones without a word (review s2)."""
    to = [district[1].to_public()]
    stream = segment.StreamDesc("h264", 160, 120, 30.0, parameter_sets(footage[0][0]).annex_b())
    for first in (0, 90):  # the agent seals its segment at a step
        pkts = [
            EncodedPacket(
                "hall",
                i,
                (capture_us(i) - (90 * FRAME_US if i >= 90 else 0)) * 1000,
                i * FRAME_US * 1000,
                footage[i][1],
                "h264",
                footage[i][0],
            )
            for i in range(first, first + 90)
        ]
        header, plaintext = segment.encode(pkts, stream, "boot-1")
        store_segment(tmp_path / "store", header, segment.seal(plaintext, to))
    out = tmp_path / "hall.mp4"
    report = export_footage(tmp_path / "store", district[1], "hall", at(0), at(59), out)
    assert [(f.first_seq, f.last_seq) for f in report.files] == [(0, 59), (90, 149)]
    assert report.holes == () and report.complete  # out of the range is not missing
    for f in report.files:
        assert len(ffprobe_packets(f.path)) == 60
