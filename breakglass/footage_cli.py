"""``breakglass footage export``: the district's evidence export from an agent's store.

Hooked into the ``breakglass`` command by :func:`add_footage_commands`; also
runs alone as ``python -m breakglass.footage_cli footage export ...``.

Exit codes: 0 exported (holes in the footage are warned of on stderr); 3
exported, but segments of the range could not be read and were skipped (each
named on stderr with its seqs; the files hold the rest); 1 the footage cannot
be exported (nothing in range, wrong identity for it, no segment readable, two
versions of a seq on the card, an output name taken); 2 bad arguments or an
unusable identity file. Errors are one line on stderr and name files, never
their contents: no footage and no key is ever printed.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from receiver.export import ExportReport

__all__ = ["EXIT_INCOMPLETE", "add_footage_commands", "footage_export", "main", "parse_time"]

#: Exit code: files written, but segments of the range could not be read (skipped).
EXIT_INCOMPLETE = 3


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Open the sealed segments of one camera with the district's age identity\n"
        "and write the footage captured between --from and --to to a playable MP4.\n"
        "\n"
        "One MP4 holds one stream. Where the camera's stream changed in the range\n"
        "(resolution, codec, SPS/PPS) the file ends and the footage goes on in the\n"
        "next one, next to it: F.mp4, then F-2.mp4, F-3.mp4 ... for --out F.mp4.\n"
        "stdout lists every file written with its seqs and size. If F.mp4 or any\n"
        "F-N.mp4 exists the export is refused: nothing is ever overwritten, and on\n"
        "an error no file is left.\n"
        "\n"
        "Holes in the footage are reported on stderr, and so are frames the card\n"
        "holds twice (written once). A segment that cannot be read (corrupt, torn,\n"
        "not sealed to this identity) is skipped and named with its seqs; the rest\n"
        "is exported and the exit code is 3. Two different versions of one seq\n"
        "are an error naming both files.",
        epilog="exit codes: 0 exported; 3 exported, but unreadable segments were skipped;\n"
        "1 nothing exported (the message says why); 2 bad arguments or identity file",
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
    export.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE.mp4",
        help="the MP4 to write (must not exist); a stream change goes on in FILE-2.mp4 ...",
    )
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
    return _print_report(report)


def _print_report(report: ExportReport) -> int:
    """The files on stdout, what is missing on stderr; returns the exit code."""
    seconds = (report.last_capture - report.first_capture).total_seconds()
    count = len(report.files)
    changed = " (the stream changed in the range: one file per stream)" if count > 1 else ""
    print(
        f"exported {report.frames} frames of {report.camera} (seqs {report.first_seq}.."
        f"{report.last_seq}, {report.first_capture.isoformat()} + {seconds:.1f} s) "
        f"from {report.segments} segments into {count} file{'s' if count > 1 else ''}{changed}:"
    )
    for f in report.files:
        print(
            f"  {f.path}: seqs {f.first_seq}..{f.last_seq} ({f.frames} frames, "
            f"{f.first_capture.isoformat()}), {f.codec} {f.width}x{f.height}, {f.size} bytes"
        )

    def warn(message: str) -> None:
        print(f"breakglass: warning: {message}", file=sys.stderr)

    for hole in report.holes:
        # Capture time from the frame before to the frame after (a clock stepped back: <0).
        between = f"{hole.seconds:.1f} s" if hole.seconds >= 0 else "a clock step back"
        if hole.declared and not hole.unreadable:
            # Mostly numbers reserved by the run before and never used: sized by time.
            warn(
                f"seqs {hole.first}..{hole.last} skipped across an agent restart, {between} "
                "between the frames either side (a restart skips numbers it never used; what "
                "the agent was writing then is lost, and footage of the run before deleted "
                "since would be missing here too)"
            )
            continue
        if hole.unreadable:
            why = "in unreadable segment " + ", ".join(str(p) for p in hole.unreadable)
        else:
            why = "missing from the store"
        warn(f"seqs {hole.first}..{hole.last} ({hole.frames} frames, {between}) {why}")
    for first, last in report.undecodable:
        warn(
            f"seqs {first}..{last} ({last - first + 1} frames) not exported: "
            "no keyframe of their stream before them on the card"
        )
    if report.duplicates:
        print(
            f"breakglass: note: {report.duplicates} frames are on the card twice with identical "
            f"bytes, exported once (second copies in "
            f"{', '.join(str(p) for p in report.duplicate_segments)})",
            file=sys.stderr,
        )
    lost = [u for u in report.unreadable if not u.covered]
    for u in report.unreadable:
        if u.covered:
            warn(
                f"{u.reason}; skipped, but another file on the card holds its seqs "
                f"{u.first_seq}..{u.last_seq}: nothing missing"
            )
        else:
            warn(f"SKIPPED seqs {u.first_seq}..{u.last_seq}: {u.reason}")
    if lost:
        seqs = ", ".join(f"{u.first_seq}..{u.last_seq}" for u in lost)
        _error(
            f"export INCOMPLETE: {len(lost)} segment{'s' if len(lost) > 1 else ''} of the range "
            f"could not be read and {'were' if len(lost) > 1 else 'was'} skipped (seqs {seqs}); "
            "the files listed on stdout hold the rest",
            EXIT_INCOMPLETE,
        )
        return EXIT_INCOMPLETE
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
