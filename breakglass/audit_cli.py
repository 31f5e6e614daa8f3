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
footage and which cameras. With ``--device-key`` it verifies first and
refuses (exit 1) a trail that fails. The device knows the receiver it
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
at most :data:`agent.audit.MAX_LINE_BYTES`. Text taken from the trail is
printed with control characters escaped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from agent.audit import MAX_LINE_BYTES, Problem, TrailReport, split_lines, verify_trail
from receiver.access_log import verify_lines

__all__ = [
    "MAX_TRAIL_BYTES",
    "SessionRecord",
    "TrailInputError",
    "add_parser",
    "audit_report",
    "audit_verify",
    "read_trail",
    "session_records",
]

MAX_TRAIL_BYTES: Final = 256 * 1024 * 1024


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


def read_trail(path: Path, what: str = "audit trail") -> list[bytes]:
    """A trail file's lines (with their newlines), at most MAX_TRAIL_BYTES in all."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TRAIL_BYTES + 1)
    except OSError as exc:
        raise TrailInputError(f"{what} {path}: cannot read ({exc.strerror})") from exc
    if len(data) > MAX_TRAIL_BYTES:
        raise TrailInputError(
            f"{what} {path}: larger than {MAX_TRAIL_BYTES} bytes, not an agent's audit trail"
        )
    return split_lines(data)


def _check(trail: Path, device_key: Path, reference: Path | None) -> tuple[TrailReport, str]:
    """Verify a trail; the report and the device key's id. TrailInputError if unreadable."""
    from provisioning.errors import KeyFileError
    from provisioning.keys import kid, load_public_key

    lines = read_trail(trail)
    ref = None if reference is None else read_trail(reference, "reference")
    try:
        key = load_public_key(device_key)
    except KeyFileError as exc:
        raise TrailInputError(str(exc)) from exc
    return verify_trail(lines, key, reference=ref), kid(key)


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
    errors = len(report.errors)
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
    """

    session: str
    building: str | None = None
    threat: dict[str, Any] | None = None
    started: float | None = None
    expires_at: float | None = None
    cameras: list[Any] = field(default_factory=list)
    presses: list[dict[str, Any]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)
    ended: dict[str, Any] | None = None
    recipients: list[dict[str, Any]] = field(default_factory=list)
    viewers: list[dict[str, Any]] = field(default_factory=list)
    disclosed: list[dict[str, Any]] = field(default_factory=list)


_SESSION_EVENTS: Final = frozenset(
    {"session_start", "button_press", "session_extend", "session_end", "disclosure"}
)
#: Receiver access-log actions that show a session's footage to someone.
VIEW_ACTIONS: Final = frozenset(
    {
        "live_open",  # the live view of a camera
        "recording_playlist",  # a recording opened in the browser or a player
        "recording_fetch",  # a recording's part file
        "player_link_issue",  # a link that lets its holder watch, under the officer's name
        "player_link_playlist",  # such a link opened
        "evidence_export",  # the session's evidence bundle
    }
)


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


def session_records(entries: Iterable[dict[str, Any]]) -> list[SessionRecord]:
    """The disclosure record of every session the entries mention, in order of appearance."""
    records: dict[str, SessionRecord] = {}
    for entry in entries:
        session, event = entry.get("session"), entry.get("event")
        if not isinstance(session, str) or not session or event not in _SESSION_EVENTS:
            continue
        record = records.setdefault(session, SessionRecord(session))
        t = entry.get("t")
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
        elif event == "session_extend":
            record.extensions.append({"t": t, **_pick(entry, "by", "expires_at")})
        elif event == "session_end":
            record.ended = {"t": t, **_pick(entry, "reason", "by")}
        else:
            _add_disclosure(record, entry)
    return list(records.values())


def add_views(records: Iterable[SessionRecord], access: Iterable[dict[str, Any]]) -> int:
    """List the access log's views of each record's footage under it; how many were added."""
    by_session = {r.session: r for r in records}
    added = 0
    for entry in access:
        session, at = entry.get("session"), entry.get("at")
        record = by_session.get(session) if isinstance(session, str) else None
        if record is None or entry.get("action") not in VIEW_ACTIONS:
            continue
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
        {"t": e.get("t"), "n": e["entry"], "head": e["head"]}
        for e in entries
        if e.get("event") == "receiver_access_head"
        and isinstance(e.get("entry"), int)
        and isinstance(e.get("head"), str)
    ]


def check_anchors(anchors: Iterable[dict[str, Any]], access: list[dict[str, Any]]) -> list[str]:
    """What contradicts the anchors in an access log (its entries, in order); empty: none."""
    hashes = {e.get("n"): e.get("hash") for e in access}
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
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
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


def _render(record: SessionRecord, access_log: Path | None) -> list[str]:
    out = [f"session {_text(record.session)}, building {_text(record.building)}"]
    threat = _by(record.threat) if record.threat is not None else "not in this trail"
    out.append(f"  threat:       {threat}")
    if record.started is not None:
        cameras = ", ".join(_text(c) for c in record.cameras) or "none"
        out.append(
            f"  started:      {_when(record.started)}, cameras {cameras}, "
            f"expires {_when(record.expires_at)}"
        )
    else:
        out.append("  started:      not in this trail")
    for press in record.presses:
        out.append(
            f"  pressed:      {_when(press['t'])} button {_text(press['button'])} "
            f"at {_quoted(press['location'])}"
        )
    for ext in record.extensions:
        out.append(
            f"  extended:     {_when(ext['t'])} until {_when(ext['expires_at'])}, "
            f"by {_by(ext['by'])}"
        )
    if record.ended is None:
        out.append("  ended:        not in this trail (still active, or the trail stops early)")
    else:
        by = record.ended["by"]
        who = f", by {_by(by)}" if by is not None else ""
        out.append(
            f"  ended:        {_when(record.ended['t'])} ({_text(record.ended['reason'])}){who}"
        )
    for r in record.recipients:
        out.append(
            f"  disclosed to: receiver {_text(r['receiver'])} as device {_text(r['device'])}, "
            f"from {_when(r['t'])}"
        )
    if not record.recipients:
        out.append("  disclosed to: no receiver in this trail")
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
    out.append(f"  cameras disclosed: {', '.join(map(_camera, record.disclosed)) or 'none'}")
    return out


def _entries(lines: list[bytes]) -> tuple[list[dict[str, Any]], int]:
    """The lines that parse as JSON objects, and how many did not."""
    entries, skipped = [], 0
    for raw in lines:
        try:
            obj = json.loads(raw) if len(raw) <= MAX_LINE_BYTES else None
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            entries.append(obj)
        else:
            skipped += 1
    return entries, skipped


def _add_access_log(
    path: Path, trail: Path, entries: list[dict[str, Any]], records: list[SessionRecord]
) -> int | None:
    """Check the receiver's access log (its chain, the trail's anchors of it) and list its
    views under the records; an exit code if it is refused or unreadable, else None."""
    try:
        access_lines = read_trail(path, "access log")
    except TrailInputError as exc:
        return _error(str(exc), 2)
    checked = verify_lines(access_lines)
    for lineno, what in checked.errors:
        print(f"{path}:{lineno}: {what}", file=sys.stderr)
    if not checked.ok:
        return _error(f"{path}: the access log's chain is broken; refusing it", 1)
    access, _ = _entries(access_lines)
    anchors = access_anchors(entries)
    broken = check_anchors(anchors, access)
    for what in broken:
        print(f"{path}: {what}", file=sys.stderr)
    if broken:
        return _error(f"{path}: not the log the device anchored; refusing it", 1)
    views = add_views(records, access)
    print(
        f"note: {path}: chain intact ({checked.entries} entries, head "
        f"{checked.head}); {views} views of these sessions",
        file=sys.stderr,
    )
    if anchors:
        last = anchors[-1]
        print(
            f"note: the device anchored it through entry {last['n']} at {_when(last['t'])}"
            f"; {max(0, checked.entries - last['n'])} entries after that are not anchored",
            file=sys.stderr,
        )
    else:
        print(f"note: {trail} anchors no head of an access log", file=sys.stderr)
    return None


def audit_report(args: argparse.Namespace) -> int:
    """Handle ``audit report``; returns the exit code."""
    try:
        lines = read_trail(args.file)
        if args.device_key is None:
            print(
                f"note: {args.file} not verified (give --device-key to verify it first)",
                file=sys.stderr,
            )
        else:
            report, _ = _check(args.file, args.device_key, None)
            for problem in report.problems:
                print(_problem_line(args.file, None, problem), file=sys.stderr)
            if not report.ok:
                return _error(f"{args.file} fails verification; refusing to report from it", 1)
    except TrailInputError as exc:
        return _error(str(exc), 2)
    entries, skipped = _entries(lines)
    if skipped:
        print(f"note: {skipped} lines of {args.file} are not entries", file=sys.stderr)
    records = session_records(entries)
    if args.access_log is not None:
        code = _add_access_log(args.access_log, args.file, entries, records)
        if code is not None:
            return code
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2, ensure_ascii=False))
        return 0
    shares = sum(1 for r in records if (r.threat or {}).get("kind") == "share")
    emergencies = len(records) - shares
    print(
        f"FERPA 34 CFR 99.32(a)(5) disclosure records in {args.file}: "
        f"{emergencies} emergency session{'s' if emergencies != 1 else ''}"
        + (f", {shares} exterior share{'s' if shares != 1 else ''}" if shares else "")
    )
    for record in records:
        print()
        print("\n".join(_render(record, args.access_log)))
    return 0
