"""The technician's enrollment commands: ``breakglass provision enroll|check|rotate``.

``enroll`` does the whole job for one device, or for every device of a plan:
find it (mDNS, or ``--to``), pair with its setup code (SPAKE2), sign its
enrollment certificate with the district authority key, send the bundle over
the paired channel (:mod:`agent.enrollment_state`) and wait until the device
is back, armed, with that version. A device that was enrolled before gets the
next version (re-enrollment); ``--version`` sets one.

``check`` pairs and saves one JPEG per camera (the device allows it only to a
paired technician, in its pairing window, and audits each snapshot). A camera
without a picture (one that is down has no footage) gets a ``FAILED`` line with
the device's code and reason; the other cameras are still saved, and the
device counts as failed.

``rotate`` renews an enrolled device's certificate with the next version and
a fresh validity, keeping building and cameras (and their sources on the
device), optionally with a new receiver URL or pin (the receiver's TLS
certificate was renewed), new recipients, or a new trigger-key list.

A plan (``--plan FILE``, TOML) enrolls many devices, a few at a time, with a
line of progress per step::

    authority = "district/authority.key"
    receiver_url = "wss://police.example:8443/v1/uplink"
    receiver_pin = "sha256:..."
    recipients = ["age1...district", "age1...receiver"]
    trigger_keys = "district/trigger-keys.json"   # optional
    interface = "10.0.0.23"                        # or per device: to = "https://..."

    [[devices]]
    id = "bg-3f2a9c0d11aa"
    setup_code = "1234-5678"
    building = "lincoln-elementary"
    cameras = ["front-door=exterior,rtsp://10.0.0.20/stream1", "hall-2=interior"]

Camera specs: ``ID=ZONE[,SOURCE]``: SOURCE is an ``rtsp://`` URL, ``picamera``
(the default) or ``synthetic`` (a test pattern, for demos).

Each command takes only its own options: ``check`` signs nothing (no
``--authority``), ``rotate`` keeps building, cameras and retention (no
``--building``, ``--camera``, ``--retention-h``).

Exit codes: 0 every device done; 1 a device refused or failed (for ``check``:
any of its cameras); 2 bad arguments or files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import aiohttp

from agent.discovery import discover
from breakglass.pairing_client import PairedDevice, pair, request
from provisioning import documents as d
from provisioning.enrollment import ID_RE, parse_enrollment, sign_enrollment
from provisioning.errors import ProvisioningError
from provisioning.keys import load_private_key, public_key_from_pem, raw_public
from provisioning.pairing import PairingError, normalise_code
from provisioning.tls import fingerprint_digest

DISCOVER_S: Final = 3.0
ARMED_TIMEOUT_S: Final = 60.0
PARALLEL: Final = 4
VALID_DAYS: Final = 365
#: Refusals after which no further request of a paired session can work (the session
#: ended, or the device cannot be reached): a camera check stops there.
SESSION_LOST: Final = frozenset(
    {"no_session", "bad_box", "unreachable", "man_in_the_middle", "pairing_closed",
     "rate_limited"}
)  # fmt: skip


class EnrollError(Exception):
    """One device could not be enrolled; ``code`` is stable."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Target:
    """One device to enroll, and how."""

    device: str
    setup_code: str
    building: str = ""
    cameras: tuple[tuple[str, str, dict[str, Any]], ...] = ()  # (id, zone, source table)
    to: str | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class District:
    """What every device of a run shares: the authority and the receiver."""

    authority: Path
    receiver_url: str = ""
    receiver_pin: str = ""
    recipients: tuple[str, ...] = ()
    retention_h: float = 72.0
    trigger_keys: Path | None = None
    interfaces: tuple[str, ...] = ("127.0.0.1",)
    valid_days: int = VALID_DAYS


def camera_spec(text: str) -> tuple[str, str, dict[str, Any]]:
    """``ID=ZONE[,SOURCE]`` -> (id, zone, the source's table)."""
    cid, _, rest = text.partition("=")
    zone, _, source = rest.partition(",")
    if not ID_RE.match(cid) or zone not in ("exterior", "interior"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ID=exterior|interior[,SOURCE]")
    if source.startswith(("rtsp://", "rtsps://")):
        return cid, zone, {"id": cid, "source": "rtsp", "url": source}
    if source in ("", "picamera", "synthetic"):
        return cid, zone, {"id": cid, "source": source or "picamera"}
    raise argparse.ArgumentTypeError(f"{text!r}: SOURCE is rtsp://..., picamera or synthetic")


Progress = Callable[[str, str], None]


async def find(device: str, district: District) -> str:
    """The Local API URL of ``device``, found by mDNS on the district's interfaces."""
    urls = await find_all(district)
    if device not in urls:
        raise EnrollError("not_found", f"{device} did not answer mDNS on {district.interfaces}")
    return urls[device]


async def find_all(district: District) -> dict[str, str]:
    """device id -> Local API URL of every agent answering mDNS (one browse)."""
    found = await discover(interfaces=district.interfaces, timeout_s=DISCOVER_S)
    return {a.device_id: f"https://{a.addresses[0]}:{a.port}" for a in found}


async def locate(targets: list[Target], district: District, progress: Progress) -> list[Target]:
    """Fill in ``to`` for the targets without one, from one mDNS browse for them all."""
    if all(t.to for t in targets):
        return targets
    urls = await find_all(district)
    progress("mdns", f"{len(urls)} agent(s) answered on {', '.join(district.interfaces)}")
    return [t if t.to or t.device not in urls else replace(t, to=urls[t.device]) for t in targets]


async def enroll_one(target: Target, district: District, progress: Progress) -> int:
    """Pair, certify, deliver and wait until armed; returns the version installed."""
    url = target.to or await find(target.device, district)
    progress(target.device, f"found at {url}")
    paired = await pair(url, target.device, target.setup_code)
    progress(target.device, f"paired (key {paired.kid})")
    version = target.version or (paired.enrollment_version or 0) + 1
    authority = load_private_key(district.authority)
    now = int(time.time())
    cert = sign_enrollment(
        authority,
        version=version,
        device=target.device,
        device_key=public_key_from_pem(paired.public_key_pem.encode("ascii")),
        building=target.building,
        receiver_url=district.receiver_url,
        receiver_pin=district.receiver_pin,
        recipients=list(district.recipients),
        cameras=[{"id": cid, "zone": zone} for cid, zone, _ in target.cameras],
        retention_h=district.retention_h,
        iat=now,
        exp=now + district.valid_days * 86400,
    )
    parse_enrollment(cert, authority.public_key(), now=now)
    bundle: dict[str, Any] = {
        "certificate": cert,
        "authority": d.b64url(raw_public(authority.public_key())),
        "cameras": [table for _, _, table in target.cameras],
    }
    return await _deliver(paired, bundle, district, version, progress)


async def rotate_one(target: Target, district: District, progress: Progress) -> int:
    """Renew an enrolled device's certificate (module docstring)."""
    url = target.to or await find(target.device, district)
    paired = await pair(url, target.device, target.setup_code)
    progress(target.device, f"paired (key {paired.kid})")
    if not paired.provisioned or paired.certificate is None:
        raise EnrollError("unprovisioned", f"{target.device} is not enrolled: enroll it first")
    authority = load_private_key(district.authority)
    old = parse_enrollment(paired.certificate, authority.public_key(), now=None)
    now = int(time.time())
    version = target.version or old.version + 1
    cert = sign_enrollment(
        authority,
        version=version,
        device=old.device,
        device_key=old.device_key,
        building=old.building,
        receiver_url=district.receiver_url or old.receiver_url,
        receiver_pin=district.receiver_pin or old.receiver_pin,
        recipients=list(district.recipients or old.recipients),
        cameras=[{"id": c, "zone": z} for c, z in old.cameras.items()],
        retention_h=old.retention_h,
        iat=now,
        exp=now + district.valid_days * 86400,
    )
    bundle = {"certificate": cert, "authority": d.b64url(raw_public(authority.public_key()))}
    return await _deliver(paired, bundle, district, version, progress)


async def _deliver(
    paired: PairedDevice,
    bundle: dict[str, Any],
    district: District,
    version: int,
    progress: Progress,
) -> int:
    if district.trigger_keys is not None:
        raw = await asyncio.to_thread(district.trigger_keys.read_bytes)
        bundle["trigger_keys"] = json.loads(raw)
    answer = await request(paired, {"op": "enroll", "bundle": bundle})
    progress(paired.device, f"enrollment v{answer.get('version')} installed")
    await wait_armed(paired, version)
    progress(paired.device, f"armed with enrollment v{version}")
    return version


async def wait_armed(paired: PairedDevice, version: int) -> None:
    """Poll the device's status (same certificate) until it runs armed with ``version``."""
    pin = aiohttp.Fingerprint(fingerprint_digest(paired.fingerprint))
    deadline = time.monotonic() + ARMED_TIMEOUT_S
    last = "no answer"
    # A new connection per poll: one opened while the device restarts may reach the
    # Local API that is going away, and a kept-alive one would keep asking it.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(paired.url + "/v1/status", ssl=pin) as response:
                    status = await response.json()
                if status.get("enrollment_version") == version:
                    return
                last = f"{status.get('state')}, enrollment v{status.get('enrollment_version')}"
            except (aiohttp.ClientError, TimeoutError, ValueError, ssl.SSLError) as exc:
                last = type(exc).__name__  # restarting: the API is down for a moment
            await asyncio.sleep(0.2)  # a device restarting, polled (not a test's wait)
    raise EnrollError("not_armed", f"{paired.device}: not armed in {ARMED_TIMEOUT_S:g} s: {last}")


async def check_one(
    target: Target, district: District, out: Path, progress: Progress
) -> list[Path]:
    """Pair and save one snapshot per camera of the device as ``out/<device>-<camera>.jpg``.

    A camera the device cannot take a snapshot of (no footage yet: a camera that is
    down) gets its own ``FAILED`` line and does not stop the others; once every camera
    was asked, the device fails ``camera_failed`` naming them. Only a lost session
    (:data:`SESSION_LOST`) stops the check at once. Returns the files written.
    """
    url = target.to or await find(target.device, district)
    paired = await pair(url, target.device, target.setup_code)
    if not paired.provisioned or paired.certificate is None:
        raise EnrollError("unprovisioned", f"{target.device} has no cameras yet: enroll it first")
    written: list[Path] = []
    failed: list[str] = []
    for camera, zone in paired.cameras:
        try:
            answer = await request(paired, {"op": "check", "camera": camera})
            jpeg = d.b64url_decode(answer.get("jpeg", ""), what="jpeg")
        except (PairingError, d.DocumentError) as exc:
            if isinstance(exc, PairingError) and exc.code in SESSION_LOST:
                raise
            failed.append(f"{camera} ({exc.code})")
            progress(target.device, f"{camera} ({zone}): FAILED {exc.code}: {exc.detail}")
            continue
        path = out / f"{target.device}-{camera}.jpg"
        await asyncio.to_thread(_write, path, jpeg)
        progress(target.device, f"{camera} ({zone}): {path}")
        written.append(path)
    if failed:
        detail = f"{len(failed)} of {len(paired.cameras)} camera(s) failed: {', '.join(failed)}"
        raise EnrollError("camera_failed", detail)
    return written


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def run_all(
    targets: list[Target],
    district: District,
    job: Callable[[Target], Any],
    progress: Progress,
) -> dict[str, str]:
    """Run ``job`` for every target, :data:`PARALLEL` at a time; device -> error (if any).

    Devices without a URL are found by one mDNS browse for them all first.
    """
    gate = asyncio.Semaphore(PARALLEL)
    failed: dict[str, str] = {}
    if len(targets) > 1:
        targets = await locate(targets, district, progress)

    async def one(target: Target) -> None:
        async with gate:
            try:
                await job(target)
            except (EnrollError, PairingError) as exc:
                failed[target.device] = f"{exc.code}: {exc.detail}"
                progress(target.device, f"FAILED {exc.code}: {exc.detail}")
            except (ProvisioningError, OSError, ValueError) as exc:
                failed[target.device] = str(exc)
                progress(target.device, f"FAILED {exc}")

    await asyncio.gather(*(one(t) for t in targets))
    return failed


def _printer(total: int) -> Progress:
    started = time.monotonic()
    done: set[str] = set()

    def progress(device: str, step: str) -> None:
        if step.startswith(("armed", "FAILED")) or step.endswith(".jpg"):
            done.add(device)
        elapsed = time.monotonic() - started
        print(f"[{len(done)}/{total} {elapsed:5.1f}s] {device}: {step}", flush=True)

    return progress


PLAN_KEYS: Final = frozenset(
    {"authority", "receiver_url", "receiver_pin", "recipients", "retention_h", "trigger_keys",
     "interface", "interfaces", "devices"}
)  # fmt: skip
DEVICE_KEYS: Final = frozenset({"id", "setup_code", "building", "cameras", "to"})


def load_plan(path: Path) -> tuple[District, list[Target]]:
    """Read a plan file (module docstring) whole; ValueError naming the key on a mistake."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    base = path.parent

    def fail(where: str, reason: str) -> ValueError:
        return ValueError(f"{path}: {where}: {reason}")

    def text(table: dict[str, Any], key: str, where: str, pattern: str = "") -> str:
        value = table.get(key)
        if not isinstance(value, str) or not value:
            raise fail(f"{where}{key}", "missing or not a string")
        if pattern and not re.match(pattern, value):
            raise fail(f"{where}{key}", f"{value[:40]!r} does not match {pattern}")
        return value

    def strings(value: Any, where: str, pattern: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise fail(where, "expected a non-empty list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not re.match(pattern, item):
                raise fail(f"{where}[{i}]", f"{str(item)[:40]!r} does not match {pattern}")
        return tuple(value)

    if unknown := sorted(set(doc) - PLAN_KEYS):
        raise fail(unknown[0], "unknown key (misspelt?)")
    if "interface" in doc and "interfaces" in doc:
        raise fail("interface", "give interface or interfaces, not both")
    interfaces = (
        strings(doc["interfaces"], "interfaces", r"^\d+\.\d+\.\d+\.\d+$")
        if "interfaces" in doc
        else (text(doc, "interface", "", r"^\d+\.\d+\.\d+\.\d+$"),)
        if "interface" in doc
        else ("127.0.0.1",)
    )
    retention = doc.get("retention_h", 72)
    if isinstance(retention, bool) or not isinstance(retention, int | float):
        raise fail("retention_h", "expected a number of hours")
    keylist = doc.get("trigger_keys")
    district = District(
        authority=base / text(doc, "authority", ""),
        receiver_url=text(doc, "receiver_url", "", r"^wss://[^/\s]+/\S*$"),
        receiver_pin=text(doc, "receiver_pin", "", r"^sha256:[0-9a-f]{64}$"),
        recipients=strings(doc.get("recipients"), "recipients", r"^age1[02-9ac-hj-np-z]{58}$"),
        retention_h=float(retention),
        trigger_keys=None if keylist is None else base / text(doc, "trigger_keys", ""),
        interfaces=interfaces,
    )
    devices = doc.get("devices")
    if not isinstance(devices, list) or not devices:
        raise fail("devices", "no [[devices]] to enroll")
    targets: list[Target] = []
    for i, entry in enumerate(devices):
        where = f"devices[{i}]."
        if not isinstance(entry, dict):
            raise fail(f"devices[{i}]", "expected a table ([[devices]])")
        if unknown := sorted(set(entry) - DEVICE_KEYS):
            raise fail(f"{where}{unknown[0]}", "unknown key (misspelt?)")
        device = text(entry, "id", where, ID_RE.pattern)
        if any(t.device == device for t in targets):
            raise fail(f"{where}id", f"{device} is listed twice")
        specs = entry.get("cameras")
        if not isinstance(specs, list) or not specs:
            raise fail(f"{where}cameras", "expected a list of ID=ZONE[,SOURCE]")
        try:
            cameras = tuple(camera_spec(str(c)) for c in specs)
        except argparse.ArgumentTypeError as exc:
            raise fail(f"{where}cameras", str(exc)) from exc
        try:
            code = normalise_code(text(entry, "setup_code", where))
        except PairingError as exc:
            raise fail(f"{where}setup_code", exc.detail) from exc
        to = entry.get("to")
        if to is not None:
            to = text(entry, "to", where, r"^https://\S+$")
        building = text(entry, "building", where, ID_RE.pattern)
        targets.append(Target(device, code, building, cameras, to))
    return district, targets


def _targets(args: argparse.Namespace) -> tuple[District, list[Target]]:
    """The district and the devices of one command, from ``--plan`` or DEVICE and options.

    Each command reads only the options its parser defines (:func:`add_commands`).
    """
    if args.plan is not None:
        district, targets = load_plan(args.plan)
        if args.action != "check":
            district = replace(district, valid_days=args.valid_days)
        return district, targets
    if not args.device or not args.setup_code:
        raise ValueError("give DEVICE and --setup-code, or --plan FILE")
    interfaces = tuple(args.interface or ["127.0.0.1"])
    if args.action == "check":  # pairs and reads the device: no authority, no receiver
        code = normalise_code(args.setup_code)
        return District(authority=Path(), interfaces=interfaces), [
            Target(args.device, code, to=args.to)
        ]
    district = District(
        authority=args.authority or Path(),
        receiver_url=args.receiver_url or "",
        receiver_pin=args.receiver_pin or "",
        recipients=tuple(args.recipient or ()),
        trigger_keys=args.trigger_keys,
        interfaces=interfaces,
        valid_days=args.valid_days,
    )
    if args.action == "rotate":  # building and cameras come from the device's certificate
        if args.authority is None:
            raise ValueError("rotate needs --authority (the district authority's key)")
        code = normalise_code(args.setup_code)
        return district, [Target(args.device, code, to=args.to, version=args.version)]
    district = replace(district, retention_h=args.retention_h)
    if not (district.receiver_url and district.receiver_pin and district.recipients):
        raise ValueError("enroll needs --authority, --receiver-url, --receiver-pin, --recipient")
    if args.authority is None:
        raise ValueError("enroll needs --authority (the district authority's key)")
    if not args.building or not args.camera:
        raise ValueError("enroll needs --building and at least one --camera")
    code = normalise_code(args.setup_code)
    target = Target(args.device, code, args.building, tuple(args.camera), args.to, args.version)
    return district, [target]


def _run(args: argparse.Namespace) -> int:
    try:
        district, targets = _targets(args)
    except (ValueError, PairingError) as exc:
        print(f"breakglass: error: {exc}", file=sys.stderr)
        return 2
    progress = _printer(len(targets))
    started = time.monotonic()

    async def job(target: Target) -> object:
        if args.action == "enroll":
            return await enroll_one(target, district, progress)
        if args.action == "rotate":
            return await rotate_one(target, district, progress)
        return await check_one(target, district, args.out, progress)

    failed = asyncio.run(run_all(targets, district, job, progress))
    ok, took = len(targets) - len(failed), time.monotonic() - started
    print(f"{args.action}: {ok}/{len(targets)} device(s) done in {took:.1f} s")
    return 1 if failed else 0


def _command(
    provision: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_: str
) -> argparse.ArgumentParser:
    """A subcommand with what every one takes: which device(s), and how to reach them."""
    cmd = provision.add_parser(name, help=help_, description=help_)
    cmd.add_argument("device", nargs="?", metavar="DEVICE", help="the device id (mDNS id)")
    cmd.add_argument("--setup-code", metavar="CODE", help="from the device's label")
    cmd.add_argument("--to", metavar="URL", help="https://HOST:PORT (default: find by mDNS)")
    cmd.add_argument(
        "--interface", action="append", metavar="ADDR", help="browse mDNS on (repeatable)"
    )
    cmd.add_argument("--plan", type=Path, metavar="FILE", help="many devices (TOML)")
    cmd.set_defaults(func=_run)
    return cmd


def _certificate_options(cmd: argparse.ArgumentParser) -> None:
    """What signing a certificate takes (``enroll`` and ``rotate``)."""
    cmd.add_argument("--authority", type=Path, metavar="KEY")
    cmd.add_argument("--receiver-url", metavar="wss://HOST:PORT/v1/uplink")
    cmd.add_argument("--receiver-pin", metavar="sha256:HEX")
    cmd.add_argument("--recipient", action="append", metavar="age1...")
    cmd.add_argument("--trigger-keys", type=Path, metavar="FILE")
    cmd.add_argument("--version", type=int, default=None)
    cmd.add_argument("--valid-days", type=int, default=VALID_DAYS, metavar="D")


def add_commands(provision: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``enroll``, ``rotate`` and ``check`` under ``provision``, each with its options."""
    enroll = _command(
        provision,
        "enroll",
        "pair, certify and enroll devices (one, or a --plan), then wait until armed",
    )
    _certificate_options(enroll)
    enroll.add_argument("--retention-h", type=float, default=72.0)
    enroll.add_argument("--building", metavar="ID")
    enroll.add_argument("--camera", action="append", type=camera_spec, metavar="SPEC")

    rotate = _command(
        provision,
        "rotate",
        "renew enrolled devices' certificates (next version), optionally changed",
    )
    _certificate_options(rotate)  # building, cameras and retention: kept from the device

    check = _command(provision, "check", "pair and save one snapshot per camera, to check the aim")
    check.add_argument("--out", type=Path, default=Path("."), metavar="DIR")
