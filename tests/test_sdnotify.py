"""agent.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier, watchdog

RECV_TIMEOUT_S = 5.0


def _listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT_S)
    return sock


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket in tmp_path (the manager's end) and its path."""
    path = str(tmp_path / "notify")
    assert len(path) < 100, f"AF_UNIX paths are limited to 107 bytes: {path}"
    sock = _listen(path)
    try:
        yield sock, path
    finally:
        sock.close()


def _pending(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued, without waiting."""
    sock.setblocking(False)
    try:
        out = []
        while True:
            try:
                out.append(sock.recv(4096))
            except BlockingIOError:
                return out
    finally:
        sock.settimeout(RECV_TIMEOUT_S)


def test_outside_systemd_everything_is_a_quiet_no_op(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready("armed") is False
    assert notifier.status("x") is False
    assert notifier.watchdog_ping() is False
    assert notifier.stopping() is False
    notifier.close()
    assert not caplog.records


async def test_the_watchdog_task_returns_at_once_without_a_watchdog(
    manager: tuple[socket.socket, str],
) -> None:
    _, path = manager
    for env in ({}, {"NOTIFY_SOCKET": path}, {"WATCHDOG_USEC": "20000"}):
        notifier = Notifier.from_environ(env)
        await asyncio.wait_for(watchdog(notifier, lambda: True), 1)


def test_messages_reach_the_socket_path(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.ready("armed: 2 cameras")
        assert sock.recv(4096) == b"READY=1\nSTATUS=armed: 2 cameras"
        assert notifier.status("camera hallway-2\nfault")  # one line: a newline would inject
        assert sock.recv(4096) == b"STATUS=camera hallway-2 fault"
        assert notifier.watchdog_ping()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        assert notifier.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=sealing")
        assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=5000000\nSTATUS=sealing"


def test_an_abstract_socket_address() -> None:
    name = f"breakglass-test-{os.getpid()}-{secrets.token_hex(6)}"
    sock = _listen("\0" + name)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.close()
    finally:
        sock.close()


def test_a_malformed_assignment_is_the_callers_bug(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = Notifier(path)
    for bad in ("READY", "=1", "STATUS=a\nREADY=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            notifier.notify(bad)
    notifier.close()
    assert _pending(sock) == []


def test_unset_environment_keeps_children_out(manager: tuple[socket.socket, str]) -> None:
    _, path = manager
    pid = os.getpid()
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid), "X": "1"}
    notifier = Notifier.from_environ(env, unset_environment=True)
    assert env == {"X": "1"}
    assert notifier.enabled and notifier.watchdog_interval == 30.0


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),  # meant for another process
        ("0", None, None),
        ("", None, None),
        ("-5", None, None),
        ("+5", None, None),
        (" 5", None, None),
        ("1_000", None, None),
        ("abc", None, None),
        ("30000000", "x", None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    manager: tuple[socket.socket, str], usec: str, pid: str | None, interval: float | None
) -> None:
    _, path = manager
    me = os.getpid()
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": usec}
    if pid is not None:
        env["WATCHDOG_PID"] = {"self": str(me), "other": str(me + 1)}.get(pid, pid)
    assert Notifier.from_environ(env, pid=me).watchdog_interval == interval


def test_send_failures_never_raise_and_are_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.sdnotify")
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_ping() is False
    assert notifier.stopping() is False
    notifier.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "nobody-listens" in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2


def test_an_unsupported_address_disables_the_notifier(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000"})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready() is False
    assert "vsock:2:1234" in caplog.text


# The script alive() follows, call by call (an exception counts as not alive), and
# how many pings it must produce: only the calls that returned True ping.
SCRIPTS: dict[str, tuple[list[bool | str], int]] = {
    "alive then wedged": ([True, True, True, False, False, False], 3),
    "recovers": ([True, False, "raise", True, True], 3),
    "never alive": (["raise", False, False], 0),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_the_watchdog_pings_every_half_interval_only_while_alive(
    manager: tuple[socket.socket, str], name: str
) -> None:
    sock, path = manager
    script, expected = SCRIPTS[name]
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environ(env)
    assert notifier.watchdog_interval == 0.02
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    done = asyncio.Event()

    def alive() -> bool:
        calls.append(loop.time())
        step = script[min(len(calls), len(script)) - 1]
        if len(calls) >= len(script):
            done.set()
        if step == "raise":
            raise RuntimeError("liveness check broke")
        return bool(step)

    task = asyncio.create_task(watchdog(notifier, alive), name="watchdog")
    try:
        # The pings arrive as they are sent (read with a timeout, never a sleep).
        for _ in range(expected):
            got = await asyncio.wait_for(loop.sock_recv(_nonblocking(sock), 4096), 5)
            assert got == b"WATCHDOG=1"
        await asyncio.wait_for(done.wait(), 5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()
    assert len(calls) >= len(script)
    # Only the first len(script) calls are scripted; any after repeat the last step.
    extra = (len(calls) - len(script)) if script[-1] is True else 0
    assert _pending(sock) == [b"WATCHDOG=1"] * extra
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert min(gaps) >= 0.01 * 0.9, gaps  # interval / 2, from the loop's own clock


def _nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    return sock
