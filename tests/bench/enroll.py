"""Benchmark ``enroll``: first-boot agents to armed through ``provision enroll --plan``.

Issue #5's figure ``discover_to_enrolled_s``: wall seconds for the
technician's ``breakglass provision enroll --plan plan.toml`` (its own mDNS
browse included) to enroll ``AGENTS`` unprovisioned agents (``SMOKE_AGENTS``
with ``--smoke``), each a real ``breakglass agent run`` process with one
synthetic camera, until the CLI exits 0: every device paired, certified,
enrolled and back armed with its enrollment. The peer, measured in the same
run: ``mdns_discover_s``, one ``breakglass provision discover --json`` (the
same browse window) listing all of them.

Everything runs in a private network namespace this benchmark makes (one
child, ``unshare -n``, loopback only; :mod:`tests.bench.enroll_child` has the
method): the agents' mDNS and the technician's browse never reach a real
interface. Where ``unshare -n`` is not permitted, the benchmark raises
:class:`NoNetworkNamespace` (it could not run).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from tests.bench.common import Figure, child, figure, make_temp_dir

BENCH = "enroll"
AGENTS = 10
SMOKE_AGENTS = 2
#: Local API ports of the agents: PORT_BASE + i, inside the namespace (nothing else there).
PORT_BASE = 9400
#: Bound of the whole run inside the namespace (agents' start, two browses, enroll, checks).
RUN_S = 600.0
SMOKE_RUN_S = 120.0

log = logging.getLogger("bench.enroll")


class NoNetworkNamespace(RuntimeError):
    """``unshare -n`` is not permitted here: the benchmark cannot run."""


def check_unshare() -> None:
    """Raise :class:`NoNetworkNamespace` (with the reason) if ``unshare -n`` fails here."""
    try:
        done = subprocess.run(
            ["unshare", "-n", "sh", "-c", "ip link set lo up"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NoNetworkNamespace(f"cannot create a network namespace (unshare -n): {exc}") from exc
    if done.returncode != 0:
        raise NoNetworkNamespace(
            f"cannot create a network namespace (unshare -n): {done.stderr.strip()!r}"
        )


async def run(smoke: bool) -> list[Figure]:
    """``discover_to_enrolled_s`` for 10 agents (2 with ``smoke``) against ``mdns_discover_s``."""
    check_unshare()
    n = SMOKE_AGENTS if smoke else AGENTS
    with make_temp_dir("enroll") as tmp:
        argv = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
        argv += [sys.executable, "-m", "tests.bench.enroll_child", "--agents", str(n)]
        argv += ["--work", tmp, "--port-base", str(PORT_BASE)]
        async with child("netns", argv, grace_s=60) as ns:
            code = await ns.wait_exit(SMOKE_RUN_S if smoke else RUN_S)
        if code != 0:
            raise RuntimeError(f"the enroll run in its namespace failed (exit {code}); see above")
        measured: dict[str, float] = {}
        for line in ns.lines:
            record = json.loads(line)
            if record.get("agents") != n:
                raise RuntimeError(f"measured {record} for the wrong number of agents")
            measured[record["measure"]] = float(record["value"])
        missing = {"discover_s", "discover_to_enrolled_s"} - set(measured)
        if missing:
            raise RuntimeError(f"the namespace run measured no {', '.join(sorted(missing))}")
        if not Path(tmp, "plan.toml").exists():
            raise RuntimeError("the namespace run wrote no plan")
    log.info(
        "%d agents: enroll --plan %.2f s, one mDNS browse %.2f s",
        n,
        measured["discover_to_enrolled_s"],
        measured["discover_s"],
    )
    return [
        figure(
            BENCH,
            "discover_to_enrolled_s",
            measured["discover_to_enrolled_s"],
            "s",
            "mdns_discover_s",
            measured["discover_s"],
        )
    ]
