"""age (X25519) identities: who can open sealed footage.

The district and each receiver hold an age identity; agents seal their
segments to the matching recipients (``age1...``) and hold no identity
themselves, so a stolen SD card reveals no footage. Identity files are the
standard ``age-keygen`` format (comment lines, then ``AGE-SECRET-KEY-1...``),
written with mode 0600; loading refuses a file that group or others can read.
"""

from __future__ import annotations

from pathlib import Path

import pyrage

from provisioning.errors import KeyFileError
from provisioning.keys import read_secret, write_secret

__all__ = ["load_identity", "new_identity", "recipient_of"]


def new_identity(path: Path) -> pyrage.x25519.Identity:
    """Generate an age X25519 identity and store it, ``age-keygen`` style, with mode 0600."""
    identity = pyrage.x25519.Identity.generate()
    text = f"# public key: {identity.to_public()}\n{identity}\n"
    write_secret(path, text.encode("ascii"))
    return identity


def load_identity(path: Path) -> pyrage.x25519.Identity:
    """Read an ``age-keygen`` identity file; refuses modes open to group or others."""
    data = read_secret(path, "age identity")
    keys = [
        line.strip()
        for line in data.decode("ascii", "replace").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(keys) != 1 or not keys[0].startswith("AGE-SECRET-KEY-1"):
        raise KeyFileError(f"age identity {path}: expected one AGE-SECRET-KEY-1... line")
    try:
        return pyrage.x25519.Identity.from_str(keys[0])
    except (pyrage.IdentityError, ValueError) as exc:
        raise KeyFileError(f"age identity {path}: not a valid X25519 identity") from exc


def recipient_of(identity: pyrage.x25519.Identity) -> str:
    """The public ``age1...`` recipient string of an identity."""
    return str(identity.to_public())
