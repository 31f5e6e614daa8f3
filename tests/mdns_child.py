"""mDNS in a child process, for tests that run it inside a private network namespace.

The test process itself never does multicast: it starts this module under
``unshare -n`` (or ``ip netns exec`` / ``nsenter``) and follows its output
lines, without sleeping:

- ``advertise --id ID --port N --fp PIN --interface ADDR [--building B] [--state S]``
  runs an :class:`agent.discovery.Advertiser`; prints ``ready NAME`` once
  announced, then reads states from stdin, one a line, answering ``state S
  changed`` / ``state S unchanged`` / ``error ...``; on EOF it withdraws the
  service (goodbyes), prints ``closed`` and exits 0. ``--raw-txt KEY=VALUE``
  (repeatable) advertises that TXT verbatim instead, bypassing validation (a
  malformed agent on the LAN).
- ``browse --interface ADDR [--timeout S]`` prints the JSON list that
  :func:`agent.discovery.discover` returns.
- ``watch --interface ADDR [--max-s S]`` prints ``added NAME`` / ``updated NAME``
  / ``removed NAME`` as a browser sees them, after ``watching``; exits on stdin
  EOF or after ``--max-s``.

A :class:`agent.discovery.DiscoveryError` is printed as ``error: ...`` on
stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys

from zeroconf import DNSQuestionType, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from agent import discovery
from agent.discovery import SERVICE_TYPE, Advertiser, DiscoveryError


def say(line: str) -> None:
    print(line, flush=True)


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=4096)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def advertise(args: argparse.Namespace) -> None:
    if args.raw_txt:
        await advertise_raw(args)
        return
    advertiser = Advertiser(
        args.id,
        args.building,
        args.port,
        args.fp,
        interfaces=args.interface,
        state=args.state,
        hostname=args.hostname,
    )
    await advertiser.start()
    try:
        say(f"ready {advertiser.name}")
        reader = await stdin_lines()
        for _ in range(1000):
            line = await reader.readline()
            if not line:
                break
            state = line.decode().strip()
            try:
                changed = await advertiser.set_state(state)
            except DiscoveryError as exc:
                say(f"error {exc}")
                continue
            say(f"state {state} {'changed' if changed else 'unchanged'}")
    finally:
        await advertiser.close()
    say("closed")


async def advertise_raw(args: argparse.Namespace) -> None:
    properties: dict[bytes, bytes | None] = {}
    for item in args.raw_txt:
        key, sep, value = item.encode().partition(b"=")
        properties[key] = value if sep else None
    addresses = discovery._check_interfaces(args.interface)
    aiozc = await discovery._start_zeroconf(addresses)
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{args.id}.{SERVICE_TYPE}",
        port=args.port,
        properties=properties,
        server=f"{args.id}.local.",
        addresses=addresses,
    )
    try:
        await (await aiozc.async_register_service(info, allow_name_change=True))
        say(f"ready {info.name}")
        reader = await stdin_lines()
        while await reader.readline():
            pass
        await (await aiozc.async_unregister_service(info))
    finally:
        await aiozc.async_close()
    say("closed")


async def browse(args: argparse.Namespace) -> None:
    found = await discovery.discover(interfaces=args.interface, timeout_s=args.timeout)
    say(json.dumps([dataclasses.asdict(d) for d in found]))


async def watch(args: argparse.Namespace) -> None:
    aiozc = await discovery._start_zeroconf(discovery._check_interfaces(args.interface))

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        say(f"{state_change.name.lower()} {name}")

    try:
        browser = AsyncServiceBrowser(
            aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change], question_type=DNSQuestionType.QM
        )
        say("watching")
        reader = await stdin_lines()
        try:
            async with asyncio.timeout(args.max_s):
                while await reader.readline():
                    pass
        except TimeoutError:
            pass
        await browser.async_cancel()
    finally:
        await aiozc.async_close()


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    adv = sub.add_parser("advertise")
    adv.add_argument("--id", required=True)
    adv.add_argument("--building", default="")
    adv.add_argument("--port", type=int, required=True)
    adv.add_argument("--fp", default="sha256:" + "ab" * 32)
    adv.add_argument("--state", default="armed")
    adv.add_argument("--hostname", default=None)
    adv.add_argument("--raw-txt", action="append", default=[])
    for p in (adv, sub.add_parser("browse"), sub.add_parser("watch")):
        p.add_argument("--interface", action="append", required=True)
        p.add_argument("--timeout", type=float, default=1.5)
        p.add_argument("--max-s", type=float, default=20.0)
    args = parser.parse_args()
    level = logging.DEBUG if os.environ.get("MDNS_CHILD_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("zeroconf").setLevel(level)
    run = {"advertise": advertise, "browse": browse, "watch": watch}[args.mode]
    try:
        asyncio.run(run(args))
    except DiscoveryError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
