"""HLS footage is accountable and revocable like ``/recordings/...`` (review: a part file
fetched through ``/hls/...`` in pieces, each request reset after its first megabytes,
left no access-log entry, since the entry was written only once a response had been
sent whole; and disabling an account, or a player link's, did not stop an HLS part
transfer under way).

The real receiver on 127.0.0.1 over TLS. The players are raw TLS sockets with a tiny
receive buffer, so the receiver soon has to wait for them (a recording of ~20 MiB is
far more than the sockets buffer), that reset the connection (``SO_LINGER`` 0) where
the review's did. Nothing waits on time: the access log's entries are seen as they are
recorded (:meth:`receiver.access_log.AccessLog.listen`, on the event loop this test
runs on), and a cut is awaited by the rounds of the viewer's login re-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from yarl import URL

import receiver.access_log
from receiver.accounts import AccountStore, Role
from receiver.hls import STORAGE_KEY
from receiver.server import Receiver
from receiver.viewer import LOGIN_WATCH_KEY
from tests.logins import FAST, add_account, client_for, failing_access_log, log_in
from tests.media import META, PacketList
from tests.test_hls import capture_us, track

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
FILE = "cam1.0.mp4"
PART = f"hls/s-1/{FILE}"
#: Bytes added to each frame but the keyframes: a part far larger than socket buffers.
PAD = 512 << 10
#: The login re-check's interval in these tests (the receiver's default is 2 s).
RECHECK_S = 0.25


@pytest.fixture
async def rx(receiver: Receiver, packets: PacketList) -> Receiver:
    """The receiver with one closed recording, s-1 cam1: one part file of ~20 MiB."""
    rec = await receiver.store.open_session("s-1", "dev-1", META, [track(packets)])
    cam = rec.camera("cam1")
    for seq in range(40):
        payload, key = packets[seq]
        padding = b"" if key else b"\xa5" * PAD  # no start code in it: one NAL unit still
        await cam.append(seq, capture_us(seq), key, payload + padding, preroll=False, live=True)
    await rec.close("all clear")
    assert receiver._runner is not None
    await receiver._runner.app[STORAGE_KEY].sync()  # type: ignore[attr-defined]
    receiver._runner.app[LOGIN_WATCH_KEY].interval_s = RECHECK_S
    return receiver


@pytest.fixture
def entries(rx: Receiver) -> Iterator[list[dict[str, Any]]]:
    """Every access-log entry recorded from now on, as it is recorded."""
    seen: list[dict[str, Any]] = []
    stop = rx.access_log.listen(seen.append)
    yield seen
    stop()


@dataclass
class Transfer:
    """One GET of a part file on a TLS connection of its own, its answer's head read."""

    sock: socket.socket
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    length: int
    read: int = 0

    async def take(self, count: int) -> None:
        """Read ``count`` bytes of the body."""
        await asyncio.wait_for(self.reader.readexactly(count), 20)
        self.read += count

    async def rest(self) -> int:
        """Read until the body's end or the connection's; the body's bytes read in all."""
        try:
            async with asyncio.timeout(30):
                while self.read < self.length:
                    chunk = await self.reader.read(1 << 16)
                    if not chunk:
                        break
                    self.read += len(chunk)
        except (ConnectionError, ssl.SSLError):
            pass
        self.writer.close()
        return self.read

    def reset(self) -> None:
        """Hang up with a TCP reset, the rest of the answer unread."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def start(rx: Receiver, target: str, headers: dict[str, str]) -> Transfer:
    """``GET target`` (a path with its query) as a player does, until the answer's head."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", rx.port))
    tls = ssl.create_default_context(cafile=rx.cert_path)
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=tls, server_hostname="127.0.0.1", limit=1 << 16
    )
    lines = [f"GET /{target} HTTP/1.1", f"Host: 127.0.0.1:{rx.port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)).decode("latin-1")
    status_line, *fields = head.strip().split("\r\n")
    length = next(
        int(value) for name, _, value in (f.partition(":") for f in fields)
        if name.lower() == "content-length"
    )  # fmt: skip
    return Transfer(sock, reader, writer, int(status_line.split()[1]), length)


@dataclass
class Viewer:
    """Who fetches: a login (cookie) or a player link (``?t=``) of account ``name``."""

    name: str
    http: aiohttp.ClientSession
    link: str | None = None  # the link's token

    async def fetch(self, rx: Receiver, first: int | None = None) -> Transfer:
        """Start fetching the part file (from byte ``first``: a range request)."""
        headers = {} if first is None else {"Range": f"bytes={first}-"}
        if self.link is None:
            jar = self.http.cookie_jar.filter_cookies(URL(rx.url))
            headers["Cookie"] = "; ".join(f"{k}={v.value}" for k, v in jar.items())
            return await start(rx, PART, headers)
        return await start(rx, f"{PART}?t={self.link}", headers)


@contextlib.asynccontextmanager
async def viewer(rx: Receiver, name: str, via: str) -> AsyncIterator[Viewer]:
    """Log ``name`` (an officer) in; ``via="link"``: it asks for a player link of s-1 cam1."""
    await add_account(rx.accounts, name, Role.OFFICER)
    async with client_for(rx.url, rx.fingerprint) as http:
        await log_in(http, rx.url, name)
        found = Viewer(name, http)
        if via == "link":
            path = "api/sessions/s-1/cameras/cam1/player-link"
            async with http.post(rx.url + path, json={"ttl_s": 600}) as r:
                assert r.status == 200
                found.link = URL((await r.json())["url"]).query["t"]
        yield found


# -- every fetch is logged before its first byte ----------------------------------------------


def fetches(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    actions = ("recording_fetch", "player_link_fetch")
    return [e for e in entries if e["action"] in actions and e.get("file") == FILE]


@pytest.mark.parametrize("via", ["login", "link"])
async def test_a_part_fetch_the_player_resets_is_on_the_access_log(
    rx: Receiver, entries: list[dict[str, Any]], via: str
) -> None:
    async with viewer(rx, "olivia", via) as who:
        first = await who.fetch(rx, 0)
        assert first.status == 206
        assert first.length > 16 * MiB
        # The entry was recorded before the answer's first byte left: it is there now.
        (entry,) = fetches(entries)
        await first.take(2 * MiB)
        first.reset()
        # The next piece of the same file is the same viewing (logged once, as before)...
        again = await who.fetch(rx, 2 * MiB)
        assert again.status == 206
        await again.take(MiB)
        again.reset()
        assert fetches(entries) == [entry]
        # ... as is one that is read to the end.
        whole = await who.fetch(rx)
        assert (whole.status, await whole.rest()) == (200, whole.length)
        assert fetches(entries) == [entry]
    fields = {k: entry[k] for k in ("who", "role", "session", "camera", "remote", "file")}
    assert fields == {
        "who": "olivia", "role": "officer", "session": "s-1", "camera": "cam1",
        "remote": "127.0.0.1", "file": FILE,
    }  # fmt: skip
    if via == "login":
        assert (entry["action"], entry["via"]) == ("recording_fetch", "hls")
        assert entry["login"]
    else:
        assert entry["action"] == "player_link_fetch"
        (issued,) = [e for e in entries if e["action"] == "player_link_issue"]
        assert entry["link"] == issued["link"]
    await rx.access_log.flush()
    assert [e for e in rx.access_log.path.read_text().splitlines() if FILE in e]


async def test_each_login_s_reset_fetch_is_logged(
    rx: Receiver, entries: list[dict[str, Any]]
) -> None:
    """Two logins, each fetching a piece and hanging up: each is a viewing of its own."""
    async with viewer(rx, "olivia", "login") as one, viewer(rx, "olivia", "login") as two:
        for who in (one, two):
            transfer = await who.fetch(rx, 4 * MiB)
            await transfer.take(MiB)
            transfer.reset()
    logins = [e["login"] for e in fetches(entries)]
    assert len(logins) == 2 and logins[0] != logins[1]


# -- a transfer under way ends with its rights -------------------------------------------


def other_process(rx: Receiver, change: Callable[[AccountStore], None]) -> Awaitable[None]:
    """Change the accounts on a connection of their own, as ``breakglass receiver user``."""

    def run() -> None:
        with AccountStore(rx.data_dir / "accounts.sqlite", params=FAST) as accounts:
            change(accounts)

    return asyncio.to_thread(run)


async def disable(rx: Receiver, who: Viewer) -> None:
    await other_process(rx, lambda accounts: accounts.set_disabled(who.name, True))


async def log_out(rx: Receiver, who: Viewer) -> None:
    async with who.http.post(rx.url + "logout") as r:
        assert r.status == 200


async def expire(rx: Receiver, who: Viewer) -> None:
    clock = rx.player_links.clock
    rx.player_links.clock = lambda: clock() + 3600  # the 10-minute link is an hour old


async def password_reset(rx: Receiver, who: Viewer) -> None:
    await other_process(rx, lambda a: a.set_password(who.name, "a brand new passphrase 77"))


@pytest.mark.parametrize(
    ("via", "change", "bystander"),
    [
        ("login", disable, ("bob", "login")),
        ("login", log_out, ("olivia", "login")),  # another login of the same account
        ("link", disable, ("bob", "link")),
        ("link", password_reset, ("bob", "link")),
        ("link", expire, ("bob", "login")),
    ],
)
async def test_a_part_transfer_under_way_is_cut_when_its_rights_end(
    rx: Receiver,
    via: str,
    change: Callable[[Receiver, Viewer], Awaitable[None]],
    bystander: tuple[str, str],
) -> None:
    watch = rx._runner.app[LOGIN_WATCH_KEY]  # type: ignore[union-attr]
    async with viewer(rx, "olivia", via) as who, viewer(rx, *bystander) as other:
        victim, goes_on = await who.fetch(rx), await other.fetch(rx)
        assert victim.status == goes_on.status == 200
        await victim.take(MiB)
        await goes_on.take(MiB)  # both stall: the receiver waits for them to read
        await change(rx, who)
        # A round that began before the change may have passed it: the next one sees it.
        rounds = watch.rounds
        with contextlib.suppress(TimeoutError):  # nothing watches the transfer: read on
            await asyncio.wait_for(watch.wait_rounds(rounds + 2), 4 * RECHECK_S + 5)
        assert await victim.rest() < victim.length, "the transfer went on to its end"
        assert await goes_on.rest() == goes_on.length  # another's rights still hold
        refused = await who.fetch(rx)
        assert refused.status == 401
        await refused.rest()


# -- no log, no recorded footage ----------------------------------------------------------------


@pytest.mark.parametrize("via", ["login", "link", "viewer"])
async def test_recorded_footage_waits_for_its_entry_and_is_withheld_without_it(
    rx: Receiver, entries: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    """Footage leaves only once the log names who took it (as an evidence export): a log
    that cannot be written withholds it (503, said in the log once it is written), and
    the next try, the log mended, is logged anew and served."""
    async with viewer(rx, "olivia", "link" if via == "link" else "login") as who:
        if via == "viewer":  # the web viewer's own route, not HLS
            jar = who.http.cookie_jar.filter_cookies(URL(rx.url))
            cookie = {"Cookie": "; ".join(f"{k}={v.value}" for k, v in jar.items())}

            async def fetch() -> Transfer:
                return await start(rx, f"recordings/s-1/{FILE}", cookie)
        else:

            async def fetch() -> Transfer:
                return await who.fetch(rx)

        monkeypatch.setattr(receiver.access_log, "VIEW_LOG_WAIT_S", 0.5)
        with failing_access_log(rx.access_log):
            refused = await fetch()
            assert refused.status == 503
            assert refused.length < 1024  # an error, not footage
            (withheld,) = [e for e in entries if e["action"] == "footage_withheld"]
            assert withheld["reason"] == "access_log_unavailable"
            assert (withheld["who"], withheld["file"]) == ("olivia", FILE)
            refused.writer.close()
        served = await fetch()
        assert (served.status, await served.rest()) == (200, served.length)
    viewed = fetches(entries)
    assert len(viewed) == 2  # the withheld try and the served one
    assert entries.index(viewed[0]) < entries.index(withheld) < entries.index(viewed[1])
    assert withheld["withheld"] == viewed[0]["action"]
    await rx.access_log.flush()
    written = [json.loads(line) for line in rx.access_log.path.read_text().splitlines()]
    assert [e["action"] for e in written if e.get("file") == FILE] == [
        viewed[0]["action"], "footage_withheld", viewed[1]["action"]
    ]  # fmt: skip
