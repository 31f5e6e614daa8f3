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
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import protocol as p
from agent.statefile import write_atomic
from provisioning.documents import DocumentError
from provisioning.enrollment import Enrollment, Revocations, parse_enrollment, parse_revocations
from provisioning.errors import KeyFileError
from provisioning.keys import load_public_key
from provisioning.tls import pins_equal

log = logging.getLogger(__name__)


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
        return enrollment

    def _remember(self, enrollment: Enrollment) -> None:
        """Refuse certificates older than the newest seen for the device; record it.

        Under the lock, and replaced atomically: two hellos of one device at once (a
        reconnect), or a crash mid-write, must never let a reader see no version and
        take an older certificate.
        """
        path = self.enrolled_dir / f"{enrollment.device}.json"
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
            if enrollment.version > newest:
                record = {"version": enrollment.version, "kid": enrollment.device_kid,
                          "building": enrollment.building}  # fmt: skip
                write_atomic(path, json.dumps(record).encode(), mode=0o600)
