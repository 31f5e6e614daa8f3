"""systemd's notify protocol (sd_notify(3)) without libsystemd.

Under a ``Type=notify`` unit, systemd passes the address of a datagram socket
in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for Linux's abstract namespace).
The service sends newline-separated ``KEY=VALUE`` assignments to it:
``READY=1`` once it is armed, ``STATUS=...`` for ``systemctl status``,
``STOPPING=1`` when it begins to shut down, and, when the unit has
``WatchdogSec=``, ``WATCHDOG=1`` more often than ``$WATCHDOG_USEC``
(sd_watchdog_enabled(3): the watchdog is this process's only when
``$WATCHDOG_PID`` is unset or names it).

Outside systemd every call is a no-op that returns ``False``. A send never
raises: a service manager that went away must not take the agent with it.
The first failure is logged as a warning, the rest at debug level.

:func:`watchdog` is what gets a wedged agent restarted: it runs on the event
loop and pings only while ``alive()`` says the agent works, so a blocked loop
and a broken agent both stop the pings, and systemd restarts the unit one
``WatchdogSec`` later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from types import TracebackType
from typing import Any

__all__ = ["SEND_TIMEOUT_S", "Notifier", "tasks_alive", "watchdog"]

log = logging.getLogger(__name__)

#: How long one send may block when the manager's queue is full. A datagram to a
#: local socket with room goes at once; this bounds the rare stall on the loop.
SEND_TIMEOUT_S = 0.5

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_DIGITS = re.compile(r"[0-9]{1,19}")  # what libsystemd's safe_atou64 takes, no sign or space


class Notifier:
    """One service's link to its manager's notify socket, or a no-op without one.

    ``address`` is ``$NOTIFY_SOCKET`` as systemd gives it: an absolute path, or
    ``@name`` for an abstract socket; ``None`` (or anything else) disables the
    notifier. ``watchdog_usec`` is the watchdog timeout, when the watchdog is
    this process's. Call it from one thread (the event loop's).
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._target = _socket_address(address)
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._failed_before = False

    @classmethod
    def from_environ(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        pid: int | None = None,
        unset_environment: bool = False,
    ) -> Notifier:
        """The notifier systemd's environment describes (``os.environ`` by default).

        ``pid`` is this process's (``os.getpid()`` by default), compared with
        ``$WATCHDOG_PID``. ``unset_environment`` removes the three variables
        afterwards, so child processes do not inherit them (as
        ``sd_notify(1, ...)`` does).
        """
        env = os.environ if environ is None else environ
        notifier = cls(
            env.get("NOTIFY_SOCKET") or None,
            watchdog_usec=_watchdog_usec(env, os.getpid() if pid is None else pid),
        )
        if unset_environment:
            for key in _ENV_KEYS:
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether there is a manager to notify (``$NOTIFY_SOCKET`` was usable)."""
        return self._target is not None

    @property
    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or ``None`` when this process has no watchdog."""
        if self._target is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 1_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; ``True`` if it was sent.

        A value may not hold a newline (it would start another assignment).
        """
        for item in assignments:
            key, eq, _ = item.partition("=")
            if not eq or not key or "\n" in item:
                raise ValueError(f"not a single KEY=VALUE assignment: {item[:60]!r}")
        if self._target is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(SEND_TIMEOUT_S)
                self._sock = sock
            self._sock.sendto(data, self._target)
        except OSError as exc:
            self._send_failed(exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell the manager that start-up is finished (``READY=1``), with a status line."""
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows."""
        return self.notify(*_status(text))

    def stopping(self, status: str | None = None) -> bool:
        """Tell the manager that shutdown has begun (``STOPPING=1``)."""
        return self.notify("STOPPING=1", *_status(status))

    def watchdog_ping(self) -> bool:
        """Reset the manager's watchdog timer (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send_failed(self, exc: OSError) -> None:
        if self._failed_before:
            log.debug("systemd notify to %s failed: %s", self.address, exc)
            return
        self._failed_before = True
        log.warning(
            "systemd notify to %s failed: %s (later failures are logged at debug level)",
            self.address,
            exc,
        )


async def watchdog(notifier: Notifier, alive: Callable[[], bool]) -> None:
    """Ping the watchdog every half interval while ``alive()`` holds; never returns.

    Returns at once when the unit has no watchdog. ``alive()`` runs on the loop
    before every ping; ``False``, or an exception, withholds that ping, and
    systemd restarts the service once a whole interval passes without one.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    period = interval / 2
    healthy = True
    while True:
        try:
            ok = bool(alive())
        except Exception:
            if healthy:
                log.exception("watchdog: the liveness check failed")
            ok = False
        if ok:
            notifier.watchdog_ping()
        if ok != healthy:
            healthy = ok
            if ok:
                log.warning("watchdog: alive again; pinging systemd's watchdog")
            else:
                log.error(
                    "watchdog: not alive; withholding the ping (systemd restarts the "
                    "service after %.0f s without one)",
                    interval,
                )
        await asyncio.sleep(period)


def _socket_address(address: str | None) -> str | None:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address: a path, or NUL + name if abstract."""
    if not address:
        return None
    if address.startswith("/"):
        return address
    if address.startswith("@") and len(address) > 1:
        return "\0" + address[1:]
    log.warning("NOTIFY_SOCKET %r is not a path or an abstract socket: not notifying", address)
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """The watchdog timeout if this process has one (sd_watchdog_enabled(3))."""
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    if not _DIGITS.fullmatch(usec_text):
        log.warning("WATCHDOG_USEC %r is not a number: no watchdog", usec_text[:40])
        return None
    usec = int(usec_text)
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        if not _DIGITS.fullmatch(pid_text):
            log.warning("WATCHDOG_PID %r is not a number: no watchdog", pid_text[:40])
            return None
        if int(pid_text) != pid:  # meant for another process (a parent that exec'd us, say)
            return None
    return usec


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)


def tasks_alive(tasks: Iterable[asyncio.Task[Any]]) -> bool:
    """False once one of ``tasks`` died of an exception (logged): the watchdog then stops."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("task %s died", task.get_name(), exc_info=task.exception())
            return False
    return True
