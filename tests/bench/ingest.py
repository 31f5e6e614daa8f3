"""Benchmark ``receiver_ingest``: device streams one receiver holds, and its goodput.

Issue #6: "concurrent 4 Mbps device streams held with durable acks and no
loss, and ``receiver_ingest_ratio`` against raw aiohttp WebSocket-over-TLS
throughput on the same machine. Target ratio >= 0.4." The method, in one run:

- **Processes.** The receiver is the real one, ``breakglass receiver serve``
  on 127.0.0.1 in a child process (:func:`tests.bench.common.receiver_process`).
  The simulated devices run in load-generator children (``python -m
  tests.bench.ingest load SPEC``; up to one per spare core, each an asyncio
  loop holding many devices), so their CPU is never the receiver's. The raw
  peer (:mod:`tests.bench.peer_server`, ``/discard``) is a child of its own.
- **A device.** It speaks the protocol with the real sans-IO
  :class:`agent.protocol.Uplink` over aiohttp's WebSocket client, pinned to
  the receiver's certificate as the agent is: challenge, ``hello`` signed by
  its Ed25519 key (allow-listed in ``DATA/devices/<id>.pub``), ``welcome``,
  ``session_open`` with one 1080p30 camera, then live media messages (25-byte
  header + one access unit) of a real H.264 stream (the cached ~4 Mbit/s
  1080p30 PyAV/libx264 stream of :func:`tests.bench.common.h264_stream`,
  looped, never in the repository), then ``session_close``. It keeps the
  send time of every seq and, from the cumulative acks, when each became
  durable; it sends heartbeats while it waits to start, as the agent does.
- **Streams per core.** ``N`` devices (1, 2, 4, 8, ...) each send at 30 fps,
  i.e. at the stream's 4 Mbit/s, their start phases spread over one frame
  period (cameras are not synchronised), for ``WARMUP_S + WINDOW_S`` seconds.
  The receiver's CPU time (``/proc/PID/stat`` utime + stime, its waited-for
  children included: every thread, the fsync workers too) is sampled at the
  start and the end of the window (the steady state: every session began
  ``WARMUP_S`` earlier). A step **holds** when, for every device: no error,
  every sent seq acknowledged (the last one after the close), no frame due
  in the window acknowledged more than ``LAG_LIMIT_S`` after it was due (its
  capture time) nor sent more than ``LAG_LIMIT_S`` late (the paced send kept
  up); and when the receiver's data folder has every session closed in its
  ``session.json``, nothing declared missing, and its part files, scanned as
  the receiver scans them on start (:func:`receiver.parts.scan_part`:
  samples in complete fragments), hold seqs 0..last exactly once. ``N``
  doubles until a step fails, ``MAX_DEVICES`` or the time budget; then up to
  ``REFINE_STEPS`` bisection steps between the last ``N`` held and the first
  that failed. The figure is ``N / (receiver CPU s / wall s)`` at the
  largest ``N`` held. The log has, per step, the ack lag of the frames due
  before the window (all ``N`` sessions starting at once: runs created, part
  files opened, ``session.json`` written), the worst lag per second of the
  worst device, the busiest loader's CPU (a loader out of CPU is named as
  the cause) and how many cores were busy outside these processes meanwhile
  (``/proc/stat``: other processes, as the machine may be shared and a
  receiver starved of CPU falls behind early, and kernel threads, the
  receiver's writeback and journal commits among them).
- **Goodput ratio.** One device sends the same access units as fast as the
  connection takes them (no pacing, no ack window: TCP's backpressure is the
  only bound) for ``MAX_RATE_S``, then closes; its goodput is the media
  payload bytes acknowledged durable / (last ack - first send). The peer,
  in the same run, the same client code (messages serialized by the same
  ``Uplink``, the same ``send_bytes``): the same messages for the same time
  to a server that receives WebSocket-over-TLS binary messages and drops
  them; its throughput is the payload bytes / (the server's byte count
  answered - first send), the count checked against what was sent. One
  stream is the clearer comparison: both ends saturate, where the paced
  steps only measure what the pacing asks (the aggregate goodput of the
  largest step is logged). Ours and the peer's alternate ``MAX_RATE_ROUNDS``
  times; the best of each counts (the machine may be shared: a round that
  other processes slowed down says nothing of either side).

Figures (``value`` ours, ``peer_value`` the peer's):

- ``receiver_ingest_streams_per_core``: 4 Mbit/s streams held per receiver
  core used, at the largest ``N`` held; peer: the raw transport's receiving
  cost turned into the same unit, (payload bytes / peer CPU seconds) /
  (4 Mbit/s in bytes), from the peer's max-rate transfer.
- ``receiver_ingest_ratio``: max-rate single-stream goodput in MB/s; peer:
  the raw WebSocket-over-TLS throughput in MB/s; ``ratio`` is the figure
  (target >= 0.4, reported, never asserted).
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
import resource
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from provisioning.keys import load_private_key, new_private_key, public_pem
from provisioning.tls import fingerprint_digest
from receiver.ingest import UplinkLimits
from receiver.parts import scan_part
from tests.bench.common import (
    Child,
    Figure,
    ReceiverContact,
    child,
    figure,
    h264_stream,
    make_temp_dir,
    percentile,
    receiver_process,
)
from tests.bench.replay import AccessUnits, load_access_units

BENCH = "receiver_ingest"
FPS = 30
#: The stream's bit rate, bits per second (one device, one camera).
STREAM_BPS = 4_000_000
STREAM_S = 10
SMOKE_STREAM_S = 2
#: A stream falls behind when an ack or a paced send comes this much after the frame was due.
LAG_LIMIT_S = 1.0
WARMUP_S = 2.0
WINDOW_S = 8.0
SMOKE_WARMUP_S = 0.5
SMOKE_WINDOW_S = 1.5
MAX_DEVICES = 1024
SMOKE_MAX_DEVICES = 2
#: Bisection steps after the doubling found a step that failed.
REFINE_STEPS = 2
#: Bound of the stepping (a step that starts before it runs to its end).
BUDGET_S = 480.0
SMOKE_BUDGET_S = 60.0
MAX_RATE_S = 4.0
SMOKE_MAX_RATE_S = 1.0
#: Max-rate transfers to each side, alternating; the best of each is reported.
MAX_RATE_ROUNDS = 5
SMOKE_MAX_RATE_ROUNDS = 1
#: Devices per load-generator process (more processes only on spare cores).
DEVICES_PER_LOADER = 64
#: Handshakes all loaders run at once: the receiver refuses (503 busy) more than this many
#: from one address (all of ours come from 127.0.0.1), as it would a flood.
CONNECT_CONCURRENCY = UplinkLimits().max_handshakes_per_address
HEARTBEAT_S = 5.0
#: Bound of the wait for the acks of the last frames after the close.
SETTLE_S = 30.0
CAMERA = "cam-0"

log = logging.getLogger("bench.ingest")


# -- the load generator (a child process) ---------------------------------------------------


@dataclass(slots=True)
class Device:
    """One simulated device of a loader: its connection's state and what it measured."""

    device: str
    session: str
    key: Ed25519PrivateKey | None
    #: monotonic ns at which each seq was due (paced: its capture time) or sent (max rate).
    due_ns: list[int] = field(default_factory=list)
    #: monotonic ns at which each seq was handed to the WebSocket.
    sent_ns: list[int] = field(default_factory=list)
    #: monotonic ns at which each seq was acknowledged durable.
    acked_ns: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    acked: int = -1
    holds_seen: int = 0
    error: str | None = None
    wire_bytes: int = 0
    #: The peer's answer: binary bytes it received.
    peer_count: int | None = None
    end_ns: int | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_ack(self, seq: int, now_ns: int) -> None:
        """A cumulative ack: every seq up to ``seq`` is durable (stamped now)."""
        if seq > self.acked:
            self.acked_ns.extend([now_ns] * (seq - self.acked))
            self.acked = seq
            self.changed.set()

    def result(self, window: tuple[int, int] | None) -> dict[str, Any]:
        """What the orchestrator needs, as JSON.

        Lags (ack - due) and lateness (sent - due) are given for the frames due
        inside ``window`` (the steady state) and, apart, for those due before it
        (every session starting at once: runs created, files opened).
        """
        last = len(self.sizes) - 1
        lo, hi = window if window is not None else (0, 2**63)
        # The last frame becomes durable only when its run is finished (the close): not a lag.
        lags = [(a - d) / 1e9 for a, d in zip(self.acked_ns[:last], self.due_ns, strict=False)]
        late = [(t - d) / 1e9 for t, d in zip(self.sent_ns, self.due_ns, strict=True)]
        inside = [lo <= d < hi for d in self.due_ns]
        lags_in = [x for x, ok in zip(lags, inside, strict=False) if ok]
        before = [x for x, d in zip(lags, self.due_ns, strict=False) if d < lo]
        # The worst lag of the frames due in each second from the first: where lag built up.
        by_s: list[float] = []
        for lag, due in zip(lags, self.due_ns, strict=False):
            k = (due - self.due_ns[0]) // 1_000_000_000
            by_s.extend([0.0] * (k + 1 - len(by_s)))
            by_s[k] = max(by_s[k], lag)
        acked_in = sum(s for s, a in zip(self.sizes, self.acked_ns, strict=False) if lo <= a < hi)
        return {
            "device": self.device,
            "session": self.session,
            "sent": len(self.sizes),
            "last_seq": last,
            "payload_bytes": sum(self.sizes),
            "wire_bytes": self.wire_bytes,
            "acked": self.acked,
            "lag_max_s": max(lags_in, default=0.0),
            "lag_p99_s": percentile(lags_in, 99) if lags_in else 0.0,
            "startup_lag_max_s": max(before, default=0.0),
            "lag_max_by_s": [round(x, 3) for x in by_s],
            "late_max_s": max((x for x, ok in zip(late, inside, strict=True) if ok), default=0.0),
            "holds_seen": self.holds_seen,
            "window_bytes_acked": acked_in,
            "first_send_ns": self.sent_ns[0] if self.sent_ns else None,
            "end_ns": self.end_ns,
            "peer_count": self.peer_count,
            "error": self.error,
        }


def _session_open(session: str, units: AccessUnits) -> p.SessionOpen:
    camera = p.CameraDesc(
        index=0,
        id=CAMERA,
        zone="exterior",
        codec="h264",
        width=units.width,
        height=units.height,
        fps=float(FPS),
        extradata=units.extradata,
        first_seq=0,
        live_seq=0,
    )
    now = time.time()
    started_by = {"kind": "button", "button": "bench"}
    return p.SessionOpen(session, "bench-building", started_by, now, now + 3600, (camera,))


def _ready_uplink(opening: p.SessionOpen) -> p.Uplink:
    """An agent-side :class:`Uplink` past a local handshake and ``session_open`` (the peer's)."""
    conn, other = p.Uplink(p.Role.AGENT), p.Uplink(p.Role.RECEIVER)
    conn.receive(other.send(p.Challenge(p.b64url(bytes(32)))))
    other.receive(conn.send(p.Hello("raw-peer", p.b64url(bytes(64)))))
    conn.receive(other.send(p.Welcome()))
    conn.send(opening)
    return conn


def _as_text(wire: str | bytes) -> str:
    assert isinstance(wire, str)
    return wire


def _as_bytes(wire: str | bytes) -> bytes:
    assert isinstance(wire, bytes)
    return wire


class Loader:
    """The devices of one load-generator process and the shared plan."""

    def __init__(self, spec: dict[str, Any], units: AccessUnits) -> None:
        self.spec = spec
        self.units = units
        self.mode: str = spec["mode"]  # "paced" | "max" | "peer"
        self.url: str = spec["url"]
        self.origin: str = spec.get("origin", "")
        self.ssl = aiohttp.Fingerprint(fingerprint_digest(spec["pin"]))
        self.seconds: float = spec["seconds"]
        self.devices = [
            Device(d["id"], d["session"], load_private_key(Path(d["key"])) if d["key"] else None)
            for d in spec["devices"]
        ]
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.go: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.connecting = asyncio.Semaphore(spec.get("connecting", CONNECT_CONCURRENCY))

    def _became_ready(self) -> None:
        self.ready += 1
        if self.ready == len(self.devices):
            self.all_ready.set()

    async def device_main(self, http: aiohttp.ClientSession, k: int, dev: Device) -> None:
        """Connect, handshake, open; stream when told; close; wait for the last acks."""
        readied = False
        reader: asyncio.Task[None] | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with self.connecting:  # until the receiver's handshake is over
                    ws = await stack.enter_async_context(
                        await http.ws_connect(
                            self.url, ssl=self.ssl, max_msg_size=p.MAX_CONTROL_BYTES, autoping=True
                        )
                    )
                    opening = _session_open(dev.session, self.units)
                    if self.mode == "peer":
                        conn = _ready_uplink(opening)
                    else:
                        conn = p.Uplink(p.Role.AGENT)
                        await self._handshake(ws, conn, dev)
                        await ws.send_str(_as_text(conn.send(opening)))
                reader = asyncio.create_task(self._reader(ws, conn, dev), name=f"acks {dev.device}")
                readied = True
                self._became_ready()
                t0 = await self._wait_go(ws, conn, reader)
                if self.mode == "paced":
                    phase = k * round(1e9 / FPS) // max(1, len(self.devices))
                    await self._send_paced(
                        ws, conn, dev, t0 + phase, t0 + round(self.seconds * 1e9)
                    )
                else:
                    await self._send_max(ws, conn, dev, t0 + round(self.seconds * 1e9))
                if self.mode == "peer":
                    await ws.send_str("end")
                else:
                    await ws.send_str(_as_text(conn.send(p.SessionClose(dev.session, "benchmark"))))
                async with asyncio.timeout(SETTLE_S):
                    while not self._settled(dev):
                        if reader.done():
                            reader.result()  # raises what ended it
                            raise ConnectionError("the connection closed before the last ack")
                        dev.changed.clear()
                        await dev.changed.wait()
        except Exception as exc:  # reported, not raised: the step fails, the others go on
            dev.error = f"{type(exc).__name__}: {exc}"[:300]
            if reader is not None and reader.done() and not reader.cancelled():
                inner = reader.exception()
                if inner is not None:
                    dev.error += f" (reader: {type(inner).__name__}: {inner})"[:300]
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            if not readied:
                self._became_ready()

    def _settled(self, dev: Device) -> bool:
        if self.mode == "peer":
            return dev.peer_count is not None
        return dev.acked >= len(dev.sizes) - 1

    async def _handshake(
        self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink, dev: Device
    ) -> None:
        assert dev.key is not None
        event = conn.receive(await self._message(ws, 10))
        if not isinstance(event, p.Challenge):
            raise ConnectionError(f"expected a challenge, got {event!r}"[:200])
        sig = dev.key.sign(p.hello_signed_bytes(event.nonce, self.origin))
        await ws.send_str(_as_text(conn.send(p.Hello(dev.device, p.b64url(sig)))))
        event = conn.receive(await self._message(ws, 10))
        if not isinstance(event, p.Welcome):
            raise ConnectionError(f"expected welcome, got {event!r}"[:200])

    @staticmethod
    async def _message(ws: aiohttp.ClientWebSocketResponse, within: float | None) -> str | bytes:
        msg = await ws.receive(timeout=within)
        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            data: str | bytes = msg.data
            return data
        raise ConnectionError(f"closed by the server ({msg.type.name} {ws.close_code})")

    async def _reader(
        self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink, dev: Device
    ) -> None:
        try:
            while True:
                data = await self._message(ws, None)
                now = time.monotonic_ns()
                if self.mode == "peer":
                    dev.peer_count, dev.end_ns = int(data), now
                    dev.changed.set()
                    continue
                event = conn.receive(data)
                if isinstance(event, p.Ack):
                    dev.holds_seen += bool(event.holds)
                    dev.on_ack(event.seq, now)
                    if dev.acked >= len(dev.sizes) - 1 and dev.sizes:
                        dev.end_ns = now
                elif isinstance(event, p.Error):
                    raise ConnectionError(f"receiver error {event.code}: {event.detail}")
        finally:
            dev.changed.set()

    async def _wait_go(
        self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink, reader: asyncio.Task[None]
    ) -> int:
        """The start time; heartbeats meanwhile (the receiver drops a device silent for 15 s)."""
        while True:
            waits: list[asyncio.Future[Any]] = [self.go, reader]
            await asyncio.wait(waits, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
            if self.go.done():
                return self.go.result()
            if reader.done():
                reader.result()
                raise ConnectionError("the connection closed before the start")
            if self.mode != "peer":
                await ws.send_str(_as_text(conn.send(p.Heartbeat(time.time()))))

    def _media(self, conn: p.Uplink, dev: Device, seq: int, capture_us: int) -> bytes:
        payload, keyframe = self.units.units[seq % len(self.units.units)]
        wire = _as_bytes(
            conn.send(p.Media(p.MediaKind.LIVE, 0, seq, capture_us, keyframe, False, payload))
        )
        dev.sizes.append(len(payload))
        dev.wire_bytes += len(wire)
        return wire

    async def _send_paced(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        conn: p.Uplink,
        dev: Device,
        start_ns: int,
        end_ns: int,
    ) -> None:
        period_ns = round(1e9 / FPS)
        wall_us = time.time_ns() // 1000 + (start_ns - time.monotonic_ns()) // 1000
        seq = 0
        while (due := start_ns + seq * period_ns) < end_ns:
            now = time.monotonic_ns()
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
            dev.due_ns.append(due)
            dev.sent_ns.append(time.monotonic_ns())
            wire = self._media(conn, dev, seq, wall_us + seq * period_ns // 1000)
            await ws.send_bytes(wire)
            seq += 1

    async def _send_max(
        self, ws: aiohttp.ClientWebSocketResponse, conn: p.Uplink, dev: Device, end_ns: int
    ) -> None:
        period_us = round(1e6 / FPS)
        wall_us = time.time_ns() // 1000
        seq = 0
        while (now := time.monotonic_ns()) < end_ns:
            dev.due_ns.append(now)
            dev.sent_ns.append(now)
            # Capture times of a 30 fps camera, so that the recording's timestamps are sane.
            wire = self._media(conn, dev, seq, wall_us + seq * period_us)
            await ws.send_bytes(wire)
            seq += 1


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _poll_go(path: Path, timeout: float) -> int:
    """The start time (``time.monotonic_ns()``) the orchestrator writes into ``path``."""
    async with asyncio.timeout(timeout):
        while not path.exists():
            await asyncio.sleep(0.01)
    return int(path.read_text())


async def load_main(spec_path: Path) -> int:
    """Run one loader: ``ready`` when every device is connected, ``result {...}`` at the end."""
    spec = json.loads(spec_path.read_text())
    units = load_access_units(Path(spec["stream"]))
    loader = Loader(spec, units)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        tasks = [
            asyncio.create_task(loader.device_main(http, k, dev), name=dev.device)
            for k, dev in enumerate(loader.devices)
        ]
        try:
            async with asyncio.timeout(30 + 0.2 * len(tasks)):
                await loader.all_ready.wait()
            failed = [d.error for d in loader.devices if d.error]
            print(f"ready {json.dumps({'devices': len(tasks), 'failed': failed[:5]})}", flush=True)
            t0 = await _poll_go(Path(spec["go"]), timeout=120 + 0.2 * len(tasks))
            loader.go.set_result(t0)
            cpu0 = _cpu_s()
            async with asyncio.timeout(loader.seconds + SETTLE_S + 30):
                await asyncio.gather(*tasks)
            cpu = _cpu_s() - cpu0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    window = None
    if "window" in spec:
        lo, hi = spec["window"]
        window = (t0 + round(lo * 1e9), t0 + round(hi * 1e9))
    result = {"cpu_s": cpu, "devices": [d.result(window) for d in loader.devices]}
    print("result " + json.dumps(result), flush=True)
    return 0


# -- the orchestrator -----------------------------------------------------------------------


def proc_cpu_s(pid: int, *, main_thread: bool = False) -> float:
    """User + system CPU seconds of ``pid`` and its waited-for children (``/proc/PID/stat``).

    ``main_thread``: of its main thread alone (``/proc/PID/task/PID/stat``;
    a Python process's event loop runs there).
    """
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy so far (``/proc/stat``, not idle)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds so far: the receiver, each loader, this process, the whole machine."""

    wall: float
    receiver: float
    #: The receiver's main thread: its event loop (one core at most).
    receiver_loop: float
    loaders: tuple[float, ...]
    own: float
    machine: float

    @classmethod
    def take(cls, receiver: int, loaders: Sequence[int]) -> CpuSample:
        """Sample now."""
        return cls(
            time.monotonic(),
            proc_cpu_s(receiver),
            proc_cpu_s(receiver, main_thread=True),
            tuple(proc_cpu_s(pid) for pid in loaders),
            _cpu_s(),
            machine_busy_s(),
        )


@dataclass(slots=True)
class Step:
    """One step of ``n`` paced devices."""

    n: int
    held: bool
    why: str
    receiver_cores: float
    loader_cores: float
    goodput: float
    lag_max_s: float
    lag_p99_s: float
    late_max_s: float
    startup_lag_s: float
    #: Cores busy outside the receiver, the loaders and this process meanwhile: other
    #: processes, and kernel threads (the receiver's writeback and journal commits too).
    others_cores: float


@dataclass(slots=True)
class Bench:
    """What every step shares: the receiver, the stream, the keys, the folder."""

    rx: ReceiverContact
    stream: Path
    tmp: Path
    smoke: bool
    #: The stream's bit rate at FPS (the file's own, about STREAM_BPS).
    stream_bps: float
    keys: dict[str, Path] = field(default_factory=dict)
    runs: int = 0

    def device_ids(self, n: int) -> list[str]:
        """``n`` allow-listed device ids, their keys made on first use."""
        ids = [f"bench-{k:04d}" for k in range(n)]
        for device in ids:
            if device not in self.keys:
                path = self.tmp / "keys" / f"{device}.key"
                path.parent.mkdir(parents=True, exist_ok=True)
                key = new_private_key(path)
                (self.rx.devices_dir / f"{device}.pub").write_bytes(public_pem(key.public_key()))
                self.keys[device] = path
        return ids

    @property
    def warmup_s(self) -> float:
        return SMOKE_WARMUP_S if self.smoke else WARMUP_S

    @property
    def window_s(self) -> float:
        return SMOKE_WINDOW_S if self.smoke else WINDOW_S


def loader_count(n: int) -> int:
    """Loaders for ``n`` devices: one per ``DEVICES_PER_LOADER``, at most the spare cores."""
    spare = max(1, len(os.sched_getaffinity(0)) - 1)
    return max(1, min(spare, math.ceil(n / DEVICES_PER_LOADER)))


@contextlib.asynccontextmanager
async def loaders(
    bench: Bench, specs: Sequence[dict[str, Any]]
) -> AsyncIterator[tuple[list[Child], Path]]:
    """Start one loader per spec; wait until each is ready; yields them and the go file."""
    bench.runs += 1
    folder = bench.tmp / f"run-{bench.runs}"
    folder.mkdir()
    go = folder / "go"
    async with contextlib.AsyncExitStack() as stack:
        procs = []
        for i, spec in enumerate(specs):
            spec_path = folder / f"loader-{i}.json"
            spec_path.write_text(json.dumps({**spec, "go": str(go), "stream": str(bench.stream)}))
            argv = [sys.executable, "-m", "tests.bench.ingest", "load", str(spec_path)]
            procs.append(await stack.enter_async_context(child(f"loader-{i}", argv)))
        bound = 60 + 0.2 * sum(len(s["devices"]) for s in specs)
        for proc in procs:
            line = await proc.wait_line(re.compile(r"^ready (\{.*\})$"), timeout=bound)
            failed = json.loads(line.group(1))["failed"]
            if failed:
                raise RuntimeError(f"{proc.name}: devices failed to connect: {failed}")
        yield procs, go


def start(go: Path, delay_s: float = 0.3) -> int:
    """Write the common start time (``time.monotonic_ns()``, system wide) for the loaders."""
    t0 = time.monotonic_ns() + round(delay_s * 1e9)
    tmp = go.with_suffix(".tmp")
    tmp.write_text(str(t0))
    tmp.replace(go)
    return t0


async def sleep_until(t_ns: int) -> None:
    """Sleep until ``time.monotonic_ns()`` reaches ``t_ns``."""
    await asyncio.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))


async def results(
    procs: Sequence[Child], timeout: float
) -> tuple[list[dict[str, Any]], list[float]]:
    """Every device's result, and each loader's CPU seconds from the start (they then exit)."""
    out: list[dict[str, Any]] = []
    cpu: list[float] = []
    for proc in procs:
        line = await proc.wait_line(re.compile(r"^result (\{.*\})$"), timeout=timeout)
        doc = json.loads(line.group(1))
        out.extend(doc["devices"])
        cpu.append(doc["cpu_s"])
        await proc.wait_exit(timeout=30)
    return out, cpu


def recorded(data: Path, session: str) -> tuple[bool, list[tuple[int, int]], int]:
    """What the receiver holds of a session's camera, from its files alone (blocking).

    ``session.json`` (closed or not, the part files, declared gaps) and each
    part file scanned as the receiver scans it on start (samples in complete
    fragments): (closed, the seq ranges the parts hold, gaps and bad segments).
    """
    folder = data / "recordings" / session
    doc = json.loads((folder / "session.json").read_bytes())
    cam = doc["cameras"][0]
    ranges = []
    for run in cam["runs"]:
        for part in run["parts"]:
            samples, _ = scan_part(folder / part["file"], repair=False)
            if samples:
                ranges.append((part["first_seq"], part["first_seq"] + samples - 1))
    declared = len(cam.get("gaps", [])) + len(cam.get("bad_segments", []))
    return doc.get("closed_at") is not None, sorted(ranges), declared


async def check_recorded(data: Path, devices: Sequence[dict[str, Any]]) -> list[str]:
    """Problems: where the receiver's files do not hold exactly seqs 0..last of each device.

    Read from the receiver's data folder, not its viewer API: a session is
    closed in its ``session.json``, its part files hold every seq sent once
    (contiguous, no overlap), and nothing is declared missing.
    """
    problems: list[str] = []
    for dev in devices:
        sid, last = dev["session"], dev["last_seq"]
        try:
            closed, ranges, declared = await asyncio.to_thread(recorded, data, sid)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            problems.append(f"{sid}: no readable recording ({type(exc).__name__}: {exc})")
            continue
        held, expect = 0, 0
        for first, end in ranges:
            if first != expect:
                break
            held, expect = held + end - first + 1, end + 1
        if not closed or declared or held != last + 1 or expect != last + 1 or len(ranges) == 0:
            problems.append(
                f"{sid}: recorded {ranges[:4]}{'...' if len(ranges) > 4 else ''} (closed"
                f" {closed}, {declared} declared gap(s)); sent seqs 0..{last}"
            )
    return problems


async def paced_step(bench: Bench, n: int) -> Step:
    """``n`` devices at 4 Mbit/s each: did the receiver hold them, at what CPU."""
    warmup, window = bench.warmup_s, bench.window_s
    seconds = warmup + window + 0.5
    ids = bench.device_ids(n)
    tag = secrets.token_hex(3)
    devices = [{"id": d, "key": str(bench.keys[d]), "session": f"s{n}-{tag}-{d}"} for d in ids]
    groups = loader_count(n)
    specs = [
        {
            "mode": "paced",
            "url": bench.rx.uplink_url,
            "origin": bench.rx.uplink_url.rsplit("/v1/", 1)[0],
            "pin": bench.rx.fingerprint,
            "seconds": seconds,
            "window": [warmup, warmup + window],
            "devices": devices[g::groups],
            "connecting": max(1, CONNECT_CONCURRENCY // groups),
        }
        for g in range(groups)
    ]
    async with loaders(bench, specs) as (procs, go):
        t0 = start(go)
        await sleep_until(t0 + round(warmup * 1e9))
        pids = [pr.pid for pr in procs]
        c0 = CpuSample.take(bench.rx.pid, pids)
        await sleep_until(t0 + round((warmup + window) * 1e9))
        c1 = CpuSample.take(bench.rx.pid, pids)
        got, _ = await results(procs, timeout=seconds + SETTLE_S + 60)
    wall = c1.wall - c0.wall
    rx_cores = (c1.receiver - c0.receiver) / wall
    loop_cores = (c1.receiver_loop - c0.receiver_loop) / wall
    loaders_s = [b - a for a, b in zip(c0.loaders, c1.loaders, strict=True)]
    loader_cores = max(loaders_s) / wall
    ours = c1.receiver - c0.receiver + sum(loaders_s) + c1.own - c0.own
    others = max(0.0, (c1.machine - c0.machine - ours) / wall)
    lags = [d["lag_max_s"] for d in got]
    late = max(d["late_max_s"] for d in got)
    goodput = sum(d["window_bytes_acked"] for d in got) / window
    problems = [f"{d['device']}: {d['error']}" for d in got if d["error"]]
    problems += [
        f"{d['device']}: acked {d['acked']} of {d['last_seq']}"
        for d in got
        if not d["error"] and d["acked"] < d["last_seq"]
    ]
    worst = max(got, key=lambda d: d["lag_max_s"])
    if max(lags) > LAG_LIMIT_S:
        problems.append(
            f"ack lag {worst['lag_max_s']:.2f} s ({worst['device']}) > {LAG_LIMIT_S} s"
            f" (its worst lag per second of sending: {worst['lag_max_by_s']})"
        )
    if late > LAG_LIMIT_S:
        problems.append(
            f"paced send {late:.2f} s late (the loader's busiest process used"
            f" {loader_cores:.2f} cores{': it ran out of CPU' if loader_cores > 0.9 else ''})"
        )
    if not problems:
        problems = await check_recorded(bench.rx.data_dir, got)
    step = Step(
        n=n,
        held=not problems,
        why="; ".join(problems[:4])
        + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""),
        receiver_cores=rx_cores,
        loader_cores=loader_cores,
        goodput=goodput,
        lag_max_s=max(lags),
        lag_p99_s=max(d["lag_p99_s"] for d in got),
        late_max_s=late,
        startup_lag_s=max(d["startup_lag_max_s"] for d in got),
        others_cores=others,
    )
    log.info(
        "%d stream(s): %s; receiver %.3f cores (%.1f streams/core; its event loop's thread"
        " %.3f), busiest loader %.2f cores,"
        " outside these processes %.2f of %d cores; goodput %.2f MB/s (%.2f expected); in the"
        " window ack lag max %.3f s (p99 of the worst %.3f s), sends late by up to %.3f s;"
        " before it (all sessions starting) ack lag max %.3f s%s",
        n,
        "HELD" if step.held else "NOT HELD",
        rx_cores,
        n / rx_cores if rx_cores > 0 else math.inf,
        loop_cores,
        loader_cores,
        others,
        os.cpu_count() or 0,
        goodput / 1e6,
        n * bench.stream_bps / 8e6,
        step.lag_max_s,
        step.lag_p99_s,
        late,
        step.startup_lag_s,
        "" if step.held else f": {step.why}",
    )
    return step


async def stepping(bench: Bench) -> list[Step]:
    """Double ``n`` until a step fails (or the bounds); then bisect a little."""
    top = SMOKE_MAX_DEVICES if bench.smoke else MAX_DEVICES
    deadline = time.monotonic() + (SMOKE_BUDGET_S if bench.smoke else BUDGET_S)
    steps: list[Step] = []
    n = 1
    while n <= top and time.monotonic() < deadline:
        steps.append(await paced_step(bench, n))
        if not steps[-1].held:
            break
        n *= 2
    held = [s.n for s in steps if s.held]
    failed = [s.n for s in steps if not s.held]
    if held and failed and not bench.smoke:
        lo, hi = max(held), min(failed)
        for _ in range(REFINE_STEPS):
            mid = (lo + hi) // 2
            if mid <= lo or time.monotonic() >= deadline:
                break
            steps.append(await paced_step(bench, mid))
            lo, hi = (mid, hi) if steps[-1].held else (lo, mid)
    return steps


@dataclass(frozen=True, slots=True)
class MaxRate:
    """One stream sent as fast as the connection takes it."""

    payload_bytes: int
    seconds: float
    messages: int
    #: CPU seconds of the server process over the transfer.
    server_cpu_s: float

    @property
    def rate(self) -> float:
        """Payload bytes per second."""
        return self.payload_bytes / self.seconds


async def max_rate(bench: Bench, server_pid: int, peer_url: str | None, peer_pin: str) -> MaxRate:
    """One device (or the raw peer's client) at full speed for ``MAX_RATE_S``."""
    seconds = SMOKE_MAX_RATE_S if bench.smoke else MAX_RATE_S
    if peer_url is None:
        device = bench.device_ids(1)[0]
        dev = {
            "id": device,
            "key": str(bench.keys[device]),
            "session": f"max-{secrets.token_hex(3)}",
        }
        spec: dict[str, Any] = {
            "mode": "max",
            "url": bench.rx.uplink_url,
            "origin": bench.rx.uplink_url.rsplit("/v1/", 1)[0],
            "pin": bench.rx.fingerprint,
        }
    else:
        dev = {"id": "raw-peer", "key": "", "session": f"raw-{secrets.token_hex(3)}"}
        spec = {"mode": "peer", "url": peer_url, "pin": peer_pin}
    spec |= {"seconds": seconds, "devices": [dev]}
    async with loaders(bench, [spec]) as (procs, go):
        c0 = CpuSample.take(server_pid, [])
        start(go)
        (got,), (client,) = await results(procs, timeout=seconds + SETTLE_S + 60)
        c1 = CpuSample.take(server_pid, [])
    cpu = c1.receiver - c0.receiver
    loop = c1.receiver_loop - c0.receiver_loop
    others = c1.machine - c0.machine - cpu - client - (c1.own - c0.own)
    if got["error"] or got["end_ns"] is None:
        raise RuntimeError(f"max-rate stream to {spec['mode']}: {got['error'] or 'no end'}")
    if peer_url is None:
        problems = await check_recorded(bench.rx.data_dir, [got])
        if problems:
            raise RuntimeError(f"max-rate stream lost data: {problems}")
    elif got["peer_count"] != got["wire_bytes"]:
        raise RuntimeError(f"the peer received {got['peer_count']} of {got['wire_bytes']} bytes")
    result = MaxRate(
        got["payload_bytes"], (got["end_ns"] - got["first_send_ns"]) / 1e9, got["sent"], cpu
    )
    log.info(
        "max rate to %s: %.1f MB in %d messages in %.2f s: %.1f MB/s; server %.2f CPU s"
        " (%.2f cores; its main thread %.2f), client %.2f cores; outside these %.2f of %d cores",
        "the raw peer" if peer_url else "the receiver",
        result.payload_bytes / 1e6,
        result.messages,
        result.seconds,
        result.rate / 1e6,
        cpu,
        cpu / result.seconds,
        loop / result.seconds,
        client / (c1.wall - c0.wall),
        max(0.0, others / (c1.wall - c0.wall)),
        os.cpu_count() or 0,
    )
    return result


async def run(smoke: bool) -> list[Figure]:
    """Paced steps of 1, 2, 4, ... devices; one max-rate stream to the receiver and the peer."""
    stream = await asyncio.to_thread(
        h264_stream, SMOKE_STREAM_S if smoke else STREAM_S, bitrate=STREAM_BPS
    )
    units = await asyncio.to_thread(load_access_units, stream)
    bps = units.payload_bytes * 8 * FPS / len(units.units)
    log.info(
        "stream %s: %d access units, %.2f Mbit/s at %d fps",
        stream.name,
        len(units.units),
        bps / 1e6,
        FPS,
    )
    with make_temp_dir(BENCH) as tmp_name:
        tmp = Path(tmp_name)
        peer_argv = [sys.executable, "-m", "tests.bench.peer_server", "--data", str(tmp / "peer")]
        async with (
            receiver_process(tmp / "receiver") as rx,
            child("peer", peer_argv) as peer,
        ):
            url = (await peer.wait_line(re.compile(r"^peer: (wss://\S+/)"), 30)).group(1)
            pin = (await peer.wait_line(re.compile(r"^TLS pin: (sha256:[0-9a-f]{64})"), 5)).group(1)
            bench = Bench(rx, stream, tmp, smoke, bps)
            steps = await stepping(bench)
            ours_runs, raw_runs = [], []
            for _ in range(SMOKE_MAX_RATE_ROUNDS if smoke else MAX_RATE_ROUNDS):
                ours_runs.append(await max_rate(bench, rx.pid, None, ""))
                raw_runs.append(await max_rate(bench, peer.pid, url + "discard", pin))
    ours = max(ours_runs, key=lambda r: r.rate)
    raw = max(raw_runs, key=lambda r: r.rate)
    held = [s for s in steps if s.held]
    if not held:
        raise RuntimeError(f"not even one stream held: {steps[0].why if steps else 'no step ran'}")
    best = max(held, key=lambda s: s.n)
    failed = [s for s in steps if not s.held]
    log.info(
        "largest step held: %d stream(s), receiver %.3f cores, goodput %.2f MB/s; %s",
        best.n,
        best.receiver_cores,
        best.goodput / 1e6,
        f"first failed: {min(failed, key=lambda s: s.n).n} ({min(failed, key=lambda s: s.n).why})"
        if failed
        else "none failed (bounded by the step count or the time budget)",
    )
    # Bytes one stream of this file sends per second (the file's own rate, ~STREAM_BPS).
    stream_bytes_s = bps / 8
    peer_per_core = max(
        r.payload_bytes / r.server_cpu_s / stream_bytes_s if r.server_cpu_s > 0 else math.inf
        for r in raw_runs
    )
    return [
        figure(
            BENCH,
            "receiver_ingest_streams_per_core",
            best.n / best.receiver_cores,
            "streams/core",
            "raw_aiohttp_wss_discard_streams_per_core",
            peer_per_core,
        ),
        figure(
            BENCH,
            "receiver_ingest_ratio",
            ours.rate / 1e6,
            "MB/s",
            "raw_aiohttp_wss_discard_same_frames",
            raw.rate / 1e6,
        ),
    ]


# -- command line (the load generator's child process) --------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.bench.ingest load SPEC.json``."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.ingest")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="simulated devices, as the spec says")
    load.add_argument("spec", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(load_main(args.spec)))
    sys.exit(130)


if __name__ == "__main__":
    main()
