"""The agent's TOML configuration, validated whole at start.

Every error names the file, the key (``cameras[1].zone``) and the reason, so a
technician can fix it without reading code. Unknown keys are errors too: a
misspelt ``preroll_secs`` must not silently fall back to a default. Relative
paths are relative to the config file's folder.

Example (see ``docs/agent.example.toml``)::

    [device]
    id = "lincoln-pi-1"
    key = "device.key"
    state_dir = "state"

    [building]
    id = "lincoln-elementary"

    [receiver]
    url = "wss://receiver.example:8443/v1/uplink"
    tls_pin = "sha256:..."

    [store]
    recipients = ["age1...district", "age1...receiver"]

    [[cameras]]
    id = "front-door"
    zone = "exterior"
    source = "rtsp"
    url = "rtsp://10.0.0.20:554/stream1"

    [[buttons]]
    id = "office"
    pin = 17
    location = "Main office"
"""

from __future__ import annotations

import ipaddress
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.segment import SegmentError, parse_recipient

log = logging.getLogger(__name__)

Zone = Literal["exterior", "interior"]
ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_CONFIG_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class CameraConfig:
    """One camera: its id, zone and where its packets come from."""

    id: str
    zone: Zone
    source: str  # one of SOURCES
    width: int = 640
    height: int = 480
    fps: float = 15.0
    #: The GOP of an encoder the agent drives (picamera, synthetic), at most
    #: :data:`MAX_KEYFRAME_INTERVAL_S`; an IP camera keeps its own (set it to 1-2 s).
    keyframe_interval_s: float = 1.0
    #: rtsp: the camera's URL (may hold credentials: never logged whole).
    url: str | None = None
    #: file: the video file to loop.
    path: Path | None = None
    #: Seconds without a packet before the camera is marked ``fault`` (and audited).
    watchdog_s: float = 5.0


SOURCES = ("synthetic", "rtsp", "file", "picamera")
#: The sources whose encoder the agent drives (``keyframe_interval_s`` sets their GOP).
DRIVEN = ("synthetic", "picamera")
#: The longest keyframe interval the agent gives an encoder it drives: a press sends up
#: to one keyframe interval more pre-roll than ``preroll_s`` (H.264 starts at a
#: keyframe). A longer ``keyframe_interval_s`` (accepted up to 10, as it was) is used as
#: this, with a warning: an update must not turn a working config into one that stops
#: the agent, and with it the buttons.
MAX_KEYFRAME_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The sealed segment store: where, sealed to whom, and how long it keeps footage."""

    directory: Path
    #: age X25519 recipients (``age1...``): the district's and the receiver's.
    recipients: tuple[str, ...]
    segment_s: float = 4.0
    max_age_s: float = 72 * 3600.0
    quota_bytes: int = 8 * 1024**3
    #: Unpinned footage goes before the disk has less free (the trail and state share it).
    min_free_bytes: int = 256 * 1024**2


@dataclass(frozen=True, slots=True)
class ButtonConfig:
    """One physical panic button and the room it is in."""

    id: str
    pin: int | str
    location: str
    hold_s: float = 0.0
    debounce_s: float = 0.05


@dataclass(frozen=True, slots=True)
class TrustConfig:
    """Who may send remote triggers: the district authority and its signed key list."""

    #: The district authority's Ed25519 public key (PEM); None: remote triggers are off.
    authority: Path | None = None
    #: The signed trigger-key list to install at start (a newer one may arrive later).
    trigger_keys: Path | None = None


@dataclass(frozen=True, slots=True)
class LocalApiConfig:
    """The local API on the school LAN (HTTPS with the device's own certificate)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8443
    #: Pairing by setup code is open this long after start (0: never).
    pairing_window_s: float = 900.0
    #: Holding a panic button this long reopens pairing while unprovisioned.
    pairing_hold_s: float = 10.0


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """mDNS advertisement of the Local API (``_breakglass._tcp``) on the school LAN."""

    enabled: bool = True
    #: IPv4 addresses of the interfaces to advertise on; the default keeps mDNS on
    #: the machine (a deployed agent lists its LAN address).
    interfaces: tuple[str, ...] = ("127.0.0.1",)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The whole validated agent configuration."""

    path: Path
    device_id: str
    device_key: Path
    state_dir: Path
    building: str
    receiver_url: str
    receiver_pin: str
    cameras: tuple[CameraConfig, ...]
    buttons: tuple[ButtonConfig, ...]
    store: StoreConfig
    #: Share the exterior cameras with the receiver continuously (a per-building policy).
    share_exterior: bool = False
    trust: TrustConfig = TrustConfig()
    #: The enrollment certificate the district's authority signed for this device
    #: (sent in the uplink hello; a receiver that trusts the authority needs it).
    enrollment: Path | None = None
    local_api: LocalApiConfig = LocalApiConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    #: False: first boot, waiting for a technician to pair and enroll it (no building,
    #: receiver or cameras yet; :mod:`agent.first_boot` runs instead of the agent).
    provisioned: bool = True
    led_pin: int | str | None = None
    buzzer_pin: int | str | None = None
    pin_factory: str | None = None  # None: gpiozero's default; "mock" for demos and tests
    session_duration_s: float = 3600.0
    preroll_s: float = 30.0
    preroll_max_bytes: int = 64 * 1024 * 1024
    heartbeat_s: float = 5.0
    reconnect_max_s: float = 10.0
    unacked_max_bytes: int = 64 * 1024 * 1024

    @property
    def receiver_origin(self) -> str:
        """``wss://host:port`` of the receiver, bound into the hello signature."""
        parts = urlsplit(self.receiver_url)
        return f"{parts.scheme}://{parts.netloc}"


class _Reader:
    """Walks one table, remembering which keys were read, to report the rest."""

    def __init__(self, file: Path, where: str, table: Any) -> None:
        self.file, self.where = file, where
        if not isinstance(table, dict):
            self.fail("", "must be a table")
        self.table: dict[str, Any] = table
        self.seen: set[str] = set()

    def fail(self, key: str, reason: str) -> ConfigError:
        name = f"{self.where}.{key}" if key and self.where else (key or self.where)
        raise ConfigError(f"{self.file}: {name}: {reason}", key=name)

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if default is _REQUIRED:
                self.fail(key, "missing (required)")
            return default
        value = self.table[key]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            self.fail(key, f"must be {what}, got {type(value).__name__} {value!r}")
        return value

    def text(self, key: str, default: Any = None, *, pattern: re.Pattern[str] | None = None) -> Any:
        value = self._get(key, default, (str,), "a string")
        if isinstance(value, str):
            if not value or len(value) > 512 or not value.isprintable():
                self.fail(key, "must be non-empty printable text of at most 512 characters")
            if pattern is not None and not pattern.match(value):
                self.fail(key, f"{value!r} does not match {pattern.pattern}")
        return value

    def number(self, key: str, default: Any, *, low: float, high: float) -> float:
        value = self._get(key, default, (int, float), "a number")
        if not low <= value <= high:
            self.fail(key, f"{value} is outside {low}..{high}")
        return float(value)

    def integer(self, key: str, default: Any, *, low: int, high: int) -> int:
        value = self._get(key, default, (int,), "an integer")
        if not low <= value <= high:
            self.fail(key, f"{value} is outside {low}..{high}")
        return int(value)

    def pin(self, key: str, default: Any = None) -> int | str | None:
        value = self._get(key, default, (int, str), "a GPIO number or name like 'GPIO17'")
        if isinstance(value, int) and not 0 <= value <= 53:
            self.fail(key, f"GPIO {value} does not exist on a Raspberry Pi (0..53)")
        return value  # type: ignore[no-any-return]

    def path(self, key: str, default: Any = None) -> Path:
        value = self.text(key, default)
        path = Path(value)
        return path if path.is_absolute() else self.file.parent / path

    def table_at(self, key: str) -> _Reader:
        self.seen.add(key)
        return _Reader(
            self.file, f"{self.where}.{key}" if self.where else key, self.table.get(key, {})
        )

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            self.fail(unknown[0], "unknown key (misspelt?)")


_REQUIRED: Any = object()
_TOP_LEVEL = (
    "device",
    "building",
    "receiver",
    "emergency",
    "uplink",
    "gpio",
    "store",
    "cameras",
    "buttons",
    "trust",
    "local_api",
    "discovery",
)


def load_config(path: Path) -> AgentConfig:
    """Read and validate a complete agent configuration at ``path`` (no enrollment applied;
    :func:`agent.boot.load_agent_config` is what ``breakglass agent run`` uses)."""
    path = Path(path)
    return parse_config(read_toml(path), path.resolve())


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``, size-limited; ConfigError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})", key="") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes", key="")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", key="") from exc
    return doc


def device_paths(doc: Mapping[str, Any], path: Path) -> tuple[Path, Path, Path | None]:
    """``[device]`` key, state folder and enrollment certificate (None: none configured),
    read ahead of the whole document (the state folder says whether the device is
    enrolled; a certificate, which key it must have)."""
    device = _Reader(path, "device", doc.get("device", {}))
    certificate = None if device.text("enrollment", None) is None else device.path("enrollment")
    return device.path("key", _REQUIRED), device.path("state_dir", "state"), certificate


def parse_config(
    doc: Mapping[str, Any],
    path: Path,
    *,
    default_id: str | None = None,
    provisioned: bool = True,
) -> AgentConfig:
    """Validate an already parsed TOML document (``path`` names it in errors).

    ``default_id``: the device id when ``[device] id`` is absent (derived from its key).
    ``provisioned=False``: a first-boot configuration, without building, receiver,
    recipients or cameras (a technician's enrollment brings them).
    """
    needed = _REQUIRED if provisioned else None
    top = _Reader(path, "", dict(doc))
    # A misspelt table name explains the "missing" errors it causes: report it first.
    top.seen = set(_TOP_LEVEL)
    top.done()
    top.seen = set()
    device = top.table_at("device")
    device_id = device.text("id", default_id or _REQUIRED, pattern=ID_RE)
    device_key = device.path("key", _REQUIRED)
    state_dir = device.path("state_dir", "state")
    enrollment = None if device.text("enrollment", None) is None else device.path("enrollment")
    device.done()

    building = top.table_at("building")
    building_id = building.text("id", needed, pattern=ID_RE) or ""
    share_exterior = building._get("share_exterior", False, (bool,), "true or false")
    building.done()

    receiver = top.table_at("receiver")
    url = receiver.text("url", needed) or ""
    parts = urlsplit(url)
    if provisioned and (parts.scheme != "wss" or not parts.hostname):
        receiver.fail("url", f"{url!r} must be a wss:// URL (the uplink is TLS only)")
    pin = receiver.text("tls_pin", needed, pattern=re.compile(r"^sha256:[0-9a-f]{64}$")) or ""
    receiver.done()

    emergency = top.table_at("emergency")
    duration = emergency.number("duration_s", 3600, low=10, high=24 * 3600)
    preroll_s = emergency.number("preroll_s", 30, low=0, high=600)
    preroll_max = emergency.integer("preroll_max_mb", 64, low=1, high=4096) * 1024 * 1024
    emergency.done()

    trust_table = top.table_at("trust")
    authority = trust_table.text("authority", None)
    keylist = trust_table.text("trigger_keys", None)
    if keylist is not None and authority is None:
        trust_table.fail("trigger_keys", "a trigger-key list needs [trust] authority to verify it")
    trust = TrustConfig(
        authority=None if authority is None else trust_table.path("authority"),
        trigger_keys=None if keylist is None else trust_table.path("trigger_keys"),
    )
    trust_table.done()

    api = top.table_at("local_api")
    local_api = LocalApiConfig(
        enabled=api._get("enabled", True, (bool,), "true or false"),
        host=api.text("host", "127.0.0.1"),
        port=api.integer("port", 8443, low=0, high=65535),
        pairing_window_s=api.number("pairing_window_s", 900, low=0, high=24 * 3600),
        pairing_hold_s=api.number("pairing_hold_s", 10, low=1, high=60),
    )
    api.done()

    mdns = top.table_at("discovery")
    interfaces = mdns._get("interfaces", ["127.0.0.1"], (list,), "a list of IPv4 addresses")
    for i, address in enumerate(interfaces):
        try:
            ipaddress.IPv4Address(address)
        except (ipaddress.AddressValueError, ValueError):
            mdns.fail(f"interfaces[{i}]", f"{str(address)[:40]!r} is not an IPv4 address")
    discovery = DiscoveryConfig(
        enabled=mdns._get("enabled", True, (bool,), "true or false"),
        interfaces=tuple(interfaces),
    )
    mdns.done()

    uplink = top.table_at("uplink")
    heartbeat = uplink.number("heartbeat_s", 5, low=0.5, high=300)
    reconnect_max = uplink.number("reconnect_max_s", 10, low=0.5, high=600)
    unacked_max = uplink.integer("unacked_max_mb", 64, low=8, high=65536) * 1024 * 1024
    uplink.done()

    store = _store(top.table_at("store"), needed)

    gpio = top.table_at("gpio")
    factory = gpio.text("pin_factory", None)
    if factory not in (None, "mock", "lgpio", "rpigpio", "pigpio", "native"):
        gpio.fail("pin_factory", f"{factory!r} is not one of mock, lgpio, rpigpio, pigpio, native")
    led_pin = gpio.pin("led_pin", None)
    buzzer_pin = gpio.pin("buzzer_pin", None)
    gpio.done()

    cameras = tuple(camera_from_table(path, i, t) for i, t in enumerate(_array(top, "cameras")))
    if provisioned and not cameras:
        top.fail("cameras", "at least one [[cameras]] entry is needed")
    _unique(top, "cameras", [c.id for c in cameras])
    buttons = tuple(_button(path, i, t) for i, t in enumerate(_array(top, "buttons")))
    _unique(top, "buttons", [b.id for b in buttons])
    _pins_once(top, led_pin, buzzer_pin, buttons)
    top.done()
    return AgentConfig(
        path=path,
        device_id=device_id,
        device_key=device_key,
        state_dir=state_dir,
        enrollment=enrollment,
        building=building_id,
        receiver_url=url,
        receiver_pin=pin,
        cameras=cameras,
        buttons=buttons,
        store=store,
        share_exterior=share_exterior,
        trust=trust,
        local_api=local_api,
        discovery=discovery,
        led_pin=led_pin,
        buzzer_pin=buzzer_pin,
        pin_factory=factory,
        session_duration_s=duration,
        preroll_s=preroll_s,
        preroll_max_bytes=preroll_max,
        heartbeat_s=heartbeat,
        reconnect_max_s=reconnect_max,
        unacked_max_bytes=unacked_max,
        provisioned=provisioned,
    )


def _array(top: _Reader, key: str) -> list[Any]:
    value = top._get(key, [], (list,), "an array of tables ([[" + key + "]])")
    return list(value)


def _unique(top: _Reader, key: str, values: list[str], what: str = "id") -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            top.fail(f"{key}[{i}].{what}", f"{value!r} is used twice")
        seen.add(value)


def _pins_once(
    top: _Reader,
    led_pin: int | str | None,
    buzzer_pin: int | str | None,
    buttons: tuple[ButtonConfig, ...],
) -> None:
    """Each GPIO pin has one use: a button, the LED or the buzzer (a clash found here names
    both keys; gpiozero would find it after the store is opened, naming neither)."""
    uses = [("gpio.led_pin", led_pin), ("gpio.buzzer_pin", buzzer_pin)]
    uses += [(f"buttons[{i}].pin", b.pin) for i, b in enumerate(buttons)]
    seen: dict[str, str] = {}
    for key, pin in uses:
        if pin is None:
            continue
        # 17, "GPIO17" and "BCM17" are one pin; BOARD numbers only gpiozero can map.
        name = f"GPIO{pin}" if isinstance(pin, int) else pin.upper().replace("BCM", "GPIO", 1)
        if name in seen:
            top.fail(key, f"pin {pin!r} is already used by {seen[name]}")
        seen[name] = key


def _store(r: _Reader, needed: Any) -> StoreConfig:
    recipients = r._get("recipients", needed or [], (list,), "a list of age recipients (age1...)")
    if not recipients and needed is _REQUIRED:
        r.fail(
            "recipients",
            "age recipients are needed: the district's, and the receiver's (which must "
            "open what the store keeps through an outage; breakglass receiver serve prints it)",
        )
    for i, text in enumerate(recipients):
        where = f"recipients[{i}]"
        if not isinstance(text, str):
            r.fail(where, f"must be a string, got {type(text).__name__}")
        try:
            parse_recipient(text, where=where)
        except SegmentError:
            r.fail(where, f"{text[:80]!r} is not an age X25519 recipient (age1...)")
    store = StoreConfig(
        directory=r.path("dir", "store"),
        recipients=tuple(recipients),
        segment_s=r.number("segment_s", 4, low=1, high=30),
        max_age_s=r.number("retention_h", 72, low=0.01, high=24 * 365) * 3600,
        quota_bytes=r.integer("quota_mb", 8192, low=16, high=2**24) * 1024 * 1024,
        min_free_bytes=r.integer("min_free_mb", 256, low=0, high=2**24) * 1024 * 1024,
    )
    r.done()
    return store


def camera_from_table(path: Path, i: int, table: Any) -> CameraConfig:
    """One ``[[cameras]]`` table (``cameras[i]`` in errors), validated."""
    r = _Reader(path, f"cameras[{i}]", table)
    source = r.text("source", _REQUIRED)
    if source not in SOURCES:
        r.fail("source", f"{source!r} is not one of {', '.join(SOURCES)}")
    url = r.text("url", _REQUIRED if source == "rtsp" else None)
    if url is not None and (source != "rtsp" or urlsplit(url).scheme not in ("rtsp", "rtsps")):
        r.fail("url", "only an rtsp camera has a url, and it must be rtsp:// or rtsps://")
    file = r.path("path", _REQUIRED) if source == "file" else None
    keyframe_interval_s = r.number("keyframe_interval_s", 1.0, low=0.1, high=10)
    if source in DRIVEN and keyframe_interval_s > MAX_KEYFRAME_INTERVAL_S:
        log.warning(
            "%s: cameras[%d].keyframe_interval_s = %g is used as %g s: a press sends up to one"
            " keyframe interval more pre-roll than preroll_s",
            path, i, keyframe_interval_s, MAX_KEYFRAME_INTERVAL_S,
        )  # fmt: skip
        keyframe_interval_s = MAX_KEYFRAME_INTERVAL_S
    camera = CameraConfig(
        id=r.text("id", _REQUIRED, pattern=ID_RE),
        zone=r.text("zone", _REQUIRED),
        source=source,
        url=url,
        path=file,
        watchdog_s=r.number("watchdog_s", 5, low=0.5, high=600),
        width=r.integer("width", 640, low=16, high=4096),
        height=r.integer("height", 480, low=16, high=4096),
        fps=r.number("fps", 15, low=1, high=60),
        keyframe_interval_s=keyframe_interval_s,
    )
    if camera.zone not in ("exterior", "interior"):
        r.fail("zone", f"{camera.zone!r} must be 'exterior' or 'interior'")
    if camera.width % 2 or camera.height % 2:
        r.fail("width", "width and height must be even (H.264 4:2:0)")
    r.done()
    return camera


def _button(path: Path, i: int, table: Any) -> ButtonConfig:
    r = _Reader(path, f"buttons[{i}]", table)
    button = ButtonConfig(
        id=r.text("id", _REQUIRED, pattern=ID_RE),
        pin=_required_pin(r.pin("pin", _REQUIRED)),
        location=r.text("location", _REQUIRED),
        hold_s=r.number("hold_s", 0.0, low=0, high=10),
        debounce_s=r.number("debounce_s", 0.05, low=0, high=2),
    )
    r.done()
    return button


def _required_pin(pin: int | str | None) -> int | str:
    assert pin is not None  # _get raised already when the key was missing
    return pin
