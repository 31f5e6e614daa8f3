"""What the armed agent shows on the school LAN, and gives the technician.

- the status its Local API reports (``GET /v1/status``; :func:`agent.local_api.public_status`
  strips it for anyone on the LAN): :func:`status_report`;
- the state its mDNS advertisement carries (``armed``, ``emergency``, ``fault``):
  :func:`device_state`, kept current by :class:`Advertising`;
- what the technician's desk (:mod:`agent.technician`) asks of it: whether an
  emergency forbids enrolling now (:func:`busy`), and a JPEG still of a camera
  from its pre-roll to check its aim (:func:`snapshot`).

A device not enrolled yet has its own status and advertisement (:mod:`agent.first_boot`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from agent.audit import AuditLog
from agent.capture import Capture
from agent.changes import Changes
from agent.config import AgentConfig
from agent.discovery import Advertiser, advertise_when_possible
from agent.emergency import Emergency, Session
from agent.enrollment_state import Enrolled
from agent.local_api import LocalApi
from agent.snapshot import SnapshotError, jpeg_from_packets
from agent.uplink import UplinkClient

log = logging.getLogger(__name__)


def status_report(
    config: AgentConfig,
    enrollment: Enrolled | None,
    emergency: Emergency,
    uplink: UplinkClient,
    capture: Capture,
    share: Session | None,
) -> dict[str, Any]:
    """State, building, cameras and session, as the local API will report it."""
    session = emergency.active
    return {
        "device": config.device_id,
        "building": config.building,
        "provisioned": True,
        "enrollment_version": None if enrollment is None else enrollment.version,
        "certificate": None if enrollment is None else dict(enrollment.enrollment.envelope),
        "state": emergency.state.value,
        "uplink_connected": uplink.connected,
        # Why the receiver cannot open the sealed store (a fault), or None.
        "sealing_fault": uplink.sealing_fault,
        "cameras": [
            {
                "id": c.id,
                "zone": c.zone,
                "healthy": capture.state[c.id].healthy,
                "fault": capture.state[c.id].fault,
                # Measured; too long: a press sends more pre-roll than preroll_s (capture).
                "keyframe_interval_s": _rounded(capture.state[c.id].keyframe_interval_s),
                "keyframe_too_long": capture.state[c.id].keyframe_too_long,
                # Frames out of presentation order (B-frames): mistimed footage, a fault.
                "reorders_frames": capture.state[c.id].reorders_frames,
            }
            for c in config.cameras
        ],
        "share": None if share is None else share.id,
        "session": None
        if session is None
        else {
            "id": session.id,
            "started_by": dict(session.started_by),
            "expires_at": session.expires_at,
        },
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def device_state(emergency: Emergency, faulty: Callable[[], bool]) -> str:
    """What mDNS says of the device: ``armed``, ``emergency`` or ``fault``."""
    if emergency.active is not None:
        return "emergency"
    if faulty():
        return "fault"
    return "armed"


class Advertising:
    """The Local API advertised over mDNS; its state follows :func:`device_state`."""

    def __init__(self, config: AgentConfig, changes: Changes, state: Callable[[], str]) -> None:
        self.config = config
        self.changes = changes
        self.state = state
        #: The advertisement while it runs.
        self.advertiser: Advertiser | None = None

    async def run(self, api: LocalApi, audit: AuditLog) -> None:
        """Advertise the Local API on the configured interfaces; follow the state."""
        cfg = self.config

        def fault(exc: BaseException) -> None:  # the buttons work without it
            log.error("mDNS advertisement: %s", exc)
            audit.record_soon("discovery_fault", error=str(exc)[:300])

        advertiser = await advertise_when_possible(
            lambda: Advertiser(
                cfg.device_id,
                cfg.building,
                api.port,
                api.fingerprint,
                interfaces=cfg.discovery.interfaces,
                state=self.state(),
            ),
            fault,
        )
        self.advertiser = advertiser
        self.changes.notify()
        try:
            while True:
                await self.changes.wait_until(lambda: self.state() != advertiser.state)
                await advertiser.set_state(self.state())
                self.changes.notify()
        finally:
            self.advertiser = None
            await advertiser.close()  # goodbye packets


def busy(emergency: Emergency) -> str | None:
    """Why a technician may not enroll now (None: they may)."""
    active = emergency.active
    return None if active is None else f"emergency {active.id} is active; enroll after it"


async def snapshot(capture: Capture, camera: str) -> bytes:
    """A JPEG still of ``camera`` from its pre-roll (raises SnapshotError)."""
    packets = capture.prerolls[camera].snapshot()
    if not packets:
        raise SnapshotError("no_footage", f"camera {camera} has no footage yet")
    extradata = capture.sources[camera].info.extradata
    return await asyncio.to_thread(jpeg_from_packets, packets, extradata)
