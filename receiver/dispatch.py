"""Dispatch: a dispatcher starts, extends or ends an emergency for a building.

The receiver holds a **dispatch key** (``DATA/dispatch.key``, Ed25519, mode
0600) that the district enrolls in its trigger-key list with the role
``dispatch`` (``breakglass trust keylist``); the agents verify every trigger
against that list, so the receiver can do only what the district let the
dispatch role do (start, extend, end; any building the list names). The
receiver signs a trigger for the building and pushes it over each connected
device's control connection (DESIGN.md uplink ``trigger``); the device
answers as its Local API would, and audits it.

Who pressed it (the dispatcher's account) is not in the signed trigger (the
device knows the role, not people): it goes in the reason the device audits
(``"911 call: shots fired (dispatcher jdoe)"``) and in the receiver's access
log, so both trails name the person. The name always comes last and whole
(:func:`signed_reason`): only the last ``(dispatcher NAME)`` is the receiver's,
anything before it is the dispatcher's own text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from provisioning.enrollment import ID_RE
from provisioning.keys import kid, load_private_key, new_private_key, public_pem
from provisioning.triggers import sign_trigger

log = logging.getLogger(__name__)

ACTIONS: Final = ("start", "extend", "end")
MAX_REASON: Final = 200
#: The most characters a signed trigger's ``reason`` may hold (``provisioning.triggers``
#: checks it, and a device refuses a longer one).
TRIGGER_REASON_MAX: Final = 500
PUSH_TIMEOUT_S: Final = 10.0


class DispatchError(ValueError):
    """A dispatch request that cannot be sent; ``code`` is stable."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class Pusher(Protocol):
    """What dispatch needs of the ingest server."""

    async def push_trigger(
        self, device: str, envelope: dict[str, Any], *, timeout_s: float = 10.0
    ) -> p.TriggerResult:
        """Push a trigger to a connected device and return its answer."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one device answered (or why it could not be asked)."""

    device: str
    status: int  # the device's HTTP-like status; 0: not delivered
    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """For the dispatcher's screen."""
        return {"device": self.device, "status": self.status, **self.body}


def load_or_make_key(path: Path) -> Ed25519PrivateKey:
    """The receiver's dispatch key; made on first start (its public half beside it)."""
    if not path.exists():
        key = new_private_key(path)
        path.with_suffix(".pub").write_bytes(public_pem(key.public_key()))
        log.warning(
            "made the dispatch key %s (kid %s): enroll %s in the district's trigger-key list "
            "with the role dispatch", path, kid(key.public_key()), path.with_suffix(".pub"),
        )  # fmt: skip
        return key
    return load_private_key(path)


def check_request(building: Any, action: Any, reason: Any) -> tuple[str, str, str]:
    """Validate a dispatcher's request (DispatchError names the field)."""
    if not isinstance(building, str) or not ID_RE.match(building):
        raise DispatchError("malformed", "building: a building id (lowercase, digits, - or _)")
    if action not in ACTIONS:
        raise DispatchError("malformed", f"action: one of {', '.join(ACTIONS)}")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise DispatchError("malformed", f"reason: 1..{MAX_REASON} characters (the threat)")
    if not reason.isprintable():
        raise DispatchError("malformed", "reason: printable text only")
    return building, str(action), reason.strip()


def signed_reason(reason: str, user: str) -> str:
    """The reason a trigger carries: the dispatcher's ``reason``, then ``(dispatcher
    USER)``, last and whole; ``reason`` is shortened (ending in ``…``) if together they
    would not fit in :data:`TRIGGER_REASON_MAX` (a reason of :data:`MAX_REASON` and any
    account name fit)."""
    suffix = f" (dispatcher {user})"
    room = TRIGGER_REASON_MAX - len(suffix)
    if room < 2:
        raise DispatchError("malformed", "user: too long a name for a trigger's reason")
    if len(reason) > room:
        reason = reason[: room - 1] + "…"
    return reason + suffix


class Dispatch:
    """Signs and delivers dispatch triggers to a building's connected devices."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        pusher: Pusher,
        devices_of: Callable[[str], Iterable[str]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.pusher = pusher
        self.devices_of = devices_of
        self.clock = clock

    @property
    def kid(self) -> str:
        """The dispatch key's id (as the trigger-key list names it)."""
        return kid(self.key.public_key())

    async def send(self, *, building: Any, action: Any, reason: Any, user: str) -> list[Delivery]:
        """Sign one trigger per device of ``building`` and push it; every answer."""
        building, action, reason = check_request(building, action, reason)
        devices = sorted(set(self.devices_of(building)))
        if not devices:
            raise DispatchError("no_device", f"no device of {building} is connected")
        said = signed_reason(reason, user)

        async def one(device: str) -> Delivery:
            # One envelope per device: each nonce is single-use on its device.
            envelope = sign_trigger(
                self.key, action=action, building=building, reason=said, now=int(self.clock())
            )
            try:
                result = await self.pusher.push_trigger(device, envelope, timeout_s=PUSH_TIMEOUT_S)
            except LookupError:
                return Delivery(device, 0, {"error": "not_connected", "detail": "went offline"})
            except TimeoutError:
                return Delivery(device, 0, {"error": "no_answer", "detail": "may have applied"})
            return Delivery(device, result.status, dict(result.body))

        deliveries = list(await asyncio.gather(*(one(d) for d in devices)))
        for delivery in deliveries:
            log.warning(
                "dispatch %s %s by %s to %s: %d %s", action, building, user, delivery.device,
                delivery.status, delivery.body.get("error") or delivery.body.get("session"),
            )  # fmt: skip
        return deliveries
