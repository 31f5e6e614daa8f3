"""Sessions on the uplink: what leaves the building, from when, and until when.

A session (an emergency's, or a continuous share of the exterior cameras: DECISIONS.md,
"Exterior cameras shared continuously") streams the cameras :mod:`agent.zones` lets
out. It opens with each camera's pre-roll from RAM (a share: from the newest
keyframe), described as the stream says (or as configured where it does not), with
the chain checkpoints of that pre-roll; then its live lane gets every packet as it
comes. The start is audited (``session_start``, ``disclosure``), and so is the end,
with each camera's last seq signed (``session_end``). A session resumed after a
restart keeps its first seqs and the checkpoints not answered yet
(:mod:`agent.owed_sessions`). A camera with no footage yet when a session opens is
not left out (:meth:`Streaming.start`, :meth:`Streaming.join`). Who may start or end
one: :mod:`agent.alarm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import replace
from typing import Any

from agent import protocol as p
from agent.audit import AuditLog
from agent.capture import Capture
from agent.checkpoints import Checkpoints
from agent.config import AgentConfig, CameraConfig
from agent.emergency import Emergency, Ended, Session, share_session
from agent.messages import MAX_FPS, MAX_SIDE
from agent.owed_sessions import OwedSessions
from agent.store import SegmentStore
from agent.uplink import SessionStream, UplinkClient
from agent.zones import cameras_to_share, cameras_to_stream, is_share
from hardware import EncodedPacket, StreamInfo

log = logging.getLogger(__name__)

#: A continuous exterior share is recorded in sessions of this many hours.
SHARE_HOURS = 1.0
#: A share starts with a camera's newest GOP if it sent something this recently (or
#: within ``preroll_s``, if longer); else the camera joins at its next keyframe.
SHARE_FRESH_S = 1.0


class Streaming:
    """Starts and ends the device's sessions on the uplink; feeds the live lane."""

    def __init__(
        self,
        config: AgentConfig,
        emergency: Emergency,
        capture: Capture,
        uplink: UplinkClient,
        store: SegmentStore,
        checkpoints: Checkpoints,
        owed: OwedSessions,
        audit: AuditLog,
        *,
        clock: Callable[[], float],
        persist: Callable[[], None],
        on_change: Callable[[], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
    ) -> None:
        self.config = config
        self.emergency = emergency
        self.capture = capture
        self.uplink = uplink
        self.store = store
        self.checkpoints = checkpoints
        self.owed = owed
        self.audit = audit
        self.clock = clock
        #: Writes the state files (the emergency and the sessions owed).
        self.persist = persist
        #: Something the LED shows changed.
        self.on_change = on_change
        #: Runs a task of the agent's (named; it stops with the agent).
        self.spawn = spawn
        #: The continuous exterior share streaming now (the building's policy), if any.
        self.share: Session | None = None
        #: The session whose live lane gets every packet as it comes (None: idle), and
        #: the index of each of its cameras.
        self.live: tuple[SessionStream, dict[str, int]] | None = None
        #: The cameras the live session may stream that had no footage when it opened:
        #: each joins it at its first keyframe (by id).
        self.pending: dict[str, CameraConfig] = {}
        #: An emergency opened while no camera had footage (whether it resumes after a
        #: restart, and when it opened on the monotonic clock): it streams at the first
        #: keyframe of one of its cameras (with ``preroll_s = 0``: the first after then).
        self.waiting: tuple[Session, bool, int] | None = None
        #: When the live session opened (monotonic ns): its cameras' pre-roll, and that of
        #: a camera joining it, is measured from then (:meth:`agent.preroll.PreRoll.snapshot`).
        self.since_ns = 0

    @property
    def live_stream(self) -> SessionStream | None:
        """The session streaming live, if any."""
        return None if self.live is None else self.live[0]

    def begin(self, session: Session) -> None:
        """Audit a session's start (an emergency's, or a share's), then stream it."""
        if not is_share(session):
            self.end_share("an emergency started")  # the emergency carries every camera
        self.audit.record_soon(
            "session_start",
            session=session.id,
            building=session.building,
            by=audited_by(session.started_by),
            cameras=list(session.cameras),
            expires_at=session.expires_at,
        )
        self.start(session)

    def start(self, session: Session, *, resume: bool = False, since_ns: int | None = None) -> None:
        """Open ``session`` on the uplink with its pre-roll and stream it live (``resume``:
        after a restart, with what was saved of it; ``since_ns``: when it opened on the
        monotonic clock, by default now).

        With ``preroll_s = 0`` nothing from before ``since_ns`` goes out: each camera
        streams from its first keyframe after it (the encoders we drive are asked for one
        at once), and the session opens at the first of them.

        A camera with no footage yet (an IP camera still booting after a power cut) is
        not left out: one the session already streamed before a restart is in it at once
        as it was described then (what the store holds of it goes out, live follows at
        its first keyframe); any other joins the session at its first keyframe
        (:meth:`join`). DECISIONS.md, "A camera with no footage yet joins the session".
        """
        share = is_share(session)
        for source in () if share else self.capture.sources.values():
            force = getattr(source, "force_keyframe", None)  # encoders we drive (Pi, synthetic)
            if callable(force):
                force()  # the live view gets a fresh keyframe at once
        descs: list[p.CameraDesc] = []
        preroll: dict[int, list[EncodedPacket]] = {}
        stored: dict[int, int] = {}  # index -> the last seq the store holds (nothing in RAM)
        pending: list[CameraConfig] = []
        owed = self.owed.entries.get(session.id)
        first_seqs: dict[str, int] = dict(owed["first"]) if resume and owed else {}
        acked_by_id: dict[str, int] = dict(owed["acked"]) if resume and owed else {}
        saved = _saved_cameras(owed) if resume else {}
        allowed = cameras_to_stream(self.config.cameras, session)
        for camera_id in set(saved) - {c.id for c in allowed}:
            log.error(
                "session %s: camera %s, owed, is no longer configured: not sent",
                session.id,
                camera_id,
            )
        now = time.monotonic_ns() if since_ns is None else since_ns
        for camera in allowed:
            ring = self.capture.prerolls[camera.id]
            if share:  # a share has no pre-roll: from the newest keyframe on
                fresh = max(ring.window_ns, int(SHARE_FRESH_S * 1e9))
                packets = ring.newest_gop(now, fresh)
            else:
                # Only the window before now: a camera down before the press holds what it
                # sent last, however old (it joins at its next keyframe instead).
                packets = ring.snapshot(now)
            index = len(descs)
            if packets:
                descs.append(
                    self._describe(
                        camera,
                        index,
                        # After a restart the session keeps its first seq: what came before
                        # the restart is owed from the sealed store.
                        min(first_seqs.get(camera.id, packets[0].seq), packets[0].seq),
                        # Live lane from the GOP the press fell in; after a restart from the
                        # newest keyframe (the RAM pre-roll of a resumed session is not from
                        # before the press).
                        _last_keyframe(packets).seq,
                    )
                )
                preroll[index] = packets
            elif camera.id in saved:
                first = int(first_seqs.get(camera.id, saved[camera.id].first_seq))
                log.error(
                    "camera %s has no footage yet; in session %s from the sealed store, "
                    "live once it runs",
                    camera.id,
                    session.id,
                )
                descs.append(
                    replace(
                        saved[camera.id],
                        index=index,
                        zone=camera.zone,
                        first_seq=first,
                        live_seq=first,
                        end_seq=None,
                    )
                )
                segments = self.store.segments(camera.id)
                stored[index] = segments[-1].last_seq if segments else first - 1
            else:
                log.log(
                    logging.INFO if len(ring) and not ring.window_ns else logging.ERROR,
                    "camera %s has no decodable footage %s yet; joins session %s when it has",
                    camera.id,
                    "from after the press (no pre-roll)" if not ring.window_ns else "at all",
                    session.id,
                )
                pending.append(camera)
        if not descs and share:
            return  # housekeeping starts it again once the cameras run
        if not descs:  # pressed right after boot, or no pre-roll: stream at the first keyframe
            if self.config.preroll_s:
                log.error(
                    "session %s: no camera has footage yet; streaming once one has", session.id
                )
            else:
                log.warning("session %s: no pre-roll; streaming from the next keyframe", session.id)
            self.waiting = (session, resume, now)
            return
        open_ = p.SessionOpen(
            session.id,
            session.building,
            session.started_by,
            session.started_at,
            session.expires_at,
            tuple(descs),
        )
        acked = {d.index: acked_by_id[d.id] for d in descs if d.id in acked_by_id}
        stream = self.uplink.start_session(open_, preroll, acked=acked, emergency=not share)
        for index, last in stored.items():  # its end, should the session end before it runs
            stream.last_pushed[index] = max(stream.acked[index], last)
        self.checkpoints.from_first(stream)  # the chain of the pre-roll, signed before the press
        self.checkpoints.restore(stream, owed if resume else None)
        self.set_live((stream, {d.id: d.index for d in descs}), pending)
        self.since_ns = now
        if share:
            self.share = session
        self.audit.record_soon(
            "disclosure",
            kind=str(session.started_by.get("kind")),
            session=session.id,
            receiver=self.config.receiver_origin,
            device=self.config.device_id,
            cameras=[{"id": d.id, "zone": d.zone, "first": d.first_seq} for d in descs],
            resumed=resume,
        )
        self.owed.remember(stream)  # a restart resumes it
        self.persist()
        self.on_change()
        if resume:
            self.resume_owed()

    def join(self, camera_id: str) -> None:
        """A camera of the live session that had no footage when it opened has a keyframe
        now: it joins at the next index (the others keep theirs), the session is opened
        again with it, and its disclosure is audited."""
        live, camera = self.live, self.pending.get(camera_id)
        # Measured from the session's start: with preroll_s = 0, its first keyframe after.
        packets = self.capture.prerolls[camera_id].snapshot(self.since_ns)
        if live is None or camera is None or not packets:
            return
        stream, indexes = live
        if stream.close_reason is not None:
            return
        del self.pending[camera_id]
        desc = self._describe(
            camera, len(stream.open.cameras), packets[0].seq, _last_keyframe(packets).seq
        )
        self.uplink.add_camera(stream, desc, packets)
        indexes[camera_id] = desc.index
        self.checkpoints.from_first(stream, desc)
        log.warning(
            "camera %s joins session %s from seq %d (index %d)",
            camera_id,
            stream.id,
            desc.first_seq,
            desc.index,
        )
        self.audit.record_soon(
            "disclosure",
            kind=str(stream.open.started_by.get("kind")),
            session=stream.id,
            receiver=self.config.receiver_origin,
            device=self.config.device_id,
            cameras=[{"id": desc.id, "zone": desc.zone, "first": desc.first_seq}],
            resumed=False,
            joined=True,
        )
        self.owed.remember(stream)  # a restart resumes it with the camera
        self.persist()
        self.on_change()

    def _describe(
        self, camera: CameraConfig, index: int, first_seq: int, live_seq: int
    ) -> p.CameraDesc:
        """A camera of a session as its stream says (as configured where it does not)."""
        info = self.capture.sources[camera.id].info
        width, height, fps = _described_size(info, camera)
        return p.CameraDesc(
            index,
            camera.id,
            camera.zone,
            info.codec,
            width,
            height,
            fps,
            info.extradata,
            first_seq,
            live_seq,
        )

    def extend(self, session: Session) -> None:
        """An emergency was extended: audited, and the receiver learns its new expiry."""
        self.audit.record_soon(
            "session_extend",
            session=session.id,
            by=audited_by(session.extensions[-1]),
            expires_at=session.expires_at,
        )
        self.uplink.extend_session(session.id, session.expires_at)

    def resume_owed(self) -> None:
        """Queue every session still owed but the active one (it resumes with live)."""
        self.owed.resume(self.uplink, self.store, self.checkpoints, self.emergency.active)

    async def when_ready(self, session: Session, *, resume: bool = True) -> None:
        """Stream an open session once its cameras run (after a restart), or after 10 s
        without those that do not: they are in it all the same (:meth:`start`)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                # A camera the config no longer has (renamed while stopped) is not waited
                # for: the session streams the cameras there are.
                ready = [c for c in session.cameras if c in self.capture.sources]
                await asyncio.gather(*(self.capture.wait_ready(c) for c in ready))
        active = self.emergency.active  # a press meanwhile replaced the object: match ids
        if active is not None and active.id == session.id and self.uplink.stream(active.id) is None:
            log.warning("streaming emergency %s now that cameras run", session.id)
            self.start(active, resume=resume)

    def keep_share(self) -> None:
        """While no emergency is open, share the exterior cameras if the building chose
        to, in a new session every :data:`SHARE_HOURS` (the housekeeping calls this)."""
        if self.config.share_exterior and self.emergency.active is None:
            share = self.share
            if share is not None and self.clock() >= share.expires_at:
                self.end_share("rotated")  # one recording per SHARE_HOURS
            if self.share is None:
                self.start_share()

    def start_share(self) -> None:
        """Share the exterior cameras (the building's policy) while no emergency is open."""
        cameras = cameras_to_share(self.config.cameras, share_exterior=self.config.share_exterior)
        ready = tuple(c for c in cameras if len(self.capture.prerolls[c]))
        if ready and self.share is None and self.emergency.active is None:
            session = share_session(self.config.building, self.clock(), ready, SHARE_HOURS)
            self.begin(session)

    def end_share(self, reason: str) -> None:
        """End the share streaming now, if any."""
        share, self.share = self.share, None
        if share is None:
            return
        if self.live is not None and self.live[0].id == share.id:
            self.set_live(None)
        self.uplink.end_session(share.id, reason)
        self.audit.record_soon(
            "session_end", session=share.id, reason=reason, by=None, cameras=self.ends(share.id)
        )
        self.checkpoints.cut(share.id)

    def stop(self, ended: Ended) -> None:
        """An emergency ended: close its session (what is owed still goes out)."""
        sid = ended.session.id
        log.warning("emergency %s ended: %s", sid, ended.session.end_reason)
        self.set_live(None)
        self.uplink.end_session(sid, ended.session.end_reason or "ended")
        if self.uplink.stream(sid) is None and sid in self.owed.entries:
            # It ended before it streamed again after a restart (it expired while the agent
            # was down): what the receiver is owed goes out from the sealed store.
            self.resume_owed()
        ended_by = ended.session.ended_by
        self.audit.record_soon(
            "session_end",
            session=sid,
            reason=ended.session.end_reason,
            by=None if ended_by is None else audited_by(ended_by),
            cameras=self.ends(sid),
        )
        self.checkpoints.cut(sid)
        self.persist()
        self.on_change()

    def ends(self, session_id: str) -> list[dict[str, Any]] | None:
        """Each camera's last seq in an ended session, as its ``session_end`` signs it, so
        that no one can cut the session's tail unnoticed (None: not streamed, no seqs)."""
        stream = self.uplink.stream(session_id)
        if stream is None:
            return None
        return [
            {"id": desc.id, "last": end}
            for desc, end in zip(stream.open.cameras, stream.end_seq, strict=True)
            if end is not None
        ]

    def set_live(
        self,
        live: tuple[SessionStream, dict[str, int]] | None,
        pending: Iterable[CameraConfig] = (),
    ) -> None:
        """The session whose live lane gets every packet as it comes (None: idle), and its
        cameras with no footage yet."""
        self.live = live
        self.pending = {} if live is None else {c.id: c for c in pending}
        self.waiting = None
        self.capture.set_live(live is not None)

    def on_packet(self, packet: EncodedPacket) -> None:
        """A camera's packet (a capture subscriber): to the live lane, if one streams it."""
        if self.live is None:
            if self.waiting is not None:
                self._start_waiting(packet.camera)
            return
        stream, indexes = self.live
        index = indexes.get(packet.camera)
        if index is not None:
            self.uplink.push(stream, index, packet)
        elif packet.camera in self.pending:
            self.join(packet.camera)  # its first keyframe (the pre-roll starts at one)

    def _start_waiting(self, camera_id: str) -> None:
        """A camera has footage: stream the emergency that waited for one."""
        assert self.waiting is not None
        session, resume, since = self.waiting
        active = self.emergency.active
        if active is None or active.id != session.id:
            self.waiting = None  # it ended meanwhile
            return
        allowed = {c.id for c in cameras_to_stream(self.config.cameras, active)}
        if camera_id in allowed and self.capture.prerolls[camera_id].snapshot(since):
            log.warning("streaming emergency %s now that camera %s runs", session.id, camera_id)
            self.start(active, resume=resume, since_ns=since)


def audited_by(event: Mapping[str, Any]) -> dict[str, Any]:
    """Who acted, for the audit trail (without the time: the entry has its own)."""
    return {k: v for k, v in event.items() if k not in ("at", "expires_at")}


def _described_size(info: StreamInfo, camera: CameraConfig) -> tuple[int, int, float]:
    """Width, height and rate to describe ``camera`` with: the stream's, or where it does
    not say (an IP camera without a frame rate, a size not read yet) the configured ones;
    the receiver refuses a session_open with a 0 in them (and the agent would send it
    again and again)."""
    width, height, fps = info.width, info.height, info.fps
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        log.warning(
            "camera %s: stream size %dx%d unknown or out of range; described as configured "
            "(%dx%d)", camera.id, width, height, camera.width, camera.height,
        )  # fmt: skip
        width, height = camera.width, camera.height
    if not 0 < fps <= MAX_FPS:
        log.warning(
            "camera %s: stream rate %r unknown or out of range; described as configured (%g)",
            camera.id, fps, camera.fps,
        )  # fmt: skip
        fps = camera.fps
    return width, height, fps


def _last_keyframe(packets: list[EncodedPacket]) -> EncodedPacket:
    return next(pkt for pkt in reversed(packets) if pkt.keyframe)


def _saved_cameras(entry: Mapping[str, Any] | None) -> dict[str, p.CameraDesc]:
    """The cameras of a session as its saved ``session_open`` described them (owed.json)."""
    if entry is None:
        return {}
    try:
        event = p.decode_control(entry["open"])
    except (KeyError, TypeError, ValueError, p.ProtocolError) as exc:
        log.error("a saved session_open is unreadable: %r", exc)
        return {}
    return {c.id: c for c in event.cameras} if isinstance(event, p.SessionOpen) else {}
