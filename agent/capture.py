"""Capture fan-out: each camera's packets, numbered, to the pre-roll and the sinks.

One task per camera iterates its source. A packet gets its per-camera
sequence number here (gapless within a run, never reused across restarts),
goes into the camera's :class:`PreRoll`, then to every subscribed sink (the
uplink while a session streams). Sinks are plain callables run on the event
loop; they must not block. A failing camera is restarted with backoff and
never takes the other cameras or the button down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.preroll import PreRoll
from agent.statefile import SequenceReservations
from hardware import CameraSource, EncodedPacket

log = logging.getLogger(__name__)

Sink = Callable[[EncodedPacket], None]


@dataclass(slots=True)
class CameraState:
    """Health of one camera as the status API reports it."""

    packets: int = 0
    healthy: bool = False
    last_error: str | None = None


class Capture:
    """Runs every camera and fans its packets out."""

    def __init__(
        self,
        sources: dict[str, CameraSource],
        seqs: SequenceReservations,
        *,
        preroll_s: float,
        preroll_max_bytes: int,
        restart_max_s: float = 10.0,
    ) -> None:
        self.sources = sources
        self.seqs = seqs
        self.prerolls = {cam: PreRoll(preroll_s, preroll_max_bytes) for cam in sources}
        self.state = {cam: CameraState() for cam in sources}
        self.restart_max_s = restart_max_s
        self._sinks: list[Sink] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._first_packet = {cam: asyncio.Event() for cam in sources}

    def subscribe(self, sink: Sink) -> Callable[[], None]:
        """Add a sink; returns the function that removes it."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink)

    async def wait_packets(self, per_camera: int) -> None:
        """Wait until every camera delivered ``per_camera`` more packets (tests, benchmarks)."""
        start = {cam: state.packets for cam, state in self.state.items()}
        done = asyncio.Event()

        def sink(_: EncodedPacket) -> None:
            if all(self.state[c].packets - n >= per_camera for c, n in start.items()):
                done.set()

        unsubscribe = self.subscribe(sink)
        try:
            await done.wait()
        finally:
            unsubscribe()

    async def wait_ready(self, camera: str) -> None:
        """Wait until ``camera`` produced its first packet (its stream info is known)."""
        await self._first_packet[camera].wait()

    def start(self) -> None:
        """Start one named task per camera."""
        for cam in self.sources:
            self._tasks.append(asyncio.create_task(self._run(cam), name=f"capture-{cam}"))

    async def aclose(self) -> None:
        """Stop the capture tasks and close the sources."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for source in self.sources.values():
            await source.aclose()

    async def _run(self, cam: str) -> None:
        source, state, delay = self.sources[cam], self.state[cam], 0.5
        while True:
            try:
                async for packet in source.packets():
                    self._deliver(cam, packet)
                    delay = 0.5
                raise ConnectionError("source ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a camera must never take the agent down
                state.healthy = False
                state.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("camera %s failed; restarting in %.1f s", cam, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.restart_max_s)

    def _deliver(self, cam: str, packet: EncodedPacket) -> None:
        packet = packet.numbered(self.seqs.next(cam))
        state = self.state[cam]
        state.packets += 1
        state.healthy = True
        self.prerolls[cam].push(packet)
        self._first_packet[cam].set()
        for sink in self._sinks:
            sink(packet)
