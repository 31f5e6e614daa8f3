"""Logging in with Chromium (Playwright, Debian's browser): the real page, the real receiver."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from playwright.async_api import expect

from receiver.accounts import LockoutPolicy, Role
from receiver.server import Receiver
from tests.browser import chromium, log_in_page, logged_in_page, needs_chromium
from tests.logins import FAST, PASSWORD, add_account

pytestmark = [needs_chromium, pytest.mark.timeout(60)]


@pytest.fixture
async def rx(tmp_path: Path) -> AsyncIterator[Receiver]:
    receiver = Receiver(tmp_path / "receiver", "127.0.0.1", 0, password_params=FAST)
    receiver.accounts.lockout = LockoutPolicy(max_failures=3, lockout_s=600)
    async with receiver:
        await add_account(receiver.accounts, "olivia", Role.OFFICER)
        yield receiver


def actions(rx: Receiver) -> list[str]:
    rx.access_log.flush_sync()
    lines = (rx.data_dir / "access.log").read_text().splitlines()
    return [json.loads(line)["action"] for line in lines]


# A request made by the page's own script, with its cookie: the status and error code.
_FETCH_JS = """async ([method, url, headers]) => {
  const res = await fetch(url, {method, headers, credentials: 'same-origin', cache: 'no-store'});
  let body = null;
  try { body = await res.json(); } catch (err) { body = null; }
  return {status: res.status, error: body && body.error};
}"""


async def test_login_viewer_csrf_roles_and_logout(rx: Receiver) -> None:
    async with chromium() as browser:
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        await page.goto(rx.url)  # not logged in: the viewer sends us to the login page
        assert page.url == rx.url + "login"
        await log_in_page(page, rx.url, "olivia")
        await page.wait_for_function(
            "document.getElementById('user').textContent === 'olivia (officer)'"
        )
        await page.wait_for_function(
            "document.getElementById('status').textContent.startsWith('updated')"
        )
        assert await page.is_visible("#empty")  # the session list, empty so far
        cookies = await context.cookies()
        (cookie,) = cookies
        assert cookie["name"] == "__Host-breakglass"
        assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
        assert await page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it

        # A state change without the CSRF token is refused, even from the page itself.
        no_token = await page.evaluate(_FETCH_JS, ["POST", "/logout", {}])
        assert no_token == {"status": 403, "error": "csrf"}
        # An officer is not an admin.
        users = await page.evaluate(_FETCH_JS, ["GET", "/v1/users", {}])
        assert users == {"status": 403, "error": "forbidden"}

        await page.click("#logout")
        await page.wait_for_url(rx.url + "login")
        after = await page.evaluate(_FETCH_JS, ["GET", "/api/sessions", {}])
        assert after == {"status": 401, "error": "unauthenticated"}
        await context.close()
    assert actions(rx) == ["login", "logout"]


async def test_wrong_password_is_refused_then_the_name_locks(rx: Receiver) -> None:
    async with chromium() as browser:
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        await page.goto(rx.url + "login")
        for attempt in range(4):
            await page.fill("#name", "olivia")
            await page.fill("#password", "not the password" if attempt < 3 else PASSWORD)
            async with page.expect_response(rx.url + "login") as answer:
                await page.click("#submit")
            response = await answer.value
            message = expect(page.locator("#message"))  # the script shows it after the answer
            if attempt < 3:
                assert response.status == 401
                await message.to_have_text(re.compile(r"^Wrong name or password\."))
            else:  # the right password, but the name is locked now
                assert response.status == 429
                await message.to_have_text(
                    re.compile(r"^Too many failed attempts from this network: this name is lo")
                )
            assert page.url == rx.url + "login"
        assert await context.cookies() == []
        await context.close()
    assert actions(rx) == ["login_failed"] * 3 + ["login_lockout", "login_failed"]


async def test_the_login_form_works_without_its_script(rx: Receiver) -> None:
    """A plain form POST (no JavaScript) logs in too, and a wrong one comes back with a note."""
    async with chromium() as browser:
        context = await browser.new_context(ignore_https_errors=True, java_script_enabled=False)
        page = await context.new_page()
        await page.goto(rx.url + "login")
        await page.fill("#name", "olivia")
        await page.fill("#password", "not the password")
        await page.click("#submit")
        await page.wait_for_url(rx.url + "login?error=invalid_credentials")
        await page.fill("#name", "olivia")
        await page.fill("#password", PASSWORD)
        await page.click("#submit")
        await page.wait_for_url(rx.url)
        assert "breakglass receiver" in (await page.title())
        await context.close()


async def test_the_login_page_shows_no_text_from_its_link(rx: Receiver) -> None:
    """``/login?error=...`` showed any text in the page's own words (phishing by link)."""
    lure = "this receiver moved. Log in at https://police.example/login instead"
    async with chromium() as browser:
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        await page.goto(rx.url + "login?error=" + quote(lure))
        await page.wait_for_function("document.getElementById('message').textContent !== ''")
        assert await page.text_content("#message") == "Login failed."
        await page.goto(rx.url + "login?error=locked")
        await page.wait_for_function("document.getElementById('message').textContent !== ''")
        assert "locked" in (await page.text_content("#message") or "")
        await context.close()


async def test_a_dispatcher_sees_the_viewer(rx: Receiver) -> None:
    await add_account(rx.accounts, "dana", Role.DISPATCHER)
    async with chromium() as browser, logged_in_page(browser, rx.url, "dana") as page:
        await page.wait_for_function(
            "document.getElementById('user').textContent === 'dana (dispatcher)'"
        )
        me: dict[str, Any] = await page.evaluate(_FETCH_JS, ["GET", "/v1/me", {}])
        assert me == {"status": 200, "error": None}
