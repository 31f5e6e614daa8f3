"""Byte mutations of signed envelopes, shared by the fuzz tests and the fuzz benchmark."""

from __future__ import annotations

HOWS = ("flip", "set", "insert", "delete", "truncate")


def mutate(original: bytes, at: int, how: str, byte: int) -> bytes:
    """``original`` with one edit at ``at``: flip one bit, set, insert or delete a byte,
    or cut everything from ``at`` on."""
    if how == "flip":
        return original[:at] + bytes([original[at] ^ (1 << (byte % 8))]) + original[at + 1 :]
    if how == "set":
        return original[:at] + bytes([byte]) + original[at + 1 :]
    if how == "insert":
        return original[:at] + bytes([byte]) + original[at:]
    if how == "delete":
        return original[:at] + original[at + 1 :]
    if how == "truncate":
        return original[:at]
    raise ValueError(f"unknown mutation {how!r}")
