"""Debian's Chromium driven by Playwright (never ``playwright install``; RECIPES.md).

``async with chromium() as browser`` launches ``/usr/bin/chromium`` headless
with a fresh profile; :func:`logged_in_page` opens a page that logs in through
the receiver's real login page, as an officer would.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright

from receiver.recording import RecordingStore
from receiver.viewer import setup_viewer
from tests.logins import PASSWORD, secured_client

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

#: Mark for tests that need the browser.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs chromium (apt-get install chromium)"
)


@contextlib.asynccontextmanager
async def chromium(*, autoplay: bool = True) -> AsyncIterator[Browser]:
    """Headless Chromium (a temporary profile, removed when it closes).

    ``autoplay=False``: a desktop browser's policy, no sound before the user
    touches the page (headless Chromium would allow it).
    """
    assert CHROMIUM is not None
    args = [a for a in ARGS if not a.startswith("--autoplay-policy")]
    policy = "no-user-gesture-required" if autoplay else "document-user-activation-required"
    args.append(f"--autoplay-policy={policy}")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield browser
        finally:
            await browser.close()


async def log_in_page(page: Page, base_url: str, name: str, password: str = PASSWORD) -> None:
    """Fill in and send the login form at ``base_url/login``; wait for the viewer."""
    await page.goto(base_url.rstrip("/") + "/login")
    await page.fill("#name", name)
    await page.fill("#password", password)
    await page.click("#submit")
    await page.wait_for_url(base_url.rstrip("/") + "/")


@contextlib.asynccontextmanager
async def logged_in_page(
    browser: Browser, base_url: str, name: str, password: str = PASSWORD
) -> AsyncIterator[Page]:
    """A new browser context (its own cookies) logged in to the receiver at ``base_url``."""
    context = await browser.new_context(ignore_https_errors=True)  # self-signed receiver
    try:
        page = await context.new_page()
        await log_in_page(page, base_url, name, password)
        yield page
    finally:
        await context.close()


@contextlib.asynccontextmanager
async def viewer_page(
    store: RecordingStore, folder: Path, name: str = "officer-1"
) -> AsyncIterator[Page]:
    """The viewer of ``store`` (its routes alone, secured, on 127.0.0.1) in Chromium,
    logged in as ``name`` (an officer made in ``folder``)."""
    app = web.Application()
    setup_viewer(app, store, store.live_feed)
    async with (
        secured_client(app, folder) as client,
        chromium() as browser,
        logged_in_page(browser, str(client.make_url("/")), name) as page,
    ):
        yield page
