"""Test helpers for RTSP: a real RTSP camera (gst-rtsp-server) and misbehaving peers.

:class:`RtspServer` runs ``tests/rtsp_server.py`` with the system Python
(Debian's GStreamer bindings live there, not in the venv), waits for its
``ready PORT`` line by reading the pipe, and kills it by PID. Everything
binds to 127.0.0.1.
"""

from __future__ import annotations

import functools
import selectors
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["SYSTEM_PYTHON", "RtspServer", "rtsp_unavailable", "silent_listener"]

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).with_name("rtsp_server.py")
GI_CHECK = 'import gi; gi.require_version("GstRtspServer", "1.0")'


@functools.cache
def rtsp_unavailable() -> str | None:
    """Why the RTSP test server cannot run here, or ``None`` if it can."""
    for argv, what in (
        ([SYSTEM_PYTHON, "-c", GI_CHECK], "GStreamer RTSP server bindings"),
        ([SYSTEM_PYTHON, str(SERVER), "--check"], "GStreamer elements"),
    ):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{SYSTEM_PYTHON} cannot run: {exc}"
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return (
                f"no {what} for {SYSTEM_PYTHON} ({detail}); install gir1.2-gst-rtsp-server-1.0 "
                "python3-gi gstreamer1.0-plugins-{base,good,ugly} (./dev test does)"
            )
    return None


class RtspServer:
    """A live H.264 (or MJPEG) RTSP camera at ``rtsp://127.0.0.1:PORT/cam``.

    ``options`` are ``rtsp_server.py`` flags (``--out-of-band``,
    ``--codec jpeg``, ``--gop N`` ...). :meth:`start` may be called again
    after :meth:`kill`, on the same port, to bring the camera back.
    """

    def __init__(self, *options: str) -> None:
        self._options = options
        self._proc: subprocess.Popen[str] | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 -- lives as long as self
        self.port = 0

    @property
    def url(self) -> str:
        """The stream's URL."""
        return f"rtsp://127.0.0.1:{self.port}/cam"

    @property
    def pid(self) -> int:
        """The server's process id (it must be running)."""
        assert self._proc is not None
        return self._proc.pid

    def start(self, port: int | None = None, timeout: float = 20.0) -> None:
        """Serve on ``port`` (default: the last one, or a free one); return once it listens."""
        assert self._proc is None, "already running"
        port = self.port if port is None else port
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER), str(port), *self._options],
            stdin=subprocess.PIPE,  # the server exits when this closes, should we die first
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._proc = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    self.kill()
                    raise AssertionError(f"RTSP server not ready in {timeout} s: {self._log()}")
                line = proc.stdout.readline()
                if line.startswith("ready "):
                    self.port = int(line.split()[1])
                    return
                if not line:  # it exited
                    self.kill()
                    raise AssertionError(f"RTSP server did not start: {self._log()}")

    def _log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-2000:]

    def kill(self) -> None:
        """Kill the server by its PID (SIGKILL: a camera losing power) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        self._stderr.close()


def silent_listener() -> socket.socket:
    """A TCP socket on 127.0.0.1 that accepts connections (in the kernel) and never speaks."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock
