"""The police receiver as one embeddable aiohttp server over TLS.

``async with Receiver(data_dir, host, port) as rx:`` generates the receiver's
self-signed certificate (``DATA/tls/``) and age identity (``DATA/age.key``,
mode 0600: it opens the sealed segments of the backfill lane) on first start,
opens the recording store (``DATA/recordings/``), reads the device allow-list
(``DATA/devices/<id>.pub``) and serves, on one TLS port:

- ``/v1/uplink``   the agents' uplink (WebSocket, see :mod:`agent.protocol`);
- ``/``, ``/api/sessions``, ``/v1/devices``, ``/v1/live/...``, ``/recordings/...``
  the viewer;
- ``/hls/...`` recordings as HLS playlists (:mod:`receiver.hls`: VLC, ffplay), also
  by player link (:mod:`receiver.player_links`, key ``DATA/player-links.key``);
- ``/v1/dispatch``, ``/v1/evidence/...`` dispatch triggers and evidence bundles
  (:mod:`receiver.police_api`; the dispatch key is ``DATA/dispatch.key``);
- ``/login``, ``/logout``, ``/v1/me``, ``/v1/users`` the police accounts
  (:mod:`receiver.auth`: every route but the login page and the uplink needs a
  logged-in user; accounts and sessions in ``DATA/accounts.sqlite``, the
  access log in ``DATA/access.log``).

Devices are accepted by their enrollment certificate when
``DATA/authority.pub`` names the district's authority
(:mod:`receiver.device_trust`; revocations in ``DATA/revocations.json``), or
by the allow-list. It keeps a copy of every device's audit trail (``DATA/audit/<device>.log``)
and can push signed triggers to connected devices
(:meth:`IngestServer.push_trigger`).

It tracks when it last heard from each device and raises the offline alarm
for one silent for ``offline_after_s`` (:mod:`receiver.presence`, kept in
``DATA/presence.json`` across restarts). Every ``poll_s`` seconds two
background tasks, owned by the application's ``cleanup_ctx``, check those
alarms and re-read the revocation list if it changed, dropping connected
devices it revokes. ``clock`` (wall seconds) is what presence counts in, what
each device's clock is measured against (its heartbeats: :mod:`receiver.device_clock`)
and what dispatch signs with, in the device's time.

What one client may hold is bounded (:mod:`receiver.limits`, :mod:`receiver.listener`):
connections per address and in all, the TLS handshake, request headers and body
in time, bodies and headers in size; every error is JSON with a stable code. What one
device may send is bounded in :class:`receiver.ingest.UplinkLimits`.

With ``notify_url`` it tells the district of every emergency session's start and
end (:mod:`receiver.webhook`, signed with the evidence key, ``DATA/notify.sqlite``).

Agents pin :attr:`Receiver.fingerprint` and seal their segments to
:attr:`Receiver.age_recipient` (besides the district's recipient). Lifecycle follows aiohttp's
``AppRunner``/``TCPSite``; shared state hangs off typed ``web.AppKey`` values.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import Fingerprint, web

from provisioning.age_keys import load_identity, new_identity, recipient_of
from provisioning.tls import ensure_certificate, fingerprint_digest, server_context
from receiver.access_log import AccessLog
from receiver.accounts import AccountStore, PasswordParams
from receiver.audit_copy import AuditCopies
from receiver.auth import Auth, AuthSettings, allow_anonymous, setup_auth
from receiver.device_clock import DeviceClocks
from receiver.device_trust import DeviceTrust
from receiver.dispatch import Dispatch, load_or_make_key
from receiver.errors import InvalidSettingError, ReceiverError
from receiver.evidence_format import evidence_key
from receiver.hls import setup_hls
from receiver.ingest import AllowList, IngestServer, UplinkLimits
from receiver.limits import ServerLimits, guard_middleware
from receiver.listener import GuardedSite
from receiver.player_links import KEY_FILE, PlayerLinks, QueryFreeAccessLogger, setup_player_links
from receiver.police_api import setup_police_api
from receiver.presence import OFFLINE_AFTER_S, Presence
from receiver.recording import RecordingStore
from receiver.retention import KeepPolicy, Retention, is_share
from receiver.viewer import setup_viewer
from receiver.webhook import Notifier, Outbox, SessionNotices, WebhookError, check_url

log = logging.getLogger(__name__)

INGEST_KEY = web.AppKey("ingest", IngestServer)
#: How often presence alarms and the revocation list are checked (seconds).
POLL_S = 2.0
#: How often open sessions of devices long silent are looked for (and closed).
ABANDONED_CHECK_S = 600.0


class Receiver:
    """The receiver's lifecycle: certificate, store, allow-list, TLS listener."""

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 8443,
        *,
        offline_after_s: float = OFFLINE_AFTER_S,
        clock: Callable[[], float] = time.time,
        poll_s: float = POLL_S,
        password_params: PasswordParams | None = None,
        auth_settings: AuthSettings | None = None,
        notify_url: str | None = None,
        notify_pin: str | None = None,
        limits: ServerLimits | None = None,
        uplink_limits: UplinkLimits | None = None,
        keep: KeepPolicy | None = None,
    ) -> None:
        """Raises :class:`InvalidSettingError` (a ``ValueError``) for an unusable setting.

        ``password_params`` is the argon2id cost of new and rehashed passwords;
        ``auth_settings`` the login limits (:class:`receiver.auth.AuthSettings`);
        ``notify_url`` the district's webhook (https; :mod:`receiver.webhook`), its
        certificate checked against the system's CAs or pinned by ``notify_pin``;
        ``limits`` what one client may hold (:class:`receiver.limits.ServerLimits`:
        sizes, time bounds, connections); ``uplink_limits`` what one device may send
        (:class:`receiver.ingest.UplinkLimits`); ``keep`` how long closed recordings are
        kept (:class:`receiver.retention.KeepPolicy`: shares 30 days, emergencies with no
        end).
        """
        if not 0 < poll_s <= 60:
            raise InvalidSettingError(f"poll_s: expected 0 < seconds <= 60, got {poll_s!r}")
        self.data_dir = Path(data_dir)
        self.poll_s = poll_s
        self.limits = limits or ServerLimits()
        self.host = host
        self.port = port
        self.cert_path = self.data_dir / "tls" / "receiver.crt"
        self.key_path = self.data_dir / "tls" / "receiver.key"
        self.devices_dir = self.data_dir / "devices"
        self.age_key_path = self.data_dir / "age.key"
        self.fingerprint = ""
        #: The receiver's age recipient (``age1...``), known once started.
        self.age_recipient = ""
        self.store = RecordingStore(self.data_dir / "recordings")
        #: Last heard and offline alarm per device (``DATA/presence.json``).
        self.presence = Presence(
            self.data_dir / "presence.json", offline_after_s=offline_after_s, clock=clock
        )
        #: The district's enrollments (``DATA/authority.pub``, ``DATA/enrolled/``).
        self.trust = DeviceTrust(self.data_dir)
        #: The receiver's wall clock (presence, the devices' clock offsets, dispatch).
        self.clock = clock
        self.ingest = IngestServer(
            self.store,
            AllowList(self.devices_dir),
            [],
            audits=AuditCopies(self.data_dir / "audit"),
            trust=self.trust,
            presence=self.presence,
            limits=uplink_limits,
            clocks=DeviceClocks(clock=clock),
        )
        #: Police accounts and login sessions (``DATA/accounts.sqlite``).
        self.accounts = AccountStore(self.data_dir / "accounts.sqlite", params=password_params)
        #: Who logged in and who watched what (``DATA/access.log``).
        self.access_log = AccessLog(self.data_dir / "access.log")
        self.ingest.access_head = lambda: self.access_log.head
        #: Deletes closed recordings past their time (checked every 10 minutes).
        self.retention = Retention(
            self.store,
            self.data_dir / "exports",
            self.access_log,
            keep or KeepPolicy(),
            clock=clock,
        )
        self.auth = Auth(self.accounts, self.access_log, auth_settings)
        #: HLS links for players that cannot log in (key ``DATA/player-links.key``).
        self.player_links = PlayerLinks(self.data_dir / KEY_FILE)
        if notify_url is not None:
            try:
                check_url(notify_url)
                pin = None if notify_pin is None else Fingerprint(fingerprint_digest(notify_pin))
            except (WebhookError, ValueError) as exc:
                raise InvalidSettingError(f"notify: {exc}") from exc
            self._notify: tuple[str, Fingerprint | None] | None = (notify_url, pin)
        elif notify_pin is not None:
            raise InvalidSettingError("notify_pin: given without a notify_url")
        else:
            self._notify = None
        self.notifier: Notifier | None = None
        self.dispatch_key_path = self.data_dir / "dispatch.key"
        self.dispatch: Dispatch | None = None
        self._runner: web.AppRunner | None = None
        #: The TLS listener (its connection counts and refusals), once started.
        self.site: GuardedSite | None = None

    @property
    def origin(self) -> str:
        """``wss://host:port``, the origin agents bind into their hello signature."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"wss://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The viewer's URL."""
        return self.origin.replace("wss://", "https://", 1) + "/"

    @property
    def uplink_url(self) -> str:
        """The URL agents connect to."""
        return self.origin + "/v1/uplink"

    def make_app(self) -> web.Application:
        """The aiohttp application (also usable with aiohttp's test client)."""
        app = web.Application(
            client_max_size=self.limits.max_body,
            handler_args=self.limits.handler_args(),
            middlewares=[guard_middleware(self.limits)],  # outermost: sizes, times, JSON errors
        )
        app[INGEST_KEY] = self.ingest
        setup_auth(app, self.auth)  # first: its middleware guards every route below
        app.router.add_get("/v1/uplink", self.ingest.handle)
        allow_anonymous(app, "GET", "/v1/uplink")  # devices prove their key in the handshake
        setup_viewer(
            app,
            self.store,
            self.ingest_feed,
            self.presence,
            trust=self.trust,
            clocks=self.ingest.clocks,
        )
        setup_hls(app, self.store)
        setup_player_links(app, self.player_links)
        if self.dispatch is not None:
            setup_police_api(app, self.data_dir, self.dispatch, self.retention)
        app.cleanup_ctx.append(self._watchers)
        app.on_shutdown.append(self._close_uplinks)
        return app

    async def _close_uplinks(self, app: web.Application) -> None:
        await self.ingest.close_all()

    async def _watchers(self, app: web.Application) -> AsyncIterator[None]:
        """The presence alarms, the revocation watch and the recordings' retention, for
        the application's lifetime."""
        await asyncio.to_thread(self.presence.load)
        await asyncio.to_thread(self.trust.load)
        tasks = [
            asyncio.create_task(self.presence.run(self.poll_s), name="receiver presence"),
            asyncio.create_task(
                self.ingest.watch_revocations(self.poll_s), name="receiver revocations"
            ),
            asyncio.create_task(self.retention.run(), name="receiver retention"),
            asyncio.create_task(
                self.ingest.watch_abandoned(ABANDONED_CHECK_S), name="receiver abandoned"
            ),
        ]
        for task in tasks:
            task.add_done_callback(_report_failure)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # failures were logged
            await self.presence.save()

    def devices_of(self, building: str) -> list[str]:
        """The connected devices of ``building`` that dispatch signs for: those whose
        connection was accepted with an enrollment certificate naming ``building`` (the
        ingest's verified enrollment of each connection). Never a session's claim."""
        enrolled = self.ingest.enrollments  # connected devices only
        return [device for device, e in enrolled.items() if e.building == building]

    def unverified_of(self, building: str) -> list[str]:
        """The connected devices that only *claim* ``building`` (a session of a device
        accepted by the allow-list, without a certificate): dispatch lists them as
        ``not_certified`` and signs nothing for them."""
        enrolled = self.ingest.enrollments
        return [
            d.device
            for d in self.presence.devices.values()
            if d.connected and d.building == building and d.device not in enrolled
        ]

    def emergency_of(self, device: str) -> str | None:
        """The emergency session ``device`` has open as the receiver knows it (a share is
        not one); None when it has none, or more than one (one was never closed)."""
        open_ = [
            r.session_id
            for r in self.store.open_sessions()
            if r.device_id == device and not is_share(r)
        ]
        return open_[0] if len(open_) == 1 else None

    def _meta_of(self, session_id: str) -> dict[str, Any] | None:
        """A session's recorded metadata (the district's webhook says what it holds)."""
        try:
            return self.store.get(session_id).meta
        except ReceiverError:
            return None

    def ingest_feed(self, session_id: str, camera_id: str):  # type: ignore[no-untyped-def]
        """The live feed of one camera of one session, if it is recording."""
        return self.store.live_feed(session_id, camera_id)

    async def __aenter__(self) -> Receiver:
        self.devices_dir.mkdir(parents=True, exist_ok=True)
        # Made once and kept: segments sealed to an older recipient open with this file only.
        if self.age_key_path.exists():
            identity = load_identity(self.age_key_path)
        else:
            identity = new_identity(self.age_key_path)
        self.age_recipient = recipient_of(identity)
        self.ingest.identities = [identity]
        await self.store.load()
        key = await asyncio.to_thread(load_or_make_key, self.dispatch_key_path)
        # Signed in each device's time, as its heartbeats measure it on the same clock.
        # Only to devices certified for the building; one that claims it is listed, not sent.
        self.dispatch = Dispatch(
            key,
            self.ingest,
            self.devices_of,
            clock=self.clock,
            clocks=self.ingest.clocks,
            unverified_of=self.unverified_of,
            session_of=self.emergency_of,
        )
        if self._notify is not None:
            signer = await asyncio.to_thread(evidence_key, self.data_dir)
            outbox = await asyncio.to_thread(Outbox, self.data_dir / "notify.sqlite")
            self.notifier = Notifier(self._notify[0], outbox, signer, ssl=self._notify[1])
            await self.notifier.__aenter__()
            self.ingest.session_listeners.append(SessionNotices(self.notifier, self._meta_of))
        self.fingerprint = ensure_certificate(
            self.cert_path,
            self.key_path,
            common_name="breakglass receiver",
            hosts=[self.host, "localhost"],
        )
        self.ingest.fingerprint = self.fingerprint
        ssl_ctx = server_context(self.cert_path, self.key_path)
        # Bind first so that port 0 resolves to a real port before the origin is fixed.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:  # a port in use, an address not on this machine
            sock.close()
            await self.__aexit__(None, None, None)
            raise InvalidSettingError(
                f"--host {self.host} --port {self.port}: cannot listen there ({exc.strerror})"
            ) from None
        self.port = sock.getsockname()[1]
        self.ingest.origins = [self.origin]
        self._runner = web.AppRunner(self.make_app(), handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        self.site = GuardedSite(
            self._runner,
            sock,
            ssl_context=ssl_ctx,
            limits=self.limits,
            # No query strings in aiohttp's request log: a player link's token is a credential.
            handler_args={**self.limits.handler_args(), "access_log_class": QueryFreeAccessLogger},
        )
        await self.site.start()
        log.info("receiver listening on %s (TLS pin %s)", self.url, self.fingerprint)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.notifier is not None:
            await self.notifier.__aexit__(None, None, None)
        await self.store.aclose()


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())
