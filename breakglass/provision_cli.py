"""``breakglass provision discover``: find the agents on a LAN over mDNS.

``breakglass provision discover [--interface ADDR ...] [--timeout S] [--json]``
browses for ``_breakglass._tcp`` services (:mod:`agent.discovery`) for ``S``
seconds (default 3) and prints one row per agent: device id, building (``-``
while unprovisioned), state, ``address:port`` of its Local API and the start
of its certificate pin; ``--json`` prints the full records instead (a list of
``{name, device_id, building, state, version, fingerprint, addresses, port}``).

mDNS goes out only on the interfaces named by ``--interface`` (the address of
an interface of this machine, repeatable). Without one it browses
``127.0.0.1`` only, and says so: on the school LAN, give the technician
laptop's address on that LAN (``--interface 10.0.0.23``). It never falls back
to "every interface".

What the LAN answers is unauthenticated: compare the pin with the agent's
enrollment before using it with ``breakglass trigger send --pin``.

Exit codes: 0 at least one agent found; 1 none found; 2 bad arguments or an
unusable interface.

``breakglass provision pair --to https://HOST:PORT --device ID --setup-code C
[--out F]`` pairs with one agent by the code on its label (SPAKE2,
:mod:`breakglass.pairing_client`) and prints (or writes to ``F``) what the
code proved: the device's id, public key and Local API pin. Exit codes: 0
paired; 1 refused (wrong code, window closed, a man in the middle); 2 bad
arguments or the agent unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from typing import Any, Final

from agent.discovery import Discovered, discover
from breakglass import authority_cli, enroll_cli
from breakglass.pairing_client import pair
from provisioning.pairing import PairingError, normalise_code

__all__ = ["add_parser"]

DEFAULT_INTERFACE: Final = "127.0.0.1"
DEFAULT_TIMEOUT_S: Final = 3.0
MAX_TIMEOUT_S: Final = 60.0


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{value:g} s is outside 0.1..{MAX_TIMEOUT_S:g} s")
    return value


def _clean(text: str) -> str:
    """A name from the network made safe for a terminal."""
    out = "".join(c if c.isprintable() else "?" for c in text)
    return out if len(out) <= 80 else out[:80] + "..."


def _short_pin(fingerprint: str) -> str:
    return fingerprint[: len("sha256:") + 16] + "..."


def _table(found: list[Discovered]) -> str:
    rows = [("DEVICE", "BUILDING", "STATE", "ADDRESS", "FP")]
    for d in found:
        address = ", ".join(f"{a}:{d.port}" for a in d.addresses)
        rows.append((d.device_id, d.building or "-", d.state, address, _short_pin(d.fingerprint)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _discover(args: argparse.Namespace) -> int:
    interfaces: list[str] = args.interface or [DEFAULT_INTERFACE]
    if not args.interface:
        print(
            f"note: browsing {DEFAULT_INTERFACE} only; to find agents on the LAN, give this "
            "machine's address on it: --interface <the technician laptop's LAN address>",
            file=sys.stderr,
        )
    found = asyncio.run(discover(interfaces=interfaces, timeout_s=args.timeout))
    if args.json:
        records: list[dict[str, Any]] = []
        for d in found:
            record = dataclasses.asdict(d)
            record["name"] = _clean(d.name)
            record["addresses"] = list(d.addresses)
            records.append(record)
        print(json.dumps(records, indent=2))
    elif found:
        print(_table(found))
    else:
        print(
            f"no breakglass agent answered on {', '.join(interfaces)} within {args.timeout:g} s",
            file=sys.stderr,
        )
    return 0 if found else 1


def _pair(args: argparse.Namespace) -> int:
    try:
        code = normalise_code(args.setup_code)
        device = asyncio.run(pair(args.to, args.device, code))
    except PairingError as exc:
        print(f"breakglass: error: {exc.code}: {_clean(exc.detail)}", file=sys.stderr)
        return 2 if exc.code in ("unreachable", "bad_url", "bad_code") else 1
    record = {
        f.name: getattr(device, f.name)
        for f in dataclasses.fields(device)
        if f.name not in ("session", "channel")
    }
    text = json.dumps(record, indent=2) + "\n"
    if args.out is None:
        print(text, end="")
    else:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"paired with {device.device} (key {device.kid}); written to {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``provision discover`` to the top-level subcommands.

    The chosen command's handler is ``args.func(args) -> int`` (an exit code).
    """
    provision = sub.add_parser(
        "provision", help="set up agents: find them on the LAN (mDNS), pair by setup code"
    ).add_subparsers(dest="action", required=True)
    disc = provision.add_parser(
        "discover",
        help="list the breakglass agents that answer mDNS on the given interfaces",
        description=(
            "Browse for breakglass agents (mDNS _breakglass._tcp) and print device, building, "
            "state, Local API address and certificate pin. mDNS goes out only on the "
            f"--interface addresses (default {DEFAULT_INTERFACE} only). The answers are "
            "unauthenticated: check a pin against the enrollment before using it."
        ),
    )
    disc.add_argument(
        "--interface",
        action="append",
        metavar="ADDR",
        help=f"IPv4 address of this machine's interface to browse on (repeatable; "
        f"default {DEFAULT_INTERFACE} only)",
    )
    disc.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds to listen for answers (default {DEFAULT_TIMEOUT_S:g})",
    )
    disc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    disc.set_defaults(func=_discover)
    pairing = provision.add_parser(
        "pair",
        help="pair with an agent by the setup code on its label (SPAKE2)",
        description=(
            "Prove the setup code to the agent without sending it, and get back, sealed "
            "under the key only the code makes, its id, public key and certificate pin."
        ),
    )
    pairing.add_argument("--to", required=True, metavar="URL", help="https://HOST:PORT")
    pairing.add_argument("--device", required=True, metavar="ID", help="the agent's device id")
    pairing.add_argument("--setup-code", required=True, metavar="CODE", help="e.g. 1234-5678")
    pairing.add_argument("--out", metavar="FILE", help="write the result (JSON) to FILE")
    pairing.set_defaults(func=_pair)
    authority_cli.add_commands(provision)
    enroll_cli.add_commands(provision)
