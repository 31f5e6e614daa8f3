"""Pairing endpoints of the Local API: a technician proves the setup code (SPAKE2).

The device keeps its setup code in ``state/setup-code`` (mode 0600: the label
a technician reads on the device; made on first start and printed once on
the console, never logged). Pairing is open for ``[local_api]
pairing_window_s`` after start; every attempt counts against the window's
budget whether it is confirmed or not, because the device's answer lets the
caller test one guess. Budgets are per client address (an IPv6 /64) with a
slow pace after them and a global pace (:class:`provisioning.pairing.PairingWindow`):
a guesser slows itself down, never the technician at another address.

- ``POST /v1/pairing/start``   ``{"msg": b64url}`` -> ``{"attempt", "msg", "confirm"}``
- ``POST /v1/pairing/confirm`` ``{"attempt", "confirm"}`` -> ``{"session", "box": b64url}``:
  the device's identity (id, public key, Local API certificate pin, state)
  sealed under the key only the code could make. The technician compares the
  pin with the certificate its TLS connection saw: a proxy in the middle
  shows another.
- ``POST /v1/pairing/channel`` ``{"session", "box"}`` -> ``{"box"}``: a request
  sealed under the pairing key, answered sealed, for :data:`SESSION_S` after
  pairing: ``{"op": "enroll", "bundle": ...}`` installs an enrollment
  (:mod:`agent.enrollment_state`); ``{"op": "check", "camera": ID}`` returns a
  JPEG snapshot of one camera, within the limits of :mod:`agent.technician`
  (never during an emergency; interior cameras only at the first start after
  an enrollment; each camera once per 10 s and 3 times per session; audited
  durably before it is given). The answer is ``{"ok": ...}`` or ``{"error",
  "detail"}``, sealed. A box that does not open ends the session.

Errors are the Local API's ``{"error", "detail"}`` (``pairing_closed``,
``rate_limited`` with ``Retry-After``, ``wrong_code``, ``malformed``,
``no_attempt``, ``too_large``, ``timeout``); every attempt, failure and success
is audited (never the code). A body is read whole (it may arrive in pieces)
within :data:`BODY_TIMEOUT_S`, and refused at once if its ``Content-Length``
is over the limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent.audit import AuditLog
from provisioning import documents as d
from provisioning.keys import write_secret
from provisioning.pairing import (
    MAX_MESSAGE_BYTES,
    DevicePairing,
    PairingError,
    PairingWindow,
    client_key,
    new_setup_code,
    normalise_code,
    show_code,
)

log = logging.getLogger(__name__)

MAX_BODY = 4096
#: A request's body must have arrived within this long (the largest, an enrollment
#: bundle of 320 KiB sealed and in base64, at about 11 KiB/s).
BODY_TIMEOUT_S = 30.0
#: Attempts between start and confirm kept at once (one per client; the global pace
#: lets about 31 start in a minute), and how long each waits for its confirmation.
MAX_ATTEMPTS = 64
ATTEMPT_TTL_S = 60.0
#: A refusal is audited once per this long per client, step and code (then counted).
REFUSALS_REPORT_S = 60.0
MAX_REFUSAL_KEYS = 1024
#: A paired technician may use the channel this long (enroll, check the cameras' aim).
SESSION_S = 600.0
MAX_CHANNEL_BODY = 2 * MAX_MESSAGE_BYTES
STATUS = {
    "pairing_closed": 403,
    "rate_limited": 429,
    "wrong_code": 403,
    "no_attempt": 409,
    "no_session": 409,
    "bad_box": 403,
    "too_large": 413,
    "timeout": 408,
}

#: A sealed request's handler: (the opened request, the client's address, the pairing
#: session's id) -> the answer to seal.
ChannelHandler = Callable[[dict[str, Any], str, str], Awaitable[dict[str, Any]]]


def load_or_make_code(path: Path) -> str:
    """The device's setup code; made (and shown on the console) on first start."""
    try:
        return normalise_code(path.read_text(encoding="ascii"))
    except (FileNotFoundError, PairingError, UnicodeDecodeError):
        code = new_setup_code()
        write_secret(path, (show_code(code) + "\n").encode())
        # The console, never the log: the code is the key to pairing. Under systemd
        # stderr *is* the journal (a log others may read), so there only the path.
        shown = f"path {path}" if os.environ.get("INVOCATION_ID") else show_code(code)
        print(
            f"breakglass: setup code {shown} (also in {path}, mode 0600)",
            file=sys.stderr,  # stdout may be a program's output (benchmarks print JSON)
            flush=True,
        )
        return code


class PairingService:
    """One device's pairing state: its code, the window and the attempt in progress."""

    def __init__(
        self,
        *,
        device_id: str,
        code: str,
        identity: Callable[[], dict[str, Any]],
        audit: AuditLog,
        window_s: float,
        handler: ChannelHandler | None = None,
        close_on_pairing: bool = True,
        after_reply: Callable[[], None] | None = None,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self._code = code
        self._identity = identity
        self._handler = handler
        self._after_reply = after_reply
        #: False for an unprovisioned device: its window stays open until it is enrolled
        #: (a refused or interrupted enrollment must not need a power cycle); a new
        #: pairing replaces the session.
        self.close_on_pairing = close_on_pairing
        self.audit = audit
        self.mono = mono
        self.body_timeout_s = BODY_TIMEOUT_S
        self.window = PairingWindow(duration_s=window_s)
        if window_s > 0:
            self.window.open(mono())
        #: attempt id -> (client, attempt, confirm by): one per client, so that a start
        #: from another address does not replace the technician's before its confirm.
        self._attempts: OrderedDict[str, tuple[str, DevicePairing, float]] = OrderedDict()
        #: (client, step, code) -> (when last audited, refusals not audited since)
        self._refusals: OrderedDict[tuple[str, str, str], tuple[float, int]] = OrderedDict()
        self._session: tuple[str, Any, float] | None = None  # (id, channel, until)

    def is_open(self) -> bool:
        """Whether a pairing attempt could start now (or after a pause)."""
        return self.window.is_open(self.mono())

    def reopen(self) -> None:
        """Open the window again with a fresh budget (the long button hold)."""
        self.window.open(self.mono())
        self._attempts.clear()
        self._session = None
        log.warning("pairing reopened for %.0f s", self.window.duration_s)
        self.audit.record_soon("pairing_reopened", window_s=self.window.duration_s)

    def setup(self, app: web.Application) -> None:
        """Register the endpoints."""
        app.router.add_post("/v1/pairing/start", self._start)
        app.router.add_post("/v1/pairing/confirm", self._confirm)
        app.router.add_post("/v1/pairing/channel", self._channel)

    async def _body(self, request: web.Request, limit: int = MAX_BODY) -> dict[str, Any]:
        too_large = PairingError("too_large", f"pairing messages are at most {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        # read(n) returns what has arrived so far, up to n: a body split in transit
        # (Wi-Fi, TLS records, a client writing it in parts) needs more than one.
        raw = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while len(raw) <= limit:
                    chunk = await request.content.read(limit + 1 - len(raw))
                    if not chunk:
                        break
                    raw += chunk
        except TimeoutError as exc:
            raise PairingError("timeout", "the request body did not arrive in time") from exc
        except (ConnectionError, HttpProcessingError) as exc:  # the client went away
            raise PairingError("malformed", "the request body was cut off") from exc
        if len(raw) > limit:
            raise too_large
        try:
            doc = d.parse_json(bytes(raw), what="body")
        except d.DocumentError as exc:
            raise PairingError("malformed", exc.detail) from exc
        if not isinstance(doc, dict):
            raise PairingError("malformed", "body: not a JSON object")
        return doc

    def _b64(self, doc: dict[str, Any], name: str) -> bytes:
        try:
            return d.b64url_decode(doc.get(name, ""), what=name)
        except d.DocumentError as exc:
            raise PairingError("malformed", exc.detail) from exc

    async def _start(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        client = client_key(peer)
        try:
            body = await self._body(request)
            # Checked and counted with no await between: requests sent at once, each
            # waiting for its body, must not all pass the check before one is counted.
            now = self.mono()
            self.window.check(now, client)
            self.window.failed(now, client)  # counted until confirmed: it tests one guess
            message = self._b64(body, "msg")
            attempt = DevicePairing(self._code, self.device_id)
            device_msg, confirm = attempt.respond(message)
        except PairingError as exc:
            return self._refuse(exc, peer, "start")
        attempt_id = secrets.token_urlsafe(12)
        for held, (owner, _, until) in list(self._attempts.items()):
            if owner == client or until <= now:  # its previous one, and those expired
                del self._attempts[held]
        self._attempts[attempt_id] = (client, attempt, now + ATTEMPT_TTL_S)
        while len(self._attempts) > MAX_ATTEMPTS:
            self._attempts.popitem(last=False)
        self.audit.record_soon(
            "pairing_attempt",
            peer=peer,
            attempt=self.window.attempts(client),
            in_window=self.window.failures,
        )
        return web.json_response(
            {"attempt": attempt_id, "msg": d.b64url(device_msg), "confirm": d.b64url(confirm)}
        )

    async def _confirm(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        try:
            doc = await self._body(request)
            wanted = str(doc.get("attempt", "")).encode()
            found = None
            for held in self._attempts:  # compared in constant time, each
                if secrets.compare_digest(wanted, held.encode()):
                    found = held
            current = None if found is None else self._attempts.pop(found)  # one confirm
            if current is None or self.mono() >= current[2]:
                raise PairingError("no_attempt", "no pairing attempt by that id is in progress")
            channel = current[1].confirm(self._b64(doc, "confirm"))
        except PairingError as exc:
            return self._refuse(exc, peer, "confirm")
        self.window.succeeded(current[0], close=self.close_on_pairing)
        if self.close_on_pairing:
            self._attempts.clear()
        box = channel.seal(json.dumps(self._identity(), sort_keys=True).encode())
        session = secrets.token_urlsafe(16)
        self._session = (session, channel, self.mono() + SESSION_S)
        log.warning(
            "paired with a technician at %s; pairing %s",
            peer, "closed" if self.close_on_pairing else "open until enrolled",
        )  # fmt: skip
        self.audit.record_soon("paired", peer=peer)
        return web.json_response({"session": session, "box": d.b64url(box)})

    async def _channel(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        try:
            doc = await self._body(request, MAX_CHANNEL_BODY)
            current = self._session
            if (
                current is None
                or self.mono() >= current[2]
                or not secrets.compare_digest(
                    str(doc.get("session", "")).encode(), current[0].encode()
                )
            ):
                raise PairingError("no_session", "no paired session by that id (pair again)")
            session, channel = current[0], current[1]
            try:
                opened = channel.open(self._b64(doc, "box"))
            except PairingError:
                self._session = None  # tampered, replayed or reordered: end it
                raise
            request_doc = d.parse_json(opened, what="request")
            if not isinstance(request_doc, dict):
                raise PairingError("malformed", "request: not a JSON object")
        except (PairingError, d.DocumentError) as exc:
            code = exc.code if isinstance(exc, PairingError) else "malformed"
            detail = exc.detail
            return self._refuse(PairingError(code, detail), peer, "channel")
        if self._handler is None:
            answer: dict[str, Any] = {"error": "unsupported", "detail": "no channel operations"}
        else:
            answer = await self._handler(request_doc, peer, session)
        response = web.json_response({"box": d.b64url(channel.seal(json.dumps(answer).encode()))})
        await response.prepare(request)
        await response.write_eof()  # sent before anything restarts the device
        if self._after_reply is not None:
            self._after_reply()
        return response

    def _refuse(self, exc: PairingError, peer: str, step: str) -> web.Response:
        # Audited once a minute per client (an address, an IPv6 /64), step and code, then
        # with the count of those not audited since: a client repeating refused requests
        # (or cycling through the addresses of its /64) must not fill the card.
        now, key = self.mono(), (client_key(peer), step, exc.code)
        held = self._refusals.pop(key, None)
        if held is None or now - held[0] >= REFUSALS_REPORT_S:
            log.warning("pairing %s from %s refused: %s", step, peer, exc.code)
            repeats = {} if held is None else {"repeats": held[1]}
            self.audit.record_soon(
                "pairing_refused", peer=peer, step=step, code=exc.code, **repeats
            )
            self._refusals[key] = (now, 0)
        else:
            self._refusals[key] = (held[0], held[1] + 1)
        while len(self._refusals) > MAX_REFUSAL_KEYS:
            self._refusals.popitem(last=False)
        headers = {}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(int(exc.retry_after_s))
        return web.json_response(
            {"error": exc.code, "detail": exc.detail},
            status=STATUS.get(exc.code, 400),
            headers=headers,
        )
