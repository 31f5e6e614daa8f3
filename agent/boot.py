"""What ``breakglass agent run`` starts: the configuration file plus the enrollment.

A Raspberry Pi image carries the same small configuration on every device:
``[device]`` (key and state paths; the id defaults to one derived from the
key), the Local API, discovery and the GPIO pins. On first boot the device
makes its key (``[device] key``, mode 0600; it never leaves the device) and
runs unprovisioned (:mod:`agent.first_boot`) until a technician enrolls it.
The enrollment (:mod:`agent.enrollment_state`) then supplies what the district
decides: building, receiver, recipients, retention, cameras and trust, which
take precedence over the same keys in the file (a warning names them).

A complete hand-written configuration (building, receiver, cameras: the demo,
the tests, a bench setup) still runs as it is, without enrollment.

:func:`run_agent` starts whichever the device is, and starts again when a
technician enrolls or re-enrolls it, until ``stop`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent import enrollment_state
from agent.config import AgentConfig, device_paths, parse_config, read_toml
from agent.errors import ConfigError
from provisioning.documents import DocumentError
from provisioning.enrollment import certified_device_key
from provisioning.errors import KeyFileError
from provisioning.keys import (
    foreign_owner,
    kid,
    load_private_key,
    new_private_key,
    read_small,
)

log = logging.getLogger(__name__)

#: Tables whose presence makes a configuration file a complete (hand-written) one.
HAND_WRITTEN = ("building", "receiver", "cameras")


def derived_id(public_kid: str) -> str:
    """The device id when ``[device] id`` is not configured: from its key id."""
    return f"bg-{public_kid[:12]}"


def load_agent_config(path: Path) -> AgentConfig:
    """The configuration at ``path`` with the device's enrollment applied (module docstring)."""
    return load_device(path)[0]


def load_device(path: Path) -> tuple[AgentConfig, enrollment_state.Enrolled | None]:
    """The configuration with the enrollment applied, and the enrollment (None: none).

    Makes the device key on first boot. ConfigError names the file and key.
    """
    path = Path(path).resolve()
    doc = read_toml(path)
    key_path, state_dir, certificate = device_paths(doc, path)
    for setting, where in (("device.state_dir", state_dir), ("device.key", key_path)):
        if (owner := foreign_owner(where)) is not None:
            raise ConfigError(
                f"{path}: {setting}: {where} belongs to {owner}: run the agent as {owner} "
                f"(sudo -u {owner} ...); files it made as another user would stop the "
                "service from starting",
                key=setting,
            )
    try:
        enrollment_state.recover(state_dir)
    except OSError as exc:  # a folder the agent's user cannot write (not the unit's path?)
        raise ConfigError(
            f"{path}: device.state_dir: {state_dir}: {exc.strerror or exc}", key="device.state_dir"
        ) from None
    try:
        enrolled = enrollment_state.load(state_dir)
    except enrollment_state.EnrollmentDamaged as exc:
        aside = enrollment_state.set_aside(state_dir, int(time.time()))
        log.error("%s; set aside as %s: the device is unprovisioned until re-enrolled", exc, aside)
        enrolled = None
    if not key_path.exists():
        if enrolled is not None:
            raise ConfigError(
                f"{path}: device.key: {key_path} is missing but the device is enrolled "
                "with it; re-enroll the device (its certificate names the lost key)",
                key="device.key",
            )
        if certificate is not None:
            raise ConfigError(
                f"{path}: device.key: {key_path} is missing but device.enrollment "
                f"({certificate}) certifies this device's key; check the path (a new key "
                "would not be the certified one)",
                key="device.key",
            )
        try:
            new_private_key(key_path)
        except OSError as exc:
            raise ConfigError(
                f"{path}: device.key: cannot make {key_path}: {exc.strerror or exc}",
                key="device.key",
            ) from None
        log.warning("first boot: made the device key %s (mode 0600)", key_path)
    try:
        key = load_private_key(key_path)
    except Exception as exc:
        raise ConfigError(f"{path}: device.key: {exc}", key="device.key") from exc
    if enrolled is None and certificate is not None:
        _check_certified_key(path, certificate, key_path, kid(key.public_key()))
    default_id = derived_id(kid(key.public_key()))
    if enrolled is not None:
        tables = enrolled.config_tables()
        overridden = _overlay(doc, tables)
        if overridden:
            log.warning(
                "%s: the enrollment (v%d) sets %s; the file's values are not used",
                path, enrolled.version, ", ".join(overridden),
            )  # fmt: skip
        config = parse_config(doc, path, default_id=default_id)
        e = enrolled.enrollment
        if e.device != config.device_id or e.device_kid != kid(key.public_key()):
            raise ConfigError(
                f"{path}: device: the enrollment is for {e.device} key {e.device_kid}, this "
                f"device is {config.device_id} key {kid(key.public_key())}; re-enroll it",
                key="device.id",
            )
        return config, enrolled
    hand_written = any(t in doc for t in HAND_WRITTEN)
    return parse_config(doc, path, default_id=default_id, provisioned=hand_written), None


def _check_certified_key(path: Path, certificate: Path, key_path: Path, key_kid: str) -> None:
    """A hand-written configuration's certificate must name its key (a wrong ``key`` path
    would sign the audit trail and the uplink with a key nobody trusts). A certificate
    that cannot be read only is logged: the receiver refuses it, the buttons work."""
    try:
        certified = kid(certified_device_key(read_small(certificate, "enrollment certificate")))
    except (KeyFileError, DocumentError) as exc:
        log.error("%s: device.enrollment: %s", path, exc)
        return
    if certified != key_kid:
        raise ConfigError(
            f"{path}: device.key: {key_path} is key {key_kid}, but device.enrollment "
            f"({certificate}) certifies key {certified}; check the path",
            key="device.key",
        )


def check_enrollment(path: Path, device_id: str, enrolled: enrollment_state.Enrolled) -> None:
    """Raise ConfigError unless the file at ``path`` plus ``enrolled`` is a whole, valid
    configuration: what the device will start with must be known to start."""
    doc = read_toml(path)
    _overlay(doc, enrolled.config_tables())
    parse_config(doc, path, default_id=device_id)


def _overlay(doc: dict[str, Any], tables: Mapping[str, Any]) -> list[str]:
    """Set the enrollment's keys in ``doc``; returns the keys the file also set."""
    overridden: list[str] = []
    for name, value in tables.items():
        if isinstance(value, list):
            if name in doc:
                overridden.append(name)
            doc[name] = value
            continue
        table = doc.setdefault(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table", key=name)
        for key, item in value.items():
            if key in table and table[key] != item:
                overridden.append(f"{name}.{key}")
            table[key] = item
    return overridden


async def run_agent(
    path: Path,
    stop: asyncio.Event,
    *,
    on_start: Callable[[Any], None] | None = None,
    **kwargs: Any,
) -> None:
    """Run the device (armed or first boot) until ``stop``; restart it after an enrollment.

    ``on_start(runtime)`` is called with each runtime once it runs (tests, the demo).
    """
    from agent.daemon import Agent
    from agent.first_boot import FirstBoot

    port = 0
    while not stop.is_set():
        config, enrolled = await asyncio.to_thread(load_device, path)  # files, keys
        if config.local_api.port == 0 and port:  # any free port: keep the one it had
            config = replace(config, local_api=replace(config.local_api, port=port))
        runtime: Agent | FirstBoot = (
            Agent(config, enrolled=enrolled, **kwargs)
            if config.provisioned
            else FirstBoot(config, **kwargs)
        )
        async with runtime:
            if runtime.local_api is not None:
                port = runtime.local_api.port
            if on_start is not None:
                on_start(runtime)
            stopping = asyncio.create_task(stop.wait())
            restart = asyncio.create_task(runtime.enrolled.wait())
            await asyncio.wait({stopping, restart}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            restart.cancel()
        if not stop.is_set():
            log.warning("enrolled: starting again with the new enrollment")
