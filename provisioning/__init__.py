"""Trust: key files, TLS pins, signed documents and the technician's tools."""

from provisioning.errors import KeyFileError, ProvisioningError
from provisioning.keys import kid, load_private_key, load_public_key, new_private_key

__all__ = [
    "KeyFileError",
    "ProvisioningError",
    "kid",
    "load_private_key",
    "load_public_key",
    "new_private_key",
]
