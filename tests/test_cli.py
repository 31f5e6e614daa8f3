"""The ``breakglass`` command as a user runs it: real processes, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Empty, Queue

import pyrage
import pytest

from breakglass.cli import build_parser
from breakglass.demo import write_agent_config
from receiver.limits import ServerLimits

pytestmark = pytest.mark.timeout(90)

CLI = [sys.executable, "-m", "breakglass"]


class Proc:
    """A child process whose merged output is read line by line on a thread."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: Queue[str] = Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)

    def expect(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first output line matching ``pattern`` (waits for it)."""
        regex = re.compile(pattern)
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except Empty:
                raise AssertionError(
                    f"no line matching {pattern!r}; saw:\n{''.join(self.seen)}"
                ) from None
            self.seen.append(line)
            match = regex.search(line)
            if match:
                return match

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=30)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def test_demo_for_n_seconds_exits_zero_with_a_summary(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "demo", "--for", "5", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"press -> first byte durable at the receiver: [\d.]+ ms", result.stdout)
    assert re.search(
        r"front-door +exterior +pre-roll +\d+ frames, live +\d+ frames: ", result.stdout
    )
    assert re.search(r"hallway-2 +interior", result.stdout)
    assert result.stdout.rstrip().endswith("OK") or "\nOK\n" in result.stdout
    login = re.search(
        r"log in as demo-dispatcher \(dispatcher\) with password (\S{20}) ", result.stdout
    )
    assert login, result.stdout
    password = login.group(1).encode()
    assert result.stdout.count(login.group(1)) == 1  # printed once
    for path in tmp_path.rglob("*"):  # and kept nowhere in clear
        assert not path.is_file() or password not in path.read_bytes(), path
    assert stat_mode(tmp_path / "receiver" / "accounts.sqlite") == 0o600
    assert stat_mode(tmp_path / "agent" / "device.key") == 0o600
    assert stat_mode(tmp_path / "receiver" / "tls" / "receiver.key") == 0o600
    # What the demo did as a person would is in the access log as theirs would be.
    access = [json.loads(line) for line in (tmp_path / "receiver" / "access.log").open()]
    did = [(e["action"], e.get("who")) for e in access]
    assert ("user_passwd", "local:demo") in did and ("dispatch", "demo-dispatcher") in did


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_receiver_and_agent_run_separately_and_stop_cleanly(
    tmp_path: Path, procs: list[Proc]
) -> None:
    receiver = Proc("receiver", "serve", "--data", str(tmp_path / "rx"), "--port", "0")
    procs.append(receiver)
    url = receiver.expect(r"receiver: (https://127\.0\.0\.1:\d+/)").group(1)
    pin = receiver.expect(r"TLS pin .*: (sha256:[0-9a-f]{64})").group(1)
    recipient = receiver.expect(r"age recipient .*: (age1[0-9a-z]+)").group(1)
    receiver.expect(r"police accounts: none yet; nobody can log in until you add one, as this")

    class Contact:
        uplink_url = url.replace("https://", "wss://") + "v1/uplink"
        fingerprint = pin
        devices_dir = tmp_path / "rx" / "devices"
        age_recipient = recipient

    config = write_agent_config(tmp_path / "agent", Contact())
    agent = Proc("agent", "run", "--config", str(config))
    procs.append(agent)
    agent.expect(r"uplink connected to wss://")
    receiver.expect(r"device demo-agent-1 connected")
    assert agent.stop() == 0
    assert receiver.stop() == 0


def test_serve_flags_set_the_connection_limits(tmp_path: Path, procs: list[Proc]) -> None:
    """A district whose schools all reach the receiver through one NAT address needs more
    than the default per address: the flags reach the listener that enforces them."""
    receiver = Proc(
        "receiver", "serve", "--data", str(tmp_path / "rx"), "--port", "0",
        "--max-connections", "3", "--max-per-address", "2",
    )  # fmt: skip
    procs.append(receiver)
    port = int(receiver.expect(r"receiver: https://127\.0\.0\.1:(\d+)/").group(1))
    receiver.expect(r"^connections: at most 3 at once, 2 from one address$")
    with contextlib.ExitStack() as held:
        # Held open mid-handshake: they count from the accept.
        first = held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        # A third from the address takes the slot of its oldest idle one: cut with a reset.
        held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        with pytest.raises(ConnectionResetError):
            first.recv(1)
        receiver.expect(
            r"cut a connection from 127\.0\.0\.1 \(TLS handshake unfinished, open [0-9.]+ s\) "
            r"for one from 127\.0\.0\.1: 2 connections from it already"
        )
    assert receiver.stop() == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-connections", "0"], "argument --max-connections: expected 1 to 1000000"),
        (["--max-per-address", "many"], "argument --max-per-address: expected a whole number"),
        (
            ["--max-connections", "4", "--max-per-address", "8"],
            "--max-per-address 8 is more than --max-connections 4",
        ),
    ],
)
def test_bad_connection_limits_are_refused_clearly(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    result = subprocess.run(
        [*CLI, "receiver", "serve", "--data", str(tmp_path / "rx"), "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "rx").exists()  # refused before anything was made


@pytest.mark.parametrize("given", ["argument", "file"])
def test_serve_never_prints_the_district_s_secret(
    tmp_path: Path, procs: list[Proc], given: str
) -> None:
    """The webhook URL's path or query may hold the district's secret: the start-up line
    (the journal, under systemd) names scheme, host and port only (found by a review);
    from a file of mode 0600 the URL is not on the command line either."""
    url = "https://127.0.0.1:9/hooks/bg?secret=s3cr3t"
    flags = ["--notify-url", url]
    if given == "file":
        secret = tmp_path / "notify-url"
        secret.write_text(url + "\n")
        secret.chmod(0o600)
        flags = ["--notify-url-file", str(secret)]
    receiver = Proc("receiver", "serve", "--data", str(tmp_path / "rx"), "--port", "0", *flags)
    procs.append(receiver)
    receiver.expect(r"^district notified of emergencies at https://127\.0\.0\.1:9/…$")
    receiver.expect(r"^evidence key ")  # the start-up lines are all read by now
    assert "s3cr3t" not in "".join(receiver.seen)
    assert receiver.stop() == 0


def serve_with_notify_url_file(
    tmp_path: Path, text: str, mode: int
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``receiver serve --notify-url-file`` of a file holding ``text`` (a refusal ends it)."""
    secret = tmp_path / "notify-url"
    secret.write_text(text)
    secret.chmod(mode)
    result = subprocess.run(
        [*CLI, "receiver", "serve", "--data", str(tmp_path / "rx"), "--port", "0",
         "--notify-url-file", str(secret)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return secret, result


def test_a_notify_url_that_is_not_https_is_refused_without_its_secret(tmp_path: Path) -> None:
    _, result = serve_with_notify_url_file(tmp_path, "http://hooks.example/T0KEN-s3cret\n", 0o600)
    assert result.returncode == 2
    assert "http://hooks.example/…: the district's webhook must be an https:// URL" in (
        result.stderr
    )
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("mode", "text", "message"),
    [
        (0o644, "https://d.example/h?secret=s3cr3t", "mode 0644 is too open, expected 0600"),
        (0o600, "https://d.example/a https://d.example/b", "expected one URL, found 2 words"),
        (0o600, "", "expected one URL, found 0 words"),
    ],
)
def test_a_bad_notify_url_file_is_refused_clearly(
    tmp_path: Path, mode: int, text: str, message: str
) -> None:
    secret, result = serve_with_notify_url_file(tmp_path, text, mode)
    assert result.returncode == 2
    assert f"--notify-url-file {secret}: {message}" in result.stderr
    assert "s3cr3t" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("where", ["busy_port", "foreign_address"])
def test_a_receiver_that_cannot_listen_says_where_without_a_traceback(
    tmp_path: Path, where: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        if where == "busy_port":
            host, port = "127.0.0.1", str(busy.getsockname()[1])
        else:  # an address of no interface here: nothing is sent anywhere
            host, port = "192.0.2.1", "0"
        result = subprocess.run(
            [*CLI, "receiver", "serve", "--data", str(tmp_path / "rx"), "--host", host,
             "--port", port],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"--host {host} --port {port}: cannot listen there (" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_default_connection_limits_are_the_receivers() -> None:
    args = build_parser().parse_args(["receiver", "serve", "--data", "rx"])
    assert args.max_connections == ServerLimits().max_connections
    assert args.max_per_address is None  # ServerLimits().max_per_address, within the cap


def test_bad_config_is_a_clear_error_naming_the_key(tmp_path: Path) -> None:
    class Contact:
        uplink_url = "wss://127.0.0.1:1/v1/uplink"
        fingerprint = "sha256:" + "00" * 32
        devices_dir = tmp_path
        age_recipient = str(pyrage.x25519.Identity.generate().to_public())

    config = write_agent_config(tmp_path / "agent", Contact())
    config.write_text(config.read_text().replace('zone = "interior"', 'zone = "inside"'))
    result = subprocess.run(
        [*CLI, "agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "cameras[1].zone" in result.stderr
    assert "'inside' must be 'exterior' or 'interior'" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_new_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "k.key"
    first = subprocess.run(
        [*CLI, "keys", "new", "--out", str(out)], capture_output=True, text=True, timeout=30
    )
    assert first.returncode == 0, first.stderr
    assert stat_mode(out) == 0o600
    assert out.with_suffix(".pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = subprocess.run(
        [*CLI, "keys", "new", "--out", str(out)], capture_output=True, text=True, timeout=30
    )
    assert again.returncode == 2
