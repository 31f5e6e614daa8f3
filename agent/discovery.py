"""mDNS/DNS-SD advertisement of an agent and discovery of agents (DESIGN.md "Discovery").

Every agent advertises one service of type :data:`SERVICE_TYPE`
(``_breakglass._tcp.local.``): the instance is named after the device id
(``lincoln-pi-1._breakglass._tcp.local.``), its SRV record points at the
Local API's port on ``<device-id>.local.`` (or the configured hostname), the A
records are the addresses of the configured interfaces, and the TXT record is

=======  ===========================================================================
``id``   the device id (``lincoln-pi-1``)
``bld``  the building id, empty while the agent is unprovisioned
``st``   ``unprovisioned`` | ``armed`` | ``emergency`` | ``fault``
``v``    the discovery protocol version (:data:`VERSION`, ``"1"``)
``fp``   the pin of the Local API's TLS certificate (``sha256:`` + 64 hex digits)
=======  ===========================================================================

re-announced (``async_update_service``) whenever it changes, and withdrawn
with goodbye packets when the agent stops. A technician's laptop finds the
agents with :func:`discover` (``breakglass provision discover``); the ``fp``
it prints is what ``breakglass trigger send --pin`` needs. The record is
unauthenticated: anyone on the LAN can advertise anything, which is why the
pin is only a *hint* to be confirmed against the enrollment, never trusted to
authorise anything by itself.

Interfaces are explicit IPv4 addresses (``"10.0.0.5"``, ``"127.0.0.1"``),
never "all interfaces": zeroconf is started with exactly those
(``AsyncZeroconf(interfaces=[...], ip_version=IPVersion.V4Only)``). An address
that no interface of this machine holds, or an interface that cannot join the
mDNS group (down), is a :class:`DiscoveryError` naming it, rather than
zeroconf's silent "interface not added". Packets go out only on those
interfaces. Receiving follows Linux's rules: zeroconf's listening socket is
bound to ``0.0.0.0:5353``, so it also hears the group on interfaces where
another local program (avahi-daemon) joined it. ``IP_MULTICAST_ALL`` off would
stop that, but with two such sockets on port 5353 in one network namespace
the kernel then delivered the group's packets to the wrong one (seen on Linux
6.18): it is deliberately left on.

Everything read from the LAN is untrusted: :func:`parse_txt` checks sizes,
encodings and every value, and :func:`discover` skips (and logs, with the
reason) any service whose TXT, port or addresses are malformed, and stops
collecting at :data:`MAX_SERVICES`. The sans-IO part (:func:`txt_record`,
:func:`parse_txt`) is tested without a network; the rest runs in tests only
on loopback inside private network namespaces.

Name conflicts (two services claiming the same instance name) are settled by
zeroconf's probing with ``allow_name_change`` before anything is announced: the
later one becomes ``<device-id>-2._breakglass._tcp.local.`` on host
``<device-id>-2.local.`` (unless a hostname was configured) and a warning is
logged. The TXT ``id`` stays the device id, so browsers show both under the
same device id, and :func:`discover` warns about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from zeroconf import (
    DNSQuestionType,
    IPVersion,
    NotRunningException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.errors import AgentError

__all__ = [
    "MAX_SERVICES",
    "SERVICE_TYPE",
    "STATES",
    "VERSION",
    "Advertiser",
    "Discovered",
    "DiscoveryError",
    "TxtError",
    "discover",
    "discovered_from",
    "parse_txt",
    "txt_record",
]

log = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_breakglass._tcp.local."
#: The discovery protocol version advertised in ``v``.
VERSION: Final = "1"
STATES: Final = ("unprovisioned", "armed", "emergency", "fault")
#: At most this many services are collected by one :func:`discover`.
MAX_SERVICES: Final = 1024
#: At most this many interfaces (a Pi has one or two; a laptop a few).
MAX_INTERFACES: Final = 16
#: Limits on a TXT record read from the LAN (RFC 6763 section 6: a string is at
#: most 255 bytes; DNS-SD recommends a whole record well under 1300 bytes).
MAX_TXT_ENTRIES: Final = 32
MAX_TXT_BYTES: Final = 1300
MAX_TXT_STRING: Final = 255
#: How long :func:`discover` gives services to resolve after browsing.
RESOLVE_TIMEOUT_S: Final = 1.5
#: Longest time to wait for zeroconf to start (sockets) before giving up.
START_TIMEOUT_S: Final = 5.0

_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # as agent.config.ID_RE
_FP_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_VERSION_RE: Final = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,15}$")
_LABEL_RE: Final = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")
#: Ask for multicast answers (QM), never unicast (QU): a unicast answer goes to
#: port 5353 of this host, where another mDNS stack (avahi-daemon on the
#: technician's laptop, a second process on the same address) may receive it
#: instead of us (RFC 6762 section 15.1). Costs a little more multicast.
_QUESTION: Final = DNSQuestionType.QM


class DiscoveryError(AgentError):
    """mDNS advertisement or discovery cannot work (names the interface or the value)."""


class TxtError(DiscoveryError):
    """A service read from the LAN is malformed (TXT, port, addresses); ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed TXT record: {reason}")
        self.reason = reason


# -- sans-IO: the TXT record ---------------------------------------------------------


def txt_record(
    device_id: str,
    building: str,
    state: str,
    fingerprint: str,
    *,
    version: str = VERSION,
) -> dict[str, str]:
    """The TXT properties an agent advertises, validated (:class:`TxtError` if not).

    ``building`` is empty while the agent is unprovisioned.
    """
    txt = {"id": device_id, "bld": building, "st": state, "v": version, "fp": fingerprint}
    _check_values(txt)
    return txt


def parse_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """Validate TXT properties read from the LAN (as zeroconf decodes them).

    Returns ``{"id", "bld", "st", "v", "fp"}``; unknown keys are ignored (a
    later version may add some). Raises :class:`TxtError` with the reason for
    anything malformed: too many or too long entries, keys or values that are
    not ASCII/UTF-8, a missing key, or a value that does not validate. Keys
    compare case-insensitively (RFC 6763 section 6.4); a repeated key is refused.
    """
    if len(properties) > MAX_TXT_ENTRIES:
        raise TxtError(f"{len(properties)} entries (at most {MAX_TXT_ENTRIES})")
    total = 0
    seen: dict[str, str] = {}
    for raw_key, raw_value in properties.items():
        if not isinstance(raw_key, bytes) or not (
            raw_value is None or isinstance(raw_value, bytes)
        ):
            raise TxtError("entries must be bytes")
        size = len(raw_key) + (0 if raw_value is None else 1 + len(raw_value))
        if size > MAX_TXT_STRING:
            raise TxtError(f"an entry of {size} bytes (at most {MAX_TXT_STRING})")
        total += 1 + size
        if total > MAX_TXT_BYTES:
            raise TxtError(f"more than {MAX_TXT_BYTES} bytes")
        if not raw_key:
            raise TxtError("an empty key")
        try:
            key = raw_key.decode("ascii").lower()
        except UnicodeDecodeError:
            raise TxtError(f"a key that is not ASCII: {_show(raw_key)}") from None
        if not key.isprintable() or "=" in key:
            raise TxtError(f"a key that is not printable: {_show(raw_key)}")
        if key not in _REQUIRED_KEYS:
            continue
        if key in seen:
            raise TxtError(f"key {key!r} appears twice")
        if raw_value is None:
            raise TxtError(f"key {key!r} has no value")
        try:
            seen[key] = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise TxtError(f"{key}: not UTF-8: {_show(raw_value)}") from None
    missing = [k for k in _REQUIRED_KEYS if k not in seen]
    if missing:
        raise TxtError(f"missing key(s) {', '.join(missing)}")
    txt = {k: seen[k] for k in _REQUIRED_KEYS}
    _check_values(txt)
    return txt


_REQUIRED_KEYS: Final = ("id", "bld", "st", "v", "fp")


def _check_values(txt: Mapping[str, str]) -> None:
    if not _ID_RE.match(txt["id"]):
        raise TxtError(f"id {_show(txt['id'])}: not a device id ([a-z0-9][a-z0-9_-]{{0,31}})")
    if txt["bld"] and not _ID_RE.match(txt["bld"]):
        raise TxtError(f"bld {_show(txt['bld'])}: not a building id (or empty)")
    if txt["st"] not in STATES:
        raise TxtError(f"st {_show(txt['st'])}: not one of {', '.join(STATES)}")
    if not _VERSION_RE.match(txt["v"]):
        raise TxtError(f"v {_show(txt['v'])}: not a version")
    if not _FP_RE.match(txt["fp"]):
        raise TxtError(f"fp {_show(txt['fp'])}: not a certificate pin (sha256:<64 hex>)")


def _show(value: str | bytes, limit: int = 40) -> str:
    """A value from the network made safe for a log line: printable and bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -- interfaces ----------------------------------------------------------------------


def _check_interfaces(interfaces: Sequence[str]) -> list[str]:
    """The interface addresses, each checked to be an IPv4 address this machine holds."""
    if isinstance(interfaces, str):
        interfaces = [interfaces]
    if not interfaces:
        raise DiscoveryError("no interface given: name the address of at least one interface")
    if len(interfaces) > MAX_INTERFACES:
        raise DiscoveryError(f"{len(interfaces)} interfaces (at most {MAX_INTERFACES})")
    checked: list[str] = []
    for text in interfaces:
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            raise DiscoveryError(
                f"interface {text!r}: not an IPv4 address (give the interface's address, "
                "e.g. 10.0.0.5 or 127.0.0.1)"
            ) from None
        if address.is_unspecified or address.is_multicast or address == _BROADCAST:
            raise DiscoveryError(f"interface {text}: not the address of one interface")
        # Binding (no packet is sent) tells whether an interface holds the address.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((str(address), 0))
            except OSError as exc:
                reason = (
                    "no network interface of this machine has this address"
                    if exc.errno == errno.EADDRNOTAVAIL
                    else exc.strerror
                )
                raise DiscoveryError(f"interface {address}: {reason}") from None
        if str(address) not in checked:
            checked.append(str(address))
    return checked


async def _start_zeroconf(interfaces: list[str]) -> AsyncZeroconf:
    """AsyncZeroconf on exactly ``interfaces`` (IPv4), with every one of them up."""
    names = ", ".join(interfaces)
    try:
        aiozc = AsyncZeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
    except OSError as exc:
        raise DiscoveryError(
            f"interface {names}: cannot join the mDNS group ({exc.strerror}; is it up?)"
        ) from exc
    try:
        try:
            await aiozc.zeroconf.async_wait_for_start(timeout=START_TIMEOUT_S)
        except NotRunningException:
            raise DiscoveryError(
                f"interface {names}: mDNS did not start within {START_TIMEOUT_S:g} s"
            ) from None
        up = {t.sock_name[0] for t in aiozc.zeroconf.engine.senders}
        down = [i for i in interfaces if i not in up]
        if down:
            raise DiscoveryError(
                f"interface {', '.join(down)}: cannot send mDNS on it (down, or no multicast?)"
            )
    except BaseException:
        await aiozc.async_close()
        raise
    return aiozc


# -- the advertiser ------------------------------------------------------------------


class Advertiser:
    """Advertises one agent's Local API over mDNS on the given interfaces.

    ``start()`` probes for the name and announces the service (it returns once
    the announcements are sent); ``set_state()`` re-announces when the TXT
    changes; ``close()`` withdraws it (goodbye packets). Also an async context
    manager.
    """

    def __init__(
        self,
        device_id: str,
        building: str,
        port: int,
        fingerprint: str,
        *,
        interfaces: Sequence[str],
        state: str = "armed",
        hostname: str | None = None,
    ) -> None:
        self._txt = txt_record(device_id, building, state, fingerprint)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise DiscoveryError(f"port {port!r}: not a TCP port (1..65535)")
        if isinstance(interfaces, str):
            interfaces = [interfaces]
        self.interfaces = list(interfaces)
        if not self.interfaces:
            raise DiscoveryError("no interface given: name the address of at least one interface")
        self.device_id = device_id
        self.port = port
        self._hostname = hostname
        self.server = _server_name(hostname if hostname is not None else device_id)
        #: The advertised instance name (zeroconf may rename it on a conflict).
        self.name = f"{device_id}.{SERVICE_TYPE}"
        self._addresses: list[str] = []
        self._aiozc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def state(self) -> str:
        """The advertised state (``st``)."""
        return self._txt["st"]

    @property
    def txt(self) -> dict[str, str]:
        """The advertised TXT properties."""
        return dict(self._txt)

    async def __aenter__(self) -> Advertiser:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self.name,
            port=self.port,
            properties=dict(self._txt),
            server=self.server,
            addresses=self._addresses,
        )

    async def start(self) -> None:
        """Bind to the interfaces, probe for the name and announce the service."""
        async with self._lock:
            if self._closed:
                raise DiscoveryError("the advertiser is closed")
            if self._aiozc is not None:
                return
            self._addresses = _check_interfaces(self.interfaces)
            aiozc = await _start_zeroconf(self._addresses)
            try:
                # Probe first (zeroconf renames on a conflict: NAME-2, ...), so that a
                # renamed instance also gets its own host name before anything is
                # announced: two hosts under one name would merge their addresses.
                info = self._service_info()
                requested = info.name
                await aiozc.zeroconf.async_check_service(info, allow_name_change=True)
                if info.name != requested:
                    self.name = info.name
                    if self._hostname is None:
                        self.server = _server_name(info.name.removesuffix("." + SERVICE_TYPE))
                    log.warning(
                        "mDNS: the name %s is taken on the network; advertising as %s (%s)",
                        requested,
                        self.name,
                        self.server,
                    )
                    info = self._service_info()
                # Probed just now: register without probing again.
                announced = await aiozc.async_register_service(info, cooperating_responders=True)
                await announced
            except BaseException:
                await aiozc.async_close()
                raise
            self._aiozc, self._info = aiozc, info
            log.info(
                "mDNS: advertising %s on %s port %d (st=%s)",
                self.name,
                ", ".join(self._addresses),
                self.port,
                self.state,
            )

    async def set_state(self, state: str) -> bool:
        """Advertise ``state``; re-announces only if the TXT changed (returns whether)."""
        async with self._lock:
            txt = txt_record(self.device_id, self._txt["bld"], state, self._txt["fp"])
            if txt == self._txt:
                return False
            self._txt = txt
            if self._aiozc is None:
                return True  # announced by start()
            self._info = self._service_info()
            announced = await self._aiozc.async_update_service(self._info)
            await announced
            log.info("mDNS: %s now st=%s", self.name, state)
            return True

    async def close(self) -> None:
        """Withdraw the service (goodbye packets) and release the sockets. Idempotent."""
        async with self._lock:
            self._closed = True
            aiozc, info = self._aiozc, self._info
            self._aiozc = self._info = None
            if aiozc is None:
                return
            try:
                if info is not None:
                    goodbyes = await aiozc.async_unregister_service(info)
                    await goodbyes
            finally:
                await aiozc.async_close()
            log.info("mDNS: %s withdrawn", self.name)


def _server_name(hostname: str) -> str:
    """``name.local.`` from ``name``, ``name.local`` or ``name.local.`` (validated)."""
    name = hostname.removesuffix(".").removesuffix(".local")
    labels = name.split(".")
    if len(name) > 200 or not all(_LABEL_RE.match(label) for label in labels):
        raise DiscoveryError(f"hostname {hostname!r}: not a host name (letters, digits, - and _)")
    return f"{name}.local."


# -- discovery -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Discovered:
    """One agent found on the network (values validated by :func:`parse_txt`)."""

    #: The mDNS instance name (``lincoln-pi-1._breakglass._tcp.local.``).
    name: str
    device_id: str
    building: str
    state: str
    version: str
    #: The Local API certificate pin (``sha256:...``).
    fingerprint: str
    addresses: tuple[str, ...]
    port: int


def discovered_from(info: AsyncServiceInfo) -> Discovered:
    """Validate a resolved service (:class:`TxtError` with the reason if malformed)."""
    txt = parse_txt(info.properties)
    port = info.port
    if port is None or not 0 < port < 65536:
        raise TxtError(f"port {port!r} out of range")
    addresses = tuple(sorted(set(info.parsed_addresses(IPVersion.V4Only))))[:MAX_INTERFACES]
    if not addresses:
        raise TxtError("no IPv4 address")
    return Discovered(
        name=info.name,
        device_id=txt["id"],
        building=txt["bld"],
        state=txt["st"],
        version=txt["v"],
        fingerprint=txt["fp"],
        addresses=addresses,
        port=port,
    )


async def discover(
    *,
    interfaces: Sequence[str],
    timeout_s: float,
    resolve_timeout_s: float = RESOLVE_TIMEOUT_S,
) -> list[Discovered]:
    """Browse for agents on ``interfaces`` for ``timeout_s``; sorted by device id.

    Services seen are then resolved (most from the answers already cached),
    each within ``resolve_timeout_s``, so this returns after at most
    ``timeout_s + resolve_timeout_s``. Malformed services are skipped with a
    logged reason; at most :data:`MAX_SERVICES` are collected. Services that
    said goodbye during the browse are left out.
    """
    if not 0 < timeout_s <= 600:
        raise DiscoveryError(f"timeout {timeout_s!r}: must be 0 < timeout <= 600 seconds")
    if not 0 < resolve_timeout_s <= 60:
        raise DiscoveryError(f"resolve timeout {resolve_timeout_s!r}: must be 0 < t <= 60 seconds")
    addresses = _check_interfaces(interfaces)
    aiozc = await _start_zeroconf(addresses)
    names: dict[str, None] = {}  # insertion-ordered set
    overflow = False

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        nonlocal overflow
        if state_change is ServiceStateChange.Removed:
            names.pop(name, None)
        elif name not in names:
            if len(names) < MAX_SERVICES:
                names[name] = None
            elif not overflow:
                overflow = True
                log.warning("mDNS: more than %d services; ignoring the rest", MAX_SERVICES)

    try:
        browser = AsyncServiceBrowser(
            aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change], question_type=_QUESTION
        )
        try:
            await asyncio.sleep(timeout_s)  # the browse window itself, not a synchronisation
        finally:
            await browser.async_cancel()
        found = await _resolve_all(aiozc, list(names), resolve_timeout_s)
    finally:
        await aiozc.async_close()
    by_id: dict[str, int] = {}
    for item in found:
        by_id[item.device_id] = by_id.get(item.device_id, 0) + 1
    for device_id, count in by_id.items():
        if count > 1:
            log.warning("mDNS: %d services claim device id %s", count, device_id)
    return sorted(found, key=lambda d: (d.device_id, d.name))


async def _resolve_all(
    aiozc: AsyncZeroconf, names: list[str], timeout_s: float
) -> list[Discovered]:
    limit = asyncio.Semaphore(64)
    timeout_ms = timeout_s * 1000

    async def resolve(name: str) -> Discovered | None:
        async with limit:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            try:
                if not await info.async_request(aiozc.zeroconf, timeout_ms, _QUESTION):
                    log.info(
                        "mDNS: %s did not resolve in %.1f s; skipped", _show(name, 80), timeout_s
                    )
                    return None
                return discovered_from(info)
            except TxtError as exc:
                log.warning("mDNS: %s skipped: %s", _show(name, 80), exc.reason)
            except (ValueError, TypeError, UnicodeError) as exc:  # zeroconf choking on it
                log.warning("mDNS: %s skipped: %s", _show(name, 80), exc)
            return None

    tasks = [asyncio.create_task(resolve(n)) for n in names]
    if not tasks:
        return []
    # Each request is bounded by its own timeout; this bounds the whole phase too.
    done, pending = await asyncio.wait(tasks, timeout=timeout_s * (1 + len(tasks) // 64) + 1)
    for task in pending:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*pending, return_exceptions=True)
    return [r for t in done if (r := t.result()) is not None]


async def advertise_when_possible(
    make: Callable[[], Advertiser],
    on_fault: Callable[[BaseException], None],
    *,
    first_retry_s: float = 2.0,
    max_retry_s: float = 60.0,
) -> Advertiser:
    """Start an advertiser, retrying with backoff until it can (cancel to give up).

    At boot the LAN address may not be up yet when the agent starts (DHCP, a
    cable plugged in later): the agent retries rather than stay invisible to
    technicians until its next restart. ``on_fault`` is told of the first
    failure only (the audit trail needs one entry, not one per retry).
    """
    delay, reported = first_retry_s, False
    while True:
        advertiser = make()
        try:
            await advertiser.start()
            return advertiser
        except (DiscoveryError, OSError) as exc:
            await advertiser.close()
            if not reported:
                on_fault(exc)
                reported = True
            log.warning("mDNS advertisement: %s (retrying in %.0f s)", exc, delay)
        await asyncio.sleep(delay)  # a backoff, not a synchronisation
        delay = min(max_retry_s, delay * 2)
