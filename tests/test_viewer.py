"""Web viewer over a real aiohttp server on loopback: API, static files, recordings, live WS.

The viewer is served over TLS behind the receiver's logins (:mod:`receiver.auth`);
the client is logged in as an officer.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from receiver.access_log import ACCESS_LOG_KEY
from receiver.h264 import mse_codec_string, parameter_sets
from receiver.recording import (
    CameraRecording,
    Outcome,
    RecordingStore,
    SessionRecording,
    TrackInfo,
)
from receiver.viewer import setup_viewer
from tests.browser import chromium, logged_in_page, needs_chromium, viewer_page
from tests.logins import log_in, secured_client
from tests.media import META, PacketList, ffprobe_stream

T0_US = 1_767_000_000_000_000


class Env:
    """A store with one open session (camera ``cam1``) and a client for the viewer."""

    def __init__(
        self,
        store: RecordingStore,
        rec: SessionRecording,
        client: TestClient[web.Request, web.Application],
    ) -> None:
        self.store = store
        self.rec = rec
        self.cam: CameraRecording = rec.camera("cam1")
        self.client = client
        self.next = 0
        self.folder = Path()

    def access(self) -> list[dict[str, Any]]:
        """The access log's entries so far."""
        return [json.loads(line) for line in (self.folder / "access.log").read_text().splitlines()]

    def feed(self, packets: PacketList, n: int) -> None:
        for _ in range(n):
            payload, key = packets[self.next]
            t = T0_US + self.next * 33_333
            done = self.cam.append_nowait(
                self.next, t, key, payload, preroll=self.next < 30, live=True
            )
            assert done is Outcome.APPENDED
            self.next += 1


@pytest.fixture
async def env(tmp_path: Path, packets: PacketList) -> AsyncIterator[Env]:
    async with RecordingStore(tmp_path / "rec") as store:
        extradata = parameter_sets(packets[0][0]).annex_b()
        track = TrackInfo("cam1", "interior", "h264", 320, 240, 30.0, extradata, 0)
        rec = await store.open_session("s-1", "dev-1", META, [track])
        app = web.Application()
        setup_viewer(app, store, store.live_feed)
        async with secured_client(app, tmp_path / "auth") as client:
            env = Env(store, rec, client)
            env.folder = tmp_path / "auth"
            yield env


async def test_sessions_api_lists_cameras(env: Env, packets: PacketList) -> None:
    env.feed(packets, 40)
    await env.cam.flush()
    resp = await env.client.get("/api/sessions")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    (session,) = body["sessions"]
    assert session["session_id"] == "s-1"
    assert session["open"] is True
    assert session["meta"]["started_by"]["button_id"] == "office"
    (cam,) = session["cameras"]
    assert cam["camera_id"] == "cam1"
    assert cam["zone"] == "interior"
    assert cam["mse_codec"] == mse_codec_string(packets[0][0])
    assert (cam["width"], cam["height"]) == (320, 240)
    assert cam["frames_durable"] == 39  # the 40th waits for its fragment
    assert (cam["preroll_frames"], cam["live_frames"]) == (30, 9)
    assert cam["live_url"] == "/v1/live/s-1/cam1"
    part = {
        "file": "cam1.0.mp4",
        "first_seq": 0,
        "last_seq": 38,
        "frames": 39,
        "first_capture_us": T0_US,
    }
    assert cam["runs"] == [{"first_seq": 0, "last_seq": 38, "frames": 39, "parts": [part]}]
    assert cam["recordings"] == [dict(part, url="/recordings/s-1/cam1.0.mp4", run=0)]
    assert (cam["complete"], cam["missing"], cam["gaps"], cam["bad_segments"]) == (
        True,
        [],
        [],
        [],
    )
    assert (cam["durable_seq"], cam["first_live_seq"]) == (38, 30)
    assert "path" not in str(body)  # no server paths leak


async def test_index_has_csp_and_no_inline_script(env: Env) -> None:
    resp = await env.client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    html = await resp.text()
    assert "<title>breakglass receiver</title>" in html
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None
    assert re.search(r"<[^>]+\son[a-z]+\s*=", html) is None  # no inline event handlers
    for name, mime in [("viewer.js", "text/javascript"), ("viewer.css", "text/css")]:
        r = await env.client.get(f"/static/{name}")
        assert r.status == 200
        assert r.content_type == mime


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2Frecording.py",
        "/static/%2e%2e%2frecording.py",
        "/static/../recording.py",
        "/static/..%2F..%2Fpyproject.toml",
        "/static/index.html",
        "/static/nope.js",
    ],
)
async def test_static_refuses_anything_but_its_files(env: Env, path: str) -> None:
    resp = await env.client.get(URL(path, encoded=True))
    assert resp.status == 404
    text = await resp.text()
    assert "import" not in text
    assert "[tool" not in text


async def test_recording_served_with_ranges(env: Env, packets: PacketList) -> None:
    env.feed(packets, 30)
    await env.rec.close("all clear")
    url = "/recordings/s-1/cam1.0.mp4"
    full = await env.client.get(url)
    assert full.status == 200
    assert full.content_type == "video/mp4"
    data = await full.read()
    assert data[4:8] == b"ftyp"
    part = await env.client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert await part.read() == data[100:200]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/recordings/nope/cam1.0.mp4", 404, "unknown_session"),
        ("/recordings/s-1/cam9.0.mp4", 404, "unknown_camera"),
        ("/recordings/s-1/cam1.7.mp4", 404, "unknown_recording"),
        ("/recordings/s-1/cam1.mp4", 404, "unknown_recording"),
        ("/recordings/s-1/cam1.00.mp4", 404, "unknown_recording"),
        ("/recordings/s-1/session.json", 404, "unknown_recording"),
        ("/recordings/.hidden/cam1.0.mp4", 400, "invalid_id"),
        ("/recordings/s-1/..%2Fsession.json", 404, "unknown_recording"),
        ("/v1/live/nope/cam1", 404, "unknown_session"),
        ("/v1/live/s-1/cam9", 404, "unknown_camera"),
        ("/v1/live/s-1/cam1", 426, "websocket_required"),
    ],
)
async def test_errors_are_json_with_stable_codes(
    env: Env, path: str, status: int, code: str
) -> None:
    resp = await env.client.get(URL(path, encoded=True))
    assert resp.status == status
    body = await resp.json()
    assert body["error"] == code
    assert body["detail"]


async def test_live_ws_unknown_session_is_refused(env: Env) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await env.client.ws_connect("/v1/live/nope/cam1")
    assert info.value.status == 404


async def test_live_ws_sends_init_then_fragments(
    env: Env, packets: PacketList, tmp_path: Path
) -> None:
    env.feed(packets, 35)  # the GOP from keyframe 30 is cached
    ws = await env.client.ws_connect("/v1/live/s-1/cam1")
    received: list[bytes] = []

    async def receive() -> bytes:
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.BINARY
        received.append(msg.data)
        return bytes(msg.data)

    init = await receive()
    assert init[4:8] == b"ftyp"
    first = await receive()
    assert first[4:8] == b"moof"
    for _ in range(3):  # the rest of the cached fragments (30..33 are complete)
        await receive()
    env.feed(packets, 20)  # new frames arrive live
    for _ in range(20):
        assert (await receive())[4:8] == b"moof"
    # What a viewer got decodes on its own, starting at the keyframe.
    out = tmp_path / "live.mp4"
    out.write_bytes(b"".join(received))
    info = await asyncio.to_thread(ffprobe_stream, out)
    assert info["codec_name"] == "h264"
    assert int(info["nb_read_frames"]) == 24
    await env.rec.close("all clear")
    tail = await asyncio.wait_for(ws.receive(), 10)
    while tail.type == aiohttp.WSMsgType.BINARY:  # the last fragment, written at close
        tail = await asyncio.wait_for(ws.receive(), 10)
    assert tail.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await ws.close()
    resp = await env.client.get("/v1/live/s-1/cam1")
    assert (await resp.json())["error"] == "not_live"


async def test_server_shutdown_closes_live_sockets(env: Env, packets: PacketList) -> None:
    env.feed(packets, 3)
    ws = await env.client.ws_connect("/v1/live/s-1/cam1")
    first = await asyncio.wait_for(ws.receive(), 10)
    assert first.data[4:8] == b"ftyp"
    await asyncio.wait_for(env.client.close(), 10)  # runs the app's on_shutdown
    msg = await asyncio.wait_for(ws.receive(), 10)
    while msg.type == aiohttp.WSMsgType.BINARY:
        msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


_PROBE_JS = """(() => {
  const v = document.querySelector('video.live');
  if (!v || !v.buffered.length) return null;
  const c = document.createElement('canvas'); c.width = 32; c.height = 24;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0, 32, 24);
  const d = g.getImageData(0, 0, 32, 24).data; let sum = 0;
  for (let i = 0; i < d.length; i += 4) sum += d[i] + d[i + 1] + d[i + 2];
  return {t: v.currentTime, behind: v.buffered.end(v.buffered.length - 1) - v.currentTime,
          luma: sum / (d.length / 4), alarm: document.getElementById('alarms').textContent};
})()"""


@needs_chromium
async def test_browser_plays_live_view(env: Env, packets: PacketList, tmp_path: Path) -> None:
    """Chromium plays the live tile through MSE, close to the live edge (raw CDP, no Playwright)."""
    stop = asyncio.Event()

    async def produce() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for seq in range(100_000):
            payload, key = packets[seq % len(packets)]
            env.cam.append_nowait(
                seq, T0_US + seq * 33_333, key, payload, preroll=seq < 30, live=True
            )
            await env.cam.flush()
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, start + (seq + 1) / 30 - loop.time()))
                return
            except TimeoutError:
                pass

    producer = asyncio.create_task(produce())
    try:
        async with (
            chromium() as browser,
            logged_in_page(browser, str(env.client.make_url("/")), "officer-1") as page,
        ):
            samples = []
            for _ in range(60):
                await asyncio.sleep(0.1)  # real time must pass for playback
                sample = await page.evaluate(_PROBE_JS)
                if sample:
                    samples.append(sample)
                if len(samples) >= 2 and samples[-1]["t"] - samples[0]["t"] > 1.0:
                    break
        assert len(samples) >= 2, "the live video never buffered"
        assert samples[-1]["t"] - samples[0]["t"] > 1.0, "the live video does not play"
        assert samples[-1]["behind"] < 1.0
        assert samples[-1]["luma"] > 30  # not a black frame
        assert "EMERGENCY — building lincoln-high" in samples[-1]["alarm"]
        assert "button 'office' (Main office)" in samples[-1]["alarm"]
    finally:
        stop.set()
        await producer


_RECORDED_JS = """(() => {
  const v = document.querySelector('.recorded-wrap video');
  const b = document.querySelector('.tile .actions button');
  if (!v || !b) return null;
  if (b.getAttribute('aria-pressed') !== 'true') { b.click(); return null; }
  if (v.paused && !v.ended) v.play().catch(() => {});
  return {part: v.dataset.part, t: v.currentTime, src: v.currentSrc,
          note: document.querySelector('.recorded-wrap .note').textContent,
          stats: document.querySelector('.tile .stats').textContent};
})()"""


@needs_chromium
async def test_browser_plays_recorded_runs_in_seq_order(
    env: Env, packets: PacketList, tmp_path: Path
) -> None:
    """Live skipped ahead, backfill filled the hole: "Recorded" plays part after part."""
    cam = env.cam
    for seq in [*range(0, 10), *range(30, 60)]:  # live: 10..29 skipped
        payload, key = packets[seq]
        await cam.append(seq, T0_US + seq * 33_333, key, payload, preroll=False, live=True)
    for seq in range(10, 30):  # backfill closes the hole; that run is complete
        payload, key = packets[seq]
        await cam.append(seq, T0_US + seq * 33_333, key, payload)
    await env.rec.close("all clear")
    parts = [p.file for p in env.rec.summary().camera("cam1").parts]
    assert parts == ["cam1.0.mp4", "cam1.30.mp4"]
    async with (
        chromium() as browser,
        logged_in_page(browser, str(env.client.make_url("/")), "officer-1") as page,
    ):
        seen: list[dict[str, Any]] = []
        for _ in range(100):
            await asyncio.sleep(0.1)  # real time must pass for playback
            sample = await page.evaluate(_RECORDED_JS)
            if sample:
                seen.append(sample)
            if sample and sample["part"] == "1" and sample["t"] > 0.3:
                break
    assert seen, "the recorded player never started"
    assert seen[0]["src"].split("?")[0].endswith("/recordings/s-1/cam1.0.mp4")
    assert seen[0]["note"] == "part 1 of 2: 0\u201329"
    assert seen[-1]["part"] == "1", "the second part never played"
    assert seen[-1]["src"].split("?")[0].endswith("/recordings/s-1/cam1.30.mp4")
    assert seen[-1]["t"] > 0.3
    assert "complete" in seen[-1]["stats"]


async def test_recordings_are_audited_once_per_part_per_login(
    env: Env, packets: PacketList
) -> None:
    env.feed(packets, 30)
    await env.rec.close("all clear")
    url = "/recordings/s-1/cam1.0.mp4"
    for first in range(0, 1000, 100):  # a player's range requests
        resp = await env.client.get(url, headers={"Range": f"bytes={first}-{first + 99}"})
        assert resp.status == 206
    await env.client.app[ACCESS_LOG_KEY].flush()  # type: ignore[index]
    fetches = [e for e in env.access() if e["action"] == "recording_fetch"]
    assert len(fetches) == 1
    (entry,) = fetches
    assert (entry["who"], entry["role"], entry["session"], entry["camera"], entry["file"]) == (
        "officer-1",
        "officer",
        "s-1",
        "cam1",
        "cam1.0.mp4",
    )
    login = next(e for e in env.access() if e["action"] == "login")
    assert entry["login"] == login["login"]
    # Another login session of the same officer is a new viewing: audited again.
    await log_in(env.client, env.client.make_url("/"), "officer-1")
    assert (await env.client.get(url)).status == 200
    await env.client.app[ACCESS_LOG_KEY].flush()  # type: ignore[index]
    assert len([e for e in env.access() if e["action"] == "recording_fetch"]) == 2


async def test_live_views_are_audited_with_their_duration(env: Env, packets: PacketList) -> None:
    env.feed(packets, 3)
    log = env.client.app[ACCESS_LOG_KEY]  # type: ignore[index]
    closed_seen = asyncio.Event()
    stop = log.listen(lambda e: e["action"] == "live_close" and closed_seen.set())
    ws = await env.client.ws_connect("/v1/live/s-1/cam1")
    assert (await asyncio.wait_for(ws.receive(), 10)).data[4:8] == b"ftyp"
    await ws.close()
    await asyncio.wait_for(closed_seen.wait(), 10)  # the server notices the close
    stop()
    await log.flush()
    opened, closed = [e for e in env.access() if e["action"].startswith("live_")]
    assert (opened["action"], opened["who"], opened["session"], opened["camera"]) == (
        "live_open",
        "officer-1",
        "s-1",
        "cam1",
    )
    assert closed["action"] == "live_close"
    assert closed["duration_s"] >= 0
    assert closed["login"] == opened["login"]


async def test_sessions_api_pages_closed_sessions_and_keeps_open_ones(
    tmp_path: Path, packets: PacketList
) -> None:
    """Every viewer polls the list: open sessions always come, closed ones a page at a
    time, newest first, with a cursor to the next page; one session by its id too."""
    now = [1_767_000_000.0]
    async with RecordingStore(tmp_path / "rec", clock=lambda: now[0]) as store:
        extradata = parameter_sets(packets[0][0]).annex_b()
        track = TrackInfo("cam1", "interior", "h264", 320, 240, 30.0, extradata, 0)
        # s-00 stays open and is the oldest; s-01..s-12 closed; s-13 and s-14 share a tick.
        for i in range(15):
            now[0] += 0 if i == 14 else 60
            rec = await store.open_session(f"s-{i:02}", "dev-1", META, [track])
            if i:
                await rec.close("all clear")
        app = web.Application()
        setup_viewer(app, store, store.live_feed)
        async with secured_client(app, tmp_path / "auth") as client:

            async def page(query: str) -> tuple[list[str], str | None]:
                resp = await client.get(f"/api/sessions{query}")
                assert resp.status == 200, await resp.text()
                body = await resp.json()
                return [s["session_id"] for s in body["sessions"]], body["next"]

            first, cursor = await page("?limit=5")
            assert first == ["s-14", "s-13", "s-12", "s-11", "s-10", "s-00"]
            seen = first[:-1]
            while cursor is not None:
                ids, cursor = await page(f"?limit=5&before={cursor}")
                assert "s-00" not in ids
                seen += ids
            assert seen == [f"s-{i:02}" for i in range(14, 0, -1)]  # each once, in order
            everything, cursor = await page("")  # default page: 50
            assert (len(everything), cursor) == (15, None)

            resp = await client.get("/api/sessions/s-03")
            assert resp.status == 200
            assert (await resp.json())["session_id"] == "s-03"
            for path, status, code in [
                ("/api/sessions/s-99", 404, "unknown_session"),
                ("/api/sessions?limit=0", 400, "bad_limit"),
                ("/api/sessions?limit=501", 400, "bad_limit"),
                ("/api/sessions?limit=ten", 400, "bad_limit"),
                ("/api/sessions?before=s-03", 400, "bad_cursor"),
                ("/api/sessions?before=nan~s-03", 400, "bad_cursor"),
                ("/api/sessions?before=1.5~..", 400, "bad_cursor"),
            ]:
                resp = await client.get(path)
                assert resp.status == status, path
                assert (await resp.json())["error"] == code, path


@needs_chromium
async def test_browser_shows_older_sessions_on_request_and_opens_a_link_to_one(
    tmp_path: Path, packets: PacketList
) -> None:
    """A receiver with a long history: the page shows 50 closed sessions, then 50 more
    at each "Show older sessions" (past the API's 500 a page, by its cursor); a link to
    a session beyond them still opens its wall."""
    now = [1_767_000_000.0]
    async with RecordingStore(tmp_path / "rec", clock=lambda: now[0]) as store:
        extradata = parameter_sets(packets[0][0]).annex_b()
        track = TrackInfo("cam1", "interior", "h264", 320, 240, 30.0, extradata, 0)
        for i in range(560):
            now[0] += 60
            rec = await store.open_session(f"s-{i:03}", "dev-1", META, [track])
            await rec.close("all clear")
        shows = "(n) => document.querySelectorAll('#sessions > section.session').length === n"
        async with viewer_page(store, tmp_path / "auth") as page:
            await page.wait_for_function(shows, arg=50, timeout=15_000)
            await page.click("#older")
            await page.wait_for_function(shows, arg=100, timeout=15_000)
            for _ in range(9):  # 550: the API's 500, then the rest after its cursor
                await page.click("#older")
            await page.wait_for_function(shows, arg=550, timeout=15_000)
            assert await page.is_visible("#older")  # 10 more
            first = "() => document.querySelector('#sessions > section.session').textContent"
            assert "s-559" in await page.evaluate(first)  # newest first
            await page.evaluate("() => { location.hash = '#/wall/s-001'; }")
            await page.wait_for_function(
                "() => [...document.querySelectorAll('#sessions > section.session')]"
                ".some((s) => !s.hidden && s.textContent.includes('s-001'))",
                timeout=15_000,
            )
            assert not await page.is_visible("#older")  # a wall shows one session


async def _damaged_store(root: Path, packets: PacketList) -> None:
    """A recorded session ``s-1`` whose ``session.json`` is then cut short (a damaged
    sector, a partial restore) beside a good one, ``s-2``."""
    now = [1_767_000_000.0]
    async with RecordingStore(root, clock=lambda: now[0]) as store:
        extradata = parameter_sets(packets[0][0]).annex_b()
        track = TrackInfo("cam1", "interior", "h264", 320, 240, 30.0, extradata, 0)
        for sid in ("s-1", "s-2"):
            now[0] += 60
            rec = await store.open_session(sid, "dev-1", META, [track])
            cam = rec.camera("cam1")
            for i in range(30):
                payload, key = packets[i]
                cam.append_nowait(i, T0_US + i * 33_333, key, payload, live=True)
            await cam.flush()
            await rec.close("all clear")
    sj = root / "s-1" / "session.json"
    sj.write_bytes(sj.read_bytes()[:50])


async def test_a_damaged_session_is_listed_marked_damaged_and_says_why(
    tmp_path: Path, packets: PacketList
) -> None:
    """A session whose session.json is unreadable is on the page's list, marked damaged
    with the reason (no server path), with nothing to play; its files answer that it is
    damaged, not that it does not exist."""
    root = tmp_path / "rec"
    await _damaged_store(root, packets)
    async with RecordingStore(root) as store:
        assert "s-1" in store.damaged
        app = web.Application()
        setup_viewer(app, store, store.live_feed)
        async with secured_client(app, tmp_path / "auth") as client:
            resp = await client.get("/api/sessions")
            assert resp.status == 200
            listed = {s["session_id"]: s for s in (await resp.json())["sessions"]}
            assert set(listed) == {"s-1", "s-2"}
            assert listed["s-2"]["damaged"] is None
            damaged = listed["s-1"]
            assert damaged["damaged"].startswith("s-1/session.json: ")  # why, by its own name
            assert str(root) not in json.dumps(damaged)
            assert (damaged["open"], damaged["cameras"]) == (False, [])

            one = await client.get("/api/sessions/s-1")  # a link to it opens it too
            assert one.status == 200
            assert await one.json() == damaged

            for path in ("/recordings/s-1/cam1.0.mp4", "/v1/live/s-1/cam1"):
                resp = await client.get(path)
                assert resp.status == 409, path
                body = await resp.json()
                assert body["error"] == "corrupt_recording", path
                assert "damaged" in body["detail"] and str(root) not in body["detail"], path


_DAMAGED_JS = """() => {
  const s = document.querySelector('#sessions > section.session[data-session="s-1"]');
  const note = s && s.querySelector('.damaged-note');
  if (!note || note.hidden || !note.textContent) return null;
  return {title: s.querySelector('.session-title').textContent, note: note.textContent,
          hidden: s.hidden, videos: s.querySelectorAll('video').length,
          exportShown: !s.querySelector('button.export').hidden,
          others: [...document.querySelectorAll('#sessions > section.session')]
            .filter((x) => !x.hidden).map((x) => x.dataset.session),
          empty: document.getElementById('empty').hidden};
}"""


@needs_chromium
async def test_browser_shows_a_damaged_session_and_opens_it_without_a_player(
    tmp_path: Path, packets: PacketList
) -> None:
    root = tmp_path / "rec"
    await _damaged_store(root, packets)
    async with RecordingStore(root) as store, viewer_page(store, tmp_path / "auth") as page:
        listed = await (await page.wait_for_function(_DAMAGED_JS, timeout=15_000)).json_value()
        assert "RECORDING DAMAGED" in listed["title"]
        assert "cannot be played or exported here: s-1/session.json: " in listed["note"]
        assert (listed["videos"], listed["exportShown"]) == (0, False)
        assert set(listed["others"]) == {"s-1", "s-2"}

        await page.click('section.session[data-session="s-1"] a.wall-link')  # "Open"
        await page.wait_for_function(
            "() => location.hash === '#/wall/s-1' && "
            "document.querySelector('section.session[data-session=\"s-2\"]').hidden"
        )
        opened = await page.evaluate(f"({_DAMAGED_JS})()")
        assert opened["others"] == ["s-1"] and opened["empty"] is True
        assert "RECORDING DAMAGED" in opened["title"] and opened["videos"] == 0
