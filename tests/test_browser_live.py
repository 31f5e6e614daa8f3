"""The live tile in Chromium over a recording fed in real time: it trims its buffer,
follows the feed when a live skip starts a new part (the receiver closes the socket:
the page reconnects by itself) and stays close to the capture clock throughout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Page

from receiver.h264 import parameter_sets
from receiver.recording import CameraRecording, RecordingStore, TrackInfo
from receiver.viewer import setup_viewer
from tests.browser import chromium, logged_in_page, needs_chromium
from tests.logins import secured_client
from tests.media import META, PacketList

pytestmark = [needs_chromium, pytest.mark.timeout(90)]

FPS = 30
WAIT_MS = 15_000

# The tile's state: play position, buffered range, and the page's own figures.
_STATE_JS = """() => {
  const tile = document.querySelector('.tile[data-camera="cam1"]');
  const v = tile && tile.querySelector('video.live');
  if (!v || !v.buffered.length) return null;
  const b = tile.querySelector('.behind');
  return {t: v.currentTime, start: v.buffered.start(0),
          end: v.buffered.end(v.buffered.length - 1), behind: b.dataset.seconds,
          source: b.dataset.source, restarts: Number(b.dataset.restarts || 0),
          state: tile.querySelector('.state').textContent};
}"""


class Feeder:
    """Frames of camera ``cam1`` at 30 fps in real time, capture time = wall clock."""

    def __init__(self, cam: CameraRecording, packets: PacketList) -> None:
        self.cam = cam
        self.packets = packets
        self.skip = asyncio.Event()  # set: leave out frames up to the next keyframe but one
        self.skipped: range | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start_wall, start = time.time(), loop.time()
        seq = 0
        while True:
            if self.skip.is_set() and self.skipped is None:
                after = (seq // 30 + 2) * 30  # the live lane skips to a later keyframe
                self.skipped = range(seq, after)
                seq = after
            await asyncio.sleep(max(0.0, start + seq / FPS - loop.time()))
            payload, key = self.packets[seq % len(self.packets)]
            capture_us = int((start_wall + seq / FPS) * 1e6)
            await self.cam.append(seq, capture_us, key, payload, preroll=False, live=True)
            await self.cam.flush()
            seq += 1


@contextlib.asynccontextmanager
async def fed_viewer(tmp_path: Path, packets: PacketList) -> AsyncIterator[tuple[str, Feeder]]:
    """An open session whose camera is fed live; the viewer's URL (officer-1 logs in)."""
    async with RecordingStore(tmp_path / "rec") as store:
        extradata = parameter_sets(packets[0][0]).annex_b()
        track = TrackInfo("cam1", "interior", "h264", 320, 240, float(FPS), extradata, 0)
        meta = dict(META, started_at=time.time())
        rec = await store.open_session("s-1", "dev-1", meta, [track])
        feeder = Feeder(rec.camera("cam1"), packets)
        task = asyncio.create_task(feeder.run(), name="feeder")
        app = web.Application()
        setup_viewer(app, store, store.live_feed)
        try:
            async with secured_client(app, tmp_path / "auth") as client:
                yield str(client.make_url("/")), feeder
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await rec.close("test over")


async def state_when(page: Page, condition: str, ms: int = WAIT_MS) -> dict[str, Any]:
    """The tile's state once ``condition`` (JS over ``s``) holds."""
    await page.wait_for_function(
        f"() => {{ const s = ({_STATE_JS})(); return s !== null && ({condition}); }}",
        timeout=ms,
    )
    value: dict[str, Any] = await page.evaluate(_STATE_JS)
    return value


async def test_the_live_tile_trims_follows_a_new_part_and_stays_near_live(
    tmp_path: Path, packets: PacketList
) -> None:
    async with (
        fed_viewer(tmp_path, packets) as (url, feeder),
        chromium() as browser,
        logged_in_page(browser, url, "officer-1") as page,
    ):
        # A new view starts with the GOP backlog and seeks to the edge: within the wait it
        # must be playing under a second behind live (CI once read 1.08 s at its very first
        # sample, on a loaded machine); the samples below hold it there.
        first = await state_when(
            page, "s.source === 'capture' && s.t > 0.5 && parseFloat(s.behind) < 1.0"
        )
        # Old buffer goes: at most TRIM_EVERY_S (5 s) and a fragment behind the playhead.
        trimmed = await state_when(page, f"s.t > {first['t']} + 6.5 && s.start > 0", 20_000)
        assert trimmed["t"] - trimmed["start"] < 5.5, trimmed
        assert float(trimmed["behind"]) < 1.0, trimmed
        assert trimmed["restarts"] == 0

        # The live lane skips ahead: a new part, a new init segment, the socket is closed;
        # the page connects again, plays on, and knows the new part's capture clock.
        feeder.skip.set()
        again = await state_when(page, "s.restarts >= 1 && s.state === 'live'")
        resumed = await state_when(page, f"s.t > {again['t']} + 1.0 && s.source === 'capture'")
        assert feeder.skipped is not None
        assert float(resumed["behind"]) < 1.0, resumed
        assert resumed["restarts"] == 1
