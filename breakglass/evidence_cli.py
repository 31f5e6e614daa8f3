"""``breakglass evidence export|verify|key``: evidence bundles with a chain of custody.

``export --data DATA --session S [--camera C ...] [--from T] [--to T] --out BUNDLE.zip``
writes the bundle of a recorded session (:func:`receiver.evidence.build_bundle`):
the footage as MP4s, the device's signed hash-chain checkpoints, the device
keys and certificates, the audit excerpt, and the manifest signed with the
receiver's evidence key. Like an export from the viewer, it goes into the
receiver's access log (``DATA/access.log``, action ``evidence_export``, by
``local:<unix user>``: the session, the cameras, the time range, the bundle's
path and SHA-256), durably before the bundle appears at ``--out``: it is built
under a hidden name beside it and given its name only once logged, so a
bundle never exists without its entry. Exit 0 written; 1 nothing to export
(unknown session or camera, no footage in range, the file exists) or not
exported (the access log cannot be written); 2 bad arguments, or ``--data``
is not a receiver's data folder.

``verify BUNDLE [--device-key PUB] [--receiver-key PUB] [--authority PUB]``
checks everything offline (:func:`receiver.evidence_verify.verify_bundle`)
and prints one line per problem, naming the part: exit 0 every check passed
(warnings may be printed), 1 a check failed, 2 the bundle or a key cannot be
read.

``key --data DATA [--out PUB.pem]`` prints (or writes) the receiver's evidence
public key, making the key on first use: give it to whoever verifies bundles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "evidence_export", "evidence_key", "evidence_verify"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``evidence export|verify|key`` to a parser's subcommands (``args.func(args)``)."""
    evidence = sub.add_parser(
        "evidence", help="evidence bundles: a session's footage with its chain of custody"
    ).add_subparsers(dest="action", required=True)
    export = evidence.add_parser(
        "export",
        help="write a session's evidence bundle (zip)",
        description="Exit 0 written (and in the receiver's access log), 1 nothing to export "
        "or the access log cannot be written, 2 bad arguments.",
    )
    export.add_argument("--data", type=Path, required=True, help="the receiver's data folder")
    export.add_argument("--session", required=True, help="session id")
    export.add_argument(
        "--camera", action="append", metavar="C", help="only this camera (repeat for more)"
    )
    when = "ISO-8601 with a timezone, or Unix seconds"
    export.add_argument("--from", dest="start", metavar="T", help=f"footage from T ({when})")
    export.add_argument("--to", dest="end", metavar="T", help=f"footage up to T ({when})")
    export.add_argument("--out", type=Path, required=True, metavar="BUNDLE.zip")
    export.set_defaults(func=evidence_export)

    verify = evidence.add_parser(
        "verify",
        help="check a bundle offline; names every altered, missing or extra part",
        description="Exit 0 when every check passed, 1 when one failed (one line per "
        "problem), 2 when the bundle or a key cannot be read.",
    )
    verify.add_argument("bundle", type=Path, metavar="BUNDLE", help="the zip (or its folder)")
    verify.add_argument("--device-key", type=Path, metavar="PUB", help="the device's public key")
    verify.add_argument(
        "--receiver-key", type=Path, metavar="PUB", help="the receiver's evidence public key"
    )
    verify.add_argument(
        "--authority", type=Path, metavar="PUB", help="the district authority that enrolled it"
    )
    verify.set_defaults(func=evidence_verify)

    key = evidence.add_parser("key", help="print the receiver's evidence public key")
    key.add_argument("--data", type=Path, required=True, help="the receiver's data folder")
    key.add_argument("--out", type=Path, metavar="PUB.pem", help="write it to this file")
    key.set_defaults(func=evidence_key)


def _error(message: str, code: int) -> int:
    print(f"breakglass: error: {message}", file=sys.stderr)
    return code


def evidence_export(args: argparse.Namespace) -> int:
    """Handle ``evidence export``: build the bundle, log it, then give it its name."""
    from breakglass.accounts_cli import check_receiver_data
    from breakglass.footage_cli import parse_time
    from receiver.errors import CorruptRecordingError, InvalidIdError, ReceiverError
    from receiver.evidence import build_bundle, sha256_file

    try:
        start = None if args.start is None else parse_time(args.start, "--from")
        end = None if args.end is None else parse_time(args.end, "--to")
        check_receiver_data(args.data)
    except ValueError as exc:
        return _error(str(exc), 2)
    out: Path = args.out
    if out.exists():
        return _error(f"{out} exists; refusing to overwrite evidence", 1)
    access = args.data / "access.log"
    try:  # can it be logged? Say so before a long export, not after
        os.close(os.open(access, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        return _unlogged(out, access, exc)
    # Built under a hidden name: the bundle gets its name only once its export is logged.
    staged = out.with_name(f".{out.name}.{os.getpid()}.unlogged")
    try:
        try:
            build_bundle(args.data, args.session, staged, cameras=args.camera, start=start, end=end)
        except InvalidIdError as exc:
            return _error(str(exc), 2)
        except CorruptRecordingError as exc:
            return _error(f"the recording cannot be read: {exc}", 1)
        except ReceiverError as exc:
            return _error(str(exc).replace(str(staged), str(out)), 1)
        except OSError as exc:
            return _error(f"{exc.filename or out}: {exc.strerror}", 1)
        try:
            _log_export(access, args.session, staged, out, sha256_file(staged))
        except (OSError, ValueError) as exc:
            return _unlogged(out, access, exc)
        if out.exists():  # taken meanwhile: the entry stays (too much is safe), no bundle
            return _error(f"{out} exists; refusing to overwrite evidence", 1)
        try:
            os.replace(staged, out)
        except OSError as exc:
            return _error(f"{out}: {exc.strerror}", 1)
    finally:
        staged.unlink(missing_ok=True)
    print(f"evidence bundle of session {args.session}: {out} ({out.stat().st_size} bytes)")
    return 0


def _unlogged(out: Path, access: Path, exc: BaseException) -> int:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return _error(
        f"{out} not exported: the access log {access} cannot be written ({reason}); "
        "every export must be in it",
        1,
    )


def _log_export(access: Path, session: str, bundle: Path, out: Path, digest: str) -> None:
    """Append the export's entry to the access log, durably (what the bundle holds, as its
    manifest says: the cameras and the time range actually selected)."""
    from breakglass.accounts_cli import local_actor
    from receiver.access_log import AccessLog
    from receiver.evidence_format import MANIFEST

    with zipfile.ZipFile(bundle) as zf:
        selection: dict[str, Any] = json.loads(zf.read(MANIFEST))["selection"]
    cameras = [str(c) for c in selection["cameras"]]
    AccessLog(access).record(  # not started: written and fsynced before it returns
        "evidence_export",
        who=local_actor(),
        role="local-admin",
        session=session,
        camera=cameras[0] if len(cameras) == 1 else None,
        cameras=cameras,
        file=out.name,
        path=str(out.resolve()),
        sha256=digest,
        **{"from": _iso_us(selection["from_us"]), "to": _iso_us(selection["to_us"])},
    )


def _iso_us(us: int | None) -> str | None:
    """Microseconds since the epoch as ISO-8601 UTC (None: an open end of the range)."""
    if us is None:
        return None
    stamp = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    return stamp.isoformat().replace("+00:00", "Z")


def evidence_verify(args: argparse.Namespace) -> int:
    """Handle ``evidence verify``."""
    from provisioning.errors import KeyFileError
    from provisioning.keys import load_public_key
    from receiver.evidence_verify import BundleInputError, verify_bundle

    keys = {}
    for option in ("device_key", "receiver_key", "authority"):
        path = getattr(args, option)
        if path is not None:
            try:
                keys[option] = load_public_key(path)
            except KeyFileError as exc:
                return _error(str(exc), 2)
    try:
        report = verify_bundle(args.bundle, **keys)
    except BundleInputError as exc:
        return _error(str(exc), 2)
    for finding in sorted(report.findings, key=lambda f: not f.error):
        print(_printable(str(finding)))
    what = (
        f"session {report.session}: {report.frames_verified} of {report.frames} frames checked "
        f"against {report.checkpoints} device checkpoints, {report.files} files"
    )
    if report.ok:
        # Checked only against keys the bundle brought itself, a forgery passes too: say
        # so in the verdict, not only in a warning above it (review s13, J2).
        unanchored = []
        if not keys.keys() & {"device_key", "authority"}:
            unanchored.append("--device-key or --authority")
        if "receiver_key" not in keys:
            unanchored.append("--receiver-key")
        if unanchored:
            print(
                "bundle consistent, NOT VERIFIED: checked only against the keys it carries "
                f"(give {' and '.join(unanchored)}): {what}"
            )
            return 0
        print(f"bundle OK: {what}")
        return 0
    print(f"bundle FAILED ({len(report.errors)} problem(s)): {what}")
    return 1


def evidence_key(args: argparse.Namespace) -> int:
    """Handle ``evidence key``."""
    from breakglass.accounts_cli import check_receiver_data
    from provisioning.keys import kid, public_pem
    from receiver.evidence_format import evidence_key as load_or_make

    try:
        check_receiver_data(args.data)
    except ValueError as exc:
        return _error(str(exc), 2)
    key = load_or_make(args.data).public_key()
    pem = public_pem(key)
    if args.out is not None:
        args.out.write_bytes(pem)
        print(f"receiver evidence key {kid(key)} written to {args.out}")
    else:
        print(f"receiver evidence key {kid(key)}:", file=sys.stderr)
        sys.stdout.write(pem.decode())
    return 0


def _printable(text: str) -> str:
    """Text from a bundle, with control characters escaped (it is not trusted)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
