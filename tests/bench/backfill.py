"""Benchmark ``backfill``: owed footage through a throttled link, against the link's rate.

Issue #3: "backfill rate / link rate on a throttled loopback link; target
>= 0.9". The method, in one run:

- **Processes.** The agent runs in this process, so the benchmark reads
  its ``agent.uplink.stats`` and awaits ``wait_settled`` directly, with its
  link (:class:`tests.netproxy.TcpProxy` on 127.0.0.1) and the peer's
  client. The receiver runs in a child process (``python -m
  tests.bench.backfill receiver``: :class:`receiver.server.Receiver` that
  also accepts the proxy's origin, as the tests' ``via_proxy`` does): it is
  the busier side of a backfill (age decryption, remuxing, fsyncs), and in
  the agent's process on two cores it would share the agent's event loop
  and GIL, delaying the agent's sends and its own acks, a cost a receiver on
  another machine never puts on an agent. The proxy does share the agent's
  loop: its token bucket pays back late wake-ups up to 64 KiB of credit
  (32 ms at 2 MB/s), but a longer stall of this loop idles the link, which
  a kernel socket buffer on a real agent would not; such stalls are counted
  and logged (the peer's proxy runs in the same loop).
- **Cameras.** Two replay cameras (:mod:`tests.bench.replay`: the cached
  1080p30 ~4 Mbit/s H.264 stream, no encoding, so the cameras cost almost
  no CPU) keep running throughout, as they do on a real agent: capture,
  pre-roll and sealed segments (``segment_s`` 4, the default) go on while
  the backfill runs.
- **Footage owed.** The link is cut (black hole, both directions) before
  the agent starts, so it never connects; the button is pressed (2 s of
  pre-roll); the session records ``RECORD_S`` seconds (``SMOKE_RECORD_S``
  with ``--smoke``) and is ended. RAM for unacknowledged footage
  (``agent.uplink.unacked_max_bytes``) is shrunk to ``RAM_BYTES`` (1 MiB,
  about a second of both cameras), so the sealed store serves nearly all of
  it, as whole segments: the path a real outage takes.
  ``backfill_sealed_share`` reports the share of bytes sent as sealed
  segments (so far all of them: the segment holding the first packet RAM
  still has covers RAM's range too).
- **Sealed first.** The link is restored once the store has sealed every
  camera's segment holding the session's last packet (at most ``segment_s``
  after the end). Earlier, the fill lane would wait for the open segment,
  a wait for the cameras, not the link; and (found by this benchmark, see
  ``agent/uplink.py`` ``_fill_one``) a segment closed but still queued for
  its writer is neither open nor on disk, so the lane declares it lost, and
  the non-keyframes after that gap, which the receiver drops, are never
  acknowledged: the session never settles.
- **The window.** The link's rate is set to ``RATE`` (2 MB/s, twice the
  cameras' rate) and the link restored. The window runs from the uplink's
  reconnection (handshake done: ``agent.uplink.connected``) until
  ``agent.uplink.wait_settled(session)`` (every packet acknowledged
  durable, the close acknowledged). Backfill rate = bytes the proxy carried
  upstream in the window (``proxy.bytes_up``) / its length. The wait from
  the restore to the reconnection (a connection attempt the cut link held
  completes, or the next one comes after the backoff, ``[uplink]
  reconnect_max_s`` 0.5 here) is not throughput: it is reported on its own
  (``backfill_reconnect_s``).
- **Peer, same run.** A second ``TcpProxy`` at the same rate in front of
  :mod:`tests.bench.peer_server` (its own process: WebSocket over TLS,
  append, fsync, reply per message) carries a raw bulk send loop of as
  many bytes as our window carried, in 256 KiB messages; its window runs
  from the WebSocket's open to the reply to the last message (written and
  fsynced). It runs right after ours, the agent still running (cameras,
  store) in this process. Its link utilisation is the peer's figure.

Figures (``value`` ours, ``peer_value`` the peer's):

- ``backfill_throughput_ratio``: backfill rate / ``RATE``; peer: raw bulk rate
  / ``RATE`` (``ratio``: ours / peer).
- ``backfill_wire_bytes_per_media_byte``: bytes on the link in the window per
  byte of H.264 the session owed (TLS, WebSocket and media headers, age
  sealing, and the parts of the first and last segments outside the
  session); peer: link bytes per payload byte of the raw transfer.
- ``backfill_seconds``: the window; peer: the raw transfer's window.
- ``backfill_sealed_share``: sealed-segment bytes / all media bytes the
  uplink sent in the window; peer: the share the RAM bound leaves to the
  store, ``(owed - RAM_BYTES) / owed``.
- ``backfill_reconnect_s``: link restored -> uplink connected; peer: the raw
  client's connect (TCP, TLS, WebSocket upgrade) through its proxy.

Where the window went is logged: the link's idle share (20 ms ticks in which
the proxy forwarded nothing), how much of it came after the last byte (the
receiver opening, remuxing and fsyncing the last segment before its ack),
and stalls of this process's event loop (which would idle the proxy too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from agent.config import CameraConfig, load_config
from agent.daemon import Agent
from breakglass.demo import press_button, write_agent_config
from hardware import EncodedPacket
from provisioning.tls import fingerprint_digest
from receiver.server import Receiver
from tests.bench.common import (
    Figure,
    ReceiverContact,
    child,
    figure,
    h264_stream,
    make_temp_dir,
)
from tests.bench.replay import AccessUnits, ReplayCamera, load_access_units
from tests.netproxy import TcpProxy

BENCH = "backfill"
FPS = 30
CAMERAS = (("front-door", "exterior"), ("hallway-2", "interior"))
#: The throttled link's rate, bytes per second (16 Mbit/s; the two cameras send ~8).
RATE = 2_000_000
#: RAM for unacknowledged footage: about a second of both cameras; the rest is sealed.
RAM_BYTES = 1024 * 1024
PREROLL_S = 2
RECORD_S = 20.0
SMOKE_RECORD_S = 3.0
RECONNECT_MAX_S = 0.5
PEER_MESSAGE = 256 * 1024
TICK_S = 0.02
STALL_S = 0.05

log = logging.getLogger("bench.backfill")


# -- the receiver's process --------------------------------------------------------------


async def serve_receiver(data: Path, origins: list[str]) -> None:
    """A receiver on 127.0.0.1 that also accepts ``origins``; one ``ready`` line, then serve."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Receiver(data, "127.0.0.1", 0) as rx:
        rx.ingest.origins.extend(origins)  # a proxy in front, as the tests' via_proxy
        contact = {
            "url": rx.url,
            "uplink_url": rx.uplink_url,
            "fingerprint": rx.fingerprint,
            "devices_dir": str(rx.devices_dir),
            "age_recipient": rx.age_recipient,
            "port": rx.port,
        }
        print("ready " + json.dumps(contact), flush=True)
        await stop.wait()


@contextlib.asynccontextmanager
async def receiver_behind(data: Path, origin: str) -> AsyncIterator[tuple[ReceiverContact, int]]:
    """The receiver child; its contact and port."""
    argv = [sys.executable, "-m", "tests.bench.backfill", "receiver", "--data", str(data)]
    async with child("receiver", [*argv, "--origin", origin]) as proc:
        line = await proc.wait_line(re.compile(r"^ready (\{.*\})$"), timeout=30)
        c = json.loads(line.group(1))
        contact = ReceiverContact(
            c["url"],
            c["uplink_url"],
            c["fingerprint"],
            Path(c["devices_dir"]),
            data,
            proc.pid,
            c["age_recipient"],
        )
        yield contact, int(c["port"])


# -- measuring -----------------------------------------------------------------------------


class LinkWatch:
    """Samples a proxy's upstream byte count every ``TICK_S``: where the link idled.

    ``idle_share``: ticks in which nothing went upstream; ``last_moved``: the
    end of the last tick in which something did; ``stalls``: ticks that came
    more than ``STALL_S`` late (this process's event loop, which the agent,
    the proxy and the peer's client share, was busy or starved).
    """

    def __init__(self, proxy: TcpProxy) -> None:
        self._proxy = proxy
        self.ticks = 0
        self.idle_ticks = 0
        self.stalls = 0
        self.last_moved = time.monotonic()

    async def run(self) -> None:
        """Sample until cancelled."""
        last, then = self._proxy.bytes_up, time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            up, now = self._proxy.bytes_up, time.monotonic()
            self.ticks += 1
            self.stalls += now - then > TICK_S + STALL_S
            if up == last:
                self.idle_ticks += 1
            else:
                self.last_moved = now
            last, then = up, now

    @property
    def idle_share(self) -> float:
        """Share of ticks in which nothing went upstream."""
        return self.idle_ticks / self.ticks if self.ticks else 0.0


@dataclass(frozen=True, slots=True)
class Transfer:
    """One measured transfer through a throttled proxy."""

    seconds: float
    wire_bytes: int
    payload_bytes: int
    connect_s: float
    idle_share: float
    #: From the last tick that moved bytes upstream to the end of the window.
    tail_s: float
    stalls: int

    @property
    def rate(self) -> float:
        """Link bytes per second over the window."""
        return self.wire_bytes / self.seconds

    def describe(self) -> str:
        """Where the window went, for the log."""
        return (
            f"{self.wire_bytes / 1e6:.2f} MB on the link in {self.seconds:.2f} s (at full rate"
            f" {self.wire_bytes / RATE:.2f} s): {self.rate / 1e6:.3f} MB/s of {RATE / 1e6:.3f};"
            f" link idle {100 * self.idle_share:.1f} % of the window, the last"
            f" {self.tail_s:.3f} s after the last byte; {self.stalls} event loop stall(s)"
            f" > {STALL_S * 1e3:.0f} ms; connect {self.connect_s:.3f} s"
        )


@dataclass(frozen=True, slots=True)
class Ours(Transfer):
    """Our transfer, with how the uplink sent it."""

    sealed_bytes: int
    raw_bytes: int
    segments: int
    packets: int
    owed_media: int


@contextlib.asynccontextmanager
async def watching(proxy: TcpProxy) -> AsyncIterator[LinkWatch]:
    """A :class:`LinkWatch` running for the ``async with`` block."""
    watch = LinkWatch(proxy)
    task = asyncio.create_task(watch.run(), name="link-watch")
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def sealed_up_to(agent: Agent, ends: dict[str, int | None]) -> None:
    """Wait until each camera's sealed segments reach its seq in ``ends``."""
    changed = asyncio.Event()
    unsubscribe = agent.store.on_sealed(lambda _: changed.set())
    try:
        while not all(
            end is None or ((segs := agent.store.segments(cam)) and segs[-1].last_seq >= end)
            for cam, end in ends.items()
        ):
            changed.clear()
            await changed.wait()
    finally:
        unsubscribe()


async def backfill_once(
    tmp: Path,
    rx: ReceiverContact,
    link: TcpProxy,
    units: AccessUnits,
    record_s: float,
    peer: Callable[[int], Awaitable[Transfer]],
) -> tuple[Ours, Transfer]:
    """Record ``record_s`` seconds with the link cut, end, restore at ``RATE``; measure.

    Then, with the agent still running (its cameras and store: the same load),
    ``peer(bytes our window carried)``.
    """
    path = write_agent_config(tmp / "agent", rx, fps=FPS, preroll_s=PREROLL_S, cameras=CAMERAS)
    text = path.read_text().replace(rx.uplink_url, link.origin + "/v1/uplink")
    path.write_text(text + f"\n[uplink]\nreconnect_max_s = {RECONNECT_MAX_S}\n")
    config = load_config(path)

    def replay(camera: CameraConfig) -> ReplayCamera:
        return ReplayCamera(camera.id, units, camera.fps)

    sizes: dict[tuple[str, int], int] = {}

    def measure(pkt: EncodedPacket) -> None:
        sizes[pkt.camera, pkt.seq] = len(pkt.payload)

    link.cut()  # from the start: nothing of the session reaches the receiver live
    async with Agent(config, source_factory=replay) as agent:
        agent.capture.subscribe(measure)  # before the first packet: no await since start
        agent.uplink.unacked_max_bytes = RAM_BYTES
        uplink = agent.uplink
        async with asyncio.timeout(30):
            await agent.capture.wait_packets(PREROLL_S * FPS + FPS // 2)
        press_button(agent)
        async with asyncio.timeout(10):
            await agent.wait_until(lambda: agent.emergency.active is not None)
        session = agent.emergency.active
        assert session is not None
        stream = uplink.stream(session.id)
        if stream is None:
            raise RuntimeError(f"session {session.id} started without an uplink stream")
        async with asyncio.timeout(record_s + 30):
            await agent.capture.wait_packets(round(record_s * FPS))
        agent.end("benchmark: footage recorded with the link cut")
        cameras = [c.id for c in stream.open.cameras]
        owed = sum(
            sizes[c.id, seq]
            for c, end in zip(stream.open.cameras, stream.end_seq, strict=True)
            if end is not None
            for seq in range(c.first_seq, end + 1)
        )
        async with asyncio.timeout(30):
            await sealed_up_to(agent, dict(zip(cameras, stream.end_seq, strict=True)))
        if uplink.connected:
            raise RuntimeError("the uplink connected through a cut link")
        link.rate = RATE
        restored = time.monotonic()
        link.restore()
        bound = 60 + 5 * owed / RATE
        async with asyncio.timeout(bound):
            await uplink.wait_until(lambda: uplink.connected)
            started, up0 = time.monotonic(), link.bytes_up
            s0 = (uplink.stats.bytes_sent, uplink.stats.segment_bytes_sent)
            n0 = (uplink.stats.packets_sent, uplink.stats.segments_sent)
            async with watching(link) as watch:
                await uplink.wait_settled(session.id)
            ended, up1 = time.monotonic(), link.bytes_up
        raw = uplink.stats.bytes_sent - s0[0]
        sealed = uplink.stats.segment_bytes_sent - s0[1]
        result = Ours(
            seconds=ended - started,
            wire_bytes=up1 - up0,
            payload_bytes=raw + sealed,
            connect_s=started - restored,
            idle_share=watch.idle_share,
            tail_s=ended - watch.last_moved,
            stalls=watch.stalls,
            sealed_bytes=sealed,
            raw_bytes=raw,
            segments=uplink.stats.segments_sent - n0[1],
            packets=uplink.stats.packets_sent - n0[0],
            owed_media=owed,
        )
        log.info(
            "ours: %.2f MB owed (H.264) -> %.2f MB sent (%d segments %.2f MB, %d packets %.2f MB)"
            " -> %s",
            owed / 1e6,
            result.payload_bytes / 1e6,
            result.segments,
            sealed / 1e6,
            result.packets,
            raw / 1e6,
            result.describe(),
        )
        peer_result = await peer(result.wire_bytes)
    return result, peer_result


async def peer_once(url: str, pin: str, link: TcpProxy, total: int) -> Transfer:
    """``total`` bytes of raw WebSocket messages through ``link`` at ``RATE``; measure."""
    link.rate = RATE
    message = os.urandom(PEER_MESSAGE)
    count = math.ceil(total / PEER_MESSAGE)
    ssl = aiohttp.Fingerprint(fingerprint_digest(pin))
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(60 + 5 * total / RATE):
            connecting = time.monotonic()
            async with http.ws_connect(url, ssl=ssl) as ws:
                started, up0 = time.monotonic(), link.bytes_up

                async def replies() -> None:
                    for _ in range(count):
                        msg = await ws.receive()
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            raise RuntimeError(f"peer answered {msg.type.name}")

                async with watching(link) as watch:
                    reader = asyncio.create_task(replies(), name="peer-replies")
                    try:
                        left = total
                        while left > 0:
                            await ws.send_bytes(message[: min(left, PEER_MESSAGE)])
                            left -= PEER_MESSAGE
                        await reader
                    finally:
                        reader.cancel()
                ended, up1 = time.monotonic(), link.bytes_up
    result = Transfer(
        ended - started,
        up1 - up0,
        total,
        started - connecting,
        watch.idle_share,
        ended - watch.last_moved,
        watch.stalls,
    )
    log.info("peer: %.2f MB in %d messages -> %s", total / 1e6, count, result.describe())
    return result


def figures(ours: Ours, peer: Transfer) -> list[Figure]:
    """The five figures of one run."""
    expected_share = max(0.0, ours.owed_media - RAM_BYTES) / ours.owed_media
    return [
        figure(
            BENCH,
            "backfill_throughput_ratio",
            ours.rate / RATE,
            "ratio",
            "raw_wss_bulk_same_link",
            peer.rate / RATE,
        ),
        figure(
            BENCH,
            "backfill_wire_bytes_per_media_byte",
            ours.wire_bytes / ours.owed_media,
            "ratio",
            "raw_wss_bulk_wire_per_payload",
            peer.wire_bytes / peer.payload_bytes,
        ),
        figure(
            BENCH, "backfill_seconds", ours.seconds, "s", "raw_wss_bulk_same_bytes", peer.seconds
        ),
        figure(
            BENCH,
            "backfill_sealed_share",
            ours.sealed_bytes / ours.payload_bytes,
            "ratio",
            "owed_beyond_ram_bound",
            expected_share,
        ),
        figure(
            BENCH,
            "backfill_reconnect_s",
            ours.connect_s,
            "s",
            "raw_wss_connect_same_link",
            peer.connect_s,
        ),
    ]


async def run(smoke: bool) -> list[Figure]:
    """Record 3 (smoke) or 20 seconds with the link cut; backfill them, then the peer."""
    record_s = SMOKE_RECORD_S if smoke else RECORD_S
    stream = await asyncio.to_thread(h264_stream, 2 if smoke else 10)
    units = await asyncio.to_thread(load_access_units, stream)
    with make_temp_dir(BENCH) as tmp_name:
        tmp = Path(tmp_name)
        peer_argv = [sys.executable, "-m", "tests.bench.peer_server", "--data", str(tmp / "peer")]
        async with (
            TcpProxy(0) as link,
            TcpProxy(0) as peer_link,
            receiver_behind(tmp / "receiver", link.origin) as (rx, rx_port),
            child("peer", peer_argv) as peer_proc,
        ):
            link.target_port = rx_port
            peer_url = await peer_proc.wait_line(re.compile(r"^peer: wss://[^:]+:(\d+)/"), 30)
            pin = await peer_proc.wait_line(re.compile(r"^TLS pin: (sha256:[0-9a-f]{64})"), 5)
            peer_link.target_port = int(peer_url.group(1))
            url = f"wss://127.0.0.1:{peer_link.port}/"
            ours, peer = await backfill_once(
                tmp,
                rx,
                link,
                units,
                record_s,
                lambda total: peer_once(url, pin.group(1), peer_link, total),
            )
    return figures(ours, peer)


# -- command line (the receiver's child process) --------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.bench.backfill receiver --data DIR --origin wss://...``."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.backfill")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("receiver", help="serve a receiver that accepts extra origins")
    serve.add_argument("--data", type=Path, required=True)
    serve.add_argument("--origin", action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    asyncio.run(serve_receiver(args.data, args.origin))


if __name__ == "__main__":
    main()
