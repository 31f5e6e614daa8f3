"""The agent's door for remote triggers: the verifier's state, persisted, and audited.

:func:`provisioning.triggers.verify_trigger` is pure; this shell owns what it
needs: the installed trigger-key list (``state/trigger-keys.json``, so a
rollback by swapping the config file is refused after a restart too), the
replay cache (``state/replay.sqlite``), the outstanding device challenges,
and counters for ``/metrics``. Every attempt that fails verification is
audited here; accepted ones are audited by the daemon once applied (with the
session they acted on). The physical button never passes through here.

Refusals come from anyone on the LAN, so their auditing is bounded
(:class:`RefusalDigest`): written on the trail's own thread, never on the event
loop; every field taken from the request cut to a few hundred characters; and
of each kind of refusal (its event and code, and the key when the signature
verified) only the first in a minute in full, the others in that minute as one
``refusals`` summary entry (``of``, ``code``, ``count``, ``first``, ``last``,
``example``). A flood costs the trail about one entry a minute per kind.

Device challenges (:class:`FairChallenges`): an outstanding challenge is never
given up for another (a signer takes minutes with one, and a flood must not
cancel it: review t4, where 256 addresses did). A new one is refused (429) when
all are outstanding, when its client (an address) holds its share, or when its
network (the /24 of an IPv4 address, the /64 of an IPv6 one) holds its share:
one LAN cannot take them all, however many addresses it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import sqlite3
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agent.audit import AuditLog
from agent.config import TrustConfig
from agent.replay import SqliteReplayCache
from agent.statefile import read_state, set_aside, write_json
from provisioning.documents import DocumentError, envelope_limit, open_signed
from provisioning.errors import KeyFileError
from provisioning.keys import load_public_key
from provisioning.triggers import (
    CHALLENGE_TTL_S,
    MAX_CHALLENGES_PER_CLIENT,
    MAX_KEYLIST_PAYLOAD,
    Accepted,
    Challenges,
    ChallengesExhausted,
    Keyring,
    Rejected,
    TriggerKeyList,
    check_trigger,
    parse_key_list,
    verify_trigger,
)

log = logging.getLogger(__name__)

#: Of each kind of refusal, one is audited in full per this many seconds; the rest in summary.
REFUSALS_REPORT_S: Final = 60.0
#: Kinds of refusal followed at once (codes, times the keys enrolled: bounded anyway).
MAX_REFUSAL_KINDS: Final = 256
#: The longest text from a request that goes into the trail (a detail, a source).
MAX_DETAIL: Final = 300
#: The longest trigger reason that goes into the trail.
MAX_REASON: Final = 500
#: Device challenges outstanding at once (single use, 300 s each; a few bytes each).
MAX_OUTSTANDING_CHALLENGES: Final = 256
#: Device challenges outstanding at once for one network (see :func:`address_prefix`).
MAX_CHALLENGES_PER_PREFIX: Final = 16


@dataclass
class _Run:
    """Refusals of one kind since ``opened`` (monotonic), not audited one by one."""

    opened: float
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    example: dict[str, Any] = field(default_factory=dict)


class RefusalDigest:
    """Audits refusals so that their senders cannot fill the trail or stall the loop.

    The first refusal of a kind (``event`` and a key, such as its code) is audited
    in full at once; further ones within ``every_s`` are counted, and written when
    that time is up as one ``refusals`` entry: ``of`` (the event), ``code``,
    ``count``, ``first`` and ``last`` (UTC seconds) and ``example`` (the first of
    them, as it would have been audited). While they keep coming, one such entry
    per ``every_s``; after a quiet ``every_s`` the next is audited in full again.
    Every entry goes through :meth:`AuditLog.record_soon` (the trail's thread).
    Call :meth:`close` at the end: it writes what is counted.
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        every_s: float = REFUSALS_REPORT_S,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.audit = audit
        self.every_s = every_s
        self.clock = clock
        self.mono = mono
        self._runs: OrderedDict[tuple[str | None, ...], _Run] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def refuse(self, event: str, key: tuple[str | None, ...], fields: dict[str, Any]) -> bool:
        """Audit or count one refusal; True when it was audited in full (log it then)."""
        now = self.mono()
        self._report(now)
        kind = (event, *key)
        run = self._runs.get(kind)
        if run is None:
            while len(self._runs) >= MAX_REFUSAL_KINDS:
                oldest, dropped = self._runs.popitem(last=False)
                self._summarise(oldest, dropped)
            self._runs[kind] = _Run(opened=now)
            self.audit.record_soon(event, **fields)
            return True
        t = self.clock()
        if run.count == 0:
            run.first, run.example = t, fields
        run.count += 1
        run.last = t
        self._arm(run.opened + self.every_s - now)
        return False

    def close(self) -> None:
        """Write a summary of every refusal counted and not written yet."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for kind, run in self._runs.items():
            self._summarise(kind, run)
        self._runs.clear()

    def _report(self, now: float) -> None:
        for kind, run in list(self._runs.items()):
            if now - run.opened < self.every_s:
                continue
            if run.count:  # still coming: the next ones are counted too
                self._summarise(kind, run)
                self._runs[kind] = _Run(opened=now)
            else:  # a quiet minute: the next is audited in full
                del self._runs[kind]

    def _summarise(self, kind: tuple[str | None, ...], run: _Run) -> None:
        if not run.count:
            return
        event, code = kind[0], kind[1] if len(kind) > 1 else None
        log.warning(
            "%d more %s refusals (%s) in the last %.0f s, audited in summary",
            run.count, event, code, self.every_s,
        )  # fmt: skip
        self.audit.record_soon(
            "refusals",
            of=event,
            code=code,
            count=run.count,
            first=round(run.first, 3),
            last=round(run.last, 3),
            example=run.example,
        )

    def _arm(self, delay: float) -> None:
        """Write the summaries when due even if no refusal follows (on the running loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a caller in a thread): the next refusal or close()
            return
        due = loop.time() + max(0.0, delay)
        if self._timer is not None:
            if self._timer.when() <= due:
                return
            self._timer.cancel()
        self._timer = loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self.mono()
        self._report(now)
        pending = [run.opened + self.every_s - now for run in self._runs.values() if run.count]
        if pending:
            self._arm(min(pending))


def address_prefix(client: str) -> str:
    """The network a client address is counted in: the /24 of an IPv4 address (an
    IPv4-mapped IPv6 one too), the /64 of an IPv6 one; anything else as it is."""
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = 24 if isinstance(address, ipaddress.IPv4Address) else 64
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


class FairChallenges(Challenges):
    """:class:`Challenges` that one network on the LAN cannot take all of.

    As :class:`Challenges`: at most ``limit`` outstanding and ``per_client`` of one
    address, a new one refused (:class:`ChallengesExhausted`) when either is full and
    none ever given up for it. And at most ``per_prefix`` of one network
    (:func:`address_prefix`): a host can take many addresses of its own LAN (any IPv6
    host, its whole /64), so to hold them all it needs ``limit / per_prefix`` networks.
    A signer on another network still gets one; a signer on the flooder's network is
    refused until the flood's expire (never cancelled once given).
    """

    def __init__(
        self,
        ttl_s: float = CHALLENGE_TTL_S,
        limit: int = MAX_OUTSTANDING_CHALLENGES,
        per_client: int = MAX_CHALLENGES_PER_CLIENT,
        per_prefix: int = MAX_CHALLENGES_PER_PREFIX,
    ) -> None:
        super().__init__(ttl_s, limit, per_client)
        self.per_prefix = per_prefix
        #: challenge -> its client's network; outstanding per network.
        self._prefix: dict[str, str] = {}
        self._per_prefix: Counter[str] = Counter()

    def issue(self, mono: float, client: str | None = None) -> str:
        """A fresh challenge for ``client``. Raises :class:`ChallengesExhausted`."""
        self._expire(mono)
        prefix = None if client is None else address_prefix(client)
        if prefix is not None and self._per_prefix[prefix] >= self.per_prefix:
            raise ChallengesExhausted(
                f"{self.per_prefix} challenges of this network are outstanding; retry later"
            )
        challenge = super().issue(mono, client)
        if prefix is not None:
            self._prefix[challenge] = prefix
            self._per_prefix[prefix] += 1
        return challenge

    def consume(self, challenge: str) -> None:
        """Spend a challenge (or forget an expired one)."""
        super().consume(challenge)
        prefix = self._prefix.pop(challenge, None)
        if prefix is not None:
            self._per_prefix[prefix] -= 1
            if self._per_prefix[prefix] <= 0:
                del self._per_prefix[prefix]


class TriggerGate:
    """Verifies remote triggers for one building; call :meth:`close` when done."""

    def __init__(
        self,
        building: str,
        trust: TrustConfig,
        state_dir: Path,
        audit: AuditLog,
        *,
        device: str | None = None,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        """``device``: this device's id (a trigger naming another is refused)."""
        self.building = building
        self.device = device
        self.audit = audit
        self.clock = clock
        self.mono = mono
        self.keyring = Keyring()
        self.challenges: Challenges = FairChallenges()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.refusals = RefusalDigest(audit, clock=clock, mono=mono)
        self._keylist_path = state_dir / "trigger-keys.json"
        self._authority = None
        if trust.authority is not None:
            try:
                self._authority = load_public_key(trust.authority)
            except KeyFileError as exc:  # remote triggers off; the buttons stay armed
                log.error("[trust] authority: %s", exc)
                audit.record("keylist_refused", source="config", code="unreadable", detail=str(exc))
        self.replay = self._open_replay(state_dir / "replay.sqlite")
        self._load(trust.trigger_keys)

    def _open_replay(self, path: Path) -> SqliteReplayCache:
        try:
            return SqliteReplayCache(path, self.clock, self.mono)
        except sqlite3.DatabaseError as exc:
            # A damaged cache must not keep the agent (and its buttons) from arming. The
            # nonces it held are lost: a trigger accepted in the last six minutes could be
            # replayed once, which the audit trail then shows beside this entry.
            aside = set_aside(path, int(self.clock()))
            log.error("replay cache %s unreadable (%s): moved to %s", path, exc, aside.name)
            self.audit.record("replay_cache_reset", error=str(exc)[:300], moved_to=aside.name)
            return SqliteReplayCache(path, self.clock, self.mono)

    def _load(self, configured: Path | None) -> None:
        if self._authority is None:
            log.warning("no [trust] authority: remote triggers are refused (the buttons work)")
            return
        authority = self._authority
        # The newest list this device accepted, even if it expired since. One that does
        # not verify, or is damaged, is moved aside: the configured list still applies.
        saved, why = read_state(
            self._keylist_path, lambda doc: parse_key_list(doc, authority), None
        )
        if saved is not None:
            self.keyring.current = saved
        elif why is not None:
            self.audit.record("keylist_refused", source="state", code="damaged", detail=why)
        if configured is not None:
            try:
                with configured.open("rb") as fh:
                    body = fh.read(envelope_limit(MAX_KEYLIST_PAYLOAD) + 1)
            except OSError as exc:
                detail = f"{configured}: cannot read ({exc.strerror})"
                log.error("trigger-key list %s", detail)
                self.audit.record(
                    "keylist_refused", source="config", code="unreadable", detail=detail
                )
                return
            with contextlib.suppress(DocumentError):  # refused: audited, the saved list stays
                self.install_key_list(body, via="config")

    def install_key_list(
        self, body: bytes | str | Mapping[str, Any], *, via: str
    ) -> TriggerKeyList:
        """Verify and install a trigger-key list; audited either way. Raises DocumentError."""
        if self._authority is None:
            err = DocumentError("unknown_key", "no district authority is configured ([trust])")
            self._refuse_key_list(err, via)
            raise err
        try:
            keys = parse_key_list(body, self._authority)
            changed = self.keyring.install(keys, self.clock())
        except DocumentError as exc:
            self._refuse_key_list(exc, via)
            raise
        if changed:
            write_json(self._keylist_path, dict(keys.envelope))
            self.audit.record(
                "keylist_installed",
                source=via,
                version=keys.version,
                keys=sorted(keys.keys),
                exp=keys.exp,
            )
            log.info("trigger-key list v%d installed (%d keys)", keys.version, len(keys.keys))
        return keys

    def _refuse_key_list(self, exc: DocumentError, via: str) -> None:
        """Audit a refused list (in summary when they repeat: anyone on the LAN can send one)."""
        detail, source = exc.detail[:MAX_DETAIL], via[:MAX_DETAIL]
        fields = {"source": source, "code": exc.code, "detail": detail}
        if self.refusals.refuse("keylist_refused", (exc.code,), fields):
            log.error("trigger-key list from %s refused: %s: %s", source, exc.code, detail)

    def would_accept(self, body: bytes | str | Mapping[str, Any]) -> bool:
        """Whether :meth:`verify` would accept ``body`` now: signed by an enrolled key, for
        this building and role, in its window, its nonce never seen (or its challenge
        outstanding). Counts, audits and consumes nothing. A spent, expired or foreign
        envelope is signed too, and must not pass for one that would act (review t1)."""
        result = check_trigger(
            body,
            building=self.building,
            keyring=self.keyring,
            now=self.clock(),
            mono=self.mono(),
            replay=self.replay,
            challenges=self.challenges,
            forgotten_before=self.replay.forgotten_before(),
            device=self.device,
        )
        return isinstance(result, Accepted)

    def would_install(self, body: bytes | str | Mapping[str, Any]) -> bool:
        """Whether ``body`` is a key list the district authority signed that would replace
        the installed one (a newer version, not expired): an older, the same or an expired
        list is signed too, and must not pass for one that changes something. Reads the
        payload's ``version`` and ``exp`` only (the whole list is checked on install)."""
        if self._authority is None:
            return False
        try:
            envelope = open_signed(
                body, self._authority, what="trigger-key list", max_payload=MAX_KEYLIST_PAYLOAD
            )
            doc = json.loads(envelope.payload)
        except (DocumentError, ValueError, RecursionError):
            return False
        if not isinstance(doc, dict):
            return False
        version, exp = doc.get("version"), doc.get("exp")
        if type(version) is not int or type(exp) is not int or exp <= self.clock():
            return False
        current = self.keyring.current
        return current is None or version > current.version

    def challenge(self, client: str | None = None) -> str:
        """A fresh single-use device challenge for ``client`` (its address). Raises
        :class:`provisioning.triggers.ChallengesExhausted`."""
        return self.challenges.issue(self.mono(), client)

    def verify(self, body: bytes | str | Mapping[str, Any], *, via: str) -> Accepted | Rejected:
        """Verify one trigger. A rejection is counted and audited here."""
        now = self.clock()
        result = verify_trigger(
            body,
            building=self.building,
            keyring=self.keyring,
            now=now,
            mono=self.mono(),
            replay=self.replay,
            challenges=self.challenges,
            forgotten_before=self.replay.forgotten_before(),
            device=self.device,
        )
        if isinstance(result, Rejected):
            self.reject(result, via=via)
        return result

    def reject(self, result: Rejected, *, via: str) -> None:
        """Count and audit a refused trigger (also for refusals by policy after verification).

        Audited in full the first time in a minute for its code (and its key, when the
        signature verified), in summary after that (:class:`RefusalDigest`)."""
        self.rejected[result.code] += 1
        detail, via = result.detail[:MAX_DETAIL], via[:MAX_DETAIL]
        fields = {
            "result": "rejected",
            "code": result.code,
            "detail": detail,
            "kid": result.kid,
            "role": result.role,
            "action": result.action,
            "reason": None if result.reason is None else result.reason[:MAX_REASON],
            "via": via,
            "session": None,
        }
        signed = result.role is not None and result.code != "bad_signature"
        kind = (result.code, result.kid if signed else None)
        if self.refusals.refuse("trigger", kind, fields):
            log.warning("trigger via %s refused: %s (%s)", via, result.code, detail)

    def close(self) -> None:
        """Write the refusals counted and not audited yet; close the replay cache."""
        self.refusals.close()
        self.replay.close()
