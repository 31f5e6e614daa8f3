"""Dispatch, evidence download, HLS audit and the district's webhook, over the real receiver.

One real agent (enrolled by certificate, so the receiver knows its building) and
the real receiver on loopback; police log in through the real login (issue #6,
points 5, 6, 7).
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import BUILDING, press_button
from receiver import police_api
from receiver.accounts import Role
from receiver.auth import CSRF_HEADER
from receiver.evidence_format import evidence_key
from receiver.evidence_verify import verify_bundle
from receiver.server import Receiver
from receiver.webhook import verify as verify_webhook
from tests.district_hook import district_hook
from tests.logins import FAST, failing_access_log, logged_in
from tests.test_enrollment import enroll

pytestmark = pytest.mark.timeout(90)


def enrolled_agent(tmp_path: Path, receiver: Receiver) -> Path:
    """An enrolled agent whose trigger-key list enrolls the receiver's dispatch key."""
    demo_dispatch = tmp_path / "dispatch" / "dispatch.key"
    demo_dispatch.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(receiver.dispatch_key_path, demo_dispatch)  # write_trust enrolls this key
    path, _ = enroll(tmp_path, receiver)
    return path


async def access(receiver: Receiver) -> list[dict[str, object]]:
    await receiver.access_log.flush()
    text = (receiver.data_dir / "access.log").read_text()
    return [json.loads(line) for line in text.splitlines()]


async def connected(receiver: Receiver) -> None:
    await receiver.presence.wait_for(lambda: bool(receiver.devices_of(BUILDING)))


async def test_a_dispatcher_starts_and_ends_an_emergency_from_the_api(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = enrolled_agent(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        await connected(receiver)
        async with logged_in(receiver, Role.DISPATCHER, "jdoe") as http:
            url = receiver.url + "v1/dispatch"
            body = {"building": BUILDING, "action": "start", "reason": "911 call: intruder"}
            async with http.post(url, json=body) as r:
                assert r.status == 200, await r.text()
                (delivery,) = (await r.json())["deliveries"]
            assert delivery["status"] == 202 and agent.emergency.active is not None
            assert agent.emergency.active.id == delivery["session"]
            body = {"building": BUILDING, "action": "end", "reason": "all clear"}
            async with http.post(url, json=body) as r:
                assert r.status == 200
            assert agent.emergency.active is None
            async with http.post(url, json={"building": "nowhere", "action": "start",
                                            "reason": "x"}) as r:  # fmt: skip
                assert (r.status, (await r.json())["error"]) == (409, "no_device")
            del http.headers[CSRF_HEADER]
            async with http.post(url, json=body) as r:
                assert r.status == 403  # no CSRF token
        async with (
            logged_in(receiver, Role.OFFICER, "officer-1") as http,
            http.post(url, json=body) as r,
        ):
            assert (r.status, (await r.json())["error"]) == (403, "forbidden")
    log = await access(receiver)
    dispatches = [e for e in log if e["action"] in ("dispatch", "dispatch_refused")]
    assert [(e["action"], e["who"], e.get("requested")) for e in dispatches] == [
        ("dispatch", "jdoe", "start"),
        ("dispatch", "jdoe", "end"),
        ("dispatch_refused", "jdoe", "start"),
    ]


async def test_an_officer_downloads_evidence_that_verifies_and_opens_hls_audited_once(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    built_on: list[str] = []  # threads: the export's own, not the fsyncs' shared pool
    build = police_api.build_bundle

    def building(*args: Any) -> Any:
        built_on.append(threading.current_thread().name)
        return build(*args)

    monkeypatch.setattr(police_api, "build_bundle", building)
    path = enrolled_agent(tmp_path, receiver)
    async with Agent(load_config(path)) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        await agent.capture.wait_packets(20)
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        await agent.capture.wait_packets(20)
        agent.end("test over")
        await agent.uplink.wait_settled(session.id)
    assert receiver.ingest._custody == {}  # let go at the close (review r1: held for ever)
    async with logged_in(receiver, Role.OFFICER, "asmith") as http:
        async with http.post(receiver.url + f"v1/evidence/{session.id}") as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Disposition"].startswith("attachment;")
            digest = r.headers["X-Evidence-SHA256"]
            bundle = await r.read()
        for _ in range(3):  # a player refreshes; the audit says it once
            async with http.get(receiver.url + f"hls/{session.id}/hallway-2.m3u8") as r:
                assert r.status == 200
                playlist = await r.text()
                assert playlist.startswith("#EXTM3U")
        part = next(line for line in playlist.splitlines() if line.endswith(".mp4"))
        for _ in range(2):  # footage fetched by its address alone is audited too, once
            async with http.get(receiver.url + f"hls/{session.id}/{part}") as r:
                assert r.status == 200
                await r.read()
        async with http.post(receiver.url + "v1/evidence/not-a-session") as r:
            assert r.status == 404
            assert str(receiver.data_dir) not in await r.text()  # no server path
        async with asyncio.TaskGroup() as clicks:  # a double click: two exports, two files
            twice = [
                clicks.create_task(http.post(receiver.url + f"v1/evidence/{session.id}"))
                for _ in range(2)
            ]
        answers = [task.result() for task in twice]
        assert [a.status for a in answers] == [200, 200]
        names = {a.headers["Content-Disposition"] for a in answers}
        assert len(names) == 2
        for answer in answers:
            answer.release()
        # A log that cannot be written: the bundle is withheld, not handed out unlogged.
        monkeypatch.setattr(police_api, "EXPORT_LOG_WAIT_S", 0.5)
        exports_before = sorted((receiver.data_dir / "exports").iterdir())
        # A disk the export would leave too little for the recordings: refused before a
        # byte is written (ten exports at once took ten copies).
        free = shutil.disk_usage(receiver.data_dir).free
        monkeypatch.setattr(police_api, "EXPORT_FREE_FLOOR_BYTES", free)
        files_before = sorted((receiver.data_dir / "exports").rglob("*"))
        async with http.post(receiver.url + f"v1/evidence/{session.id}") as r:
            assert r.status == 507
            assert (await r.json())["error"] == "insufficient_storage"
        assert sorted((receiver.data_dir / "exports").rglob("*")) == files_before
        monkeypatch.setattr(police_api, "EXPORT_FREE_FLOOR_BYTES", 1 << 20)
        with failing_access_log(receiver.access_log):
            async with http.post(receiver.url + f"v1/evidence/{session.id}") as r:
                assert r.status == 503
                assert (await r.json())["error"] == "access_log_unavailable"
        assert sorted((receiver.data_dir / "exports").iterdir()) == exports_before
    saved = tmp_path / "bundle.zip"
    saved.write_bytes(bundle)
    assert zipfile.ZipFile(io.BytesIO(bundle)).testzip() is None
    report = verify_bundle(saved, receiver_key=evidence_key(receiver.data_dir).public_key())
    assert not report.errors, report.errors
    log = await access(receiver)
    exports = [e for e in log if e["action"] == "evidence_export"]
    assert len(exports) == 4 and len({e["file"] for e in exports}) == 4
    (withheld,) = [e for e in log if e["action"] == "evidence_export_withheld"]
    assert withheld["file"] == exports[-1]["file"]  # logged later, as withheld
    assert withheld["reason"] == "access_log_unavailable"
    export = exports[0]
    assert (export["who"], export["session"], export["sha256"]) == ("asmith", session.id, digest)
    playlists = [e for e in log if e["action"] == "recording_playlist"]
    assert [(e["who"], e["camera"]) for e in playlists] == [("asmith", "hallway-2")]
    assert built_on and all(name.startswith("evidence-export") for name in built_on)
    fetched = [(e["who"], e["file"], e["via"]) for e in log if e["action"] == "recording_fetch"]
    assert fetched == [("asmith", part, "hls")]


@pytest.fixture
async def district(
    tmp_path: Path,
) -> AsyncIterator[tuple[str, str, asyncio.Queue[tuple[dict[str, str], bytes]]]]:
    async with district_hook(tmp_path) as hook:
        yield hook.url, hook.pin, hook.posts


async def test_the_district_is_told_of_an_emergency_start_and_end(
    tmp_path: Path, district: tuple[str, str, asyncio.Queue[tuple[dict[str, str], bytes]]]
) -> None:
    url, pin, events = district
    async with Receiver(
        tmp_path / "receiver", "127.0.0.1", 0, password_params=FAST, notify_url=url,
        notify_pin=pin,
    ) as rx:  # fmt: skip
        path = enrolled_agent(tmp_path, rx)
        async with Agent(load_config(path)) as agent:
            await agent.uplink.wait_until(lambda: agent.uplink.connected)
            await agent.capture.wait_packets(5)
            press_button(agent)
            async with asyncio.timeout(30):
                started_headers, started_body = await events.get()
            agent.end("all clear")
            async with asyncio.timeout(30):
                _, ended_body = await events.get()
        public = evidence_key(rx.data_dir).public_key()
    assert verify_webhook(
        public,
        started_headers["Breakglass-Signature"],
        started_headers["Breakglass-Timestamp"],
        started_body,
    )
    started, ended = json.loads(started_body), json.loads(ended_body)
    assert started["type"] == "session.started" and started["building"] == BUILDING
    assert started["started_by"]["kind"] == "button"
    assert {c["zone"] for c in started["cameras"]} == {"exterior", "interior"}
    assert (ended["type"], ended["session"]) == ("session.ended", started["session"])


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"notify_url": "http://district.example/hook"}, "https"),
        ({"notify_url": "https://d.example/h", "notify_pin": "md5:00"}, "pin"),
        ({"notify_pin": "sha256:" + "0" * 64}, "without a notify_url"),
    ],
)
def test_bad_webhook_settings_are_refused_clearly(
    tmp_path: Path, kwargs: dict[str, str], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        Receiver(tmp_path, **kwargs)  # type: ignore[arg-type]
