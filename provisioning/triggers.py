"""Signed remote triggers and the district's trigger-key list: the sans-IO core.

A trigger (DESIGN.md "Signed documents") starts, extends or ends an emergency.
:func:`verify_trigger` applies every rule and answers :class:`Accepted` or
:class:`Rejected` with a stable reason code (the Local API's codes). It reads
no clock and no file: ``now`` (UTC seconds) and ``mono`` (the device's
monotonic seconds, for challenges) are passed in, and the replay cache and
the outstanding challenges are objects the shell owns and persists.

Order of the checks, so that each code means one thing:
``too_large``/``malformed`` (the envelope) -> ``unknown_key`` (kid not in a
current list; an expired list enrols nothing) -> ``bad_signature`` ->
``malformed`` (the payload, parsed only now) -> ``wrong_building`` (payload
or key scope) -> ``role_forbidden`` -> ``bad_challenge`` | ``not_yet_valid``
/ ``expired`` (by the clock, then by ``forgotten_before``: a window that ended
before a time the replay cache may have forgotten nonces of) -> ``replayed``.
An accepted trigger's nonce is consumed. :func:`check_trigger` applies the same
rules and consumes nothing (the Local API asks it which triggers skip its rate limit).

Two optional fields, additions to DESIGN.md's (docs/DECISIONS.md "Triggers name
their session and their device"): an ``extend`` or ``end`` may name the ``session``
it acts on (the device then refuses it, ``no_session``, unless that very session is
open, so an end meant for one emergency never ends the next one; a ``start`` names
none, ``malformed``), and any trigger may name the ``device`` it is for (refused
``wrong_device`` by every other device of the building, checked after
``wrong_building``).

The trigger-key list (``type: "trigger_keys"``) is signed by the district
authority and carries a ``version`` and an ``exp``: :meth:`Keyring.install`
refuses a lower version (rollback) and an expired list (freeze); rotating or
revoking a key is publishing the next version without it. The physical
button never consults any of this.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from provisioning import documents as d
from provisioning.documents import DocumentError
from provisioning.keys import kid as key_id

Action = Literal["start", "extend", "end"]
Role = Literal["dispatch", "principal", "superintendent"]
ACTIONS: Final = ("start", "extend", "end")
ROLES: Final = ("dispatch", "principal", "superintendent")
#: DESIGN.md: who may do what.
MAY: Final[Mapping[str, frozenset[str]]] = {
    "start": frozenset(ROLES),
    "extend": frozenset({"dispatch", "superintendent"}),
    "end": frozenset({"dispatch", "superintendent"}),
}
SKEW_S: Final = 60
MAX_LIFETIME_S: Final = 300
#: A challenge is good for one trigger within this long of being issued.
CHALLENGE_TTL_S: Final = 300.0
MAX_CHALLENGES: Final = 64
MAX_CHALLENGES_PER_CLIENT: Final = 4
MAX_KEYLIST_PAYLOAD: Final = 64 * 1024
ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
#: An emergency session's id as the agent makes them (``20261128T133000Z-3f9a1c2e``),
#: loosely: the device compares it whole.
SESSION_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
NONCE_RE: Final = re.compile(r"^[A-Za-z0-9_-]{22,86}$")  # 16..64 bytes in base64url

#: Every code a rejected trigger can carry (the Local API's ``error`` values).
CODES: Final = (
    "malformed",
    "too_large",
    "unknown_key",
    "bad_signature",
    "role_forbidden",
    "wrong_building",
    "expired",
    "not_yet_valid",
    "wrong_device",
    "replayed",
    "bad_challenge",
)


# -- the district's trigger-key list ----------------------------------------------


@dataclass(frozen=True, slots=True)
class TriggerKey:
    """One enrolled trigger key: its role and the buildings it may trigger."""

    kid: str
    public: Ed25519PublicKey
    role: Role
    buildings: frozenset[str] | None  # None: every building of the district
    label: str

    def covers(self, building: str) -> bool:
        """Whether this key is enrolled for ``building``."""
        return self.buildings is None or building in self.buildings


@dataclass(frozen=True, slots=True)
class TriggerKeyList:
    """A verified trigger-key list (its envelope kept, to persist and pass on)."""

    version: int
    iat: int
    exp: int
    keys: Mapping[str, TriggerKey]
    envelope: Mapping[str, str]


def parse_key_list(
    body: bytes | str | Mapping[str, Any], authority: Ed25519PublicKey
) -> TriggerKeyList:
    """Verify a trigger-key list signed by the district ``authority``."""
    envelope = d.open_signed(
        body, authority, what="trigger-key list", max_payload=MAX_KEYLIST_PAYLOAD
    )
    doc = d.read_payload(
        envelope,
        "trigger_keys",
        {"version": lambda v, w: d.integer(v, w, low=1, high=2**40), "keys": _keys},
        frozenset(),
    )
    if doc["exp"] <= doc["iat"]:
        raise DocumentError("malformed", "payload.exp: not after iat")
    return TriggerKeyList(
        doc["version"],
        doc["iat"],
        doc["exp"],
        doc["keys"],
        envelope.as_json(),
    )


def _keys(value: Any, where: str) -> dict[str, TriggerKey]:
    if not isinstance(value, list) or len(value) > 512:
        raise DocumentError("malformed", f"{where}: expected a list of at most 512 keys")
    keys: dict[str, TriggerKey] = {}
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise DocumentError("malformed", f"{at}: expected an object")
        extra = set(entry) - {"key", "role", "buildings", "label"}
        if extra:
            raise DocumentError("malformed", f"{at}: unknown field {sorted(extra)[0]!r}")
        raw = d.b64url_decode(entry.get("key", ""), what=f"{at}.key")
        try:
            public = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise DocumentError("malformed", f"{at}.key: not a raw Ed25519 public key") from exc
        role = d.one_of(entry.get("role"), f"{at}.role", ROLES)
        buildings = entry.get("buildings")
        scope: frozenset[str] | None
        if buildings == "all":
            scope = None
        elif isinstance(buildings, list) and buildings:
            scope = frozenset(
                d.text(b, f"{at}.buildings[{j}]", max_len=32, pattern=ID_RE)
                for j, b in enumerate(buildings)
            )
        else:
            raise DocumentError("malformed", f'{at}.buildings: expected "all" or a list of ids')
        label = d.text(entry.get("label"), f"{at}.label", max_len=120)
        k = key_id(public)
        if k in keys:
            raise DocumentError("malformed", f"{at}.key: listed twice")
        keys[k] = TriggerKey(k, public, role, scope, label)  # type: ignore[arg-type]
    return keys


def sign_key_list(
    authority: Ed25519PrivateKey, version: int, keys: list[dict[str, Any]], *, iat: int, exp: int
) -> dict[str, str]:
    """Sign a trigger-key list (``keys`` as in the payload: key, role, buildings, label)."""
    payload = {"type": "trigger_keys", "v": 1, "iat": iat, "exp": exp, "version": version}
    return d.seal({**payload, "keys": keys}, authority, max_payload=MAX_KEYLIST_PAYLOAD)


class KeyListRefused(DocumentError):
    """A list that is valid but may not replace the current one."""


class Keyring:
    """The current trigger-key list of a device (``None`` until one is installed)."""

    def __init__(self, current: TriggerKeyList | None = None) -> None:
        self.current = current

    def install(self, new: TriggerKeyList, now: float) -> bool:
        """Make ``new`` current; False when it is the current one already.

        Raises :class:`KeyListRefused` (``keylist_rollback``, ``keylist_expired``).
        """
        if now >= new.exp:
            raise KeyListRefused("keylist_expired", f"trigger-key list v{new.version} expired")
        old = self.current
        if old is not None:
            if new.version < old.version:
                raise KeyListRefused(
                    "keylist_rollback",
                    f"trigger-key list v{new.version} is older than the installed v{old.version}",
                )
            if new.version == old.version:
                if new.envelope["payload"] != old.envelope["payload"]:
                    raise KeyListRefused(
                        "keylist_rollback",
                        f"a different trigger-key list with the installed version {old.version}",
                    )
                return False
        self.current = new
        return True

    def lookup(self, kid: str, now: float) -> TriggerKey | str:
        """The enrolled key, or why there is none (a detail for ``unknown_key``)."""
        keys = self.current
        if keys is None:
            return "no trigger-key list is installed"
        if now >= keys.exp:
            return f"the trigger-key list v{keys.version} expired (frozen until a new one)"
        key = keys.keys.get(kid)
        if key is None:
            return f"key {kid} is not in trigger-key list v{keys.version}"
        return key


# -- triggers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trigger:
    """A verified trigger."""

    action: Action
    building: str
    cameras: tuple[str, ...] | None  # None: "all"
    reason: str
    nonce: str
    iat: int
    exp: int
    challenge: str | None
    kid: str
    role: Role
    label: str
    session: str | None = None  # an extend's or end's: the session it acts on, if named


@dataclass(frozen=True, slots=True)
class Accepted:
    """Every rule holds; the nonce is consumed."""

    trigger: Trigger


@dataclass(frozen=True, slots=True)
class Rejected:
    """A rule failed. ``kid``, ``role``, ``action``, ``reason`` are set as far as verified."""

    code: str
    detail: str
    kid: str | None = None
    role: str | None = None
    action: str | None = None
    reason: str | None = None


class ReplayCache(Protocol):
    """Nonces of accepted triggers, remembered while a replay could still pass the clock."""

    def seen(self, nonce: str) -> bool: ...

    def add(self, nonce: str, keep_until: float) -> None: ...


class MemoryReplayCache:
    """An in-memory :class:`ReplayCache` (the agent persists its own in SQLite)."""

    def __init__(self) -> None:
        self.nonces: dict[str, float] = {}

    def seen(self, nonce: str) -> bool:
        return nonce in self.nonces

    def add(self, nonce: str, keep_until: float) -> None:
        self.nonces[nonce] = keep_until


class ChallengesExhausted(Exception):
    """No challenge now: too many are outstanding (in all, or of this client)."""


class Challenges:
    """Device nonces for triggers from signers whose clock the device cannot trust
    (or a device whose own clock is not synchronised yet). Single use, in memory,
    each good for ``ttl_s`` of the device's monotonic clock; at most ``limit``
    outstanding, and ``per_client`` of one client (its address).

    When they are all outstanding, new ones are refused, never the oldest given up: a
    dispatcher signing with one takes minutes, and a flood of requests must not cancel
    it.
    """

    def __init__(
        self,
        ttl_s: float = CHALLENGE_TTL_S,
        limit: int = MAX_CHALLENGES,
        per_client: int = MAX_CHALLENGES_PER_CLIENT,
    ) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self.per_client = per_client
        #: challenge -> (issued at, client), oldest first.
        self._issued: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._held: Counter[str] = Counter()

    def issue(self, mono: float, client: str | None = None) -> str:
        """A fresh challenge (128 bits, base64url, never starting with ``-``) for
        ``client`` (None: not counted per client). Raises :class:`ChallengesExhausted`.

        People copy it onto a command line (``trigger sign --challenge C``), where
        a leading ``-`` reads as an option; one draw in 64 would, so redraw.
        """
        self._expire(mono)
        if len(self._issued) >= self.limit:
            raise ChallengesExhausted(f"{self.limit} challenges are outstanding; retry later")
        if client is not None and self._held[client] >= self.per_client:
            raise ChallengesExhausted(
                f"{self.per_client} challenges of this client are outstanding; use one"
            )
        challenge = secrets.token_urlsafe(16)
        while challenge.startswith("-") or challenge in self._issued:
            challenge = secrets.token_urlsafe(16)
        self._issued[challenge] = (mono, client)
        if client is not None:
            self._held[client] += 1
        return challenge

    def valid(self, challenge: str, mono: float) -> bool:
        """Whether ``challenge`` is outstanding and fresh (does not consume it)."""
        issued = self._issued.get(challenge)
        return issued is not None and 0 <= mono - issued[0] <= self.ttl_s

    def consume(self, challenge: str) -> None:
        """Spend a challenge (after the trigger that carried it was accepted)."""
        issued = self._issued.pop(challenge, None)
        if issued is not None and issued[1] is not None:
            self._held[issued[1]] -= 1
            if self._held[issued[1]] <= 0:
                del self._held[issued[1]]

    def _expire(self, mono: float) -> None:
        while self._issued:
            challenge, (issued, _) = next(iter(self._issued.items()))
            if mono - issued <= self.ttl_s:
                return
            self.consume(challenge)


def verify_trigger(
    body: bytes | str | Mapping[str, Any],
    *,
    building: str,
    keyring: Keyring,
    now: float,
    mono: float,
    replay: ReplayCache,
    challenges: Challenges,
    forgotten_before: float | None = None,
    device: str | None = None,
) -> Accepted | Rejected:
    """Apply every rule of DESIGN.md to one trigger envelope (see the module docstring);
    an accepted trigger's nonce is remembered and its challenge spent. ``device``: this
    device's id (a trigger naming another is refused ``wrong_device``).

    ``forgotten_before`` (UTC seconds): the replay cache may have forgotten the nonces of
    triggers whose window (``exp`` + :data:`SKEW_S`) ended before it, so such a trigger
    is refused ``expired`` whatever the clock says now (a clock set back cannot bring
    back a trigger the cache no longer knows it accepted). A trigger carrying a device
    challenge is fresh by that challenge and is not held to it.
    """
    result = check_trigger(
        body,
        building=building,
        keyring=keyring,
        now=now,
        mono=mono,
        replay=replay,
        challenges=challenges,
        forgotten_before=forgotten_before,
        device=device,
    )
    if isinstance(result, Accepted):
        trigger = result.trigger
        # Remember it while any clock could still take it for valid (a challenge-path
        # trigger carries times the device cannot judge: keep it at least a lifetime).
        replay.add(trigger.nonce, max(trigger.exp + SKEW_S, now + MAX_LIFETIME_S + SKEW_S))
        if trigger.challenge is not None:
            challenges.consume(trigger.challenge)
    return result


def check_trigger(
    body: bytes | str | Mapping[str, Any],
    *,
    building: str,
    keyring: Keyring,
    now: float,
    mono: float,
    replay: ReplayCache,
    challenges: Challenges,
    forgotten_before: float | None = None,
    device: str | None = None,
) -> Accepted | Rejected:
    """What :func:`verify_trigger` would answer, consuming nothing (no nonce remembered,
    no challenge spent): an :class:`Accepted` here is not accepted yet."""
    try:
        envelope = d.parse_envelope(body)
    except DocumentError as exc:
        return Rejected(exc.code, exc.detail)
    key = keyring.lookup(envelope.kid, now)
    if isinstance(key, str):
        return Rejected("unknown_key", key, kid=envelope.kid)
    if not d.signature_valid(envelope, key.public):
        return Rejected("bad_signature", "signature does not verify", kid=key.kid, role=key.role)
    try:
        doc = d.read_payload(envelope, "trigger", _TRIGGER_FIELDS, _OPTIONAL)
    except DocumentError as exc:
        return Rejected(exc.code, exc.detail, kid=key.kid, role=key.role)
    seen = {"kid": key.kid, "role": key.role, "action": doc["action"], "reason": doc["reason"]}
    if doc["exp"] <= doc["iat"] or doc["exp"] - doc["iat"] > MAX_LIFETIME_S:
        return Rejected(
            "malformed", f"payload.exp: must be after iat and at most {MAX_LIFETIME_S} s", **seen
        )
    if "session" in doc and doc["action"] == "start":
        return Rejected(
            "malformed", "payload.session: only an extend or an end names a session", **seen
        )
    if doc["building"] != building:
        return Rejected("wrong_building", f"trigger is for {doc['building']!r}", **seen)
    if not key.covers(building):
        return Rejected("wrong_building", f"key {key.kid} is not enrolled for {building!r}", **seen)
    if "device" in doc and doc["device"] != device:
        return Rejected("wrong_device", f"trigger is for device {doc['device']!r}", **seen)
    if key.role not in MAY[doc["action"]]:
        return Rejected("role_forbidden", f"a {key.role} key may not {doc['action']}", **seen)
    challenge = doc.get("challenge")
    if challenge is not None:
        # The device issued it moments ago: freshness comes from the challenge, not
        # from a clock the signer and the device may disagree on.
        if not challenges.valid(challenge, mono):
            return Rejected("bad_challenge", "challenge unknown, used or stale", **seen)
    elif doc["iat"] > now + SKEW_S:
        return Rejected("not_yet_valid", f"iat is {doc['iat'] - now:.0f} s in the future", **seen)
    elif doc["exp"] < now - SKEW_S:
        return Rejected("expired", f"expired {now - doc['exp']:.0f} s ago", **seen)
    elif forgotten_before is not None and doc["exp"] + SKEW_S < forgotten_before:
        ended = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(doc["exp"]))
        return Rejected(
            "expired",
            f"its window ended ({ended}) before the oldest time this device still knows"
            " the triggers of (its clock was set back?); sign it with a device challenge",
            **seen,
        )
    if replay.seen(doc["nonce"]):
        return Rejected("replayed", "nonce already used", **seen)
    cameras = None if doc["cameras"] == "all" else tuple(doc["cameras"])
    return Accepted(
        Trigger(
            doc["action"],
            doc["building"],
            cameras,
            doc["reason"],
            doc["nonce"],
            doc["iat"],
            doc["exp"],
            challenge,
            key.kid,
            key.role,
            key.label,
            doc.get("session"),
        )
    )


def _cameras(value: Any, where: str) -> str | list[str]:
    if value == "all":
        return "all"
    if not isinstance(value, list) or not 0 < len(value) <= 64:
        raise DocumentError("malformed", f'{where}: expected "all" or a list of 1..64 ids')
    ids = [d.text(c, f"{where}[{i}]", max_len=32, pattern=ID_RE) for i, c in enumerate(value)]
    if len(set(ids)) != len(ids):
        raise DocumentError("malformed", f"{where}: a camera is listed twice")
    return ids


def _nonce(value: Any, where: str) -> str:
    d.text(value, where, max_len=86, pattern=NONCE_RE)
    d.b64url_decode(value, what=where)  # canonical base64url of 16..64 bytes
    return str(value)


_TRIGGER_FIELDS: Final[Mapping[str, d.Check]] = {
    "action": lambda v, w: d.one_of(v, w, ACTIONS),
    "building": lambda v, w: d.text(v, w, max_len=32, pattern=ID_RE),
    "cameras": _cameras,
    "reason": lambda v, w: d.text(v, w, max_len=500),
    "nonce": _nonce,
    "challenge": _nonce,
    "session": lambda v, w: d.text(v, w, max_len=64, pattern=SESSION_RE),
    "device": lambda v, w: d.text(v, w, max_len=32, pattern=ID_RE),
}
_OPTIONAL: Final = frozenset({"challenge", "session", "device"})


def sign_trigger(
    key: Ed25519PrivateKey,
    *,
    action: str,
    building: str,
    reason: str,
    now: int,
    cameras: str | list[str] = "all",
    lifetime_s: int = 120,
    challenge: str | None = None,
    session: str | None = None,
    device: str | None = None,
) -> dict[str, str]:
    """A signed trigger envelope (what ``breakglass trigger sign`` prints); ``session``:
    the one an extend or an end acts on (the device refuses it for any other);
    ``device``: the one device it is for (the building's others refuse it)."""
    payload: dict[str, Any] = {
        "type": "trigger",
        "v": 1,
        "iat": now,
        "exp": now + lifetime_s,
        "action": action,
        "building": building,
        "cameras": cameras,
        "reason": reason,
        "nonce": secrets.token_urlsafe(16),
    }
    if challenge is not None:
        payload["challenge"] = challenge
    if session is not None:
        payload["session"] = session
    if device is not None:
        payload["device"] = device
    return d.seal(payload, key)
