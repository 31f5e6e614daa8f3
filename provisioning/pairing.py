"""Pairing a device with a technician by its setup code: a SPAKE2 core (sans-IO).

The device makes a random 8-digit setup code on first boot and shows it only
locally (console, label file). The technician types it into the CLI; both
sides run SPAKE2 (the ``spake2`` package, Ed25519 group) over the Local API,
so the code never crosses the network and an eavesdropper or a relay that
does not know it learns nothing it could test offline. Each side proves it
derived the same key (HMAC over the transcript) before anything else is
sent; after that, messages travel sealed with ChaCha20-Poly1305 under keys
derived from the SPAKE2 key (HKDF-SHA256), so the device's identity (its
public key and its API certificate pin) reaches the technician authenticated
by the code, and the enrollment reaches the device the same way.

Online guessing is the only attack left; :class:`PairingWindow` bounds it
without letting a guesser lock the technician out. Each ``start`` is one
online guess (the device's answer carries its confirmation, which tests the
guess offline), so attempts are counted when they start:

- a window (15 minutes by default, from a start of the agent or the long
  button hold);
- per client (an IPv4 address; an IPv6 /64, which one host may fill with
  addresses): 10 attempts 2 s apart, then one per 5 minutes. Another client
  (the technician at their own address) is not slowed by that one;
- for all clients together, a bucket of 30 attempts refilled one a minute
  and full at each opening: however many addresses a guesser uses, in any
  ``t`` seconds of one opening at most ``30 + t / 60`` wrong guesses (45 in
  a 15-minute window; 1,470 in a day if the window stayed open all day). A
  setup code is one of 10^8 - 11,460 (26.6 bits), so a guesser's chance is
  at most 4.5 in 10 million per 15-minute window, 1.5 in 100,000 per day of
  open window. A guesser with many addresses can empty the bucket: the
  technician then competes with it for the next attempt (one a minute, the
  answer's ``Retry-After`` says when), but is never shut out.

A confirmed attempt (the right code) is given back: it was no guess.

Nothing here touches sockets, files or clocks: time is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.ed25519_basic import NotOnCurve
from spake2.spake2 import SPAKEError

CODE_DIGITS: Final = 8
#: A side's message: its one-byte side id and an Ed25519 group element.
SPAKE2_MESSAGE_BYTES: Final = 33
TECHNICIAN_ID: Final = b"breakglass-technician"
MAX_MESSAGE_BYTES: Final = 160 * 1024  # an enrollment bundle with a full trigger-key list
WINDOW_S: Final = 15 * 60.0
#: Attempts one client may make in a window, RETRY_AFTER_FAILURE_S apart ...
MAX_FAILURES: Final = 10
RETRY_AFTER_FAILURE_S: Final = 2.0
#: ... and after those, one per this long.
SLOW_RETRY_S: Final = 300.0
#: All clients together: a bucket of GLOBAL_BURST attempts, one more per GLOBAL_PACE_S.
GLOBAL_BURST: Final = 30
GLOBAL_PACE_S: Final = 60.0
#: Clients remembered per window (the least recent forgotten: the bucket still counts).
MAX_CLIENTS: Final = 4096


class PairingError(ValueError):
    """Pairing cannot go on; ``code`` is stable (``wrong_code``, ``pairing_closed``, ...)."""

    def __init__(self, code: str, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        #: For ``rate_limited``: when another attempt may start.
        self.retry_after_s = retry_after_s


# -- setup codes -----------------------------------------------------------------


def trivial(code: str) -> bool:
    """Codes a person might guess first: one or two distinct digits, runs up or down."""
    digits = [int(c) for c in code]
    steps = {(b - a) % 10 for a, b in itertools.pairwise(digits)}
    return len(set(digits)) <= 2 or steps in ({1}, {9})


def new_setup_code() -> str:
    """A random, non-trivial 8-digit setup code."""
    while True:
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        if not trivial(code):
            return code


def normalise_code(text: str) -> str:
    """The code a person typed (``1234-5678``, ``1234 5678``) as 8 digits, or PairingError."""
    code = "".join(c for c in text.strip() if c not in " -")
    if len(code) != CODE_DIGITS or not code.isdigit() or not code.isascii():
        raise PairingError("bad_code", f"a setup code is {CODE_DIGITS} digits")
    return code


def show_code(code: str) -> str:
    """``1234-5678``: how labels and consoles print it."""
    return f"{code[:4]}-{code[4:]}"


# -- the exchange ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Keys:
    device_confirm: bytes
    technician_confirm: bytes
    to_technician: bytes
    to_device: bytes


def _derive(shared: bytes, transcript: bytes) -> _Keys:
    parts = HKDF(
        algorithm=hashes.SHA256(),
        length=128,
        salt=transcript,
        info=b"breakglass pairing v1",
    ).derive(shared)
    return _Keys(parts[:32], parts[32:64], parts[64:96], parts[96:])


def _transcript(device_id: str, technician_msg: bytes, device_msg: bytes) -> bytes:
    h = hashlib.sha256(b"breakglass pairing v1\x00" + device_id.encode() + b"\x00")
    for part in (technician_msg, device_msg):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


class _Channel:
    """ChaCha20-Poly1305 each way, counter nonces: replayed or reordered boxes fail."""

    def __init__(self, send_key: bytes, receive_key: bytes) -> None:
        self._send, self._receive = ChaCha20Poly1305(send_key), ChaCha20Poly1305(receive_key)
        self._sent = self._received = 0

    def seal(self, data: bytes) -> bytes:
        if len(data) > MAX_MESSAGE_BYTES:
            raise PairingError("too_large", f"pairing messages are at most {MAX_MESSAGE_BYTES} B")
        box = self._send.encrypt(self._sent.to_bytes(12, "big"), data, None)
        self._sent += 1
        return box

    def open(self, box: bytes) -> bytes:
        if len(box) > MAX_MESSAGE_BYTES + 16:
            raise PairingError("too_large", "pairing message too large")
        try:
            data = self._receive.decrypt(self._received.to_bytes(12, "big"), box, None)
        except InvalidTag as exc:
            raise PairingError("bad_box", "a sealed pairing message does not open") from exc
        self._received += 1
        return data


def _finish(side: object, inbound: bytes) -> bytes:
    if len(inbound) != SPAKE2_MESSAGE_BYTES:
        # The library decodes short inputs too (b"A\x01" is taken for a point): be exact.
        raise PairingError("malformed", f"a SPAKE2 message is {SPAKE2_MESSAGE_BYTES} bytes")
    try:
        key = side.finish(inbound)  # type: ignore[attr-defined]
    except (SPAKEError, NotOnCurve, ValueError, AssertionError, IndexError) as exc:
        raise PairingError("malformed", f"not a SPAKE2 message ({type(exc).__name__})") from exc
    assert isinstance(key, bytes)
    return key


class DevicePairing:
    """The device's side of one pairing attempt.

    ``respond(technician_msg)`` -> (device_msg, device_confirm); then
    ``confirm(technician_confirm)`` raises ``wrong_code`` unless the technician
    knew the code; afterwards :attr:`channel` seals and opens messages.
    """

    def __init__(self, code: str, device_id: str) -> None:
        self.device_id = device_id
        self._spake = SPAKE2_B(
            normalise_code(code).encode(), idA=TECHNICIAN_ID, idB=device_id.encode()
        )
        self._keys: _Keys | None = None
        self._transcript = b""
        self.channel: _Channel | None = None

    def respond(self, technician_msg: bytes) -> tuple[bytes, bytes]:
        device_msg = self._spake.start()
        shared = _finish(self._spake, technician_msg)
        self._transcript = _transcript(self.device_id, technician_msg, device_msg)
        self._keys = _derive(shared, self._transcript)
        return device_msg, _mac(self._keys.device_confirm, b"device", self._transcript)

    def confirm(self, technician_confirm: bytes) -> _Channel:
        keys = self._keys
        if keys is None:
            raise PairingError("out_of_order", "confirm before the exchange")
        expected = _mac(keys.technician_confirm, b"technician", self._transcript)
        if not hmac.compare_digest(expected, technician_confirm):
            raise PairingError("wrong_code", "the technician's confirmation does not match")
        self.channel = _Channel(keys.to_technician, keys.to_device)
        return self.channel


class TechnicianPairing:
    """The technician's side: ``start()`` -> message; ``finish(device_msg, device_confirm)``
    -> the technician's confirmation (raises ``wrong_code`` if the device, or whoever
    answered, does not know the code); afterwards :attr:`channel`."""

    def __init__(self, code: str, device_id: str) -> None:
        self.device_id = device_id
        self._spake = SPAKE2_A(
            normalise_code(code).encode(), idA=TECHNICIAN_ID, idB=device_id.encode()
        )
        self._msg = b""
        self.channel: _Channel | None = None

    def start(self) -> bytes:
        self._msg = bytes(self._spake.start())
        return self._msg

    def finish(self, device_msg: bytes, device_confirm: bytes) -> bytes:
        shared = _finish(self._spake, device_msg)
        transcript = _transcript(self.device_id, self._msg, device_msg)
        keys = _derive(shared, transcript)
        if not hmac.compare_digest(
            _mac(keys.device_confirm, b"device", transcript), device_confirm
        ):
            raise PairingError(
                "wrong_code",
                "the device's confirmation does not match (wrong code, or not the device)",
            )
        self.channel = _Channel(keys.to_device, keys.to_technician)
        return _mac(keys.technician_confirm, b"technician", transcript)


# -- the window ----------------------------------------------------------------------


def client_key(remote: str) -> str:
    """Whose budget an attempt from ``remote`` counts against: an IPv4 address, or an
    IPv6 /64 (one host can take any address in its /64; IPv4-mapped ones are IPv4).
    Anything else (no address) is its own client."""
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@dataclass(slots=True)
class _Client:
    attempts: int = 0
    not_before: float = 0.0


class PairingWindow:
    """When the device accepts a pairing attempt (time in the device's monotonic seconds),
    and from whom: see the module docstring for the budgets and the bound they give.

    :meth:`check` and :meth:`failed` go together, with nothing in between that could let
    another request pass the check first; an attempt counts until :meth:`succeeded`.
    """

    def __init__(
        self,
        *,
        duration_s: float = WINDOW_S,
        max_failures: int = MAX_FAILURES,
        retry_after_s: float = RETRY_AFTER_FAILURE_S,
        slow_retry_s: float = SLOW_RETRY_S,
        global_burst: int = GLOBAL_BURST,
        global_pace_s: float = GLOBAL_PACE_S,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.duration_s = duration_s
        self.max_failures = max_failures
        self.retry_after_s = retry_after_s
        self.slow_retry_s = slow_retry_s
        self.global_burst = global_burst
        self.global_pace_s = global_pace_s
        self.max_clients = max_clients
        self.closes_at: float | None = None
        #: Attempts counted in this window, all clients (confirmed ones are given back).
        self.failures = 0
        self.paired = False
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._tokens = float(global_burst)
        self._filled_at = 0.0

    def open(self, now: float) -> None:
        """Open (a start of the agent, or the long button hold): fresh budgets."""
        self.closes_at, self.failures, self.paired = now + self.duration_s, 0, False
        self._clients.clear()
        self._tokens, self._filled_at = float(self.global_burst), now

    def is_open(self, now: float) -> bool:
        """Whether the window is open (an attempt may start now or after a pause)."""
        return self.closes_at is not None and now < self.closes_at and not self.paired

    def attempts(self, client: str = "") -> int:
        """Attempts ``client`` has counted in this window."""
        state = self._clients.get(client)
        return 0 if state is None else state.attempts

    def check(self, now: float, client: str = "") -> None:
        """Raise ``pairing_closed`` or ``rate_limited`` unless ``client`` (a
        :func:`client_key`) may start an attempt now."""
        if not self.is_open(now):
            raise PairingError("pairing_closed", "pairing is not open on this device")
        state = self._clients.get(client)
        if state is not None and now < state.not_before:
            self._limited(state.not_before - now)
        self._refill(now)
        if self._tokens < 1:
            self._limited((1 - self._tokens) * self.global_pace_s)

    def failed(self, now: float, client: str = "") -> None:
        """Count an attempt of ``client`` (a wrong code until confirmed) and pause it."""
        self._refill(now)
        self._tokens -= 1
        self.failures += 1
        state = self._clients.pop(client, None) or _Client()
        state.attempts += 1
        pause = self.retry_after_s if state.attempts < self.max_failures else self.slow_retry_s
        state.not_before = now + pause
        self._clients[client] = state
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)

    def succeeded(self, client: str = "", *, close: bool = True) -> None:
        """``client`` paired: its attempt was no wrong guess (given back, and its pause is
        over); the window closes unless ``close`` is false."""
        self.paired = close
        self.failures = max(0, self.failures - 1)
        self._tokens = min(float(self.global_burst), self._tokens + 1)
        state = self._clients.get(client)
        if state is not None:
            state.attempts = max(0, state.attempts - 1)
            state.not_before = 0.0

    def _refill(self, now: float) -> None:
        if now > self._filled_at:
            earned = (now - self._filled_at) / self.global_pace_s
            self._tokens = min(float(self.global_burst), self._tokens + earned)
            self._filled_at = now

    @staticmethod
    def _limited(wait_s: float) -> NoReturn:
        raise PairingError(
            "rate_limited", f"retry in {wait_s:.1f} s", retry_after_s=max(1.0, math.ceil(wait_s))
        )
