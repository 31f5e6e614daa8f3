"""The district's webhook endpoint on loopback (TLS, its own pin): what it received."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from provisioning.tls import ensure_certificate, server_context


@dataclass
class DistrictHook:
    """Every POST the endpoint received, in order: (headers, body)."""

    url: str = ""
    pin: str = ""
    posts: asyncio.Queue[tuple[dict[str, str], bytes]] = field(default_factory=asyncio.Queue)

    async def next(self) -> dict[str, Any]:
        """The next event's JSON body."""
        async with asyncio.timeout(30):
            return json.loads((await self.posts.get())[1])  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def district_hook(folder: Path) -> AsyncIterator[DistrictHook]:
    """Serve ``https://127.0.0.1:PORT/hook`` (certificate and key made in ``folder``)."""
    hook = DistrictHook()
    cert, key = folder / "d.crt", folder / "d.key"
    hook.pin = ensure_certificate(cert, key, common_name="district", hosts=["127.0.0.1"])

    async def receive(request: web.Request) -> web.Response:
        await hook.posts.put((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(cert, key))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hook.url = f"https://127.0.0.1:{port}/hook"
    try:
        yield hook
    finally:
        await runner.cleanup()
