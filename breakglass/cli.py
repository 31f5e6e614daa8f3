"""``breakglass``: one command for every role (see ``breakglass --help``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from provisioning.errors import ProvisioningError
from receiver.errors import ReceiverError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


async def until_signalled(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main(stop)``; SIGINT and SIGTERM set ``stop`` for a clean shutdown."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await main(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _agent_run(args: argparse.Namespace) -> int:
    from agent.boot import load_agent_config, run_agent
    from agent.sdnotify import Notifier, watchdog

    load_agent_config(args.config)  # a configuration error stops it here, clearly
    notifier = Notifier.from_environ(unset_environment=True)  # systemd Type=notify

    async def main(stop: asyncio.Event) -> int:
        running: list[Any] = []  # the runtime now running: Agent or FirstBoot

        def started(runtime: Any) -> None:
            running[:] = [runtime]
            notifier.ready(f"{runtime.config.device_id}: {runtime.status()['state']}")

        async def stopping() -> None:
            await stop.wait()
            notifier.stopping("stopping: sealing open segments")

        tasks = [
            asyncio.create_task(
                watchdog(notifier, lambda: all(r.alive() for r in running)),
                name="systemd-watchdog",
            ),
            asyncio.create_task(stopping(), name="systemd-stopping"),
        ]
        try:
            await run_agent(args.config, stop, on_start=started)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            notifier.close()
        return 0

    return asyncio.run(until_signalled(main))


def _receiver_serve(args: argparse.Namespace) -> int:
    from provisioning.keys import foreign_owner
    from receiver.limits import ServerLimits
    from receiver.server import Receiver

    if (owner := foreign_owner(args.data)) is not None:
        raise ValueError(
            f"--data {args.data} belongs to {owner}: run the receiver as {owner} "
            f"(sudo -u {owner} ...); files it made as another user would lock the service "
            "out of them"
        )

    defaults = ServerLimits()
    connections = args.max_connections
    per_address = args.max_per_address or min(defaults.max_per_address, connections)
    if per_address > connections:
        raise ValueError(
            f"--max-per-address {per_address} is more than --max-connections {connections}"
        )
    limits = ServerLimits(max_connections=connections, max_per_address=per_address)
    from receiver.retention import KeepPolicy

    keep = KeepPolicy(shares_s=args.keep_shares_days, emergencies_s=args.keep_emergencies_days)
    notify_url = args.notify_url
    if args.notify_url_file is not None:
        notify_url = _read_notify_url(args.notify_url_file)

    async def main(stop: asyncio.Event) -> int:
        async with Receiver(
            args.data,
            args.host,
            args.port,
            offline_after_s=args.offline_after,
            notify_url=notify_url,
            notify_pin=args.notify_pin,
            limits=limits,
            keep=keep,
        ) as rx:
            print(f"receiver: {rx.url}  uplink: {rx.uplink_url}")
            print(f"TLS pin (put it in each agent's [receiver] tls_pin): {rx.fingerprint}")
            print(f"allowed devices: {rx.devices_dir}/<device-id>.pub")
            print(f"age recipient (put it in each agent's [store] recipients): {rx.age_recipient}")
            print(f"offline alarm after {rx.presence.offline_after_s:g} s of silence")
            policy = rx.retention.policy
            for kind, keep_s in [
                ("shares", policy.shares_s),
                ("emergencies", policy.emergencies_s),
            ]:
                kept = (
                    "with no end"
                    if keep_s is None
                    else f"{keep_s / 86_400:g} days after they close"
                )
                print(f"recordings of {kind} kept {kept}")
            print(
                f"connections: at most {limits.connection_cap()} at once, "
                f"{limits.max_per_address} from one address"
            )
            if rx.dispatch is not None:
                public = rx.dispatch_key_path.with_suffix(".pub")
                print(
                    f"dispatch key {rx.dispatch.kid}: enroll {public} in the district's "
                    "trigger-key list with the role dispatch"
                )
            if rx.notifier is not None:
                from receiver.webhook import safe_url

                # Scheme, host and port: a path or query may hold the district's secret.
                print(f"district notified of emergencies at {safe_url(rx.notifier.url)}")
            from provisioning.keys import kid
            from receiver.evidence_format import evidence_key

            signer = await asyncio.to_thread(evidence_key, args.data)
            print(
                f"evidence key {kid(signer.public_key())} signs bundles and district notices "
                f"(breakglass evidence key --data {args.data} --out receiver-evidence.pub)"
            )
            count = await asyncio.to_thread(rx.accounts.count)
            if count:
                print(
                    f"police accounts: {count} (breakglass receiver user list --data {args.data})"
                )
            else:
                print(
                    "police accounts: none yet; nobody can log in until you add one, as "
                    f"this user: breakglass receiver user add NAME --role officer --data "
                    f"{args.data}"
                )
            await stop.wait()
        return 0

    return asyncio.run(until_signalled(main))


def _read_notify_url(path: Path) -> str:
    """``--notify-url-file``: the one line of a small file only its owner can read."""
    from provisioning.keys import read_secret

    data = read_secret(path, "--notify-url-file")
    try:
        lines = data.decode("utf-8").split()
    except UnicodeDecodeError:
        raise ValueError(f"--notify-url-file {path}: not UTF-8 text") from None
    if len(lines) != 1:
        raise ValueError(f"--notify-url-file {path}: expected one URL, found {len(lines)} words")
    return lines[0]


def _offline_after(text: str) -> float:
    """``--offline-after``: seconds, checked as the receiver checks them."""
    from receiver.presence import validate_offline_after

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    try:
        return validate_offline_after(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("offline_after_s: ")) from None


def _keep_days(text: str) -> float | None:
    """``--keep-*-days``: days (fractions allowed), or ``forever``; seconds or None."""
    if text == "forever":
        return None
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected days or 'forever', got {text!r}") from None
    if not 0 < days <= 36_500:
        raise argparse.ArgumentTypeError(f"expected 0 < days <= 36500, got {text!r}")
    return days * 86_400


#: The most ``--max-connections`` or ``--max-per-address`` may say.
MAX_CONNECTIONS_FLAG = 1_000_000


def _connections(text: str) -> int:
    """``--max-connections``, ``--max-per-address``: a count of connections."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of connections, got {text!r}"
        ) from None
    if not 1 <= value <= MAX_CONNECTIONS_FLAG:
        raise argparse.ArgumentTypeError(
            f"expected 1 to {MAX_CONNECTIONS_FLAG} connections, got {value}"
        )
    return value


def _keys_new(args: argparse.Namespace) -> int:
    from provisioning.keys import kid, new_private_key, public_pem

    if args.out.exists():
        print(f"error: {args.out} exists; refusing to overwrite a key", file=sys.stderr)
        return 2
    key = new_private_key(args.out)
    pub = args.out.with_suffix(".pub")
    pub.write_bytes(public_pem(key.public_key()))
    print(f"private key {args.out} (mode 0600), public key {pub}, kid {kid(key.public_key())}")
    return 0


def _keys_age(args: argparse.Namespace) -> int:
    from provisioning.age_keys import new_identity, recipient_of

    if args.out.exists():
        print(f"error: {args.out} exists; refusing to overwrite a key", file=sys.stderr)
        return 2
    identity = new_identity(args.out)
    print(f"age identity {args.out} (mode 0600); recipient: {recipient_of(identity)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from breakglass.demo import run_demo

    return asyncio.run(
        until_signalled(lambda stop: run_demo(args.data, args.run_for, args.port, stop))
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from breakglass import accounts_cli

    parser = argparse.ArgumentParser(
        prog="breakglass", description="Emergency-only camera access for schools."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="receiver + one agent with two synthetic cameras on 127.0.0.1"
    )
    demo.add_argument("--data", type=Path, default=None, help="data folder (default: a fresh one)")
    demo.add_argument(
        "--for",
        dest="run_for",
        type=float,
        default=None,
        metavar="N",
        help="run N seconds non-interactively, press the button, check, exit",
    )
    demo.add_argument("--port", type=int, default=0, help="receiver port (default: any free one)")
    demo.set_defaults(func=_demo)

    agent = sub.add_parser("agent", help="the building agent").add_subparsers(
        dest="action", required=True
    )
    run = agent.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path, required=True)
    run.set_defaults(func=_agent_run)

    receiver = sub.add_parser("receiver", help="the police receiver").add_subparsers(
        dest="action", required=True
    )
    serve = receiver.add_parser("serve", help="serve the uplink and the viewer over TLS")
    serve.add_argument("--data", type=Path, required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8443)
    serve.add_argument(
        "--offline-after",
        type=_offline_after,
        default=300.0,
        metavar="SECONDS",
        help="raise a device's offline alarm after this long without a message (default 300)",
    )
    notify = serve.add_mutually_exclusive_group()
    notify.add_argument(
        "--notify-url",
        metavar="https://...",
        help="the district's webhook: told of every emergency's start and end (signed)",
    )
    notify.add_argument(
        "--notify-url-file",
        type=Path,
        metavar="FILE",
        help="the webhook's URL read from FILE (mode 0600): a URL holding the district's "
        "secret stays out of the process list",
    )
    serve.add_argument(
        "--notify-pin",
        metavar="sha256:HEX",
        help="pin the webhook's TLS certificate instead of trusting the system's CAs",
    )
    serve.add_argument(
        "--max-connections",
        type=_connections,
        default=2048,
        metavar="N",
        help="client connections at once, devices and browsers (default 2048; at most half "
        "the process's open-file limit)",
    )
    serve.add_argument(
        "--max-per-address",
        type=_connections,
        metavar="N",
        help="connections from one IP address (default 256, or --max-connections if "
        "less): raise it when many schools "
        "reach the receiver through one NAT address",
    )
    serve.add_argument(
        "--keep-shares-days",
        type=_keep_days,
        default="30",
        metavar="DAYS|forever",
        help="delete a closed exterior-share recording this long after it closed (default 30)",
    )
    serve.add_argument(
        "--keep-emergencies-days",
        type=_keep_days,
        default="forever",
        metavar="DAYS|forever",
        help="delete a closed emergency's recording (and its exported bundles) this long "
        "after it closed (default: forever; set it to the agency's records-retention "
        "schedule)",
    )
    serve.set_defaults(func=_receiver_serve)
    accounts_cli.add_parser(receiver)

    keys = sub.add_parser(
        "keys", help="key files (Ed25519 signing keys, age identities)"
    ).add_subparsers(dest="action", required=True)
    new = keys.add_parser("new", help="generate a key pair (private key mode 0600)")
    new.add_argument("--out", type=Path, required=True)
    new.set_defaults(func=_keys_new)
    age = keys.add_parser(
        "age", help="generate an age identity (the district's: opens sealed footage)"
    )
    age.add_argument("--out", type=Path, required=True)
    age.set_defaults(func=_keys_age)

    from breakglass import audit_cli, provision_cli, trigger_cli
    from breakglass.evidence_cli import add_parser as add_evidence_commands
    from breakglass.footage_cli import add_footage_commands

    add_footage_commands(sub)
    trigger_cli.add_parser(sub)
    audit_cli.add_parser(sub)
    provision_cli.add_parser(sub)
    add_evidence_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``breakglass`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        result: int = args.func(args)
    except (AgentError, ProvisioningError, ReceiverError, ValueError) as exc:
        print(f"breakglass: error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
