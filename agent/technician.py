"""What a paired technician may ask of a device (``POST /v1/pairing/channel``).

Both runtimes serve it: :class:`agent.first_boot.FirstBoot` (enroll) and the
armed :class:`agent.daemon.Agent` (re-enroll, check the cameras' aim).

- ``{"op": "enroll", "bundle": {...}}`` installs an enrollment atomically
  (:func:`agent.enrollment_state.apply`, in a worker thread); once the
  answer is sent, :attr:`TechnicianDesk.enrolled` is set, so the device starts
  again with it
  (:func:`agent.boot.run_agent`). Refused while an emergency is active.
- ``{"op": "check", "camera": ID}``: one JPEG snapshot (:mod:`agent.snapshot`) to
  check a camera's aim: only a technician who proved the setup code, in the
  pairing window, gets here. It must never become a feed (docs/DECISIONS.md,
  "The technician's camera check is not a feed"):

  - refused ``emergency_active`` while an emergency is active (the police have
    the footage);
  - an interior camera only at the first start after an enrollment was installed
    (``provision enroll``, a re-enrollment or ``rotate``: the district's key, not
    the label alone): the runtime that installs one leaves a note
    (:data:`INTERIOR_NOTE`), the next start takes it (:meth:`TechnicianDesk.
    claim_interior_checks`); at any other start ``interior_locked``;
  - each camera at most once per :data:`CHECK_EVERY_S` (``rate_limited`` with
    ``retry_after``, seconds) and :data:`CHECKS_PER_CAMERA` times per pairing
    session (``check_limit``);
  - the ``camera_check`` entry is durably on the audit trail before the picture
    is returned; if it cannot be written, ``audit_failed`` and no picture.

Answers are ``{"ok": {...}}`` or ``{"error": CODE, "detail": ...}``; refusals
are audited with their code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import enrollment_state
from agent.audit import AuditLog
from agent.boot import check_enrollment
from agent.config import AgentConfig
from agent.enrollment_state import Enrolled, EnrollmentRefused
from agent.snapshot import SnapshotError
from agent.statefile import fsync_dir, write_atomic
from provisioning import documents as d
from provisioning.errors import KeyFileError
from provisioning.keys import load_public_key

log = logging.getLogger(__name__)

#: camera id -> JPEG bytes (raises SnapshotError).
Snapshotter = Callable[[str], Awaitable[bytes]]

#: A camera is checked at most once this often (seconds): enough to look, turn the
#: camera and look again; far from a feed.
CHECK_EVERY_S: Final = 10.0
#: Pictures of one camera per pairing session: a first look and two after adjusting.
CHECKS_PER_CAMERA: Final = 3
#: The check's audit entry must be durable within this long, or no picture is given.
AUDIT_TIMEOUT_S: Final = 10.0
#: In ``state/``: the version of the enrollment just installed (interior checks at the
#: next start only).
INTERIOR_NOTE: Final = "interior-check"


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
        #: Whether interior cameras may be checked at this start (claim_interior_checks).
        self.interior_checks = False
        self.mono: Callable[[], float] = time.monotonic
        #: camera -> when its last picture was given (or is being made), this start.
        self._last_check: dict[str, float] = {}
        #: The pairing session the counts are for, and the pictures given in it per camera.
        self._session: str | None = None
        self._given: Counter[str] = Counter()
        #: camera -> the check whose rate_limited refusals were audited (one each).
        self._limited_audited: dict[str, float] = {}

    def claim_interior_checks(self) -> bool:
        """At an enrolled runtime's start: take the note the runtime that installed this
        enrollment left (:data:`INTERIOR_NOTE`); interior cameras may then be checked
        at this start only. The note is removed first: one that cannot be removed
        grants nothing (it would grant every start after)."""
        path = self.config.state_dir / INTERIOR_NOTE
        try:
            noted = path.read_text(encoding="ascii").strip()
            path.unlink()
            fsync_dir(path.parent)
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError) as exc:
            log.error("%s: %s; interior cameras cannot be checked at this start", path, exc)
            return False
        current = self.current
        self.interior_checks = current is not None and noted == str(current.version)
        if self.interior_checks:
            log.warning("enrollment v%s was just installed: interior cameras may be checked", noted)
        return self.interior_checks

    async def handle(self, request: dict[str, Any], peer: str, session: str = "") -> dict[str, Any]:
        """Answer one opened request of pairing session ``session`` (never raises on bad
        input)."""
        op = request.get("op")
        if op == "enroll":
            return await self._enroll(request.get("bundle"), peer)
        if op == "check":
            return await self._check(request.get("camera"), peer, session)
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
        """Check and install ``bundle`` (a worker thread: it reads and writes files); note
        its version so that the next start lets the technician check interior cameras."""
        enrolled = enrollment_state.apply(
            self.config.state_dir,
            bundle,
            device_id=self.config.device_id,
            device_key=self.device_key,
            now=now,
            current=self.current,
            pinned_authority=self._pinned_authority(),
            check=lambda e: check_enrollment(self.config.path, self.config.device_id, e),
        )
        try:
            write_atomic(self.config.state_dir / INTERIOR_NOTE, f"{enrolled.version}\n".encode())
        except OSError as exc:  # installed all the same: only the interior check is lost
            log.error("interior cameras cannot be checked at the next start: %s", exc)
        return enrolled

    def _pinned_authority(self) -> Ed25519PublicKey | None:
        """The authority the image pins (``[trust] authority`` of the file), if any."""
        path = self.config.trust.authority
        if path is None or path.parent.name.startswith(enrollment_state.LINK):
            return None  # not the image's: an installed enrollment (apply checks it)
        try:
            return load_public_key(path)
        except KeyFileError as exc:
            raise EnrollmentRefused("other_authority", f"[trust] authority: {exc}") from exc

    async def _check(self, camera: Any, peer: str, session: str) -> dict[str, Any]:
        zone = self.zones.get(camera) if isinstance(camera, str) else None
        if zone is None or self.snapshot is None:
            return self._refused("unknown_camera", f"camera {str(camera)[:40]!r}", peer)
        assert isinstance(camera, str)
        if self.busy() is not None:
            return self._emergency(peer)
        if zone != "exterior" and not self.interior_checks:
            detail = (
                f"camera {camera} is {zone}: interior cameras can be checked only at the "
                "first start after an enrollment was installed (provision enroll, or rotate)"
            )
            return self._refused("interior_locked", detail, peer)
        if session != self._session:
            self._session = session
            self._given.clear()
        if self._given[camera] >= CHECKS_PER_CAMERA:
            detail = f"camera {camera} was checked {CHECKS_PER_CAMERA} times in this pairing"
            return self._refused("check_limit", detail, peer)
        now, last = self.mono(), self._last_check.get(camera)
        if last is not None and now - last < CHECK_EVERY_S:
            retry = max(1, math.ceil(CHECK_EVERY_S - (now - last)))
            detail = f"camera {camera} was checked less than {CHECK_EVERY_S:g} s ago"
            answer = _error("rate_limited", f"{detail}; retry in {retry} s")
            if self._limited_audited.get(camera) != last:  # once per check, not per request
                self._limited_audited[camera] = last
                self._refused("rate_limited", detail, peer)
            return {**answer, "retry_after": retry}
        # Held across the awaits below: a second request meanwhile is rate limited.
        self._last_check[camera] = now
        self._given[camera] += 1
        answer = await self._picture(camera, zone, peer)
        if "error" in answer:  # no picture given: it does not count
            if self._last_check.get(camera) == now:
                if last is None:
                    del self._last_check[camera]
                else:
                    self._last_check[camera] = last
            if self._session == session:
                self._given[camera] -= 1
        return answer

    async def _picture(self, camera: str, zone: str, peer: str) -> dict[str, Any]:
        """The snapshot, once its ``camera_check`` entry is durably on the trail."""
        assert self.snapshot is not None
        try:
            jpeg = await self.snapshot(camera)
        except SnapshotError as exc:
            return self._refused(exc.code, exc.detail, peer)
        if self.busy() is not None:  # an emergency began while the picture was made
            return self._emergency(peer)
        entry = self.audit.record_durable_soon("camera_check", camera=camera, zone=zone, peer=peer)
        try:
            async with asyncio.timeout(AUDIT_TIMEOUT_S):
                durable = await asyncio.wrap_future(entry)
        except TimeoutError:
            durable = False
        if not durable:
            log.error("camera check of %s for %s: not on the audit trail, no picture", camera, peer)
            detail = "the check could not be written to the audit trail: no picture without it"
            return self._refused("audit_failed", detail, peer)
        log.warning("camera check: snapshot of %s (%s) for a technician at %s", camera, zone, peer)
        return {"ok": {"camera": camera, "zone": zone, "jpeg": d.b64url(jpeg)}}

    def _emergency(self, peer: str) -> dict[str, Any]:
        detail = "an emergency is active: its footage goes to the police; check the aim after it"
        return self._refused("emergency_active", detail, peer)

    def _refused(self, code: str, detail: str, peer: str) -> dict[str, Any]:
        log.warning("technician request from %s refused: %s: %s", peer, code, detail)
        self.audit.record_soon("technician_refused", peer=peer, code=code, detail=detail[:300])
        return _error(code, detail)


def _error(code: str, detail: str) -> dict[str, Any]:
    return {"error": code, "detail": detail}
