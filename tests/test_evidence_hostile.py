"""Hostile evidence bundles: each is a genuine bundle, altered, and must be named, never crash.

One emergency is recorded for the module, as ``tests/test_evidence.py`` records
it; each test mutates its own copy of the bundle. Edits an insider could make
are re-signed with the receiver's genuine evidence key (so only the device's
signatures can catch them); the device key signs nothing a device would not
(except where a test says it stands for another session's genuine footage).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import av
import pytest

from agent import audit, chain
from provisioning.documents import b64url, canonical
from provisioning.keys import kid as key_id
from receiver import custody
from receiver import evidence_verify as ev
from receiver.evidence import _Writer, build_bundle
from receiver.evidence_footage import _span
from receiver.evidence_format import MANIFEST_CONTEXT, TIME_BASE, ZIP_TIME, evidence_key
from receiver.evidence_verify import BundleInputError, VerifyReport
from receiver.evidence_zip import MemberError
from tests.test_evidence import Recorded, failed_parts, manifest_of, record_and_bundle, verify

pytestmark = pytest.mark.timeout(120)

FD, HW = "front-door", "hallway-2"


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """A recorded emergency and its bundle (as test_evidence's ``recorded``)."""
    return record_and_bundle(tmp_path_factory.mktemp("hostile"))


# -- building hostile bundles ---------------------------------------------------------------


def members(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write_zip(
    out: Path, items: Iterable[tuple[str, bytes]], compress: int = zipfile.ZIP_STORED
) -> Path:
    with zipfile.ZipFile(out, "w", compress) as zf:
        for name, data in items:
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = compress
            zf.writestr(info, data)
    return out


def resigned(recorded: Recorded, m: dict[str, bytes], manifest: dict[str, Any]) -> dict[str, bytes]:
    """``m`` with ``manifest`` listing its files, signed with the receiver's genuine key."""
    key = evidence_key(recorded.data)
    m = {n: d for n, d in m.items() if n not in ("manifest.json", "manifest.sig")}
    manifest["files"] = [
        {"path": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
        for n, d in sorted(m.items())
    ]
    body = canonical(manifest)
    m["manifest.json"] = body
    sig = b64url(key.sign(MANIFEST_CONTEXT + body))
    m["manifest.sig"] = canonical({"kid": key_id(key.public_key()), "sig": sig})
    return m


def insider(
    recorded: Recorded, tmp: Path, m: dict[str, bytes], manifest: dict[str, Any]
) -> VerifyReport:
    out = write_zip(tmp / "insider.zip", sorted(resigned(recorded, m, manifest).items()))
    return verify(recorded, out)


def camera(manifest: dict[str, Any], cam: str) -> dict[str, Any]:
    (found,) = [c for c in manifest["cameras"] if c["id"] == cam]
    return found


def signed_captures(m: dict[str, bytes], manifest: dict[str, Any], cam: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for line in m[camera(manifest, cam)["checkpoints"]].splitlines():
        for seq, (capture_us, _, _) in custody.parse_record(line).checkpoint.iter_entries():
            out[seq] = capture_us
    return out


def remux(tmp: Path, mp4: bytes, seqs: range, captures: dict[int, int]) -> bytes:
    """Seqs ``seqs`` of a camera's MP4 (which starts at seq 0) as the exporter writes them."""
    src = tmp / "src.mp4"
    src.write_bytes(mp4)
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        packets = [(bytes(p), bool(p.is_keyframe)) for p in container.demux(stream) if p.size]
        writer = _Writer(tmp / "cut.mp4", stream, seqs[0], captures[seqs[0]], 30.0)
        for seq in seqs:
            writer.add(seq, packets[seq][0], packets[seq][1], captures[seq])
        writer.close()
    return (tmp / "cut.mp4").read_bytes()


def keyframes(mp4: bytes, tmp: Path) -> list[int]:
    (tmp / "k.mp4").write_bytes(mp4)
    with av.open(str(tmp / "k.mp4")) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
        return [i for i, p in enumerate(packets) if p.is_keyframe]


def footage_item(name: str, first: int, last: int, captures: dict[int, int]) -> dict[str, Any]:
    return {
        "file": name,
        "first_seq": first,
        "last_seq": last,
        "frames": last - first + 1,
        "first_capture_us": captures[first],
    }


def says(report: VerifyReport, part: str, words: str, *, error: bool = True) -> bool:
    found = report.errors if error else report.warnings
    return any(part in f.part and words in f.what for f in found)


# -- A: content the device never signed ----------------------------------------------------


def test_footage_no_camera_lists_is_named(genuine: Recorded, tmp_path: Path) -> None:
    """Old: listed in ``files`` only, it was never compared with a checkpoint (bundle OK)."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    extra = f"footage/{FD}/{FD}.500-603.mp4"
    m[extra] = m[camera(manifest, HW)["footage"][0]["file"]]
    report = insider(genuine, tmp_path, m, manifest)
    assert says(report, extra, "no camera of the manifest lists"), report.findings


def test_an_mp4_with_a_second_track_is_refused(genuine: Recorded, tmp_path: Path) -> None:
    """Old: only the first video track was checked; players show the default one (another
    camera's footage here)."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    name = camera(manifest, FD)["footage"][0]["file"]
    (tmp_path / "a.mp4").write_bytes(m[name])
    (tmp_path / "b.mp4").write_bytes(m[camera(manifest, HW)["footage"][0]["file"]])
    out = tmp_path / "two.mp4"
    with (
        av.open(str(tmp_path / "a.mp4")) as a,
        av.open(str(tmp_path / "b.mp4")) as b,
        av.open(str(out), "w", format="mp4") as o,
    ):
        real = o.add_stream_from_template(a.streams.video[0])
        fake = o.add_stream_from_template(b.streams.video[0])
        real.time_base = fake.time_base = TIME_BASE
        real.disposition = av.stream.Disposition(0)
        fake.disposition = av.stream.Disposition.default
        for src, dst in ((a, real), (b, fake)):
            for packet in src.demux(src.streams.video[0]):
                if packet.size:
                    packet.stream = dst
                    o.mux(packet)
    m[name] = out.read_bytes()
    report = insider(genuine, tmp_path, m, manifest)
    assert says(report, name, "holds 2 streams"), report.findings


# -- B: footage left out or from another time ---------------------------------------------


def test_a_camera_left_out_is_named(genuine: Recorded, tmp_path: Path) -> None:
    """Old: a camera the device disclosed could be dropped, bundle OK and not a word."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    hall = camera(manifest, HW)
    del m[hall["footage"][0]["file"]], m[hall["checkpoints"]]
    manifest["cameras"].remove(hall)
    report = insider(genuine, tmp_path, m, json.loads(json.dumps(manifest)))
    assert says(report, f"camera {HW}", "missing from the bundle"), report.findings
    # As an export of one camera: allowed, and said (what the device signs cannot tell).
    manifest["selection"]["cameras"] = [FD]
    report = insider(genuine, tmp_path, m, manifest)
    assert report.ok, report.errors
    assert says(report, f"camera {HW}", "the export selected only", error=False)


@pytest.mark.parametrize("cut", ["tail", "middle"])
def test_frames_left_out_are_named(genuine: Recorded, tmp_path: Path, cut: str) -> None:
    """Old: the manifest's (absent) holes were trusted: the last 44 frames, or 40..k-1,
    could go without a word though the device's checkpoints in the bundle sign them."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    front = camera(manifest, FD)
    (item,) = front["footage"]
    captures = signed_captures(m, manifest, FD)
    original = m.pop(item["file"])
    last = item["last_seq"]
    if cut == "tail":
        pieces = [range(0, 60)]
    else:
        k = next(i for i in keyframes(original, tmp_path) if i >= 60)
        pieces = [range(0, 40), range(k, last + 1)]
    front["footage"] = []
    for seqs in pieces:
        name = f"footage/{FD}/{FD}.{seqs[0]}-{seqs[-1]}.mp4"
        m[name] = remux(tmp_path, original, seqs, captures)
        front["footage"].append(footage_item(name, seqs[0], seqs[-1], captures))
    missing = (60, last) if cut == "tail" else (40, pieces[1][0] - 1)
    report = insider(genuine, tmp_path, m, json.loads(json.dumps(manifest)))
    what = failed_parts(report).get(f"camera {FD}", [])
    assert any(f"seqs {missing[0]}..{missing[1]}: not in the bundle" in w for w in what), what
    # Declared as a hole it is the receiver's word: a warning, named.
    front["holes"] = [list(missing)]
    report = insider(genuine, tmp_path, m, manifest)
    assert report.ok, report.errors
    assert says(report, f"camera {FD}", f"seqs {missing[0]}..{missing[1]} not in", error=False)


def test_a_tail_cut_with_its_checkpoints_is_named_by_the_signed_session_end(
    genuine: Recorded, tmp_path: Path
) -> None:
    """Old: an insider with the receiver's key dropped the session's last frames together
    with the device's checkpoints over them; nothing else the device signed named the
    session's last seq, so the bundle verified. Its signed session_end now does."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    front = camera(manifest, FD)
    (item,) = front["footage"]
    first, last = item["first_seq"], item["last_seq"]
    captures = signed_captures(m, manifest, FD)
    original = m.pop(item["file"])
    records = [custody.parse_record(line) for line in m[front["checkpoints"]].splitlines()]
    kept = [r for r in records if r.checkpoint.last < (first + last) // 2]
    keep_to = max(r.checkpoint.last for r in kept)
    m[front["checkpoints"]] = b"".join(custody.record_line(r) for r in kept)
    name = f"footage/{FD}/{FD}.{first}-{keep_to}.mp4"
    m[name] = remux(tmp_path, original, range(first, keep_to + 1), captures)
    front["footage"] = [footage_item(name, first, keep_to, captures)]
    report = insider(genuine, tmp_path, m, json.loads(json.dumps(manifest)))
    what = failed_parts(report).get(f"camera {FD}", [])
    assert any(f"seqs {keep_to + 1}..{last}: not in the bundle" in w for w in what), what
    # Declared as a hole it is the receiver's word: a warning, named.
    front["holes"] = [[keep_to + 1, last]]
    report = insider(genuine, tmp_path, m, manifest)
    assert report.ok, report.errors
    assert says(report, f"camera {FD}", f"seqs {keep_to + 1}..{last} not in", error=False)


def shifted_chain(recorded: Recorded, m: dict[str, bytes], name: str, shift_us: int) -> bytes:
    """The camera's checkpoints with every capture time moved by ``shift_us``, signed with the
    device key: the device's genuine footage of another time (another session)."""
    records = [custody.parse_record(line) for line in m[name].splitlines()]
    entries: dict[int, tuple[int, int, bytes]] = {}
    for record in records:
        for seq, (capture_us, flags, digest) in record.checkpoint.iter_entries():
            entries[seq] = (capture_us + shift_us, flags, digest)
    link_before, value = {}, chain.GENESIS
    for seq in sorted(entries):
        link_before[seq] = value
        value = chain.link(value, seq, *entries[seq])
    out = b""
    for record in records:
        cp = record.checkpoint
        packed = chain.pack_entries([entries[s] for s in range(cp.first, cp.last + 1)])
        again = chain.sign(
            recorded.device_key, cp.device, cp.camera, cp.first, link_before[cp.first], packed
        )
        out += custody.record_line(
            custody.CustodyRecord(again, record.source, record.result, record.received_at)
        )
    return out


def test_footage_captured_after_the_session_ended_is_said(
    genuine: Recorded, tmp_path: Path
) -> None:
    """Old: a checkpoint binds no session: footage the device signed an hour after this
    session ended (another session's) verified as this one's. Its seqs are within the
    session's signed last seq here (the same seqs, signed again an hour later): only a
    device whose clock stepped does that, so it is a warning; footage of another session
    has other seqs, outside the signed bounds, which fail; and without a signed last seq
    (an older agent) a late time fails."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    front = camera(manifest, FD)
    m[front["checkpoints"]] = shifted_chain(genuine, m, front["checkpoints"], 3600_000_000)
    front["footage"][0]["first_capture_us"] += 3600_000_000
    report = insider(genuine, tmp_path, m, manifest)
    name = front["footage"][0]["file"]
    assert says(report, name, "captured after the session ended", error=False), report.findings
    assert says(report, name, "clock stepped back", error=False), report.findings


def test_footage_all_from_before_the_session_is_said(genuine: Recorded, tmp_path: Path) -> None:
    """Earlier footage cannot be refused (how long the pre-roll was is not signed), but a
    camera with nothing captured after the signed session_start is named. Old: silent."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    front = camera(manifest, FD)
    m[front["checkpoints"]] = shifted_chain(genuine, m, front["checkpoints"], -3600_000_000)
    front["footage"][0]["first_capture_us"] -= 3600_000_000
    report = insider(genuine, tmp_path, m, manifest)
    assert report.ok, report.errors
    assert says(report, f"camera {FD}", "captured before the session started", error=False)


def test_an_audit_excerpt_without_its_signature_says_what_it_cannot_check(
    genuine: Recorded, tmp_path: Path
) -> None:
    """Old: only "not signed yet"; now also that the cameras and the session's end (which
    the other checks rely on) are then the receiver's word. Of a session that ended (the
    manifest says it no longer streamed) that is a failure: without the signed end a tail
    cut from every camera with its checkpoints could not be told (review 2)."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    name = manifest["audit"]["file"]
    m[name] = b"".join(m[name].splitlines(keepends=True)[:-1])  # the signed checkpoint
    report = insider(genuine, tmp_path, m, json.loads(json.dumps(manifest)))
    assert says(report, name, "the session's end is not among"), report.findings
    assert says(report, name, "whether the bundle holds every camera", error=False)
    # Whatever closed_at says (the receiver writes it).
    manifest["session"]["closed_at"] = manifest["session"]["close_reason"] = None
    report = insider(genuine, tmp_path, m, json.loads(json.dumps(manifest)))
    assert says(report, name, "the session's end is not among"), report.findings
    # Exported while it streamed, as the exporter does: what the device signed of it yet.
    manifest["selection"]["open_session"] = True
    report = insider(genuine, tmp_path, m, manifest)
    assert report.ok, report.errors
    assert says(report, name, "whether the bundle holds every camera", error=False)
    assert says(report, "selection", "still streaming", error=False)


def test_the_export_declares_signed_seqs_it_lacks(genuine: Recorded, tmp_path: Path) -> None:
    """A seq the device signed that the receiver never recorded is a declared hole (a
    warning), not a failure of a genuine bundle. Old: not declared (the verifier did not
    look)."""
    data = shutil.copytree(genuine.data, tmp_path / "receiver")
    path = data / "recordings" / genuine.session / "chain" / f"{FD}.jsonl"
    records = custody.read_records(path)
    last = max(records, key=lambda r: r.checkpoint.last).checkpoint
    capture_us = last.entry(last.last)[0]
    more = [(capture_us + 33_333 * i, 0, hashlib.sha256(b"%d" % i).digest()) for i in range(1, 7)]
    # The last checkpoint again, over six more seqs the receiver never got (as when the
    # device signs its last second before the footage arrives).
    cp = chain.sign(
        genuine.device_key, last.device, FD, last.first, last.prev,
        last.entries + chain.pack_entries(more),
    )  # fmt: skip
    with path.open("ab") as fh:
        fh.write(custody.record_line(custody.CustodyRecord(cp, "uplink", "ok", 1.0)))
    out = build_bundle(data, genuine.session, tmp_path / "b.zip")
    assert camera(manifest_of(out), FD)["holes"] == [[last.last + 1, cp.last]]
    report = verify(genuine, out)
    assert report.ok, report.errors
    assert says(report, f"camera {FD}", f"seqs {last.last + 1}..{cp.last} not in", error=False)


@pytest.mark.parametrize("edit", ["renamed", "twice", "overlap"])
def test_footage_entries_that_do_not_add_up_fail(
    genuine: Recorded, tmp_path: Path, edit: str
) -> None:
    """Old: a file named for one camera could hold another's footage; one file listed twice
    counted twice."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    hall = camera(manifest, HW)
    item = hall["footage"][0]
    if edit == "renamed":
        name = f"footage/{FD}/{FD}.900-1003.mp4"
        m[name] = m.pop(item["file"])
        item["file"] = name
        words = "named for other footage"
    elif edit == "twice":
        hall["footage"].append(dict(item))
        name, words = item["file"], "listed as footage more than once"
    else:  # seqs 0..9 once more, in a file of their own
        name = f"footage/{HW}/{HW}.0-9.mp4"
        m[name] = remux(tmp_path, m[item["file"]], range(10), signed_captures(m, manifest, HW))
        hall["footage"].append({**item, "file": name, "last_seq": 9, "frames": 10})
        name, words = f"camera {HW}", "are in two of its files"
    report = insider(genuine, tmp_path, m, manifest)
    assert says(report, name, words), report.findings


# -- C: hostile zips --------------------------------------------------------------------------


def central_entry(data: bytes, name: str) -> int:
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        length = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + length] == name.encode():
            return pos
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise KeyError(name)


def corrupt(compress: int) -> Callable[[Path, Path, str], None]:
    def make(bundle: Path, out: Path, name: str) -> None:
        write_zip(out, sorted(members(bundle).items()), compress)
        data = bytearray(out.read_bytes())
        with zipfile.ZipFile(out) as zf:
            info = zf.getinfo(name)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        for i in range(start + 100, start + 140):
            data[i] ^= 0xA5
        out.write_bytes(bytes(data))

    return make


def central_patch(offset: int, value: Callable[[int], int]) -> Callable[[Path, Path, str], None]:
    def make(bundle: Path, out: Path, name: str) -> None:
        data = bytearray(bundle.read_bytes())
        pos = central_entry(bytes(data), name) + offset
        struct.pack_into("<H", data, pos, value(struct.unpack_from("<H", data, pos)[0]))
        out.write_bytes(bytes(data))

    return make


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (corrupt(zipfile.ZIP_DEFLATED), "compressed (zip method 8)"),
        (corrupt(zipfile.ZIP_LZMA), "compressed (zip method 14)"),
        (central_patch(8, lambda flags: flags | 1), "encrypted"),
        (central_patch(10, lambda _: 99), "compressed (zip method 99)"),
    ],
    ids=["corrupt-deflate", "corrupt-lzma", "encrypted", "method-99"],
)
def test_members_not_stored_are_named_not_read(
    genuine: Recorded,
    tmp_path: Path,
    make: Callable[[Path, Path, str], None],
    words: str,
) -> None:
    """Old: zlib.error, LZMAError, RuntimeError, NotImplementedError tracebacks."""
    name = camera(manifest_of(genuine.bundle), FD)["footage"][0]["file"]
    out = tmp_path / "hostile.zip"
    make(genuine.bundle, out, name)
    report = verify(genuine, out)
    assert says(report, name, words), report.findings


def test_a_name_marked_utf8_that_is_not_is_an_input_error(
    genuine: Recorded, tmp_path: Path
) -> None:
    """Old: UnicodeDecodeError out of verify_bundle (the command line said nothing of it)."""
    out = write_zip(
        tmp_path / "name.zip", [*sorted(members(genuine.bundle).items()), ("x/XX.bin", b"x")]
    )
    data = bytearray(out.read_bytes())
    for signature, flag in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.rfind(signature) + flag
        struct.pack_into("<H", data, pos, struct.unpack_from("<H", data, pos)[0] | 0x800)
    out.write_bytes(bytes(data).replace(b"x/XX.bin", b"x/\xff\xfe.bin"))
    with pytest.raises(BundleInputError, match="marked UTF-8"):
        verify(genuine, out)


# -- D: hostile JSON ---------------------------------------------------------------------------


DEEP = b"[" * 30_000 + b"]" * 30_000  # under every size limit


def manifest_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, bytes]], None]:
    def apply(m: dict[str, bytes]) -> None:
        doc = json.loads(m["manifest.json"])
        edit(doc)
        m["manifest.json"] = json.dumps(doc).encode()

    return apply


def audit_first_line(line: bytes) -> Callable[[dict[str, bytes]], None]:
    def apply(m: dict[str, bytes]) -> None:
        (name,) = [n for n in m if n.startswith("audit/")]
        m[name] = line + b"\n" + b"".join(m[name].splitlines(keepends=True)[1:])

    return apply


def nan_entry(m: dict[str, bytes]) -> None:
    (name,) = [n for n in m if n.startswith("audit/")]
    lines = m[name].splitlines(keepends=True)
    entry = json.loads(lines[0])
    entry["x"] = float("nan")
    m[name] = json.dumps(entry).encode() + b"\n" + b"".join(lines[1:])


def cam0(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["cameras"][0].update(fields)


@pytest.mark.parametrize(
    ("edit", "part", "words"),
    [
        (lambda m: m.update({"manifest.json": DEEP}), "manifest.json", "nested deeper"),
        (lambda m: m.update({"manifest.sig": DEEP}), "manifest.sig", "nested deeper"),
        (manifest_edit(cam0(gaps=[1])), "manifest.json", "cameras[0].gaps[0]"),
        (manifest_edit(cam0(holes=[5])), "manifest.json", "cameras[0].holes[0]"),
        (manifest_edit(cam0(holes=[[9, 2]])), "manifest.json", "cameras[0].holes[0]"),
        (manifest_edit(cam0(footage=5)), "manifest.json", "cameras[0].footage"),
        (manifest_edit(cam0(footage=[{"file": 3}])), "manifest.json", "cameras[0].footage[0]"),
        (manifest_edit(cam0(id=["x"])), "manifest.json", "cameras[0].id"),
        (manifest_edit(lambda d: d["device"].update(keys=7)), "manifest.json", "device.keys"),
        (manifest_edit(lambda d: d.update(cameras="x")), "manifest.json", "cameras"),
        (manifest_edit(lambda d: d.update(files=[{"path": 1}])), "manifest.json", "files[0]"),
        (manifest_edit(lambda d: d.update(session=[])), "manifest.json", "session"),
        (manifest_edit(lambda d: d.update(receiver=None)), "manifest.json", "receiver: missing"),
        (manifest_edit(lambda d: d.update(audit=3)), "manifest.json", "audit"),
        (
            manifest_edit(lambda d: d["selection"].update(from_us="x")),
            "manifest.json",
            "selection.from_us",
        ),
        (nan_entry, "audit/", "line 1: not an audit entry"),
        (audit_first_line(DEEP), "audit/", "line 1: not an audit entry"),
    ],
)
def test_hostile_json_is_named_not_a_crash(
    genuine: Recorded,
    tmp_path: Path,
    edit: Callable[[dict[str, bytes]], None],
    part: str,
    words: str,
) -> None:
    """Old: RecursionError, AttributeError, TypeError, or ValueError out of verify_bundle."""
    m = members(genuine.bundle)
    edit(m)
    report = verify(genuine, write_zip(tmp_path / "json.zip", sorted(m.items())))
    assert says(report, part, words), report.findings


# -- E: exhaustion ------------------------------------------------------------------------------


def test_findings_are_bounded(genuine: Recorded, tmp_path: Path) -> None:
    """Old: one finding per bad line (4 M for an 8 MB file, 1.3 GB) and per extra member."""
    m = members(genuine.bundle)
    name = camera(manifest_of(genuine.bundle), FD)["checkpoints"]
    m[name] = b"x\n" * 200_000
    items = [*sorted(m.items()), *((f"x/{i}", b"") for i in range(5000))]
    report = verify(genuine, write_zip(tmp_path / "many.zip", items))
    on_chain = [f for f in report.findings if f.part.startswith(name)]
    assert len(on_chain) <= ev.MAX_FINDINGS_PER_PART + 1 <= 25, len(on_chain)
    assert any("the rest not read" in f.what or "more like these" in f.what for f in on_chain)
    assert len(report.findings) <= ev.MAX_FINDINGS + 100
    assert any("more findings about" in f.what for f in report.errors)
    assert not report.ok


def test_a_member_larger_than_listed_is_never_copied(
    genuine: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old: the member was copied whole to the temporary folder (1 GiB from a 1 MB zip
    bomb) after its size was already found wrong."""
    m = members(genuine.bundle)
    name = camera(manifest_of(genuine.bundle), FD)["footage"][0]["file"]
    m[name] = bytes(8 << 20)
    copied: list[str] = []
    local = ev._Source.local

    def spy(self: Any, member: str, *args: Any) -> Path:
        copied.append(member)
        return local(self, member, *args)

    monkeypatch.setattr(ev._Source, "local", spy)
    report = verify(genuine, write_zip(tmp_path / "big.zip", sorted(m.items())))
    assert says(report, name, "altered"), report.findings
    assert name not in copied and copied


def test_footage_is_read_a_sample_at_a_time(genuine: Recorded, tmp_path: Path) -> None:
    """Old: every sample of an MP4 was held at once (RSS grew with the file)."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    name = camera(manifest, FD)["footage"][0]["file"]
    (tmp_path / "src.mp4").write_bytes(m[name])
    big = tmp_path / "big.mp4"
    with av.open(str(tmp_path / "src.mp4")) as src, av.open(str(big), "w", format="mp4") as o:
        stream = o.add_stream_from_template(src.streams.video[0])
        stream.time_base = TIME_BASE
        for i in range(80):  # 80 samples of 100 kB
            packet = av.Packet(b"\x00\x00\x00\x08" + os.urandom(100_000))
            packet.stream, packet.time_base = stream, TIME_BASE
            packet.pts = packet.dts = i * 3000
            packet.is_keyframe = i % 30 == 0
            o.mux(packet)
    m[name] = big.read_bytes()
    bundle = write_zip(tmp_path / "big.zip", sorted(resigned(genuine, m, manifest).items()))
    tracemalloc.start()
    try:
        report = verify(genuine, bundle)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert says(report, name, "not the footage the device signed"), report.findings
    assert peak < 4 << 20, peak  # the MP4 is 8 MB


# -- F: a second review (review 1-7: parts that exist nowhere, cut edges, boxes, zips) ------


def cut_each_camera(
    m: dict[str, bytes], manifest: dict[str, Any], tmp: Path, *, head: bool
) -> dict[str, tuple[int, int]]:
    """Every camera's first (``head``) or last two thirds or so cut, with the device's
    checkpoints over them, as an insider with the receiver's key would; per camera the
    seqs kept."""
    kept_seqs: dict[str, tuple[int, int]] = {}
    for cam in manifest["cameras"]:
        (item,) = cam["footage"]
        first, last = item["first_seq"], item["last_seq"]
        captures = signed_captures(m, manifest, cam["id"])
        original = m.pop(item["file"])
        records = [custody.parse_record(line) for line in m[cam["checkpoints"]].splitlines()]
        third = first + 2 * (last - first) // 3
        if head:  # from a checkpoint that begins at a keyframe, so the file decodes
            kept = [
                r
                for r in records
                if r.checkpoint.first > (first + last) // 2
                and r.checkpoint.entry(r.checkpoint.first)[1] & chain.FLAG_KEYFRAME
            ]
            a, b = min(r.checkpoint.first for r in kept), last
            kept = [r for r in records if r.checkpoint.first >= a]
        else:
            kept = [r for r in records if r.checkpoint.last < third]
            a, b = first, max(r.checkpoint.last for r in kept)
        m[cam["checkpoints"]] = b"".join(custody.record_line(r) for r in kept)
        name = f"footage/{cam['id']}/{cam['id']}.{a}-{b}.mp4"
        m[name] = remux(tmp, original, range(a, b + 1), captures)
        cam["footage"] = [footage_item(name, a, b, captures)]
        kept_seqs[cam["id"]] = (a, b)
    return kept_seqs


def audit_lines(m: dict[str, bytes], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in m[manifest["audit"]["file"]].splitlines()]


def signed_now(recorded: Recorded, entries: list[dict[str, Any]]) -> bytes:
    """``entries`` followed by the checkpoint the device signs at its minute tick."""
    last = entries[-1]
    kid = key_id(recorded.device_key.public_key())
    head = last["hash"]
    sig = recorded.device_key.sign(audit.checkpoint_message(last["n"], head, kid))
    entry = {
        "covers": last["n"], "event": audit.CHECKPOINT, "head": head, "kid": kid,
        "n": last["n"] + 1, "prev": head, "sig": b64url(sig), "t": last["t"] + 0.001,
    }  # fmt: skip
    entry["hash"] = hashlib.sha256(canonical(entry)).hexdigest()
    return b"".join(canonical(e) + b"\n" for e in [*entries, entry])


@pytest.mark.parametrize("part", ["footage", "audit", "checkpoints"])
def test_a_part_the_manifest_names_that_exists_nowhere_is_named(
    genuine: Recorded, tmp_path: Path, part: str
) -> None:
    """Review 1. Old: a file the manifest referred to but neither listed nor held was
    passed over: frames cut from the middle, listed as a file that exists nowhere (no
    hole, no warning), or the audit excerpt pointed elsewhere (every check of the session's
    cameras and end skipped): bundle OK."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    front = camera(manifest, FD)
    if part == "footage":  # as /tmp/.../phantom.py
        (item,) = front["footage"]
        captures = signed_captures(m, manifest, FD)
        original = m.pop(item["file"])
        k = next(i for i in keyframes(original, tmp_path) if i >= 60)
        front["footage"] = []
        for seqs in (range(0, 40), range(k, item["last_seq"] + 1)):
            name = f"footage/{FD}/{FD}.{seqs[0]}-{seqs[-1]}.mp4"
            m[name] = remux(tmp_path, original, seqs, captures)
            front["footage"].append(footage_item(name, seqs[0], seqs[-1], captures))
        gone = f"footage/{FD}/{FD}.40-{k - 1}.mp4"
        front["footage"].insert(1, footage_item(gone, 40, k - 1, captures))
    elif part == "audit":  # as noaudit.py
        del m[manifest["audit"]["file"]]
        gone = manifest["audit"]["file"] = "audit/elsewhere.log"
    else:
        del m[front["checkpoints"]]
        gone = front["checkpoints"] = f"chain/{FD}-elsewhere.jsonl"
    report = insider(genuine, tmp_path, m, manifest)
    assert says(report, gone, "missing: the manifest names it as"), report.findings
    if part != "audit":
        assert says(report, "footage", "frames the manifest lists were checked"), report.findings


def test_a_tail_cut_with_the_signed_end_left_out_of_the_excerpt_fails(
    genuine: Recorded, tmp_path: Path
) -> None:
    """Review 2, as tailcut.py. Old: the last two thirds of every camera cut with their
    checkpoints, the excerpt ended at the device's minute checkpoint before its
    session_end, closed_at set null: only a warning, bundle OK."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    cut_each_camera(m, manifest, tmp_path, head=False)
    entries = audit_lines(m, manifest)
    until = next(i for i, e in enumerate(entries) if e["event"] == "session_end")
    m[manifest["audit"]["file"]] = signed_now(genuine, entries[:until])
    manifest["session"]["closed_at"] = manifest["session"]["close_reason"] = None
    report = insider(genuine, tmp_path, m, manifest)
    name = manifest["audit"]["file"]
    assert says(report, name, "the session's end is not among the device's signed"), report.findings
    assert not report.ok


def test_a_tail_cut_hidden_by_a_range_is_named(genuine: Recorded, tmp_path: Path) -> None:
    """Review 2, as tailcut_range.py. Old: the last third of every camera cut with its
    checkpoints and the range's end set 1 ms before the signed session_end: the signed
    last seq was no longer owed, a warning about the range only."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    kept = cut_each_camera(m, manifest, tmp_path, head=False)
    (end,) = [e for e in audit_lines(m, manifest) if e["event"] == "session_end"]
    manifest["selection"]["to_us"] = round(end["t"] * 1e6) - 1000
    report = insider(genuine, tmp_path, m, manifest)
    for cam in manifest["cameras"]:
        last = {c["id"]: c["last"] for c in end["cameras"]}[cam["id"]]
        what = failed_parts(report).get(f"camera {cam['id']}", [])
        assert any(
            f"seqs {kept[cam['id']][1] + 1}..{last}: not in the bundle" in w
            and "well before the export's range ends" in w
            for w in what
        ), report.findings


def test_a_head_cut_hidden_by_a_range_is_named(genuine: Recorded, tmp_path: Path) -> None:
    """Review 2, as headcut.py. Old: the first half of every camera (pre-roll and press)
    cut with its checkpoints and the range's start set an hour before the session: the
    signed first seq was never owed."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    kept = cut_each_camera(m, manifest, tmp_path, head=True)
    manifest["selection"]["from_us"] = round(manifest["session"]["opened_at"] * 1e6) - 3600_000_000
    report = insider(genuine, tmp_path, m, manifest)
    for cam in manifest["cameras"]:
        what = failed_parts(report).get(f"camera {cam['id']}", [])
        assert any(
            f"seqs 0..{kept[cam['id']][0] - 1}: not in the bundle" in w
            and "before the session's signed start" in w
            for w in what
        ), report.findings


def test_frames_declared_lost_are_the_receivers_word(genuine: Recorded, tmp_path: Path) -> None:
    """Review 7: ``gaps`` are written by the receiver (unsigned), not declared by the
    device as the warning said."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    front = camera(manifest, FD)
    (item,) = front["footage"]
    captures = signed_captures(m, manifest, FD)
    original = m.pop(item["file"])
    name = f"footage/{FD}/{FD}.0-59.mp4"
    m[name] = remux(tmp_path, original, range(60), captures)
    front["footage"] = [footage_item(name, 0, 59, captures)]
    front["gaps"] = [{"first": 60, "last": item["last_seq"], "reason": "lost"}]
    report = insider(genuine, tmp_path, m, manifest)
    assert report.ok, report.errors
    (said,) = [f.what for f in report.warnings if "declared 'lost'" in f.what]
    assert "by the receiver" in said and "by the device" not in said, said
    assert " s between the signed frames around it" not in said  # none signed after it


def test_a_declared_gap_says_how_long_it_lasted_by_the_signed_capture_times() -> None:
    """A restart skips the rest of the device's block of 100,000 reserved seqs: "seqs
    111230..199999 declared 'lost'" read as 98 minutes lost where a second was (review
    s13, J1). The signed frames around the gap say how long it was."""
    assert _span(1_000_000, 2_250_000) == "; 1.2 s between the signed frames around it"
    assert _span(None, 2_250_000) == _span(1_000_000, None) == ""
    assert _span(2_000_000, 1_000_000) == ""  # a clock stepped back says nothing


def box_edit(kind: str) -> Callable[[bytes], bytes]:
    """An MP4 with its display changed in one box (nothing else: the samples, timestamps,
    sample count and track count are the exporter's)."""

    def find(data: bytes, path: list[bytes]) -> tuple[int, int]:
        start, end = 0, len(data)
        for want in path:
            pos = start
            while pos + 8 <= end:
                size, typ = struct.unpack(">I4s", data[pos : pos + 8])
                if typ == want:
                    break
                pos += size
            else:
                raise KeyError(want)
            skip = {b"stsd": 16, b"avc1": 86}.get(typ, 8)
            start, end = pos + skip, pos + size
        return start, end

    def edit(mp4: bytes) -> bytes:
        b = bytearray(mp4)
        if kind in ("tkhd", "mvhd"):  # as mirror.py: a = -1, tx = width
            parents = [b"moov", b"trak", b"tkhd"] if kind == "tkhd" else [b"moov", b"mvhd"]
            body, _ = find(mp4, parents)
            at = body + (40 if kind == "tkhd" else 36)
            struct.pack_into(">i", b, at, -0x10000)
            struct.pack_into(">i", b, at + 24, 640 << 16)
        else:  # the sample entry's btrt box (20 bytes) becomes a crop or a stretch
            path = [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd", b"avc1", b"btrt"]
            body, _ = find(mp4, path)
            b[body - 4 : body] = kind.encode()
            struct.pack_into(">II", b, body, 4, 3)
        return bytes(b)

    return edit


@pytest.mark.parametrize("kind", ["tkhd", "mvhd", "pasp", "clap"])
def test_a_display_other_than_the_pictures_is_refused(
    genuine: Recorded, tmp_path: Path, kind: str
) -> None:
    """Review 3, as mirror.py. Old: a display matrix mirroring the picture (players that
    honour it show the scene left-right swapped), a crop or a stretch: bundle OK."""
    m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
    name = camera(manifest, FD)["footage"][0]["file"]
    m[name] = box_edit(kind)(m[name])
    report = insider(genuine, tmp_path, m, manifest)
    words = {"tkhd": "display matrix", "mvhd": "display matrix", "pasp": "stretched"}
    assert says(report, name, words.get(kind, "cropped")), report.findings
    assert says(report, "footage", "frames the manifest lists were checked")


def overlapping_zip(out: Path, block: int, count: int) -> int:
    """As zipbomb.py: stored members each of whose data holds the next ones' headers and
    one shared block of zeros; returns what reading every member would read."""
    names = [f"footage/c/c.{i}-{i}.mp4" for i in range(count)]

    def local(name: str, size: int) -> bytes:
        n = name.encode()
        return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0x21, 0, 0, size, size,
                           len(n), 0) + n  # fmt: skip

    lengths = [len(local(n, 0)) for n in names]
    sizes = [sum(lengths[i + 1 :]) + block for i in range(count)]
    files = [{"path": n, "sha256": "0" * 64, "size": s} for n, s in zip(names, sizes, strict=True)]
    manifest = json.dumps({"type": "breakglass-evidence", "v": 1, "files": files}).encode()
    entries = []
    with out.open("wb") as f:
        crc = zlib.crc32(manifest)
        f.write(local("manifest.json", len(manifest))[:14] + struct.pack("<I", crc))
        f.write(local("manifest.json", len(manifest))[18:] + manifest)
        entries.append(("manifest.json", 0, len(manifest), crc))
        for i, n in enumerate(names):
            entries.append((n, f.tell(), sizes[i], 0))
            f.write(local(n, sizes[i]))
        f.write(bytes(block))
        cd = f.tell()
        for n, o, s, c in entries:
            b = n.encode()
            f.write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0x21, 0, c,
                                s, s, len(b), 0, 0, 0, 0, 0, o) + b)  # fmt: skip
        end = f.tell()
        f.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                            end - cd, cd, 0))  # fmt: skip
    return sum(sizes)


def test_overlapping_members_are_refused_and_reading_is_bounded(
    genuine: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 4, as zipbomb.py. Old: a 4 MiB zip of 40 members overlapping one another made
    the verifier read (CRC and SHA-256) 160 MiB before it looked at the signature; a
    100 MB one, hundreds of GB."""
    out = tmp_path / "bomb.zip"
    would_read = overlapping_zip(out, 4 << 20, 40)
    read = 0
    chunks = ev._Source.chunks

    def counting(self: Any, name: str, limit: int) -> Any:
        nonlocal read
        for chunk in chunks(self, name, limit):
            read += len(chunk)
            yield chunk

    monkeypatch.setattr(ev._Source, "chunks", counting)
    report = verify(genuine, out)
    assert would_read > 30 * out.stat().st_size
    assert read <= out.stat().st_size, read
    assert says(report, "footage/c/c.0-0.mp4", "members that overlap"), report.findings
    assert not says(report, "footage/c/c.39-39.mp4", "overlap")  # the last holds the block


def test_the_members_together_never_read_more_than_the_zip(
    genuine: Recorded, tmp_path: Path
) -> None:
    """Review 4: whatever the layout checks miss, reading stops at the archive's size
    (each member counted once, however often it is read)."""
    source = ev._Source(genuine.bundle)
    try:
        name = camera(manifest_of(genuine.bundle), FD)["footage"][0]["file"]
        size = source.sizes[name]
        assert len(source.read(name, size)) == len(source.read(name, size)) == size
        source._budget = size + 10  # as if the rest of the zip were this member's bytes
        with pytest.raises(MemberError, match=r"more bytes .* than the whole zip"):
            source.read(camera(manifest_of(genuine.bundle), HW)["footage"][0]["file"], 1 << 30)
    finally:
        source.close()


def test_the_signature_is_checked_before_the_footage_is_hashed(
    genuine: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 4: an unsigned manifest is said before anything it lists is read."""
    calls: list[str] = []
    for name in ("check_signature", "check_files"):
        real = getattr(ev, name)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(ev, name, spy)
    assert verify(genuine, genuine.bundle).ok
    assert calls == ["check_signature", "check_files"]


@pytest.mark.parametrize("where", ["before", "after", "comment"])
def test_bytes_around_the_zip_fail(genuine: Recorded, tmp_path: Path, where: str) -> None:
    """Review 5, as prepend.py. Old: a forged zip (front-door's footage replaced by
    hallway-2's) with the genuine bundle after it verified OK (Python reads the central
    directory at the end), while a reader that walks the local headers from the start
    (java.util.zip.ZipInputStream, jar, streaming unzippers) sees the forged members."""
    data = genuine.bundle.read_bytes()
    out = tmp_path / "around.zip"
    if where == "before":
        m, manifest = members(genuine.bundle), manifest_of(genuine.bundle)
        hall = m[camera(manifest, HW)["footage"][0]["file"]]
        m[camera(manifest, FD)["footage"][0]["file"]] = hall
        forged = write_zip(tmp_path / "forged.zip", sorted(m.items())).read_bytes()
        out.write_bytes(forged + data)
        words = f"{len(forged)} bytes before the zip's first member"
    elif where == "after":
        out.write_bytes(data + b"PK\x03\x04 more")
        words = "bytes after the zip's end record"
    else:
        with zipfile.ZipFile(shutil.copy(genuine.bundle, out), "a") as zf:
            zf.comment = b"forged"
        words = "bytes after the zip's end record (or a comment)"
    report = verify(genuine, out)
    assert says(report, "zip", words), report.findings
    assert not report.ok


def test_a_large_bundles_zip64_end_records_are_as_the_exporter_writes_them(
    genuine: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 5: a bundle over 2 GiB (or of over 65535 members) ends with zip64 records
    before the end record: allowed, as zipfile writes them."""
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 3)
    out = write_zip(tmp_path / "z64.zip", sorted(members(genuine.bundle).items()))
    assert b"PK\x06\x06" in out.read_bytes()[-200:]
    report = verify(genuine, out)
    assert report.ok, report.errors
