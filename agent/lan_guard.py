"""What the Local API bears from the school LAN: connections, time, bodies.

Any host on the LAN is untrusted, and nothing it sends may take from the agent
what the buttons, the store and the uplink need (:class:`ApiLimits`; the
reasons are in :mod:`agent.local_api`'s docstring). :class:`GuardedSite`
accepts connections itself and counts them from the TCP accept (per address
and in all), resetting one over the limits at once, and gives each TLS
handshake a timeout; :func:`read_body` reads a body whole, never past its
limit. The same design as the receiver's listener (``receiver/listener.py``),
which takes :class:`LogThrottle`, :class:`CountedProtocol` and
:class:`BodyTimeoutError` from here (the agent imports nothing of the receiver).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
import struct
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

__all__ = [
    "DEFAULT_LIMITS",
    "ApiLimits",
    "BodyTimeoutError",
    "CountedProtocol",
    "GuardedSite",
    "LogThrottle",
    "RequestErrorLog",
    "accept_next",
    "body_late",
    "read_body",
    "too_large",
]

log = logging.getLogger("agent.local_api")

#: Connections take at most this share (1/N) of the process's open-file limit.
FD_SHARE: Final = 4
#: How long to wait before accepting again when the process is out of file descriptors.
ACCEPT_RETRY_S: Final = 0.5
#: Refused connections (and cut ones) are logged at most once a minute per address.
REFUSALS_LOG_S: Final = 60.0
#: ``struct linger`` on, 0 s: close with a reset (nothing left in TIME_WAIT for it).
_RESET: Final = struct.pack("ii", 1, 0)
#: accept(2) errors that say the process is out of something: retry after a pause.
_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept(2) errors that say the listening socket itself is gone (the site stops).
_LISTENER_GONE: Final = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """What LAN clients may hold of the agent (the module docstring says what each stops)."""

    tls_handshake_s: float = 10.0
    #: How long closing a TLS connection may wait for a peer that does not read.
    tls_shutdown_s: float = 5.0
    #: Request headers whole within this after the handshake or the previous answer
    #: (aiohttp's keep-alive timeout: also how long an idle connection stays open).
    header_s: float = 10.0
    #: A request body whole within this after its headers.
    body_s: float = 10.0
    #: Connections at once (at most a quarter of the open-file limit: :meth:`connection_cap`).
    max_connections: int = 128
    max_per_address: int = 32

    def __post_init__(self) -> None:
        for name in ("tls_handshake_s", "tls_shutdown_s", "header_s", "body_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name}: expected 0 < seconds <= 3600")
        if not 1 <= self.max_per_address <= self.max_connections:
            raise ValueError("expected 1 <= max_per_address <= max_connections")

    def handler_args(self) -> dict[str, Any]:
        """aiohttp ``RequestHandler`` settings (``web.Application(handler_args=...)``):
        a refused body is not drained (``lingering_time``)."""
        return {"keepalive_timeout": self.header_s, "lingering_time": 0.0}

    def connection_cap(self) -> int:
        """``max_connections``, lowered to a quarter of the process's open-file limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft // FD_SHARE))


#: The limits a :class:`LocalApi` applies unless given others.
DEFAULT_LIMITS = ApiLimits()


class BodyTimeoutError(Exception):
    """The request body did not arrive whole in time (set on the body's stream)."""


class LogThrottle:
    """Log one kind of event once per ``every_s`` per key; the next line counts the rest."""

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float = 60.0,
        *,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self.max_keys = max_keys
        self.clock = clock
        self._seen: OrderedDict[object, tuple[float, int]] = OrderedDict()

    def log(
        self,
        level: int,
        key: object,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Log ``msg`` (with ``exc_info``'s traceback) unless ``key`` was logged less than
        ``every_s`` ago; whether it was."""
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            msg += f" ({last[1]} more like it since the last report)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return True


class RequestErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger for aiohttp's request handlers (``AppRunner(..., logger=)``).

    aiohttp logs a request it cannot parse (a bad header, a line too long: anything
    on the LAN can send them) as an error with a traceback, each time. Those are the
    client's, not ours: one line without a traceback, at most once a minute per
    address, with a count of the rest. A failure in our own handlers keeps its
    traceback.
    """

    def __init__(self, logger: logging.Logger, every_s: float = REFUSALS_LOG_S) -> None:
        super().__init__(logger, {})
        self._throttle = LogThrottle(logger, every_s, max_keys=1024)

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            self._throttle.log(
                logging.WARNING,
                ("bad request", args[0] if args else None),
                f"{msg}: %s",
                *args,
                f"{type(exc).__name__}: {exc}"[:300],
            )
        else:
            self.logger.exception(msg, *args, exc_info=exc_info, **kw)


class CountedProtocol(asyncio.Protocol):
    """Wraps a connection's protocol to give its slot back when the connection ends."""

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]) -> None:
        self.inner = inner
        self.release = release

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.release()


class GuardedSite(web.BaseSite):
    """Serves ``runner`` over TLS on a bound socket, within ``limits``.

    aiohttp's ``SockSite`` lets ``loop.create_server`` accept every connection and
    gives each TLS handshake 60 s: idle connections from the LAN could use up the
    process's file descriptors. This site accepts itself, counts connections from
    the accept on (per address and in all), closes one over the limits at once
    with a reset, and runs the handshake with ``ssl_handshake_timeout``. The same
    design as the receiver's listener (``receiver/listener.py``), for the agent.
    """

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext,
        limits: ApiLimits,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._sock = sock
        self._tls = ssl_context
        self._app_runner = runner
        self.limits = limits
        #: The connection cap in force (``max_connections`` within the file limit).
        self.cap = limits.connection_cap()
        self._per_address: Counter[str] = Counter()
        self._open = 0
        #: Connections refused, by reason (``per_address``, ``total``).
        self.refused: Counter[str] = Counter()
        #: TLS handshakes that failed or timed out.
        self.handshakes_failed = 0
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self._throttle = LogThrottle(log, REFUSALS_LOG_S, max_keys=1024)

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    @property
    def open_connections(self) -> int:
        """Connections held now (handshakes under way included)."""
        return self._open

    def connections_from(self, host: str) -> int:
        """Connections held now from ``host`` (handshakes under way included)."""
        return self._per_address.get(host, 0)

    async def start(self) -> None:
        """Listen and accept (registers with the runner: its cleanup stops the site)."""
        await super().start()
        self._sock.setblocking(False)
        self._sock.listen(self._backlog)
        self._accepting = asyncio.create_task(self._accept(), name="local API accept")
        self._accepting.add_done_callback(_accept_ended)

    async def stop(self) -> None:
        """Stop accepting and drop handshakes under way; the runner ends the rest."""
        tasks = [t for t in (self._accepting, *self._handshakes) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sock.close()
        await super().stop()

    async def _accept(self) -> None:
        while True:
            conn, host = await accept_next(self._sock, self._throttle, "local API")
            if self._per_address[host] >= self.limits.max_per_address:
                reason = "per_address"
            elif self._open >= self.cap:
                reason = "total"
            else:
                self._open += 1
                self._per_address[host] += 1
                task = asyncio.create_task(self._handshake(conn, host), name="local API TLS")
                self._handshakes.add(task)
                task.add_done_callback(self._handshakes.discard)
                continue
            self.refused[reason] += 1
            self._throttle.log(
                logging.WARNING, ("refused", host),
                "local API: refused a connection from %s (%s: %d from it, %d in all)",
                host, reason, self._per_address[host], self._open,
            )  # fmt: skip
            with contextlib.suppress(OSError):  # the peer may be gone already
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            conn.close()

    async def _handshake(self, conn: socket.socket, host: str) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open -= 1
                self._per_address[host] -= 1
                if self._per_address[host] <= 0:
                    del self._per_address[host]

        server = self._app_runner.server
        assert server is not None  # the runner was set up before its site started
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: CountedProtocol(server(), release),
                conn,
                ssl=self._tls,
                ssl_handshake_timeout=self.limits.tls_handshake_s,
                ssl_shutdown_timeout=self.limits.tls_shutdown_s,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # The transport closed the socket: a scanner, or a client that gave up.
            release()
            conn.close()
            self.handshakes_failed += 1
            self._throttle.log(
                logging.INFO, ("handshake", host),
                "local API: TLS handshake from %s failed: %s", host, exc,
            )  # fmt: skip
        except BaseException:
            release()
            conn.close()
            raise


async def accept_next(
    sock: socket.socket, throttle: LogThrottle, what: str
) -> tuple[socket.socket, str]:
    """The next connection on the listening ``sock`` and its peer's address.

    A connection that fails in accept(2) (ECONNABORTED, EPROTO, ...) is logged and
    skipped; out of descriptors, it waits :data:`ACCEPT_RETRY_S` (the kernel keeps the
    connection queued meanwhile) and tries again; a listener gone (the site stopping)
    raises. Logged through ``throttle``, prefixed with ``what``.
    """
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn, addr = await loop.sock_accept(sock)
        except OSError as exc:
            if exc.errno in _LISTENER_GONE:
                raise
            if exc.errno in _EXHAUSTED:
                throttle.log(
                    logging.ERROR, "accept", "%s: cannot accept connections: %s", what, exc
                )
                await asyncio.sleep(ACCEPT_RETRY_S)
            else:
                throttle.log(
                    logging.WARNING, "accept-one", "%s: a connection failed: %s", what, exc
                )
            continue
        return conn, str(addr[0]) if isinstance(addr, tuple) else "?"


def _accept_ended(task: asyncio.Task[None]) -> None:
    """Say so loudly if accepting ended otherwise than by the site stopping."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.critical("the local API stopped accepting connections: %r", exc)


def body_late(content: StreamReader, limit_s: float) -> None:
    if not content.is_eof():
        content.set_exception(BodyTimeoutError(f"request body not whole within {limit_s:g} s"))


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The request's whole body, or None when it is larger than ``limit`` bytes (by its
    ``Content-Length``, before a byte is read, or as it arrives: the rest is never read).

    ``StreamReader.read(n)`` answers what has arrived so far: a body split in transit
    would be cut short. This reads until the body's end."""
    length = request.content_length
    if length is not None and length > limit:
        return None
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def too_large(limit: int) -> web.Response:
    resp = web.json_response(
        {"error": "too_large", "detail": f"a request body here is at most {limit} bytes"},
        status=413,
    )
    resp.force_close()  # the rest of the body is not read
    return resp
