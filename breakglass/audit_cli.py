"""``breakglass audit verify|report``: the district's tools for an agent's audit trail.

``verify FILE --device-key PUB.pem [--reference FILE]`` checks the hash chain
and the signed checkpoints (and, given a reference copy, that no entry of it
is missing). Exit 0: intact, one summary line. Exit 1: one line per problem,
``FILE:LINE: entry N: what`` (warnings say ``warning:``; an unsigned tail is
only a warning, the agent may be running), then a summary naming the first
error. Exit 2: a file or key that cannot be read.

``report FILE [--device-key PUB.pem] [--access-log ACCESS.log] [--json]``
prints, per emergency session, the FERPA 34 CFR 99.32(a)(5) disclosure record:
the threat that justified it, start, extensions, end, who received the
footage and which cameras. With ``--device-key`` it verifies first, refuses
(exit 1) a trail that fails, and reports only from the entries the verifier
accepted: what the device signed, and, in a section of its own marked NOT
SIGNED, what the entries after its last signed checkpoint say (anyone able to
write the file could have made those; ``"signed": false`` in ``--json``).
Without it nothing is verified (``"signed": null``); lines that are no entry
are left out either way. The device knows the receiver it
disclosed to, not the officers who then watched: they are in the receiver's
access log (``DATA/access.log``, :mod:`receiver.access_log`), which the police
hand over. Given with ``--access-log``, its hash chain is checked (a broken
one is refused, exit 1) and every view of footage of the trail's sessions
(live, recordings, player links, evidence exports: :data:`VIEW_ACTIONS`) is
listed under its session, with the officer's account, role and camera. The
device anchors the access log's head in its signed trail as the receiver
tells it (``receiver_access_head``, about once a minute while connected): an
access log that lacks an anchored entry, or holds another one under its
number, was cut or rewritten, and is refused (exit 1).

Inputs are bounded: a trail file of at most :data:`MAX_TRAIL_BYTES`, lines of
at most :data:`agent.audit.MAX_LINE_BYTES`; findings of one kind past the first
:data:`agent.audit.MAX_LISTED` are counted, not listed. Text taken from the
trail is printed with control characters escaped, and values nested deeper than
:data:`MAX_DEPTH` are replaced by a note.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from agent.audit import (
    MAX_LINE_BYTES,
    Accept,
    Problem,
    TrailReport,
    iter_lines,
    parse_entry,
    verify_trail,
)
from receiver.access_log import verify_lines

__all__ = [
    "MAX_DEPTH",
    "MAX_TRAIL_BYTES",
    "SessionRecord",
    "TrailInputError",
    "TrailLines",
    "add_parser",
    "audit_report",
    "audit_verify",
    "read_trail",
    "session_records",
]

MAX_TRAIL_BYTES: Final = 256 * 1024 * 1024
#: Values from a trail or access log nested deeper than this are reported as a note.
MAX_DEPTH: Final = 16


class TrailInputError(Exception):
    """A trail or key file that cannot be used at all (exit 2)."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` and ``audit report`` to a parser's subcommands.

    The chosen command's handler is ``args.func(args) -> int`` (an exit code).
    """
    audit = sub.add_parser(
        "audit", help="verify an agent's audit trail; print its disclosure records"
    ).add_subparsers(dest="action", required=True)
    verify = audit.add_parser(
        "verify",
        help="check the hash chain and the device's signed checkpoints",
        description="Exit 0 when intact, 1 with one line per problem when not, "
        "2 when a file cannot be read.",
    )
    verify.add_argument("file", type=Path, metavar="FILE", help="the trail (audit.log)")
    verify.add_argument(
        "--device-key", type=Path, required=True, metavar="PUB.pem", help="the device's public key"
    )
    verify.add_argument(
        "--reference",
        type=Path,
        metavar="FILE",
        help="an earlier (or the receiver's) copy: every entry of it must be in FILE",
    )
    verify.set_defaults(func=audit_verify)
    report = audit.add_parser(
        "report",
        help="per emergency session, the FERPA 34 CFR 99.32(a)(5) disclosure record",
    )
    report.add_argument("file", type=Path, metavar="FILE", help="the trail (audit.log)")
    report.add_argument(
        "--device-key",
        type=Path,
        metavar="PUB.pem",
        help="verify first; refuse a trail that fails",
    )
    report.add_argument(
        "--access-log",
        type=Path,
        metavar="ACCESS.log",
        help="the receiver's access log: list who viewed each session's footage",
    )
    report.add_argument("--json", action="store_true", help="one JSON array of records")
    report.set_defaults(func=audit_report)


# -- input --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrailLines:
    """A file's lines (with their newlines), made one at a time each time it is iterated:
    a file of many short lines costs no object per line."""

    data: bytes

    def __iter__(self) -> Iterator[bytes]:
        return iter_lines(self.data)


def read_trail(path: Path, what: str = "audit trail") -> TrailLines:
    """A trail file's lines (with their newlines), at most MAX_TRAIL_BYTES in all.

    Read a MiB at a time: ``read(MAX_TRAIL_BYTES + 1)`` would set aside 256 MiB for
    any file, however small."""
    chunks, size = [], 0
    try:
        with path.open("rb") as fh:
            while size <= MAX_TRAIL_BYTES and (chunk := fh.read(1 << 20)):
                chunks.append(chunk)
                size += len(chunk)
    except OSError as exc:
        raise TrailInputError(f"{what} {path}: cannot read ({exc.strerror})") from exc
    if size > MAX_TRAIL_BYTES:
        raise TrailInputError(
            f"{what} {path}: larger than {MAX_TRAIL_BYTES} bytes, not an agent's audit trail"
        )
    return TrailLines(chunks[0] if len(chunks) == 1 else b"".join(chunks))


def _check(
    trail: Path, device_key: Path, reference: Path | None, accept: Accept | None = None
) -> tuple[TrailReport, str]:
    """Verify a trail; the report and the device key's id. TrailInputError if unreadable.
    ``accept`` is called with each entry that verified (:func:`agent.audit.verify_trail`)."""
    from provisioning.errors import KeyFileError
    from provisioning.keys import kid, load_public_key

    lines = read_trail(trail)
    ref = None if reference is None else read_trail(reference, "reference")
    try:
        key = load_public_key(device_key)
    except KeyFileError as exc:
        raise TrailInputError(str(exc)) from exc
    return verify_trail(lines, key, reference=ref, accept=accept), kid(key)


def _error(message: str, code: int) -> int:
    print(f"breakglass: error: {message}", file=sys.stderr)
    return code


# -- verify -------------------------------------------------------------------------------


def _where(trail: Path, reference: Path | None, p: Problem) -> str:
    path = reference if p.in_reference else trail
    parts = [f"{path}:{p.line}" if p.line is not None else f"{path}"]
    if p.entry is not None:
        parts.append(f"entry {p.entry}")
    return ": ".join(parts)


def _problem_line(trail: Path, reference: Path | None, p: Problem) -> str:
    return f"{_where(trail, reference, p)}: {'' if p.error else 'warning: '}{_text(p.what, 400)}"


def audit_verify(args: argparse.Namespace) -> int:
    """Handle ``audit verify``; returns the exit code."""
    trail, reference = args.file, args.reference
    try:
        report, kid = _check(trail, args.device_key, reference)
    except TrailInputError as exc:
        return _error(str(exc), 2)
    for problem in report.problems:
        print(_problem_line(trail, reference, problem))
    first = report.first_error
    if first is None:
        print(
            f"{trail}: intact: {report.entries} entries, {report.checkpoints} signed "
            f"checkpoint{'s' if report.checkpoints != 1 else ''} (device key {kid}), "
            f"signed through entry {report.signed}, "
            f"head {report.head}"
        )
        return 0
    errors = report.error_count
    print(
        f"{trail}: NOT intact: {errors} error{'s' if errors != 1 else ''}, the first at "
        f"{_where(trail, reference, first)}: {_text(first.what, 400)}"
    )
    return 1


# -- report -------------------------------------------------------------------------------


@dataclass
class SessionRecord:
    """One emergency session's disclosure record, as the trail tells it.

    Times are UTC seconds; ``threat`` is the ``by`` object of its ``session_start``
    (or of the press that started it); ``recipients`` are the receivers it was
    disclosed to (first time each), ``viewers`` the officers who watched it.
    ``signed``: True when made of entries the device signed, False of entries after
    its last signed checkpoint (the trail's unsigned tail: anyone able to write the
    file could have made them), None when the trail was not verified.
    """

    session: str
    building: str | None = None
    threat: dict[str, Any] | None = None
    started: float | None = None
    expires_at: float | None = None
    cameras: list[Any] = field(default_factory=list)
    presses: list[dict[str, Any]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    ended: dict[str, Any] | None = None
    recipients: list[dict[str, Any]] = field(default_factory=list)
    viewers: list[dict[str, Any]] = field(default_factory=list)
    disclosed: list[dict[str, Any]] = field(default_factory=list)
    signed: bool | None = None


_SESSION_EVENTS: Final = frozenset(
    {
        "session_start",
        "button_press",
        "button_presses",
        "session_extend",
        "session_end",
        "disclosure",
        "session_resumed",
    }
)
#: The trail's events a report reads: the sessions', and the access-log anchors.
_REPORTED_EVENTS: Final = _SESSION_EVENTS | {"receiver_access_head"}
#: Receiver access-log actions that show a session's footage to someone.
VIEW_ACTIONS: Final = frozenset(
    {
        "live_open",  # the live view of a camera
        "recording_playlist",  # a recording opened in the browser or a player
        "recording_fetch",  # a recording's part file
        "player_link_issue",  # a link that lets its holder watch, under the officer's name
        "player_link_playlist",  # such a link opened
        "player_link_fetch",  # footage fetched with such a link (a part file)
        "evidence_export",  # the session's evidence bundle
    }
)
_TOO_DEEP: Final = "(nested too deeply)"


def _plain(value: Any, depth: int = 0) -> Any:
    """Parsed JSON made safe to print and to dump: lists and objects nested deeper than
    :data:`MAX_DEPTH` replaced by a note, NaN and infinities by their names."""
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return _TOO_DEEP
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        if depth >= MAX_DEPTH:
            return _TOO_DEEP
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _pick(entry: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: entry.get(k) for k in keys}


def _add_disclosure(record: SessionRecord, entry: dict[str, Any]) -> None:
    recipient = _pick(entry, "receiver", "device")
    if not any(_pick(r, "receiver", "device") == recipient for r in record.recipients):
        record.recipients.append({"t": entry.get("t"), **recipient})
    cameras = entry.get("cameras")
    for camera in cameras if isinstance(cameras, list) else []:
        if isinstance(camera, dict):
            shown = _pick(camera, "id", "zone")
            if shown not in record.disclosed:
                record.disclosed.append(shown)


def session_records(
    entries: Iterable[dict[str, Any]], *, signed: bool | None = None
) -> list[SessionRecord]:
    """The disclosure record of every session the entries mention, in order of appearance
    (each marked ``signed``)."""
    records: dict[str, SessionRecord] = {}
    for raw in entries:
        session, event = raw.get("session"), raw.get("event")
        if not isinstance(session, str) or not session or event not in _SESSION_EVENTS:
            continue
        entry = _plain(raw)
        record = records.setdefault(session, SessionRecord(session, signed=signed))
        # When it happened: an entry the card could not take at once was written later.
        t = entry.get("happened_at", entry.get("t"))
        if event == "session_start":
            record.building = entry.get("building")
            record.threat = entry.get("by")
            record.started, record.expires_at = t, entry.get("expires_at")
            cameras = entry.get("cameras")
            record.cameras = cameras if isinstance(cameras, list) else []
        elif event == "button_press":
            record.presses.append({"t": t, **_pick(entry, "button", "location", "started")})
            if record.threat is None and entry.get("started") is True:
                record.threat = {
                    "kind": "button",
                    "button_id": entry.get("button"),
                    "location": entry.get("location"),
                }
        elif event == "button_presses":
            record.presses.append({"t": t, **_pick(entry, "button", "location", "count")})
        elif event == "session_extend":
            record.extensions.append({"t": t, **_pick(entry, "by", "expires_at")})
        elif event == "session_end":
            record.ended = {"t": t, **_pick(entry, "reason", "by")}
        elif event == "session_resumed":
            record.resumes.append({"t": t, **_pick(entry, "reboot", "why", "left_s")})
        else:
            _add_disclosure(record, entry)
    return list(records.values())


def add_views(records: Iterable[SessionRecord], access: Iterable[dict[str, Any]]) -> int:
    """List the access log's views of each record's footage under it (the first record
    of a session: its signed one, when there are two); how many were added."""
    by_session: dict[str, SessionRecord] = {}
    for r in records:
        by_session.setdefault(r.session, r)
    added = 0
    for raw in access:
        session, action = raw.get("session"), raw.get("action")
        record = by_session.get(session) if isinstance(session, str) else None
        if record is None or not isinstance(action, str) or action not in VIEW_ACTIONS:
            continue
        entry = _plain(raw)
        at = entry.get("at")
        t: object = at
        if isinstance(at, str):
            with contextlib.suppress(ValueError):
                t = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        record.viewers.append({"t": t, **_pick(entry, "who", "role", "action", "camera")})
        added += 1
    return added


def access_anchors(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The receiver access-log heads the trail anchors (``t``, ``n``, ``head``), in order."""
    return [
        {"t": _plain(e.get("t")), "n": e["entry"], "head": e["head"]}
        for e in entries
        if e.get("event") == "receiver_access_head"
        and type(e.get("entry")) is int
        and isinstance(e.get("head"), str)
    ]


def check_anchors(anchors: Iterable[dict[str, Any]], access: Iterable[dict[str, Any]]) -> list[str]:
    """What contradicts the anchors in an access log (its entries, in order); empty: none."""
    anchors = list(anchors)
    wanted = {anchor["n"] for anchor in anchors}
    hashes: dict[int, object] = {}
    for e in access:
        n = e.get("n")
        if type(n) is int and n in wanted:
            hashes.setdefault(n, e.get("hash"))
    problems = []
    for anchor in anchors:
        n, when = anchor["n"], _when(anchor["t"])
        if n not in hashes:
            problems.append(f"no entry {n}, which the device anchored at {when}: the log was cut")
        elif hashes[n] != anchor["head"]:
            problems.append(
                f"entry {n} is not the one the device anchored at {when}: the log was rewritten"
            )
    return problems


def _text(value: object, limit: int = 200) -> str:
    """Trail text made safe to print: control characters escaped, length capped."""
    text = value if isinstance(value, str) else json.dumps(_plain(value), ensure_ascii=False)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quoted(value: object) -> str:
    return '"' + _text(value) + '"' if isinstance(value, str) else _text(value)


def _when(t: object) -> str:
    if isinstance(t, int | float) and not isinstance(t, bool):
        try:
            return (
                datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            )
        except (OverflowError, OSError, ValueError):
            pass
    return f"(time {_text(t)})"


def _by(by: object) -> str:
    if not isinstance(by, dict):
        return "unknown"
    if by.get("kind") == "button":
        return f"panic button {_text(by.get('button_id'))} at {_quoted(by.get('location'))}"
    if by.get("kind") == "share":
        return "none: the building shares its exterior cameras continuously (its policy)"
    if by.get("kind") == "trigger":
        return (
            f"signed trigger, key {_text(by.get('kid'))} ({_text(by.get('role'))}), "
            f"reason {_quoted(by.get('reason'))}"
        )
    return f"unknown ({_text(by)})"


def _camera(camera: dict[str, Any]) -> str:
    return f"{_text(camera.get('id'))} ({_text(camera.get('zone'))})"


def _render(record: SessionRecord, access_log: Path | None, *, views: bool = True) -> list[str]:
    """A record's lines. An unsigned one (``signed`` False) shows only what its entries
    say, and its views only when ``views`` (no signed record of the session shows them)."""
    partial = record.signed is False
    if partial:
        building = "" if record.building is None else f", building {_text(record.building)}"
        out = [f"session {_text(record.session)}{building}: NOT SIGNED"]
    else:
        out = [f"session {_text(record.session)}, building {_text(record.building)}"]
    if record.threat is not None or not partial:
        threat = _by(record.threat) if record.threat is not None else "not in this trail"
        out.append(f"  threat:       {threat}")
    if record.started is not None:
        cameras = ", ".join(_text(c) for c in record.cameras) or "none"
        out.append(
            f"  started:      {_when(record.started)}, cameras {cameras}, "
            f"expires {_when(record.expires_at)}"
        )
    elif not partial:
        out.append("  started:      not in this trail")
    for press in record.presses:
        times = f" {_text(press['count'])} more times, until" if "count" in press else ""
        out.append(
            f"  pressed:     {times} {_when(press['t'])} button {_text(press['button'])} "
            f"at {_quoted(press['location'])}"
        )
    for ext in record.extensions:
        out.append(
            f"  extended:     {_when(ext['t'])} until {_when(ext['expires_at'])}, "
            f"by {_by(ext['by'])}"
        )
    for res in record.resumes:
        after = "a reboot" if res["reboot"] is True else "a restart"
        out.append(
            f"  resumed:      {_when(res['t'])} after {after}, {_text(res['left_s'])} s left "
            f"({_text(res['why'])})"
        )
    if record.ended is not None:
        by = record.ended["by"]
        who = f", by {_by(by)}" if by is not None else ""
        out.append(
            f"  ended:        {_when(record.ended['t'])} ({_text(record.ended['reason'])}){who}"
        )
    elif not partial:
        out.append("  ended:        not in this trail (still active, or the trail stops early)")
    for r in record.recipients:
        out.append(
            f"  disclosed to: receiver {_text(r['receiver'])} as device {_text(r['device'])}, "
            f"from {_when(r['t'])}"
        )
    if not record.recipients and not partial:
        out.append("  disclosed to: no receiver in this trail")
    if views:
        for v in record.viewers:
            camera = f" camera {_text(v['camera'])}" if v["camera"] is not None else ""
            out.append(
                f"  viewed by:    {_text(v['who'])} ({_text(v['role'])}), {_text(v['action'])}"
                f"{camera}, {_when(v['t'])}"
            )
        if access_log is None:
            out.append("  viewed by:    see the receiver's access log (--access-log)")
        elif not record.viewers:
            out.append("  viewed by:    nobody, in the access log given")
    if record.disclosed or not partial:
        shown = ", ".join(map(_camera, record.disclosed)) or "none"
        out.append(f"  cameras disclosed: {shown}")
    return out


def _access_entries(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The entries of an access log whose chain verified, one at a time."""
    for raw in lines:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            yield obj


def _add_access_log(
    path: Path, trail: Path, anchors: list[dict[str, Any]], records: list[SessionRecord]
) -> int | None:
    """Check the receiver's access log (its chain, the trail's anchors of it) and list its
    views under the records; an exit code if it is refused or unreadable, else None.
    An anchor with ``signed`` False is in the trail's unsigned tail."""
    try:
        access_lines = read_trail(path, "access log")
    except TrailInputError as exc:
        return _error(str(exc), 2)
    checked = verify_lines(access_lines)
    for lineno, what in checked.errors:
        print(f"{path}:{lineno}: {what}", file=sys.stderr)
    if not checked.ok:
        return _error(f"{path}: the access log's chain is broken; refusing it", 1)
    broken = check_anchors(anchors, _access_entries(access_lines))
    for what in broken:
        print(f"{path}: {what}", file=sys.stderr)
    if broken:
        return _error(f"{path}: not the log the device anchored; refusing it", 1)
    views = add_views(records, _access_entries(access_lines))
    print(
        f"note: {path}: chain intact ({checked.entries} entries, head "
        f"{checked.head}); {views} views of these sessions",
        file=sys.stderr,
    )
    if anchors:
        last = anchors[-1]
        unsigned = (
            " (that anchor is in an entry of the trail the device has not signed yet)"
            if last.get("signed") is False
            else ""
        )
        print(
            f"note: the device anchored it through entry {last['n']} at {_when(last['t'])}"
            f"; {max(0, checked.entries - last['n'])} entries after that are not anchored"
            f"{unsigned}",
            file=sys.stderr,
        )
    else:
        print(f"note: {trail} anchors no head of an access log", file=sys.stderr)
    return None


def _unverified_entries(path: Path) -> list[dict[str, Any]]:
    """The entries a report reads, of a trail not verified: lines with an entry's shape."""
    kept, skipped = [], 0
    for raw in read_trail(path):
        body = raw[:-1] if raw.endswith(b"\n") else raw
        entry = parse_entry(body) if len(body) < MAX_LINE_BYTES else None
        if entry is None:
            skipped += 1
        elif entry.get("event") in _REPORTED_EVENTS:
            kept.append(entry)
    if skipped:
        print(f"note: {skipped} lines of {path} are not entries; left out", file=sys.stderr)
    return kept


def _unsigned_note(first: int, last: int, signed: int) -> str:
    after = (
        f"follow the last signed checkpoint (entry {signed})"
        if signed
        else "are the whole trail: it has no signed checkpoint"
    )
    return (
        f"NOT SIGNED: entries {first}..{last} {after}. The device has not signed them, "
        "so anyone able to write the file could have made them; what they say is "
        "not part of the records above:"
    )


def audit_report(args: argparse.Namespace) -> int:
    """Handle ``audit report``; returns the exit code."""
    kept: list[dict[str, Any]] = []

    def accept(_line: int, entry: dict[str, Any]) -> None:
        if entry.get("event") in _REPORTED_EVENTS:
            kept.append(entry)

    report: TrailReport | None = None
    try:
        if args.device_key is None:
            print(
                f"note: {args.file} not verified (give --device-key to verify it first)",
                file=sys.stderr,
            )
            kept = _unverified_entries(args.file)
        else:
            report, _ = _check(args.file, args.device_key, None, accept)
            for problem in report.problems:
                print(_problem_line(args.file, None, problem), file=sys.stderr)
            if not report.ok:
                return _error(f"{args.file} fails verification; refusing to report from it", 1)
    except TrailInputError as exc:
        return _error(str(exc), 2)
    if report is None:
        records = session_records(kept)
        anchors = access_anchors(kept)
    else:  # verified: entries 1..signed are signed, the rest is the unsigned tail
        signed = [e for e in kept if e["n"] <= report.signed]
        tail = [e for e in kept if e["n"] > report.signed]
        records = [
            *session_records(signed, signed=True),
            *session_records(tail, signed=False),
        ]
        anchors = [
            *({**a, "signed": True} for a in access_anchors(signed)),
            *({**a, "signed": False} for a in access_anchors(tail)),
        ]
    if args.access_log is not None:
        code = _add_access_log(args.access_log, args.file, anchors, records)
        if code is not None:
            return code
    if args.json:
        as_json = [{f.name: getattr(r, f.name) for f in fields(r)} for r in records]
        print(json.dumps(as_json, indent=2, ensure_ascii=False))
        return 0
    main = [r for r in records if r.signed is not False]
    unsigned = [r for r in records if r.signed is False]
    shares = sum(1 for r in main if (r.threat or {}).get("kind") == "share")
    emergencies = len(main) - shares
    print(
        f"FERPA 34 CFR 99.32(a)(5) disclosure records in {args.file}: "
        f"{emergencies} emergency session{'s' if emergencies != 1 else ''}"
        + (f", {shares} exterior share{'s' if shares != 1 else ''}" if shares else "")
    )
    for record in main:
        print()
        print("\n".join(_render(record, args.access_log)))
    if unsigned and report is not None:
        print()
        print(_unsigned_note(report.signed + 1, report.entries, report.signed))
        shown = {r.session for r in main}
        for record in unsigned:
            print()
            print("\n".join(_render(record, args.access_log, views=record.session not in shown)))
    return 0
