"""An unprovisioned device: waiting for a technician to pair and enroll it.

What runs (``breakglass agent run`` on a configuration without building,
receiver or cameras, and no enrollment yet; see :mod:`agent.boot`):

- the device key (made on first boot by :mod:`agent.boot`, mode 0600) and the
  setup code (``state/setup-code``, mode 0600, printed once on the console);
- the Local API with its status and the pairing endpoints: pairing is open for
  ``[local_api] pairing_window_s`` after boot; holding a panic button for
  ``pairing_hold_s`` opens it again with a fresh budget of attempts;
- mDNS with ``st=unprovisioned`` and an empty building;
- the audit trail (the device key signs it), which the armed agent continues.

There are no cameras, no store and no receiver yet, so a button cannot call
anyone: an unprovisioned device's buttons only reopen pairing, and its LED
shows the fault pattern. Once a technician's enrollment is installed,
:attr:`FirstBoot.enrolled` is set and :func:`agent.boot.run_agent` starts the
armed agent with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from agent.audit import AuditLog
from agent.config import AgentConfig
from agent.discovery import Advertiser, advertise_when_possible
from agent.local_api import LocalApi
from agent.sdnotify import tasks_alive
from agent.technician import TechnicianDesk
from hardware.button import PanicButton, PressEvent, loop_callback
from hardware.led import LedPattern, StatusLed
from provisioning.errors import ProvisioningError
from provisioning.keys import load_private_key

log = logging.getLogger(__name__)

STATE = "unprovisioned"


class FirstBoot:
    """``async with FirstBoot(config) as device: await device.enrolled.wait()``."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        pin_factory: Any = None,
        clock: Callable[[], float] = time.time,
        **_: Any,  # what only the armed agent takes (camera sources)
    ) -> None:
        from agent.daemon import make_pin_factory

        self.config = config
        self.clock = clock
        self.pin_factory = (
            pin_factory if pin_factory is not None else make_pin_factory(config.pin_factory)
        )
        self.audit: AuditLog
        self.desk: TechnicianDesk
        self.local_api: LocalApi | None = None
        self.advertiser: Advertiser | None = None
        self.buttons: list[PanicButton] = []
        self.led: StatusLed | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> FirstBoot:
        cfg = self.config
        key = load_private_key(cfg.device_key)
        self.device_public_key = key.public_key()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(cfg.state_dir / "audit.log", self.clock, signer=key)
        self.desk = TechnicianDesk(cfg, self.device_public_key, self.audit, clock=self.clock)
        loop = asyncio.get_running_loop()
        if cfg.led_pin is not None:
            self.led = StatusLed(cfg.led_pin, pin_factory=self.pin_factory)
            self.led.show(LedPattern.FAULT)
        for b in cfg.buttons:
            self.buttons.append(
                PanicButton(
                    b.pin,
                    on_press=loop_callback(loop, self._held),
                    pin_factory=self.pin_factory,
                    hold_time=cfg.local_api.pairing_hold_s,
                    debounce_s=b.debounce_s,
                    button_id=b.id,
                    location=b.location,
                )
            )
        if not cfg.local_api.enabled or cfg.local_api.pairing_window_s <= 0:
            log.error("unprovisioned, but [local_api] pairing is off: nobody can enroll this")
        else:
            api = LocalApi(self, cfg.local_api, cfg.state_dir / "tls")
            try:
                await api.start()
                self.local_api = api
            except (OSError, ProvisioningError) as exc:
                log.error("local API on %s:%d: %s", cfg.local_api.host, cfg.local_api.port, exc)
                self.audit.record_soon("local_api_fault", error=str(exc)[:300])
        if cfg.discovery.enabled and self.local_api is not None:
            self._tasks.append(asyncio.create_task(self._advertise(self.local_api), name="mdns"))
        self.audit.record_soon("unprovisioned", device=cfg.device_id)
        log.warning(
            "device %s is unprovisioned: pair it with its setup code (%s) within %.0f s",
            cfg.device_id, cfg.state_dir / "setup-code", cfg.local_api.pairing_window_s,
        )  # fmt: skip
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.local_api is not None:
            await self.local_api.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for button in self.buttons:
            await asyncio.to_thread(button.close)
        if self.led is not None:
            self.led.close()
        await asyncio.to_thread(self.audit.close)

    def alive(self) -> bool:
        """False once a background task died: systemd's watchdog then restarts the agent."""
        return tasks_alive(self._tasks)

    @property
    def enrolled(self) -> asyncio.Event:
        """Set once a technician's enrollment is installed."""
        return self.desk.enrolled

    def _held(self, event: PressEvent) -> None:
        pairing = None if self.local_api is None else self.local_api.pairing
        log.warning("button %s held: reopening pairing", event.button_id)
        if pairing is not None:
            pairing.reopen()

    def status(self) -> dict[str, Any]:
        """``GET /v1/status`` of a device that is not enrolled yet."""
        pairing = None if self.local_api is None else self.local_api.pairing
        return {
            "device": self.config.device_id,
            "building": None,
            "provisioned": False,
            "enrollment_version": None,
            "state": STATE,
            "pairing_open": pairing is not None and pairing.is_open(),
            "cameras": [],
            "session": None,
        }

    async def _advertise(self, api: LocalApi) -> None:
        cfg = self.config

        def fault(exc: BaseException) -> None:
            log.error("mDNS advertisement: %s", exc)
            self.audit.record_soon("discovery_fault", error=str(exc)[:300])

        advertiser = await advertise_when_possible(
            lambda: Advertiser(
                cfg.device_id,
                "",
                api.port,
                api.fingerprint,
                interfaces=cfg.discovery.interfaces,
                state=STATE,
            ),
            fault,
        )
        self.advertiser = advertiser
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            self.advertiser = None
            await advertiser.close()
