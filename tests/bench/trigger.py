"""Benchmark ``trigger``: panic-button press to footage durable at the receiver.

The receiver runs in its own process (its own GIL, as in a deployment); the
agent (two synthetic 640x480 cameras at 30 fps, 5 s pre-roll) runs here with
its control connection already open. Each press goes through gpiozero's mock
pin; the press time is the agent's ``PressEvent.mono_ns``. The receiver
stamps ``time.monotonic_ns()`` when a camera's first packet, and its first
live (post-press) packet, became durable (fsync done); CLOCK_MONOTONIC is
system wide on Linux, so the two clocks compare directly. After all presses
``/api/sessions`` gives those stamps per session:

- first byte = min over cameras of ``first_durable_mono_ns`` - press;
- live frame = max over cameras of ``first_live_durable_mono_ns`` - press
  (every camera's first post-press frame is durable).

The pre-roll ring is filled before the first press, as it is on an agent
that has been running: the whole pre-roll is sent (and remuxed by the
receiver) ahead of the live packets, so its size is part of the figures.

Peer, same run and same load (interleaved between presses, over a connection
kept warm): a minimal WebSocket-over-TLS server in its own process
(:mod:`tests.bench.peer_server`) that appends each 4 KiB message to a file,
fsyncs and replies with its clock; the figure is that clock minus the
client's send time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import press_button, write_agent_config
from hardware import EncodedPacket
from provisioning.tls import fingerprint_digest
from receiver.accounts import AccountStore, Role
from tests.bench.common import (
    Child,
    Figure,
    ReceiverContact,
    child,
    figure,
    make_temp_dir,
    percentile,
    receiver_process,
)
from tests.logins import FAST, add_account, client_for, log_in

BENCH = "trigger"
FPS = 30
PREROLL_S = 30  # the production default: its burst is part of the latency
RAW_PER_PRESS = 5  # raw-peer samples taken between two presses
RAW_MESSAGE = 4096

log = logging.getLogger("bench.trigger")


@dataclass(frozen=True, slots=True)
class Press:
    """One press as the agent saw it."""

    session_id: str
    press_ns: int
    #: ``time.monotonic_ns()`` when the agent got the session's first ack.
    first_ack_ns: int | None


async def press_once(agent: Agent) -> Press:
    """Press, wait until every camera's first live packet is acknowledged, end, settle."""
    # The first packet the fan-out delivers once a session is active is the first one
    # the agent streams live (its own sink, subscribed first, pushes it to the uplink).
    first_live: dict[str, int] = {}

    def sink(packet: EncodedPacket) -> None:
        if agent.emergency.active is not None and packet.camera not in first_live:
            first_live[packet.camera] = packet.seq

    unsubscribe = agent.capture.subscribe(sink)
    try:
        press_button(agent)
        await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        press_ns = agent.press_log[-1].mono_ns
        stream = agent.uplink.stream(session.id)
        if stream is None:
            raise RuntimeError(f"session {session.id} started without an uplink stream")
        index = {c.id: c.index for c in stream.open.cameras}
        await agent.uplink.wait_until(
            lambda: (
                first_live.keys() >= index.keys()
                and all(stream.acked[index[cam]] >= first_live[cam] for cam in index)
            )
        )
    finally:
        unsubscribe()
    agent.end("benchmark")
    await agent.uplink.wait_settled(session.id)
    return Press(session.id, press_ns, stream.first_ack_mono_ns)


class RawPeer:
    """The client side of the raw peer: one warm WebSocket, 4 KiB per sample."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._message = os.urandom(RAW_MESSAGE)
        self.samples_ns: list[int] = []

    async def sample(self, count: int, *, keep: bool = True) -> None:
        """Send ``count`` messages one at a time; keep (server durable - client send) each."""
        for _ in range(count):
            sent = time.monotonic_ns()
            await self._ws.send_bytes(self._message)
            reply = await self._ws.receive(timeout=10)
            if reply.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"raw peer answered {reply.type.name}")
            if keep:
                self.samples_ns.append(int(reply.data) - sent)


async def _peer_url(peer: Child) -> tuple[str, str]:
    url = (await peer.wait_line(re.compile(r"^peer: (wss://\S+)"), timeout=30)).group(1)
    pin = (await peer.wait_line(re.compile(r"^TLS pin: (sha256:[0-9a-f]{64})"), timeout=5)).group(1)
    return url, pin


async def _sessions(rx: ReceiverContact) -> dict[str, Any]:
    """``/api/sessions`` as an officer (an account made in the receiver's DATA for this)."""
    with AccountStore(rx.data_dir / "accounts.sqlite", params=FAST) as accounts:
        await add_account(accounts, "bench-officer", Role.OFFICER)
    async with client_for(rx.url, rx.fingerprint) as http:
        await log_in(http, rx.url, "bench-officer")
        async with http.get(rx.url + "api/sessions") as response:
            response.raise_for_status()
            body: dict[str, Any] = await response.json()
    return {s["session_id"]: s for s in body["sessions"]}


def _latencies(presses: list[Press], sessions: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Per press: (first byte, live frame) in ms, from the receiver's stamps."""
    first_byte: list[float] = []
    live: list[float] = []
    for press in presses:
        cams = sessions[press.session_id]["cameras"]
        firsts = [c["first_durable_mono_ns"] for c in cams]
        lives = [c["first_live_durable_mono_ns"] for c in cams]
        if None in firsts or None in lives:
            raise RuntimeError(f"session {press.session_id}: a camera lacks durability stamps")
        first_byte.append((min(firsts) - press.press_ns) / 1e6)
        live.append((max(lives) - press.press_ns) / 1e6)
    return first_byte, live


async def run(smoke: bool) -> list[Figure]:
    """Press the button ``3`` (smoke) or ``40`` times; three figures."""
    count = 3 if smoke else 40
    preroll_s = 2 if smoke else PREROLL_S
    with make_temp_dir(BENCH) as tmp_name:
        tmp = Path(tmp_name)
        peer_argv = [sys.executable, "-m", "tests.bench.peer_server", "--data", str(tmp / "peer")]
        async with receiver_process(tmp / "receiver") as rx, child("peer", peer_argv) as peer:
            peer_url, peer_pin = await _peer_url(peer)
            config = load_config(
                write_agent_config(tmp / "agent", rx, fps=FPS, preroll_s=preroll_s)
            )
            presses: list[Press] = []
            async with (
                Agent(config) as agent,
                aiohttp.ClientSession() as http,
                http.ws_connect(
                    peer_url, ssl=aiohttp.Fingerprint(fingerprint_digest(peer_pin))
                ) as ws,
            ):
                raw = RawPeer(ws)
                async with asyncio.timeout(preroll_s + 30):
                    await agent.uplink.wait_until(lambda: agent.uplink.connected)
                    # A full pre-roll (plus a GOP), as an agent has it at any real press: the
                    # pre-roll burst comes before the first fsync, so its size shows up.
                    await agent.capture.wait_packets(int((preroll_s + 1) * FPS))
                    await raw.sample(5, keep=False)  # warm the peer's path too
                for i in range(count):
                    async with asyncio.timeout(30):
                        presses.append(await press_once(agent))
                        await raw.sample(RAW_PER_PRESS)
                        # Debounce needs >= 0.1 s between presses; a few frames of idle,
                        # then a random phase so presses fall anywhere in a frame period.
                        await agent.capture.wait_packets(4)
                        await asyncio.sleep(random.uniform(0, 1 / FPS))
                    log.info("press %d/%d: session %s", i + 1, count, presses[-1].session_id)
            sessions = await _sessions(rx)
    first_byte, live = _latencies(presses, sessions)
    raw_ms = [ns / 1e6 for ns in raw.samples_ns]
    acks = [(p.first_ack_ns - p.press_ns) / 1e6 for p in presses if p.first_ack_ns is not None]
    log.info(
        "%d presses: first byte p50 %.1f ms, p99 %.1f ms, max %.1f ms; live frame p50 %.1f ms, "
        "p99 %.1f ms; first ack at the agent p50 %.1f ms; raw peer (%d samples) p50 %.2f ms, "
        "p99 %.2f ms",
        len(presses),
        percentile(first_byte, 50),
        percentile(first_byte, 99),
        max(first_byte),
        percentile(live, 50),
        percentile(live, 99),
        percentile(acks, 50) if acks else float("nan"),
        len(raw_ms),
        percentile(raw_ms, 50),
        percentile(raw_ms, 99),
    )
    raw_p50, raw_p99 = percentile(raw_ms, 50), percentile(raw_ms, 99)
    frame_ms = 1000 / FPS
    return [
        figure(
            BENCH,
            "trigger_to_first_byte_p50_ms",
            percentile(first_byte, 50),
            "ms",
            "raw_wss_fsync_p50_ms",
            raw_p50,
        ),
        figure(
            BENCH,
            "trigger_to_first_byte_p99_ms",
            percentile(first_byte, 99),
            "ms",
            "raw_wss_fsync_p99_ms",
            raw_p99,
        ),
        figure(
            BENCH,
            "trigger_to_live_frame_p99_ms",
            percentile(live, 99),
            "ms",
            "frame_interval_plus_raw_wss_fsync_p99_ms",
            frame_ms + raw_p99,
        ),
    ]
