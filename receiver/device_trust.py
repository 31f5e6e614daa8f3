"""Which devices the receiver accepts: those the district's authority enrolled.

With ``DATA/authority.pub`` (the district authority's public key), a device
is accepted when the enrollment certificate in its ``hello`` verifies, is
current, names this receiver (its TLS pin), is not older than one already
seen for that device (re-enrollment only moves forward) and is not revoked
by the newest revocation list (``DATA/revocations.json``, signed by the same
authority; an older list never replaces a newer one). No hand-kept list is
involved. Files are read at each handshake: a new revocation list or
authority takes effect without a restart. :meth:`DeviceTrust.refresh` re-reads
the revocation list only when its file changed (size, mtime, inode), so the
receiver can watch it every few seconds and drop devices already connected.
Reads may run on worker threads: the newest list is swapped under a lock, so
an older list never replaces a newer one even when two reads race.

Without an authority, or for a device that sends no certificate, the
allow-list (``DATA/devices/<id>.pub``) still applies: a development and
transition path, which a district closes by not keeping one.

Expiry: past its certificate's ``exp`` a device is refused
(``enrollment_expired``), so an emergency at its school no longer reaches
the receiver. The device list shows it coming (:meth:`DeviceTrust.expiry`):
the expiry of the last certificate accepted per device (kept in
``DATA/enrolled/<device>.json``, read by :meth:`DeviceTrust.load` at start
and held in memory), and, until a certificate of the device is accepted
again, when its expired certificate was last refused (in memory only: a
refused device tries again within seconds of a restart).

What a certified device says in ``session_open`` is held to its certificate
(:func:`certify_open`): the session is recorded, shown and notified with the
certificate's building and each listed camera's certificate zone, and what the
device claimed otherwise is kept beside it as mismatches (an emergency is never
refused for them). A share session (``started_by.kind == "share"``) may carry only
cameras the certificate lists as exterior; anything else is refused
(``zone_forbidden``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import protocol as p
from agent.statefile import write_atomic
from provisioning.documents import DocumentError
from provisioning.enrollment import (
    ID_RE,
    Enrollment,
    Revocations,
    parse_enrollment,
    parse_revocations,
)
from provisioning.errors import KeyFileError
from provisioning.keys import load_public_key
from provisioning.tls import pins_equal
from receiver.presence import iso_utc

log = logging.getLogger(__name__)

#: An enrollment that expires within this is shown with a warning (seconds).
EXPIRY_WARNING_S: Final = 30 * 86400
#: The protocol error of a share session carrying a camera its certificate does not list
#: as exterior.
ZONE_FORBIDDEN: Final = "zone_forbidden"


def certify_open(
    enrollment: Enrollment | None, event: p.SessionOpen
) -> tuple[p.SessionOpen, list[dict[str, str | None]]]:
    """``event`` as the receiver records it, and what the device claimed otherwise.

    With a certificate: the certificate's building, and each camera's certificate zone
    where the certificate lists the camera (one it does not list keeps its claimed zone).
    Each difference is a mismatch ``{field, claimed, certified}`` (``field``:
    ``building`` or ``cameras.<id>.zone``; ``certified`` null: the certificate does not
    list that camera). An emergency is never refused for them (its footage must reach
    the police); a share (``started_by.kind == "share"``) carrying a camera that is not
    exterior in the certificate raises ``zone_forbidden``. Without a certificate (the
    allow-list), ``event`` as it came and no mismatches: nothing to check it against.
    """
    if enrollment is None:
        return event, []
    share = event.started_by.get("kind") == "share"
    mismatches: list[dict[str, str | None]] = []
    if event.building != enrollment.building:
        mismatches.append(
            {"field": "building", "claimed": event.building, "certified": enrollment.building}
        )
    cameras = []
    for cam in event.cameras:
        zone = enrollment.cameras.get(cam.id)
        if share and zone != "exterior":
            what = "not in" if zone is None else f"{zone} in"
            raise p.RemoteProtocolError(
                ZONE_FORBIDDEN,
                f"share session {event.session}: camera {cam.id!r} is {what} the enrollment "
                "certificate; a share carries only cameras certified exterior",
            )
        if zone != cam.zone:
            field = f"cameras.{cam.id}.zone"
            mismatches.append({"field": field, "claimed": cam.zone, "certified": zone})
        cameras.append(cam if zone is None or zone == cam.zone else replace(cam, zone=zone))
    if not mismatches:
        return event, []
    certified = replace(event, building=enrollment.building, cameras=tuple(cameras))
    return certified, mismatches


class DeviceTrust:
    """Checks a device's enrollment certificate against the district's authority."""

    def __init__(self, data_dir: Path) -> None:
        self.authority_path = data_dir / "authority.pub"
        self.revocations_path = data_dir / "revocations.json"
        self.enrolled_dir = data_dir / "enrolled"
        self._revocations: Revocations | None = None
        #: (size, mtime_ns, inode, ctime_ns) of the revocation file when last read.
        self._read_stat: tuple[int, int, int, int] | None = None
        self._lock = threading.Lock()
        #: What ``DATA/enrolled/<device>.json`` holds, by device (replaced whole, never
        #: changed in place: the event loop reads it without the lock).
        self._enrolled: dict[str, dict[str, Any]] = {}
        #: Devices whose expired certificate was refused since one was last accepted:
        #: (when, the certificate's version, its exp).
        self._expired: dict[str, tuple[float, int, int]] = {}

    def load(self) -> None:
        """Read what is remembered of each device's enrollment (at start; a file that
        cannot be read is logged and skipped)."""
        found: dict[str, dict[str, Any]] = {}
        try:
            paths = sorted(self.enrolled_dir.glob("*.json"))
        except OSError as exc:
            log.error("enrolled devices %s not read: %s", self.enrolled_dir, exc)
            return
        for path in paths:
            try:
                record = json.loads(path.read_bytes())
                int(record["version"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("enrolled device %s not read: %r", path, exc)
                continue
            if ID_RE.fullmatch(path.stem):
                found[path.stem] = record
        with self._lock:
            for device, record in found.items():
                self._enrolled.setdefault(device, record)

    def expiry(self, device: str, now: float) -> dict[str, object] | None:
        """When the device's enrollment expires, for the device list (None: no
        certificate of it was ever accepted here): ``version``, ``expires_at`` (ISO-8601;
        None if remembered before expiry dates were), ``expired``, ``expires_soon``
        (within :data:`EXPIRY_WARNING_S`), and ``refused`` (``{code, at}``: its expired
        certificate was refused, and is the one shown)."""
        record = self._enrolled.get(device)
        refused = self._expired.get(device)
        exp: float | None
        if refused is not None:
            _, version, exp = refused
        elif record is not None:
            version, held = int(record["version"]), record.get("exp")
            exp = float(held) if isinstance(held, int) and not isinstance(held, bool) else None
        else:
            return None
        expired = refused is not None or (exp is not None and now >= exp)
        return {
            "version": version,
            "expires_at": None if exp is None else iso_utc(exp),
            "expired": expired,
            "expires_soon": not expired and exp is not None and exp - now <= EXPIRY_WARNING_S,
            "refused": None if refused is None else {
                "code": "enrollment_expired", "at": iso_utc(refused[0]),
            },
        }  # fmt: skip

    @property
    def current(self) -> Revocations | None:
        """The newest valid revocation list read so far (no file access)."""
        return self._revocations

    def refresh(self) -> Revocations | None:
        """Re-read the revocation list if its file changed since the last read; the newest."""
        if self._stat() == self._read_stat:
            return self._revocations
        authority = self.authority()
        if authority is None:
            return self._revocations
        return self.revocations(authority)

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.revocations_path)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns

    def authority(self) -> Ed25519PublicKey | None:
        """The district authority's key, if this receiver trusts one."""
        if not self.authority_path.exists():
            return None
        try:
            return load_public_key(self.authority_path)
        except KeyFileError as exc:
            log.error("district authority: %s", exc)
            return None

    def revocations(self, authority: Ed25519PublicKey) -> Revocations | None:
        """The newest valid revocation list (an older one never replaces it)."""
        seen = self._stat()  # before reading: a change meanwhile is read again next time
        try:
            raw = self.revocations_path.read_bytes()
        except FileNotFoundError:
            self._read_stat = None
            return self._revocations
        try:
            fresh = parse_revocations(raw, authority)
        except DocumentError as exc:
            log.error("revocation list %s refused: %s", self.revocations_path, exc)
            self._read_stat = seen
            return self._revocations
        with self._lock:
            self._read_stat = seen
            held = self._revocations
            if held is None or fresh.version > held.version:
                self._revocations = fresh
                log.info("revocation list v%d in force", fresh.version)
            elif fresh.version == held.version and fresh != held:
                self._revocations = fresh  # the same version signed again: the file wins
            elif fresh.version < held.version:
                log.error("revocation list v%d is older than v%d: kept the newer", fresh.version,
                          held.version)  # fmt: skip
            return self._revocations

    def check(
        self, device: str, envelope: Mapping[str, Any], *, now: float, own_pin: str
    ) -> Enrollment:
        """The device's verified enrollment, or RemoteProtocolError with a stable code."""
        authority = self.authority()
        if authority is None:
            raise p.RemoteProtocolError("unknown_device", "this receiver trusts no authority")
        try:
            enrollment = parse_enrollment(envelope, authority, now=now)
        except DocumentError as exc:
            if exc.code == "expired":
                self._refused_expired(device, envelope, authority, now, own_pin)
            raise p.RemoteProtocolError(f"enrollment_{exc.code}", exc.detail) from exc
        if enrollment.device != device:
            raise p.RemoteProtocolError(
                "enrollment_mismatch", f"certificate is for {enrollment.device!r}, not {device!r}"
            )
        if not pins_equal(enrollment.receiver_pin, own_pin):
            raise p.RemoteProtocolError(
                "enrollment_other_receiver", "the certificate names another receiver"
            )
        revoked = self.revocations(authority)
        if revoked is not None and revoked.revoked(enrollment):
            raise p.RemoteProtocolError("revoked", f"device {device} is revoked")
        self._remember(enrollment)
        self._expired.pop(device, None)
        return enrollment

    def _refused_expired(
        self,
        device: str,
        envelope: Mapping[str, Any],
        authority: Ed25519PublicKey,
        now: float,
        own_pin: str,
    ) -> None:
        """Note that the device's certificate was refused as expired (for the device list),
        unless it would have been refused anyway (another device's, another receiver's) or
        is older than the one remembered (no news then)."""
        try:
            expired = parse_enrollment(envelope, authority, now=None)
        except DocumentError:
            return
        record = self._enrolled.get(device)
        if (
            expired.device == device
            and pins_equal(expired.receiver_pin, own_pin)
            and expired.version >= int(record["version"] if record else 0)
        ):
            self._expired[device] = (now, expired.version, expired.exp)

    def _remember(self, enrollment: Enrollment) -> None:
        """Refuse certificates older than the newest seen for the device; record it (version,
        key id, building, expiry), in the file and in memory.

        Under the lock, and replaced atomically: two hellos of one device at once (a
        reconnect), or a crash mid-write, must never let a reader see no version and
        take an older certificate.
        """
        path = self.enrolled_dir / f"{enrollment.device}.json"
        seen: Any = None
        with self._lock:
            try:
                seen = json.loads(path.read_text())
                newest = int(seen["version"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                newest = 0
            if enrollment.version < newest:
                raise p.RemoteProtocolError(
                    "enrollment_superseded",
                    f"certificate v{enrollment.version} is older than v{newest} of this device",
                )
            record = {"version": enrollment.version, "kid": enrollment.device_kid,
                      "building": enrollment.building, "exp": enrollment.exp}  # fmt: skip
            # Written when it changed: a newer version, or the same one with an expiry date
            # the receiver did not keep before (or re-signed); not at every hello.
            if record != seen:
                write_atomic(path, json.dumps(record).encode(), mode=0o600)
            self._enrolled[enrollment.device] = record
