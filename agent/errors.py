"""Errors of the agent; each says whose fault it is and what is wrong."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error raised by :mod:`agent`."""


class ConfigError(AgentError, ValueError):
    """The configuration is invalid. ``key`` names the offending key (dotted path)."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class UplinkRefused(AgentError):
    """The receiver refused this device (``code`` is its stable reason code)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"receiver refused the uplink: {code}: {detail}")
        self.code = code
        self.detail = detail
