"""End to end over real TLS on loopback: button -> agent -> receiver -> fMP4 on disk."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon import Agent
from agent.emergency import Session
from breakglass.demo import press_button, write_agent_config
from provisioning.keys import new_private_key, public_pem
from receiver import run as run_module
from receiver.server import Receiver
from tests.recordings import assert_session_gapless, recorded_seqs

pytestmark = pytest.mark.timeout(90)


async def press(agent: Agent) -> Session:
    """Press the virtual button; the session it opened."""
    press_button(agent)
    await agent.wait_until(lambda: agent.emergency.active is not None)
    session = agent.emergency.active
    assert session is not None
    return session


async def receiver_gone(tmp_path: Path) -> tuple[Path, int, Path]:
    """A receiver's data folder and port, and an agent config for it, with it stopped."""
    rx_dir = tmp_path / "receiver"
    async with Receiver(rx_dir, "127.0.0.1", 0) as first:
        config = write_agent_config(tmp_path / "agent", first, fps=30, preroll_s=2)
        return rx_dir, first.port, config


async def deliver_and_end(agent: Agent, receiver: Receiver, session_id: str) -> None:
    """Once the receiver is back: connect, end the session, wait until all is acknowledged."""
    await agent.uplink.wait_until(lambda: agent.uplink.connected)
    agent.end("test finished")
    await agent.uplink.wait_settled(session_id)


def ffprobe(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    streams = json.loads(out)["streams"]
    assert len(streams) == 1
    return dict(streams[0])


async def test_press_streams_preroll_and_live_and_nothing_before(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_loop: list[bool] = []  # where the receiver made each part's init segment
    make_init = run_module.init_segment

    def watched(template: bytes, capture_us: int, title: str) -> bytes:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return make_init(template, capture_us, title)

    monkeypatch.setattr(run_module, "init_segment", watched)
    config = load_config(write_agent_config(tmp_path / "agent", receiver, fps=30))
    async with Agent(config) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        await agent.capture.wait_packets(45)  # 1.5 s of pre-roll per camera
        # Before a press: connected, cameras running, and nothing at all was sent.
        assert agent.uplink.stats.packets_sent == 0
        assert receiver.store.sessions() == []

        session = await press(agent)
        assert session.started_by["location"] == "Main office"
        live_from = {cam: agent.capture.seqs.peek(cam) for cam in agent.capture.sources}
        stream = agent.uplink.stream(session.id)
        assert stream is not None
        index = {c.id: c.index for c in stream.open.cameras}
        assert set(index) == {"front-door", "hallway-2"}
        await agent.uplink.wait_until(
            lambda: all(stream.acked[index[cam]] >= live_from[cam] + 10 for cam in index)
        )
        assert agent.uplink.stats.live_skips == 0  # loopback keeps up: live never skips
        agent.end("test finished")
        await agent.uplink.wait_settled(session.id)

    (summary,) = receiver.store.sessions()
    assert summary.session_id == session.id
    assert summary.meta["building"] == "lincoln-elementary"
    for cam in summary.cameras:
        assert cam.preroll_frames >= 30, cam
        assert cam.live_frames >= 10, cam
        assert cam.first_seq < live_from[cam.camera_id] <= cam.durable_seq
        # The older pre-roll in its own run, then the live run from the press's GOP on.
        preroll, live = cam.parts
        assert preroll.path.name == f"{cam.camera_id}.{cam.first_seq}.mp4"
        assert live.path.name == f"{cam.camera_id}.{live.first_seq}.mp4"
        assert preroll.first_seq == cam.first_seq < live.first_seq < live_from[cam.camera_id]
        assert preroll.last_seq + 1 == live.first_seq
        assert cam.complete
        frames = 0
        for part in cam.parts:
            probe = ffprobe(part.path)
            assert probe["codec_name"] == "h264"
            assert (probe["width"], probe["height"]) == (640, 480)
            frames += int(str(probe["nb_read_frames"]))
        assert frames == cam.preroll_frames + cam.live_frames
    # One per part (the pre-roll's, the live one's, of each camera), none on the event loop.
    assert on_loop == [False] * 4


async def test_unknown_device_is_refused_and_the_agent_stays_armed(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = load_config(write_agent_config(tmp_path / "agent", receiver, allow=False))
    async with Agent(config) as agent:
        await agent.uplink.wait_until(lambda: "unknown_device" in agent.uplink.stats.refusals)
        assert not agent.uplink.connected
        await agent.capture.wait_packets(2)
        press_button(agent)  # the button works without the receiver
        await agent.wait_until(lambda: agent.emergency.active is not None)
    assert receiver.ingest.refused.get("unknown_device", 0) >= 1
    assert receiver.store.sessions() == []


async def test_wrong_key_for_a_known_device_is_refused(tmp_path: Path, receiver: Receiver) -> None:
    config = load_config(write_agent_config(tmp_path / "agent", receiver, allow=False))
    impostor = new_private_key(tmp_path / "other.key")
    (receiver.devices_dir / f"{config.device_id}.pub").write_bytes(
        public_pem(impostor.public_key())
    )
    async with Agent(config) as agent:
        await agent.uplink.wait_until(lambda: "bad_signature" in agent.uplink.stats.refusals)
        assert not agent.uplink.connected
    assert receiver.ingest.refused.get("bad_signature", 0) >= 1


async def test_wrong_tls_pin_never_connects(tmp_path: Path, receiver: Receiver) -> None:
    path = write_agent_config(tmp_path / "agent", receiver)
    text = path.read_text().replace(receiver.fingerprint, "sha256:" + "00" * 32)
    path.write_text(text)
    async with Agent(load_config(path)) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.stats.last_error is not None)
        assert "fingerprint" in (agent.uplink.stats.last_error or "").lower()
        assert not agent.uplink.connected
    assert receiver.ingest.devices == {}


async def test_receiver_down_then_up_delivers_the_session(tmp_path: Path) -> None:
    """The button works with no receiver; once it is up, the session arrives whole."""
    rx_dir, port, config_path = await receiver_gone(tmp_path)
    async with Agent(load_config(config_path)) as agent:
        await agent.capture.wait_packets(30)
        session = await press(agent)
        assert not agent.uplink.connected
        await agent.capture.wait_packets(15)  # live footage held while the receiver is down
        async with Receiver(rx_dir, "127.0.0.1", port) as receiver:
            await deliver_and_end(agent, receiver, session.id)
    (summary,) = receiver.store.sessions()
    for cam in summary.cameras:
        assert cam.preroll_frames > 0
        assert cam.live_frames > 0


async def test_session_survives_an_agent_restart(tmp_path: Path, receiver: Receiver) -> None:
    config = load_config(write_agent_config(tmp_path / "agent", receiver, fps=30, preroll_s=2))
    async with Agent(config) as agent:
        await agent.uplink.wait_until(lambda: agent.uplink.connected)
        await agent.capture.wait_packets(75)  # > 2 GOPs: a pre-roll lane
        session = await press(agent)
        stream = agent.uplink.stream(session.id)
        assert stream is not None
        await agent.uplink.wait_until(
            lambda: min(stream.acked) >= stream.open.cameras[0].first_seq + 20
        )
    # Restarted: the persisted session resumes by itself and streams on.
    async with Agent(config) as agent:
        assert agent.emergency.active == session
        await agent.wait_until(lambda: agent.uplink.stream(session.id) is not None)
        resumed = agent.uplink.stream(session.id)
        assert resumed is not None
        # The session keeps its first seq: what came before the restart is owed from the store.
        assert [c.first_seq for c in resumed.open.cameras] == [
            c.first_seq for c in stream.open.cameras
        ]
        cams = resumed.open.cameras
        await agent.uplink.wait_until(
            lambda: all(a >= c.live_seq + 10 for c, a in zip(cams, resumed.acked, strict=True))
        )
        agent.end("test finished")
        await agent.uplink.wait_settled(session.id)
        sealed = {c: agent.store.segments(c) for c in agent.capture.sources}
    (summary,) = receiver.store.sessions()
    for cam in summary.cameras:
        # A clean stop seals the segments being filled: everything numbered before the
        # restart arrives; only numbers never used (the rest of a reserved block) are
        # declared, and nothing is silently missing.
        before = max(s.last_seq for s in sealed[cam.camera_id] if s.first_seq < 100_000)
        seqs = recorded_seqs(receiver, session.id, cam.camera_id)
        assert set(range(cam.first_seq, before + 1)) <= seqs
        assert [p.first_seq for p in cam.parts] == sorted(p.first_seq for p in cam.parts)
        assert cam.complete, cam.missing
        frames = sum(int(str(ffprobe(part.path)["nb_read_frames"])) for part in cam.parts)
        assert frames == cam.frames_durable


async def test_full_ram_while_the_receiver_is_down_is_served_from_the_store(
    tmp_path: Path,
) -> None:
    """RAM holds only recent unacknowledged packets; past its bound the sealed store
    serves the rest, and the session arrives gapless once the receiver is back."""
    rx_dir, port, config_path = await receiver_gone(tmp_path)
    config_path.write_text(config_path.read_text().replace("[store]\n", "[store]\nsegment_s = 1\n"))
    async with Agent(load_config(config_path)) as agent:
        agent.uplink.unacked_max_bytes = 50_000  # well under the four seconds it will hold
        await agent.capture.wait_packets(30)
        session = await press(agent)
        await agent.capture.wait_packets(120)
        stream = agent.uplink.stream(session.id)
        assert stream is not None
        assert stream.ram_bytes <= 50_000
        async with Receiver(rx_dir, "127.0.0.1", port) as receiver:
            await deliver_and_end(agent, receiver, session.id)
        assert agent.uplink.stats.segments_sent > 0
    assert_session_gapless(receiver, stream)


async def test_a_press_at_boot_streams_once_the_cameras_run(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = load_config(write_agent_config(tmp_path / "agent", receiver, fps=30))
    async with Agent(config) as agent:
        session = await press(agent)  # before (or as) the encoders produce their first frame
        await agent.uplink.wait_until(lambda: agent.uplink.stream(session.id) is not None)
        stream = agent.uplink.stream(session.id)
        assert stream is not None
        await agent.uplink.wait_until(lambda: all(a >= 10 for a in stream.acked))
        assert len(stream.open.cameras) == 2
