"""An RTSP/IP camera, read through PyAV (FFmpeg's RTSP client), never re-encoded.

Connection: RTSP over TCP (``rtsp_transport=tcp``: a keyframe is dozens of
RTP packets, and UDP on a busy school LAN loses some). Probing is kept to a
minimum (``analyzeduration=0``, ``probesize=32``) so the first packet is
handed over when it arrives instead of after a second of buffering; the
size comes from the SDP's parameter sets, or from the first keyframe.

Timeouts: PyAV's ``timeout=(open, read)`` interrupts FFmpeg's blocking I/O
(it polls every 100 ms). FFmpeg reports an interrupted RTSP handshake as
"invalid data", the same as a garbage answer, so the two are told apart by
the clock: a failure that took the whole timeout is a :class:`CameraTimeout`.
A stop request cannot interrupt FFmpeg sooner, so :meth:`RtspCamera.aclose`
takes at most ``max(open_timeout_s, read_timeout_s)`` (while packets flow,
well under one frame interval).

Reconnects: the worker thread retries on its own, with exponential backoff
(``reconnect_min_s`` doubling up to ``reconnect_max_s``, each delay drawn
from its upper half so that cameras that dropped together do not return in
lock-step), and resets the backoff once a connection delivered packets.
:meth:`~RtspCamera.packets` keeps yielding across reconnects; each new
connection starts at a keyframe. Every failure is kept as ``last_error``
and logged, but the stream only ends with it after ``give_up_after``
consecutive failures (default: never; the agent's watchdog decides when a
silent camera is at fault).

Timestamps: ``source_ts_ns`` is the RTP timestamp as FFmpeg maps it to pts
(it restarts with each connection); ``capture_ns`` is arrival wall time
spaced by those pts (``hardware._clock``), so frame intervals survive
network jitter; ``mono_ns`` is ``time.monotonic_ns()`` at arrival.

Credentials: a URL may carry ``user:password@`` (or a password in its
query). Errors and logs name the camera by :func:`redact_url`; FFmpeg's own
error messages, which repeat the URL, are never passed on, and errors are
raised without chaining the FFmpeg exception that holds it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from urllib.parse import urlsplit, urlunsplit

import av
import av.error

from hardware._bridge import ThreadedSource
from hardware._clock import ArrivalClock
from hardware.av_source import AccessUnitReader
from hardware.camera import EncodedPacket, StreamInfo
from hardware.errors import (
    CameraConfigError,
    CameraConnectionError,
    CameraError,
    CameraStreamError,
    CameraTimeout,
)

__all__ = ["RtspCamera", "redact_url"]

_log = logging.getLogger("hardware.camera")

_SECRET_KEYS = re.compile(r"pass|pwd|secret|token|key|auth|sig", re.IGNORECASE)


def _redact_pairs(text: str, separators: str) -> str:
    """``key=value`` items of ``text`` (split at any of ``separators``) with a secret-
    looking key: their values as ``***``."""
    return re.sub(
        rf"([^{re.escape(separators)}=]*)=([^{re.escape(separators)}]*)",
        lambda m: f"{m[1]}=***" if _SECRET_KEYS.search(m[1]) else m[0],
        text,
    )


def redact_url(url: str) -> str:
    """``url`` with its user info and secret-looking values replaced by ``***``: in the
    query, and in the path as cheap NVRs put them (``/user=admin&password=X&channel=1``,
    ``;password=X``)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    query = _redact_pairs(parts.query, "&;")
    path = _redact_pairs(parts.path, "/&;?")
    return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


class RtspCamera(ThreadedSource):
    """A :class:`~hardware.camera.CameraSource` reading an RTSP camera's H.264 stream.

    ``url`` is ``rtsp://[user:password@]host[:port]/path`` (or ``rtsps://``).
    ``open_timeout_s`` bounds connecting and the RTSP handshake,
    ``read_timeout_s`` the silence between packets. Reconnection and
    ``give_up_after`` are described in the module docstring;
    ``max_buffered_s`` bounds the packets waiting for the consumer (whole
    GOPs are dropped beyond it). :meth:`force_keyframe` is a no-op
    (``False``): the camera keeps its own keyframe cadence.

    ``connected``, ``reconnects`` and ``last_error`` report the connection;
    :meth:`state_changed` waits for them to change.
    """

    _kind = "rtsp"

    def __init__(
        self,
        camera_id: str,
        url: str,
        *,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        give_up_after: int | None = None,
        max_buffered_s: float = 2.0,
    ) -> None:
        self._url = url
        self._safe_url = redact_url(url)

        def bad(what: str) -> CameraConfigError:
            return CameraConfigError(f"rtsp camera {camera_id!r} at {self._safe_url}: {what}")

        try:
            parts = urlsplit(url)
            has_host = bool(parts.hostname)
        except ValueError:
            has_host = False
            parts = urlsplit("")
        if parts.scheme not in ("rtsp", "rtsps") or not has_host:
            raise bad("the URL must be rtsp://host[:port]/path or rtsps://...")
        if open_timeout_s <= 0 or read_timeout_s <= 0:
            raise bad("open_timeout_s and read_timeout_s must be > 0")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise bad("need 0 < reconnect_min_s <= reconnect_max_s")
        if give_up_after is not None and give_up_after < 1:
            raise bad("give_up_after must be >= 1 or None")
        if max_buffered_s <= 0:
            raise bad("max_buffered_s must be > 0")
        self._open_timeout_s, self._read_timeout_s = open_timeout_s, read_timeout_s
        self._backoff = (reconnect_min_s, reconnect_max_s)
        self._give_up_after = give_up_after
        self._random = random.Random()  # noqa: S311 -- backoff jitter, not a secret
        super().__init__(camera_id, max_buffered_s=max_buffered_s)
        self._connected = False
        self._reconnects = 0
        self._last_error: CameraError | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._sent_info: StreamInfo | None = None  # worker thread only

    def _describe(self) -> str:
        return f"rtsp camera {self._id!r} at {self._safe_url}"

    def _redact(self, text: str) -> str:
        return text.replace(self._url, self._safe_url)

    @property
    def url(self) -> str:
        """The camera's URL with credentials replaced by ``***`` (safe to log)."""
        return self._safe_url

    @property
    def connected(self) -> bool:
        """Whether a connection is open and its stream was set up."""
        return self._connected

    @property
    def reconnects(self) -> int:
        """Connection attempts made after the first one (every retry, successful or not)."""
        return self._reconnects

    @property
    def last_error(self) -> CameraError | None:
        """Why the last connection attempt failed or the last connection ended."""
        return self._last_error

    async def state_changed(self) -> None:
        """Return at the next change of ``connected``, ``reconnects`` or ``last_error``."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    # --- the event-loop side: only ever called through call_soon_threadsafe ---

    def _set_state(
        self, *, connected: bool, error: CameraError | None = None, attempt: bool = False
    ) -> None:
        self._connected = connected
        if error is not None:
            self._last_error = error
        if attempt:
            self._reconnects += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- the worker thread ---

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        clock = ArrivalClock()
        failures = 0
        first = True
        while not self._stop.is_set():
            if not first:
                self._post(loop, lambda: self._set_state(connected=False, attempt=True))
            first = False
            began = time.monotonic()
            error, delivered = self._session(loop, clock)
            if self._stop.is_set():
                return
            # The backoff starts over only after a connection that lasted: a camera that
            # sends a frame and hangs up is not called again twice a second forever.
            lasted = delivered and time.monotonic() - began >= self._backoff[1]
            failures = 1 if lasted else failures + 1
            _log.warning("%s", error)
            self._post(loop, lambda e=error: self._set_state(connected=False, error=e))
            if self._give_up_after is not None and failures >= self._give_up_after:
                self._post(loop, self._queue.fail, error)
                return
            low, high = self._backoff
            delay = min(high, low * 2 ** (failures - 1))
            if self._stop.wait(self._random.uniform(delay / 2, delay)):
                return

    def _session(
        self, loop: asyncio.AbstractEventLoop, clock: ArrivalClock
    ) -> tuple[CameraError, bool]:
        """One connection, until it fails; the reason, and whether packets flowed."""
        options = {
            "rtsp_transport": "tcp",
            # Video only: no audio is recorded in a school, and with a second stream
            # FFmpeg re-times packets by the first RTCP sender report (a step back).
            "allowed_media_types": "video",
            "analyzeduration": "0",
            "probesize": "32",
            "timeout": str(round(self._read_timeout_s * 1e6)),  # socket I/O, in µs
        }
        started = time.monotonic()
        try:
            container = av.open(
                self._url, options=options, timeout=(self._open_timeout_s, self._read_timeout_s)
            )
        except (av.error.FFmpegError, OSError) as exc:
            waited = time.monotonic() - started
            # The socket timeout (the read timeout) may end the handshake first.
            within = min(self._open_timeout_s, self._read_timeout_s)
            return self._classify(exc, waited, within, "answer"), False
        delivered = False
        last = time.monotonic()
        try:
            if not container.streams.video:
                return CameraStreamError(f"{self._describe()}: the camera sends no video"), False
            stream = container.streams.video[0]
            reader = AccessUnitReader(stream, self._describe())
            clock.restart()
            self._post(loop, lambda: self._set_state(connected=True))
            joined = False
            for packet in container.demux(stream):
                if self._stop.is_set():
                    break
                if time.monotonic() - last >= 0.9 * self._read_timeout_s:
                    # After a read timeout FFmpeg's parser hands out the frame it held
                    # instead of an error: a stalled camera, not a frame to stamp now.
                    timeout = self._read_timeout_s
                    return CameraTimeout(
                        f"{self._describe()}: no packet within {timeout:g} s"
                    ), delivered
                for payload, keyframe, ts_ns in reader.units(packet):
                    if not (joined or keyframe):
                        continue  # a connection starts at a keyframe, or it would not decode
                    joined = True
                    wall, mono = time.time_ns(), time.monotonic_ns()
                    info = reader.info(payload) if keyframe else None
                    if info is not None:
                        # Only a changed description travels (a new connection may bring new SPS).
                        info, self._sent_info = (None if info == self._sent_info else info), info
                    capture = clock.capture_ns(ts_ns, wall, mono)
                    unit = EncodedPacket(
                        self._id, -1, capture, mono, keyframe, "h264", payload, ts_ns
                    )
                    self._emit(loop, unit, info)
                    delivered = True
                last = time.monotonic()
            return CameraConnectionError(f"{self._describe()}: the camera ended the stream"), (
                delivered
            )
        except CameraError as exc:
            # Kept as last_error: without the traceback, which holds the closed container.
            return exc.with_traceback(None), delivered
        except (av.error.FFmpegError, OSError) as exc:
            waited = time.monotonic() - last
            return self._classify(exc, waited, self._read_timeout_s, "packet"), delivered
        finally:
            container.close()

    def _classify(
        self, exc: Exception, waited_s: float, timeout_s: float, awaited: str
    ) -> CameraError:
        """A CameraError for an FFmpeg failure, with FFmpeg's reason but never the raw URL."""
        reason = self._redact(getattr(exc, "strerror", None) or type(exc).__name__)
        where = self._describe()
        if isinstance(exc, TimeoutError | av.error.ExitError) or waited_s >= 0.9 * timeout_s:
            return CameraTimeout(f"{where}: no {awaited} within {timeout_s:g} s ({reason})")
        if isinstance(exc, av.error.InvalidDataError):
            return CameraStreamError(f"{where}: the answer is not RTSP with H.264 ({reason})")
        return CameraConnectionError(f"{where}: {reason}")
