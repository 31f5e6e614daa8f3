"""Self-signed TLS certificates and their pinned fingerprints.

The receiver and each agent's local API present self-signed certificates;
peers pin the SHA-256 fingerprint of the DER certificate (written
``sha256:<hex>``) instead of trusting a CA. ECDSA P-256 keys, because
browsers do not accept Ed25519 TLS certificates.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import ssl
from pathlib import Path

from provisioning.errors import KeyFileError
from provisioning.keys import write_secret

FINGERPRINT_PREFIX = "sha256:"


def fingerprint(der: bytes) -> str:
    """``sha256:<hex>`` of a DER certificate."""
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def fingerprint_digest(pin: str) -> bytes:
    """The raw digest of a ``sha256:<hex>`` pin (for ``aiohttp.Fingerprint``)."""
    if not pin.startswith(FINGERPRINT_PREFIX):
        raise ValueError(f"TLS pin must start with {FINGERPRINT_PREFIX!r}")
    try:
        digest = bytes.fromhex(pin.removeprefix(FINGERPRINT_PREFIX))
    except ValueError as exc:
        raise ValueError("TLS pin is not hex") from exc
    if len(digest) != 32:
        raise ValueError("TLS pin must be 32 bytes of SHA-256")
    return digest


def pins_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two fingerprints."""
    return hmac.compare_digest(a.encode(), b.encode())


def ensure_certificate(
    cert_path: Path, key_path: Path, *, common_name: str, hosts: list[str]
) -> str:
    """Load the certificate at ``cert_path`` or create a self-signed one; return its pin.

    ``hosts`` become subjectAltNames (IP addresses or DNS names). The key is
    written with mode 0600. Valid for ten years: the pin, not the expiry,
    carries the trust, and a device in a closet must not stop on a date.
    """
    if cert_path.exists() and key_path.exists():
        return certificate_fingerprint(cert_path)
    # Imported only to make one: an agent that starts with its certificate made never
    # loads cryptography's X.509 layer (several MiB of a Pi's memory).
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_secret(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def certificate_fingerprint(cert_path: Path) -> str:
    """The pin of a PEM certificate file."""
    try:
        der = ssl.PEM_cert_to_DER_cert(cert_path.read_text(encoding="ascii"))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"certificate {cert_path}: cannot load ({exc})") from exc
    return fingerprint(der)


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context for a self-signed certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise KeyFileError(f"TLS certificate {cert_path} / key {key_path}: {exc}") from exc
    return ctx
