"""The ``enroll`` benchmark's work, run inside a private network namespace.

``python -m tests.bench.enroll_child --agents N --work DIR --port-base P``
is started by :mod:`tests.bench.enroll` as ``unshare -n sh -c 'ip link set lo
up && exec python -m tests.bench.enroll_child ...'``: everything below (the
receiver, the agents, mDNS, the technician's CLI) runs in that namespace,
whose only interface is its own loopback, and is gone with it.

1. The district: ``breakglass provision authority init`` and ``breakglass
   keys age`` (its age identity); the receiver (``breakglass receiver
   serve``, any free port on 127.0.0.1) trusts the authority
   (``DATA/authority.pub``) and has no allow-list entry for any device.
2. ``N`` devices as they come out of the box: ``breakglass agent run
   --config`` with only ``[device]``, ``[local_api]`` (port ``P + i`` on
   127.0.0.1), ``[discovery]`` (127.0.0.1), ``[store]``, ``[gpio]`` (mock)
   and a button. Each makes its key, prints its setup code and is waited for
   until it advertises itself (``mDNS: advertising ...`` in its log).
3. ``discover_s``: ``breakglass provision discover --json --interface
   127.0.0.1 --timeout DISCOVER_S`` (the browse window ``provision enroll``
   itself uses), wall time to its exit; it must list all ``N`` unprovisioned
   agents on their ports. Device ids come from there (and must match each
   agent's own log line).
4. ``discover_to_enrolled_s``: the plan (authority, receiver URL and pin,
   the district's and the receiver's age recipients, one synthetic camera
   per device) is written and ``breakglass provision enroll --plan`` is timed
   from its start to its exit 0: every device found (its one mDNS browse),
   paired, certified, enrolled and back armed with the enrollment.
5. Checks, after the clock: every agent's ``GET /v1/status`` (pinned to the
   fingerprint mDNS gave) says provisioned, enrollment v1, the building,
   its camera, idle, and its uplink connected (the receiver accepted the
   device on its certificate alone), within a bounded wait; a second browse
   shows every device ``st=armed``. Any failure: exit 1, after printing the
   tail of each process's output on stderr.

stdout carries only JSON lines, one per measurement: ``{"measure": NAME,
"value": SECONDS, ...}``. Every child is stopped by its PID on the way out
(SIGTERM from the benchmark also ends this cleanly).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from breakglass.enroll_cli import DISCOVER_S
from provisioning.keys import kid, load_private_key
from provisioning.pairing import normalise_code
from provisioning.tls import fingerprint_digest
from tests.bench.common import Child, child, receiver_process

log = logging.getLogger("bench.enroll_child")

BUILDING = "lincoln-elementary"
PY = sys.executable
#: Bounds (seconds) of every wait; generous: ten agents start on two cores.
START_S = 120.0
CLI_S = 30.0
ENROLL_S = 300.0
UPLINK_S = 60.0
#: Lines of each agent's log shown when the run fails.
TAIL_LINES = 40

_CODE_RE = re.compile(r"setup code (\d{4}-\d{4})")
_DEVICE_RE = re.compile(r"device (\S+) is unprovisioned")
_ADVERTISING_RE = re.compile(
    r"mDNS: advertising \S+ on 127\.0\.0\.1 port (\d+) \(st=unprovisioned\)"
)
_RECIPIENT_RE = re.compile(r"recipient: (age1[0-9a-z]+)")

FIRST_BOOT = """# what every SD card carries: no building, receiver or cameras
[device]
key = "device.key"
state_dir = "state"

[local_api]
host = "127.0.0.1"
port = {port}

[discovery]
interfaces = ["127.0.0.1"]

[store]
dir = "store"

[gpio]
pin_factory = "mock"

[[buttons]]
id = "office"
pin = 17
location = "Main office"
"""


def say(measure: str, value: float, **extra: Any) -> None:
    """One measurement on stdout (the benchmark reads these)."""
    print(json.dumps({"measure": measure, "value": value, **extra}), flush=True)


def merged(argv: list[str]) -> list[str]:
    """``argv`` with its stderr on its stdout (logs and the setup code in one stream).

    ``exec`` keeps the PID, so :func:`tests.bench.common.child` stops the program itself.
    """
    return ["sh", "-c", 'exec "$0" "$@" 2>&1', *argv]


def cli(*args: str) -> list[str]:
    return [PY, "-m", "breakglass", *args]


async def must(name: str, argv: list[str], timeout: float = CLI_S) -> list[str]:
    """Run a CLI to its end (bounded); its output lines (stderr merged); raise unless exit 0."""
    async with child(name, merged(argv)) as proc:
        code = await proc.wait_exit(timeout)
    # child() has read the last lines once the pipe closed (bounded).
    if code != 0:
        tail = "\n".join(proc.lines[-20:])
        raise RuntimeError(f"{name} exited {code}:\n{tail}")
    return proc.lines


class Agent:
    """One first-boot agent process and what it told us."""

    def __init__(self, index: int, folder: Path, port: int, proc: Child) -> None:
        self.index = index
        self.folder = folder
        self.port = port
        self.proc = proc
        self.device = ""
        self.code = ""
        self.fingerprint = ""

    async def wait_ready(self) -> None:
        """Until it printed its setup code and id and advertises itself (bounded)."""
        self.code = normalise_code((await self.proc.wait_line(_CODE_RE, START_S)).group(1))
        self.device = (await self.proc.wait_line(_DEVICE_RE, START_S)).group(1)
        port = int((await self.proc.wait_line(_ADVERTISING_RE, START_S)).group(1))
        if port != self.port:
            raise RuntimeError(f"agent {self.index} advertises port {port}, not {self.port}")
        on_file = normalise_code((self.folder / "state" / "setup-code").read_text())
        if on_file != self.code:
            raise RuntimeError(f"agent {self.index}: printed code differs from state/setup-code")
        key_id = kid(load_private_key(self.folder / "device.key").public_key())
        if self.device != f"bg-{key_id[:12]}":
            raise RuntimeError(f"agent {self.index}: id {self.device} is not bg- + its key id")


def write_agent(folder: Path, port: int) -> Path:
    folder.mkdir(parents=True)
    path = folder / "agent.toml"
    path.write_text(FIRST_BOOT.format(port=port))
    return path


async def discover(name: str) -> tuple[float, list[dict[str, Any]]]:
    """``provision discover --json``: wall seconds to its exit, and what it listed."""
    argv = cli("provision", "discover", "--json", "--interface", "127.0.0.1")
    argv += ["--timeout", f"{DISCOVER_S:g}"]
    # stdout alone (JSON); stderr is forwarded by child() with the name as prefix.
    t0 = time.perf_counter()
    async with child(name, argv) as proc:
        code = await proc.wait_exit(CLI_S)
        took = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{name} exited {code}: {proc.lines[-20:]}")
    found: list[dict[str, Any]] = json.loads("\n".join(proc.lines))
    return took, found


def plan_text(agents: list[Agent], uplink_url: str, pin: str, recipients: list[str]) -> str:
    q = json.dumps  # a TOML basic string is a JSON string for these values
    lines = [
        f"authority = {q('district/authority.key')}",
        f"receiver_url = {q(uplink_url)}",
        f"receiver_pin = {q(pin)}",
        f"recipients = [{', '.join(q(r) for r in recipients)}]",
        f"interface = {q('127.0.0.1')}",
    ]
    for a in agents:
        lines += [
            "",
            "[[devices]]",
            f"id = {q(a.device)}",
            f"setup_code = {q(a.code[:4] + '-' + a.code[4:])}",
            f"building = {q(BUILDING)}",
            f"cameras = [{q(f'cam-{a.index}=interior,synthetic')}]",
        ]
    return "\n".join(lines) + "\n"


async def check_armed(agents: list[Agent]) -> None:
    """Every agent enrolled (v1), idle, its camera listed, its uplink accepted (bounded)."""

    async def one(http: aiohttp.ClientSession, a: Agent) -> None:
        pin = aiohttp.Fingerprint(fingerprint_digest(a.fingerprint))
        url = f"https://127.0.0.1:{a.port}/v1/status"
        deadline = time.monotonic() + UPLINK_S
        status: dict[str, Any] = {}
        while True:
            try:
                async with http.get(url, ssl=pin) as response:
                    status = await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError, ssl.SSLError) as exc:
                status = {"error": repr(exc)}
            if status.get("uplink_connected") is True:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{a.device}: uplink not connected in {UPLINK_S:g} s: {status}")
            await asyncio.sleep(0.1)  # polling a separate process's status, bounded above
        expected = {
            "device": a.device,
            "building": BUILDING,
            "provisioned": True,
            "enrollment_version": 1,
            "state": "idle",
        }
        got = {k: status.get(k) for k in expected}
        cameras = [(c.get("id"), c.get("zone")) for c in status.get("cameras", [])]
        if got != expected or cameras != [(f"cam-{a.index}", "interior")]:
            raise RuntimeError(f"{a.device}: status {got}, cameras {cameras}; expected {expected}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        await asyncio.gather(*(one(http, a) for a in agents))


async def bench(n: int, work: Path, port_base: int) -> None:
    district = work / "district"
    await must("authority-init", cli("provision", "authority", "init", "--out", str(district)))
    age_out = await must("keys-age", cli("keys", "age", "--out", str(district / "age.key")))
    found_recipient = next((m for line in age_out if (m := _RECIPIENT_RE.search(line))), None)
    if found_recipient is None:
        raise RuntimeError(f"breakglass keys age printed no recipient: {age_out}")
    district_recipient = found_recipient.group(1)
    data = work / "receiver"
    data.mkdir()
    shutil.copy(district / "authority.pub", data / "authority.pub")

    async with contextlib.AsyncExitStack() as stack:
        rx = await stack.enter_async_context(receiver_process(data))
        agents: list[Agent] = []
        for i in range(n):
            folder = work / "agents" / f"a{i:02d}"
            port = port_base + i
            config = write_agent(folder, port)
            proc = await stack.enter_async_context(
                child(f"agent-{i:02d}", merged(cli("agent", "run", "--config", str(config))))
            )
            agents.append(Agent(i, folder, port, proc))
        try:
            t0 = time.perf_counter()
            await asyncio.gather(*(a.wait_ready() for a in agents))
            took = time.perf_counter() - t0
            log.info("%d agents unprovisioned and advertised in %.1f s", n, took)

            # -- the peer: one mDNS browse listing every unprovisioned agent --------------
            discover_s, found = await discover("discover")
            by_port = {a.port: a for a in agents}
            listed = {}
            for record in found:
                agent = by_port.get(record["port"])
                if agent is not None and record["state"] == "unprovisioned":
                    listed[agent.port] = record
            if len(listed) != n:
                missing = sorted(a.device for a in agents if a.port not in listed)
                raise RuntimeError(f"mDNS listed {len(listed)} of {n} agents; missing {missing}")
            for a in agents:
                record = listed[a.port]
                if record["device_id"] != a.device:
                    mdns_id = record["device_id"]
                    raise RuntimeError(f"port {a.port}: mDNS says {mdns_id}, its log {a.device}")
                a.fingerprint = record["fingerprint"]
            log.info("discover listed all %d unprovisioned agents in %.2f s", n, discover_s)
            say("discover_s", discover_s, agents=n)

            # -- the figure: provision enroll --plan, to every device armed ---------------
            plan = work / "plan.toml"
            recipients = [district_recipient, rx.age_recipient]
            plan.write_text(plan_text(agents, rx.uplink_url, rx.fingerprint, recipients))
            t0 = time.perf_counter()
            enroll = cli("provision", "enroll", "--plan", str(plan))
            async with child("enroll", merged(enroll)) as e:
                code = await e.wait_exit(ENROLL_S)
                enrolled_s = time.perf_counter() - t0
            for line in e.lines:
                log.info("enroll: %s", line)
            if code != 0:
                failed = [line for line in e.lines if "FAILED" in line]
                raise RuntimeError(f"provision enroll --plan exited {code}: {failed}")
            say("discover_to_enrolled_s", enrolled_s, agents=n)

            # -- checks (not timed) -------------------------------------------------------
            await check_armed(agents)
            _, after = await discover("discover-armed")
            states = {r["device_id"]: (r["state"], r["building"]) for r in after}
            wrong = {a.device: states.get(a.device) for a in agents}
            wrong = {k: v for k, v in wrong.items() if v != ("armed", BUILDING)}
            if wrong:
                raise RuntimeError(f"after enrollment, mDNS shows {wrong} (expected armed)")
            allowed = sorted(p.name for p in rx.devices_dir.glob("*.pub"))
            if allowed:
                raise RuntimeError(f"the receiver has allow-list entries {allowed}: not by cert")
            log.info("all %d agents armed, enrollment v1, uplink accepted by the receiver", n)
        except BaseException:
            for a in agents:  # what each agent said, without its access log
                said = [line for line in a.proc.lines if "aiohttp.access" not in line]
                tail = "\n".join(f"    {line}" for line in said[-TAIL_LINES:])
                sys.stderr.write(f"[agent-{a.index:02d} last lines]\n{tail}\n")
            raise
        finally:
            # Stop the agents together (each by its PID); the stack then reaps each one.
            for a in agents:
                if a.proc.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(a.proc.pid, signal.SIGTERM)


async def main_async(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # clean up the children on SIGTERM
    try:
        await bench(args.agents, args.work, args.port_base)
    except asyncio.CancelledError:
        log.error("stopped by SIGTERM")
        return 1
    except Exception:
        log.exception("the enroll benchmark could not run")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.enroll_child")
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--port-base", type=int, default=9400)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
