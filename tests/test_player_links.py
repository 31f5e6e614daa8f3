"""Player links (issue #6, point 4): a recording's HLS for players that cannot log in.

The real receiver on 127.0.0.1 over TLS; recordings made with real libx264
packets through the receiver's own store; police log in through the real
login. Players are a plain HTTPS client without cookies, and the system's
``ffprobe``/``ffmpeg``, checking the receiver's certificate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from receiver.accounts import Role
from receiver.auth import CSRF_HEADER
from receiver.hls import STORAGE_KEY
from receiver.player_links import KEY_FILE, MAX_TTL_S, PlayerLinks
from receiver.server import Receiver
from tests.browser import chromium, logged_in_page, needs_chromium
from tests.logins import add_account, logged_in
from tests.media import META, PacketList
from tests.test_hls import feed, ffmpeg_frames_url, ffprobe_url, track

pytestmark = pytest.mark.timeout(90)

#: The page's timeouts (ms): it polls the sessions every 1.5 s.
WAIT_MS = 15_000


def link_path(session: str = "s-1", camera: str = "cam1") -> str:
    return f"api/sessions/{session}/cameras/{camera}/player-link"


@pytest.fixture
async def rx(receiver: Receiver, packets: PacketList) -> Receiver:
    """The receiver with two closed recordings: s-1 (cam1, cam2) and s-2 (cam1)."""
    for session, cameras in (("s-1", ("cam1", "cam2")), ("s-2", ("cam1",))):
        tracks = [track(packets, camera) for camera in cameras]
        rec = await receiver.store.open_session(session, "dev-1", META, tracks)
        for camera in cameras:
            await feed(rec.camera(camera), packets, range(90))
        await rec.close("all clear")
    assert receiver._runner is not None
    await receiver._runner.app[STORAGE_KEY].sync()  # type: ignore[attr-defined]
    return receiver


@pytest.fixture
async def player(rx: Receiver) -> AsyncIterator[aiohttp.ClientSession]:
    """A client as a player is: no cookie, no Origin, the receiver's certificate checked."""
    tls = ssl.create_default_context(cafile=rx.cert_path)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls), cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        yield http


async def issue(
    rx: Receiver,
    role: Role = Role.OFFICER,
    name: str | None = None,
    camera: str = "cam1",
    **body: Any,
) -> dict[str, Any]:
    async with (
        logged_in(rx, role, name) as http,
        http.post(rx.url + link_path("s-1", camera), json=body or None) as r,
    ):
        answer: dict[str, Any] = await r.json()
        assert r.status == 200, answer
        return answer


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as r:
        body = await r.read()
        is_json = r.content_type == "application/json"
        return r.status, json.loads(body) if is_json else body.decode(errors="replace")


def token_of(url: str) -> str:
    return URL(url).query["t"]


def with_token(rx: Receiver, path: str, token: str) -> str:
    return str(URL(rx.url + path).with_query(t=token))


async def access(rx: Receiver) -> list[dict[str, Any]]:
    await rx.access_log.flush()
    return [json.loads(line) for line in (rx.data_dir / "access.log").read_text().splitlines()]


def uris(playlist: str) -> list[str]:
    """Every URI a playlist lists: the maps' and the segments'."""
    maps = re.findall(r'#EXT-X-MAP:URI="([^"]+)"', playlist)
    return maps + [line for line in playlist.splitlines() if line and not line.startswith("#")]


# -- a link plays ----------------------------------------------------------------------


async def test_a_link_plays_in_ffmpeg_without_a_cookie_and_is_audited(
    rx: Receiver, player: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    before = time.time()
    link = await issue(rx, Role.OFFICER, "asmith")
    url, token = link["url"], token_of(link["url"])
    assert url == f"https://127.0.0.1:{rx.port}/hls/s-1/cam1.m3u8?t={token}"
    assert before + 3600 - 1 <= link["expires_at"] <= time.time() + 3600
    assert (link["ttl_s"], link["session"], link["camera"]) == (3600, "s-1", "cam1")
    assert len(url) < 300

    status, playlist = await get(player, url)
    assert status == 200, playlist
    listed = uris(playlist)
    assert len(listed) == 3 and all(u == f"cam1.0.mp4?t={token}" for u in listed)
    assert playlist.endswith("#EXT-X-ENDLIST\n")
    segment = str(URL(url).join(URL(listed[-1])))
    async with player.get(segment, headers={"Range": "bytes=0-99"}) as r:
        assert (r.status, len(await r.read())) == (206, 100)
    async with player.head(url) as r:
        assert r.status == 200
    assert (await get(player, rx.url + "hls/s-1/cam1.m3u8"))[0] == 401  # no link, no cookie

    (stream,) = (await ffprobe_url(rx.cert_path, url, "-show_streams"))["streams"]
    assert (stream["codec_name"], stream["width"], stream["height"]) == ("h264", 320, 240)
    assert await ffmpeg_frames_url(rx.cert_path, url) == 90  # every segment fetched by link

    log = await access(rx)
    (issued,) = [e for e in log if e["action"] == "player_link_issue"]
    assert (issued["who"], issued["role"], issued["session"], issued["camera"]) == (
        "asmith", "officer", "s-1", "cam1",
    )  # fmt: skip
    assert issued["link"] == link["link"] and issued["expires"] == link["expires"]
    assert issued["ttl_s"] == 3600 and issued["login"]
    # Four playlist fetches (ours, HEAD, ffprobe, ffmpeg): the first GET is logged, once.
    (played,) = [e for e in log if e["action"] == "player_link_playlist"]
    assert (played["who"], played["session"], played["camera"], played["link"]) == (
        "asmith", "s-1", "cam1", link["link"],
    )  # fmt: skip
    assert not [e for e in log if e["action"] == "recording_playlist"]  # not a login's
    # The footage itself too, once per link, address and file (range requests and the
    # players' fetches of the same file are one line).
    fetched = [
        (e["file"], e["link"], e["remote"]) for e in log if e["action"] == "player_link_fetch"
    ]
    assert fetched == [("cam1.0.mp4", link["link"], "127.0.0.1")]
    assert token not in (rx.data_dir / "access.log").read_text()
    # aiohttp's request log shows the paths, never the token.
    assert "/hls/s-1/cam1.m3u8" in caplog.text and token not in caplog.text


async def test_any_police_role_may_ask_for_a_link_with_a_bounded_lifetime(rx: Receiver) -> None:
    for role in Role:
        link = await issue(rx, role, camera="cam2", ttl_s=MAX_TTL_S)
        assert link["ttl_s"] == MAX_TTL_S
    async with logged_in(rx, Role.OFFICER) as http:
        for body, code in [
            ({"ttl_s": 59}, "malformed"),
            ({"ttl_s": MAX_TTL_S + 1}, "malformed"),
            ({"ttl_s": 600.5}, "malformed"),
            ({"ttl_s": True}, "malformed"),
            ({"ttl_s": "3600"}, "malformed"),
        ]:
            async with http.post(rx.url + link_path(), json=body) as r:
                assert (r.status, (await r.json())["error"]) == (400, code), body
        async with http.post(rx.url + link_path(), data=b"x" * 2000) as r:
            assert (r.status, (await r.json())["error"]) == (400, "malformed")
        for path, status, code in [
            (link_path("s-9"), 404, "unknown_session"),
            (link_path("s-1", "cam9"), 404, "unknown_camera"),
            (link_path("s-1", "Cam1"), 400, "invalid_id"),
        ]:
            async with http.post(rx.url + path) as r:
                assert (r.status, (await r.json())["error"]) == (status, code), path
        del http.headers[CSRF_HEADER]
        async with http.post(rx.url + link_path()) as r:
            assert (r.status, (await r.json())["error"]) == (403, "csrf")
        async with http.post(rx.url + link_path(), headers={CSRF_HEADER: "x" * 43}) as r:
            assert (r.status, (await r.json())["error"]) == (403, "csrf")
    evil = {"Origin": "https://evil.example"}
    async with (
        logged_in(rx, Role.OFFICER) as http,
        http.post(rx.url + link_path(), headers=evil) as r,
    ):
        assert (r.status, (await r.json())["error"]) == (403, "bad_origin")
    tls = ssl.create_default_context(cafile=rx.cert_path)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as anonymous,
        anonymous.post(rx.url + link_path()) as r,
    ):
        assert (r.status, (await r.json())["error"]) == (401, "unauthenticated")
    issued = [e for e in await access(rx) if e["action"] == "player_link_issue"]
    assert [e["role"] for e in issued] == ["officer", "dispatcher", "admin"]


# -- where a link does not count -----------------------------------------------------------


async def test_a_link_opens_its_own_camera_only_and_nothing_else(
    rx: Receiver, player: aiohttp.ClientSession
) -> None:
    token = token_of((await issue(rx))["url"])
    assert (await get(player, with_token(rx, "hls/s-1/cam1.0.mp4", token)))[0] == 200
    for path in ["hls/s-1/cam2.m3u8", "hls/s-1/cam2.0.mp4", "hls/s-2/cam1.m3u8",
                 "hls/s-2/cam1.0.mp4", "hls/s-1/session.json", "hls/s-1/cam1.7.mp4x"]:  # fmt: skip
        status, body = await get(player, with_token(rx, path, token))
        assert (status, body["error"]) == (401, "bad_token"), path
    for path in ["api/sessions", "v1/me", "v1/devices", "recordings/s-1/cam1.0.mp4",
                 "v1/users", "static/viewer.js", "hls/s-1"]:  # fmt: skip
        status, body = await get(player, with_token(rx, path, token))
        assert (status, body["error"]) == (401, "unauthenticated"), path
    async with player.get(with_token(rx, "", token), headers={"Accept": "text/html"},
                          allow_redirects=False) as r:  # fmt: skip
        assert (r.status, r.headers["Location"]) == (303, "/login")
    origin = {"Origin": f"https://127.0.0.1:{rx.port}"}
    for path in [link_path(), "v1/evidence/s-1", "v1/dispatch", "logout"]:
        async with player.post(with_token(rx, path, token), headers=origin) as r:
            assert (r.status, (await r.json())["error"]) == (401, "unauthenticated"), path
    ws = with_token(rx, "v1/live/s-1/cam1", token).replace("https://", "wss://")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await player.ws_connect(ws, headers=origin)
    assert refused.value.status == 401
    # Two tokens, or one beside a login: the link is judged alone, not merged.
    both = f"{rx.url}hls/s-1/cam1.m3u8?t={token}&t={token}"
    assert (await get(player, both))[1]["error"] == "bad_token"


async def test_a_tampered_or_forged_link_is_refused_and_audited_without_the_token(
    rx: Receiver, player: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = token_of((await issue(rx))["url"])
    payload, mac = token.split(".")
    forger = PlayerLinks(tmp_path / "other.key")
    forger.load()
    forged = forger.mint("officer-1", Role.OFFICER, "s-1", "cam1", 3600).token
    flipped = "A" if payload[5] != "A" else "B"
    tampered = [
        payload[:5] + flipped + payload[6:] + "." + mac,  # another payload
        payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BA"),  # another MAC
        payload + "." + mac[:-1],  # cut
        payload + "x." + mac,  # a length base64 cannot have
        forged,  # our format, another key
        "x" * 600,
        "",
        "not a token",
    ]
    for bad in tampered:
        status, body = await get(player, with_token(rx, "hls/s-1/cam1.m3u8", bad))
        assert (status, body["error"]) == (401, "bad_token"), bad
        assert body["detail"] and "t=" not in body["detail"]
    log = await access(rx)
    refused = [e for e in log if e["action"] == "player_link_refused"]
    # Per address and code, once: a player retrying, or a prober, is one line.
    assert [(e["code"], e["who"], e["session"], e["camera"]) for e in refused] == [
        ("bad_token", None, "s-1", "cam1")
    ]
    text = (rx.data_dir / "access.log").read_text()
    assert all(bad not in text for bad in tampered[:5]) and token not in text


async def test_a_link_expires(rx: Receiver, player: aiohttp.ClientSession) -> None:
    await add_account(rx.accounts, "officer-1")  # its password is older than the link
    now = [time.time()]
    rx.player_links.clock = lambda: now[0]
    link = await issue(rx, ttl_s=120)
    assert link["expires_at"] == int(now[0]) + 120
    url = link["url"]
    now[0] = link["expires_at"] - 0.5
    assert (await get(player, url))[0] == 200
    now[0] = link["expires_at"]
    status, body = await get(player, url)
    assert (status, body["error"]) == (401, "token_expired")
    segment = with_token(rx, "hls/s-1/cam1.0.mp4", token_of(url))
    assert (await get(player, segment))[1]["error"] == "token_expired"
    (refused,) = [e for e in await access(rx) if e["action"] == "player_link_refused"]
    assert (refused["code"], refused["who"], refused["link"]) == (
        "token_expired", "officer-1", link["link"],
    )  # fmt: skip


# -- a link dies with its user's rights -------------------------------------------------------


async def test_a_link_dies_with_its_users_rights(
    rx: Receiver, player: aiohttp.ClientSession
) -> None:
    accounts = rx.accounts

    async def status_of(url: str) -> tuple[int, str | None]:
        status, body = await get(player, url)
        return status, body["error"] if status != 200 else None

    # Disabled: refused, and for good (enabling the account again does not revive it).
    disabled = (await issue(rx, Role.OFFICER, "dana"))["url"]
    await accounts_call(accounts.set_disabled, "dana", True)
    assert await status_of(disabled) == (401, "token_revoked")
    await accounts_call(accounts.set_disabled, "dana", False)
    assert await status_of(disabled) == (401, "token_revoked")
    fresh = (await issue(rx, Role.OFFICER, "dana"))["url"]  # a link asked for since works
    assert await status_of(fresh) == (200, None)
    # A new password ends every link made before it, for good.
    await accounts_call(accounts.set_password, "dana", "another long passphrase 7")
    assert await status_of(fresh) == (401, "token_revoked")
    # A role lowered below the one the link was made with ends it, for good; a raised one
    # keeps it.
    dispatcher = (await issue(rx, Role.DISPATCHER, "rtcc-1"))["url"]
    officer = (await issue(rx, Role.OFFICER, "olly"))["url"]
    await accounts_call(accounts.set_role, "rtcc-1", Role.OFFICER)
    await accounts_call(accounts.set_role, "olly", Role.ADMIN)
    assert await status_of(dispatcher) == (401, "token_revoked")
    assert await status_of(officer) == (200, None)
    await accounts_call(accounts.set_role, "rtcc-1", Role.DISPATCHER)
    assert await status_of(dispatcher) == (401, "token_revoked")
    log = await access(rx)
    refused = [(e["who"], e["code"]) for e in log if e["action"] == "player_link_refused"]
    # Once per link and code: dana's two links, rtcc-1's one.
    assert refused == [("dana", "token_revoked")] * 2 + [("rtcc-1", "token_revoked")]


async def accounts_call(fn: Any, *args: Any) -> None:
    """An account change as ``breakglass receiver user ...`` makes it (off the event loop)."""
    await asyncio.to_thread(fn, *args)


# -- the key ---------------------------------------------------------------------------------


def test_the_key_is_made_once_private_and_shared_by_every_process(tmp_path: Path) -> None:
    path = tmp_path / "data" / KEY_FILE
    first, second = PlayerLinks(path), PlayerLinks(path)
    first.load()
    assert (path.stat().st_mode & 0o777) == 0o600
    second.load()  # e.g. after a restart: links made before still open
    token = first.mint("jdoe", Role.OFFICER, "s-1", "cam1", 600).token
    assert second.check(token, "s-1", "cam1").name == "jdoe"
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]
    os.chmod(path, 0o640)
    with pytest.raises(PermissionError, match="too open"):
        PlayerLinks(path).load()


# -- the page's button --------------------------------------------------------------------------


@needs_chromium
async def test_the_player_link_button_shows_a_link_that_plays(
    rx: Receiver, player: aiohttp.ClientSession
) -> None:
    await add_account(rx.accounts, "olivia")
    tile = '.session[data-session="s-1"] .tile[data-camera="cam2"]'
    box = f"{tile} input.hls-url"
    async with chromium() as browser, logged_in_page(browser, rx.url, "olivia") as page:
        await page.click(f"{tile} button.player-link", timeout=WAIT_MS)
        await page.wait_for_function(_HAS_LINK, arg=[box, ""], timeout=WAIT_MS)
        first = await page.input_value(box)
        await page.select_option(f"{tile} select.link-ttl", str(4 * 3600))  # a new link
        await page.wait_for_function(_HAS_LINK, arg=[box, first], timeout=WAIT_MS)
        url = await page.input_value(box)
        note = await page.text_content(f"{tile} .hls-box .note") or ""
        assert await page.get_attribute(f"{tile} button.player-link", "aria-pressed") == "true"
    assert url.startswith(f"https://127.0.0.1:{rx.port}/hls/s-1/cam2.m3u8?t=")
    assert "works until" in note and "logged under your name" in note
    status, playlist = await get(player, url)
    assert status == 200 and playlist.startswith("#EXTM3U")
    issued = [e for e in await access(rx) if e["action"] == "player_link_issue"]
    assert [(e["who"], e["camera"], e["ttl_s"]) for e in issued] == [
        ("olivia", "cam2", 3600),
        ("olivia", "cam2", 4 * 3600),
    ]


# A link other than the one given ([selector, old value]) is in the box.
_HAS_LINK = """([sel, old]) => {
  const v = document.querySelector(sel).value;
  return v.startsWith('https://') && v !== old;
}"""
