"""The agent's Local API on the school LAN (DESIGN.md "Local API").

HTTPS with the device's own self-signed certificate (``state/tls/``; its
fingerprint goes into the mDNS TXT record and the enrollment), JSON in and
out, errors ``{"error": CODE, "detail": "..."}`` with a stable CODE:

- ``GET /v1/status``     state, building, cameras (id, zone, healthy), session (its id
  and expiry only: who started it and why is not for everyone on the LAN);
- ``GET /v1/challenge``  a fresh single-use device nonce for clock-free triggers;
- ``POST /v1/triggers``  a trigger envelope: 202 ``{"session": ...}`` or 4xx with
  the verifier's code; every attempt is audited;
- ``PUT /v1/trigger-keys`` a newer trigger-key list signed by the district
  authority (key rotation and revocation without a visit): 200 with its
  version, or 4xx (``keylist_rollback``, ``keylist_expired``, ...); audited;
- ``GET /metrics``       Prometheus text format (no login: nothing in it names a button,
  a room or a person; presses are one total);
- ``POST /v1/pairing/start|confirm|channel`` pairing by setup code, then enrollment
  and the technician's camera check (:mod:`agent.pairing_api`).

An unprovisioned device (:mod:`agent.first_boot`) serves the status and the
pairing endpoints; the others answer 409 ``unprovisioned``. A trigger, a
challenge request or a key list sent to it is audited as refused (``trigger``,
``challenge_refused``, ``keylist_refused`` with code ``unprovisioned``), in
summary when they repeat, as every refusal is: someone believes it is armed.

Any host on the LAN is untrusted, and nothing it sends may take from the agent
what the buttons, the store and the uplink need (:class:`ApiLimits`):

- connections: at most ``max_per_address`` from one address (an IPv6 /64) and
  ``max_connections`` in all (lowered to a quarter of the process's open-file
  limit), counted from the TCP accept, TLS handshakes under way included. One
  over takes the slot of the oldest connection that has done nothing yet (or
  sits idle), of the address holding the most, which is reset; only when every
  slot is busy is the new one reset instead (:mod:`agent.lan_guard`; no task, no
  TLS, nothing logged but a line a minute per address): descriptors for
  segments, the uplink, the audit trail and the state files are left whatever
  the LAN does;
- a TLS handshake not done within ``tls_handshake_s`` is cut; request headers
  not whole within ``header_s`` of the handshake or of the previous answer are
  cut (that is also how long an idle keep-alive connection stays);
- a body not whole within ``body_s`` of its headers: 408 ``body_timeout``, and
  the connection closes. A body is read whole (until its end, however it is
  split in transit), and never past its limit: one announced or found larger
  is refused without reading the rest.

Triggers are checked before anything else (after the size limit): one the
verifier would accept now (signed by an enrolled key, for this building and
role, in its window, its nonce never seen) is never rate limited. Everything
else is, a signed envelope that is spent, expired or for another building too
(review t1: one spent envelope, replayed 780 times a second, skipped the limit):
a token bucket per client address, :data:`TRIGGERS_PER_S`, and one for all
clients, twice that. Over it, 429 ``rate_limited``, audited as one
``trigger_flood`` entry per minute with its count, written when the minute is
up (by a timer: not only by the next request or at shutdown, which a crash
lost). The same for key lists: only one the district authority signed that
would replace the installed list skips the limit. ``GET /v1/challenge`` has a
bucket per network (the /24 or /64 of the address, :data:`CHALLENGES_PER_S`).
Refusals are audited off the event loop, in summary when they repeat
(:class:`agent.trigger_gate.RefusalDigest`), so nobody on the LAN can fill the
SD card with audit entries or stall the loop on them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.audit import AuditLog
from agent.config import AgentConfig, LocalApiConfig
from agent.lan_guard import (
    DEFAULT_LIMITS,
    ApiLimits,
    BodyTimeoutError,
    GuardedSite,
    LogThrottle,
    RequestErrorLog,
    body_late,
    read_body,
    too_large,
)
from agent.pairing_api import PairingService, load_or_make_code
from agent.policy import STATUS
from agent.technician import TechnicianDesk
from agent.trigger_gate import MAX_DETAIL, RefusalDigest, address_prefix
from provisioning.documents import DocumentError, envelope_limit
from provisioning.keys import kid, public_pem
from provisioning.tls import ensure_certificate, server_context
from provisioning.triggers import CODES, MAX_KEYLIST_PAYLOAD, ChallengesExhausted, Rejected

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger(__name__)

TRIGGERS_PER_S: Final = 10.0
TRIGGER_BURST: Final = 50.0
FLOOD_REPORT_S: Final = 60.0
#: ``GET /v1/challenge`` per network (:func:`agent.trigger_gate.address_prefix`).
CHALLENGES_PER_S: Final = 1.0
CHALLENGE_BURST: Final = 16.0
#: The detail of every ``unprovisioned`` answer.
UNPROVISIONED: Final = "this device is not enrolled yet"
#: Client addresses whose trigger buckets are kept (the least recent are forgotten).
MAX_CLIENTS: Final = 1024
#: The API's bucket, for all clients together, in units of one client's.
ALL_CLIENTS: Final = 2.0
#: The largest trigger envelope, and the largest key list's (bytes of body).
TRIGGER_BODY: Final = envelope_limit(4096)
KEYLIST_BODY: Final = envelope_limit(MAX_KEYLIST_PAYLOAD)


def public_status(status: dict[str, Any]) -> dict[str, Any]:
    """The status anyone on the LAN may read: not who started an emergency, or why
    (a trigger's reason, the signer, the button's room, the client's address), nor the
    enrollment certificate (a paired technician gets that over the pairing channel)."""
    out = {k: v for k, v in status.items() if k != "certificate"}
    session = status.get("session")
    if isinstance(session, dict):
        out["session"] = {k: session[k] for k in ("id", "expires_at") if k in session}
    return out


class ApiHost(Protocol):
    """What the API serves for: an armed agent, or a device waiting for enrollment."""

    config: AgentConfig
    audit: AuditLog
    device_public_key: Ed25519PublicKey

    def status(self) -> dict[str, Any]:
        """``GET /v1/status``."""

    @property
    def desk(self) -> TechnicianDesk:
        """Answers a paired technician's sealed requests (``enroll``, ``check``)."""


class LocalApi:
    """Serves the Local API for one device (``start``/``stop``); ``agent`` when armed."""

    def __init__(
        self,
        host: ApiHost,
        config: LocalApiConfig,
        tls_dir: Path,
        *,
        agent: Agent | None = None,
        triggers_per_s: float = TRIGGERS_PER_S,
        burst: float = TRIGGER_BURST,
        limits: ApiLimits | None = None,
    ) -> None:
        self.host = host
        self.limits = limits or DEFAULT_LIMITS
        self._agent = agent
        self.triggers_per_s = triggers_per_s
        self.burst = burst
        self.config = config
        self.cert_path = tls_dir / "local-api.crt"
        self.key_path = tls_dir / "local-api.key"
        self.fingerprint = ""
        self.port = config.port
        self._runner: web.AppRunner | None = None
        self.site: GuardedSite | None = None
        self._stopped = False
        self._throttle = LogThrottle(log, max_keys=1024)
        self.pairing: PairingService | None = None
        #: Per client address: (tokens, when counted); the least recent are forgotten.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        #: The same for ``GET /v1/challenge``, per network.
        self._challenge_buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._flood = 0
        self._flood_since = 0.0
        self._flood_timer: asyncio.TimerHandle | None = None
        #: Refusals by an unprovisioned device (an armed one audits through its gate).
        self._refusals = RefusalDigest(host.audit)

    @property
    def url(self) -> str:
        """``https://host:port`` of the API."""
        host = self.config.host
        return f"https://[{host}]:{self.port}" if ":" in host else f"https://{host}:{self.port}"

    def make_app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(
            client_max_size=KEYLIST_BODY,
            handler_args=self.limits.handler_args(),
            middlewares=[self._closing, self._guard],
        )
        app.router.add_get("/v1/status", self._status)
        armed = self._agent is not None
        app.router.add_get("/v1/challenge", self._challenge if armed else self._no_challenge)
        app.router.add_post("/v1/triggers", self._trigger if armed else self._no_trigger)
        app.router.add_put("/v1/trigger-keys", self._trigger_keys if armed else self._no_keys)
        app.router.add_get("/metrics", self._metrics if armed else _unprovisioned)
        if self.pairing is not None:
            self.pairing.setup(app)
        return app

    async def start(self) -> None:
        """Create the certificate on first start, bind and serve."""
        wildcard = ("0.0.0.0", "::")  # noqa: S104 (names, not a bind)
        hosts = [
            h for h in (self.config.host, "localhost", socket.gethostname()) if h not in wildcard
        ]
        self.fingerprint = ensure_certificate(
            self.cert_path,
            self.key_path,
            common_name=f"breakglass {self.host.config.device_id}",
            hosts=hosts,
        )
        host = self.host
        if host.config.provisioned:  # taken at every armed start, whether pairing is on or not
            host.desk.claim_interior_checks()
        if self.config.pairing_window_s > 0:
            self.pairing = PairingService(
                device_id=host.config.device_id,
                code=load_or_make_code(host.config.state_dir / "setup-code"),
                identity=self.identity,
                audit=host.audit,
                window_s=self.config.pairing_window_s,
                handler=host.desk.handle,
                after_reply=host.desk.after_reply,
                close_on_pairing=host.config.provisioned,
            )
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(
            self.make_app(),
            handle_signals=False,
            shutdown_timeout=1.0,
            logger=RequestErrorLog(logging.getLogger("agent.local_api.http")),
        )
        await self._runner.setup()
        self.site = GuardedSite(
            self._runner,
            sock,
            ssl_context=server_context(self.cert_path, self.key_path),
            limits=self.limits,
        )
        await self.site.start()
        log.info("local API on %s (TLS pin %s)", self.url, self.fingerprint)
        if self.site.cap < self.limits.max_connections:
            log.warning(
                "local API: at most %d connections at once (a quarter of the open-file "
                "limit), not %d",
                self.site.cap, self.limits.max_connections,
            )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """What pairing tells the technician: the device's id, public key, API pin, state."""
        key = self.host.device_public_key
        status = self.host.status()
        return {
            "device": self.host.config.device_id,
            "public_key": public_pem(key).decode("ascii"),
            "kid": kid(key),
            "fp": self.fingerprint,
            "provisioned": self.host.config.provisioned,
            "enrollment_version": status.get("enrollment_version"),
            "certificate": status.get("certificate"),
            "cameras": [{"id": c["id"], "zone": c["zone"]} for c in status.get("cameras", [])],
        }

    @web.middleware
    async def _closing(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # A connection accepted just before stop() may finish its TLS handshake after
        # the runner's cleanup and reach this app after all (aiohttp registers it only
        # then): it must not answer for a device that is restarting as another one.
        if self._stopped:
            return web.json_response(
                {"error": "restarting", "detail": "the device is restarting; retry"},
                status=503,
                headers={"Connection": "close", "Retry-After": "1"},
            )
        return await handler(request)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # A body not whole in time is cut (408); a client gone mid-body is no error of ours.
        deadline: asyncio.TimerHandle | None = None
        if request.body_exists and not request.content.is_eof():
            deadline = asyncio.get_running_loop().call_later(
                self.limits.body_s, body_late, request.content, self.limits.body_s
            )
        remote = request.remote or "?"
        try:
            return await handler(request)
        except BodyTimeoutError as exc:
            self._throttle.log(logging.WARNING, ("body", remote), "%s from %s: cut", exc, remote)
            resp = web.json_response({"error": "body_timeout", "detail": str(exc)}, status=408)
            resp.force_close()
            return resp
        except ConnectionError:
            if request.writer.output_size > 0:
                raise
            self._throttle.log(logging.INFO, ("gone", remote), "%s left mid-request", remote)
            resp = web.json_response({"error": "malformed", "detail": "incomplete"}, status=400)
            resp.force_close()
            return resp
        finally:
            if deadline is not None:
                deadline.cancel()

    async def stop(self) -> None:
        """Stop serving."""
        self._stopped = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._flood_timer is not None:
            self._flood_timer.cancel()
            self._flood_timer = None
        self._report_flood(force=True)
        self._refusals.close()

    # -- handlers ------------------------------------------------------------------

    @property
    def agent(self) -> Agent:
        """The armed agent (only the armed endpoints use it)."""
        assert self._agent is not None
        return self._agent

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(public_status(self.host.status()))

    async def _challenge(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        prefix = address_prefix(peer)
        if not self._take(self._challenge_buckets, prefix, CHALLENGES_PER_S, CHALLENGE_BURST):
            self._throttle.log(
                logging.WARNING, ("challenge", prefix), "challenges rate limited for %s", prefix
            )
            body = {"error": "rate_limited", "detail": "too many challenges; retry later"}
            return web.json_response(body, status=429, headers={"Retry-After": "1"})
        try:
            challenge = self.agent.gate.challenge(peer)
        except ChallengesExhausted as exc:
            body = {"error": "rate_limited", "detail": str(exc)}
            return web.json_response(body, status=429, headers={"Retry-After": "60"})
        ttl = self.agent.gate.challenges.ttl_s
        return web.json_response({"challenge": challenge, "expires_in_s": ttl})

    async def _trigger(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        via = f"local_api {peer}"
        body = await read_body(request, TRIGGER_BODY)
        # A trigger the verifier would accept is never held back by what others send
        # (Ed25519 verifies in a fraction of a millisecond); the rest is rate limited,
        # a signed one that is spent, expired or for another building too.
        if body is None or not self.agent.gate.would_accept(body):
            if not self._take_token(peer):
                resp = web.json_response(
                    {"error": "rate_limited", "detail": "too many triggers; retry in a second"},
                    status=429,
                    headers={"Retry-After": "1"},
                )
                if body is None:
                    resp.force_close()
                return resp
            if body is None:
                detail = f"envelope larger than {TRIGGER_BODY} bytes"
                self.agent.gate.reject(Rejected("too_large", detail), via=via)
                return too_large(TRIGGER_BODY)
        outcome = self.agent.submit_trigger(body, via=via)
        return web.json_response(dict(outcome.body), status=outcome.status)

    async def _trigger_keys(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        body = await read_body(request, KEYLIST_BODY)
        gate = self.agent.gate
        if body is None or not gate.would_install(body):
            if not self._take_token(peer):
                resp = web.json_response(
                    {"error": "rate_limited", "detail": "retry later"}, status=429
                )
                if body is None:
                    resp.force_close()
                return resp
            if body is None:
                return too_large(KEYLIST_BODY)
        try:
            keys = gate.install_key_list(body, via=f"local_api {peer}")
        except DocumentError as exc:
            status = 409 if exc.code.startswith("keylist_") else STATUS.get(exc.code, 400)
            return web.json_response({"error": exc.code, "detail": exc.detail[:300]}, status=status)
        return web.json_response({"version": keys.version, "keys": len(keys.keys), "exp": keys.exp})

    async def _no_trigger(self, request: web.Request) -> web.Response:
        via = f"local_api {request.remote or '?'}"[:MAX_DETAIL]
        fields = {
            "result": "rejected", "code": "unprovisioned", "detail": UNPROVISIONED,
            "kid": None, "role": None, "action": None, "reason": None, "via": via,
            "session": None,
        }  # fmt: skip
        if self._refusals.refuse("trigger", ("unprovisioned", None), fields):
            log.warning("trigger via %s refused: unprovisioned", via)
        return await _unprovisioned(request)

    async def _no_challenge(self, request: web.Request) -> web.Response:
        via = f"local_api {request.remote or '?'}"[:MAX_DETAIL]
        fields = {"code": "unprovisioned", "detail": UNPROVISIONED, "via": via}
        if self._refusals.refuse("challenge_refused", ("unprovisioned",), fields):
            log.warning("challenge for %s refused: unprovisioned", via)
        return await _unprovisioned(request)

    async def _no_keys(self, request: web.Request) -> web.Response:
        source = f"local_api {request.remote or '?'}"[:MAX_DETAIL]
        fields = {"source": source, "code": "unprovisioned", "detail": UNPROVISIONED}
        if self._refusals.refuse("keylist_refused", ("unprovisioned",), fields):
            log.warning("trigger-key list from %s refused: unprovisioned", source)
        return await _unprovisioned(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(), content_type="text/plain", charset="utf-8")

    # -- flood control ----------------------------------------------------------------

    def _take_token(self, client: str) -> bool:
        """One request of ``client`` (its address), under its own bucket and the API's:
        junk from one machine on the LAN must not use up what a principal's trigger
        needs, and many machines together still cannot fill the card with audit
        entries (the API's bucket is twice one client's)."""
        now = time.monotonic()
        own = self._refill(self._buckets, client, now, self.triggers_per_s, self.burst)
        scale = ALL_CLIENTS
        total = self._refill(
            self._buckets, "", now, self.triggers_per_s * scale, self.burst * scale
        )
        taken = own >= 1 and total >= 1
        self._buckets[client] = (own - 1 if taken else own, now)
        self._buckets[""] = (total - 1 if taken else total, now)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        if taken:
            self._report_flood()
            return True
        if self._flood == 0:
            self._flood_since = now
            # Written when its minute is up even if nothing follows (a crash must not
            # lose it): the refusal summaries are written so too.
            if self._flood_timer is None:
                loop = asyncio.get_running_loop()
                self._flood_timer = loop.call_later(FLOOD_REPORT_S, self._flood_due)
        self._flood += 1
        if self._agent is not None:
            self._agent.gate.rejected["rate_limited"] += 1
        self._report_flood()
        return False

    def _take(
        self, buckets: OrderedDict[str, tuple[float, float]], key: str, per_s: float, burst: float
    ) -> bool:
        """One token of ``key``'s bucket (``per_s``, ``burst``); the least recent forgotten."""
        now = time.monotonic()
        tokens = self._refill(buckets, key, now, per_s, burst)
        taken = tokens >= 1
        buckets[key] = (tokens - 1 if taken else tokens, now)
        while len(buckets) > MAX_CLIENTS:
            buckets.popitem(last=False)
        return taken

    @staticmethod
    def _refill(
        buckets: OrderedDict[str, tuple[float, float]],
        key: str,
        now: float,
        per_s: float,
        burst: float,
    ) -> float:
        tokens, at = buckets.pop(key, (burst, now))
        return min(burst, tokens + (now - at) * per_s)

    def _flood_due(self) -> None:
        self._flood_timer = None
        self._report_flood(force=True)

    def _report_flood(self, *, force: bool = False) -> None:
        if self._flood and (force or time.monotonic() - self._flood_since >= FLOOD_REPORT_S):
            log.warning("local API: %d triggers refused by the rate limit", self._flood)
            self.host.audit.record_soon("trigger_flood", refused=self._flood, via="local_api")
            self._flood = 0
            if self._flood_timer is not None:
                self._flood_timer.cancel()
                self._flood_timer = None

    # -- metrics --------------------------------------------------------------------------

    def metrics_text(self) -> str:
        """The agent's state in Prometheus text exposition format (0.0.4)."""
        agent = self.agent
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        state = agent.emergency.state.value
        metric(
            "breakglass_emergency_state", "gauge", "1 for the current emergency state.",
            [(f'{{state="{s}"}}', float(s == state)) for s in ("idle", "active")],
        )  # fmt: skip
        metric(
            "breakglass_camera_healthy", "gauge", "1 when the camera delivers packets.",
            [
                (f'{{camera="{c.id}",zone="{c.zone}"}}', float(agent.capture.state[c.id].healthy))
                for c in agent.config.cameras
            ],
        )  # fmt: skip
        metric(
            "breakglass_buffer_bytes", "gauge", "Bytes of sealed footage in the local store.",
            [("", float(agent.store.used_bytes()))],
        )  # fmt: skip
        metric(
            "breakglass_preroll_bytes", "gauge", "Bytes of pre-roll held in memory per camera.",
            [(f'{{camera="{c}"}}', float(r.bytes)) for c, r in agent.capture.prerolls.items()],
        )  # fmt: skip
        metric(
            "breakglass_uplink_connected", "gauge", "1 while the uplink to the receiver is up.",
            [("", float(agent.uplink.connected))],
        )  # fmt: skip
        metric(
            "breakglass_triggers_accepted_total", "counter", "Remote triggers accepted.",
            [("", float(agent.gate.accepted))],
        )  # fmt: skip
        reasons = sorted({*CODES, "no_session", "rate_limited", *agent.gate.rejected})
        metric(
            "breakglass_triggers_rejected_total", "counter", "Remote triggers refused, by reason.",
            [(f'{{reason="{r}"}}', float(agent.gate.rejected[r])) for r in reasons],
        )  # fmt: skip
        # In all, never by button: anyone on the LAN reads this, and a button's id names
        # the room that raised the alarm (the status hides it too: public_status).
        metric(
            "breakglass_button_presses_total", "counter", "Panic button presses (all buttons).",
            [("", float(agent.alarm.presses))],
        )  # fmt: skip
        site = self.site
        metric(
            "breakglass_local_api_connections", "gauge",
            "Connections to the Local API now (TLS handshakes under way included).",
            [("", float(site.open_connections if site else 0))],
        )  # fmt: skip
        metric(
            "breakglass_local_api_connections_refused_total", "counter",
            "Connections to the Local API refused at once, by limit.",
            [(f'{{limit="{r}"}}', float(site.refused[r] if site else 0))
             for r in ("per_address", "total")],
        )  # fmt: skip
        metric(
            "breakglass_local_api_handshakes_failed_total", "counter",
            "TLS handshakes with the Local API that failed or timed out.",
            [("", float(site.handshakes_failed if site else 0))],
        )  # fmt: skip
        metric(
            "breakglass_audit_entries", "gauge", "Entries in the audit trail, and shipped.",
            [('{where="device"}', float(agent.audit.head_n)),
             ('{where="receiver"}', float(agent.uplink.audit_acked))],
        )  # fmt: skip
        return "\n".join(out) + "\n"


async def _unprovisioned(request: web.Request) -> web.Response:
    return web.json_response({"error": "unprovisioned", "detail": UNPROVISIONED}, status=409)
