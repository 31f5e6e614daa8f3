"""What the Local API bears from the school LAN: connections, time, bodies.

Any host on the LAN is untrusted, and nothing it sends may take from the agent
what the buttons, the store and the uplink need (:class:`ApiLimits`; the
reasons are in :mod:`agent.local_api`'s docstring). :class:`GuardedSite`
accepts connections itself and counts them from the TCP accept (per address
group, an IPv6 /64, and in all: :class:`agent.connection_slots.ConnectionSlots`),
and gives each TLS
handshake a timeout. At a cap, a connection that has not proven itself (its
TLS handshake or its first request not done), or else one idle after a request,
is cut to make room for the new one: idle connections that a few addresses keep
re-opening cannot lock others out. Only a cap held by busy connections (a request
being served, a WebSocket) refuses the new one, with a reset. :func:`read_body`
reads a body whole, never past its limit. The receiver's listener
(``receiver/listener.py``) is this :class:`GuardedSite`, and takes
:class:`LogThrottle` and :class:`BodyTimeoutError` from here (the agent imports
nothing of the receiver).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import resource
import socket
import ssl
import struct
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from agent.connection_slots import ConnectionSlots, Slot

__all__ = [
    "DEFAULT_LIMITS",
    "ApiLimits",
    "BodyTimeoutError",
    "GuardedSite",
    "LogThrottle",
    "RequestErrorLog",
    "SiteLimits",
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
#: Marks an application's request handler that tells connection slots of its requests.
_TRACKING: Final = "_breakglass_tracks_slots"

_RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


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


class _SlotProtocol(asyncio.Protocol):
    """Wraps a connection's protocol: tells its :class:`Slot` when the TLS handshake is
    done, and gives the slot back when the connection ends. A connection evicted while
    its handshake completed is aborted here, its protocol never told."""

    def __init__(self, inner: asyncio.Protocol, site: GuardedSite, slot: Slot) -> None:
        self.inner = inner
        self.site = site
        self.slot = slot
        self._made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.slot.transport = cast(asyncio.Transport, transport)  # the TLS transport
        if self.slot.freed:  # evicted while its handshake was completing
            _abort(self.slot)
            return
        self._made = True
        self.site.slots.tls_done(self.slot)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._made:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self._made else None

    def pause_writing(self) -> None:
        if self._made:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._made:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if self._made:
                self.inner.connection_lost(exc)
        finally:
            self.site.slots.free(self.slot)

    def request_began(self, request: web.BaseRequest) -> None:
        """A request's headers are in: busy once its body is whole, idle once answered
        (when the task aiohttp runs it in ends: the answer written, a WebSocket closed)."""
        slots, slot = self.site.slots, self.slot
        content = request.content
        number = slots.request_began(slot, whole=content.is_eof())
        if not content.is_eof():
            content.on_eof(lambda: slots.body_whole(slot, number))
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _: slots.request_ended(slot, number))


def _track_requests(handler: _RequestHandler) -> _RequestHandler:
    """``handler`` telling each request's connection slot when it begins."""

    async def tracked(request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        protocol = transport.get_protocol() if transport is not None else None
        if isinstance(protocol, _SlotProtocol):
            protocol.request_began(request)
        return await handler(request)

    setattr(tracked, _TRACKING, True)
    return tracked


def _abort(slot: Slot) -> None:
    """Close an evicted connection now, with a reset (its slot is already free)."""
    if slot.conn is not None:
        with contextlib.suppress(OSError):  # the peer may be gone already
            slot.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    if slot.transport is not None:
        slot.transport.abort()
    elif slot.task is not None:
        slot.task.cancel()  # the handshake's transport closes; one not begun: _handshake_ended


class SiteLimits(Protocol):
    """What :class:`GuardedSite` takes of :class:`ApiLimits` (and of the receiver's)."""

    @property
    def tls_handshake_s(self) -> float: ...
    @property
    def tls_shutdown_s(self) -> float: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def max_per_address(self) -> int: ...
    def connection_cap(self) -> int: ...


class GuardedSite(web.BaseSite):
    """Serves ``runner`` over TLS on a bound socket, within ``limits``.

    aiohttp's ``SockSite`` lets ``loop.create_server`` accept every connection and
    gives each TLS handshake 60 s: idle connections could use up the process's file
    descriptors. This site accepts itself and counts connections from the accept on
    (:class:`ConnectionSlots`: per :func:`address_group` and in all), runs the
    handshake with ``ssl_handshake_timeout``, and at a cap makes room by cutting (with
    a reset) a connection that has not proven itself, or one idle after a request;
    one over a cap held only by busy connections is closed at once with a reset.
    Cuts and refusals are logged once a minute per address group, with a count. The
    receiver's listener (``receiver/listener.py``) is this site with JSON parse errors.
    """

    #: What the site is, in task names and accept errors.
    what = "local API"
    #: How its log lines begin.
    log_prefix = "local API: "

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext,
        limits: SiteLimits,
        backlog: int = 128,
        logger: logging.Logger = log,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._sock = sock
        self._tls = ssl_context
        self._app_runner = runner
        self.limits = limits
        #: The connection cap in force (``max_connections`` within the file limit).
        self.cap = limits.connection_cap()
        self.slots = ConnectionSlots(self.cap, limits.max_per_address)
        #: Connections refused (a cap held by busy connections only), by cap
        #: (``per_address``, ``total``).
        self.refused: Counter[str] = Counter()
        #: Connections cut to make room for a new one, by cap (``per_address``, ``total``).
        self.evicted: Counter[str] = Counter()
        #: TLS handshakes that failed or timed out.
        self.handshakes_failed = 0
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self.log = logger
        self._throttle = LogThrottle(logger, REFUSALS_LOG_S, max_keys=1024)

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    @property
    def open_connections(self) -> int:
        """Connections held now (handshakes under way included)."""
        return self.slots.open

    def connections_from(self, host: str) -> int:
        """Connections held now from ``host``'s group (its /64 for IPv6), handshakes
        under way included."""
        return self.slots.held_by(host)

    def make_handler(self, server: web.Server, loop: asyncio.AbstractEventLoop) -> asyncio.Protocol:
        """The protocol serving one connection (after its TLS handshake)."""
        return server()

    async def start(self) -> None:
        """Listen and accept (registers with the runner: its cleanup stops the site)."""
        await super().start()
        server = self._app_runner.server
        assert server is not None  # the runner was set up before its site started
        if not getattr(server.request_handler, _TRACKING, False):
            server.request_handler = _track_requests(server.request_handler)
        self._sock.setblocking(False)
        self._sock.listen(self._backlog)
        self._accepting = asyncio.create_task(self._accept(), name=f"{self.what} accept")
        self._accepting.add_done_callback(self._accept_ended)

    async def stop(self) -> None:
        """Stop accepting and drop handshakes under way; the runner ends the rest."""
        tasks = [t for t in (self._accepting, *self._handshakes) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sock.close()
        await super().stop()

    def _accept_ended(self, task: asyncio.Task[None]) -> None:
        """Say so loudly if accepting ended otherwise than by the site stopping."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.critical("the %s stopped accepting connections: %r", self.what, exc)

    def _cap_reached(self, reason: str, host: str) -> str:
        if reason == "per_address":
            group = self.slots.group(host)
            whose = "it" if group == host else group
            return f"{self.slots.per_group} connections from {whose} already"
        return f"{self.cap} connections open in all"

    async def _accept(self) -> None:
        while True:
            conn, host = await accept_next(self._sock, self._throttle, self.what)
            slot, victim, reason = self.slots.admit(host)
            if slot is None:
                assert reason is not None
                self.refused[reason] += 1
                self._throttle.log(
                    logging.WARNING, ("refused", self.slots.group(host)),
                    "%srefused a connection from %s: %s (all in use)",
                    self.log_prefix, host, self._cap_reached(reason, host),
                )  # fmt: skip
                # A reset, not a FIN: nothing of ours lingers in TIME_WAIT for it.
                with contextlib.suppress(OSError):  # the peer may be gone already
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                conn.close()
                continue
            slot.conn = conn
            task = asyncio.create_task(self._handshake(slot), name=f"TLS from {host}")
            slot.task = task
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)
            task.add_done_callback(functools.partial(self._handshake_ended, slot))
            if victim is not None:
                assert reason is not None
                self.evicted[reason] += 1
                self._throttle.log(
                    logging.WARNING, ("evicted", victim.group),
                    "%scut a connection from %s (%s, open %.1f s) for one from %s: %s",
                    self.log_prefix, victim.host, victim.stage.value,
                    self.slots.clock() - victim.opened, host, self._cap_reached(reason, host),
                )  # fmt: skip
                _abort(victim)
                await asyncio.sleep(0)  # let its close run before the next accept

    async def _handshake(self, slot: Slot) -> None:
        slot.started = True
        assert slot.conn is not None
        server = self._app_runner.server
        assert server is not None  # the runner was set up before its site started
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return _SlotProtocol(self.make_handler(server, loop), self, slot)

        try:
            await loop.connect_accepted_socket(
                protocol,
                slot.conn,
                ssl=self._tls,
                ssl_handshake_timeout=self.limits.tls_handshake_s,
                ssl_shutdown_timeout=self.limits.tls_shutdown_s,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # A scanner, or a client that gave up: the transport closes the socket.
            _close_unwrapped(slot)
            if self.slots.free(slot):  # not evicted meanwhile
                self.handshakes_failed += 1
                self._throttle.log(
                    logging.INFO, ("handshake", slot.group),
                    "%sTLS handshake from %s failed: %s", self.log_prefix, slot.host, exc,
                )  # fmt: skip
        except BaseException:  # evicted (cancelled), or the site stopping
            _close_unwrapped(slot)
            self.slots.free(slot)
            raise

    def _handshake_ended(self, slot: Slot, task: asyncio.Task[None]) -> None:
        """A handshake task cancelled before it began (evicted, or the site stopping)
        made no transport to close its socket: free its slot and close it here."""
        if not slot.started:
            self.slots.free(slot)
            if slot.conn is not None:
                slot.conn.close()


def _close_unwrapped(slot: Slot) -> None:
    """Close the socket of a connection whose TLS handshake failed or was cancelled, in
    case no transport was made for it. One whose transport was made stopped watching
    the socket as it failed, and closes it itself; one whose handshake completed (its
    TLS transport known) may be closing gracefully: left to its transport."""
    if slot.transport is None and slot.conn is not None:
        slot.conn.close()


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
