"""HLS playlists of recordings, served over real HTTPS on loopback and played by FFmpeg.

Recordings are made with real libx264 packets through the store's own
writer; playlists are opened with the system ``ffprobe`` and decoded whole
by ``ffmpeg -i URL -f null -``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from provisioning.tls import ensure_certificate, server_context
from receiver.fmp4 import FragmentInfo
from receiver.h264 import parameter_sets
from receiver.hls import (
    SEGMENT_MAX_S,
    STORAGE_KEY,
    SegmentCutter,
    render_playlist,
    setup_hls,
    timeline_shift,
)
from receiver.index import LocalStorage
from receiver.recording import CameraRecording, RecordingStore, SessionRecording, TrackInfo
from receiver.storage import PartEntry
from tests.media import META, PacketList

T0_US = 1_767_000_000_000_000
FRAME_US = 33_333


def track(packets: PacketList, camera: str = "cam1", live_seq: int | None = None) -> TrackInfo:
    extradata = parameter_sets(packets[0][0]).annex_b()
    return TrackInfo(camera, "interior", "h264", 320, 240, 30.0, extradata, 0, live_seq)


def capture_us(seq: int) -> int:
    return T0_US + seq * FRAME_US


async def feed(cam: CameraRecording, packets: PacketList, seqs: range) -> None:
    for seq in seqs:
        payload, key = packets[seq]
        await cam.append(seq, capture_us(seq), key, payload, preroll=False, live=True)


async def open_session(
    store: RecordingStore, packets: PacketList, live_seq: int | None = None
) -> tuple[SessionRecording, CameraRecording]:
    rec = await store.open_session("s-1", "dev-1", META, [track(packets, live_seq=live_seq)])
    return rec, rec.camera("cam1")


class Hls:
    """A store served by an aiohttp app with only the HLS routes, over TLS on 127.0.0.1."""

    def __init__(
        self,
        store: RecordingStore,
        storage: LocalStorage,
        base: str,
        client: aiohttp.ClientSession,
        cafile: Path,
    ) -> None:
        self.store = store
        self.storage = storage
        self.base = base
        self.client = client
        self.cafile = cafile

    def url(self, path: str) -> str:
        return self.base + path

    async def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        async with self.client.get(self.url(path), headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def playlist(self, camera: str = "cam1", session: str = "s-1") -> str:
        await self.storage.sync()  # what the store reported so far is in the index
        status, headers, body = await self.get(f"/hls/{session}/{camera}.m3u8")
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/vnd.apple.mpegurl")
        return body.decode()


Serve = Callable[[], AbstractAsyncContextManager[Hls]]


@pytest.fixture
def serve(tmp_path: Path) -> Serve:
    """``async with serve() as hls``: the store at ``tmp_path/rec`` served over HTTPS.

    Leaving it stops the app (the index closes) and then the store, as the
    receiver does; entering it again is a receiver restart.
    """
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    ensure_certificate(cert, key, common_name="hls test", hosts=["127.0.0.1"])

    @contextlib.asynccontextmanager
    async def serving() -> AsyncIterator[Hls]:
        async with contextlib.AsyncExitStack() as stack:
            store = await stack.enter_async_context(RecordingStore(tmp_path / "rec"))
            app = web.Application()
            setup_hls(app, store)
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(cert, key))
            await site.start()
            port = runner.addresses[0][1]
            storage = app[STORAGE_KEY]
            assert isinstance(storage, LocalStorage)
            tls = ssl.create_default_context(cafile=cert)
            client = await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls))
            )
            yield Hls(store, storage, f"https://127.0.0.1:{port}", client, cert)

    return serving


# -- what FFmpeg makes of it ---------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _tls(cafile: Path) -> list[str]:
    # The playlist's certificate is checked; FFmpeg 5.1's HLS demuxer does not pass the
    # options on to its segment requests, which it makes without checking.
    return ["-tls_verify", "1", "-ca_file", str(cafile)]


async def ffprobe_url(cafile: Path, url: str, *args: str) -> dict[str, Any]:
    """``ffprobe URL`` (its certificate checked against ``cafile``) as JSON."""
    proc = await asyncio.to_thread(
        _run, "ffprobe", "-v", "error", *_tls(cafile), *args, "-of", "json", url
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


async def ffprobe(hls: Hls, path: str, *args: str) -> dict[str, Any]:
    return await ffprobe_url(hls.cafile, hls.url(path), *args)


async def ffmpeg_decoded_frames(hls: Hls, path: str) -> int:
    """Frames ``ffmpeg -i URL -f null -`` decodes, with no error on the way."""
    return await ffmpeg_frames_url(hls.cafile, hls.url(path))


async def ffmpeg_frames_url(cafile: Path, url: str) -> int:
    """:func:`ffmpeg_decoded_frames` of any URL."""
    proc = await asyncio.to_thread(
        _run,
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-xerror",
        *_tls(cafile),
        "-i",
        url,
        "-f",
        "null",
        "-progress",
        "pipe:1",
        "-nostats",
        "-",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    frames = re.findall(r"^frame=(\d+)$", proc.stdout, re.MULTILINE)
    assert proc.stdout.rstrip().endswith("progress=end")
    return int(frames[-1])


def tags(playlist: str, name: str) -> list[str]:
    """Values of every ``#name:`` line (``""`` for a tag without a value)."""
    out = []
    for line in playlist.splitlines():
        if line == f"#{name}":
            out.append("")
        elif line.startswith(f"#{name}:"):
            out.append(line[len(name) + 2 :])
    return out


def check_playlist_rules(playlist: str) -> None:
    """RFC 8216 rules every playlist we serve must keep."""
    lines = playlist.splitlines()
    assert lines[:2] == ["#EXTM3U", "#EXT-X-VERSION:7"]
    assert tags(playlist, "EXT-X-PLAYLIST-TYPE") == ["EVENT"]
    (target,) = tags(playlist, "EXT-X-TARGETDURATION")
    for extinf in tags(playlist, "EXTINF"):
        seconds = float(extinf.rstrip(","))
        assert seconds > 0 and int(seconds + 0.5) <= int(target)
    # Every segment is EXTINF, BYTERANGE, URI, after the MAP of its part file.
    current_map = None
    for n, line in enumerate(lines):
        if line.startswith("#EXT-X-MAP:"):
            current_map = re.fullmatch(r'#EXT-X-MAP:URI="([^"]+)",BYTERANGE="\d+@0"', line)
            assert current_map is not None, line
        elif line.startswith("#EXTINF:"):
            assert lines[n + 1].startswith("#EXT-X-BYTERANGE:")
            assert current_map is not None and lines[n + 2] == current_map.group(1)
    assert lines.count("#EXT-X-ENDLIST") <= 1


def segments(playlist: str) -> list[tuple[str, int, int]]:
    """``(file, offset, size)`` of every media segment."""
    lines = playlist.splitlines()
    out = []
    for n, line in enumerate(lines):
        if line.startswith("#EXT-X-BYTERANGE:"):
            size, offset = line.split(":", 1)[1].split("@")
            out.append((lines[n + 1], int(offset), int(size)))
    return out


# -- tests ---------------------------------------------------------------------------


async def test_closed_session_plays_whole_in_ffmpeg(serve: Serve, packets: PacketList) -> None:
    """Three parts: a restart mid-GOP (a new part) and a hole; every frame decodes in order."""
    async with serve() as hls:
        rec, cam = await open_session(hls.store, packets)
        await feed(cam, packets, range(45))
    async with serve() as hls:  # the receiver restarted: the run continues in a new part
        rec, cam = await open_session(hls.store, packets)
        await feed(cam, packets, range(45, 50))
        await feed(cam, packets, range(60, 90))  # 50..59 never arrive
        await rec.close("all clear")
        parts = rec.summary().camera("cam1").parts
        assert [(p.first_seq, p.frames) for p in parts] == [(0, 45), (45, 5), (60, 30)]
        recorded = [seq for p in parts for seq in range(p.first_seq, p.last_seq + 1)]

        playlist = await hls.playlist()
        check_playlist_rules(playlist)
        assert playlist.endswith("#EXT-X-ENDLIST\n")
        assert len(tags(playlist, "EXT-X-DISCONTINUITY")) == 2  # the restart, the hole
        assert [m.split('"')[1] for m in tags(playlist, "EXT-X-MAP")] == [
            "cam1.0.mp4",
            "cam1.45.mp4",
            "cam1.60.mp4",
        ]
        total = sum(float(x.rstrip(",")) for x in tags(playlist, "EXTINF"))
        assert total == pytest.approx(len(recorded) / 30, abs=0.01)
        dates = tags(playlist, "EXT-X-PROGRAM-DATE-TIME")
        assert dates[0] == "2025-12-29T09:20:00.000Z"  # capture time of seq 0 (T0_US)
        assert "2025-12-29T09:20:01.500Z" in dates  # seq 45: the part after the restart
        assert dates[-1] == "2025-12-29T09:20:02.000Z"  # seq 60, after the hole

        url = "/hls/s-1/cam1.m3u8"
        (stream,) = (await ffprobe(hls, url, "-show_streams"))["streams"]
        assert (stream["codec_name"], stream["width"], stream["height"]) == ("h264", 320, 240)
        assert await ffmpeg_decoded_frames(hls, url) == len(recorded) == 80
        # One timeline: every packet at its capture time, the hole a jump by its length.
        doc = await ffprobe(hls, url, "-select_streams", "v:0", "-show_entries", "packet=pts_time")
        times = [float(p["pts_time"]) for p in doc["packets"]]
        assert times == pytest.approx([capture_us(s) / 1e6 for s in recorded], abs=1e-4)


async def test_live_playlist_only_grows_and_ends(serve: Serve, packets: PacketList) -> None:
    async with serve() as hls:
        rec, cam = await open_session(hls.store, packets)
        await feed(cam, packets, range(20))
        await cam.flush()
        first = await hls.playlist()
        check_playlist_rules(first)
        assert "#EXT-X-ENDLIST" not in first
        assert tags(first, "EXT-X-TARGETDURATION") == [str(SEGMENT_MAX_S)]
        assert segments(first) == []  # the first segment may still grow: not listed

        await feed(cam, packets, range(20, 70))
        await cam.flush()
        second = await hls.playlist()
        check_playlist_rules(second)
        assert second.startswith(first)
        assert tags(second, "EXTINF") == ["2.000,"]  # seqs 0..59: two GOPs
        (map_tag,) = tags(second, "EXT-X-MAP")
        init_size = int(map_tag.split('BYTERANGE="')[1].split("@")[0])
        assert segments(second)[0][:2] == ("cam1.0.mp4", init_size)
        # FFmpeg opens the live (EVENT) playlist too.
        (stream,) = (await ffprobe(hls, "/hls/s-1/cam1.m3u8", "-show_streams"))["streams"]
        assert stream["codec_name"] == "h264"

        await feed(cam, packets, range(70, 90))
        await rec.close("all clear")
        last = await hls.playlist()
        check_playlist_rules(last)
        assert last.startswith(second)  # what was listed stays, in place
        assert tags(last, "EXTINF") == ["2.000,", "1.000,"]
        assert last.endswith("cam1.0.mp4\n#EXT-X-ENDLIST\n")
        (seg1, seg2) = segments(last)
        assert seg1[1] + seg1[2] == seg2[1]  # back to back
        assert await ffmpeg_decoded_frames(hls, "/hls/s-1/cam1.m3u8") == 90


async def test_live_hole_is_listed_only_once_filled(serve: Serve, packets: PacketList) -> None:
    """Live starts at the press, the pre-roll comes later: nothing is inserted before."""
    async with serve() as hls:
        rec, cam = await open_session(hls.store, packets, live_seq=30)
        await feed(cam, packets, range(30, 90))
        await cam.flush()
        waiting = await hls.playlist()
        assert segments(waiting) == []  # seqs 0..29 are still owed
        await feed(cam, packets, range(30))  # the pre-roll: its run reaches the live one
        await cam.flush()
        filled = await hls.playlist()
        check_playlist_rules(filled)
        assert filled.startswith(waiting)
        # The pre-roll part is final (its run reached the live one); live's segment still grows.
        assert [s[0] for s in segments(filled)] == ["cam1.0.mp4"]
        await rec.close("all clear")
        closed = await hls.playlist()
        check_playlist_rules(closed)
        assert closed.startswith(filled)
        assert [s[0] for s in segments(closed)] == ["cam1.0.mp4", "cam1.30.mp4"]
        assert len(tags(closed, "EXT-X-DISCONTINUITY")) == 1
        assert await ffmpeg_decoded_frames(hls, "/hls/s-1/cam1.m3u8") == 90


async def test_after_a_restart_everything_durable_is_listed(
    serve: Serve, packets: PacketList
) -> None:
    """A camera that no longer records (its device never came back) shows all it holds."""
    async with serve() as hls:
        _, cam = await open_session(hls.store, packets)
        await feed(cam, packets, range(20))
        await feed(cam, packets, range(60, 90))  # live skipped 20..59, never backfilled
    async with serve() as hls:
        playlist = await hls.playlist()
        check_playlist_rules(playlist)
        assert "#EXT-X-ENDLIST" not in playlist  # the session is not closed
        assert [s[0] for s in segments(playlist)] == ["cam1.0.mp4", "cam1.60.mp4"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/hls/bad%20id/cam1.m3u8", 400, "invalid_id"),
        ("/hls/.hidden/cam1.m3u8", 400, "invalid_id"),
        ("/hls/s-1/Cam1.m3u8", 400, "invalid_id"),
        ("/hls/s-1/..%2Fcam1.m3u8", 400, "invalid_id"),
        ("/hls/no-such/cam1.m3u8", 404, "unknown_session"),
        ("/hls/s-1/cam9.m3u8", 404, "unknown_camera"),
        ("/hls/no-such/cam1.0.mp4", 404, "unknown_session"),
        ("/hls/s-1/cam1.7.mp4", 404, "unknown_recording"),
        ("/hls/s-1/cam9.0.mp4", 404, "unknown_recording"),
        ("/hls/s-1/session.json", 404, "unknown_recording"),
        ("/hls/s-1/..%2F..%2Fetc%2Fpasswd", 404, "unknown_recording"),
        ("/hls/bad%20id/cam1.0.mp4", 400, "invalid_id"),
    ],
)
async def test_bad_ids_and_names_are_json_errors(
    serve: Serve, packets: PacketList, path: str, status: int, code: str
) -> None:
    async with serve() as hls:
        _, cam = await open_session(hls.store, packets)
        await feed(cam, packets, range(10))
        await cam.flush()
        await hls.storage.sync()
        got, headers, body = await hls.get(path)
        assert (got, json.loads(body)["error"]) == (status, code), body
        assert headers["Content-Type"].startswith("application/json")
        assert set(json.loads(body)) == {"error", "detail"}


async def test_part_bytes_are_the_durable_ones_with_ranges(
    serve: Serve, packets: PacketList
) -> None:
    async with serve() as hls:
        rec, cam = await open_session(hls.store, packets)
        await feed(cam, packets, range(40))
        await cam.flush()
        await hls.storage.sync()
        part = await hls.storage.part("s-1", "cam1.0.mp4")
        # Bytes written but not yet fsynced (the fsync's thread writes, then syncs):
        # never served. Stand-ins here: the session writes nothing more.
        with (rec.directory / "cam1.0.mp4").open("ab") as f:
            f.write(b"\x00" * 5000)
        on_disk = (rec.directory / "cam1.0.mp4").read_bytes()
        assert len(on_disk) > part.durable_size

        status, headers, body = await hls.get("/hls/s-1/cam1.0.mp4")
        assert (status, len(body)) == (200, part.durable_size)
        assert headers["Accept-Ranges"] == "bytes"
        assert headers["Cache-Control"] == "no-store"
        # Byte for byte the file, but for each fragment's tfdt: rebased onto capture time.
        frags = await hls.storage.fragments("s-1", "cam1.0.mp4")
        assert len(frags) == part.frames == 39
        expected = bytearray(on_disk[: part.durable_size])
        for seq, frag in enumerate(frags):
            at = frag.decode_time_at
            assert struct.unpack_from(">Q", body, at)[0] == (capture_us(seq) * 9 + 50) // 100
            expected[at : at + 8] = body[at : at + 8]
        assert body == bytes(expected)

        status, headers, ranged = await hls.get("/hls/s-1/cam1.0.mp4", Range="bytes=100-899")
        assert (status, ranged) == (206, body[100:900])
        assert headers["Content-Range"] == f"bytes 100-899/{part.durable_size}"
        # A range across a tfdt field is patched in part, like the whole.
        at = frags[1].decode_time_at
        _, _, cut = await hls.get("/hls/s-1/cam1.0.mp4", Range=f"bytes={at + 3}-{at + 20}")
        assert cut == body[at + 3 : at + 21]
        _, _, tail = await hls.get("/hls/s-1/cam1.0.mp4", Range="bytes=-10")
        assert tail == body[-10:]
        _, _, rest = await hls.get("/hls/s-1/cam1.0.mp4", Range=f"bytes={len(body) - 5}-")
        assert rest == body[-5:]
        beyond = f"bytes={part.durable_size}-"
        status, headers, err = await hls.get("/hls/s-1/cam1.0.mp4", Range=beyond)
        assert (status, json.loads(err)["error"]) == (416, "bad_range")
        assert headers["Content-Range"] == f"bytes */{part.durable_size}"
        status, _, err = await hls.get("/hls/s-1/cam1.0.mp4", Range="bytes=0-1,5-6")
        assert (status, json.loads(err)["error"]) == (416, "bad_range")
        async with hls.client.head(hls.url("/hls/s-1/cam1.0.mp4")) as resp:
            assert (resp.status, resp.content_length) == (200, part.durable_size)
        os.truncate(rec.directory / "cam1.0.mp4", part.durable_size)  # the stand-ins go
        await rec.close("done")


# -- sans-IO pieces ------------------------------------------------------------------------


def frag(offset: int, start: int, duration: int, keyframe: bool) -> FragmentInfo:
    return FragmentInfo(offset, 10, 1, start, duration, keyframe, offset + 4)


def fragments(pattern: str, duration: int = 3000) -> list[FragmentInfo]:
    """``K`` a keyframe, ``.`` another frame; 10 bytes each from offset 100."""
    return [frag(100 + 10 * i, i * duration, duration, c == "K") for i, c in enumerate(pattern)]


def test_cutter_cuts_at_keyframes_after_the_target() -> None:
    cutter = SegmentCutter(90_000, 100, target_s=2.0, max_s=6.0)
    gop = "K" + "." * 29  # one second at 30 fps
    frags = fragments(gop * 5)
    cutter.feed(frags[:61])
    assert [(s.first_sample, s.samples, s.keyframe) for s in cutter.segments] == [(0, 60, True)]
    assert cutter.pending is not None and cutter.pending.samples == 1
    cutter.feed(frags)  # again from the start: what it has is skipped
    assert [(s.first_sample, s.samples) for s in cutter.segments] == [(0, 60), (60, 60)]
    assert cutter.pending is not None and (cutter.pending.first_sample, cutter.pending.samples) == (
        120,
        30,
    )
    seg = cutter.segments[1]
    assert (seg.offset, seg.size, seg.duration, seg.start) == (700, 600, 180_000, 180_000)
    with pytest.raises(ValueError, match="expected one at"):
        cutter.feed([frag(5000, 0, 3000, True)])


def test_cutter_cuts_a_long_gop_at_the_maximum() -> None:
    cutter = SegmentCutter(90_000, 100, target_s=2.0, max_s=6.0)
    cutter.feed(fragments("K" + "." * 299))  # a ten-second GOP
    assert [s.samples for s in cutter.segments] == [180]  # six seconds, cut at a P-frame
    assert [s.keyframe for s in cutter.segments] == [True]
    assert cutter.pending is not None and not cutter.pending.keyframe


def _part(**changes: Any) -> PartEntry:
    base: dict[str, Any] = {
        "file": "cam1.0.mp4",
        "camera_id": "cam1",
        "run": 0,
        "first_seq": 0,
        "frames": 150,
        "first_capture_us": T0_US + 123,
        "last_capture_us": None,
        "created_us": T0_US,
        "init_size": 100,
        "durable_size": 1600,
        "timescale": 90_000,
        "base_time": 0,
        "final": True,
    }
    base.update(changes)
    return PartEntry(**base)


def test_playlist_target_duration_and_dates() -> None:
    cutter = SegmentCutter(90_000, 100)
    cutter.feed(fragments("K" + "." * 59 + "K" + "." * 89))
    pending = cutter.pending
    assert pending is not None
    part = _part()
    text = render_playlist([(part, [*cutter.segments, pending])], ended=True)
    check_playlist_rules(text)
    assert tags(text, "EXT-X-TARGETDURATION") == ["6"]
    assert tags(text, "EXTINF") == ["2.000,", "3.000,"]
    # 123 µs after T0 rounds to the millisecond; the second segment is 2 s later.
    assert tags(text, "EXT-X-PROGRAM-DATE-TIME") == [
        "2025-12-29T09:20:00.000Z",
        "2025-12-29T09:20:02.000Z",
    ]
    # A frame longer than the maximum (a stalled camera) raises the target instead.
    long = SegmentCutter(90_000, 100)
    long.feed([frag(100, 0, 9 * 90_000, True), frag(110, 9 * 90_000, 3000, False)])
    text = render_playlist([(part, long.segments)], ended=False)
    assert tags(text, "EXT-X-TARGETDURATION") == ["9"]
    # Without a saved capture time: no dates; the timeline starts at the file's creation.
    unknown = _part(first_capture_us=None)
    text = render_playlist([(unknown, cutter.segments)], ended=False)
    assert tags(text, "EXT-X-PROGRAM-DATE-TIME") == []
    assert timeline_shift(unknown) == T0_US * 9 // 100
    assert timeline_shift(part) == T0_US * 9 // 100 + 11  # 123 µs: 11 ticks of 90 kHz


def test_a_playlist_fetched_with_a_player_link_carries_it_on_every_uri() -> None:
    cutter = SegmentCutter(90_000, 100)
    cutter.feed(fragments("K" + "." * 59 + "K" + "." * 89))
    parts = [
        (_part(), cutter.segments),
        (_part(file="cam1.150.mp4", first_seq=150), cutter.segments),
    ]
    plain = render_playlist(parts, ended=True)
    linked = render_playlist(parts, ended=True, token="abc_-.XYZ")
    check_playlist_rules(linked)
    assert linked == plain.replace(".mp4", ".mp4?t=abc_-.XYZ")
    uris = [line for line in linked.splitlines() if line and not line.startswith("#")]
    maps = [m.split('"')[1] for m in tags(linked, "EXT-X-MAP")]
    assert len(uris) == 2 and len(maps) == 2
    assert all(u.endswith("?t=abc_-.XYZ") for u in uris + maps)
    with pytest.raises(ValueError, match="URL-safe"):
        render_playlist(parts, ended=True, token='a"b')
