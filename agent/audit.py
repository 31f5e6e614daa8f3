"""The agent's audit trail: an append-only, hash-chained log with signed checkpoints.

Every entry is one JSON line in canonical form (keys sorted, separators ``,``
and ``:``): ``n`` (its number, from 1), ``t`` (UTC seconds), ``event`` (a
stable code), the event's fields, ``prev`` (the hash of the previous entry,
:data:`GENESIS` for the first) and ``hash`` (SHA-256 over the canonical JSON
of everything else). Editing, deleting or reordering an entry breaks the
chain. Entries are fsynced one by one: they are rare, and an audit entry that
a power cut can lose is worth little.

Signed checkpoints make the trail the district's evidence rather than the
device's word: a ``checkpoint`` entry is an ordinary chain entry whose fields
``kid`` (the device key's id), ``covers`` (the ``n`` of the entry before it)
and ``head`` (that entry's hash) are signed with the device's Ed25519 key;
``sig`` is b64url (no padding) of the signature over
``b"breakglass-audit-checkpoint\\x00" + canonical_json({"covers", "head", "kid"})``
(:func:`checkpoint_message`). :class:`AuditLog` writes one when it opens a
trail whose last entry is not a checkpoint, after every ``checkpoint_every``
entries, on :meth:`AuditLog.checkpoint` (the daemon calls it periodically)
and on close; never two in a row. Whole entries cut off the end of a copy
cannot be seen in that copy alone, so :func:`verify_trail` also compares the
file with a reference copy (an earlier one, or the receiver's).

Event vocabulary (fields besides ``n``, ``t``, ``event``, ``prev``, ``hash``):

- ``button_press``: ``button`` (id), ``location``, ``session`` (the id it
  started or joined), ``started`` (bool).
- ``store_ledger_unreadable`` / ``store_ledger_unsaved``: ``file``, ``error``:
  the sealed store's observation ledger (:mod:`agent.store_ledger`) could not be
  read (a fresh one is started) or written (said once; tried again).
- ``share_given_up``: ``session``, ``owed_shares``: an exterior share no longer
  owed to the receiver (more than :data:`agent.uplink.MAX_OWED_SHARES` queued).
- ``button_presses``: ``button``, ``location``, ``session``, ``count``,
  ``first_at``, ``last_at``: presses of a button joining a session beyond the
  first few of a minute, counted (:mod:`agent.alarm`).
- ``trigger``: ``result`` (``accepted`` | ``rejected``), ``code`` (reason code
  when rejected: ``malformed``, ``too_large``, ``unknown_key``,
  ``bad_signature``, ``role_forbidden``, ``wrong_building``, ``expired``,
  ``not_yet_valid``, ``replayed``, ``bad_challenge``, ``no_session``,
  ``keylist_*``...), ``kid``, ``role``, ``action`` (each or null), ``via``
  (``local_api`` | ``uplink``), ``reason`` (the trigger's reason text, or
  null), ``session`` (or null), ``detail``.
- ``session_start``: ``session``, ``building``, ``by`` (``{"kind": "button",
  "button_id", "location"}``, ``{"kind": "trigger", "kid", "role", "label",
  "reason", "via"}``, or ``{"kind": "share", "policy"}`` for a building's
  continuous exterior share, which is no emergency), ``cameras`` (ids),
  ``expires_at``.
- ``session_extend``: ``session``, ``by`` (trigger kind, as above),
  ``expires_at``.
- ``session_end``: ``session``, ``reason`` (``expired`` | ``trigger`` | ...),
  ``by`` (as above, or null), ``cameras`` (``[{"id": ..., "last": SEQ}]``:
  each streamed camera's last seq in the session, or null if it never
  streamed), so a session's tail cannot be cut unnoticed.
- ``disclosure``: ``session``, ``kind`` (the ``by.kind`` of its start),
  ``receiver`` (origin URL), ``device``, ``cameras`` (``[{"id": ...,
  "zone": ..., "first": SEQ}]``: ``first`` is the camera's first seq in the
  session, pre-roll included), ``resumed`` (streaming again after a restart),
  ``joined`` (present and true: a camera that had no footage when the session
  opened joins it; ``cameras`` lists it alone).
- ``session_resumed``: ``session`` (restored from the state file after a restart),
  ``reboot`` (bool: false when the agent restarted within the same boot), ``why``
  (how its time left was chosen: ``same_boot``, ``wall_clock``, ``clock_behind``,
  ``clock_says_over``, ``none_left``; :class:`agent.emergency.Resumed`), ``left_s``
  (the seconds it got), ``wall_left_s`` (what the wall clock alone gives, or null in
  the same boot), ``most_s`` (what it had left when last seen open).
- ``camera_keyframe_interval``: ``camera``, ``interval_s`` (measured, twice in a
  row), ``preroll_s``: a camera's keyframe interval is longer than the pre-roll
  allows for (:mod:`agent.capture`), so a press sends up to ``interval_s`` more
  from before it than ``preroll_s`` (with ``preroll_s`` 0: starts up to
  ``interval_s`` after the press); said once per camera and run.
- Any entry may carry ``happened_at`` (UTC seconds): it could not be written when
  it happened (a full or failing card) and was held in RAM until the trail could
  be written again; ``t`` is when it was written. ``audit_entries_lost``
  (``count``, ``kept``): more entries than :data:`MAX_HELD` came meanwhile; the
  ``count`` newest were not kept. Meanwhile the LED and mDNS show a fault.
- ``keylist_installed`` (``source``, ``version``, ``keys``, ``exp``),
  ``keylist_refused`` (``source``, ``code``, ``detail``), ``trigger_flood``
  (``refused``, ``via``), ``refusals`` (``of``: the event summarised,
  ``trigger`` or ``keylist_refused``; ``code``; ``count``; ``first``,
  ``last``: UTC seconds; ``example``: one of them as it would have been
  audited: refusals repeated within a minute, after the first was audited in
  full), ``replay_cache_reset``, ``local_api_fault``, ``challenge_refused``
  (``code``, ``detail``, ``via``: a device challenge asked of a device that
  cannot give one, an unprovisioned one).
- ``receiver_access_head``: ``receiver`` (origin), ``entry`` (a number) and
  ``head`` (that entry's hash): the head of the receiver's access log as the
  receiver told it (at most once a minute, when it grew), so a log handed
  over later must still hold that entry.
- ``segment_torn`` (``camera``, ``file``, ``reason``: a torn or unfinished
  segment removed at start), ``store_foreign_file`` (``file``, relative to the
  store: not ours, left alone), ``store_unreadable`` (``file``, ``error``: a
  folder of the store the start-up scan cannot read, left alone; the agent
  starts anyway); a file name that is not UTF-8 keeps its bytes as ``\\xNN``.
- ``camera_fault``, ``camera_recovered``, ``segment_dropped``, ``segment_lost``,
  ``segment_pinned_evicted`` (``camera``, ``first_seq``, ``last_seq``,
  ``reason``: ``disk full`` or ``free space floor``), ``store_over_quota``
  (``quota_bytes``, ``over_bytes``: unacknowledged emergency footage holds the
  store over its quota, said once) and ``store_within_quota``
  (``quota_bytes``), ``segment_renamed`` (``camera``, ``file``, ``to``,
  ``reason``), ``store_clock_behind`` (``segments``, ``newest_end_ms``,
  ``clock_ms``: stored footage ends days after the clock), ``segments_expired``
  (``count``, ``bytes``, ``oldest_end_ms``, ``newest_end_ms``, ``max_age_s``:
  age expiry, in summary), ``segment_unreadable`` (store and capture facts),
  ``state_damaged`` (``file``, ``error``: a state file moved aside at start),
  ``state_write_failed`` and ``state_write_recovered`` (``error``: the state
  files could not be written, and then could again), ``segment_unrecorded``
  (``session``, ``camera``, ``file``, ``first_seq``, ``last_seq``: a sealed
  segment the receiver could not open, declared lost), and ``checkpoint``.

The session events are what FERPA 34 CFR 99.32(a)(5) asks a school to record
for a health-or-safety disclosure: the threat that justified it and who
received the footage (``breakglass audit report`` prints them). The officers
who watched it at the receiver are in the receiver's access log
(:mod:`receiver.access_log`), which ``audit report --access-log`` merges in.

:class:`AuditChain` (numbering, chaining, checkpoints) and :func:`verify_trail`
are the sans-IO core: no files, no clocks. :class:`AuditLog` is the file
shell, safe to call from any thread. Footage and secrets never go into the
trail: fields are small facts.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hashlib
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from provisioning.keys import kid as key_id
from provisioning.keys import verify as verify_signature

log = logging.getLogger(__name__)

GENESIS: Final = "0" * 64
MAX_LINE_BYTES: Final = 16 * 1024
CHECKPOINT: Final = "checkpoint"
CHECKPOINT_CONTEXT: Final = b"breakglass-audit-checkpoint\x00"
CHECKPOINT_EVERY: Final = 64
#: Entries kept in RAM while the trail cannot be written (a full or failing card); more
#: are counted (``audit_entries_lost``). Entries are a few hundred bytes (16 KiB at most).
MAX_HELD: Final = 1024
_TAIL_BYTES: Final = 4 * MAX_LINE_BYTES  # how much of the file's end a reopen reads first


def canonical_json(obj: dict[str, Any]) -> bytes:
    """UTF-8 JSON with keys sorted and no insignificant whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def checkpoint_message(covers: int, head: str, kid: str) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return CHECKPOINT_CONTEXT + canonical_json({"covers": covers, "head": head, "kid": kid})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    """Strict b64url without padding; ValueError otherwise."""
    if "=" in text:
        raise ValueError("padded")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc


def parse_entry(body: bytes) -> dict[str, Any] | None:
    """The entry on one line (without its newline) if it has the shape of one, else None."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return _entry_shaped(obj)


def _entry_shaped(obj: object) -> dict[str, Any] | None:
    """``obj`` if it is a dict with an entry's ``n``, ``t``, ``event``, ``prev`` and ``hash``."""
    if not isinstance(obj, dict):
        return None
    n, t = obj.get("n"), obj.get("t")
    if (
        type(n) is not int
        or n < 1
        or type(t) not in (int, float)
        or not all(isinstance(obj.get(k), str) for k in ("event", "prev", "hash"))
    ):
        return None
    return obj


def split_lines(data: bytes) -> list[bytes]:
    """A file's lines, each with its ``\\n`` (a torn last line has none)."""
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def iter_lines(data: bytes) -> Iterator[bytes]:
    """:func:`split_lines` one line at a time: a file of many short lines costs no list
    of them (a 256 MB trail of two-byte lines would be 128 million objects)."""
    start, size = 0, len(data)
    while start < size:
        end = data.find(b"\n", start)
        if end < 0:
            yield data[start:]
            return
        yield data[start : end + 1]
        start = end + 1


#: Why a line is no entry, as :func:`verify_trail` says it.
_UNPARSEABLE: Final = "not an audit entry (cannot be parsed)"
_TOO_DEEP: Final = "not an audit entry (nested too deeply)"
_NOT_AN_ENTRY: Final = (
    "inserted line: a whole JSON object but no audit entry (it lacks a valid n, t, "
    "event, prev or hash); a write cut short never leaves one"
)


def _classify(body: bytes) -> tuple[dict[str, Any] | None, str, bool]:
    """(the entry, or None and why not, and whether it can be a torn write) of one line
    (without its newline).

    The writer appends each entry as one canonical line (``{"``, sorted keys, ``}``,
    then ``\\n``; after a torn one, on a line of its own). A write cut short leaves a
    prefix of such a line: it starts with ``{"`` (or is ``{``) and is no whole JSON value, since the
    only prefix of a canonical line that parses is the whole entry. A line that parses
    as a JSON object but is no entry was never written by :class:`AuditLog`.
    """
    if len(body) >= MAX_LINE_BYTES:
        return None, f"longer than {MAX_LINE_BYTES} bytes: not an audit entry", False
    if not body.startswith(b"{"):  # no JSON object: no need to parse it
        return None, _UNPARSEABLE, False
    try:
        obj = json.loads(body)
    except RecursionError:
        return None, _TOO_DEEP, False
    except ValueError:
        return None, _UNPARSEABLE, body[:2] in (b"{", b'{"')
    entry = _entry_shaped(obj)
    if entry is None:
        return None, _NOT_AN_ENTRY if isinstance(obj, dict) else _UNPARSEABLE, False
    return entry, "", False


#: The fields every entry gets from the chain; an event's own fields never use these names.
_CHAIN_FIELDS: Final = frozenset({"n", "t", "event", "prev", "hash"})


def check_fields(event: str, fields: dict[str, Any]) -> None:
    """Raise ``ValueError`` if ``fields`` would clash with the chain's own (a caller's bug:
    the chain's values would silently replace them)."""
    if clash := _CHAIN_FIELDS.intersection(fields):
        raise ValueError(f"audit entry {event!r} cannot carry {sorted(clash)}")


def _encodable(value: Any) -> Any:
    """``value`` with strings UTF-8 can encode: a lone surrogate (``os.fsdecode`` of a
    file name that is not UTF-8) becomes the text ``\\udcNN``."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    return value


class AuditChain:
    """Numbers, chains and signs entries; knows nothing of files or clocks.

    ``unsigned`` counts the entries since the last checkpoint (a resumed chain
    passes 1 when its last entry is not a checkpoint: only zero matters then).
    """

    def __init__(self, last_n: int = 0, last_hash: str = GENESIS, *, unsigned: int = 0) -> None:
        self.n = last_n
        self.head = last_hash
        self.unsigned = unsigned

    def _line(self, t: float, event: str, fields: dict[str, Any]) -> bytes:
        check_fields(event, fields)
        body = {**fields, "n": self.n + 1, "t": round(t, 3), "event": event, "prev": self.head}
        try:
            digest = hashlib.sha256(canonical_json(body)).hexdigest()
        except UnicodeEncodeError:  # a lone surrogate: escaped, the entry is not dropped
            body = _encodable(body)
            digest = hashlib.sha256(canonical_json(body)).hexdigest()
        line = canonical_json({**body, "hash": digest}) + b"\n"
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"audit entry {event!r} is larger than {MAX_LINE_BYTES} bytes")
        self.n, self.head = body["n"], digest
        return line

    def entry(self, t: float, event: str, fields: dict[str, Any]) -> bytes:
        """The next entry as one line (with its newline), and advance the chain."""
        if event == CHECKPOINT:
            raise ValueError("checkpoint entries are made by AuditChain.checkpoint only")
        line = self._line(t, event, fields)
        self.unsigned += 1
        return line

    def checkpoint(self, t: float, signer: Ed25519PrivateKey) -> bytes:
        """A checkpoint entry signing the chain up to its current head; advance the chain."""
        kid = key_id(signer.public_key())
        sig = signer.sign(checkpoint_message(self.n, self.head, kid))
        fields = {"kid": kid, "covers": self.n, "head": self.head, "sig": _b64url(sig)}
        line = self._line(t, CHECKPOINT, fields)
        self.unsigned = 0
        return line

    @property
    def state(self) -> tuple[int, str, int]:
        """Everything :meth:`restore` needs to undo entries that never reached the file."""
        return self.n, self.head, self.unsigned

    def restore(self, state: tuple[int, str, int]) -> None:
        self.n, self.head, self.unsigned = state


def verify_chain(lines: Iterable[bytes]) -> tuple[int, str]:
    """Check the chain alone (no signatures); returns (entries, head hash).

    Raises ValueError at the first break. :func:`verify_trail` is the full check.
    """
    chain = AuditChain()
    for number, raw in enumerate(lines, 1):
        try:
            obj = json.loads(raw)
            digest = obj.pop("hash")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ValueError(f"audit line {number}: not an audit entry") from exc
        if obj.get("prev") != chain.head or obj.get("n") != chain.n + 1:
            raise ValueError(f"audit line {number}: chain broken (entry removed or reordered)")
        if hashlib.sha256(canonical_json(obj)).hexdigest() != digest:
            raise ValueError(f"audit line {number}: entry altered")
        chain.n, chain.head = obj["n"], digest
    return chain.n, chain.head


# -- verification (sans-IO) ---------------------------------------------------------------


#: Findings of one kind listed one by one; the rest of that kind are counted in one
#: summary finding (a trail of a million bad lines is not a million lines of output).
MAX_LISTED: Final = 20


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: where (1-based ``line`` of the file, or of the reference when
    ``in_reference``; None when it concerns no single line), which entry ``n``
    (presumed for a line that cannot be parsed), and what. A finding with
    ``unlisted`` > 0 is a summary: it stands for that many findings of one kind
    beyond the first :data:`MAX_LISTED`, not listed one by one (``line`` is the
    first of them)."""

    line: int | None
    entry: int | None
    what: str
    error: bool = True
    in_reference: bool = False
    unlisted: int = 0


@dataclass(frozen=True, slots=True)
class TrailReport:
    """What :func:`verify_trail` found. ``entries`` is the ``n`` of the last entry,
    ``signed`` that of the last valid checkpoint (0: none), ``checkpoints`` how
    many valid ones there are; ``problems`` are in file order, reference last.

    When the trail is :attr:`ok`, its entries are numbered 1..``entries`` in file
    order, and those up to ``signed`` are covered by the device's signature; the
    ones after it (the unsigned tail) anyone could have written."""

    entries: int
    checkpoints: int
    signed: int
    head: str
    problems: tuple[Problem, ...]

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.error)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if not p.error)

    @property
    def error_count(self) -> int:
        """How many errors were found, those counted in a summary included."""
        return sum(p.unlisted or 1 for p in self.problems if p.error)

    @property
    def ok(self) -> bool:
        """No errors (warnings such as an unsigned tail allowed)."""
        return not self.errors

    @property
    def first_error(self) -> Problem | None:
        return next((p for p in self.problems if p.error), None)


def _show(value: object) -> str:
    """A value from the file, quoted and short, safe to print."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(slots=True)
class _Damaged:
    line: int
    fragment: bool  # looks like the start of an entry: a write cut short
    why: str


@dataclass(slots=True)
class _Tally:
    """The findings of one kind: how many listed; how many more, on which lines."""

    error: bool
    listed: int = 0
    unlisted: int = 0
    first: int | None = None
    last: int | None = None

    def count(self, line: int | None) -> None:
        self.unlisted += 1
        if self.first is None:
            self.first = line
        self.last = line


#: The kinds of findings that can repeat, as a summary names them.
_KINDS: Final = {
    "damaged": "lines that are not audit entries",
    "torn": "torn entries",
    "altered": "altered entries",
    "chain": "breaks in the chain",
    "order": "entries out of order or repeated",
    "checkpoint": "bad checkpoints",
}

#: What :func:`verify_trail` calls with each entry that verified: (its line, the entry).
Accept = Callable[[int, dict[str, Any]], None]


class _Walk:
    """One pass over a trail, collecting problems; the state of :func:`verify_trail`.

    Its memory does not grow with the trail: at most :data:`MAX_LISTED` findings of a
    kind and as many unparseable lines awaiting judgement are kept; only the
    reference's entries (``seen``, when collecting) are kept one by one.
    """

    def __init__(
        self,
        device_key: Ed25519PublicKey,
        reference: dict[int, tuple[str, int]] | None,
        *,
        collect: bool,
        accept: Accept | None = None,
    ) -> None:
        self.key = device_key
        self.kid = key_id(device_key)
        self.reference = reference  # n -> (hash, line in the reference); consumed
        self.collect = collect
        self.accept = accept
        self.seen: dict[int, tuple[str, int]] = {}  # the same, of this trail, when collecting
        self.n = 0
        self.head = GENESIS
        self.heads = {GENESIS}  # what the next entry's prev may be (two after an edited hash)
        self.last_line: int | None = None  # line of entry n
        self.checkpoints = 0
        self.signed = 0
        self.tail: tuple[int, int] | None = None  # (line, n) of the first entry not signed
        self.damaged: list[_Damaged] = []  # the run of lines before the next entry, judged then
        self.run = 0  # lines in that run (more than MAX_LISTED: each an error at once)
        self.run_first = 0  # the first line of the run
        self.gaps: list[tuple[int, int, int]] = []  # (first, last, problem index) reported missing
        self.diverged = False
        self.problems: list[Problem] = []
        self.tallies: dict[str, _Tally] = {}
        self.errors = 0

    def add(self, kind: str, problem: Problem) -> int | None:
        """List ``problem``, or only count it once MAX_LISTED of its kind are listed;
        its index in ``problems`` when listed."""
        if problem.error:
            self.errors += 1
        tally = self.tallies.setdefault(kind, _Tally(problem.error))
        if tally.listed < MAX_LISTED:
            tally.listed += 1
            self.problems.append(problem)
            return len(self.problems) - 1
        tally.count(problem.line)
        return None

    def error(self, kind: str, line: int | None, entry: int | None, what: str) -> int | None:
        tally = self.tallies.get(kind)
        if tally is not None and tally.listed >= MAX_LISTED:  # the common case of many
            self.errors += 1
            tally.count(line)
            return None
        return self.add(kind, Problem(line, entry, what))

    def feed(self, number: int, raw: bytes, last: bool) -> None:
        body = raw[:-1] if raw.endswith(b"\n") else raw
        obj, why, fragment = _classify(body)
        if obj is None:
            if last and not raw.endswith(b"\n") and why == _UNPARSEABLE:
                why = (
                    "cut off mid-entry: the file ends inside an entry "
                    "(truncated, or copied or power-cut during a write)"
                )
            self._damage(number, fragment and not last, why)
            return
        n, prev, claimed = obj["n"], obj["prev"], obj.pop("hash")
        expected = self.n + 1
        link_checked = self._settle_damaged(n, prev)
        errors = self.errors
        try:
            digest = hashlib.sha256(canonical_json(obj)).hexdigest()
            same = canonical_json({**obj, "hash": claimed}) == body
        except (ValueError, RecursionError):  # json parses deeper than it writes
            digest, same = "", False
        if digest != claimed or not same:
            where = n if n == expected else expected
            claim = "" if n == expected else f" (it claims to be entry {n})"
            self.error(
                "altered",
                number,
                where,
                f"entry altered: its hash does not match its content{claim}",
            )
            self._advance(number, expected, claimed, {claimed, digest} - {""})
            self._untrusted_tail(number, expected)
            if self.reference is not None:
                self.reference.pop(expected, None)
            return
        if n < expected:
            self._out_of_order(number, n)
            return
        if n > expected:
            if link_checked:
                first, what = expected, f"entry {expected} is missing"
                if n > expected + 1:
                    what = f"entries {expected}..{n - 1} are missing"
                index = self.error("chain", number, n, f"chain broken: {what} (deleted or moved)")
                if index is not None:
                    self.gaps.append((first, n - 1, index))
        elif link_checked and prev not in self.heads:
            self.error(
                "chain",
                number,
                n,
                f"chain broken: prev is not the hash of entry {self.n}"
                f"{self._at(self.last_line)} (that entry was replaced, or entries were "
                "removed and the rest renumbered)",
            )
        self._advance(number, n, claimed, {claimed})
        self._compare(number, n, claimed)
        if obj["event"] == CHECKPOINT and self._checkpoint_valid(number, n, obj):
            self.checkpoints += 1
            self.signed, self.tail = n, None
        else:
            self._untrusted_tail(number, n)
        if self.accept is not None and link_checked and n == expected and self.errors == errors:
            self.accept(number, {**obj, "hash": claimed})

    def _damage(self, number: int, fragment: bool, why: str) -> None:
        """A line that is no entry: held until the next entry tells what it was."""
        if not self.run:
            self.run_first = number
        self.run += 1
        if self.run <= MAX_LISTED:
            self.damaged.append(_Damaged(number, fragment, why))
            return
        # No power cut leaves so many lines: each is an error, judged now, kept no longer.
        for bad in self.damaged:
            self.error("damaged", bad.line, self.n + 1, bad.why)
        self.damaged.clear()
        self.error("damaged", number, self.n + 1, why)

    @staticmethod
    def _at(line: int | None) -> str:
        return "" if line is None else f" (line {line})"

    def _advance(self, number: int, n: int, head: str, heads: set[str]) -> None:
        self.n, self.head, self.heads, self.last_line = n, head, heads, number
        if self.collect:
            self.seen.setdefault(n, (head, number))

    def _untrusted_tail(self, number: int, n: int) -> None:
        if self.tail is None:
            self.tail = (number, n)

    def _settle_damaged(self, n: int, prev: str) -> bool:
        """Judge the unparseable lines before an entry; False if its link cannot be checked."""
        if not self.run:
            return True
        expected = self.n + 1
        links = n == expected and prev in self.heads and self.run <= MAX_LISTED
        stands_for_entries = expected < n <= expected + self.run
        if stands_for_entries:
            self._untrusted_tail(self.run_first, expected)
        for i, bad in enumerate(self.damaged):
            if links and bad.fragment:
                self.add(
                    "torn",
                    Problem(
                        bad.line,
                        expected,
                        "torn entry (a write cut short, e.g. by a power cut); "
                        "the chain continues after it with nothing missing",
                        error=False,
                    ),
                )
            elif stands_for_entries:
                self.error(
                    "damaged", bad.line, min(expected + i, n - 1), f"entry damaged: {bad.why}"
                )
            else:
                self.error("damaged", bad.line, expected, bad.why)
        self.damaged.clear()
        self.run = 0
        return not stands_for_entries

    def _out_of_order(self, number: int, n: int) -> None:
        for first, last, index in self.gaps:
            if first <= n <= last:
                old = self.problems[index]
                self.problems[index] = Problem(
                    old.line,
                    old.entry,
                    f"chain broken: entries out of order (entry {n} is on line {number}, "
                    f"after entry {old.entry})",
                )
                self.error("order", number, n, f"out of order: belongs before line {old.line}")
                break
        else:
            self.error("order", number, n, f"out of order or repeated: comes after entry {self.n}")
        if self.reference is not None:
            self.reference.pop(n, None)

    def _compare(self, number: int, n: int, claimed: str) -> None:
        if self.reference is None:
            return
        ref = self.reference.pop(n, None)
        if ref is not None and ref[0] != claimed and not self.diverged:
            self.diverged = True
            self.error(
                "reference",
                number,
                n,
                f"differs from the reference copy (its line {ref[1]}): "
                "the two trails diverge from here on",
            )

    def _checkpoint_valid(self, number: int, n: int, obj: dict[str, Any]) -> bool:
        kid, covers, head, sig = (obj.get(k) for k in ("kid", "covers", "head", "sig"))
        if not (
            isinstance(kid, str)
            and type(covers) is int
            and isinstance(head, str)
            and isinstance(sig, str)
        ):
            self.error(
                "checkpoint", number, n, "checkpoint malformed: needs kid, covers, head and sig"
            )
            return False
        if covers != n - 1 or head != obj["prev"]:
            self.error(
                "checkpoint",
                number,
                n,
                f"checkpoint signs entry {covers} with head {_show(head)}, "
                f"but follows entry {n - 1}",
            )
            return False
        if kid != self.kid:
            self.error(
                "checkpoint",
                number,
                n,
                f"checkpoint signed by key {_show(kid)}, not by the device key {self.kid!r}",
            )
            return False
        try:
            signature = _unb64url(sig)
        except ValueError:
            signature = b""
        if not verify_signature(self.key, signature, checkpoint_message(covers, head, kid)):
            self.error(
                "checkpoint",
                number,
                n,
                "checkpoint signature does not verify: not signed by the device key",
            )
            return False
        return True

    def finish(self) -> None:
        for bad in self.damaged:
            self.error("damaged", bad.line, self.n + 1, bad.why)
        self.damaged.clear()
        self.run = 0
        if self.n > self.signed and self.tail is not None:
            line, first = self.tail
            what = (
                f"entries {first}..{self.n} follow the last signed checkpoint (entry "
                f"{self.signed}): not signed yet (normal while the agent runs)"
                if self.signed
                else f"no signed checkpoint: entries 1..{self.n} are not signed by the device"
            )
            self.problems.append(Problem(line, first, what, error=False))
        if self.reference:
            beyond = sorted(k for k in self.reference if k > self.n)
            if beyond:
                self.error(
                    "reference",
                    self.last_line,
                    self.n or None,
                    f"truncated after entry {self.n}: the reference copy continues with "
                    f"entries {beyond[0]}..{beyond[-1]} (from its line "
                    f"{self.reference[beyond[0]][1]})",
                )
        for kind, tally in self.tallies.items():
            if tally.unlisted:
                self.problems.append(
                    Problem(
                        tally.first,
                        None,
                        f"{tally.unlisted} more {_KINDS.get(kind, 'findings')} (lines "
                        f"{tally.first}..{tally.last}), not listed one by one",
                        error=tally.error,
                        unlisted=tally.unlisted,
                    )
                )


def verify_trail(
    lines: Iterable[bytes],
    device_key: Ed25519PublicKey,
    *,
    reference: Iterable[bytes] | None = None,
    accept: Accept | None = None,
) -> TrailReport:
    """Check a trail: chain, hashes, checkpoint signatures, and, given ``reference``
    (another copy of the same device's trail), that no entry of it is missing here.

    ``lines`` are the file's lines with their ``\\n`` (:func:`split_lines`,
    :func:`iter_lines`; without them a cut-off last line is still found, but not told
    from garbage). Every line is read at most :data:`MAX_LINE_BYTES` deep. Errors: an
    edited entry, a deleted, moved or repeated one, a line that is no entry (a
    cut-off last line, and a whole JSON object that is no entry, among them), a bad
    checkpoint, and against the reference: a divergence or entries cut off the end.
    Warnings: a torn entry the chain continued past (a power cut: a line that starts
    like an entry and is no whole JSON value), and entries after the last signed
    checkpoint. The reference's own errors are reported with ``in_reference``. Of a
    kind of finding, the first :data:`MAX_LISTED` are listed and the rest counted in
    a summary (:attr:`Problem.unlisted`).

    ``accept(line, entry)`` is called, in file order, with each entry that verified
    (its hash, its number and link to the one before, a checkpoint's signature): a
    report is built from those alone, and only when the trail is :attr:`TrailReport.ok`.
    Memory does not grow with ``lines`` (only with ``reference``'s entries).
    """
    ref_problems: list[Problem] = []
    ref_entries: dict[int, tuple[str, int]] | None = None
    if reference is not None:
        ref_walk = _walk(reference, device_key, None, collect=True)
        ref_entries = ref_walk.seen
        ref_problems = [
            Problem(p.line, p.entry, p.what, in_reference=True, unlisted=p.unlisted)
            for p in sorted(ref_walk.problems, key=_by_line)
            if p.error
        ]
    walk = _walk(lines, device_key, ref_entries, collect=False, accept=accept)
    return TrailReport(
        entries=walk.n,
        checkpoints=walk.checkpoints,
        signed=walk.signed,
        head=walk.head,
        problems=(*sorted(walk.problems, key=_by_line), *ref_problems),
    )


def _by_line(p: Problem) -> tuple[bool, int]:
    return p.line is None, p.line or 0


def _walk(
    lines: Iterable[bytes],
    device_key: Ed25519PublicKey,
    reference: dict[int, tuple[str, int]] | None,
    *,
    collect: bool,
    accept: Accept | None = None,
) -> _Walk:
    walk = _Walk(device_key, reference, collect=collect, accept=accept)
    number = 0
    pending: bytes | None = None
    for raw in lines:  # one line of lookahead: the last line is judged as such
        if pending is not None:
            walk.feed(number, pending, last=False)
        number += 1
        pending = raw
    if pending is not None:
        walk.feed(number, pending, last=True)
    walk.finish()
    return walk


# -- the file shell -----------------------------------------------------------------------


def _last_entry(data: bytes, *, whole_first_line: bool) -> tuple[int, str, bool] | None:
    """(n, hash, is a checkpoint) of the last entry in a piece of the trail's end."""
    parts = data.split(b"\n")
    if not whole_first_line:
        parts = parts[1:]  # may begin mid-line
    for part in reversed(parts):
        obj = parse_entry(part)
        if obj is not None:
            return obj["n"], obj["hash"], obj["event"] == CHECKPOINT
    return None


class AuditLog:
    """The audit trail file. ``record`` appends and fsyncs; callable from any thread.

    With a ``signer`` (the device key) it writes signed checkpoints: on open when
    the trail's last entry is not one, after every ``checkpoint_every`` entries,
    on :meth:`checkpoint` and on :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float],
        *,
        signer: Ed25519PrivateKey | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
        self.path = path
        self.clock = clock
        self._signer = signer
        self._every = checkpoint_every
        self._lock = threading.Lock()
        self._torn = False  # the file ends without a newline: start the next entry on a new one
        self._synced = False  # whether the last entry _append wrote was also fsynced
        path.parent.mkdir(parents=True, exist_ok=True)
        n, head, signed = self._resume()
        self._chain = AuditChain(n, head, unsigned=0 if signed else 1)
        self._head_n = n
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._background: ThreadPoolExecutor | None = None
        #: Entries that could not be written (a full or failing card), oldest first: each
        #: later write and :meth:`retry` write them first, in order; ``happened_at`` says
        #: when each was due. Beyond :data:`MAX_HELD` the newest are counted, not kept.
        self._held: deque[tuple[str, dict[str, Any]]] = deque()
        self._dropped = 0
        #: Why the last write failed, while entries are held (None: the trail is whole).
        self.failing: str | None = None
        #: Called (on the writing thread) after each entry lands: the uplink ships it.
        self.on_written: Callable[[], None] | None = None
        self.checkpoint()

    def _resume(self) -> tuple[int, str, bool]:
        """(n, hash, is a checkpoint) of the file's last whole entry, reading only its end."""
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return 0, GENESIS, True
        with fh:
            size = fh.seek(0, os.SEEK_END)
            window = _TAIL_BYTES
            while True:
                start = max(0, size - window)
                fh.seek(start)
                data = fh.read(size - start)
                found = _last_entry(data, whole_first_line=start == 0)
                if found is not None or start == 0:
                    break
                window *= 4
        if data and not data.endswith(b"\n"):
            # The next entry starts on a line of its own. A whole entry that only lacks
            # its newline counts; a torn one (a power cut mid-append) stays in the file,
            # the chain continues from the last whole entry, verify_trail reports it.
            self._torn = True
            if parse_entry(data.rsplit(b"\n", 1)[-1]) is None:
                log.error("audit trail %s ends in a torn entry", self.path)
        return found or (0, GENESIS, True)

    def _append(self, event: str, make: Callable[[float], bytes], *, quiet: bool = False) -> bool:
        """Write ``make(now)`` durably; on failure undo the chain. Caller holds the lock.
        A failure to write (not a bad entry) is kept in :attr:`failing`."""
        state, landed = self._chain.state, False
        self._synced = False  # set once this entry is written and fsynced (record_durable)
        try:
            line = make(self.clock())
            data = b"\n" + line if self._torn else line
            written = os.write(self._fd, data)
            if written != len(data):  # a full disk: a fragment may be left behind
                if written:
                    self._torn = not data[:written].endswith(b"\n")
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
            self._torn, landed = False, True
            self._head_n = self._chain.n
            os.fsync(self._fd)
            self._synced = True
        except (OSError, ValueError) as exc:
            if not landed:  # the entry is not in the file: the next one takes its place
                self._chain.restore(state)
            if isinstance(exc, OSError):
                self.failing = str(exc)[:300]
            if not quiet:
                log.error("audit entry %s not written: %s", event, exc)
        return landed

    def _write_locked(self, event: str, fields: dict[str, Any], *, hold: bool = True) -> bool:
        """Write one entry after those held; unless ``hold`` is false, hold it if it cannot
        be written now (a full or failing card: an emergency's disclosures must reach the
        trail once it can be written, not be lost). Caller holds the lock. Whether it is
        in the file."""
        if self._held and not self._write_held_locked():
            if hold:
                self._hold(event, fields)
            return False
        self.failing = None
        if self._append(event, lambda t: self._chain.entry(t, event, fields)):
            return True
        if self.failing is not None and hold:  # the card, not the entry: try again later
            self._hold(event, fields)
        return False

    def _hold(self, event: str, fields: dict[str, Any]) -> None:
        if not self._held:
            log.error("audit trail %s cannot be written: holding entries until it can", self.path)
        if len(self._held) >= MAX_HELD:
            self._dropped += 1
        else:
            self._held.append((event, {**fields, "happened_at": round(self.clock(), 3)}))

    def _write_held_locked(self) -> bool:
        """Write the held entries, oldest first (then how many were not kept); whether
        none is left. Caller holds the lock."""
        while self._held:
            event, fields = self._held[0]
            line = functools.partial(self._chain.entry, event=event, fields=fields)
            if not self._append(event, line, quiet=True):
                return False
            self._held.popleft()
        if self._dropped:
            lost = {"count": self._dropped, "kept": MAX_HELD}
            if not self._append(
                "audit_entries_lost", lambda t: self._chain.entry(t, "audit_entries_lost", lost)
            ):
                return False
            self._dropped = 0
        log.warning("audit trail %s written again: the entries held meanwhile are in it", self.path)
        self.failing = None
        return True

    @property
    def held(self) -> int:
        """Entries waiting to be written (the card failed), counted or kept."""
        return len(self._held) + self._dropped

    def retry(self) -> bool:
        """Write the held entries now if the card takes them; whether none is left."""
        with self._lock:
            if not self._held and not self._dropped:
                return True
            done = self._write_held_locked()
        if done and self.on_written is not None:
            self.on_written()
        return done

    def retry_soon(self) -> None:
        """:meth:`retry` on the trail's own thread, after what is queued."""
        self._executor().submit(self.retry)

    @property
    def head_n(self) -> int:
        """The ``n`` of the last entry written to the file (read without waiting for a write)."""
        return self._head_n

    def _checkpoint_locked(self) -> bool:
        signer = self._signer
        if signer is None or self._chain.unsigned == 0 or self._fd < 0:
            return False
        return self._append(CHECKPOINT, lambda t: self._chain.checkpoint(t, signer))

    def record(self, event: str, **fields: Any) -> None:
        """Append one entry durably. Never raises into the caller: a full disk is logged."""
        with self._lock:
            self._write_locked(event, fields)
            if self._chain.unsigned >= self._every:
                self._checkpoint_locked()
        log.info("audit: %s %s", event, fields)
        if self.on_written is not None:
            self.on_written()

    def record_durable(self, event: str, **fields: Any) -> bool:
        """Like :meth:`record`, but says whether the entry is durably in the file
        (written whole and fsynced). For what may happen only once it is on the trail
        (the technician's camera check, :mod:`agent.technician`); emergencies never
        wait for it. An entry that cannot be written is not held: what it records does
        not happen. Blocks: from the event loop use :meth:`record_durable_soon`."""
        check_fields(event, fields)
        with self._lock:
            durable = self._write_locked(event, fields, hold=False) and self._synced
            if self._chain.unsigned >= self._every:
                self._checkpoint_locked()
        log.info("audit: %s %s", event, fields)
        if self.on_written is not None:
            self.on_written()
        return durable

    def record_durable_soon(self, event: str, **fields: Any) -> Future[bool]:
        """:meth:`record_durable` on the trail's own thread, in call order after what is
        queued; the future says whether the entry is durable (``asyncio.wrap_future``
        to await it). Field errors raise here, in the caller."""
        check_fields(event, fields)
        return self._executor().submit(self.record_durable, event, **fields)

    def checkpoint(self) -> bool:
        """Sign the chain as it stands; True if a checkpoint was written. Does nothing
        without a signer or when the last entry already is a checkpoint."""
        with self._lock:
            return self._checkpoint_locked()

    def _executor(self) -> ThreadPoolExecutor:
        if self._background is None:
            self._background = ThreadPoolExecutor(1, thread_name_prefix="audit")
        return self._background

    def record_soon(self, event: str, **fields: Any) -> None:
        """Append one entry from the event loop: the fsync runs on the trail's own thread,
        in call order, so the loop never waits for the disk."""
        check_fields(event, fields)  # here, where the caller sees it, not in the thread
        self._executor().submit(self.record, event, **fields)

    def flush(self) -> None:
        """Wait until every entry queued by :meth:`record_soon` is written (blocks)."""
        if self._background is not None:
            self._background.submit(lambda: None).result()

    def checkpoint_soon(self) -> None:
        """:meth:`checkpoint` on the trail's own thread, after what is queued."""
        self._executor().submit(self.checkpoint)

    def close(self) -> None:
        """Write what is queued and a final checkpoint, then close the file (blocks)."""
        if self._background is not None:
            self._background.shutdown(wait=True)
            self._background = None
        with self._lock:
            if self._fd >= 0:
                self._checkpoint_locked()
                os.close(self._fd)
                self._fd = -1
