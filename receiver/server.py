"""The police receiver as one embeddable aiohttp server over TLS.

``async with Receiver(data_dir, host, port) as rx:`` generates the receiver's
self-signed certificate (``DATA/tls/``) and age identity (``DATA/age.key``,
mode 0600: it opens the sealed segments of the backfill lane) on first start,
opens the recording store (``DATA/recordings/``), reads the device allow-list
(``DATA/devices/<id>.pub``) and serves, on one TLS port:

- ``/v1/uplink``   the agents' uplink (WebSocket, see :mod:`agent.protocol`);
- ``/``, ``/api/sessions``, ``/v1/live/...``, ``/recordings/...`` the viewer.

Devices are accepted by their enrollment certificate when
``DATA/authority.pub`` names the district's authority
(:mod:`receiver.device_trust`; revocations in ``DATA/revocations.json``), or
by the allow-list. It keeps a copy of every device's audit trail (``DATA/audit/<device>.log``)
and can push signed triggers to connected devices
(:meth:`IngestServer.push_trigger`).

Agents pin :attr:`Receiver.fingerprint` and seal their segments to
:attr:`Receiver.age_recipient` (besides the district's recipient). Lifecycle follows aiohttp's
``AppRunner``/``TCPSite``; shared state hangs off typed ``web.AppKey`` values.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from types import TracebackType

from aiohttp import web

from provisioning.age_keys import load_identity, new_identity, recipient_of
from provisioning.tls import ensure_certificate, server_context
from receiver.audit_copy import AuditCopies
from receiver.device_trust import DeviceTrust
from receiver.ingest import AllowList, IngestServer
from receiver.recording import RecordingStore
from receiver.viewer import setup_viewer

log = logging.getLogger(__name__)

INGEST_KEY = web.AppKey("ingest", IngestServer)


class Receiver:
    """The receiver's lifecycle: certificate, store, allow-list, TLS listener."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 8443) -> None:
        self.data_dir = Path(data_dir)
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
        self.ingest = IngestServer(
            self.store,
            AllowList(self.devices_dir),
            [],
            audits=AuditCopies(self.data_dir / "audit"),
            trust=DeviceTrust(self.data_dir),
        )
        self._runner: web.AppRunner | None = None

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
        app = web.Application(client_max_size=64 * 1024)
        app[INGEST_KEY] = self.ingest
        app.router.add_get("/v1/uplink", self.ingest.handle)
        setup_viewer(app, self.store, self.ingest_feed)
        return app

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
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.ingest.origins = [self.origin]
        self._runner = web.AppRunner(self.make_app(), handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, ssl_context=ssl_ctx)
        await site.start()
        log.info("receiver listening on %s (TLS pin %s)", self.url, self.fingerprint)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.store.aclose()
