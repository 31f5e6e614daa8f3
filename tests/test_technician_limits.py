"""The technician's camera check cannot become a feed, and /metrics names no room
(agent.technician, agent.local_api; docs/DECISIONS.md "The technician's camera
check is not a feed").

A review showed that the (never changing) setup code on the device's label gave
a near-live interior feed after every restart: 20 interior JPEGs in 11 s, with
no emergency. Now a check is refused during an emergency, an interior camera is
checked only at the first start after an enrollment was installed, each camera
at most once per 10 s and 3 times per pairing session, and no picture is given
unless its ``camera_check`` entry is durably on the audit trail.

Real agents and Local APIs on 127.0.0.1; the audit trail fails for real (a file
size limit on an agent in its own process, as a full disk does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.boot import run_agent
from agent.config import load_config
from agent.daemon import Agent
from agent.first_boot import FirstBoot
from agent.technician import CHECK_EVERY_S, CHECKS_PER_CAMERA
from breakglass.demo import press_button, write_agent_config
from breakglass.enroll_cli import enroll_one, rotate_one
from breakglass.pairing_client import PairedDevice, pair
from provisioning import documents as d
from provisioning.tls import fingerprint_digest
from receiver.server import Receiver
from tests.test_first_boot import Device, district, first_boot_config, quiet, target
from tests.trust import call

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
CHECK_FRONT = {"op": "check", "camera": "front-door"}  # exterior (breakglass.demo)
CHECK_HALL = {"op": "check", "camera": "hallway-2"}  # interior


class Mono:
    """A monotonic clock the test moves (the desk's rate limit reads it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def ask(paired: PairedDevice, body: dict[str, Any]) -> dict[str, Any]:
    """One sealed request over the pairing channel; the device's whole opened answer
    (``retry_after`` included, which :func:`breakglass.pairing_client.request` drops)."""
    box = paired.channel.seal(json.dumps(body).encode())
    pin = aiohttp.Fingerprint(fingerprint_digest(paired.fingerprint))
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        http.post(
            paired.url + "/v1/pairing/channel",
            json={"session": paired.session, "box": d.b64url(box)},
            ssl=pin,
        ) as response,
    ):
        assert response.status == 200, await response.text()
        sealed = await response.json()
    opened = json.loads(paired.channel.open(d.b64url_decode(sealed["box"], what="box")))
    assert isinstance(opened, dict)
    return opened


def code_of(state: Path) -> str:
    return (state / "setup-code").read_text().strip()


def trail(state: Path) -> list[dict[str, Any]]:
    """The entries in the trail's file now (nothing flushed first)."""
    lines = (state / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


def refused(entries: list[dict[str, Any]]) -> list[str]:
    return [e["code"] for e in entries if e["event"] == "technician_refused"]


def checked(entries: list[dict[str, Any]]) -> list[str]:
    return [e["camera"] for e in entries if e["event"] == "camera_check"]


@pytest.fixture
async def agent(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Agent]:
    """An armed agent configured by hand (no enrollment installed by a technician)."""
    path = write_agent_config(tmp_path / "agent", receiver, preroll_s=1)
    async with Agent(load_config(path)) as running:
        await asyncio.gather(*(running.capture.wait_ready(c.id) for c in running.config.cameras))
        yield running


async def paired_with(agent: Agent) -> PairedDevice:
    assert agent.local_api is not None
    return await pair(agent.local_api.url, agent.config.device_id, code_of(agent.config.state_dir))


async def test_a_camera_is_checked_once_per_10_s_and_3_times_per_pairing(agent: Agent) -> None:
    clock = Mono()
    agent.desk.mono = clock
    paired = await paired_with(agent)
    first = await ask(paired, CHECK_FRONT)
    assert first["ok"]["zone"] == "exterior"
    again = await ask(paired, CHECK_FRONT)
    assert again["error"] == "rate_limited"
    assert again["retry_after"] == CHECK_EVERY_S
    assert "jpeg" not in json.dumps(again)
    clock.now += CHECK_EVERY_S - 1
    assert (await ask(paired, CHECK_FRONT))["retry_after"] == 1
    for _ in range(CHECKS_PER_CAMERA - 1):
        clock.now += CHECK_EVERY_S
        assert "ok" in await ask(paired, CHECK_FRONT)
    clock.now += CHECK_EVERY_S
    assert (await ask(paired, CHECK_FRONT))["error"] == "check_limit"
    await asyncio.to_thread(agent.audit.flush)
    entries = trail(agent.config.state_dir)
    assert checked(entries) == ["front-door"] * CHECKS_PER_CAMERA
    # A refusal repeated before the next picture is due is audited once, not per request.
    assert refused(entries) == ["rate_limited", "check_limit"]


async def test_interior_cameras_are_locked_on_a_device_not_just_enrolled(agent: Agent) -> None:
    paired = await paired_with(agent)
    answer = await ask(paired, CHECK_HALL)
    assert answer["error"] == "interior_locked"
    assert "jpeg" not in json.dumps(answer)
    assert "ok" in await ask(paired, CHECK_FRONT)  # the exterior one may be aimed
    await asyncio.to_thread(agent.audit.flush)
    entries = trail(agent.config.state_dir)
    assert checked(entries) == ["front-door"]
    assert refused(entries) == ["interior_locked"]


async def test_no_check_while_an_emergency_is_active(agent: Agent) -> None:
    paired = await paired_with(agent)
    press_button(agent)
    await agent.wait_until(lambda: agent.emergency.active is not None)
    answer = await ask(paired, CHECK_FRONT)
    assert answer["error"] == "emergency_active"
    assert "police" in answer["detail"]
    assert "jpeg" not in json.dumps(answer)
    await asyncio.to_thread(agent.audit.flush)
    entries = trail(agent.config.state_dir)
    assert checked(entries) == []
    assert refused(entries) == ["emergency_active"]
    agent.end("test done")


@contextlib.asynccontextmanager
async def device_running(config: Path) -> AsyncIterator[Device]:
    """The device's :func:`run_agent` (first boot, then enrolled), until the block ends."""
    runtimes: asyncio.Queue[Agent | FirstBoot] = asyncio.Queue()
    stop = asyncio.Event()
    task = asyncio.create_task(run_agent(config, stop, on_start=runtimes.put_nowait))
    try:
        yield Device(config, runtimes, stop, task)
    finally:
        stop.set()
        await task


async def armed(device: Device) -> Agent:
    runtime = await device.next()
    assert isinstance(runtime, Agent)
    await asyncio.gather(*(runtime.capture.wait_ready(c.id) for c in runtime.config.cameras))
    return runtime


async def test_interior_cameras_only_at_the_first_start_after_an_enrollment(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = first_boot_config(tmp_path / "pi")
    plan = district(tmp_path, receiver)
    async with device_running(config) as device:
        first = await device.next()
        assert isinstance(first, FirstBoot)
        assert await enroll_one(target(first), plan, quiet) == 1
        enrolled = await armed(device)
        paired = await paired_with(enrolled)
        assert (await ask(paired, CHECK_HALL))["ok"]["zone"] == "interior"  # the install's aim
        assert "ok" in await ask(paired, CHECK_FRONT)
    # A restart (a power cut, an update): the label alone no longer shows the inside.
    async with device_running(config) as device:
        restarted = await armed(device)
        paired = await paired_with(restarted)
        assert (await ask(paired, CHECK_HALL))["error"] == "interior_locked"
        assert "ok" in await ask(paired, CHECK_FRONT)
        # A renewal with the district's key: its next start may check them again.
        assert restarted.local_api is not None and restarted.local_api.pairing is not None
        restarted.local_api.pairing.reopen()  # (the check's pairing closed this start's)
        assert await rotate_one(target(restarted), plan, quiet) == 2
        rotated = await armed(device)
        paired = await paired_with(rotated)
        assert "ok" in await ask(paired, CHECK_HALL)
        await asyncio.to_thread(rotated.audit.flush)
    entries = trail(tmp_path / "pi" / "state")
    assert checked(entries) == ["hallway-2", "front-door", "front-door", "hallway-2"]
    assert refused(entries) == ["interior_locked"]


async def test_a_check_that_cannot_be_audited_gives_no_picture(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = write_agent_config(tmp_path / "agent", receiver, preroll_s=1)
    state = tmp_path / "agent" / "state"
    log = (tmp_path / "agent.log").open("wb")  # a file: a full pipe could stall the agent
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.test_technician_limits", str(path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        ready, url, fingerprint = line.decode().split()
        assert ready == "ready"
        paired = await pair(url, load_config(path).device_id, code_of(state))
        assert paired.fingerprint == fingerprint
        # The trail's file may grow no more: its next write fails (EFBIG), as on a full disk.
        soft, hard = resource.prlimit(child.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(
            child.pid, resource.RLIMIT_FSIZE, ((state / "audit.log").stat().st_size, hard)
        )
        try:
            answer = await ask(paired, CHECK_FRONT)
        finally:
            resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (soft, hard))
        assert answer["error"] == "audit_failed"
        assert "jpeg" not in json.dumps(answer)
        assert checked(trail(state)) == []
        # The trail can be written again: the picture comes, its entry already on the trail.
        answer = await ask(paired, CHECK_FRONT)
        assert answer["ok"]["camera"] == "front-door"
        (entry,) = [e for e in trail(state) if e["event"] == "camera_check"]
        assert (entry["camera"], entry["zone"], entry["peer"]) == (
            "front-door",
            "exterior",
            "127.0.0.1",
        )
    finally:
        child.terminate()
        child.wait(timeout=30)
        log.close()


async def test_metrics_count_presses_without_naming_the_button(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = write_agent_config(tmp_path / "agent", receiver, preroll_s=1)
    path.write_text(
        path.read_text()
        + '\n[[buttons]]\nid = "room-114-mrs-garcia"\npin = 22\nlocation = "Room 114"\n'
    )
    async with Agent(load_config(path)) as agent:
        press_button(agent, 22)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        status, metrics = await call(agent, "GET", "/metrics")
        assert status == 200
        _, public = await call(agent, "GET", "/v1/status")
        agent.end("test done")
    assert "breakglass_button_presses_total 1\n" in metrics
    for said in (metrics, json.dumps(public)):
        for name in ("room-114", "garcia", "Room 114", "office", "Main office"):
            assert name not in said


async def _child(config: Path) -> None:
    """The agent of the audit test, in its own process (the test limits its file sizes)."""
    async with Agent(load_config(config)) as agent:
        await agent.capture.wait_ready("front-door")
        api = agent.local_api
        assert api is not None
        print(f"ready {api.url} {api.fingerprint}", flush=True)
        await asyncio.Event().wait()  # the test ends us


if __name__ == "__main__":
    asyncio.run(_child(Path(sys.argv[1])))
