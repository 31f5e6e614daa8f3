"""The account pages in Chromium (Playwright, Debian's browser) on the real receiver."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import expect

from receiver.accounts import Role
from receiver.server import Receiver
from tests.browser import chromium, log_in_page, logged_in_page, needs_chromium
from tests.logins import FAST, PASSWORD, add_account

pytestmark = [needs_chromium, pytest.mark.timeout(60)]

NICK = "a first passphrase for him"
NEW = "her new passphrase 9 words"


@pytest.fixture
async def rx(tmp_path: Path) -> AsyncIterator[Receiver]:
    receiver = Receiver(tmp_path / "receiver", "127.0.0.1", 0, password_params=FAST)
    async with receiver:
        await add_account(receiver.accounts, "olivia", Role.OFFICER)
        await add_account(receiver.accounts, "ada", Role.ADMIN)
        yield receiver


async def test_an_admin_adds_and_disables_an_officer_who_changes_a_password(rx: Receiver) -> None:
    async with chromium() as browser:
        async with logged_in_page(browser, rx.url, "ada") as page:
            await expect(page.locator("#user")).to_have_text("ada (admin)")
            await page.click("#accounts-link")
            await page.wait_for_url(rx.url + "accounts")
            await expect(page.locator('tr[data-name="ada"] .you')).to_have_text(" (you)")
            await page.fill("#add-name", "nick")
            await page.select_option("#add-role", "officer")
            await page.fill("#add-password", NICK)
            await page.click("#add")
            nick = page.locator('tr[data-name="nick"]')
            await expect(nick.locator(".state")).to_have_text("enabled")
            await expect(page.locator("#message")).to_have_text("Added nick (officer).")
            await nick.locator("button.disable").click()
            await expect(nick.locator(".state")).to_have_text("disabled")
            await expect(nick.locator("button.enable")).to_be_visible()
            # Nobody can disable or demote themselves from the page.
            await expect(page.locator('tr[data-name="ada"] button.disable')).to_be_disabled()
            await expect(page.locator('tr[data-name="ada"] select')).to_be_disabled()
        assert (await asyncio.to_thread(rx.accounts.get, "nick")).disabled

        async with logged_in_page(browser, rx.url, "olivia") as page:
            await expect(page.locator("#user")).to_have_text("olivia (officer)")
            await expect(page.locator("#accounts-link")).to_be_hidden()
            await page.click("#password-link")
            await page.wait_for_url(rx.url + "password")
            await page.fill("#current", "not my password")
            await page.fill("#new", NEW)
            await page.fill("#again", NEW)
            await page.click("#change")
            await expect(page.locator("#message")).to_have_text("The current password is wrong.")
            await page.fill("#current", PASSWORD)
            await page.click("#change")
            await expect(page.locator("#done")).to_be_visible()
            await expect(page.locator("#done")).to_contain_text("log in again")
            await page.click("#relogin")
            await page.wait_for_url(rx.url + "login")
            await log_in_page(page, rx.url, "olivia", NEW)
            await expect(page.locator("#user")).to_have_text("olivia (officer)")

    rx.access_log.flush_sync()
    lines = (rx.data_dir / "access.log").read_text()
    assert NICK not in lines and NEW not in lines and PASSWORD not in lines
    entries = [json.loads(line) for line in lines.splitlines()]
    assert [(e["action"], e["who"], e.get("target")) for e in entries if e["who"] != "olivia"
            or e["action"].startswith("password")] == [
        ("login", "ada", None),
        ("user_add", "ada", "nick"),
        ("user_disable", "ada", "nick"),
        ("password_change_failed", "olivia", None),
        ("password_change", "olivia", None),
    ]  # fmt: skip
