"""The agent's door for remote triggers: the verifier's state, persisted, and audited.

:func:`provisioning.triggers.verify_trigger` is pure; this shell owns what it
needs: the installed trigger-key list (``state/trigger-keys.json``, so a
rollback by swapping the config file is refused after a restart too), the
replay cache (``state/replay.sqlite``), the outstanding device challenges,
and counters for ``/metrics``. Every attempt that fails verification is
audited here; accepted ones are audited by the daemon once applied (with the
session they acted on). The physical button never passes through here.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.audit import AuditLog
from agent.config import TrustConfig
from agent.replay import SqliteReplayCache
from agent.statefile import read_state, set_aside, write_json
from provisioning.documents import DocumentError, envelope_limit
from provisioning.errors import KeyFileError
from provisioning.keys import load_public_key
from provisioning.triggers import (
    MAX_KEYLIST_PAYLOAD,
    Accepted,
    Challenges,
    Keyring,
    Rejected,
    TriggerKeyList,
    parse_key_list,
    verify_trigger,
)

log = logging.getLogger(__name__)


class TriggerGate:
    """Verifies remote triggers for one building; call :meth:`close` when done."""

    def __init__(
        self,
        building: str,
        trust: TrustConfig,
        state_dir: Path,
        audit: AuditLog,
        *,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.building = building
        self.audit = audit
        self.clock = clock
        self.mono = mono
        self.keyring = Keyring()
        self.challenges = Challenges()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
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
            return SqliteReplayCache(path, self.clock)
        except sqlite3.DatabaseError as exc:
            # A damaged cache must not keep the agent (and its buttons) from arming. The
            # nonces it held are lost: a trigger accepted in the last six minutes could be
            # replayed once, which the audit trail then shows beside this entry.
            aside = set_aside(path, int(self.clock()))
            log.error("replay cache %s unreadable (%s): moved to %s", path, exc, aside.name)
            self.audit.record("replay_cache_reset", error=str(exc)[:300], moved_to=aside.name)
            return SqliteReplayCache(path, self.clock)

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
            self.audit.record("keylist_refused", source=via, code=err.code, detail=err.detail)
            raise err
        try:
            keys = parse_key_list(body, self._authority)
            changed = self.keyring.install(keys, self.clock())
        except DocumentError as exc:
            log.error("trigger-key list from %s refused: %s", via, exc)
            self.audit.record("keylist_refused", source=via, code=exc.code, detail=exc.detail)
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
        )
        if isinstance(result, Rejected):
            self.reject(result, via=via)
        return result

    def reject(self, result: Rejected, *, via: str) -> None:
        """Count and audit a refused trigger (also for refusals by policy after verification)."""
        self.rejected[result.code] += 1
        log.warning("trigger via %s refused: %s (%s)", via, result.code, result.detail)
        self.audit.record_soon(  # in order, off the loop: a flood must not stall streaming
            "trigger",
            result="rejected",
            code=result.code,
            detail=result.detail[:300],
            kid=result.kid,
            role=result.role,
            action=result.action,
            reason=None if result.reason is None else result.reason[:500],
            via=via,
            session=None,
        )

    def close(self) -> None:
        """Close the replay cache."""
        self.replay.close()
