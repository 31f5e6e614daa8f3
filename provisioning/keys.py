"""Ed25519 device and authority keys as PEM files (DESIGN.md "Signed documents").

Private keys are PKCS#8 PEM written with mode 0600, public keys are
SubjectPublicKeyInfo PEM, so keys made by ``openssl genpkey -algorithm ed25519``
load as they are. The key id (``kid``) is the lowercase hex of the first 8
bytes of SHA-256 over the raw 32-byte public key.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from provisioning.errors import KeyFileError

MAX_KEY_FILE_BYTES = 16 * 1024


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def kid(key: Ed25519PublicKey) -> str:
    """DESIGN.md key id: hex of the first 8 bytes of SHA-256(raw public key)."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte on (never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def foreign_owner(path: Path) -> str | None:
    """Who owns ``path`` if it is not the user running this process (None: ours, or gone).

    A service's folder belongs to its user (``breakglass``, ``breakglass-receiver``);
    a command run there as another user (root, by ``sudo``) would leave files that
    user cannot read or replace, and the service stops working.
    """
    try:
        uid = path.stat().st_uid
    except OSError:
        return None
    if uid == os.geteuid():
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def new_private_key(path: Path) -> Ed25519PrivateKey:
    """Generate an Ed25519 key and store it as PKCS#8 PEM with mode 0600."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(path, pem)
    return key


def read_small(path: Path, what: str, *, owner_only: bool = False) -> bytes:
    """At most MAX_KEY_FILE_BYTES of a key file; :class:`KeyFileError` naming ``what``.

    ``owner_only``: refuse a file that group or others may read (the mode of the file
    opened, not of the path looked at again later).
    """
    try:
        with path.open("rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            if owner_only and mode & 0o077:
                raise KeyFileError(f"{what} {path}: mode {mode:04o} is too open, expected 0600")
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: cannot read ({exc.strerror})") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{what} {path}: larger than {MAX_KEY_FILE_BYTES} bytes")
    return data


def read_secret(path: Path, what: str) -> bytes:
    """:func:`read_small` of a file only its owner may read (private keys, identities)."""
    return read_small(path, what, owner_only=True)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key; refuse files readable by group or others."""
    data = read_secret(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"private key {path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (SubjectPublicKeyInfo PEM)."""
    return public_key_from_pem(read_small(path, "public key"), where=str(path))


def public_key_from_pem(data: bytes, *, where: str = "public key") -> Ed25519PublicKey:
    """Parse an Ed25519 public key from PEM bytes."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{where}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: not an Ed25519 key")
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message``."""
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
