"""What one client may hold of the receiver: sizes, times and rates.

Every bound is a field of :class:`ServerLimits` (HTTP and TLS), applied by
:mod:`receiver.server` (the application's ``handler_args`` and
:func:`guard_middleware`) and :mod:`receiver.listener` (the TLS listener).
What each one stops:

- a TLS handshake that never finishes: cut after ``tls_handshake_s``;
- request headers sent a byte at a time (slowloris): aiohttp's
  ``keepalive_timeout`` runs from the end of the handshake, and from the end of
  each response, until the next request's headers are whole; it is
  ``header_s``, so slow headers are cut then (it is also how long an idle
  keep-alive connection stays open);
- a body announced and not sent: 408 ``body_timeout`` after ``body_s``, and
  the connection closes;
- a body over ``max_body`` bytes, declared in ``Content-Length``: 413
  ``too_large`` before a byte of it is read; a body without a length
  (chunked): 411 ``length_required``. The connection is then closed without
  reading the rest (aiohttp's ``lingering_time`` is 0: a refused upload is
  not drained);
- a request line or header over ``max_line``/``max_field`` bytes, or more than
  ``max_headers`` headers: 431 ``headers_too_large`` (:mod:`receiver.listener`);
- connections: at most ``max_connections`` at once, ``max_per_address`` from one
  address (an IPv6 /64 counts as one), counted from the TCP accept (handshakes in
  progress count). At a cap a new connection takes the slot of one that has not
  proven itself (TLS handshake or first request not done), else of one idle after
  a request; it is refused only when the cap is held by busy connections
  (:mod:`receiver.listener`).

Every error the application or aiohttp raises is answered as JSON ``{"error":
CODE, "detail": ...}`` with a stable CODE (:data:`CODES`); so is an exception a
handler did not expect: 500 ``internal_error``, whose detail says nothing of
the cause (the traceback goes to the log, once a minute per kind of failure
and route). Refusals are logged once a minute per client address with a count
(:class:`LogThrottle`), never once per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Handler, Middleware

from agent.lan_guard import BodyTimeoutError, LogThrottle
from receiver.errors import InvalidSettingError

__all__ = [
    "CODES",
    "BodyTimeoutError",
    "LogThrottle",
    "Rate",
    "ServerLimits",
    "TokenBucket",
    "error_body",
    "guard_middleware",
]

log = logging.getLogger(__name__)

#: The stable ``error`` code of each HTTP status the receiver answers with.
CODES: Final = {
    400: "malformed",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "body_timeout",
    411: "length_required",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    503: "busy",
}
_HEADERS: Final = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
#: File descriptors kept for everything but client connections (recordings, databases).
_FD_SHARE: Final = 2


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The receiver's HTTP and TLS bounds (module docstring: what each one stops)."""

    tls_handshake_s: float = 10.0
    #: How long closing a TLS connection may wait for a peer that does not read.
    tls_shutdown_s: float = 5.0
    #: Request headers whole within this after the handshake or the previous response.
    header_s: float = 15.0
    #: A request body whole within this after its headers.
    body_s: float = 30.0
    max_body: int = 64 * 1024
    max_line: int = 8190
    max_field: int = 8190
    max_headers: int = 64
    #: Connections at once (at most half the process's file descriptor limit).
    max_connections: int = 2048
    #: Connections from one address (an IPv6 /64: ``agent.connection_slots.address_group``).
    max_per_address: int = 256

    def __post_init__(self) -> None:
        for name in ("tls_handshake_s", "tls_shutdown_s", "header_s", "body_s"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise InvalidSettingError(f"{name}: expected 0 < seconds <= 3600, got {value!r}")
        for name in ("max_body", "max_line", "max_field", "max_headers"):
            if getattr(self, name) < 1:
                raise InvalidSettingError(f"{name}: must be at least 1")
        if not 1 <= self.max_per_address <= self.max_connections:
            raise InvalidSettingError(
                "max_per_address: expected 1 <= max_per_address <= max_connections"
            )

    def handler_args(self) -> dict[str, Any]:
        """aiohttp ``RequestHandler`` settings (``web.Application(handler_args=...)``)."""
        return {
            "keepalive_timeout": self.header_s,
            "lingering_time": 0.0,
            "max_line_size": self.max_line,
            "max_field_size": self.max_field,
            "max_headers": self.max_headers,
        }

    def connection_cap(self) -> int:
        """``max_connections``, lowered to half the process's open-file limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft // _FD_SHARE))


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's refill rate and size: ``burst`` at once, ``per_s`` sustained."""

    per_s: float
    burst: int


class TokenBucket:
    """A token bucket over a clock the caller passes in (seconds, monotonic)."""

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self._tokens = float(rate.burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        elapsed = max(0.0, now - self._at)
        self._tokens = min(float(self.rate.burst), self._tokens + elapsed * self.rate.per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def error_body(status: int, code: str | None, detail: str) -> str:
    """The JSON text of an error answer."""
    return json.dumps({"error": code or CODES.get(status, f"http_{status}"), "detail": detail})


def _answer(status: int, code: str | None, detail: str, *, close: bool = False) -> web.Response:
    resp = web.Response(
        status=status,
        text=error_body(status, code, detail),
        content_type="application/json",
        headers=_HEADERS,
    )
    if close:
        resp.force_close()
    return resp


def _as_json(exc: web.HTTPException) -> web.Response:
    """aiohttp's own error (404, 405, 413 ...) as our JSON, its headers (``Allow``) kept."""
    detail = exc.reason if exc.text is None or exc.text.startswith(f"{exc.status}:") else exc.text
    resp = _answer(exc.status, None, detail[:200])
    for name, value in exc.headers.items():
        if name.lower() not in ("content-type", "content-length"):
            resp.headers[name] = value
    return resp


_refusals = LogThrottle(log)
_failures = LogThrottle(log)


def _body_late(content: StreamReader, limit_s: float) -> None:
    if not content.is_eof():
        content.set_exception(BodyTimeoutError(f"request body not whole within {limit_s} s"))


def guard_middleware(limits: ServerLimits) -> Middleware:
    """The outermost middleware: body size and time bounds, and every error as JSON."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        remote = request.remote or "?"
        deadline: asyncio.TimerHandle | None = None
        if request.body_exists:
            length = request.content_length
            if length is None:
                _refusals.log(logging.INFO, ("chunked", remote), "%s sent a chunked body", remote)
                return _answer(411, None, "send a Content-Length (no chunked bodies)", close=True)
            if length > limits.max_body:
                _refusals.log(
                    logging.WARNING, ("too_large", remote),
                    "refused a %d-byte request body from %s", length, remote,
                )  # fmt: skip
                return _answer(
                    413, None, f"a request body is at most {limits.max_body} bytes", close=True
                )
            if not request.content.is_eof():
                deadline = asyncio.get_running_loop().call_later(
                    limits.body_s, _body_late, request.content, limits.body_s
                )
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400 or exc.content_type == "application/json":
                raise
            return _as_json(exc)
        except BodyTimeoutError as exc:
            _refusals.log(logging.WARNING, ("body", remote), "%s from %s: cut", exc, remote)
            return _answer(408, None, str(exc), close=True)
        except Exception as exc:
            if isinstance(exc, ConnectionError) or request.writer.output_size > 0:
                raise  # the client is gone, or an answer has begun: aiohttp ends the connection
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "?"
            _failures.log(
                logging.ERROR, (type(exc).__name__, route),
                "%s %s from %s failed: %s", request.method, route, remote, type(exc).__name__,
                exc_info=exc,
            )  # fmt: skip
            return _answer(500, None, "the receiver could not answer this request")
        finally:
            if deadline is not None:
                deadline.cancel()

    return guard
