"""The receiver's TLS listener: a bounded number of connections, each bounded in time.

aiohttp's ``SockSite`` hands its socket to ``loop.create_server``, which accepts
every connection and gives each TLS handshake 60 seconds. :class:`GuardedSite`
is an aiohttp site (``web.BaseSite``, so ``AppRunner.cleanup`` stops it) that
accepts itself: it counts connections from the TCP accept on, per client
address and in all, and refuses one over :class:`ServerLimits`'
``max_per_address`` or its connection cap by closing it at once (a reset; the
refusals are logged once a minute per address, with a count). The TLS
handshake runs in ``loop.connect_accepted_socket`` with
``ssl_handshake_timeout`` and ``ssl_shutdown_timeout``: a client that never
finishes its handshake is cut after ``tls_handshake_s``, and closing a
connection to a peer that does not read gives up after ``tls_shutdown_s``.

Requests the HTTP parser refuses (a request line or header too long, too many
headers, not HTTP) are answered in JSON like every other error (431
``headers_too_large``, 400 ``malformed``) and logged once a minute per address,
not with a traceback per request as aiohttp's handler does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from yarl import URL

from agent.lan_guard import CountedProtocol, accept_next
from receiver.limits import LogThrottle, ServerLimits, error_body

__all__ = ["GuardedSite"]

log = logging.getLogger(__name__)

_TOO_MANY_HEADERS: Final = "Too many headers"
#: ``struct linger`` on, 0 s: close with a reset.
_RESET: Final = struct.pack("ii", 1, 0)


def _accept_ended(task: asyncio.Task[None]) -> None:
    """Say so loudly if accepting ended otherwise than by the site stopping."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.critical("the receiver stopped accepting connections: %r", exc)


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, answering what it cannot parse in JSON."""

    throttle = LogThrottle(log)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, BadHttpMessage):
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong) or _TOO_MANY_HEADERS in str(exc):
            status, code = 431, "headers_too_large"
            detail = "a request line or header too long, or too many headers"
        else:
            status, code, detail = 400, "malformed", "not a valid HTTP request"
        remote = request.remote or "?"
        self.throttle.log(
            logging.INFO, (code, remote), "refused a request from %s: %s", remote, str(exc)[:120]
        )
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already")
        resp = web.Response(
            status=status, text=error_body(status, code, detail), content_type="application/json"
        )
        resp.force_close()
        return resp


class GuardedSite(web.BaseSite):
    """Serve ``runner`` over TLS on a bound socket, within ``limits``.

    ``handler_args`` must be what the application was given as ``handler_args``
    (the site makes the connection handlers itself, to answer parse errors in JSON).
    """

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext,
        limits: ServerLimits,
        handler_args: Mapping[str, Any],
        backlog: int = 512,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._sock = sock
        self._tls = ssl_context
        self._app_runner = runner
        self.limits = limits
        self._handler_args = dict(handler_args)
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
        self._throttle = LogThrottle(log)

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return str(URL.build(scheme="https", host=host, port=port))

    @property
    def open_connections(self) -> int:
        """Connections held now (handshakes in progress included)."""
        return self._open

    async def start(self) -> None:
        """Listen and accept (registers with the runner: its cleanup stops the site)."""
        await super().start()
        self._sock.setblocking(False)
        self._sock.listen(self._backlog)
        self._accepting = asyncio.create_task(self._accept(), name="receiver accept")
        self._accepting.add_done_callback(_accept_ended)
        if self.cap < self.limits.max_connections:
            log.warning(
                "at most %d connections at once (half the open-file limit), not %d",
                self.cap, self.limits.max_connections,
            )  # fmt: skip

    async def stop(self) -> None:
        """Stop accepting and drop handshakes in progress; the runner ends the rest."""
        tasks = [t for t in (self._accepting, *self._handshakes) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sock.close()
        await super().stop()

    async def _accept(self) -> None:
        while True:
            conn, host = await accept_next(self._sock, self._throttle, "receiver")
            refusal = self._refusal(host)
            if refusal is not None:
                self.refused[refusal[0]] += 1
                self._throttle.log(
                    logging.WARNING, ("refused", host),
                    "refused a connection from %s: %s", host, refusal[1],
                )  # fmt: skip
                # A reset, not a FIN: nothing of ours lingers in TIME_WAIT for it.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                conn.close()
                continue
            self._open += 1
            self._per_address[host] += 1
            task = asyncio.create_task(self._handshake(conn, host), name=f"tls from {host}")
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def connections_from(self, host: str) -> int:
        """Connections held now from ``host`` (handshakes in progress included)."""
        return self._per_address.get(host, 0)

    def _refusal(self, host: str) -> tuple[str, str] | None:
        """Why a connection from ``host`` is refused now: (reason, description), or None."""
        if self._per_address[host] >= self.limits.max_per_address:
            return "per_address", f"{self.limits.max_per_address} connections from it already"
        if self._open >= self.cap:
            return "total", f"{self.cap} connections open in all"
        return None

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

        def protocol() -> asyncio.Protocol:
            return CountedProtocol(_Handler(server, loop=loop, **self._handler_args), release)

        try:
            await loop.connect_accepted_socket(
                protocol,
                conn,
                ssl=self._tls,
                ssl_handshake_timeout=self.limits.tls_handshake_s,
                ssl_shutdown_timeout=self.limits.tls_shutdown_s,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # The transport closed the socket; a scanner or a client that gave up.
            release()
            self.handshakes_failed += 1
            self._throttle.log(
                logging.INFO, ("handshake", host), "TLS handshake from %s failed: %s", host, exc
            )
        except BaseException:
            release()
            raise
