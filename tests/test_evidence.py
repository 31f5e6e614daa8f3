"""Evidence bundles end to end: a real agent and receiver on loopback, export, verify, tamper.

One emergency is recorded once for the module (button, pre-roll, live, end);
each tamper test works on its own copy of the bundle, unpacked or as the zip.
"""

from __future__ import annotations

import asyncio
import errno
import getpass
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import av
import pyrage
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import chain
from agent import protocol as p
from agent.changes import Changes
from agent.config import load_config
from agent.daemon import Agent
from breakglass.cli import main
from breakglass.demo import press_button, write_agent_config
from provisioning.enrollment import sign_enrollment
from provisioning.keys import load_private_key, new_private_key, public_pem
from receiver import custody
from receiver.access_log import AccessLog
from receiver.evidence import build_bundle
from receiver.evidence_format import (
    bound_reasons,
    evidence_key,
    owed_seqs,
    selected_bounds,
    session_seqs,
)
from receiver.evidence_verify import VerifyReport, verify_bundle
from receiver.server import Receiver
from tests.media import make_h264_packets
from tests.uplink import connect_device

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Recorded:
    """A recorded emergency, its bundle and the keys that check it."""

    data: Path
    session: str
    bundle: Path
    #: Exported while the session was still streaming.
    live_bundle: Path
    device_pub: Path
    receiver_pub: Path
    device_key: Ed25519PrivateKey


async def _record(tmp: Path) -> tuple[Path, str, Path]:
    """Press, stream pre-roll and live, export, end; returns (receiver data, session, device
    key). ``tmp/live.zip`` is the bundle exported while the session streamed."""
    async with Receiver(tmp / "receiver", "127.0.0.1", 0) as receiver:
        config = load_config(write_agent_config(tmp / "agent", receiver, fps=30, preroll_s=2))
        async with Agent(config) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(75)  # more than two GOPs of pre-roll
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
            session = agent.emergency.active
            assert session is not None
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            live = {c.index: c.live_seq for c in stream.open.cameras}
            await agent.uplink.wait_until(
                lambda: all(stream.acked[i] >= s + 40 for i, s in live.items())
            )
            await asyncio.to_thread(build_bundle, receiver.data_dir, session.id, tmp / "live.zip")
            agent.end("test finished")
            await agent.uplink.wait_settled(session.id)
            # Sign the audit trail now and let the receiver's copy have it.
            await asyncio.to_thread(agent.audit.checkpoint)
            agent.uplink.audit_recorded()
            await agent.uplink.wait_until(lambda: agent.uplink.audit_acked >= agent.audit.head_n)
            assert agent.uplink.stats.checkpoints_refused == 0
            assert agent.uplink.stats.checkpoints_acked > 0
        return receiver.data_dir, session.id, config.device_key


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    return record_and_bundle(tmp_path_factory.mktemp("evidence"))


def record_and_bundle(tmp: Path) -> Recorded:
    """A recorded emergency in ``tmp``, its bundle, and the keys that verify it."""
    data, session, device_key_path = asyncio.run(_record(tmp))
    bundle = build_bundle(data, session, tmp / "bundle.zip")
    device_key = load_private_key(device_key_path)
    device_pub = tmp / "device.pub"
    device_pub.write_bytes(public_pem(device_key.public_key()))
    receiver_pub = tmp / "receiver.pub"
    receiver_pub.write_bytes(public_pem(evidence_key(data).public_key()))
    return Recorded(data, session, bundle, tmp / "live.zip", device_pub, receiver_pub, device_key)


def verify(recorded: Recorded, bundle: Path, **extra: Any) -> VerifyReport:
    keys = {
        "device_key": recorded.device_key.public_key(),
        "receiver_key": evidence_key(recorded.data).public_key(),
    }
    return verify_bundle(bundle, **(keys | extra))


def cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def manifest_of(bundle: Path) -> dict[str, Any]:
    with zipfile.ZipFile(bundle) as zf:
        doc: dict[str, Any] = json.loads(zf.read("manifest.json"))
        return doc


def unpacked(recorded: Recorded, tmp_path: Path) -> Path:
    return unzip(recorded.bundle, tmp_path / "bundle")


def unzip(bundle: Path, folder: Path) -> Path:
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(folder)
    return folder


def mp4s(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for cam in manifest["cameras"] for f in cam["footage"]]


def ffprobe_frames(path: Path) -> tuple[str, int]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    (stream,) = json.loads(out)["streams"]
    return stream["codec_name"], int(stream["nb_read_frames"])


def failed_parts(report: VerifyReport) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = {}
    for finding in report.errors:
        parts.setdefault(finding.part, []).append(finding.what)
    return parts


# -- the bundle as exported ----------------------------------------------------------------


def test_bundle_verifies_plays_and_is_deterministic(
    recorded: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = verify(recorded, recorded.bundle)
    assert report.ok, report.errors
    assert report.frames == report.frames_verified > 0
    assert report.checkpoints > 0
    assert report.warnings == []  # keys given, nothing lost, the audit excerpt signed

    manifest = manifest_of(recorded.bundle)
    assert manifest["session"]["id"] == recorded.session
    assert {c["id"] for c in manifest["cameras"]} == {"front-door", "hallway-2"}
    with zipfile.ZipFile(recorded.bundle) as zf:
        names = zf.namelist()
        assert names == sorted(names)
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        audit_lines = zf.read(manifest["audit"]["file"]).decode().splitlines()
    events = {json.loads(line)["event"] for line in audit_lines}
    assert {"session_start", "disclosure", "session_end", "checkpoint"} <= events
    for cam in manifest["cameras"]:
        first, *_ = cam["footage"]
        assert cam["gaps"] == [] and cam["holes"] == []
        # The pre-roll and the live run arrive as two runs, back to back: one file.
        assert len(cam["footage"]) == 1
        assert first["frames"] > 100

    folder = unpacked(recorded, tmp_path)
    for item in mp4s(manifest):
        codec, frames = ffprobe_frames(folder / item["file"])
        assert (codec, frames) == ("h264", item["frames"])

    again = build_bundle(recorded.data, recorded.session, tmp_path / "again.zip")
    assert again.read_bytes() == recorded.bundle.read_bytes()

    # The same through the command line, with the keys as files.
    args = ["--device-key", recorded.device_pub, "--receiver-key", recorded.receiver_pub]
    assert cli("evidence", "verify", recorded.bundle, *args) == 0
    assert "bundle OK" in capsys.readouterr().out
    # Without keys of one's own a forgery would pass as well: the verdict says so.
    assert cli("evidence", "verify", recorded.bundle, "--receiver-key", recorded.receiver_pub) == 0
    said = capsys.readouterr().out
    assert "bundle OK" not in said
    assert "bundle consistent, NOT VERIFIED: checked only against the keys it carries" in said
    assert "(give --device-key or --authority): session " in said
    assert cli("evidence", "verify", folder, *args) == 0  # the unpacked folder too
    out = tmp_path / "cli.zip"
    assert cli("evidence", "export", "--data", recorded.data, "--session", recorded.session,
               "--out", out) == 0  # fmt: skip
    assert out.read_bytes() == recorded.bundle.read_bytes()
    assert (
        cli(
            "evidence",
            "export",
            "--data",
            recorded.data,
            "--session",
            recorded.session,
            "--out",
            out,
        )
        == 1
    )  # fmt: skip  (never overwrites evidence)
    assert cli("evidence", "export", "--data", recorded.data, "--session", "nope",
               "--out", tmp_path / "x.zip") == 1  # fmt: skip
    assert cli("evidence", "verify", tmp_path / "missing.zip") == 2
    assert cli("evidence", "key", "--data", recorded.data, "--out", tmp_path / "rx.pub") == 0
    assert (tmp_path / "rx.pub").read_bytes() == recorded.receiver_pub.read_bytes()


def test_a_session_exported_while_it_streams_verifies(recorded: Recorded) -> None:
    """Only what the device signed so far: never the second it signs a moment later."""
    live, done = manifest_of(recorded.live_bundle), manifest_of(recorded.bundle)
    assert live["selection"]["open_session"] and not done["selection"]["open_session"]
    report = verify(recorded, recorded.live_bundle)
    assert report.ok, report.errors
    assert 0 < report.frames == report.frames_verified < verify(recorded, recorded.bundle).frames


def test_keys_taken_from_the_bundle_are_a_warning(recorded: Recorded) -> None:
    report = verify_bundle(recorded.bundle)
    assert report.ok
    assert {f.part for f in report.warnings} == {"receiver.pub", "device"}


def test_one_camera_and_a_time_range(recorded: Recorded, tmp_path: Path) -> None:
    whole = manifest_of(recorded.bundle)
    (hall,) = [c for c in whole["cameras"] if c["id"] == "hallway-2"]
    with zipfile.ZipFile(recorded.bundle) as zf:
        lines = zf.read(hall["checkpoints"]).splitlines()
    signed = {
        seq: fields
        for line in lines
        for seq, fields in custody.parse_record(line).checkpoint.iter_entries()
    }
    (item,) = hall["footage"]
    middle = (item["first_seq"] + item["last_seq"]) // 2
    start_seq = next(s for s in range(middle, item["last_seq"]) if not signed[s][1])
    keyframe = max(s for s in range(item["first_seq"], start_seq) if signed[s][1])
    start_us = signed[start_seq][0]
    end_us = start_us + 400_000
    last = max(s for s in range(start_seq, item["last_seq"] + 1) if signed[s][0] <= end_us)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    out = build_bundle(
        recorded.data,
        recorded.session,
        tmp_path / "cut.zip",
        cameras=["hallway-2"],
        start=epoch + timedelta(microseconds=start_us),
        end=epoch + timedelta(microseconds=end_us),
    )
    report = verify(recorded, out)
    assert report.ok, report.errors
    (cam,) = manifest_of(out)["cameras"]
    (cut,) = cam["footage"]
    assert cam["id"] == "hallway-2"
    assert cam["holes"] == [] and cam["gaps"] == []
    # From the keyframe at or before the start (so it decodes), to the end of the range.
    assert (cut["first_seq"], cut["last_seq"]) == (keyframe, last)
    folder = unzip(out, tmp_path / "cut")
    with av.open(str(folder / cut["file"])) as container:
        first = next(container.demux(container.streams.video[0]))
        assert first.is_keyframe and first.pts == 0
    assert ffprobe_frames(folder / cut["file"]) == ("h264", cut["frames"])


def session_times(bundle: Path) -> tuple[int, int, dict[str, dict[int, int]]]:
    """The signed session_start and session_end (µs) of a bundle, and each camera's
    signed capture times by seq."""
    manifest = manifest_of(bundle)
    with zipfile.ZipFile(bundle) as zf:
        entries = [json.loads(line) for line in zf.read(manifest["audit"]["file"]).splitlines()]
        captures = {
            cam["id"]: {
                seq: fields[0]
                for line in zf.read(cam["checkpoints"]).splitlines()
                for seq, fields in custody.parse_record(line).checkpoint.iter_entries()
            }
            for cam in manifest["cameras"]
        }
    (start,) = [round(e["t"] * 1e6) for e in entries if e["event"] == "session_start"]
    (end,) = [round(e["t"] * 1e6) for e in entries if e["event"] == "session_end"]
    return start, end, captures


@pytest.mark.parametrize("edge", ["in-pre-roll", "around-all", "to-before-end", "from-after-start"])
def test_time_ranges_at_the_sessions_edges_verify(
    recorded: Recorded, tmp_path: Path, edge: str
) -> None:
    """The signed first and last seq bind a range that covers them (judged by the signed
    times, whatever the range's fields say), and a range that stops short of them does not
    owe them: genuine exports at the edges verify without a hole (review 2)."""
    start, end, captures = session_times(recorded.bundle)
    last_at = max(captures["front-door"].values())
    ranges = {
        "in-pre-roll": (start - 200_000, None),  # after the first seq, before the press
        "around-all": (start - 60_000_000, end + 60_000_000),
        "to-before-end": (None, last_at - 300_000),
        "from-after-start": (start + 300_000, None),
    }
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    lo, hi = ranges[edge]
    out = build_bundle(
        recorded.data,
        recorded.session,
        tmp_path / "edge.zip",
        start=None if lo is None else epoch + timedelta(microseconds=lo),
        end=None if hi is None else epoch + timedelta(microseconds=hi),
    )
    report = verify(recorded, out)
    assert report.ok, report.errors
    assert report.frames == report.frames_verified > 0
    for cam in manifest_of(out)["cameras"]:
        assert cam["holes"] == [] and cam["gaps"] == [], cam
        (item,) = cam["footage"]
        if edge == "around-all":
            assert item["first_seq"] == 0 and item["frames"] > 100
        elif edge == "in-pre-roll":  # from a keyframe of the pre-roll after the first
            assert item["first_seq"] > 0 and captures[cam["id"]][item["first_seq"]] < start
    assert {f.part for f in report.warnings} == {"selection"}, report.warnings


def test_a_bundle_and_the_folder_made_for_it_are_the_receivers_alone(
    recorded: Recorded, tmp_path: Path
) -> None:
    """A receiver run by hand has umask 022: its exports were 0644 in a 0755 folder,
    while the recordings they copy are 0640 (found by a review)."""
    old = os.umask(0o022)
    try:
        out = build_bundle(
            recorded.data, recorded.session, tmp_path / "exports" / "b.zip", cameras=["hallway-2"]
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o700
    assert verify(recorded, out).ok


async def test_a_session_across_an_agent_restart_verifies(tmp_path: Path) -> None:
    """Before the restart live and from RAM, after it from sealed segments: all signed."""
    async with Receiver(tmp_path / "receiver", "127.0.0.1", 0) as receiver:
        config = load_config(write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=2))
        async with Agent(config) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(75)
            press_button(agent)
            await agent.wait_until(lambda: agent.emergency.active is not None)
            session = agent.emergency.active
            assert session is not None
            stream = agent.uplink.stream(session.id)
            assert stream is not None
            await agent.uplink.wait_until(
                lambda: min(stream.acked) >= stream.open.cameras[0].first_seq + 20
            )
        async with Agent(config) as agent:  # resumes the session by itself
            await agent.wait_until(lambda: agent.uplink.stream(session.id) is not None)
            resumed = agent.uplink.stream(session.id)
            assert resumed is not None
            cams = resumed.open.cameras
            await agent.uplink.wait_until(
                lambda: all(a >= c.live_seq + 10 for c, a in zip(cams, resumed.acked, strict=True))
            )
            agent.end("test finished")
            await agent.uplink.wait_settled(session.id)
            # Exported before the device signed its trail: its session_end is not signed.
            early = await asyncio.to_thread(
                build_bundle, receiver.data_dir, session.id, tmp_path / "early.zip"
            )
            await asyncio.to_thread(agent.audit.checkpoint)
            agent.uplink.audit_recorded()
            await agent.uplink.wait_until(lambda: agent.uplink.audit_acked >= agent.audit.head_n)
            refused = agent.uplink.stats.checkpoints_refused
        session_dir = receiver.store.get(session.id).directory
        held = receiver.ingest.custody(session_dir)
        assert not held._seen  # a closed session's checkpoint ids leave memory
        records = custody.read_records(session_dir / "chain" / "front-door.jsonl")
        assert records and held.write(records) == 0  # still known: read again from disk
    sources = {
        r.source
        for cam in ("front-door", "hallway-2")
        for r in custody.read_records(session_dir / "chain" / f"{cam}.jsonl")
    }
    assert sources == {"uplink", "segment"}  # sealed backfill brought its own checkpoints
    assert refused == 0
    bundle = build_bundle(tmp_path / "receiver", session.id, tmp_path / "restart.zip")
    device = load_private_key(config.device_key).public_key()
    report = verify_bundle(
        bundle, device_key=device, receiver_key=evidence_key(tmp_path / "receiver").public_key()
    )
    assert report.ok, report.errors
    assert report.frames == report.frames_verified > 0
    # Exported once the session ended but before the device signed its end: the manifest
    # says so (as of a session still streaming), and the verifier says what it cannot
    # check. Said otherwise, it fails: a tail cut from every camera could not be told.
    keys = {"device_key": device, "receiver_key": evidence_key(tmp_path / "receiver").public_key()}
    assert manifest_of(early)["selection"]["open_session"]
    assert not manifest_of(bundle)["selection"]["open_session"]
    early_report = verify_bundle(early, **keys)
    assert early_report.ok, early_report.errors
    assert any(
        f.part == "selection" and "before the device signed the session's end" in f.what
        for f in early_report.warnings
    ), early_report.warnings
    # Only facts: the numbers reserved before the restart and never used, declared lost by
    # the receiver, and the audit entries since its last signed checkpoint.
    assert {f.part for f in report.warnings} <= {
        "camera front-door", "camera hallway-2", "audit/demo-agent-1.log"
    }, report.warnings  # fmt: skip


def test_the_device_key_is_checked_through_its_enrollment_certificate(
    recorded: Recorded, tmp_path: Path
) -> None:
    """With ``--authority``: the bundle's device key must be the one the district enrolled."""
    data = tmp_path / "receiver"
    shutil.copytree(recorded.data, data)
    session_dir = data / "recordings" / recorded.session
    authority = Ed25519PrivateKey.generate()
    now = int(time.time())

    def certify(key: Ed25519PrivateKey, device: str = "demo-agent-1") -> dict[str, str]:
        return sign_enrollment(
            authority, version=1, device=device, device_key=key.public_key(),
            building="lincoln-elementary", receiver_url="wss://127.0.0.1:8443/v1/uplink",
            receiver_pin="sha256:" + "00" * 32, recipients=[pyrage.x25519.Identity.generate()
            .to_public().__str__()], cameras=[{"id": "hallway-2", "zone": "interior"}],
            iat=now - 3600, exp=now + 3600,
        )  # fmt: skip

    def bundle_with(certificate: dict[str, str], name: str) -> Path:
        keys = json.loads((session_dir / "chain" / "keys.json").read_bytes())
        (entry,) = keys.values()
        entry["certificate"] = certificate
        (session_dir / "chain" / "keys.json").write_text(json.dumps(keys))
        return build_bundle(data, session_dir.name, tmp_path / name)

    good = bundle_with(certify(recorded.device_key), "good.zip")
    report = verify_bundle(good, authority=authority.public_key())
    assert report.ok, report.errors
    assert report.frames == report.frames_verified
    other = Ed25519PrivateKey.generate()
    parts = failed_parts(verify_bundle(good, authority=other.public_key()))
    assert any("refused: unknown_key" in w for w in next(iter(parts.values())))
    wrong = bundle_with(certify(Ed25519PrivateKey.generate()), "wrong.zip")  # another key
    parts = failed_parts(verify_bundle(wrong, authority=authority.public_key()))
    assert any("not the certificate of this device and key" in w for v in parts.values() for w in v)
    assert any("not a trusted device key" in w for v in parts.values() for w in v)


# -- tampering: each is named ---------------------------------------------------------------


def flip_sample_byte(folder: Path, manifest: dict[str, Any]) -> str:
    """Flip a byte inside the 10th sample's data of the first MP4."""
    name = mp4s(manifest)[0]["file"]
    path = folder / name
    with av.open(str(path)) as container:
        packets = [pk for pk in container.demux(container.streams.video[0]) if pk.size]
        pos = int(packets[10].pos) + packets[10].size // 2
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))
    return name


def delete_file(folder: Path, manifest: dict[str, Any]) -> str:
    name = mp4s(manifest)[-1]["file"]
    (folder / name).unlink()
    return name


def add_file(folder: Path, manifest: dict[str, Any]) -> str:
    name = "footage/hallway-2/extra.mp4"
    (folder / name).write_bytes(b"\x00" * 100)
    return name


def alter_manifest(folder: Path, manifest: dict[str, Any]) -> str:
    doc = json.loads((folder / "manifest.json").read_bytes())
    doc["session"]["meta"]["building"] = "another-school"
    (folder / "manifest.json").write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    return "manifest.json"


def alter_checkpoint(folder: Path, manifest: dict[str, Any]) -> str:
    name = manifest["cameras"][0]["checkpoints"]
    lines = (folder / name).read_bytes().split(b"\n")
    record = json.loads(lines[1])
    record["entries"][3][0] += 1_000_000  # claim the frame was captured a second later
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    (folder / name).write_bytes(b"\n".join(lines))
    return name


def swap_device_key(folder: Path, manifest: dict[str, Any]) -> str:
    name = manifest["device"]["keys"][0]["file"]
    (folder / name).write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    return name


def truncate_footage(folder: Path, manifest: dict[str, Any]) -> str:
    name = mp4s(manifest)[0]["file"]
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return name


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (flip_sample_byte, ["altered", "not the footage the device signed"]),
        (delete_file, ["missing"]),
        (add_file, ["extra"]),
        (alter_manifest, ["signature does not verify"]),
        (alter_checkpoint, ["altered", "do not chain to its signed head"]),
        (swap_device_key, ["altered"]),
        (truncate_footage, ["altered"]),
    ],
)
def test_tampering_is_named(
    recorded: Recorded,
    tmp_path: Path,
    tamper: Callable[[Path, dict[str, Any]], str],
    says: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = unpacked(recorded, tmp_path)
    part = tamper(folder, manifest_of(recorded.bundle))
    report = verify(recorded, folder)
    assert not report.ok
    named = "\n".join(f"{f.part}: {f.what}" for f in report.errors)
    for words in says:
        assert any(part in f.part and words in f.what for f in report.errors) or (
            words in named and part in named
        ), named
    args = ["--device-key", recorded.device_pub, "--receiver-key", recorded.receiver_pub]
    assert cli("evidence", "verify", folder, *args) == 1
    assert part in capsys.readouterr().out


def test_swapped_device_key_is_not_the_given_one(recorded: Recorded, tmp_path: Path) -> None:
    folder = unpacked(recorded, tmp_path)
    swap_device_key(folder, manifest_of(recorded.bundle))
    parts = failed_parts(verify(recorded, folder))
    assert any("not the given" in what for what in parts["device"])
    # Without the real key, the swapped one signs nothing in the bundle.
    parts = failed_parts(verify_bundle(folder))
    assert any(
        "not a trusted device key" in w for k, v in parts.items() if "chain/" in k for w in v
    )


def test_truncated_footage_names_the_samples_lost(recorded: Recorded, tmp_path: Path) -> None:
    folder = unpacked(recorded, tmp_path)
    name = truncate_footage(folder, manifest_of(recorded.bundle))
    what = failed_parts(verify(recorded, folder))[name]
    assert any("truncated" in w or "unreadable" in w for w in what), what


def test_a_byte_flipped_inside_the_zip_is_named(recorded: Recorded, tmp_path: Path) -> None:
    manifest = manifest_of(recorded.bundle)
    name = mp4s(manifest)[0]["file"]
    with zipfile.ZipFile(recorded.bundle) as zf:
        info = zf.getinfo(name)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(recorded.bundle.read_bytes())
    data[start + info.file_size // 2] ^= 1
    copy = tmp_path / "flipped.zip"
    copy.write_bytes(bytes(data))
    parts = failed_parts(verify(recorded, copy))
    assert name in parts and any("altered" in w for w in parts[name])


# -- the receiver refuses a checkpoint that does not verify ----------------------------------


class RawDevice:
    """A device speaking the uplink by hand: the test decides every message."""

    def __init__(self, receiver: Receiver, key: Ed25519PrivateKey, device: str) -> None:
        self.receiver, self.key, self.device = receiver, key, device
        self.conn = p.Uplink(p.Role.AGENT)
        self.acked = -1
        self.chain_acks: list[p.ChainAck] = []
        self.errors: list[p.Error] = []
        self.changed = Changes()

    async def __aenter__(self) -> RawDevice:
        self.http = aiohttp.ClientSession()
        self.ws, _ = await connect_device(
            self.http, self.receiver, self.conn, self.key, self.device
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self._reader
        await self.http.close()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                event = self.conn.receive(msg.data)
                if isinstance(event, p.Ack):
                    self.acked = max(self.acked, event.seq)
                elif isinstance(event, p.ChainAck):
                    self.chain_acks.append(event)
                elif isinstance(event, p.Error):
                    self.errors.append(event)
                self.changed.notify()

    async def send(self, event: p.Event) -> None:
        wire = self.conn.send(event)
        await (self.ws.send_bytes(wire) if isinstance(wire, bytes) else self.ws.send_str(wire))

    async def wait(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(20):
            await self.changed.wait_until(lambda: predicate() or bool(self.errors))
        assert not self.errors, self.errors


async def test_a_checkpoint_with_a_bad_signature_is_refused(
    tmp_path: Path, receiver: Receiver
) -> None:
    key = new_private_key(tmp_path / "dev.key")
    (receiver.devices_dir / "dev-1.pub").write_bytes(public_pem(key.public_key()))
    packets = make_h264_packets(40, width=160, height=120)
    extradata = packets[0][0][: packets[0][0].find(b"\x00\x00\x00\x01\x65")]
    desc = p.CameraDesc(0, "cam", "interior", "h264", 160, 120, 30.0, extradata, 0, 0)
    cams = chain.Chains("dev-1", key)
    made: list[chain.Checkpoint] = []
    async with RawDevice(receiver, key, "dev-1") as dev:
        await dev.send(p.SessionOpen("s-chain", "bldg", {"kind": "test"}, 1.0, 2.0, (desc,)))
        for seq, (payload, keyframe) in enumerate(packets):
            made += cams.add("cam", seq, 1_000_000 + seq * 33_333, keyframe, "h264", payload)
            await dev.send(p.Media(p.MediaKind.LIVE, 0, seq, 1_000_000 + seq * 33_333,
                                   keyframe, False, payload))  # fmt: skip
        made += cams.cut("cam", len(packets) - 1)  # the session's end
        good, forged = made
        bad_sig = bytearray(forged.sig)
        bad_sig[0] ^= 1
        wire = chain.to_wire(forged, "s-chain", 0)
        await dev.send(p.Chain(**{**vars_of(wire), "sig": p.b64url(bytes(bad_sig))}))
        await dev.wait(lambda: len(dev.chain_acks) == 1)
        (refused,) = dev.chain_acks
        assert (refused.first, refused.last, refused.result) == (
            forged.first, forged.last, "bad_signature"
        )  # fmt: skip
        # Nothing else changed: the connection is up, the footage is acknowledged.
        await dev.send(chain.to_wire(good, "s-chain", 0))
        await dev.wait(lambda: len(dev.chain_acks) == 2)
        assert (dev.chain_acks[1].first, dev.chain_acks[1].result) == (good.first, "ok")
        await dev.wait(lambda: dev.acked >= 38)
        await dev.send(p.SessionClose("s-chain", "test"))
        await dev.wait(lambda: dev.acked == 39)
    assert receiver.ingest.chain_refused == {"bad_signature": 1}
    session_dir = receiver.store.get("s-chain").directory
    records = custody.read_records(session_dir / "chain" / "cam.jsonl")
    assert [(r.checkpoint.first, r.result) for r in records] == [
        (forged.first, "bad_signature"), (good.first, "ok")
    ]  # fmt: skip
    (summary,) = receiver.store.sessions()
    assert summary.cameras[0].frames_durable == 40


def vars_of(event: p.Chain) -> dict[str, Any]:
    return {name: getattr(event, name) for name in p.Chain.__slots__}


# -- the command line's export is in the access log -----------------------------------------


def receiver_copy(recorded: Recorded, tmp_path: Path) -> Path:
    """The recorded receiver's data, this test's own, with an access log of its own (the
    module's other tests export from the shared one)."""
    data = shutil.copytree(recorded.data, tmp_path / "receiver")
    (data / "access.log").unlink(missing_ok=True)
    return data


def access_entries(data: Path) -> list[dict[str, Any]]:
    path = data / "access.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


def test_a_command_line_export_is_in_the_access_log_and_the_disclosure_report(
    recorded: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: every export is in the access log (who, session, cameras, range, file), as
    the viewer's are, and ``audit report --access-log`` lists it under the session."""
    data = receiver_copy(recorded, tmp_path)
    (hall,) = [c for c in manifest_of(recorded.bundle)["cameras"] if c["id"] == "hallway-2"]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    start = epoch + timedelta(microseconds=hall["footage"][0]["first_capture_us"] + 500_000)
    end = start + timedelta(seconds=1)
    out = tmp_path / "case" / "case.zip"
    assert cli("evidence", "export", "--data", data, "--session", recorded.session,
               "--camera", "hallway-2", "--from", start.isoformat(), "--to", end.isoformat(),
               "--out", out) == 0  # fmt: skip
    assert f"evidence bundle of session {recorded.session}: {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.zip"]  # nothing staged left

    entries = access_entries(data)
    (entry,) = entries
    assert {k: entry[k] for k in ("action", "who", "role", "session", "camera", "cameras")} == {
        "action": "evidence_export",
        "who": f"local:{getpass.getuser()}",
        "role": "local-admin",
        "session": recorded.session,
        "camera": "hallway-2",
        "cameras": ["hallway-2"],
    }
    iso = [t.isoformat().replace("+00:00", "Z") for t in (start, end)]
    assert [entry["from"], entry["to"]] == iso
    assert (entry["file"], entry["path"]) == ("case.zip", str(out.resolve()))
    assert entry["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert cli("receiver", "access", "verify", "--data", data) == 0
    assert capsys.readouterr().out.startswith(f"OK: {len(entries)} entries, chain intact")

    # Every camera, the whole session: the entry names them all, and no range.
    whole = tmp_path / "whole.zip"
    assert cli("evidence", "export", "--data", data, "--session", recorded.session,
               "--out", whole) == 0  # fmt: skip
    last = access_entries(data)[-1]
    cameras = manifest_of(recorded.bundle)["selection"]["cameras"]
    assert len(cameras) > 1
    assert {k: last[k] for k in ("camera", "cameras", "from", "to")} == {
        "camera": None,
        "cameras": cameras,
        "from": None,
        "to": None,
    }

    (trail,) = (data / "audit").glob("*.log")  # the device's trail, as the receiver keeps it
    capsys.readouterr()
    assert cli("audit", "report", trail, "--access-log", data / "access.log") == 0
    report = capsys.readouterr().out
    viewed = [line.rsplit(", ", 1)[0] for line in report.splitlines() if "viewed by:" in line]
    me = f"local:{getpass.getuser()} (local-admin)"
    assert viewed == [
        f"  viewed by:    {me}, evidence_export camera hallway-2",
        f"  viewed by:    {me}, evidence_export",
    ], report


def test_an_export_that_cannot_be_logged_is_not_given_out(
    recorded: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = receiver_copy(recorded, tmp_path)
    (data / "access.log").mkdir()  # what cannot be appended to, even by root
    out = tmp_path / "case.zip"
    assert cli("evidence", "export", "--data", data, "--session", recorded.session,
               "--out", out) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err == (
        f"breakglass: error: {out} not exported: the access log {data / 'access.log'} cannot "
        "be written (Is a directory); every export must be in it\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["receiver"]  # no bundle, nothing staged
    (data / "access.log").rmdir()
    assert access_entries(data) == []


def test_an_export_whose_entry_cannot_be_made_durable_is_not_given_out(
    recorded: Recorded,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fills up between the bundle and its entry: no bundle, and an error."""
    data = receiver_copy(recorded, tmp_path)

    def disk_full(self: AccessLog, batch: list[dict[str, Any]]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(AccessLog, "_append", disk_full)
    out = tmp_path / "case.zip"
    assert cli("evidence", "export", "--data", data, "--session", recorded.session,
               "--out", out) == 1  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"breakglass: error: {out} not exported: the access log {data / 'access.log'} cannot "
        "be written (No space left on device); every export must be in it\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["receiver"]  # no bundle, nothing staged
    assert access_entries(data) == []


def test_the_seqs_owed_reach_the_sessions_signed_first_and_last() -> None:
    """A camera's part of a bundle accounts for its seqs from its first in the session (the
    signed disclosure) to its last (the signed session_end) when the selection covers
    them (by the signed capture times, else the signed start and end), or when its
    footage stops well short of the selection's edge; the exporter declares by this rule
    and the verifier checks by it (review 2: a range switched the signed bounds off)."""
    entries = [
        {"event": "session_start", "t": 50.0, "cameras": ["a"]},
        {"event": "disclosure", "cameras": [{"id": "a", "zone": "z", "first": 10}]},
        {"event": "disclosure", "cameras": [{"id": "a", "zone": "z", "first": 12}]},  # resumed
        {"event": "session_end", "t": 100.0, "cameras": [{"id": "a", "last": 90}]},
        {"event": "session_end", "cameras": [{"id": "b", "last": "x"}, "junk"]},
    ]
    seqs = session_seqs(entries)
    assert (dict(seqs.first), dict(seqs.last), seqs.end_us) == ({"a": 10}, {"a": 90}, 100_000_000)
    assert seqs.start_us == 50_000_000
    files, none = [(20, 40)], ()
    everything = selected_bounds(seqs, "a", None, None)
    assert everything == (10, 90)
    assert owed_seqs(files, none, None, None, everything) == [(10, 90)]
    # A time range from before the signed start covers the first seq (its capture time not
    # known); one to the signed end or later covers the last.
    assert selected_bounds(seqs, "a", 5, 99_000_000) == (10, None)
    assert selected_bounds(seqs, "a", 60_000_000, 99_000_000) == (None, None)
    assert selected_bounds(seqs, "a", None, 100_000_000) == (10, 90)
    s60 = selected_bounds(seqs, "a", 60_000_000, None)
    assert owed_seqs(files, none, 60_000_000, None, s60) == [(20, 90)]
    # The capture times the device signed decide where the bundle has them.
    signed = {10: 40_000_000, 90: 95_000_000}
    assert selected_bounds(seqs, "a", 45_000_000, 96_000_000, (), signed.get) == (None, 90)
    assert selected_bounds(seqs, "a", 5, 94_000_000, (), signed.get) == (10, None)
    # Footage that begins well after the range's start, or ends well before its end, owes
    # the signed bounds; unless the seq just outside it was captured outside the range.
    short = {20: 70_000_000, 40: 80_000_000}
    assert selected_bounds(seqs, "a", 60_000_000, 99_000_000, files, short.get) == (10, 90)
    first, last = bound_reasons(seqs, "a", 60_000_000, 99_000_000, files, short.get)
    assert first is not None and "begins at" in first[1] and "well after" in first[1]
    assert last is not None and "ends at" in last[1] and "well before" in last[1]
    near = {**short, 19: 59_000_000, 41: 99_500_000}
    assert selected_bounds(seqs, "a", 60_000_000, 99_000_000, files, near.get) == (None, None)
    close = {20: 60_500_000, 40: 98_500_000}  # within the margin of the range's edges
    assert selected_bounds(seqs, "a", 60_000_000, 99_000_000, files, close.get) == (None, None)
    # No footage at all: the whole session is owed; a camera that streamed nothing owes none.
    assert owed_seqs([], none, None, None, everything) == [(10, 90)]
    empty = session_seqs(
        [
            {"event": "disclosure", "cameras": [{"id": "c", "first": 7}]},
            {"event": "session_end", "cameras": [{"id": "c", "last": 6}]},
        ]
    )
    assert selected_bounds(empty, "c", None, None) == (None, None)
    assert selected_bounds(seqs, "unknown", None, None) == (None, None)
