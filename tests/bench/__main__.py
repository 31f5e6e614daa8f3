"""``python -m tests.bench [NAME ...] [--smoke]``: run benchmarks, print figures.

Each figure is one JSON object on one line of stdout: ``bench``, ``figure``,
``value``, ``unit``, ``peer``, ``peer_value``, ``ratio`` (value / peer). Logs
go to stderr. Benchmarks report; they never judge a time. The exit code is
non-zero only if a benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable

from tests.bench import agent_cpu, backfill, enroll, glass, ingest, store, trigger, triggers
from tests.bench.common import Figure

BENCHMARKS: dict[str, Callable[[bool], Awaitable[list[Figure]]]] = {
    "trigger": trigger.run,
    "agent_cpu": agent_cpu.run,
    "store": store.run,
    "backfill": backfill.run,
    "triggers": triggers.run,
    "enroll": enroll.run,
    "receiver_ingest": ingest.run,
    "glass": glass.run,
}

log = logging.getLogger("bench")


async def run_all(names: list[str], smoke: bool) -> int:
    """Run the named benchmarks in order; print each figure as soon as it is known."""
    failed = 0
    for name in names:
        started = time.monotonic()
        log.info("benchmark %s%s: starting", name, " (smoke)" if smoke else "")
        try:
            figures = await BENCHMARKS[name](smoke)
        except Exception:
            log.exception("benchmark %s failed", name)
            failed += 1
            continue
        for fig in figures:
            print(json.dumps(fig), flush=True)
        log.info("benchmark %s: done in %.1f s", name, time.monotonic() - started)
    return 1 if failed else 0


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHMARKS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny counts and durations (CI)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return asyncio.run(run_all(args.names or list(BENCHMARKS), args.smoke))


if __name__ == "__main__":
    sys.exit(main())
