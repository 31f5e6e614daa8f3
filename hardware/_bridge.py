"""The one bridge from a camera's worker thread to the event loop.

Every camera source produces packets on a thread that is not the loop's (its
own worker, or picamera2's encoder thread) and hands each one over with
``loop.call_soon_threadsafe``; nothing on those threads touches any other
asyncio object. On the loop's side, :class:`PacketQueue` holds the packets
until the consumer takes them.

Back-pressure: a live camera cannot wait for its reader, so the queue never
blocks the producer. It holds about ``max_buffered_s`` of video (measured on
the packets' ``mono_ns``, i.e. arrival); when the consumer falls further
behind, the oldest whole GOP goes (from the head up to the next keyframe), so
what remains always starts at a keyframe and stays decodable. If no second
keyframe arrives within four times that span (a camera with a very long GOP),
everything queued is dropped and the queue waits for the next keyframe. A
``deque`` plus an ``asyncio.Event`` rather than an ``asyncio.Queue``, because
dropping a GOP needs to look at the head.

A source that is not live (a file replayed as fast as possible) asks for a
*lossless* queue instead: the producer takes one of ``capacity`` slots before
each packet (blocking its own thread, never the loop) and the consumer gives
one back per packet taken.

:class:`ThreadedSource` is the common shell of the sources that own one
worker thread: start on the first :meth:`~ThreadedSource.packets` call, stop
and join (off the loop) in :meth:`~ThreadedSource.aclose`.

Hand-off latency. Waking the event loop costs more than the rest of a
packet's way through the agent (on a Pi or this project's 2-core test
machine, an asyncio wake-up is about three times a thread's). An agent is idle
nearly always: its packets go to the pre-roll and the sealed store, which
have no use for them sooner than a fraction of a second. So a live source may
*hold* packets on its thread and hand them over in batches, one wake-up per
:meth:`~ThreadedSource.set_handoff` seconds of video (measured on the
packets' ``mono_ns``); with ``0`` (the default, and whenever anyone watches:
an emergency's live lane) every packet is handed over as it comes. The
setting is read by the worker at each packet, so a switch to ``0`` hands the
held batch over with the next packet (one frame period later). Anything else
the worker posts (an end, a failure, a state change) flushes the held
packets first, so their order is kept. A lossless queue never holds: its
producer would wait for slots the held packets still occupy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import deque
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Any, Self

from hardware.camera import EncodedPacket, StreamInfo
from hardware.errors import CameraError

__all__ = ["PacketQueue", "ThreadedSource"]

_log = logging.getLogger("hardware.camera")


class PacketQueue:
    """Packets waiting for the consumer, on the event loop's side of the bridge.

    :meth:`put`, :meth:`fail`, :meth:`end` and :meth:`close` run on the loop
    (a worker posts them with ``call_soon_threadsafe``); only
    :meth:`take_slot` is for the producer's thread.
    """

    def __init__(
        self, label: str, *, max_buffered_s: float, lossless: bool = False, capacity: int = 32
    ) -> None:
        self._label = label
        #: How much video (by ``mono_ns``) the queue holds before it drops the oldest GOP.
        self.max_ns = round(max_buffered_s * 1e9)
        self._buffer: deque[EncodedPacket] = deque()
        self._wakeup = asyncio.Event()
        self._error: CameraError | None = None
        self._ended = False
        self._closed = False
        self._resync = False
        self._slots = threading.Semaphore(capacity) if lossless else None
        #: Packets discarded because the consumer fell behind (live queues only).
        self.dropped = 0

    @property
    def failed(self) -> bool:
        """Whether the producer ended with an error (:meth:`fail`)."""
        return self._error is not None

    def take_slot(self) -> None:
        """Producer thread: wait for room in a lossless queue (returns at once if live)."""
        if self._slots is not None:
            self._slots.acquire()

    def put(self, packet: EncodedPacket) -> None:
        """Queue ``packet``; in a live queue, drop the oldest GOP if the consumer lags."""
        if self._closed:
            return
        if self._resync:
            # After a drop emptied the queue, P-frames without their keyframe
            # would be undecodable: wait for the next keyframe.
            if not packet.keyframe:
                self.dropped += 1
                return
            self._resync = False
        self._buffer.append(packet)
        if self._slots is None:
            self._bound()
        self._wakeup.set()

    def _bound(self) -> None:
        buf = self._buffer
        while buf[-1].mono_ns - buf[0].mono_ns > self.max_ns:
            nxt = next((i for i in range(1, len(buf)) if buf[i].keyframe), None)
            if nxt is None:
                if buf[-1].mono_ns - buf[0].mono_ns <= 4 * self.max_ns:
                    return  # the next keyframe may still come: keep the GOP for now
                nxt = len(buf)
                self._resync = True
            for _ in range(nxt):
                buf.popleft()
            self.dropped += nxt
            _log.warning("%s: consumer too slow, dropped %d packets (a GOP)", self._label, nxt)
            if not buf:
                return

    def put_many(self, packets: list[EncodedPacket]) -> None:
        """Queue a batch, in order (as :meth:`put` for each)."""
        for packet in packets:
            self.put(packet)

    def fail(self, error: CameraError) -> None:
        """End the stream with ``error`` once the queued packets are taken."""
        self._error = error
        self._wakeup.set()

    def end(self) -> None:
        """End the stream normally once the queued packets are taken."""
        self._ended = True
        self._wakeup.set()

    def close(self) -> None:
        """Discard everything, end waiting consumers, release a blocked producer."""
        self._closed = True
        self._buffer.clear()
        self._wakeup.set()
        if self._slots is not None:
            self._slots.release()

    async def get(self) -> EncodedPacket | None:
        """The next packet; ``None`` at the end or after :meth:`close`; raises a failure."""
        while not self._closed:
            if self._buffer:
                packet = self._buffer.popleft()
                if self._slots is not None:
                    self._slots.release()
                return packet
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        return None


class ThreadedSource:
    """Common shell of camera sources that produce packets on one worker thread.

    Subclasses implement :meth:`_work` (the thread's body) and hand packets
    over with :meth:`_emit`. The thread starts on the first :meth:`packets`
    call and is named ``"<kind>-camera:<id>"``; packets are meant for one
    consumer (the agent's capture fan-out).
    """

    _kind = "camera"

    def __init__(self, camera_id: str, *, max_buffered_s: float, lossless: bool = False) -> None:
        self._id = camera_id
        self._max_buffered_s = max_buffered_s
        self._queue = self._new_queue(lossless)
        self._info: StreamInfo | None = None
        #: What :attr:`info` says before the first packet; subclasses fill in what they know.
        self._initial_info = StreamInfo("h264", 0, 0, 0.0, b"")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lossless = lossless
        #: Packets held on the worker thread (its own; see "Hand-off latency").
        self._held: list[EncodedPacket] = []
        self._held_info: StreamInfo | None = None
        self._held_lock = threading.Lock()
        self._handoff_ns = 0

    def _new_queue(self, lossless: bool) -> PacketQueue:
        return PacketQueue(self._describe(), max_buffered_s=self._max_buffered_s, lossless=lossless)

    def _describe(self) -> str:
        """How log lines and errors name this camera (never with credentials)."""
        return f"{self._kind} camera {self._id!r}"

    def _redact(self, text: str) -> str:
        """``text`` with anything secret removed (a URL's password); identity here."""
        return text

    @property
    def camera_id(self) -> str:
        """The camera's id, as given."""
        return self._id

    @property
    def info(self) -> StreamInfo:
        """Codec, size, rate and SPS+PPS (Annex-B) of the stream; never raises.

        Valid once the first packet was yielded (an IP camera's description
        comes with its stream). Before that: what the arguments say (size and
        rate, 0 where unknown) with ``extradata=b""``; a runtime
        ``isinstance(x, CameraSource)`` check reads this property.
        """
        return self._info or self._initial_info

    @property
    def packets_dropped(self) -> int:
        """Packets discarded because the consumer fell more than the buffer behind."""
        return self._queue.dropped

    def set_handoff(self, seconds: float) -> None:
        """Hand packets over in batches of up to ``seconds`` of video; ``0``: each at once.

        Called on the loop; the worker applies it from its next packet on. A
        lossless source (a file replayed as fast as possible) ignores it; a batch
        never spans more than half the queue's ``max_buffered_s`` (or it would
        arrive already too old to keep).
        """
        if seconds < 0:
            raise ValueError(f"hand-off latency must be >= 0, not {seconds}")
        hold_ns = min(round(seconds * 1e9), self._queue.max_ns // 2)
        self._handoff_ns = 0 if self._lossless else hold_ns

    def force_keyframe(self) -> bool:
        """Ask for an IDR as soon as possible; ``False``: this source cannot.

        A pass-through source (a file, an IP camera) has no encoder to ask,
        so this is a no-op there; the next keyframe comes on the camera's own
        cadence.
        """
        return False

    async def packets(self) -> AsyncGenerator[EncodedPacket, None]:
        """Yield packets until :meth:`aclose` (or the end of a finite source).

        Raises a :class:`~hardware.errors.CameraError` subclass when the
        source fails for good.
        """
        if self._closed:
            raise CameraError(f"{self._describe()} is closed")
        if self._thread is not None and self._queue.failed:
            # The worker failed (its error was raised to the last caller): a new try gets
            # a new worker, or a camera busy at boot would stay in fault until a restart.
            await asyncio.to_thread(self._thread.join)  # it ends once it said why
            self._thread = None
            self._queue = self._new_queue(self._lossless)
            self._held, self._held_info = [], None
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._thread_main,
                args=(asyncio.get_running_loop(),),
                name=f"{self._kind}-camera:{self._id}",
                daemon=True,  # a forgotten aclose() must not hang interpreter exit
            )
            self._thread.start()
        while (packet := await self._queue.get()) is not None:
            yield packet

    async def aclose(self) -> None:
        """Stop the worker thread and wait for it (off the loop). Idempotent."""
        self._closed = True
        self._stop.set()
        self._queue.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the worker thread ---

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        """The worker thread's body; returns when ``self._stop`` is set or the source ends."""
        raise NotImplementedError

    def _thread_main(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._work(loop)
        except Exception as exc:  # any failure must reach the consumer, not die here
            trace = "".join(traceback.format_exception(exc))
            _log.error("%s: worker failed\n%s", self._describe(), self._redact(trace))
            error = CameraError(f"{self._describe()}: {self._redact(repr(exc))}")
            self._post(loop, self._queue.fail, error)

    def _post(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop; the only way the thread talks to it.

        Held packets go first, so the loop sees everything in the worker's order.
        """
        with self._held_lock:
            if self._held:
                self._flush(loop, None)
            self._call(loop, fn, *args)

    def _call(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            # The loop is closed: nobody is left to receive packets.
            self._stop.set()

    def _emit(
        self, loop: asyncio.AbstractEventLoop, packet: EncodedPacket, info: StreamInfo | None
    ) -> None:
        """Hand ``packet`` over; ``info`` (if given) becomes :attr:`info` as it is queued."""
        self._queue.take_slot()
        if self._stop.is_set():
            return
        with self._held_lock:  # picamera2 emits on its encoder thread, failures on ours
            held, hold_ns = self._held, self._handoff_ns
            if hold_ns and (not held or packet.mono_ns - held[0].mono_ns < hold_ns):
                held.append(packet)
                if info is not None:
                    self._held_info = info
            elif held:
                held.append(packet)
                self._flush(loop, info)
            else:
                self._call(loop, self._accept, packet, info)

    def _flush(self, loop: asyncio.AbstractEventLoop, info: StreamInfo | None) -> None:
        """Hand the held packets over (with ``_held_lock``); ``info`` if new, else the held."""
        held, info = self._held, info if info is not None else self._held_info
        self._held, self._held_info = [], None
        self._call(loop, self._accept_many, held, info)

    def _accept(self, packet: EncodedPacket, info: StreamInfo | None) -> None:
        if info is not None:
            self._info = info
        self._queue.put(packet)

    def _accept_many(self, packets: list[EncodedPacket], info: StreamInfo | None) -> None:
        if info is not None:
            self._info = info
        self._queue.put_many(packets)
