"""``breakglass receiver user ...`` and ``breakglass receiver access verify``.

Accounts live in the receiver's ``DATA/accounts.sqlite`` and may be changed
while the receiver runs: disabling an account or changing its password ends
its sessions at the officer's next request, and ``unlock`` clears the locks
that failed logins put on a name (at each client address) at once. Passwords are never taken on the
command line (they would show in ``ps`` and the shell's history): they come
from a prompt, or from ``--password-file FILE`` (``-``: standard input, the
first line). Every change is written to the access log (``DATA/access.log``)
as done by ``local:<unix user>``.

``--data`` must name a receiver's data folder (:func:`check_receiver_data`: one
that ``breakglass receiver serve`` has started in), never a new one: a typo
in the path is an error (exit 2), not a fresh, empty receiver.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from provisioning.keys import foreign_owner
from receiver.access_log import AccessLog, verify_file
from receiver.accounts import AccountStore, Role, check_password, validate_name

ROLES = [str(r) for r in Role]

#: What ``breakglass receiver serve`` makes in its data folder on its first start (and
#: keeps): a folder holding none of them is not a receiver's.
RECEIVER_MARKERS: Final = ("accounts.sqlite", "age.key", "tls/receiver.crt", "recordings")


def check_receiver_data(data: Path) -> None:
    """Raise :class:`ValueError` (exit 2 at the command line) unless ``data`` is a receiver's
    data folder, one holding any of :data:`RECEIVER_MARKERS`.

    Commands that write to it (accounts, the access log, evidence keys) call this first,
    so that a mistyped ``--data`` fails instead of quietly starting an empty receiver.
    """
    try:
        if data.is_dir() and any((data / marker).exists() for marker in RECEIVER_MARKERS):
            if (owner := foreign_owner(data)) is not None:
                raise ValueError(
                    f"receiver data at {data} belongs to {owner}: run this as {owner} "
                    f"(sudo -u {owner} breakglass ...); files made as another user would "
                    "lock the receiver out of them"
                )
            return
    except OSError as exc:  # e.g. the folder is the receiver user's (mode 0700)
        raise ValueError(f"cannot read receiver data at {data}: {exc.strerror or exc}") from None
    raise ValueError(
        f"no receiver data at {data}: run `breakglass receiver serve --data {data}` first, "
        "or check the path"
    )


def add_parser(receiver: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``user`` and ``access`` under ``breakglass receiver``."""
    user = receiver.add_parser("user", help="police accounts (officer, dispatcher, admin)")
    users = user.add_subparsers(dest="user_action", required=True)

    add = users.add_parser("add", help="create an account (the password is asked for)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    _common(add, password=True)
    add.set_defaults(func=_add)

    lst = users.add_parser("list", help="list the accounts")
    _common(lst)
    lst.set_defaults(func=_list)

    for action, text in [
        ("disable", "disable an account (ends its sessions at once)"),
        ("enable", "enable a disabled account"),
    ]:
        cmd = users.add_parser(action, help=text)
        cmd.add_argument("name")
        _common(cmd)
        cmd.set_defaults(func=_set_disabled, disable=action == "disable")

    passwd = users.add_parser("passwd", help="set a new password (ends the account's sessions)")
    passwd.add_argument("name")
    _common(passwd, password=True)
    passwd.set_defaults(func=_passwd)

    unlock = users.add_parser(
        "unlock",
        help="clear an account's failed logins and locks at every address (and its throttle)",
    )
    unlock.add_argument("name")
    _common(unlock)
    unlock.set_defaults(func=_unlock)

    role = users.add_parser("role", help="change an account's role")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    _common(role)
    role.set_defaults(func=_role)

    access = receiver.add_parser("access", help="the access log (who logged in, who watched)")
    verbs = access.add_subparsers(dest="access_action", required=True)
    verify = verbs.add_parser("verify", help="check the access log's hash chain")
    verify.add_argument("--data", type=Path, required=True, help="the receiver's data folder")
    verify.set_defaults(func=_verify)


class _RefusePassword(argparse.Action):
    """``--password``: refused without echoing it (and not taken for ``--password-file``)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.error(
            "--password: a password is never taken on the command line (ps and the shell's "
            "history would show it); answer the prompt or use --password-file FILE"
        )


def _common(cmd: argparse.ArgumentParser, *, password: bool = False) -> None:
    cmd.add_argument("--data", type=Path, required=True, help="the receiver's data folder")
    if password:
        cmd.add_argument("--password", action=_RefusePassword, help=argparse.SUPPRESS)
        cmd.add_argument(
            "--password-file",
            type=Path,
            metavar="FILE",
            help="read the password from FILE's first line ('-': standard input) instead of asking",
        )


def local_actor() -> str:
    """Who runs a command on the receiver's machine, as the access log names them."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"local:uid{os.getuid()}"


def _read_password(args: argparse.Namespace) -> str:
    """The new password, from ``--password-file`` or asked twice on the terminal."""
    if args.password_file is not None:
        if str(args.password_file) == "-":
            line = sys.stdin.readline()
        else:
            try:
                with open(args.password_file, encoding="utf-8") as f:
                    line = f.readline()
            except OSError as exc:
                raise ValueError(
                    f"--password-file {args.password_file}: {exc.strerror or exc}"
                ) from None
            except UnicodeDecodeError:
                raise ValueError(f"--password-file {args.password_file}: not UTF-8 text") from None
        return line.removesuffix("\n").removesuffix("\r")
    if not sys.stdin.isatty():
        raise ValueError(
            "no terminal to ask for the password: use --password-file FILE "
            "(or --password-file - for standard input)"
        )
    check_password_first = getpass.getpass(f"New password for {args.name}: ")
    check_password(check_password_first, args.name)  # say so before asking again
    again = getpass.getpass("Again: ")
    if again != check_password_first:
        raise ValueError("the two passwords differ")
    return check_password_first


def _store(args: argparse.Namespace) -> AccountStore:
    check_receiver_data(args.data)
    return AccountStore(args.data / "accounts.sqlite")


def _audit(args: argparse.Namespace, action: str, **fields: Any) -> None:
    AccessLog(args.data / "access.log").record(
        action, who=local_actor(), role="local-admin", **fields
    )


def _add(args: argparse.Namespace) -> int:
    validate_name(args.name)
    check_receiver_data(args.data)  # before asking for the password
    password = _read_password(args)
    with _store(args) as store:
        info = store.add(args.name, Role(args.role), password)
    _audit(args, "user_add", target=info.name, target_role=str(info.role))
    print(f"account {info.name} ({info.role}) created in {args.data / 'accounts.sqlite'}")
    return 0


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        accounts = store.accounts()
        now = store.clock()
    if not accounts:
        print(
            f"no accounts yet: breakglass receiver user add NAME --role officer --data {args.data}"
        )
        return 0
    print(f"{'NAME':<24} {'ROLE':<11} {'STATE':<28} LAST LOGIN")
    for a in accounts:
        state = "disabled" if a.disabled else "active"
        if a.locked_until > now:
            where = "1 address" if a.locked_addresses == 1 else f"{a.locked_addresses} addresses"
            state += f", locked for {where} until {_when(a.locked_until)}"
        print(f"{a.name:<24} {a.role!s:<11} {state:<28} {_when(a.last_login)}")
    return 0


def _set_disabled(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.set_disabled(args.name, args.disable)
    action = "disable" if args.disable else "enable"
    _audit(args, f"user_{action}", target=args.name)
    print(f"account {args.name} {action}d" + (" (its sessions ended)" if args.disable else ""))
    return 0


def _passwd(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.get(args.name)  # an unknown name fails before the prompt
        store.set_password(args.name, _read_password(args))
    _audit(args, "user_passwd", target=args.name)
    print(f"password of {args.name} changed (its sessions ended)")
    return 0


def _unlock(args: argparse.Namespace) -> int:
    with _store(args) as store:
        locked = store.unlock(args.name)
    _audit(args, "user_unlock", target=args.name, addresses=locked)
    where = "1 address" if locked == 1 else f"{locked} addresses"
    print(f"account {args.name} unlocked (it was locked for {where}; failed logins forgotten)")
    return 0


def _role(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.set_role(args.name, Role(args.role))
    _audit(args, "user_role", target=args.name, target_role=args.role)
    print(f"account {args.name} is now {args.role}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    path = args.data / "access.log"
    if not path.exists():
        print(f"error: no access log at {path}", file=sys.stderr)
        return 1
    result = verify_file(path)
    for lineno, problem in result.errors:
        print(f"{path}:{lineno}: {problem}")
    if not result.ok:
        print(f"FAIL: the access log's chain is broken ({len(result.errors)} problems)")
        return 1
    print(f"OK: {result.entries} entries, chain intact; head {result.head}")
    return 0
