"""A TCP proxy on 127.0.0.1 that can cut or throttle the link, for fault tests.

``async with TcpProxy(target_port) as proxy:`` forwards every connection to
``127.0.0.1:target_port``. TLS passes through untouched (the agent's pin
still checks the receiver's certificate).

- ``proxy.cut()`` black-holes the link: nothing is forwarded in either
  direction and new connections hang (as when a router drops every packet);
  ``proxy.restore()`` forwards again, including what was held.
- ``proxy.rate = bytes_per_s`` throttles the agent -> receiver direction
  (the uplink) to that rate, shared by every connection as one link is;
  ``None`` (the default) lifts the limit.

Pacing is a token bucket on a virtual clock: each chunk read is scheduled to
leave when the link has carried everything before it at ``rate``, so sleeps
that overshoot (the event loop's granularity, a busy loop) do not add up: a
late chunk finds its successors' time already paid. An idle link earns at
most ``BURST`` bytes of credit (at 2 MB/s, 32 ms), so the rate over any
window of T seconds is at most ``rate + BURST / T``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from receiver.server import Receiver

CHUNK = 16 * 1024
#: A throttled link forwards at most this much of its time at once (and no less than
#: one Ethernet frame): a real link serialises packets, it does not deliver bursts.
SLICE_S = 0.01
MTU = 1500
#: Bytes of credit an idle throttled link may send at once (see the module docstring).
BURST = 64 * 1024


class TcpProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port."""

    def __init__(self, target_port: int, *, rate: float | None = None) -> None:
        self.target_port = target_port
        self._rate: float | None = None
        #: When the throttled link has sent everything scheduled so far (time.monotonic()).
        self._free_at = 0.0
        self.rate = rate
        self.port = 0
        self.bytes_up = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def rate(self) -> float | None:
        """The uplink's rate in bytes per second; ``None``: unthrottled."""
        return self._rate

    @rate.setter
    def rate(self, bytes_per_s: float | None) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"rate must be > 0 bytes/s or None, got {bytes_per_s}")
        self._rate = bytes_per_s
        self._free_at = time.monotonic()  # a new rate starts with neither credit nor debt

    @property
    def origin(self) -> str:
        """The ``wss://`` origin agents that connect through the proxy sign."""
        return f"wss://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Black-hole the link: forward nothing until :meth:`restore`."""
        self._open.clear()

    def restore(self) -> None:
        """Forward again."""
        self._open.set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self._open.set()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        await self._server.wait_closed()

    def _spawn(self, coro: object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._open.wait()  # a cut link lets no new connection through either
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        self._spawn(self._pump(reader, up_writer, upstream=True), "proxy-up")
        self._spawn(self._pump(up_reader, writer, upstream=False), "proxy-down")

    def _chunk(self, upstream: bool) -> int:
        if upstream and self._rate:
            return max(MTU, min(CHUNK, int(self._rate * SLICE_S)))
        return CHUNK

    async def _pace(self, size: int, rate: float) -> None:
        """Wait until the link has room for ``size`` more bytes at ``rate``."""
        now = time.monotonic()
        # An idle link starts sending now, with at most BURST bytes of credit.
        start = max(self._free_at, now - BURST / rate)
        self._free_at = done = start + size / rate
        if done > now:
            # pacing, not synchronisation: a slow link is slow
            await asyncio.sleep(done - now)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(self._chunk(upstream)):
                await self._open.wait()
                if upstream and self._rate:
                    await self._pace(len(data), self._rate)
                    await self._open.wait()  # cut while this chunk waited for the link
                writer.write(data)
                await writer.drain()
                if upstream:
                    self.bytes_up += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)


def via_proxy(config: Path, receiver: Receiver, proxy: TcpProxy) -> Path:
    """Point an agent config at the proxy; the receiver accepts the proxy's origin too
    (as a receiver behind a load balancer accepts its public name)."""
    receiver.ingest.origins.append(proxy.origin)
    config.write_text(config.read_text().replace(receiver.uplink_url, proxy.origin + "/v1/uplink"))
    return config
