"""``breakglass provision check`` and ``provision rotate``, typed as README.md shows them.

A device runs the real agent (:func:`agent.boot.run_agent`: first boot, then
enrolled; mock GPIO, synthetic cameras, its Local API and mDNS on 127.0.0.1)
in the test's event loop, with a real receiver on loopback. It is enrolled
with :func:`breakglass.enroll_cli.enroll_one` (as in tests/test_first_boot.py);
then the technician's command runs whole, ``main(["provision", ...])``, in a
worker thread (its own ``asyncio.run``), from the folder that holds the
district's files, so the paths are the README's (``district/authority.key``,
``shots/``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.boot import run_agent
from agent.daemon import Agent
from agent.first_boot import FirstBoot
from breakglass.cli import main
from breakglass.demo import write_trust
from breakglass.enroll_cli import District, Target, enroll_one
from provisioning.age_keys import new_identity, recipient_of
from receiver.server import Receiver
from tests import test_first_boot as first_boot_file

pytestmark = pytest.mark.timeout(60)

BUILDING = "lincoln-elementary"

# The first-boot file of test_first_boot, browsable by mDNS on loopback.
FIRST_BOOT = first_boot_file.FIRST_BOOT.replace(
    "[discovery]\nenabled = false", '[discovery]\ninterfaces = ["127.0.0.1"]'
)
assert "interfaces" in FIRST_BOOT


def synthetic(camera: str) -> dict[str, Any]:
    """A small, slow test pattern (the CPU is shared)."""
    return {"id": camera, "source": "synthetic", "fps": 10, "width": 320, "height": 240}


@dataclass
class Site:
    """The technician's folder (the working directory), the district, and one device."""

    folder: Path
    district: District
    runtimes: asyncio.Queue[Agent | FirstBoot]
    task: asyncio.Task[None]

    async def next(self) -> Agent | FirstBoot:
        """The device's next runtime; fails at once if the device stopped."""
        return await first_boot_file.next_runtime(self.runtimes, self.task)

    async def enrolled(self, *cameras: tuple[str, str, dict[str, Any]]) -> Agent:
        """Enroll the device (v1) with ``cameras``; the armed agent, advertising itself."""
        first = await self.next()
        assert isinstance(first, FirstBoot) and first.local_api is not None
        device = first.config.device_id
        target = Target(device, label(first), BUILDING, cameras, to=first.local_api.url)
        assert await enroll_one(target, self.district, lambda d, s: None) == 1
        armed = await self.next()
        assert isinstance(armed, Agent)
        await armed.wait_until(lambda: armed.advertiser is not None)  # found by mDNS
        return armed


@pytest.fixture
async def site(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Site]:
    authority_pub, keylist = write_trust(tmp_path / "district")  # district/authority.key
    shutil.copy(authority_pub, receiver.data_dir / "authority.pub")
    age = new_identity(tmp_path / "district" / "age.key")
    district = District(
        authority=tmp_path / "district" / "authority.key",
        receiver_url=receiver.uplink_url,
        receiver_pin=receiver.fingerprint,
        recipients=(recipient_of(age), receiver.age_recipient),
        trigger_keys=keylist,
    )
    config = tmp_path / "pi" / "agent.toml"
    config.parent.mkdir()
    config.write_text(FIRST_BOOT)
    monkeypatch.chdir(tmp_path)
    runtimes: asyncio.Queue[Agent | FirstBoot] = asyncio.Queue()
    stop = asyncio.Event()
    task = asyncio.create_task(run_agent(config, stop, on_start=runtimes.put_nowait))
    yield Site(tmp_path, district, runtimes, task)
    stop.set()
    await task


def label(runtime: Agent | FirstBoot) -> str:
    """The setup code as printed on the device's label (``1234-5678``)."""
    return (runtime.config.state_dir / "setup-code").read_text().strip()


async def provision(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    """``breakglass provision ARGV...``: its exit status and its lines on stdout."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["provision", *argv])
    return code, capsys.readouterr().out.splitlines()


def said(lines: list[str], device: str) -> list[str]:
    """The progress steps printed for ``device`` (without the ``[n/N  t s]`` prefix)."""
    return [line.split(f"] {device}: ", 1)[1] for line in lines if f"] {device}: " in line]


def audited(runtime: Agent) -> list[dict[str, Any]]:
    runtime.audit.flush()
    lines = (runtime.config.state_dir / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


def is_jpeg(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9")


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_check_saves_one_jpeg_per_camera_as_the_readme_shows(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    armed = await site.enrolled(
        ("front-door", "exterior", synthetic("front-door")),
        ("hallway-2", "interior", synthetic("hallway-2")),
    )
    await asyncio.gather(*(armed.capture.wait_ready(c.id) for c in armed.config.cameras))
    device = armed.config.device_id
    # README: breakglass provision check DEVICE --setup-code 1234-5678 --out shots/
    code, out = await provision(capsys, "check", device, "--setup-code", label(armed),
                                "--out", "shots/")  # fmt: skip
    assert code == 0, out
    shots = [Path("shots") / f"{device}-{camera}.jpg" for camera in ("front-door", "hallway-2")]
    assert said(out, device) == [
        f"front-door (exterior): {shots[0]}",
        f"hallway-2 (interior): {shots[1]}",
    ]
    assert out[-1].startswith("check: 1/1 device(s) done in ")
    assert sorted(p.name for p in (site.folder / "shots").iterdir()) == [p.name for p in shots]
    assert all(is_jpeg(site.folder / shot) for shot in shots)
    checks = [e for e in audited(armed) if e["event"] == "camera_check"]
    assert [(e["camera"], e["zone"]) for e in checks] == [
        ("front-door", "exterior"),
        ("hallway-2", "interior"),
    ]


async def test_check_with_a_broken_camera_saves_the_others_and_names_it(
    site: Site, capsys: pytest.CaptureFixture[str], refused_port: int
) -> None:
    down = {"id": "front-door", "source": "rtsp", "url": f"rtsp://127.0.0.1:{refused_port}/s1"}
    armed = await site.enrolled(
        ("front-door", "exterior", down),  # an RTSP camera that is down: no footage
        ("hallway-2", "interior", synthetic("hallway-2")),
    )
    await armed.capture.wait_ready("hallway-2")
    assert armed.local_api is not None
    device = armed.config.device_id
    code, out = await provision(capsys, "check", device, "--setup-code", label(armed),
                                "--to", armed.local_api.url, "--out", "shots/")  # fmt: skip
    assert code == 1, out
    shot = Path("shots") / f"{device}-hallway-2.jpg"
    steps = said(out, device)
    assert steps[:2] == [
        "front-door (exterior): FAILED no_footage: camera front-door has no footage yet",
        f"hallway-2 (interior): {shot}",
    ]
    assert steps[2:] == ["FAILED camera_failed: 1 of 2 camera(s) failed: front-door (no_footage)"]
    assert out[-1].startswith("check: 0/1 device(s) done in ")
    assert [p.name for p in (site.folder / "shots").iterdir()] == [shot.name]
    assert is_jpeg(site.folder / shot)
    events = audited(armed)
    assert [e["camera"] for e in events if e["event"] == "camera_check"] == ["hallway-2"]
    refused = [e for e in events if e["event"] == "technician_refused"]
    assert [e["code"] for e in refused] == ["no_footage"]


async def test_rotate_renews_the_certificate_as_the_readme_shows(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    armed = await site.enrolled(("hallway-2", "interior", synthetic("hallway-2")))
    device = armed.config.device_id
    code, out = await provision(capsys, "rotate", device, "--setup-code", label(armed),
                                "--authority", "district/authority.key")  # fmt: skip
    assert code == 0, out
    steps = said(out, device)
    assert steps[-2:] == ["enrollment v2 installed", "armed with enrollment v2"]
    assert out[-1].startswith("rotate: 1/1 device(s) done in ")
    rotated = await site.next()
    assert isinstance(rotated, Agent)
    assert rotated.enrollment is not None and rotated.enrollment.version == 2
    assert rotated.config.building == BUILDING  # kept
    assert [(c.id, c.zone, c.source) for c in rotated.config.cameras] == [
        ("hallway-2", "interior", "synthetic")  # kept, with its source on the device
    ]
    assert rotated.config.receiver_pin == site.district.receiver_pin  # kept


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "bg-3f2a9c0d11aa", "--setup-code", "1234-5678", "--out", "shots/"],
        ["rotate", "bg-3f2a9c0d11aa", "--setup-code", "1234-5678", "--authority", "a.key"],
    ],
)
async def test_a_device_that_does_not_answer_is_one_failed_line_and_exit_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    refused_port: int,
    argv: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    to = f"https://127.0.0.1:{refused_port}"
    code, out = await provision(capsys, *argv, "--to", to)
    assert code == 1
    (step,) = said(out, "bg-3f2a9c0d11aa")
    assert step.startswith(f"FAILED unreachable: {to}: ")
    assert out[-1].startswith(f"{argv[0]}: 0/1 device(s) done in ")
    assert not (tmp_path / "shots").exists()
