"""deploy/systemd and docs/INSTALL-PI.md, checked against the real code.

The units' ExecStart lines and every ``breakglass`` command in the install
guide go through the real argument parser; the guide's config snippet goes
through the real config validator; ``systemd-analyze`` checks the units where
the machine has it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyrage
import pytest

from agent.config import parse_config
from breakglass import cli

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
AGENT_UNIT = UNITS / "breakglass-agent.service"
RECEIVER_UNIT = UNITS / "breakglass-receiver.service"
GUIDE = ROOT / "docs" / "INSTALL-PI.md"
EXAMPLE = ROOT / "docs" / "agent.example.toml"
VENV_BIN = "/opt/breakglass/bin/breakglass"
RECIPIENT = str(pyrage.x25519.Identity.generate().to_public())

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """A systemd unit file as section -> [(key, value)], in order (keys may repeat)."""
    sections: Unit = {}
    current: str | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            assert current not in sections, f"line {number}: section [{current}] twice"
            sections[current] = []
            continue
        key, eq, value = line.partition("=")
        assert eq and current is not None, f"line {number}: not KEY=VALUE in a section: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every assignment of ``key``; an empty one resets the list, as systemd does."""
    out: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            out = [] if v == "" else [*out, v]
    return out


def one(unit: Unit, section: str, key: str) -> str:
    """The single value of a setting that must be set exactly once."""
    found = [v for k, v in unit.get(section, []) if k == key]
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times: {found}"
    return found[0]


def environment(unit: Unit) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in values(unit, "Service", "Environment"):
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def agent_unit() -> Unit:
    return parse_unit(AGENT_UNIT.read_text())


@pytest.fixture(scope="module")
def receiver_unit() -> Unit:
    return parse_unit(RECEIVER_UNIT.read_text())


def parse_command(argv: list[str]) -> Any:
    """``breakglass ARGS`` through the real parser; a rejected command fails the test."""
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse prints why on stderr
        pytest.fail(f"breakglass rejects {shlex.join(argv)} (exit {exc.code})")


# -- the units -------------------------------------------------------------------


@pytest.mark.parametrize("path", [AGENT_UNIT, RECEIVER_UNIT], ids=lambda p: p.name)
def test_both_units_restart_forever_and_install_for_boot(path: Path) -> None:
    unit = parse_unit(path.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Service", "Restart") == "always"
    assert float(one(unit, "Service", "RestartSec")) > 0
    assert one(unit, "Unit", "StartLimitIntervalSec") == "0"  # never given up on
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert environment(unit)["PYTHONUNBUFFERED"] == "1"  # print() reaches the journal at once
    for setting in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables"):
        assert one(unit, "Service", setting) == "yes", setting
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert values(unit, "Service", "CapabilityBoundingSet") == []  # none at all
    state = PurePosixPath("/var/lib") / one(unit, "Service", "StateDirectory")
    assert str(state) in values(unit, "Service", "ReadWritePaths")
    assert one(unit, "Unit", "RequiresMountsFor") == str(state)


def test_the_agent_unit_runs_the_real_agent_command(agent_unit: Unit) -> None:
    argv = shlex.split(one(agent_unit, "Service", "ExecStart"))
    assert argv[0] == VENV_BIN
    args = parse_command(argv[1:])
    assert args.func is cli._agent_run
    assert args.config == Path("/etc/breakglass/agent.toml")
    config_dir = PurePosixPath("/etc") / one(agent_unit, "Service", "ConfigurationDirectory")
    assert PurePosixPath(args.config).parent == config_dir


def test_the_receiver_unit_runs_the_real_receiver_command(receiver_unit: Unit) -> None:
    argv = shlex.split(one(receiver_unit, "Service", "ExecStart"))
    assert argv[0] == VENV_BIN
    args = parse_command(argv[1:])
    assert args.func is cli._receiver_serve
    state = PurePosixPath("/var/lib") / one(receiver_unit, "Service", "StateDirectory")
    assert PurePosixPath(args.data) == state  # the data folder is the one systemd makes
    assert (args.host, args.port) == ("0.0.0.0", 8443)
    assert one(receiver_unit, "Service", "WorkingDirectory") == str(state)


def test_the_agent_unit_notifies_has_a_watchdog_and_reaches_only_its_devices(
    agent_unit: Unit,
) -> None:
    service = "Service"
    assert one(agent_unit, service, "Type") == "notify"
    assert one(agent_unit, service, "NotifyAccess") == "main"
    assert one(agent_unit, service, "WatchdogSec") == "30"
    assert one(agent_unit, service, "User") == "breakglass"
    assert set(one(agent_unit, service, "SupplementaryGroups").split()) == {"gpio", "video"}
    # The cameras and GPIO must stay visible: no PrivateDevices, a closed device policy
    # that allows exactly the classes picamera2 (libcamera) and lgpio open.
    assert values(agent_unit, service, "PrivateDevices") in ([], ["no"])
    assert one(agent_unit, service, "DevicePolicy") == "closed"
    assert sorted(values(agent_unit, service, "DeviceAllow")) == [
        "char-dma_heap rw",
        "char-gpiochip rw",
        "char-media rw",
        "char-video4linux rw",
    ]
    assert one(agent_unit, service, "RestrictAddressFamilies").split() == [
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    ]
    # lgpio makes its notification pipes in $LG_WD and opens them from the working
    # directory: both must be the writable runtime folder.
    runtime = str(PurePosixPath("/run") / one(agent_unit, service, "RuntimeDirectory"))
    assert one(agent_unit, service, "WorkingDirectory") == runtime
    assert environment(agent_unit)["LG_WD"] == runtime


def test_the_receiver_unit_has_no_devices_and_no_privilege(receiver_unit: Unit) -> None:
    service = "Service"
    assert one(receiver_unit, service, "Type") == "exec"
    assert one(receiver_unit, service, "User") == "breakglass-receiver"
    assert values(receiver_unit, service, "SupplementaryGroups") == []
    for setting in ("PrivateDevices", "PrivateUsers", "MemoryDenyWriteExecute"):
        assert one(receiver_unit, service, setting) == "yes", setting
    assert values(receiver_unit, service, "DeviceAllow") == []
    assert one(receiver_unit, service, "RestrictAddressFamilies").split() == [
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
    ]


@pytest.fixture
def runnable_units(tmp_path: Path) -> list[Path]:
    """Copies of the units whose ExecStart names an executable that exists here.

    ``systemd-analyze verify`` refuses a unit whose program is missing, and
    /opt/breakglass is the Pi's venv, not this machine's.
    """
    here = Path(sys.executable).parent / "breakglass"
    if not os.access(here, os.X_OK):
        here = tmp_path / "breakglass"
        here.write_text("#!/bin/sh\nexit 0\n")
        here.chmod(0o755)
    out = []
    for unit in (AGENT_UNIT, RECEIVER_UNIT):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(VENV_BIN, str(here)))
        out.append(copy)
    return out


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed on this machine"
)


@needs_systemd_analyze
def test_systemd_analyze_verify_finds_nothing(runnable_units: list[Path]) -> None:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, runnable_units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys and bad values: its warnings name the unit.
    ours = [line for line in done.stderr.splitlines() if "breakglass-" in line]
    assert done.returncode == 0 and not ours, done.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("index", [0, 1], ids=["agent", "receiver"])
def test_systemd_analyze_security_rates_the_units_well_exposed_at_most_2(
    runnable_units: list[Path], index: int
) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = runnable_units[index]
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout + done.stderr)
    if found is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {done.stderr[:200]}")
    assert float(found.group(1)) <= 2.0, done.stdout


# -- the install guide ----------------------------------------------------------------


def _fenced_after(text: str, marker: str) -> str:
    """The body of the first fenced block after the line holding ``marker``."""
    start = text.index(marker)
    found = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL).search(text, start)
    assert found is not None, f"no fenced block after {marker}"
    return found.group(1)


def _guide_snippet() -> dict[str, Any]:
    return tomllib.loads(
        _fenced_after(GUIDE.read_text(), "test_deploy.py::test_the_guides_config_fits_the_unit")
    )


def _guide_config() -> dict[str, Any]:
    """docs/agent.example.toml with the guide's settings laid over it, keys filled in."""
    guide = _guide_snippet()
    doc = tomllib.loads(EXAMPLE.read_text())
    for table, settings in guide.items():
        doc.setdefault(table, {}).update(settings)
    doc["store"]["recipients"] = [RECIPIENT]
    return doc


def test_the_guides_config_fits_the_unit(agent_unit: Unit) -> None:
    """What the guide says to set is valid, and lands where the unit lets the agent write."""
    config_dir = Path("/etc") / one(agent_unit, "Service", "ConfigurationDirectory")
    cfg = parse_config(_guide_config(), config_dir / "agent.toml")
    writable = [Path(p) for p in values(agent_unit, "Service", "ReadWritePaths")]
    # The agent writes its state and store, and makes its key on first boot (agent/boot.py).
    for path in (cfg.state_dir, cfg.store.directory, cfg.device_key):
        assert any(path.is_relative_to(w) for w in writable), path
    assert cfg.trust.authority is not None and cfg.trust.authority.parent == config_dir
    assert cfg.pin_factory == "lgpio"  # the factory the unit's devices and LG_WD are for
    guide = GUIDE.read_text()
    # The paths the guide names are the ones this config gives.
    assert f"{cfg.state_dir}/setup-code" in guide  # agent/local_api.py: state_dir / "setup-code"
    assert f"port = {cfg.local_api.port}" in guide and f"tcp dport {cfg.local_api.port}" in guide
    assert f"{cfg.local_api.pairing_window_s:.0f} s" in guide
    # The snippet alone is a device waiting for its enrollment (agent/boot.py: first boot).
    first = parse_config(_guide_snippet(), config_dir / "agent.toml", provisioned=False)
    assert (first.state_dir, first.device_key) == (cfg.state_dir, cfg.device_key)


def _shell_commands(text: str) -> Iterator[list[str]]:
    """Each simple command in the guide's ``sh`` blocks, as argv (pipes and && split)."""
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            command: list[str] = []
            for token in lexer:
                if token in ("|", "&&", ";", "||", ">", ">>"):
                    if command:
                        yield command
                    command = []
                else:
                    command.append(token)
            if command:
                yield command


def _strip_sudo(argv: list[str]) -> list[str]:
    if argv[:1] == ["sudo"]:
        argv = argv[1:]
        if argv[:1] == ["-u"]:
            argv = argv[2:]
    return argv


def test_every_command_in_the_guide_is_one_the_code_accepts() -> None:
    breakglass = python_c = units = installs = 0
    unit_names = {p.stem for p in UNITS.glob("*.service")}
    for raw in _shell_commands(GUIDE.read_text()):
        argv = _strip_sudo(raw)
        name = PurePosixPath(argv[0]).name
        if name == "breakglass":
            if argv[0] != "breakglass":  # on the Pi: the venv's, the one the unit runs
                assert argv[0] == VENV_BIN
            parse_command(argv[1:])
            breakglass += 1
        elif name == "python" and argv[1:2] == ["-c"]:
            assert argv[0] == "/opt/breakglass/bin/python"
            compile(argv[2], "<INSTALL-PI.md>", "exec")
            python_c += 1
        elif name in ("systemctl", "journalctl"):
            named = [a for a in argv if a.startswith("breakglass")]
            assert all(a in unit_names for a in named), argv
            units += len(named)
        elif name == "install" and any(a.endswith(".service") for a in argv):
            source = next(a for a in argv if a.endswith(".service"))
            assert (ROOT / source.removeprefix("/usr/local/src/breakglass/")).is_file(), source
            installs += 1
        elif name == "pip":
            assert argv[0] == "/opt/breakglass/bin/pip"
    assert breakglass >= 4 and python_c >= 1 and units >= 5 and installs == 2


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def test_the_guide_documents_every_receiver_flag() -> None:
    """The receiver takes no config file: the guide documents its flags and defaults."""
    serve = _subparser(cli.build_parser(), "receiver", "serve")
    options = [a for a in serve._actions if a.option_strings and a.dest != "help"]
    assert {"--data", "--host", "--port"} <= {o for a in options for o in a.option_strings}
    table = GUIDE.read_text().split("## The receiver", 1)[1]
    for action in options:
        row = next(
            line for line in table.splitlines() if line.startswith(f"| `{action.option_strings[0]}")
        )
        wanted = "(required)" if action.required else f"`{action.default}`"
        assert wanted in row, row
    assert not (ROOT / "docs" / "receiver.example.toml").exists()


def test_the_guides_firewall_parses(tmp_path: Path) -> None:
    nft = shutil.which("nft")
    if nft is None:
        pytest.skip("nft (Debian package nftables) is not installed on this machine")
    rules = tmp_path / "nftables.conf"
    rules.write_text(
        _fenced_after(GUIDE.read_text(), "test_deploy.py::test_the_guides_firewall_parses")
    )
    done = subprocess.run(
        [nft, "-c", "-f", str(rules)], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        pytest.skip(f"nft -c needs CAP_NET_ADMIN here: {done.stderr[:200]}")
    assert done.returncode == 0, done.stderr
