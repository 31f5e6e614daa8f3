"""What a paired technician may ask of a device (``POST /v1/pairing/channel``).

Both runtimes serve it: :class:`agent.first_boot.FirstBoot` (enroll) and the
armed :class:`agent.daemon.Agent` (re-enroll, check the cameras' aim).

- ``{"op": "enroll", "bundle": {...}}`` installs an enrollment atomically
  (:func:`agent.enrollment_state.apply`, in a worker thread); once the
  answer is sent, :attr:`TechnicianDesk.enrolled` is set, so the device starts
  again with it
  (:func:`agent.boot.run_agent`). Refused while an emergency is active.
- ``{"op": "check", "camera": ID}``: one JPEG snapshot (:mod:`agent.snapshot`),
  interior cameras included: only a technician who proved the setup code, in
  the pairing window, gets here. Every snapshot is audited.

Answers are ``{"ok": {...}}`` or ``{"error": CODE, "detail": ...}``; refusals
are audited with their code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import enrollment_state
from agent.audit import AuditLog
from agent.boot import check_enrollment
from agent.config import AgentConfig
from agent.enrollment_state import Enrolled, EnrollmentRefused
from agent.snapshot import SnapshotError
from provisioning import documents as d
from provisioning.errors import KeyFileError
from provisioning.keys import load_public_key

log = logging.getLogger(__name__)

#: camera id -> JPEG bytes (raises SnapshotError).
Snapshotter = Callable[[str], Awaitable[bytes]]


class TechnicianDesk:
    """Serves a paired technician's requests for one runtime."""

    def __init__(
        self,
        config: AgentConfig,
        device_key: Ed25519PublicKey,
        audit: AuditLog,
        *,
        clock: Callable[[], float],
        busy: Callable[[], str | None] = lambda: None,
        snapshot: Snapshotter | None = None,
        zones: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.device_key = device_key
        self.audit = audit
        self.clock = clock
        self.busy = busy
        self.snapshot = snapshot
        self.zones = dict(zones or {})
        self.current: Enrolled | None = None
        #: Set once the answer to an accepted enrollment was sent: start again with it.
        self.enrolled = asyncio.Event()
        self._restart = False
        #: One enrollment at a time: each checks the installed one (``current``) and
        #: swaps the state directory's link; two at once could each pass the version
        #: check and one could remove the other's new enrollment.
        self._enrolling = asyncio.Lock()

    async def handle(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        """Answer one opened request (never raises on bad input)."""
        op = request.get("op")
        if op == "enroll":
            return await self._enroll(request.get("bundle"), peer)
        if op == "check":
            return await self._check(request.get("camera"), peer)
        return _error("malformed", f"op: {str(op)[:20]!r} is not enroll or check")

    async def _enroll(self, bundle: Any, peer: str) -> dict[str, Any]:
        reason = self.busy()
        if reason is None and self._enrolling.locked():
            reason = "another enrollment is being installed"
        if reason is None and self._restart:
            reason = "an enrollment was installed: the device is starting again with it"
        if reason is not None:
            return self._refused("busy", reason, peer)
        async with self._enrolling:
            try:
                enrolled = await asyncio.to_thread(self._apply, bundle, self.clock())
            except EnrollmentRefused as exc:
                return self._refused(exc.code, exc.detail, peer)
            except OSError as exc:  # nothing was committed (the link never moved)
                log.error("enrollment could not be written: %s", exc)
                return self._refused("storage", f"the enrollment could not be written: {exc}", peer)
        e = enrolled.enrollment
        log.warning("enrolled: v%d, building %s, cameras %s", e.version, e.building, len(e.cameras))
        self.audit.record_soon(
            "enrolled",
            peer=peer,
            version=e.version,
            building=e.building,
            receiver=e.receiver_url,
            cameras=dict(e.cameras),
        )
        self.current = enrolled
        self._restart = True  # after the answer is on its way (after_reply)
        return {"ok": {"version": e.version, "building": e.building, "device": e.device}}

    def after_reply(self) -> None:
        """The answer was sent: if it installed an enrollment, the device starts again."""
        if self._restart:
            self.enrolled.set()

    def _apply(self, bundle: Any, now: float) -> Enrolled:
        """Check and install ``bundle`` (a worker thread: it reads and writes files)."""
        return enrollment_state.apply(
            self.config.state_dir,
            bundle,
            device_id=self.config.device_id,
            device_key=self.device_key,
            now=now,
            current=self.current,
            pinned_authority=self._pinned_authority(),
            check=lambda e: check_enrollment(self.config.path, self.config.device_id, e),
        )

    def _pinned_authority(self) -> Ed25519PublicKey | None:
        """The authority the image pins (``[trust] authority`` of the file), if any."""
        path = self.config.trust.authority
        if path is None or path.parent.name.startswith(enrollment_state.LINK):
            return None  # not the image's: an installed enrollment (apply checks it)
        try:
            return load_public_key(path)
        except KeyFileError as exc:
            raise EnrollmentRefused("other_authority", f"[trust] authority: {exc}") from exc

    async def _check(self, camera: Any, peer: str) -> dict[str, Any]:
        zone = self.zones.get(camera) if isinstance(camera, str) else None
        if zone is None or self.snapshot is None:
            return self._refused("unknown_camera", f"camera {str(camera)[:40]!r}", peer)
        try:
            jpeg = await self.snapshot(camera)
        except SnapshotError as exc:
            return self._refused(exc.code, exc.detail, peer)
        log.warning("camera check: snapshot of %s (%s) for a technician at %s", camera, zone, peer)
        self.audit.record_soon("camera_check", camera=camera, zone=zone, peer=peer)
        return {"ok": {"camera": camera, "zone": zone, "jpeg": d.b64url(jpeg)}}

    def _refused(self, code: str, detail: str, peer: str) -> dict[str, Any]:
        log.warning("technician request from %s refused: %s: %s", peer, code, detail)
        self.audit.record_soon("technician_refused", peer=peer, code=code, detail=detail[:300])
        return _error(code, detail)


def _error(code: str, detail: str) -> dict[str, Any]:
    return {"error": code, "detail": detail}
