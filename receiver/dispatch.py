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

**The device's clock.** A device judges a trigger's ``iat``/``exp`` by its own
clock (±60 s), and a Raspberry Pi's runs hours or days off until NTP syncs it.
The trigger is signed in the device's time: the receiver's clock plus the
device's offset as its heartbeats measured it (:mod:`receiver.device_clock`;
with none yet on its connection, the receiver's own time, right for a synced
device). A refusal for the clock (``not_yet_valid``, ``expired``: the device
checks the clock before it spends the nonce, so the trigger did nothing) means
the clock moved since it was measured (an NTP step) or was never measured: the
receiver takes a reading that arrived after the refused trigger was sent (waiting
for the next heartbeat at most :attr:`Dispatch.remeasure_s`) and signs once more,
once. The lifetime (120 s), the nonce and the device's
checks are as for any trigger. Each :class:`Delivery` says which receiver time
and device time it signed at, for the access log.

**Who gets one.** Only devices whose building the receiver verified: connected
with an accepted enrollment certificate naming the building (``devices_of``).
A device accepted by the allow-list (no certificate) that opened a session
claiming the building is listed as ``not_certified`` (``unverified_of``) and no
trigger is signed for it. Each trigger also names the device it is for (the
building's other devices refuse it, ``wrong_device``); an agent from before that
field took a trigger signed for one device on every device of its building (each
keeps its own replay cache), so a device that only claimed a building could
collect its triggers and use them there.

**Which session.** An ``extend`` or ``end`` names the session the device has open as
far as the receiver knows (``session_of``: the one open recording of that device that
is an emergency, not a share), so the device refuses it (``no_session``) if that
emergency is over by the time it arrives, and a later one goes on. A device with no
such recording, or more than one (one never closed), gets the trigger without it. An
agent from before both fields refuses them as unknown (:func:`_older_agent`): it is sent
the trigger without them, as before, and the delivery says ``unbound``.

**How far ahead.** A device's time is its word too. A trigger is not signed more
than :data:`MAX_DEVICE_AHEAD_S` ahead of the receiver's clock (the device is
listed as ``device_clock_ahead``): such a trigger stays valid on the building's
other devices until that later time. A Pi's clock runs *behind* after a power cut
(``fake-hwclock`` restores its last saved time; with no saved time, 1970) by hours,
days or months, so behind is not bounded: a trigger signed in the past is never
valid again on a device whose clock is right. Ahead has no such cause: a crystal
drifts seconds a day, and beyond an hour the clock (or the receiver's) is wrong.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as p
from provisioning.enrollment import ID_RE
from provisioning.keys import kid, load_private_key, new_private_key, public_pem
from provisioning.triggers import sign_trigger
from receiver.access_log import iso_ms
from receiver.device_clock import MAX_DEVICE_TIME, REMEASURE_S, ClockReading, DeviceClocks

log = logging.getLogger(__name__)

ACTIONS: Final = ("start", "extend", "end")
MAX_REASON: Final = 200
#: The most characters a signed trigger's ``reason`` may hold (``provisioning.triggers``
#: checks it, and a device refuses a longer one).
TRIGGER_REASON_MAX: Final = 500
PUSH_TIMEOUT_S: Final = 10.0
#: A device's answers that mean its clock and the trigger's times disagree.
CLOCK_REFUSALS: Final = frozenset({"not_yet_valid", "expired"})
#: The latest ``iat`` signed (a reading is at most this; a trigger's times fit 2**40).
_LATEST_IAT: Final = int(MAX_DEVICE_TIME)
#: The furthest a device's clock may read ahead of the receiver's for a trigger to be
#: signed in it (seconds; see the module docstring). Behind is not bounded.
MAX_DEVICE_AHEAD_S: Final = 3600.0
#: A device listed for the building without a trigger: it only claims the building.
NOT_CERTIFIED: Final = "not_certified"
#: A device whose clock reads more than :data:`MAX_DEVICE_AHEAD_S` ahead: not signed.
DEVICE_CLOCK_AHEAD: Final = "device_clock_ahead"


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
    """What one device answered (or why it could not be asked), and the times signed."""

    device: str
    status: int  # the device's HTTP-like status; 0: not delivered
    body: dict[str, Any]
    #: The receiver's clock when the (last) trigger was signed.
    receiver_time: float = 0.0
    #: The trigger's ``iat``: the device's time then, as the receiver measured it (None:
    #: not signed for it, ``not_certified``; for ``device_clock_ahead``, the time refused).
    device_time: int | None = 0
    #: The device's clock minus the receiver's that was used (None: not measured yet).
    clock_offset_s: float | None = None
    #: How old that measurement was (seconds).
    offset_age_s: float | None = None
    #: Triggers signed for this device: 2 after a refusal for the clock; 0: none.
    attempts: int = 1
    #: The first answer's error, when it was tried again.
    retried_after: str | None = None
    #: The session an extend or end named (None: none named).
    session: str | None = None
    #: Signed without session and device: the device is an older agent that refused them.
    unbound: bool = False

    def to_json(self) -> dict[str, Any]:
        """For the dispatcher's screen."""
        shown = {"device": self.device, "status": self.status, **self.body}
        return {**shown, "unbound": True} if self.unbound else shown

    def audit(self) -> dict[str, Any]:
        """For the access log: the answer and both clocks (ISO-8601 UTC, to the ms)."""
        offset = self.clock_offset_s
        entry: dict[str, Any] = {
            "device": self.device,
            "status": self.status,
            "receiver_time": iso_ms(self.receiver_time),
            "device_time": None if self.device_time is None else iso_ms(self.device_time),
            "clock_offset_s": None if offset is None else round(offset, 3),
            "attempts": self.attempts,
        }
        if self.offset_age_s is not None:
            entry["offset_age_s"] = round(self.offset_age_s, 1)
        if self.retried_after is not None:
            entry["retried_after"] = self.retried_after
        if self.session is not None:
            entry["named_session"] = self.session
        if self.unbound:
            entry["unbound"] = "an older agent: refused the session and device fields"
        return entry


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
    """Signs and delivers dispatch triggers to a building's connected devices.

    ``clocks``: the devices' clocks as measured by the ingest, on the same ``clock``
    (None: every trigger is signed on ``clock``, as a synced device expects).
    """

    def __init__(
        self,
        key: Ed25519PrivateKey,
        pusher: Pusher,
        devices_of: Callable[[str], Iterable[str]],
        *,
        clock: Callable[[], float] = time.time,
        clocks: DeviceClocks | None = None,
        remeasure_s: float = REMEASURE_S,
        unverified_of: Callable[[str], Iterable[str]] | None = None,
        session_of: Callable[[str], str | None] | None = None,
    ) -> None:
        """``devices_of(building)``: the connected devices certified for ``building`` (each
        gets a trigger); ``unverified_of(building)``: those that only claim it (listed as
        :data:`NOT_CERTIFIED`, sent nothing); ``session_of(device)``: the emergency
        session it has open as the receiver knows it (an extend or end names it)."""
        self.key = key
        self.pusher = pusher
        self.devices_of = devices_of
        self.unverified_of = unverified_of
        self.session_of = session_of
        self.clock = clock
        self.clocks = clocks
        #: How long to wait for a new heartbeat after a refusal for the clock.
        self.remeasure_s = remeasure_s

    @property
    def kid(self) -> str:
        """The dispatch key's id (as the trigger-key list names it)."""
        return kid(self.key.public_key())

    async def send(self, *, building: Any, action: Any, reason: Any, user: str) -> list[Delivery]:
        """Sign one trigger per certified device of ``building`` and push it; every answer,
        then each device that only claims ``building`` (:data:`NOT_CERTIFIED`)."""
        building, action, reason = check_request(building, action, reason)
        devices = sorted(set(self.devices_of(building)))
        claimed = self.unverified_of(building) if self.unverified_of is not None else ()
        unverified = sorted(set(claimed) - set(devices))
        if not devices and not unverified:
            raise DispatchError("no_device", f"no device of {building} is connected")
        said = signed_reason(reason, user)

        async def one(device: str) -> Delivery:
            clocks = self.clocks
            reading = None if clocks is None else clocks.reading(device)
            sent = time.monotonic() if clocks is None else clocks.mono()
            delivery = await self._push(device, action, building, said, reading)
            if clocks is None or not _clock_refused(delivery):
                return delivery
            # Its clock moved since it was measured (an NTP step), or it was not measured
            # yet: take a reading that arrived after this trigger was sent, sign once more.
            fresh = await clocks.next_reading(device, after=sent, within=self.remeasure_s)
            if fresh is None:
                return delivery
            log.warning(
                "dispatch %s to %s refused for the clock (%s); signing again with its clock "
                "measured after it (offset %+.1f s)", action, device,
                delivery.body.get("detail"), fresh.offset_s,
            )  # fmt: skip
            again = await self._push(device, action, building, said, fresh)
            first = str(delivery.body.get("error"))
            return dataclasses.replace(again, attempts=1 + again.attempts, retried_after=first)

        deliveries = list(await asyncio.gather(*(one(d) for d in devices)))
        now = self.clock()
        deliveries += [_not_certified(device, building, now) for device in unverified]
        for delivery in deliveries:
            log.warning(
                "dispatch %s %s by %s to %s: %d %s (device time %s, receiver time %s)",
                action, building, user, delivery.device, delivery.status,
                delivery.body.get("error") or delivery.body.get("session"),
                "-" if delivery.device_time is None else iso_ms(delivery.device_time),
                iso_ms(delivery.receiver_time),
            )  # fmt: skip
        return deliveries

    async def _push(
        self, device: str, action: str, building: str, reason: str, reading: ClockReading | None
    ) -> Delivery:
        """Sign one trigger for ``device`` in its time (as ``reading`` measured it) and push
        it; what it answered."""
        now = self.clock()
        iat = now if reading is None else reading.device_time(now)
        signed_at = min(max(int(iat), 0), _LATEST_IAT)  # a reading is 1970..9999: a no-op
        times: dict[str, Any] = {"receiver_time": now, "device_time": signed_at}
        if reading is not None:
            times["clock_offset_s"] = reading.offset_s
            times["offset_age_s"] = max(0.0, now - reading.at)
        if iat - now > MAX_DEVICE_AHEAD_S:
            # Before signing: nothing valid that far ahead is made, let alone sent.
            detail = (
                f"its clock reads {iat - now:.0f} s ahead of the receiver's, more than the "
                f"{MAX_DEVICE_AHEAD_S:.0f} s a trigger is signed ahead; not signed, not sent "
                "(set its clock right: NTP)"
            )
            body = {"error": DEVICE_CLOCK_AHEAD, "detail": detail}
            return Delivery(device, 0, body, attempts=0, **times)
        session = None
        if action != "start" and self.session_of is not None:
            session = self.session_of(device)
            times["session"] = session
        for bound in (True, False):
            # One envelope per device: each nonce is single-use on its device.
            envelope = sign_trigger(
                self.key, action=action, building=building, reason=reason, now=signed_at,
                session=session if bound else None, device=device if bound else None,
            )  # fmt: skip
            try:
                result = await self.pusher.push_trigger(device, envelope, timeout_s=PUSH_TIMEOUT_S)
            except LookupError:
                body = {"error": "not_connected", "detail": "went offline"}
                return Delivery(device, 0, body, **times)
            except TimeoutError:
                return Delivery(
                    device, 0, {"error": "no_answer", "detail": "may have applied"}, **times
                )
            if not (bound and _older_agent(result.status, result.body)):
                break
            # An agent from before the session and device fields refuses them (it
            # rejects unknown fields): it gets the trigger it knew, as it did then.
            log.warning("dispatch to %s: an older agent; signed without session and device", device)
            times["session"], times["unbound"] = None, True
        return Delivery(device, result.status, dict(result.body), **times)


def _not_certified(device: str, building: str, now: float) -> Delivery:
    """The entry of a device that only claims ``building``: nothing signed, nothing sent."""
    detail = (
        f"connected without an enrollment certificate (allow-list): {building} is only "
        "what its session claims; no trigger is signed for it"
    )
    body = {"error": NOT_CERTIFIED, "detail": detail}
    return Delivery(device, 0, body, receiver_time=now, device_time=None, attempts=0)


def _older_agent(status: int, body: Mapping[str, Any]) -> bool:
    """Whether the answer is an agent's from before the ``session`` and ``device``
    fields, refusing one of them as unknown (nothing was applied)."""
    detail = str(body.get("detail", ""))
    return (
        status == 400
        and body.get("error") == "malformed"
        and detail.startswith("payload: unknown field ")
        and detail.removeprefix("payload: unknown field ") in ("'device'", "'session'")
    )


def _clock_refused(delivery: Delivery) -> bool:
    """Whether the device refused the trigger for its times (and did nothing with it)."""
    return delivery.status == 403 and delivery.body.get("error") in CLOCK_REFUSALS
