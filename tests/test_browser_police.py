"""The police page in Chromium against a real receiver and a real agent on loopback.

An officer logs in, sees the alarm after a press of the agent's (MockFactory)
panic button, acknowledges it, watches the live wall, one camera full size,
and replays the recording from the pre-roll on. A dispatcher starts and ends
an emergency from the dispatch panel and downloads the evidence bundle, which
verifies. Against stub routes: the panel's request and every kind of answer.
Every wait is on a condition of the page, with a timeout; real time passes
only where video must play.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Page

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import (
    BUILDING,
    dispatch_key_path,
    press_button,
    write_agent_config,
    write_enrollment,
)
from receiver.accounts import Role
from receiver.auth import AUTH_KEY, CSRF_HEADER, current_user
from receiver.evidence_format import evidence_key
from receiver.evidence_verify import verify_bundle
from receiver.h264 import parameter_sets
from receiver.presence import Presence
from receiver.recording import RecordingStore, TrackInfo
from receiver.server import Receiver
from receiver.viewer import setup_viewer
from tests.browser import chromium, logged_in_page, needs_chromium, viewer_page
from tests.logins import add_account, secured_client
from tests.media import META, PacketList

pytestmark = [needs_chromium, pytest.mark.timeout(120)]

#: The page's timeouts (ms): the sessions list is polled every 1.5 s.
WAIT_MS = 15_000

# One tile's live video: play position, how much is buffered ahead, the mean brightness
# of a sampled frame, and the page's own behind-live figure.
_TILE_JS = """(cam) => {
  const tile = document.querySelector(`.session:not([hidden]) .tile[data-camera="${cam}"]`);
  const v = tile && tile.querySelector('video.live');
  if (!v || !v.buffered.length || v.readyState < 2) return null;
  const c = document.createElement('canvas'); c.width = 32; c.height = 24;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0, 32, 24);
  const d = g.getImageData(0, 0, 32, 24).data; let sum = 0;
  for (let i = 0; i < d.length; i += 4) sum += d[i] + d[i + 1] + d[i + 2];
  const behind = tile.querySelector('.behind');
  const box = v.getBoundingClientRect();
  return {t: v.currentTime, buffer: v.buffered.end(v.buffered.length - 1) - v.currentTime,
          luma: sum / (d.length / 4), behind: behind.dataset.seconds,
          source: behind.dataset.source, text: behind.textContent,
          jumps: behind.dataset.jumps, stalls: behind.dataset.stalls,
          width: box.width, height: box.height, full: tile.classList.contains('full'),
          // The picture as drawn (object-fit: contain), not the element's box.
          drawn: Math.min(box.width / v.videoWidth, box.height / v.videoHeight) * v.videoHeight};
}"""

# Resolves once the given tile's live video has played `seconds` (real time must pass);
# rejects after `ms`.
_PLAYS_JS = """([cam, seconds, ms]) => new Promise((resolve, reject) => {
  const video = () => document.querySelector(
    `.session:not([hidden]) .tile[data-camera="${cam}"] video.live`);
  const give_up = setTimeout(() => reject(new Error(`${cam} did not play ${seconds} s`)), ms);
  let first = null;
  const look = () => {
    const v = video();
    if (!v || v.readyState < 2) return setTimeout(look, 50);
    if (first === null) first = v.currentTime;
    if (v.currentTime - first >= seconds) {
      clearTimeout(give_up);
      return resolve(v.currentTime - first);
    }
    setTimeout(look, 50);
  };
  look();
})"""

# The recorded player of a tile: which part, where, and whether the frame is black.
_RECORDED_JS = """(cam) => {
  const tile = document.querySelector(`.tile[data-camera="${cam}"]`);
  const v = tile && tile.querySelector('.recorded-wrap video');
  if (!v || v.readyState < 2) return null;
  const c = document.createElement('canvas'); c.width = 32; c.height = 24;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0, 32, 24);
  const d = g.getImageData(0, 0, 32, 24).data; let sum = 0;
  for (let i = 0; i < d.length; i += 4) sum += d[i] + d[i + 1] + d[i + 2];
  return {part: v.dataset.part, t: v.currentTime, paused: v.paused, src: v.currentSrc,
          luma: sum / (d.length / 4), label: tile.querySelector('.scrub-label').textContent,
          note: tile.querySelector('.recorded-wrap .note').textContent};
}"""

_AFTER_ALARM_JS = r"""(sel) => {
  const label = document.querySelector(sel).textContent;
  return /\(\+[0-9.]+ s from the alarm\)$/.test(label);
}"""


async def tile(page: Page, cam: str) -> dict[str, Any]:
    """A live tile's state once its video has a frame: the state the wait saw, not read
    again (the wall may be rebuilt in between: after Escape from the full view, a second
    read found no tile at all)."""
    handle = await page.wait_for_function(f"(cam) => ({_TILE_JS})(cam)", arg=cam, timeout=WAIT_MS)
    value: dict[str, Any] = await handle.json_value()
    return value


async def plays(page: Page, cam: str, seconds: float = 1.0) -> None:
    """Wait until the live video of ``cam`` has played ``seconds`` of footage."""
    await page.evaluate(_PLAYS_JS, [cam, seconds, WAIT_MS])


async def recorded(
    page: Page, cam: str, *, part: str | None, after: float, before: float = 1e9
) -> dict[str, Any]:
    """The recorded player of ``cam`` once it plays ``part`` (None: any but the first)
    between ``after`` and ``before`` seconds into it."""
    await page.wait_for_function(
        f"""([cam, part, after, before]) => {{
          const r = ({_RECORDED_JS})(cam);
          return r !== null && !r.paused && r.t > after && r.t < before
            && (part === null ? r.part !== '0' : r.part === part);
        }}""",
        arg=[cam, part, after, before],
        timeout=WAIT_MS,
    )
    value: dict[str, Any] = await page.evaluate(_RECORDED_JS, cam)
    return value


async def test_an_officer_gets_the_alarm_watches_the_wall_and_replays_the_preroll(
    tmp_path: Path, receiver: Receiver
) -> None:
    await add_account(receiver.accounts, "olivia", Role.OFFICER)
    config = load_config(write_agent_config(tmp_path / "agent", receiver, fps=15, preroll_s=4))
    async with (
        Agent(config) as agent,
        chromium() as browser,
        logged_in_page(browser, receiver.url, "olivia") as page,
    ):
        # The dashboard before any emergency: the device online (its building is known
        # from its first session: it has no enrollment certificate), no alarm, and no
        # dispatch panel for an officer.
        device = f'#devices .device.connected[data-device="{config.device_id}"]'
        await page.wait_for_selector(device, timeout=WAIT_MS)
        assert "online" in (await page.text_content(device) or "")
        assert "last heard" in (await page.text_content(device) or "")
        assert await page.is_hidden("#alarms")
        await page.wait_for_function(
            "() => document.getElementById('user').textContent === 'olivia (officer)'"
        )
        assert await page.is_hidden("#dispatch")
        assert await page.title() == "breakglass receiver"
        await agent.capture.wait_packets(60)  # the whole pre-roll (4 s) per camera

        press_button(agent)
        await page.wait_for_selector("#alarms .alarm", timeout=WAIT_MS)
        banner = await page.text_content("#alarms") or ""
        assert f"EMERGENCY — building {BUILDING}" in banner
        assert "started by button 'office' (Main office) at " in banner
        assert " s ago)" in banner  # the relative time beside the local time
        session = agent.emergency.active
        assert session is not None
        assert f"session {session.id}" in banner
        building = f'#devices .building.emergency[data-building="{BUILDING}"]'
        await page.wait_for_selector(building, timeout=WAIT_MS)  # the building, in red
        assert "EMERGENCY" in (await page.text_content(building) or "")
        assert await page.get_attribute("#alarms", "aria-live") == "assertive"
        # The sound (autoplay is allowed in these tests) and the flashing title.
        await page.wait_for_function(
            "() => document.getElementById('sound').dataset.state === 'ringing'", timeout=WAIT_MS
        )
        titles: list[str] = await page.evaluate(
            """new Promise((resolve) => {
              const seen = new Set([document.title]);
              const t = setInterval(() => {
                seen.add(document.title);
                if (seen.size >= 2) { clearInterval(t); resolve([...seen]); }
              }, 50);
            })"""
        )
        assert all("EMERGENCY" in t for t in titles)
        assert any(BUILDING in t for t in titles)
        # Acknowledged: the siren and the flashing stop here; the banner stays.
        await page.click(f'#alarms .alarm[data-session="{session.id}"] button.ack')
        await page.wait_for_function(
            "() => document.getElementById('sound').dataset.state === 'acknowledged'"
        )
        assert await page.title() == "● EMERGENCY (acknowledged) — breakglass receiver"
        assert await page.is_visible("#alarms .alarm.acked")

        # The live wall of the session: both cameras play, close to live.
        await page.click(f'#alarms .alarm[data-session="{session.id}"] a.watch')
        await page.wait_for_url(f"**#/wall/{session.id}")
        assert await page.is_hidden("#devices")
        for cam in ("front-door", "hallway-2"):
            await plays(page, cam, 1.0)
            state = await tile(page, cam)
            assert state["luma"] > 30, f"{cam}: a black frame"
            assert state["source"] == "capture", state  # from the capture clock
        behind: list[float] = []
        buffered: list[float] = []
        for _ in range(10):  # a second and a half of samples, every 150 ms of playback
            await plays(page, "hallway-2", 0.15)
            states = [await tile(page, cam) for cam in ("front-door", "hallway-2")]
            behind += [float(state["behind"]) for state in states]
            buffered += [state["buffer"] for state in states]
        print(
            f"behind live (capture -> on screen): median {statistics.median(behind):.3f} s, "
            f"max {max(behind):.3f} s; buffered ahead: median "
            f"{statistics.median(buffered):.3f} s, max {max(buffered):.3f} s; jumps to live, "
            f"stalls: {[(state['jumps'], state['stalls']) for state in states]}"
        )
        assert statistics.median(behind) < 1.0, behind  # sub-second, from the capture clock
        assert max(behind) < 3.0, behind  # a busy machine may stall it for a moment
        assert "behind live: 0." in (await tile(page, "front-door"))["text"]

        # One camera, full size, still live; Escape goes back to the wall.
        wall_width = (await tile(page, "hallway-2"))["width"]
        await page.click('.tile[data-camera="hallway-2"] video.live')
        await page.wait_for_url(f"**#/wall/{session.id}/hallway-2")
        await page.wait_for_selector('.tile.full[data-camera="hallway-2"]', timeout=WAIT_MS)
        await plays(page, "hallway-2", 0.5)
        full = await tile(page, "hallway-2")
        viewport = page.viewport_size
        assert viewport is not None
        assert full["width"] > wall_width
        width, height = viewport["width"], viewport["height"]
        assert full["width"] >= width * 0.95 or full["height"] >= height * 0.7
        assert full["drawn"] >= height * 0.6, full  # the picture, not only its box, is large
        assert full["luma"] > 30
        # An alarm not acknowledged is on top of the full view (here: this one's, its
        # acknowledgement forgotten), not behind it.
        await page.evaluate("localStorage.removeItem('breakglass.acknowledged')")
        await page.reload()
        await page.wait_for_selector("body.single.alarming", timeout=WAIT_MS)
        on_top = await page.evaluate(
            """() => { const a = document.getElementById('alarms').getBoundingClientRect();
                return document.getElementById('alarms').contains(
                  document.elementFromPoint(a.left + a.width / 2, a.top + a.height / 2)); }"""
        )
        assert on_top
        await page.click(f'#alarms .alarm[data-session="{session.id}"] button.ack')
        await page.keyboard.press("Escape")
        await page.wait_for_url(f"**#/wall/{session.id}")
        assert not (await tile(page, "hallway-2"))["full"]

        # Replay: "Recorded" starts at the pre-roll; the buttons and the scrub bar move
        # through the session (the press, a point in the pre-roll, the start).
        await page.click('.tile[data-camera="hallway-2"] button.recorded-toggle')
        first = await recorded(page, "hallway-2", part="0", after=0.3)
        # The older pre-roll, then the run from the press's GOP on (and, on a busy
        # machine, a later run where the live lane skipped ahead).
        parts = receiver.store.get(session.id).summary().camera("hallway-2").parts
        assert len(parts) >= 2
        assert first["src"].split("?")[0].endswith(f"/recordings/{session.id}/{parts[0].file}")
        assert first["label"].endswith(" s from the alarm, pre-roll)")
        assert first["luma"] > 30
        await page.click('.tile[data-camera="hallway-2"] button.at-press')
        press = await recorded(page, "hallway-2", part=None, after=0.1)
        parts = receiver.store.get(session.id).summary().camera("hallway-2").parts
        (holds,) = [
            p for p in parts if press["src"].split("?")[0].endswith(f"/{session.id}/{p.file}")
        ]
        after = [p for p in parts if p.first_seq > holds.first_seq]
        # It plays the part that holds the press: begun before it, the next one after.
        assert (holds.first_capture_us or 0) / 1e6 <= session.started_at
        assert not after or (after[0].first_capture_us or 0) / 1e6 > session.started_at
        assert press["luma"] > 30
        await page.wait_for_function(  # it plays on past the press: "(+0.4 s from the alarm)"
            _AFTER_ALARM_JS, arg='.tile[data-camera="hallway-2"] .scrub-label', timeout=WAIT_MS
        )
        await page.evaluate(
            """(cam) => {
              const s = document.querySelector(`.tile[data-camera="${cam}"] .scrub`);
              s.value = '1';  // one second into the recording: the pre-roll
              s.dispatchEvent(new Event('input'));
              s.dispatchEvent(new Event('change'));
            }""",
            "hallway-2",
        )
        scrubbed = await recorded(page, "hallway-2", part="0", after=1.0, before=2.5)
        assert "pre-roll" in scrubbed["label"]
        await page.click('.tile[data-camera="hallway-2"] button.from-start')
        again = await recorded(page, "hallway-2", part="0", after=0.1, before=1.0)
        assert "pre-roll" in again["label"]

        # The all-clear: the alarm goes, the cameras show as ended.
        agent.end("test finished")
        await page.wait_for_selector("#alarms", state="hidden", timeout=WAIT_MS)
        await page.wait_for_function(
            "() => [...document.querySelectorAll('.tile .badge')]"
            ".every(b => b.textContent === 'ENDED')",
            timeout=WAIT_MS,
        )
        assert await page.title() == "breakglass receiver"
        assert await page.evaluate("document.getElementById('sound').dataset.state") == "ready"
        await agent.uplink.wait_settled(session.id)


def enrolled_agent(tmp_path: Path, receiver: Receiver) -> Path:
    """An agent the district certified (the receiver knows its building from its first
    hello) whose trigger-key list enrolls the receiver's dispatch key, as in the demo."""
    demo_dispatch = dispatch_key_path(tmp_path / "agent")
    demo_dispatch.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(receiver.dispatch_key_path, demo_dispatch)  # write_trust enrolls this key
    path = write_agent_config(tmp_path / "agent", receiver, fps=15, preroll_s=2)
    write_enrollment(path, receiver)
    return path


async def dispatch_from_the_panel(page: Page, action: str, reason: str) -> None:
    """Choose the action, give the reason, review it and confirm it."""
    await page.select_option("#dispatch-building", BUILDING)
    await page.select_option("#dispatch-action", action)
    await page.fill("#dispatch-reason", reason)
    await page.click("#dispatch-review")
    text = await page.text_content("#dispatch-confirm-text") or ""
    assert f"for building {BUILDING}? Reason: “{reason}”" in text
    await page.click("#dispatch-send")


async def test_a_dispatcher_starts_and_ends_an_emergency_and_downloads_the_evidence(
    tmp_path: Path, receiver: Receiver
) -> None:
    await add_account(receiver.accounts, "dana", Role.DISPATCHER)
    config = load_config(enrolled_agent(tmp_path, receiver))
    async with (
        Agent(config) as agent,
        chromium() as browser,
        logged_in_page(browser, receiver.url, "dana") as page,
    ):
        # The panel is there for a dispatcher; the building comes from the devices list.
        await page.wait_for_selector("#dispatch", state="visible", timeout=WAIT_MS)
        option = f'#dispatch-building option[value="{BUILDING}"]'
        await page.wait_for_selector(option, state="attached", timeout=WAIT_MS)
        assert "1 of 1 device online" in (await page.text_content(option) or "")
        # A reason is required: nothing is sent without one.
        await page.select_option("#dispatch-building", BUILDING)
        await page.click("#dispatch-review")
        assert "A reason is required" in (await page.text_content("#dispatch-message") or "")
        assert await page.is_hidden("#dispatch-confirm")

        await agent.capture.wait_packets(15)
        await dispatch_from_the_panel(page, "start", "911 call: intruder reported")
        row = f'#dispatch-result tr.ok[data-device="{config.device_id}"]'
        await page.wait_for_selector(row, timeout=WAIT_MS)
        session = agent.emergency.active
        assert session is not None
        assert await page.text_content(f"{row} .status") == "202 accepted"
        assert await page.text_content(f"{row} .detail") == f"session {session.id}"
        assert "1 of 1 device(s) accepted" in (await page.text_content("#dispatch-message") or "")
        alarm = f'#alarms .alarm[data-session="{session.id}"]'
        await page.wait_for_selector(alarm, timeout=WAIT_MS)
        banner = await page.text_content("#alarms") or ""
        assert f"EMERGENCY — building {BUILDING} — started by dispatch trigger" in banner
        assert "911 call: intruder reported (dispatcher dana)" in banner
        await plays(page, "hallway-2", 0.5)  # the dashboard shows the emergency's cameras

        await dispatch_from_the_panel(page, "end", "all clear: suspect in custody")
        await page.wait_for_selector("#alarms", state="hidden", timeout=WAIT_MS)
        assert agent.emergency.active is None
        await agent.uplink.wait_settled(session.id)

        # The evidence bundle downloads from the session's button, and verifies offline.
        export = f'.session[data-session="{session.id}"] button.export'
        async with page.expect_download(timeout=WAIT_MS) as info:
            await page.click(export)
        download = await info.value
        assert download.suggested_filename.startswith(session.id)
        assert re.fullmatch(r".*-dana-[0-9a-f]{6}\.zip", download.suggested_filename)
        saved = tmp_path / download.suggested_filename
        await download.save_as(saved)
        note = f'.session[data-session="{session.id}"] .export-note'
        await page.wait_for_function(
            "(sel) => document.querySelector(sel).textContent.startsWith('downloaded')",
            arg=note,
            timeout=WAIT_MS,
        )
        assert hashlib.sha256(saved.read_bytes()).hexdigest()[:16] in (
            await page.text_content(note) or ""
        )
    key = evidence_key(receiver.data_dir).public_key()
    report = await asyncio.to_thread(verify_bundle, saved, receiver_key=key)
    assert not report.errors, report.errors


@dataclass
class Stub:
    """The viewer with stub dispatch and evidence routes: its URL and what they received."""

    url: str
    #: (JSON body, X-CSRF-Token header, content type, the login's own CSRF token)
    received: list[tuple[Any, str, str, str]] = field(default_factory=list)


@pytest.fixture
async def stub(tmp_path: Path, packets: PacketList) -> AsyncIterator[Stub]:
    """Logins ``olivia`` (officer) and ``dispatcher-1``; an open session s-1 (camera cam1);
    two devices of the building online; /v1/dispatch answers once, then refuses."""
    presence = Presence()
    presence.connected("lincoln-pi-1", building=BUILDING)
    presence.connected("lincoln-pi-2", building=BUILDING)
    received: list[tuple[Any, str, str, str]] = []

    async def dispatch(request: web.Request) -> web.Response:
        user = current_user(request)
        assert user is not None
        body = await request.json()
        received.append((body, request.headers[CSRF_HEADER], request.content_type, user.csrf))
        if len(received) > 1:
            detail = f"no device of {BUILDING} is connected"
            return web.json_response({"error": "no_device", "detail": detail}, status=409)
        return web.json_response(
            {
                "deliveries": [
                    {"device": "lincoln-pi-1", "status": 202, "session": "s-77"},
                    {"device": "lincoln-pi-2", "status": 0, "error": "no_answer",
                     "detail": "may have applied"},
                ]
            }
        )  # fmt: skip

    async def evidence(request: web.Request) -> web.Response:
        detail = "nothing recorded yet"
        return web.json_response({"error": "no_evidence", "detail": detail}, status=409)

    async with RecordingStore(tmp_path / "rec") as store:
        extradata = parameter_sets(packets[0][0]).annex_b()
        track = TrackInfo("cam1", "interior", "h264", 320, 240, 30.0, extradata, 0)
        await store.open_session("s-1", "lincoln-pi-1", META, [track])
        app = web.Application()
        setup_viewer(app, store, store.live_feed, presence)
        app.router.add_post("/v1/dispatch", dispatch)
        app.router.add_post("/v1/evidence/{session}", evidence)
        async with secured_client(app, tmp_path / "auth", Role.DISPATCHER) as client:
            await add_account(app[AUTH_KEY].accounts, "olivia", Role.OFFICER)
            yield Stub(str(client.make_url("/")), received)


async def test_the_alarm_sound_waits_for_a_click_where_autoplay_is_blocked(stub: Stub) -> None:
    async with (
        chromium(autoplay=False) as browser,
        logged_in_page(browser, stub.url, "olivia") as login,
    ):
        # A new tab of the logged-in officer: nothing was touched there yet.
        page = await login.context.new_page()
        await page.goto(stub.url)
        await page.wait_for_selector("#alarms .alarm", timeout=WAIT_MS)  # s-1 is open
        sound = "#sound[data-state='blocked']"
        await page.wait_for_selector(sound, timeout=WAIT_MS)
        assert await page.text_content(sound) == "Sound off: click to enable the alarm sound"
        await page.click("#sound")
        await page.wait_for_selector("#sound[data-state='ringing']", timeout=WAIT_MS)


async def test_an_officer_has_no_dispatch_panel_and_sees_a_refused_export(stub: Stub) -> None:
    async with chromium() as browser, logged_in_page(browser, stub.url, "olivia") as page:
        await page.wait_for_function(
            "() => document.getElementById('user').textContent === 'olivia (officer)'"
        )
        assert await page.is_hidden("#dispatch")
        await page.click('.session[data-session="s-1"] button.export')
        note = '.session[data-session="s-1"] .export-note'
        await page.wait_for_function(
            "(sel) => document.querySelector(sel).textContent.includes('failed')", arg=note
        )
        assert await page.text_content(note) == "export failed: no_evidence: nothing recorded yet"


async def test_the_dispatch_panel_sends_what_the_route_expects_and_shows_every_answer(
    stub: Stub,
) -> None:
    async with chromium() as browser, logged_in_page(browser, stub.url, "dispatcher-1") as page:
        option = f'#dispatch-building option[value="{BUILDING}"]'
        await page.wait_for_selector(option, state="attached", timeout=WAIT_MS)
        assert await page.is_visible("#dispatch")
        assert "2 of 2 devices online" in (await page.text_content(option) or "")
        await dispatch_from_the_panel(page, "extend", "911 call: still ongoing")
        await page.wait_for_selector("#dispatch-result table", timeout=WAIT_MS)
        rows = await page.eval_on_selector_all(
            "#dispatch-result tr[data-device]",
            "rows => rows.map(r => [r.className, r.dataset.device,"
            " r.querySelector('.status').textContent, r.querySelector('.detail').textContent])",
        )
        assert rows == [
            ["ok", "lincoln-pi-1", "202 accepted", "session s-77"],
            ["refused", "lincoln-pi-2", "not delivered", "no_answer: may have applied"],
        ]
        message = await page.text_content("#dispatch-message") or ""
        assert f"Extend the emergency for {BUILDING}: 1 of 2 device(s)" in message

        await dispatch_from_the_panel(page, "end", "all clear")
        await page.wait_for_function(
            "() => document.getElementById('dispatch-message').textContent.startsWith('Refused')"
        )
        assert await page.text_content("#dispatch-message") == (
            f"Refused: no_device: no device of {BUILDING} is connected"
        )
    (first, csrf, mime, token), (second, *_) = stub.received
    assert first == {"building": BUILDING, "action": "extend", "reason": "911 call: still ongoing"}
    assert second == {"building": BUILDING, "action": "end", "reason": "all clear"}
    assert (csrf, mime) == (token, "application/json")  # the login's own CSRF token


async def test_the_alarm_says_when_on_the_receivers_clock_and_the_devices_beside(
    tmp_path: Path, packets: PacketList
) -> None:
    """A Pi 77 h behind (fake-hwclock, not synced yet): the banner said "started ...
    at 09:57:33 (3 days ago)" for a press seconds ago, and an expiry three days before it
    (review s4). It shows the receiver's times, with the device's own beside them."""
    async with RecordingStore(tmp_path / "rec") as store:
        extradata = parameter_sets(packets[0][0]).annex_b()
        track = TrackInfo("cam1", "interior", "h264", 320, 240, 30.0, extradata, 0)
        pressed = time.time() - 278_220  # on the device's clock: 77 h behind
        meta = dict(META, started_at=pressed, expires_at=pressed + 3600)
        rec = await store.open_session("s-1", "lincoln-pi-1", meta, [track])
        async with viewer_page(store, tmp_path / "auth") as page:
            await page.wait_for_selector("#alarms .alarm", timeout=WAIT_MS)
            at = "(t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false })"
            opened = await page.evaluate(at, rec.opened_at)
            expires = await page.evaluate(at, rec.opened_at + 3600)
            line = await page.text_content("#alarms .alarm-line") or ""
            assert f"started by button 'office' (Main office) at {opened} (device clock: " in line
            assert re.fullmatch(r"\(\d+ s ago\)", await page.text_content("#alarms .ago") or "")
            info = await page.text_content("#alarms .info") or ""
            assert f" · expires {expires} (device clock: " in info
        await rec.close("test over")


async def test_a_restart_gap_is_shown_as_a_place_not_as_100000_frames(
    tmp_path: Path, packets: PacketList
) -> None:
    """An agent restart skips the rest of its block of reserved seqs: the device declares
    that hole lost, and the tile said "99940 declared lost", which reads as hours lost
    where a second or two was (review s8). It says where footage was declared lost."""
    async with RecordingStore(tmp_path / "rec") as store:
        extradata = parameter_sets(packets[0][0]).annex_b()
        track = TrackInfo("cam1", "interior", "h264", 320, 240, 30.0, extradata, 0)
        rec = await store.open_session("s-1", "lincoln-pi-1", META, [track])
        cam = rec.camera("cam1")
        t0 = int(time.time() * 1e6)
        for seq, (payload, key) in enumerate(packets[:60]):
            await cam.append(seq, t0 + seq * 33_333, key, payload, preroll=False, live=True)
        await cam.declare_gap(60, 99_999, "lost")
        await cam.flush()
        async with viewer_page(store, tmp_path / "auth") as page:
            counts = page.locator(".tile .counts").first
            await counts.wait_for(timeout=WAIT_MS)
            text = await counts.text_content() or ""
            assert "declared lost in 1 place (by the device)" in text, text
            assert "99940" not in text, text
        await rec.close("test over")
