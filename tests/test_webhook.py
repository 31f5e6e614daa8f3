"""The district's session notifications: signed, durable, retried (issue #6, point 7)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from provisioning.tls import ensure_certificate, fingerprint_digest, server_context
from receiver.webhook import (
    FIRST_RETRY_S,
    GIVE_UP_S,
    MAX_RETRY_S,
    Notifier,
    Outbox,
    Pending,
    SessionNotices,
    WebhookError,
    _redacted,
    check_url,
    safe_url,
    session_event,
    verify,
)

pytestmark = pytest.mark.timeout(30)


@dataclass
class District:
    """The district's endpoint on loopback: answers ``fail_first`` requests with 503, and
    500 to an event ``failing(its JSON)`` (the endpoint down, or failing on some events)."""

    url: str
    pin: str
    fail_first: int = 0
    failing: Callable[[dict[str, Any]], bool] = lambda doc: False
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # to each of ``received``
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def tried(self) -> list[tuple[str, str]]:
        """``(type, session)`` of every POST, answered or not, in order."""
        return [_type_and_session(body) for _, body in self.received]

    def taken(self) -> list[tuple[str, str]]:
        """``(type, session)`` of every event the district took (answered 2xx), in order."""
        pairs = zip(self.received, self.answers, strict=True)
        return [_type_and_session(body) for (_, body), status in pairs if status < 300]


def _type_and_session(body: bytes) -> tuple[str, str]:
    doc = json.loads(body)
    return doc["type"], doc["session"]


@pytest.fixture
async def district(tmp_path: Path) -> AsyncIterator[District]:
    pin = ensure_certificate(
        tmp_path / "d.crt", tmp_path / "d.key", common_name="district", hosts=["127.0.0.1"]
    )
    state = District(url="", pin=pin)

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        state.received.append((dict(request.headers), body))
        state.arrived.set()
        if len(state.received) <= state.fail_first:
            status = 503
        else:
            status = 500 if state.failing(json.loads(body)) else 204
        state.answers.append(status)
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hooks/breakglass", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(
        runner, "127.0.0.1", 0, ssl_context=server_context(tmp_path / "d.crt", tmp_path / "d.key")
    )
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"https://127.0.0.1:{port}/hooks/breakglass"
    yield state
    await runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def started(device: str = "lincoln-pi-1") -> tuple[str, bytes]:
    return session_event(
        "session.started",
        device=device,
        building="lincoln-elementary",
        session="s-1",
        at=1_800_000_000.0,
        started_by={"kind": "button", "button": "office", "location": "Main office"},
        cameras=[{"id": "hall-2", "zone": "interior", "codec": "h264"}],
    )


async def test_a_failed_delivery_is_retried_with_backoff_and_verifies(
    tmp_path: Path, district: District
) -> None:
    key = Ed25519PrivateKey.generate()
    clock = Clock()
    district.fail_first = 2
    notifier = Notifier(
        district.url,
        Outbox(tmp_path / "notify.sqlite"),
        key,
        ssl=aiohttp.Fingerprint(fingerprint_digest(district.pin)),
        clock=clock,
    )
    event_id, body = started()
    await notifier.notify(event_id, body)
    async with aiohttp.ClientSession() as http:
        assert await notifier.deliver_due(http) == 0  # 503
        assert await notifier.deliver_due(http) == 0  # not due before the backoff
        clock.now += FIRST_RETRY_S
        assert await notifier.deliver_due(http) == 0  # 503 again; next in 2 x 5 s
        clock.now += FIRST_RETRY_S
        assert await notifier.deliver_due(http) == 0
        clock.now += FIRST_RETRY_S
        assert await notifier.deliver_due(http) == 1
    assert len(district.received) == 3
    headers, delivered = district.received[-1]
    assert delivered == body
    assert headers["Breakglass-Event-Id"] == event_id
    assert verify(
        key.public_key(), headers["Breakglass-Signature"], headers["Breakglass-Timestamp"], body
    )
    assert not verify(
        Ed25519PrivateKey.generate().public_key(),
        headers["Breakglass-Signature"],
        headers["Breakglass-Timestamp"],
        body,
    )
    assert not verify(
        key.public_key(), headers["Breakglass-Signature"], headers["Breakglass-Timestamp"],
        body.replace(b"lincoln", b"lincolm"),
    )  # fmt: skip
    doc = json.loads(body)
    assert doc["type"] == "session.started" and doc["cameras"] == [
        {"id": "hall-2", "zone": "interior"}
    ]
    assert notifier.outbox.states() == {"delivered": 1}
    notifier.outbox.close()


async def test_queued_events_survive_a_restart_and_are_sent_by_the_task(
    tmp_path: Path, district: District
) -> None:
    key = Ed25519PrivateKey.generate()
    outbox = Outbox(tmp_path / "notify.sqlite")
    event_id, body = started()
    outbox.add(body, event_id=event_id, now=0)
    outbox.close()  # the receiver stopped before it could send
    pin = aiohttp.Fingerprint(fingerprint_digest(district.pin))
    async with Notifier(district.url, Outbox(tmp_path / "notify.sqlite"), key, ssl=pin):
        async with asyncio.timeout(10):
            await district.arrived.wait()
    assert district.received[0][1] == body


async def test_an_event_is_given_up_after_three_days_and_kept(
    tmp_path: Path, district: District
) -> None:
    clock = Clock()
    district.fail_first = 100
    notifier = Notifier(
        district.url,
        Outbox(tmp_path / "notify.sqlite"),
        Ed25519PrivateKey.generate(),
        ssl=aiohttp.Fingerprint(fingerprint_digest(district.pin)),
        clock=clock,
    )
    await notifier.notify(*started())
    async with aiohttp.ClientSession() as http:
        await notifier.deliver_due(http)
        clock.now += GIVE_UP_S
        await notifier.deliver_due(http)
    assert notifier.outbox.states() == {"failed": 1}
    assert notifier.outbox.next_due() is None
    notifier.outbox.close()


async def test_a_wrong_pin_is_a_failed_attempt_not_a_delivery(
    tmp_path: Path, district: District
) -> None:
    notifier = Notifier(
        district.url,
        Outbox(tmp_path / "notify.sqlite"),
        Ed25519PrivateKey.generate(),
        ssl=aiohttp.Fingerprint(b"\0" * 32),
        clock=Clock(),
    )
    await notifier.notify(*started())
    async with aiohttp.ClientSession() as http:
        assert await notifier.deliver_due(http) == 0
    assert district.received == []
    assert notifier.outbox.states() == {"pending": 1}
    notifier.outbox.close()


@pytest.mark.parametrize(
    "url", ["http://district.example/hook", "ftp://x/y", "https:///nohost", "district.example"]
)
def test_only_https_urls_are_accepted(url: str) -> None:
    with pytest.raises(WebhookError, match="https"):
        check_url(url)


async def test_the_sender_outlives_a_failing_outbox(
    tmp_path: Path, district: District, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SQLite error (a full disk, a locked database) is not an OSError: it ended the
    sender, and the district heard of no emergency again (found by a review)."""
    outbox = Outbox(tmp_path / "notify.sqlite")
    due, calls = outbox.due, 0

    def due_failing_once(now: float, limit: int = 16) -> list[Pending]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return due(now, limit)

    monkeypatch.setattr(outbox, "due", due_failing_once)
    key = Ed25519PrivateKey.generate()
    pin = aiohttp.Fingerprint(fingerprint_digest(district.pin))
    async with Notifier(district.url, outbox, key, ssl=pin) as notifier:
        event_id, body = started()
        await notifier.notify(event_id, body)  # wakes the sender after its failed round
        async with asyncio.timeout(10):
            await district.arrived.wait()
        assert notifier._task is not None and not notifier._task.done()
    assert calls >= 2
    assert district.received[0][1] == body


@pytest.mark.parametrize(
    ("status", "location"),
    [
        (307, "http://127.0.0.1:{plain}/cleartext?key=leaked-secret"),  # the POST again, in clear
        (308, "http://127.0.0.1:{plain}/cleartext?key=leaked-secret"),
        (302, "http://127.0.0.1:{plain}/sso-login?key=leaked-secret"),  # a GET answering 200
        (301, "/elsewhere?key=leaked-secret"),
        (303, "https://127.0.0.1:{plain}/sso-login?key=leaked-secret"),
    ],
)
async def test_a_redirect_is_a_failed_attempt_never_followed(
    tmp_path: Path, status: int, location: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp follows redirects by default: a 307 to http:// re-sent the signed event in
    clear text, and a 302 to a login page made a GET whose 200 marked the event delivered
    (review s9). Now any 3xx is retried with the usual backoff, and neither the log nor
    the outbox shows the URLs' paths or queries."""
    plain_hits: list[tuple[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        plain_hits.append((request.method, request.path))
        return web.Response(text="a login page")

    plain = web.Application()
    plain.router.add_route("*", "/{tail:.*}", elsewhere)
    plain_runner = web.AppRunner(plain)
    await plain_runner.setup()
    await web.TCPSite(plain_runner, "127.0.0.1", 0).start()
    plain_port = plain_runner.addresses[0][1]
    hooked: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        hooked.append(request.method)
        target = location.format(plain=plain_port)
        return web.Response(status=status, headers={"Location": target})

    district = web.Application()
    district.router.add_route("*", "/hooks/{token}", hook)
    district.router.add_route("*", "/elsewhere", elsewhere)
    pin = ensure_certificate(
        tmp_path / "d.crt", tmp_path / "d.key", common_name="district", hosts=["127.0.0.1"]
    )
    runner = web.AppRunner(district)
    await runner.setup()
    context = server_context(tmp_path / "d.crt", tmp_path / "d.key")
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    port = runner.addresses[0][1]
    clock = Clock()
    notifier = Notifier(
        f"https://127.0.0.1:{port}/hooks/hook-secret?sig=url-secret",
        Outbox(tmp_path / "notify.sqlite"),
        Ed25519PrivateKey.generate(),
        ssl=aiohttp.Fingerprint(fingerprint_digest(pin)),
        clock=clock,
    )
    await notifier.notify(*started())
    try:
        async with aiohttp.ClientSession() as http:
            with caplog.at_level("WARNING", logger="receiver.webhook"):
                assert await notifier.deliver_due(http) == 0
                assert await notifier.deliver_due(http) == 0  # not due before the backoff
                clock.now += FIRST_RETRY_S
                assert await notifier.deliver_due(http) == 0  # retried: redirected again
    finally:
        await runner.cleanup()
        await plain_runner.cleanup()
    assert hooked == ["POST", "POST"]
    assert plain_hits == []  # nothing followed the redirect
    assert notifier.outbox.states() == {"pending": 1}
    ((attempts, last_error),) = notifier.outbox._execute("SELECT attempts, last_error FROM events")
    notifier.outbox.close()
    assert attempts == 2
    assert last_error.startswith(f"HTTP {status} (redirects are not followed")
    warnings = [r.getMessage() for r in caplog.records if r.name == "receiver.webhook"]
    assert len(warnings) == 2 and all("will retry" in w for w in warnings)
    for text in [*warnings, last_error]:
        for secret in ("leaked-secret", "hook-secret", "url-secret", "cleartext", "sso-login"):
            assert secret not in text


def test_an_error_names_the_url_without_its_secrets() -> None:
    url = "https://user:pass-secret@district.example:8443/hooks/path-secret?sig=query-secret"
    assert safe_url(url) == "https://district.example:8443/…"
    error = _redacted(f"InvalidUrlClientError: {url}; path /hooks/path-secret", url)
    assert error == ("InvalidUrlClientError: https://district.example:8443/…; path …")
    assert safe_url("not a url") == "an unreadable URL"


async def test_both_times_are_the_receivers_and_the_devices_own_is_beside(
    tmp_path: Path,
) -> None:
    """``session.started`` carried the device's clock and ``session.ended`` the
    receiver's: a Pi 77 h behind made a 10 s emergency last 77 h for the district (review
    s4). Both ``at`` are the receiver's now; the device's own start is ``device_at``."""
    clock = Clock()
    notifier = Notifier(
        "https://district.example/hook",
        Outbox(tmp_path / "notify.sqlite"),
        Ed25519PrivateKey.generate(),
        clock=clock,
    )
    notices = SessionNotices(notifier)
    camera = p.CameraDesc(0, "hall-2", "interior", "h264", 160, 120, 30.0, b"\0\0\0\1g", 0, 0)
    pressed = clock.now - 278_220.25  # the Pi's clock, 77 h behind
    by = {"kind": "button", "button_id": "office", "location": "Main office"}
    opened = p.SessionOpen("s-1", "lincoln-elementary", by, pressed, pressed + 3600, (camera,))
    notices("lincoln-pi-1", opened)
    await asyncio.gather(*list(notices._tasks))
    clock.now += 10
    notices("lincoln-pi-1", p.SessionClose("s-1", "ended locally"))
    await asyncio.gather(*list(notices._tasks))
    bodies = notifier.outbox._execute("SELECT body FROM events ORDER BY seq")
    started, ended = (json.loads(body) for (body,) in bodies)
    notifier.outbox.close()
    assert (started["type"], ended["type"]) == ("session.started", "session.ended")
    assert started["at"] == clock.now - 10  # when the receiver opened the session
    assert started["device_at"] == round(pressed, 3)  # the press, on the device's clock
    assert ended["at"] - started["at"] == 10
    assert "device_at" not in ended  # the device does not say when it ended


def test_done_events_are_pruned_after_a_month_pending_ones_never(tmp_path: Path) -> None:
    """Review r4: delivered events were kept for ever (the sender's query scanned them)."""
    from receiver.webhook import KEEP_DONE_S

    outbox = Outbox(tmp_path / "notify.sqlite")
    try:
        outbox.add(b"{}", event_id="delivered-old", now=0.0)
        outbox.delivered("delivered-old", now=0.0)
        outbox.add(b"{}", event_id="pending-old", now=0.0)
        outbox.add(b"{}", event_id="delivered-new", now=KEEP_DONE_S)
        outbox.delivered("delivered-new", now=KEEP_DONE_S)
        assert outbox.states() == {"delivered": 2, "pending": 1}
        outbox.add(b"{}", event_id="later", now=KEEP_DONE_S + 1)
        assert outbox.states() == {"delivered": 1, "pending": 2}
        assert [e.id for e in outbox.due(KEEP_DONE_S + 1)] == ["pending-old", "later"]
    finally:
        outbox.close()


def event(kind: str, session: str, device: str = "lincoln-pi-1") -> tuple[str, bytes]:
    return session_event(
        kind, device=device, building="lincoln-elementary", session=session, at=1_800_000_000.0
    )


def pinned(district: District, tmp_path: Path, clock: Clock) -> Notifier:
    return Notifier(
        district.url,
        Outbox(tmp_path / "notify.sqlite"),
        Ed25519PrivateKey.generate(),
        ssl=aiohttp.Fingerprint(fingerprint_digest(district.pin)),
        clock=clock,
    )


START_1, END_1 = ("session.started", "s-1"), ("session.ended", "s-1")
START_2, END_2 = ("session.started", "s-2"), ("session.ended", "s-2")


async def test_an_end_waits_for_its_start_which_is_tried_at_once(
    tmp_path: Path, district: District
) -> None:
    """Review s13: the district's endpoint down, a start was retried (5, 10, 20, 40 s ...);
    back up, it still waited out its backoff, and the end, queued meanwhile, went at once:
    the district heard ``session.ended`` before ``session.started``. Now the end waits for
    its start, and has it tried at once in its place."""
    clock = Clock()
    district.failing = lambda doc: True  # the endpoint answers 500
    notifier = pinned(district, tmp_path, clock)
    await notifier.notify(*event("session.started", "s-1"))
    async with aiohttp.ClientSession() as http:
        for backoff in (0, 1, 2, 4):  # tried at 0, 5, 15 and 35 s: next at 75 s
            clock.now += backoff * FIRST_RETRY_S
            assert await notifier.deliver_due(http) == 0
        district.failing = lambda doc: False  # back at 42 s
        clock.now += 7
        assert await notifier.deliver_due(http) == 0  # the start is not due before 75 s
        clock.now += 5
        await notifier.notify(*event("session.ended", "s-1"))  # the emergency ends at 47 s
        assert await notifier.deliver_due(http) == 1  # the start, at 47 s
        assert await notifier.deliver_due(http) == 1  # then the end
        assert await notifier.deliver_due(http) == 0
    notifier.outbox.close()
    assert district.tried() == [START_1] * 5 + [END_1]
    assert district.taken() == [START_1, END_1]


async def test_once_the_district_takes_one_the_backlog_goes_at_once_in_queue_order(
    tmp_path: Path, district: District
) -> None:
    """Events waiting out a backoff waited it out (up to 15 min each) after the district
    answered again. The first delivery makes them all due, and the running sender sends
    them at once, in the order queued. The outbox's clock stands still below: the sender
    would wait 28 s (in real time) for a backoff, longer than the test waits."""
    clock = Clock()
    district.failing = lambda doc: True
    notifier = pinned(district, tmp_path, clock)
    async with aiohttp.ClientSession() as http:
        await notifier.notify(*event("session.started", "s-1"))
        await notifier.notify(*event("session.started", "s-2"))
        for backoff in (0, 1, 2, 4):  # both tried at 0, 5, 15 and 35 s: next at 75 s
            clock.now += backoff * FIRST_RETRY_S
            assert await notifier.deliver_due(http) == 0
    assert district.tried() == [START_1, START_2] * 4
    district.failing = lambda doc: False
    clock.now += 12  # 47 s
    async with notifier:
        await notifier.notify(*event("session.ended", "s-1"))
        async with asyncio.timeout(10):
            while len(district.taken()) < 3:
                district.arrived.clear()
                await district.arrived.wait()
    assert district.taken() == [START_1, START_2, END_1]
    assert district.tried()[8:] == [START_1, START_2, END_1]


async def test_a_session_waits_for_its_own_events_only(tmp_path: Path, district: District) -> None:
    """One endpoint serves every session: down, it is down for all, each event tried and
    backing off on its own. What holds an event back is an earlier event of its session
    not delivered: an event the district refuses (a 500 to that one, the endpoint up)
    holds back its session's end, and nothing else."""
    clock = Clock()
    district.failing = lambda doc: doc["session"] == "s-1"
    notifier = pinned(district, tmp_path, clock)
    async with aiohttp.ClientSession() as http:
        await notifier.notify(*event("session.started", "s-1"))
        assert await notifier.deliver_due(http) == 0
        await notifier.notify(*event("session.ended", "s-1"))
        await notifier.notify(*event("session.started", "s-2"))
        assert await notifier.deliver_due(http) == 1  # s-2's start (s-1's start tried, refused)
        await notifier.notify(*event("session.ended", "s-2"))
        assert await notifier.deliver_due(http) == 1
        assert district.taken() == [START_2, END_2]
        assert END_1 not in district.tried()
        district.failing = lambda doc: False
        clock.now += MAX_RETRY_S
        assert await notifier.deliver_due(http) == 1
        assert await notifier.deliver_due(http) == 1
    notifier.outbox.close()
    assert district.taken() == [START_2, END_2, START_1, END_1]


async def test_a_start_given_up_lets_its_end_go_and_the_log_says_so(
    tmp_path: Path, district: District, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    district.failing = lambda doc: True
    notifier = pinned(district, tmp_path, clock)
    async with aiohttp.ClientSession() as http:
        await notifier.notify(*event("session.started", "s-1"))
        assert await notifier.deliver_due(http) == 0
        clock.now += GIVE_UP_S
        district.failing = lambda doc: doc["type"] == "session.started"
        await notifier.notify(*event("session.ended", "s-1"))
        with caplog.at_level("WARNING", logger="receiver.webhook"):
            assert await notifier.deliver_due(http) == 0  # the start: tried, given up
            assert await notifier.deliver_due(http) == 1  # then the end
    assert notifier.outbox.states() == {"failed": 1, "delivered": 1}
    notifier.outbox.close()
    assert district.tried() == [START_1, START_1, END_1]
    assert district.taken() == [END_1]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "given up" in errors[0]
    assert "1 later event(s) of its session now go without it" in errors[0]


def test_the_order_survives_a_restart_and_the_sender_waits_for_the_first(tmp_path: Path) -> None:
    """The order is the outbox's. And the sender waits for the start's retry, not for the
    end's own time (long past: it would wake every 50 ms while the start backs off)."""
    started_id, started_body = event("session.started", "s-1")
    ended_id, ended_body = event("session.ended", "s-1")
    outbox = Outbox(tmp_path / "notify.sqlite")
    outbox.add(started_body, event_id=started_id, now=0.0)
    outbox.add(ended_body, event_id=ended_id, now=1.0)
    (start,) = outbox.due(1.0)
    assert start.id == started_id
    assert outbox.failed(start, "HTTP 500", 1.0)  # next at 6 s
    outbox.close()
    outbox = Outbox(tmp_path / "notify.sqlite")  # the receiver restarted
    try:
        assert outbox.due(5.0) == []
        assert outbox.next_due() == 1.0 + FIRST_RETRY_S
        (start,) = outbox.due(6.0)
        assert outbox.delivered(start.id, now=6.0) == 0
        assert [e.id for e in outbox.due(6.0)] == [ended_id]
    finally:
        outbox.close()


def test_the_queue_order_is_not_the_clocks(tmp_path: Path) -> None:
    """The receiver's clock stepped back after a start: the events queued then come after
    it all the same, its session's end held back."""
    (started_id, started_body), (ended_id, ended_body), (other_id, other_body) = (
        event("session.started", "s-1"),
        event("session.ended", "s-1"),
        event("session.started", "s-2"),
    )
    outbox = Outbox(tmp_path / "notify.sqlite")
    try:
        outbox.add(started_body, event_id=started_id, now=100.0)
        outbox.add(other_body, event_id=other_id, now=40.0)
        outbox.add(ended_body, event_id=ended_id, now=41.0)
        assert [e.id for e in outbox.due(100.0)] == [started_id, other_id]
    finally:
        outbox.close()


def test_an_outbox_from_before_keeps_its_events_in_order(tmp_path: Path) -> None:
    """An outbox written before the order was kept (no session nor place stored)."""
    started_id, started_body = event("session.started", "s-1")
    ended_id, ended_body = event("session.ended", "s-1")
    db = sqlite3.connect(tmp_path / "notify.sqlite")
    db.execute(
        "CREATE TABLE events (id TEXT PRIMARY KEY, body BLOB NOT NULL,"
        " created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " next_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',"
        " last_error TEXT)"
    )
    db.executemany(
        "INSERT INTO events (id, body, created, attempts, next_at) VALUES (?, ?, ?, ?, ?)",
        [(started_id, started_body, 0.0, 4, 75.0), (ended_id, ended_body, 47.0, 0, 47.0)],
    )
    db.commit()
    db.close()
    outbox = Outbox(tmp_path / "notify.sqlite")
    try:
        assert outbox.due(50.0) == []
        assert outbox.next_due() == 75.0
        (start,) = outbox.due(75.0)
        outbox.delivered(start.id, now=75.0)
        assert [e.id for e in outbox.due(75.0)] == [ended_id]
        later_id, later_body = event("session.started", "s-2")
        outbox.add(later_body, event_id=later_id, now=76.0)
        assert [e.id for e in outbox.due(76.0)] == [ended_id, later_id]
    finally:
        outbox.close()
