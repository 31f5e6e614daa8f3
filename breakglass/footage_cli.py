"""``breakglass footage export``: the district's evidence export from an agent's store.

Hooked into the ``breakglass`` command by :func:`add_footage_commands`; also
runs alone as ``python -m breakglass.footage_cli footage export ...``.

Exit codes: 0 exported; 1 the footage cannot be exported (nothing in range,
wrong identity for it, a corrupt segment); 2 bad arguments or an unusable
identity file. Messages are one line on stderr and name files, never their
contents: no footage and no key is ever printed.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["add_footage_commands", "footage_export", "main", "parse_time"]


def parse_time(text: str, option: str = "time") -> datetime:
    """A point in time: ISO-8601 with a timezone, or Unix seconds (UTC); ValueError (that
    names ``option``) if not."""
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except (ValueError, OverflowError, OSError):
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{option}: {text!r} is neither ISO-8601 (2026-11-28T15:30:00+01:00) nor Unix seconds"
        ) from None
    if when.tzinfo is None:
        raise ValueError(f"{option}: {text!r} has no timezone (add Z or +HH:MM)")
    return when


def add_footage_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``footage export`` to a parser's subcommands (``parser.add_subparsers()``).

    The chosen command's handler is ``args.func(args) -> int`` (an exit code).
    """
    footage = subparsers.add_parser(
        "footage", help="sealed footage from a copy of an agent's store (district tools)"
    ).add_subparsers(dest="action", required=True)
    export = footage.add_parser(
        "export",
        help="export one camera's footage in a time range to an MP4 (remux, no re-encode)",
        description="Open the sealed segments of one camera with the district's age identity "
        "and write the footage captured between --from and --to to a playable MP4. "
        "Holes in the footage are reported on stderr.",
    )
    export.add_argument(
        "--store", type=Path, required=True, metavar="DIR", help="the agent's segment store"
    )
    export.add_argument(
        "--identity", type=Path, required=True, metavar="KEY", help="age identity file (0600)"
    )
    export.add_argument("--camera", required=True, help="camera id (a folder of the store)")
    # Times are parsed by the handler, so a bad one is a one-line error like the others.
    when = "ISO-8601 with a timezone, or Unix seconds"
    export.add_argument("--from", dest="start", required=True, metavar="T", help=when)
    export.add_argument("--to", dest="end", required=True, metavar="T", help=when)
    export.add_argument("--out", type=Path, required=True, metavar="FILE.mp4")
    export.set_defaults(func=footage_export)


def _error(message: str, code: int) -> int:
    print(f"breakglass: error: {message}", file=sys.stderr)
    return code


def footage_export(args: argparse.Namespace) -> int:
    """Handle ``footage export``; returns the exit code."""
    from provisioning.age_keys import load_identity
    from provisioning.errors import KeyFileError
    from receiver.errors import InvalidIdError, ReceiverError
    from receiver.export import export_footage

    try:
        start, end = parse_time(args.start, "--from"), parse_time(args.end, "--to")
    except ValueError as exc:
        return _error(str(exc), 2)
    if end < start:
        return _error("--to is before --from", 2)
    if not args.store.is_dir():
        return _error(f"store {args.store} is not a folder", 2)
    try:
        identity = load_identity(args.identity)
    except KeyFileError as exc:
        return _error(str(exc), 2)
    try:
        report = export_footage(args.store, identity, args.camera, start, end, args.out)
    except InvalidIdError as exc:
        return _error(str(exc), 2)
    except ReceiverError as exc:
        return _error(str(exc), 1)
    except OSError as exc:
        return _error(f"{exc.filename or args.out}: {exc.strerror}", 1)
    seconds = (report.last_capture - report.first_capture).total_seconds()
    print(
        f"exported {report.frames} frames of {report.camera} (seqs {report.first_seq}.."
        f"{report.last_seq}, {report.first_capture.isoformat()} + {seconds:.1f} s) "
        f"from {report.segments} segments to {report.out}"
    )
    for hole in report.holes:
        why = "declared lost (the agent restarted)" if hole.declared else "missing from the store"
        print(
            f"warning: seqs {hole.first}..{hole.last} ({hole.frames} frames) {why}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the footage commands alone (``python -m breakglass.footage_cli``)."""
    parser = argparse.ArgumentParser(prog="breakglass")
    add_footage_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
