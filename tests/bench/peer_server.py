"""The raw peer of the trigger benchmark: WebSocket over TLS, append, fsync, reply.

``python -m tests.bench.peer_server --data DIR`` serves ``wss://127.0.0.1:PORT/``
with a self-signed certificate (made by ``provisioning.tls``, as the receiver's
is). For every binary message it appends the message to ``DIR/peer.bin``,
fsyncs (inline: nothing else runs here, this is the floor) and replies with
its ``time.monotonic_ns()`` after the fsync, as text. It prints
``peer: wss://...`` and ``TLS pin: sha256:...`` and runs until SIGTERM/SIGINT.

``wss://127.0.0.1:PORT/discard`` is the raw transport alone (the peer of the
``receiver_ingest`` benchmark): binary messages are counted and dropped, and
every text message is answered with the count of binary bytes received so far
on that connection, as text.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from agent.protocol import MAX_PAYLOAD_BYTES, MEDIA_HEADER
from provisioning.tls import ensure_certificate, server_context

MAX_MESSAGE = 1024 * 1024
#: The receiver's own limit for a media message (header + largest payload).
MAX_DISCARD_MESSAGE = MEDIA_HEADER.size + MAX_PAYLOAD_BYTES
FD_KEY = web.AppKey("fd", int)


async def _handle(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    fd: int = request.app[FD_KEY]
    async for msg in ws:
        if msg.type is not aiohttp.WSMsgType.BINARY:
            continue
        view = memoryview(msg.data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        await ws.send_str(str(time.monotonic_ns()))
    return ws


async def _discard(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_DISCARD_MESSAGE)
    await ws.prepare(request)
    received = 0
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.BINARY:
            received += len(msg.data)
        elif msg.type is aiohttp.WSMsgType.TEXT:
            await ws.send_str(str(received))
    return ws


async def serve(data: Path, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    data.mkdir(parents=True, exist_ok=True)
    pin = ensure_certificate(
        data / "peer.crt", data / "peer.key", common_name="bench peer", hosts=["127.0.0.1"]
    )
    ssl_ctx = server_context(data / "peer.crt", data / "peer.key")
    fd = os.open(data / "peer.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    app = web.Application()
    app[FD_KEY] = fd
    app.router.add_get("/", _handle)
    app.router.add_get("/discard", _discard)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.SockSite(runner, sock, ssl_context=ssl_ctx).start()
        print(f"peer: wss://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
        print(f"TLS pin: {pin}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        os.close(fd)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.data, args.port))


if __name__ == "__main__":
    main()
