"""Errors of the trust layer; each says whose fault it is and what is wrong."""

from __future__ import annotations


class ProvisioningError(Exception):
    """Base of every error raised by :mod:`provisioning`."""


class KeyFileError(ProvisioningError, ValueError):
    """A key or certificate file is missing, unreadable, of the wrong kind or too open."""
