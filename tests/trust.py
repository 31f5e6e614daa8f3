"""Trigger keys for tests: the demo district authority signs a list with every role.

``write_agent_config`` (breakglass.demo) makes a district authority and a
dispatch key and enrols the dispatch key (v1). :func:`enrol_roles` adds a
principal key for the building and a superintendent key, as list v2 in the
agent's ``trigger-keys.json`` (the agent installs it on start).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.daemon import Agent
from breakglass.demo import BUILDING, dispatch_key_path
from provisioning.documents import b64url
from provisioning.keys import load_private_key, new_private_key, raw_public
from provisioning.tls import fingerprint_digest
from provisioning.triggers import sign_key_list, sign_trigger


@dataclass
class Signers:
    """The enrolled trigger keys, by role."""

    dispatch: Ed25519PrivateKey
    principal: Ed25519PrivateKey
    superintendent: Ed25519PrivateKey
    authority: Ed25519PrivateKey

    def trigger(self, role: str, action: str, *, now: float | None = None, **kw: Any) -> str:
        """A signed trigger envelope (JSON text) for the demo building."""
        key = getattr(self, role)
        stamp = int(time.time() if now is None else now)
        envelope = sign_trigger(
            key,
            action=action,
            building=kw.pop("building", BUILDING),
            reason=kw.pop("reason", f"{role} {action}"),
            now=stamp,
            **kw,
        )
        return json.dumps(envelope)


def entry(key: Ed25519PrivateKey, role: str, buildings: Any, label: str) -> dict[str, Any]:
    """One trigger-key list entry."""
    return {
        "key": b64url(raw_public(key.public_key())),
        "role": role,
        "buildings": buildings,
        "label": label,
    }


def enrol_roles(agent_folder: Path, version: int = 2) -> Signers:
    """Sign list ``version`` enrolling dispatch, a principal and a superintendent."""
    root = agent_folder.parent
    authority = load_private_key(root / "district" / "authority.key")
    dispatch = load_private_key(dispatch_key_path(agent_folder))
    principal = new_private_key(root / "keys" / "principal.key")
    superintendent = new_private_key(root / "keys" / "superintendent.key")
    now = int(time.time())
    keys = [
        entry(dispatch, "dispatch", "all", "county 911 dispatch"),
        entry(principal, "principal", [BUILDING], "principal, Lincoln Elementary"),
        entry(superintendent, "superintendent", "all", "district superintendent"),
    ]
    envelope = sign_key_list(authority, version, keys, iat=now, exp=now + 86400)
    (agent_folder / "trigger-keys.json").write_text(json.dumps(envelope))
    return Signers(dispatch, principal, superintendent, authority)


async def call(
    agent: Agent, method: str, path: str, body: bytes | str | None = None
) -> tuple[int, Any]:
    """One request to the agent's Local API over HTTPS, pinning its certificate."""
    api = agent.local_api
    assert api is not None
    pin = aiohttp.Fingerprint(fingerprint_digest(api.fingerprint))
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.request(method, api.url + path, data=body, ssl=pin) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()
