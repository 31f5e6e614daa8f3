"""The device's enrollment, applied atomically and kept in ``state/enrollment``.

A technician who paired with the device (``agent.pairing_api``) sends it an
*enrollment bundle*, sealed under the pairing key:

- ``certificate``: the enrollment certificate the district authority signed
  (``provisioning.enrollment``): device id and key, building, receiver URL and
  pin, age recipients, retention, camera zones. The device sends it in every
  uplink ``hello``.
- ``authority``: the authority's raw Ed25519 public key (b64url). The first
  enrollment pins it, unless the image already did (``[trust] authority``);
  every later enrollment must verify under the pinned key.
- ``cameras``: where each camera of the certificate gets its packets
  (``source`` and its settings, as in a ``[[cameras]]`` table without
  ``zone``: the zone is the certificate's). RTSP URLs may carry credentials,
  so this file is mode 0600 and never leaves the device. A renewal whose
  certificate names the same cameras may leave it out (the sources stay).
- ``trigger_keys`` (optional): the district's signed trigger-key list.

Everything is checked before anything is written: the certificate must
verify under the authority, be current, name this device and its key, and
carry a higher ``version`` than the one installed (re-enrollment); the
cameras must be exactly the certificate's, each a valid camera; the key list
must verify. Refusals raise :class:`EnrollmentRefused` with a stable code.

Atomicity: each enrollment is written whole into its own folder
(``enrollment.v<N>``, files and folder fsynced), then one ``rename`` swaps the
``enrollment`` symlink to it; that rename is the commit point. A crash before
it leaves the previous enrollment (or none: the device stays unprovisioned
and pairable); :func:`recover` removes the leftovers at the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import camera_from_table
from agent.errors import ConfigError
from agent.statefile import fsync_dir
from provisioning import documents as d
from provisioning.documents import DocumentError
from provisioning.enrollment import Enrollment, parse_enrollment
from provisioning.errors import KeyFileError
from provisioning.keys import load_public_key, public_pem, raw_public, write_secret
from provisioning.triggers import parse_key_list

log = logging.getLogger(__name__)

LINK: Final = "enrollment"
CERTIFICATE: Final = "certificate.json"
AUTHORITY: Final = "authority.pub"
CAMERAS: Final = "cameras.json"
TRIGGER_KEYS: Final = "trigger-keys.json"
BUNDLE_FIELDS: Final = frozenset({"certificate", "authority", "cameras", "trigger_keys"})


class EnrollmentDamaged(ConfigError):
    """The installed enrollment cannot be read (a bad disk, a hand edit)."""


class EnrollmentRefused(Exception):
    """The bundle was not applied; ``code`` is stable, ``detail`` says what and where."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Enrolled:
    """The enrollment installed on this device."""

    directory: Path
    enrollment: Enrollment
    authority: Ed25519PublicKey
    #: ``[[cameras]]`` tables (zone from the certificate), in the certificate's order.
    cameras: tuple[Mapping[str, Any], ...]

    @property
    def version(self) -> int:
        """The certificate's version."""
        return self.enrollment.version

    def config_tables(self) -> dict[str, Any]:
        """What this enrollment sets in the agent's configuration (TOML-shaped)."""
        e = self.enrollment
        trigger_keys = self.directory / TRIGGER_KEYS
        trust: dict[str, Any] = {"authority": str(self.directory / AUTHORITY)}
        if trigger_keys.exists():
            trust["trigger_keys"] = str(trigger_keys)
        return {
            "building": {"id": e.building},
            "receiver": {"url": e.receiver_url, "tls_pin": e.receiver_pin},
            "store": {"recipients": list(e.recipients), "retention_h": e.retention_h},
            "cameras": [dict(c) for c in self.cameras],
            "trust": trust,
            "device": {"enrollment": str(self.directory / CERTIFICATE)},
        }


def recover(state_dir: Path) -> None:
    """Remove what an interrupted :func:`apply` left (anything the link does not name)."""
    link = state_dir / LINK
    current = os.readlink(link) if link.is_symlink() else None
    for path in state_dir.glob(LINK + ".*"):
        if path.name != current:
            log.warning("enrollment: removing %s (left by an interrupted enrollment)", path.name)
            _remove(path)


def load(state_dir: Path) -> Enrolled | None:
    """The installed enrollment, or None (unprovisioned). Raises ConfigError if damaged."""
    link = state_dir / LINK
    if not link.is_symlink():
        if link.exists():
            raise ConfigError(f"{link}: expected a symlink to the current enrollment", key="")
        return None
    directory = link.resolve()
    where = f"{link}/"
    try:
        authority = load_public_key(directory / AUTHORITY)
        enrollment = parse_enrollment((directory / CERTIFICATE).read_bytes(), authority, now=None)
        cameras = json.loads((directory / CAMERAS).read_bytes())
    except (OSError, ValueError, KeyFileError, DocumentError) as exc:
        raise EnrollmentDamaged(f"{where}: the enrollment is damaged: {exc}", key="") from exc
    return Enrolled(directory, enrollment, authority, tuple(cameras))


def set_aside(state_dir: Path, stamp: int) -> Path:
    """Move a damaged enrollment out of the way (kept for a look); the device is then
    unprovisioned and pairable again, rather than failing to start forever."""
    link = state_dir / LINK
    target = link.resolve() if link.is_symlink() else link
    aside = state_dir / f"damaged-{LINK}-{stamp}"
    if target.exists() and target != link:
        target.rename(aside)
        link.unlink()
    elif link.exists() or link.is_symlink():
        link.rename(aside)
    fsync_dir(state_dir)
    return aside


def apply(
    state_dir: Path,
    bundle: Any,
    *,
    device_id: str,
    device_key: Ed25519PublicKey,
    now: float,
    current: Enrolled | None,
    pinned_authority: Ed25519PublicKey | None = None,
    check: Callable[[Enrolled], None] | None = None,
) -> Enrolled:
    """Check ``bundle`` whole, then install it atomically (module docstring).

    ``check`` sees the enrollment before anything is written (the agent builds its
    whole configuration from it); a ConfigError there refuses it as ``bad_config``.
    """
    if not isinstance(bundle, dict) or not {"certificate", "authority"} <= set(bundle):
        raise EnrollmentRefused("malformed", "bundle: expected certificate and authority")
    if extra := set(bundle) - BUNDLE_FIELDS:
        raise EnrollmentRefused("malformed", f"bundle.{sorted(extra)[0]}: unknown field")
    authority = _authority(bundle["authority"], current, pinned_authority)
    try:
        enrollment = parse_enrollment(bundle["certificate"], authority, now=now)
    except DocumentError as exc:
        raise EnrollmentRefused(f"enrollment_{exc.code}", f"certificate: {exc.detail}") from exc
    if enrollment.device != device_id:
        raise EnrollmentRefused(
            "wrong_device", f"certificate.device: {enrollment.device!r}, this is {device_id!r}"
        )
    if raw_public(enrollment.device_key) != raw_public(device_key):
        raise EnrollmentRefused("wrong_key", "certificate.device_key: not this device's key")
    if current is not None and enrollment.version <= current.version:
        raise EnrollmentRefused(
            "enrollment_rollback",
            f"certificate.version {enrollment.version}: the device has {current.version}; "
            "re-enrollment needs a higher version",
        )
    if "cameras" in bundle:
        cameras = _cameras(bundle["cameras"], enrollment)
    elif current is not None and dict(current.enrollment.cameras) == dict(enrollment.cameras):
        cameras = [dict(c) for c in current.cameras]  # a renewal keeps the sources
    else:
        raise EnrollmentRefused("bad_cameras", "cameras: missing (the camera list changed)")
    keylist = bundle.get("trigger_keys")
    if keylist is not None:
        try:
            parse_key_list(keylist, authority)
        except DocumentError as exc:
            raise EnrollmentRefused(f"keylist_{exc.code}", f"trigger_keys: {exc.detail}") from exc
    files = {
        CERTIFICATE: json.dumps(dict(enrollment.envelope)).encode(),
        AUTHORITY: public_pem(authority),
        CAMERAS: json.dumps(cameras).encode(),
    }
    if keylist is not None:
        files[TRIGGER_KEYS] = json.dumps(keylist).encode()
    if check is not None:
        try:
            check(Enrolled(state_dir / LINK, enrollment, authority, tuple(cameras)))
        except ConfigError as exc:
            raise EnrollmentRefused("bad_config", str(exc)) from exc
    directory = _install(state_dir, f"{LINK}.v{enrollment.version}", files)
    return Enrolled(directory, enrollment, authority, tuple(cameras))


def _authority(
    value: Any, current: Enrolled | None, pinned: Ed25519PublicKey | None
) -> Ed25519PublicKey:
    try:
        raw = d.b64url_decode(value, what="bundle.authority")
        offered = Ed25519PublicKey.from_public_bytes(raw)
    except (DocumentError, ValueError) as exc:
        raise EnrollmentRefused("malformed", "bundle.authority: not a raw Ed25519 key") from exc
    trusted = current.authority if current is not None else pinned
    if trusted is not None and raw_public(trusted) != raw:
        raise EnrollmentRefused(
            "other_authority",
            "bundle.authority: this device is bound to another district authority",
        )
    return offered


def _cameras(value: Any, enrollment: Enrollment) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > 64:
        raise EnrollmentRefused("bad_cameras", "cameras: expected a list of at most 64 tables")
    tables: list[dict[str, Any]] = []
    for i, table in enumerate(value):
        if not isinstance(table, dict) or "zone" in table:
            raise EnrollmentRefused(
                "bad_cameras", f"cameras[{i}]: expected a table without zone (the certificate's)"
            )
        zone = enrollment.cameras.get(str(table.get("id")))
        if zone is None:
            raise EnrollmentRefused(
                "bad_cameras", f"cameras[{i}].id: {table.get('id')!r} is not in the certificate"
            )
        try:
            camera_from_table(Path("enrollment"), i, {**table, "zone": zone})
        except ConfigError as exc:
            raise EnrollmentRefused("bad_cameras", str(exc)) from exc
        tables.append({**table, "zone": zone})
    missing = set(enrollment.cameras) - {t["id"] for t in tables}
    if missing or len(tables) != len(enrollment.cameras):
        raise EnrollmentRefused(
            "bad_cameras", f"cameras: no source for {sorted(missing) or 'a repeated id'}"
        )
    if not tables:
        raise EnrollmentRefused("bad_cameras", "certificate.cameras: an agent needs a camera")
    return tables


def _install(state_dir: Path, name: str, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` into ``state_dir/name`` and point the link at it (atomic)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    staging = state_dir / f"{name}.partial"
    _remove(staging)
    staging.mkdir(mode=0o700)
    for filename, data in files.items():
        write_secret(staging / filename, data)  # 0600, fsynced
    fsync_dir(staging)
    target = state_dir / name
    _remove(target)  # a leftover of an attempt the link never named
    staging.rename(target)
    link_tmp = state_dir / f"{LINK}.link"
    with contextlib.suppress(FileNotFoundError):
        link_tmp.unlink()
    link_tmp.symlink_to(name)
    fsync_dir(state_dir)
    link_tmp.replace(state_dir / LINK)  # the commit point
    fsync_dir(state_dir)
    recover(state_dir)  # the previous enrollment's folder
    return target


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
