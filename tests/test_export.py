"""District export from a copy of an agent's store: real sealed segments, ffprobe, the age CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyrage
import pytest

from agent import segment
from provisioning.age_keys import new_identity, recipient_of
from receiver.errors import NoFootageError, WrongIdentityError
from receiver.export import ExportReport, Hole, export_footage
from tests.media import PacketList, ffprobe_packets, ffprobe_stream, make_h264_packets
from tests.segments import capture_us, seal, store_segment

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
    damaged = segment_file(broken, 30)
    data = bytearray(damaged.read_bytes())
    data[-50] ^= 1
    damaged.write_bytes(bytes(data))
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
        (["--identity", key, "--store", str(broken)], 1, "is corrupt"),
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
