"""The receiver's TLS listener: a bounded number of connections, each bounded in time.

aiohttp's ``SockSite`` hands its socket to ``loop.create_server``, which accepts
every connection and gives each TLS handshake 60 seconds. :class:`GuardedSite`
is the agent's :class:`agent.lan_guard.GuardedSite` (one implementation for
both): an aiohttp site (``web.BaseSite``, so ``AppRunner.cleanup`` stops it)
that accepts itself and counts connections from the TCP accept on, per address
group (an IPv4 address, an IPv6 /64) and in all, within :class:`ServerLimits`'
``max_per_address`` and connection cap. At a cap the new connection takes the
slot of one that has not proven itself (TLS handshake or first request not
done; in the new one's group at the per-address cap, else the oldest of the
group holding the most of them), or else of one idle after a request: it is cut
with a reset. Only a cap held by busy connections (a request being served, an
uplink or live-view WebSocket) refuses the new one, with a reset. Cuts and
refusals are logged once a minute per address group, with a count. The TLS
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
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from yarl import URL

from agent import lan_guard
from receiver.limits import LogThrottle, ServerLimits, error_body

__all__ = ["GuardedSite"]

log = logging.getLogger(__name__)

_TOO_MANY_HEADERS: Final = "Too many headers"


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


class GuardedSite(lan_guard.GuardedSite):
    """Serve ``runner`` over TLS on a bound socket, within ``limits``.

    ``handler_args`` must be what the application was given as ``handler_args``
    (the site makes the connection handlers itself, to answer parse errors in JSON).
    """

    what = "receiver"
    log_prefix = ""

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
        super().__init__(
            runner, sock, ssl_context=ssl_context, limits=limits, backlog=backlog, logger=log
        )
        self._handler_args = dict(handler_args)

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return str(URL.build(scheme="https", host=host, port=port))

    def make_handler(self, server: web.Server, loop: asyncio.AbstractEventLoop) -> asyncio.Protocol:
        return _Handler(server, loop=loop, **self._handler_args)

    async def start(self) -> None:
        """Listen and accept (registers with the runner: its cleanup stops the site)."""
        await super().start()
        if self.cap < self.limits.max_connections:
            log.warning(
                "at most %d connections at once (half the open-file limit), not %d",
                self.cap, self.limits.max_connections,
            )  # fmt: skip
