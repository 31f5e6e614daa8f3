"""The building agent: wires cameras, pre-roll, buttons, emergency and uplink.

Lifecycle in one place: :class:`Agent` is an async context manager; entering
it starts every task (named, referenced), leaving it stops them and closes the
hardware. Library threads (gpiozero) only ever reach the loop through
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from agent import chain as hash_chain
from agent import owed
from agent import protocol as p
from agent.audit import AuditLog
from agent.audit_feed import AuditFeed
from agent.capture import Capture, RetryingSource
from agent.changes import Changes
from agent.config import AgentConfig, CameraConfig
from agent.discovery import Advertiser, advertise_when_possible
from agent.emergency import Emergency, Ended, Extended, Session, Started, share_session
from agent.enrollment_state import Enrolled
from agent.local_api import LocalApi
from agent.messages import MAX_FPS, MAX_SIDE
from agent.policy import Outcome, apply_trigger, refused
from agent.sdnotify import tasks_alive
from agent.segment import StreamDesc, parse_recipient
from agent.snapshot import SnapshotError, jpeg_from_packets
from agent.statefile import (
    SequenceReservations,
    backup_path,
    check_sequences,
    read_state,
    write_atomic,
    write_json,
)
from agent.store import Pin, SegmentStore
from agent.technician import TechnicianDesk
from agent.trigger_gate import TriggerGate
from agent.uplink import SessionStream, UplinkClient
from agent.zones import cameras_to_share, cameras_to_stream, is_share
from hardware import CameraError, CameraSource, EncodedPacket, StreamInfo
from hardware.button import PanicButton, PressEvent, loop_callback
from hardware.buzzer import StatusBuzzer
from hardware.led import LedPattern, StatusLed
from provisioning.errors import KeyFileError, ProvisioningError
from provisioning.keys import load_private_key, read_small
from provisioning.triggers import Rejected

log = logging.getLogger(__name__)


def make_source(camera: CameraConfig) -> CameraSource:
    """The camera source a config entry describes.

    Each source's module is imported here, when a camera needs it: PyAV (RTSP,
    file, synthetic), numpy (synthetic) and picamera2 are loaded only by an
    agent that has such a camera.
    """
    if camera.source == "rtsp":
        from hardware.rtsp import RtspCamera

        assert camera.url is not None  # the config requires it
        return RtspCamera(camera.id, camera.url)
    if camera.source == "file":
        from hardware.av_source import FileCamera

        assert camera.path is not None
        return FileCamera(camera.id, camera.path)
    if camera.source == "picamera":
        from hardware.picamera import PiCamera

        return PiCamera(
            camera.id,
            width=camera.width,
            height=camera.height,
            fps=camera.fps,
            keyframe_interval_s=camera.keyframe_interval_s,
        )
    from hardware.synthetic import SyntheticCamera

    return SyntheticCamera(
        camera.id,
        width=camera.width,
        height=camera.height,
        fps=camera.fps,
        keyframe_interval_s=camera.keyframe_interval_s,
    )


def make_pin_factory(name: str | None) -> Any:
    """The gpiozero pin factory named in config (``None``: gpiozero's own choice)."""
    if name is None:
        return None
    if name == "mock":
        from gpiozero.pins.mock import MockFactory

        return MockFactory()
    if name == "lgpio":
        from gpiozero.pins.lgpio import LGPIOFactory

        return LGPIOFactory()
    if name == "rpigpio":
        from gpiozero.pins.rpigpio import RPiGPIOFactory

        return RPiGPIOFactory()
    if name == "pigpio":
        from gpiozero.pins.pigpio import PiGPIOFactory

        return PiGPIOFactory()
    from gpiozero.pins.native import NativeFactory

    return NativeFactory()


class Agent:
    """One building agent. ``async with Agent(config) as agent: await agent.wait_closed()``."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        pin_factory: Any = None,
        source_factory: Callable[[CameraConfig], CameraSource] = make_source,
        clock: Callable[[], float] = time.time,
        enrolled: Enrolled | None = None,
    ) -> None:
        if not config.provisioned:
            raise ValueError("an unprovisioned device runs agent.first_boot.FirstBoot")
        self.config = config
        self.clock = clock
        #: The installed enrollment this configuration came from (None: a hand-written one).
        self.enrollment = enrolled
        self.pin_factory = (
            pin_factory if pin_factory is not None else make_pin_factory(config.pin_factory)
        )
        self._source_factory = source_factory
        self.state_path = config.state_dir / "emergency.json"
        self.owed_path = config.state_dir / "owed.json"
        self.emergency = Emergency(config.building, config.session_duration_s)
        self.buttons: dict[str, PanicButton] = {}
        self.led: StatusLed | None = None
        self.buzzer: StatusBuzzer | None = None
        self._shown = LedPattern.OFF
        self.capture: Capture
        self.uplink: UplinkClient
        self.store: SegmentStore
        self.audit: AuditLog
        self.gate: TriggerGate
        #: The continuous exterior share streaming now (the building's policy), if any.
        self.share: Session | None = None
        self.local_api: LocalApi | None = None
        self.advertiser: Advertiser | None = None
        self._owed: dict[str, Any] = {}
        #: The owed sessions' footage, pinned from owed.json at start until the sessions
        #: are queued again (with pins of their own): the cameras must run first.
        self._boot_pins: list[Pin] = []
        self._owed_saved = ""
        self._streams: dict[str, StreamDesc] = {}
        self._live: tuple[SessionStream, dict[str, int]] | None = None
        #: The receiver's access-log head last anchored in the trail, and when (monotonic).
        self._access_anchor: tuple[int, str, float] = (0, "", -math.inf)
        self._tasks: list[asyncio.Task[None]] = []
        self._persisting: set[asyncio.Task[None]] = set()
        self._persist_lock = asyncio.Lock()
        self._stopped = asyncio.Event()
        self.press_log: list[PressEvent] = []
        #: The enrollment certificate has expired (the LED shows a fault).
        self._certificate_expired = False
        #: When each expiry (audit event name) was last warned of (monotonic).
        self._expiry_warned: dict[str, float] = {}
        self.changes = Changes()

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        cfg = self.config
        key = load_private_key(cfg.device_key)
        self.device_public_key = key.public_key()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(cfg.state_dir / "audit.log", self.clock, signer=key)
        # A damaged state file is moved aside and audited: the buttons arm regardless.
        self.emergency, why = read_state(
            self.state_path,
            lambda doc: Emergency.from_json(cfg.building, cfg.session_duration_s, doc),
            self.emergency,
        )
        self._state_damaged(self.state_path, why)
        none_owed: dict[str, Any] = {}
        self._owed, why = read_state(self.owed_path, owed.parse, none_owed)
        self._state_damaged(self.owed_path, why)
        # Every camera's footage hash chain, signed with the device key (agent/chain.py). It
        # keeps its checkpoints as long as a session's pre-roll may reach back, and more.
        self.chains = hash_chain.Chains(
            cfg.device_id, key, keep_us=int((cfg.preroll_s + CHAIN_KEEP_EXTRA_S) * 1e6)
        )
        self.desk = TechnicianDesk(
            cfg,
            self.device_public_key,
            self.audit,
            clock=self.clock,
            busy=self._busy,
            snapshot=self.snapshot,
            zones={c.id: c.zone for c in cfg.cameras},
        )
        self.desk.current = self.enrollment
        self.gate = TriggerGate(
            cfg.building, cfg.trust, cfg.state_dir, self.audit, clock=self.clock
        )
        self.store = SegmentStore(
            cfg.store.directory,
            [parse_recipient(r, where="store.recipients") for r in cfg.store.recipients],
            audit=self.audit,
            boot_id=_boot_id(),
            segment_s=cfg.store.segment_s,
            max_age_s=cfg.store.max_age_s,
            quota_bytes=cfg.store.quota_bytes,
            min_free_bytes=cfg.store.min_free_bytes,
            clock=self.clock,
            attest=self._attest_segment,
        )
        await asyncio.to_thread(self.store.open)
        self._pin_owed()  # before the first segment is written: retention runs then
        self.uplink = UplinkClient(
            url=cfg.receiver_url,
            origin=cfg.receiver_origin,
            pin=cfg.receiver_pin,
            device_id=cfg.device_id,
            device_key=key,
            store=self.store,
            heartbeat_s=cfg.heartbeat_s,
            reconnect_max_s=cfg.reconnect_max_s,
            unacked_max_bytes=cfg.unacked_max_bytes,
            on_change=self._update_led,
            on_trigger=self._on_uplink_trigger,
            audit_feed=AuditFeed(self.audit.path),
            audit_head=lambda: self.audit.head_n,
            enrollment=_read_enrollment(cfg.enrollment),
            on_access_head=self._on_access_head,
        )
        sources = {c.id: self._make_source(c) for c in cfg.cameras}
        self.capture = Capture(
            sources,
            self._sequences(cfg.state_dir / "sequences.json"),
            preroll_s=cfg.preroll_s,
            preroll_max_bytes=cfg.preroll_max_bytes,
            watchdog_s={c.id: c.watchdog_s for c in cfg.cameras},
            idle_handoff_s=IDLE_HANDOFF_S,
            audit=self.audit,
            on_change=self._update_led,  # a camera fault shows on the LED
        )
        loop = asyncio.get_running_loop()
        self.audit.on_written = lambda: self._audit_written(loop)
        self.capture.subscribe(self._chain_packet)  # first: chained before anything sees it
        self.capture.subscribe(self._to_store)
        self.capture.subscribe(self._on_packet)
        self.store.on_sealed(lambda _: self.uplink.segment_sealed())
        if cfg.led_pin is not None:
            self.led = StatusLed(cfg.led_pin, pin_factory=self.pin_factory)
        if cfg.buzzer_pin is not None:
            self.buzzer = StatusBuzzer(cfg.buzzer_pin, pin_factory=self.pin_factory)
        for b in cfg.buttons:
            self.buttons[b.id] = PanicButton(
                b.pin,
                on_press=loop_callback(loop, self.on_press),
                pin_factory=self.pin_factory,
                hold_time=b.hold_s,
                debounce_s=b.debounce_s,
                button_id=b.id,
                location=b.location,
            )
        if cfg.local_api.enabled:
            api = LocalApi(self, cfg.local_api, cfg.state_dir / "tls", agent=self)
            try:
                await api.start()
                self.local_api = api
            except (OSError, ProvisioningError) as exc:  # the buttons work without it
                log.error("local API on %s:%d: %s", cfg.local_api.host, cfg.local_api.port, exc)
                self.audit.record_soon("local_api_fault", error=str(exc)[:300])
        self.capture.start()  # last: subscribers may rely on seeing the first packet
        self._spawn(self.uplink.run(), "uplink")
        self._spawn(self._housekeeping(), "housekeeping")
        if cfg.discovery.enabled and self.local_api is not None:
            self._spawn(self._advertise(self.local_api), "mdns")
        active = self.emergency.active
        if active is not None:  # after a restart: stream again once cameras run
            self._spawn(self._resume(active), "resume-session")
        else:
            self._resume_owed()
        self._update_led()
        log.info(
            "agent %s armed: building %s, %d camera(s), %d button(s)",
            cfg.device_id,
            cfg.building,
            len(cfg.cameras),
            len(cfg.buttons),
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._persisting:  # never abandon a state write half way
            await asyncio.gather(*self._persisting, return_exceptions=True)
        if self.local_api is not None:
            await self.local_api.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.capture.aclose()
        await self.store.close()  # seals the segments being filled
        self._cut_live_chains()  # what was streamed live is signed up to its last packet
        # The buttons stay armed until here: a press now is still audited and persisted
        # (emergency.json), and the session streams when the agent starts again.
        for button in self.buttons.values():
            await asyncio.to_thread(button.close)  # may join gpiozero's hold thread
        while self._persisting:  # a press's state write, and any still under way
            await asyncio.gather(*self._persisting, return_exceptions=True)
        await self._save_owed()
        self.gate.close()
        await asyncio.to_thread(self.audit.close)  # writes what is queued
        if self.led is not None:
            self.led.close()
        if self.buzzer is not None:
            self.buzzer.close()
        self._stopped.set()

    def _make_source(self, camera: CameraConfig) -> CameraSource:
        try:
            return self._source_factory(camera)
        except CameraError as exc:  # a broken camera never keeps the agent from arming
            log.error("camera %s: %s", camera.id, exc)
            self.audit.record_soon("camera_fault", camera=camera.id, error=str(exc)[:300])
            info = StreamInfo("h264", camera.width, camera.height, camera.fps, b"")
            return RetryingSource(camera.id, lambda: self._source_factory(camera), exc, info)

    def alive(self) -> bool:
        """False once a background task died: systemd's watchdog then restarts the agent."""
        return tasks_alive(self._tasks)

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    # -- events -----------------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked after every press, session change or ack."""
        await self.changes.wait_until(predicate)

    def on_press(self, event: PressEvent) -> None:
        """A panic button was pressed (runs on the loop). Never depends on any key list."""
        self.press_log.append(event)
        self.changes.notify()
        cameras = tuple(c.id for c in self.config.cameras)
        result = self.emergency.press(self.clock(), event.button_id, event.location, cameras)
        self._persist()  # first: whatever fails below, the session survives a restart
        self._record(
            "button_press",
            button=event.button_id,
            location=event.location,
            session=result.session.id,
            started=isinstance(result, Started),
        )
        if isinstance(result, Started):
            log.warning(
                "EMERGENCY %s started by button %s (%s)",
                result.session.id,
                event.button_id,
                event.location,
            )
            self._session_started(result.session)
        else:
            log.info(
                "button %s pressed again during session %s", event.button_id, result.session.id
            )

    def submit_trigger(self, body: bytes | str | Mapping[str, Any], *, via: str) -> Outcome:
        """Verify a remote trigger and apply it; every attempt is audited. Never raises."""
        verdict = self.gate.verify(body, via=via)
        if isinstance(verdict, Rejected):
            return refused(verdict.code, verdict.detail)
        trigger = verdict.trigger
        cameras = tuple(c.id for c in self.config.cameras)
        outcome = apply_trigger(self.emergency, trigger, now=self.clock(), cameras=cameras, via=via)
        if not outcome.accepted:
            code, detail = outcome.body["error"], outcome.body["detail"]
            self.gate.reject(
                Rejected(code, detail, trigger.kid, trigger.role, trigger.action, trigger.reason),
                via=via,
            )
            return outcome
        self.gate.accepted += 1
        result = outcome.result
        assert result is not None  # an accepted outcome carries the state change
        log.warning(
            "trigger %s by %s key %s (%s) via %s: session %s",
            trigger.action, trigger.role, trigger.kid, trigger.label, via, result.session.id,
        )  # fmt: skip
        self._record(
            "trigger",
            result="accepted",
            code=None,
            detail=None,
            kid=trigger.kid,
            role=trigger.role,
            action=trigger.action,
            reason=trigger.reason,
            via=via,
            session=result.session.id,
        )
        if isinstance(result, Started):
            self._session_started(result.session)
        elif isinstance(result, Extended):
            self._record(
                "session_extend",
                session=result.session.id,
                by=_by(result.session.extensions[-1]),
                expires_at=result.session.expires_at,
            )
            self.uplink.extend_session(result.session.id, result.session.expires_at)
        elif isinstance(result, Ended):
            self._stop_streaming(result)
        self._persist()
        return outcome

    def _on_uplink_trigger(self, envelope: Mapping[str, Any]) -> tuple[int, Mapping[str, Any]]:
        outcome = self.submit_trigger(envelope, via="uplink")
        return outcome.status, outcome.body

    def end(self, reason: str) -> Ended | None:
        """End the open session (callers verify the authority to do so)."""
        ended = self.emergency.end(self.clock(), reason)
        if ended is not None:
            self._stop_streaming(ended)
        return ended

    def _on_access_head(self, n: int, digest: str) -> None:
        """Anchor the receiver's access-log head in the signed trail: when it changed (a
        head that went back is anchored too: the report then shows the log was cut), at
        most every :data:`ACCESS_ANCHOR_EVERY_S` (a receiver cannot flood the trail)."""
        now = time.monotonic()
        last_n, last_digest, last_at = self._access_anchor
        if (n, digest) == (last_n, last_digest) or now - last_at < ACCESS_ANCHOR_EVERY_S:
            return
        self._access_anchor = (n, digest, now)
        origin = self.config.receiver_origin
        self._record("receiver_access_head", receiver=origin, entry=n, head=digest)

    def _record(self, event: str, **fields: Any) -> None:
        """Audit an event of the emergency (off the loop, in order); the uplink ships it."""
        self.audit.record_soon(event, **fields)

    def _audit_written(self, loop: asyncio.AbstractEventLoop) -> None:
        # Any thread: an entry landed; wake the uplink's writer to ship it.
        with contextlib.suppress(RuntimeError):  # the loop is closing: shipped next start
            loop.call_soon_threadsafe(self.uplink.audit_recorded)

    def _session_started(self, session: Session) -> None:
        """Audit a session's start (an emergency's, or a share's), then stream it."""
        if not is_share(session):
            self._end_share("an emergency started")  # the emergency carries every camera
        self._record(
            "session_start",
            session=session.id,
            building=session.building,
            by=_by(session.started_by),
            cameras=list(session.cameras),
            expires_at=session.expires_at,
        )
        self._start_streaming(session)

    def _persist(self) -> None:
        task = asyncio.create_task(self._write_state(), name="persist-emergency")
        self._persisting.add(task)
        task.add_done_callback(self._persisting.discard)

    async def _write_state(self) -> None:
        # Small JSON, fsynced, on a worker thread so the loop keeps streaming. The lock
        # keeps writes in order, and each writes the state as it is when its turn comes.
        async with self._persist_lock:
            await asyncio.to_thread(write_json, self.state_path, self.emergency.to_json())
            await self._save_owed()

    def _start_streaming(self, session: Session, *, resume: bool = False) -> None:
        share = is_share(session)
        for source in () if share else self.capture.sources.values():
            force = getattr(source, "force_keyframe", None)  # encoders we drive (Pi, synthetic)
            if callable(force):
                force()  # the live view gets a fresh keyframe at once
        descs: list[p.CameraDesc] = []
        preroll: dict[int, list[EncodedPacket]] = {}
        owed = self._owed.get(session.id)
        first_seqs: dict[str, int] = dict(owed["first"]) if resume and owed else {}
        acked_by_id: dict[str, int] = dict(owed["acked"]) if resume and owed else {}
        for camera in cameras_to_stream(self.config.cameras, session):
            packets = self.capture.prerolls[camera.id].snapshot()
            if packets and share:  # a share has no pre-roll: from the newest keyframe on
                packets = packets[packets.index(_last_keyframe(packets)) :]
            if not packets:
                log.error(
                    "camera %s has no decodable footage yet; not in session %s",
                    camera.id,
                    session.id,
                )
                continue
            info = self.capture.sources[camera.id].info
            width, height, fps = _described_size(info, camera)
            index = len(descs)
            descs.append(
                p.CameraDesc(
                    index,
                    camera.id,
                    camera.zone,
                    info.codec,
                    width,
                    height,
                    fps,
                    info.extradata,
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
        if not descs and share:
            return  # housekeeping starts it again once the cameras run
        if not descs:  # pressed right after boot: stream as soon as footage exists
            log.error("session %s: no camera has footage yet; streaming once one has", session.id)
            self._spawn(self._resume(session, resume=resume), "start-when-ready")
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
        for d in descs:  # the chain of the pre-roll, signed before the press
            for cp in self.chains.since(d.id, d.first_seq):
                self.uplink.add_checkpoint(cp, stream)
        self._restore_checkpoints(stream, owed if resume else None)
        self._set_live((stream, {d.id: d.index for d in descs}))
        if share:
            self.share = session
        self._record(
            "disclosure",
            kind=str(session.started_by.get("kind")),
            session=session.id,
            receiver=self.config.receiver_origin,
            device=self.config.device_id,
            cameras=[{"id": d.id, "zone": d.zone, "first": d.first_seq} for d in descs],
            resumed=resume,
        )
        self._remember(stream)
        self._update_led()
        if resume:
            self._resume_owed()

    def _start_share(self) -> None:
        """Share the exterior cameras (the building's policy) while no emergency is open."""
        cameras = cameras_to_share(self.config.cameras, share_exterior=self.config.share_exterior)
        ready = tuple(c for c in cameras if len(self.capture.prerolls[c]))
        if ready and self.share is None and self.emergency.active is None:
            session = share_session(self.config.building, self.clock(), ready, SHARE_HOURS)
            self._session_started(session)

    def _end_share(self, reason: str) -> None:
        share, self.share = self.share, None
        if share is None:
            return
        if self._live is not None and self._live[0].id == share.id:
            self._set_live(None)
        self.uplink.end_session(share.id, reason)
        self._record(
            "session_end", session=share.id, reason=reason, by=None, cameras=self._ends(share.id)
        )
        self._cut_chains(share.id)

    def _stop_streaming(self, ended: Ended) -> None:
        sid = ended.session.id
        log.warning("emergency %s ended: %s", sid, ended.session.end_reason)
        self._set_live(None)
        self.uplink.end_session(sid, ended.session.end_reason or "ended")
        if self.uplink.stream(sid) is None and sid in self._owed:
            # It ended before it streamed again after a restart (it expired while the agent
            # was down): what the receiver is owed goes out from the sealed store.
            self._resume_owed()
        by = ended.session.ended_by
        self._record(
            "session_end",
            session=sid,
            reason=ended.session.end_reason,
            by=None if by is None else _by(by),
            cameras=self._ends(sid),
        )
        self._cut_chains(sid)
        self._persist()
        self._update_led()

    def _ends(self, session_id: str) -> list[dict[str, Any]] | None:
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

    def _chain_packet(self, packet: EncodedPacket) -> None:
        """Chain every packet as it is numbered; checkpoints go to the sessions showing it."""
        made = self.chains.add(
            packet.camera,
            packet.seq,
            packet.capture_ns // 1000,
            packet.keyframe,
            packet.codec,
            packet.payload,
        )
        for cp in made:
            self.uplink.add_checkpoint(cp)

    def _cut_chains(self, session_id: str) -> None:
        """An ended session's footage is signed up to its last seq, exactly."""
        stream = self.uplink.stream(session_id)
        if stream is None:
            return
        for desc in stream.open.cameras:
            end = stream.end_seq[desc.index]
            if end is not None:
                for cp in self.chains.cut(desc.id, end):
                    self.uplink.add_checkpoint(cp)

    def _cut_live_chains(self) -> None:
        """On the way out: sign the chain of every live session up to its last packet."""
        for stream in self.uplink.streams:
            for desc in stream.open.cameras:
                if stream.end_seq[desc.index] is None:
                    for cp in self.chains.cut(desc.id, stream.last_pushed[desc.index]):
                        self.uplink.add_checkpoint(cp)

    def _restore_checkpoints(self, stream: SessionStream, owed: Mapping[str, Any] | None) -> None:
        """Checkpoints saved before a restart that the receiver had not answered yet."""
        for record in [] if owed is None else owed.get("chain", []):
            try:
                cp = hash_chain.from_record(record)
            except ValueError as exc:
                log.error("session %s: a saved chain checkpoint is unreadable: %s", stream.id, exc)
                continue
            self.uplink.add_checkpoint(cp, stream)

    def _attest_segment(self, camera: str, first: int, last: int) -> dict[str, Any] | None:
        """The checkpoint a sealed segment carries over exactly its seqs (the store asks)."""
        cp = self.chains.span(camera, first, last)
        if cp is None:
            log.warning("segment %s %d..%d: chain no longer known; not signed", camera, first, last)
            return None
        return hash_chain.claim_json(cp)

    def _to_store(self, packet: EncodedPacket) -> None:
        desc = self._streams.get(packet.camera)
        if desc is None or packet.keyframe:  # a camera may renegotiate SPS/PPS on reconnect
            info = self.capture.sources[packet.camera].info
            desc = StreamDesc(info.codec, info.width, info.height, info.fps, info.extradata)
            self._streams[packet.camera] = desc
        self.store.push(packet, desc)

    # -- sessions owed to the receiver (survive restarts) ---------------------------

    def _remember(self, stream: SessionStream) -> None:
        """Record a session the receiver is owed, so a restart resumes it."""
        self._owed[stream.id] = owed.entry(stream)
        self._persist()

    def _refresh_owed(self) -> None:
        # Delivered sessions leave; one not yet handed to the uplink (a restart waiting
        # for its cameras) stays as it was saved.
        live = {s.id: s for s in self.uplink.streams}
        kept = {k: v for k, v in self._owed.items() if k not in self.uplink.settled_ids}
        self._owed = kept | {sid: owed.entry(s) for sid, s in live.items()}

    async def _save_owed(self) -> None:
        """Save the sessions owed, if they changed: read on the loop (the uplink changes
        its streams and their checkpoint queues there), written and fsynced in a worker
        thread."""
        self._refresh_owed()
        text = json.dumps(self._owed, sort_keys=True, indent=1)
        if text != self._owed_saved:
            await asyncio.to_thread(write_atomic, self.owed_path, text.encode())
            self._owed_saved = text

    def _state_damaged(self, path: Path, why: str | None) -> None:
        if why is not None:
            self.audit.record_soon("state_damaged", file=path.name, error=why)

    def _sequences(self, path: Path) -> SequenceReservations:
        """The cameras' sequence numbers: never below the sealed store's, so no seq is used
        twice (a store holding two segments of one seq sends the wrong footage)."""
        copies = (path, backup_path(path))
        for copy in copies:  # one damaged copy (set aside here): the other has it all
            _, why = read_state(copy, check_sequences, None)
            self._state_damaged(copy, why)
        present = any(copy.exists() for copy in copies)
        # Never below what the store holds; without either copy (damaged, or a state
        # folder wiped while the store stayed) two blocks above: what a run used beyond it.
        margin = 0 if present else 2 * SequenceReservations.BLOCK
        floor = {}
        for camera in self.config.cameras:
            segs = self.store.segments(camera.id)
            if segs:
                floor[camera.id] = segs[-1].last_seq + 1 + margin
        return SequenceReservations(path, floor)

    def _pin_owed(self) -> None:
        """Pin what the receiver is owed, as saved, until the sessions are queued again."""
        for sid, entry in self._owed.items():
            try:
                pins = [
                    Pin(str(cam), int(first), entry["end"].get(cam), int(entry["acked"][cam]))
                    for cam, first in entry["first"].items()
                ]
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.error("owed session %s: its saved entry is unreadable: %r", sid, exc)
                continue
            for pin in pins:
                self.store.add_pin(pin)
            self._boot_pins += pins

    def _resume_owed(self) -> None:
        """Queue every owed session that is not the active one (it resumes with live)."""
        active = self.emergency.active
        for sid, entry in list(self._owed.items()):
            if self.uplink.stream(sid) is not None or (active is not None and active.id == sid):
                continue
            event = p.decode_control(entry["open"])
            assert isinstance(event, p.SessionOpen)
            ends: dict[int, int] = {}
            for c in event.cameras:
                end = entry["end"].get(c.id)
                if end is None:  # it was live when the agent stopped: up to what is stored
                    segs = self.store.segments(c.id)
                    end = max(entry["acked"].get(c.id, -1), segs[-1].last_seq if segs else -1)
                ends[c.index] = end
            acked = {c.index: entry["acked"][c.id] for c in event.cameras if c.id in entry["acked"]}
            stream = self.uplink.start_session(event, {}, acked=acked, end_seq=ends)
            self._restore_checkpoints(stream, entry)
            self.uplink.end_session(stream.id, entry.get("close_reason") or "ended")
            log.warning("resuming delivery of ended session %s from the sealed store", sid)
        for pin in self._boot_pins:  # every owed session holds pins of its own now
            self.store.remove_pin(pin)
        self._boot_pins = []

    def _set_live(self, live: tuple[SessionStream, dict[str, int]] | None) -> None:
        """The session whose live lane gets every packet as it comes (None: idle)."""
        self._live = live
        self.capture.set_live(live is not None)

    def _on_packet(self, packet: EncodedPacket) -> None:
        if self._live is None:
            return
        stream, indexes = self._live
        index = indexes.get(packet.camera)
        if index is not None:
            self.uplink.push(stream, index, packet)

    async def _resume(self, session: Session, *, resume: bool = True) -> None:
        """Stream an open session once its cameras run (after a restart, or a press at boot)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                # A camera the config no longer has (renamed while stopped) is not waited
                # for: the session streams the cameras there are.
                ready = [c for c in session.cameras if c in self.capture.sources]
                await asyncio.gather(*(self.capture.wait_ready(c) for c in ready))
        active = self.emergency.active  # a press meanwhile replaced the object: match ids
        if active is not None and active.id == session.id:
            log.warning("streaming emergency %s now that cameras run", session.id)
            self._start_streaming(active, resume=resume)

    def _check_expiry(self) -> None:
        """Warn (log, audit trail) once a day from :data:`RENEW_WARN_DAYS` before what the
        district signed expires: the enrollment certificate (the receiver then refuses the
        device and a press reaches nobody; an expired one is a fault on the LED) and the
        trigger-key list (remote triggers are then refused; the buttons still work)."""
        if self.enrollment is not None:
            e = self.enrollment.enrollment
            expired = e.exp <= self.clock()
            if expired != self._certificate_expired:
                self._certificate_expired = expired
                self._update_led()
            self._warn_expiring(
                "enrollment_expiring", f"enrollment certificate v{e.version}", e.version, e.exp,
                "the receiver refuses this device",
                f"renew it (breakglass provision rotate {self.config.device_id})",
            )  # fmt: skip
        keys = self.gate.keyring.current
        if keys is not None:
            self._warn_expiring(
                "keylist_expiring", f"trigger-key list v{keys.version}", keys.version, keys.exp,
                "remote triggers are refused",
                "the district must send a new one (PUT /v1/trigger-keys)",
            )  # fmt: skip

    def _warn_expiring(
        self, event: str, what: str, version: int, exp: float, then: str, remedy: str
    ) -> None:
        days = (exp - self.clock()) / 86400
        now = time.monotonic()
        if days > RENEW_WARN_DAYS or now < self._expiry_warned.get(event, -math.inf) + 86400:
            return
        self._expiry_warned[event] = now
        when = f"has expired: {then}" if days <= 0 else f"expires in {days:.0f} day(s)"
        log.warning("%s %s: %s", what, when, remedy)
        self._record(event, version=version, exp=exp, expired=days <= 0)

    async def _housekeeping(self) -> None:
        last_save = last_checkpoint = time.monotonic()
        while True:
            self._check_expiry()
            ended = self.emergency.tick(self.clock(), time.monotonic())
            if ended is not None:
                self._stop_streaming(ended)
            if self.config.share_exterior and self.emergency.active is None:
                share = self.share
                if share is not None and self.clock() >= share.expires_at:
                    self._end_share("rotated")  # one recording per SHARE_HOURS
                if self.share is None:
                    self._start_share()
            # A camera gone silent: what it sent last goes to disk, not waits in RAM.
            self.store.seal_idle(time.monotonic_ns(), max(2.0, self.config.store.segment_s))
            self.store.retain_soon(time.monotonic())  # ages footage out with no camera writing
            now = time.monotonic()
            if now - last_checkpoint >= AUDIT_CHECKPOINT_S:
                last_checkpoint = now
                self.audit.checkpoint_soon()  # signs what is new (nothing when nothing is)
            if now - last_save >= OWED_SAVE_S:
                last_save = now
                # Acks move while a session is active or owed: keep resume cheap. An idle
                # agent has nothing that changes without an event that persists it, so
                # it does not rewrite (and fsync) the same state files every 2 s.
                if self.emergency.active is not None or self._owed or self.uplink.streams:
                    self._persist()
            await asyncio.sleep(0.5)

    def device_state(self) -> str:
        """What mDNS says of the device: ``armed``, ``emergency`` or ``fault``."""
        if self.emergency.active is not None:
            return "emergency"
        if self._certificate_expired or any(s.fault for s in self.capture.state.values()):
            return "fault"
        return "armed"

    async def _advertise(self, api: LocalApi) -> None:
        """Advertise the Local API on the configured interfaces; follow the state."""
        cfg = self.config

        def fault(exc: BaseException) -> None:  # the buttons work without it
            log.error("mDNS advertisement: %s", exc)
            self.audit.record_soon("discovery_fault", error=str(exc)[:300])

        advertiser = await advertise_when_possible(
            lambda: Advertiser(
                cfg.device_id,
                cfg.building,
                api.port,
                api.fingerprint,
                interfaces=cfg.discovery.interfaces,
                state=self.device_state(),
            ),
            fault,
        )
        self.advertiser = advertiser
        self.changes.notify()
        try:
            while True:
                await self.changes.wait_until(lambda: self.device_state() != advertiser.state)
                await advertiser.set_state(self.device_state())
                self.changes.notify()
        finally:
            self.advertiser = None
            await advertiser.close()  # goodbye packets

    def _update_led(self) -> None:
        """Show the state on the LED (and chirp once when the police have the alarm)."""
        self.changes.notify()
        if self.emergency.active is None:  # (a continuous exterior share is no alarm)
            faulty = self._certificate_expired or any(s.fault for s in self.capture.state.values())
            pattern = LedPattern.FAULT if faulty else LedPattern.ARMED
        elif self._live is None or self._live[0].first_ack_mono_ns is None:
            pattern = LedPattern.ALARM_PENDING
        else:
            pattern = LedPattern.ALARM_DELIVERED
        if pattern is self._shown:
            return  # showing it again would restart the blink
        if pattern is LedPattern.ALARM_DELIVERED and self.buzzer is not None:
            self.buzzer.chirp()
        self._shown = pattern
        if self.led is not None:
            self.led.show(pattern)

    # -- the technician (paired by setup code) ---------------------------------------

    @property
    def enrolled(self) -> asyncio.Event:
        """Set when a technician installed a new enrollment: the agent must start again."""
        return self.desk.enrolled

    def _busy(self) -> str | None:
        active = self.emergency.active
        return None if active is None else f"emergency {active.id} is active; enroll after it"

    async def snapshot(self, camera: str) -> bytes:
        """A JPEG still of ``camera`` from its pre-roll (raises SnapshotError)."""
        packets = self.capture.prerolls[camera].snapshot()
        if not packets:
            raise SnapshotError("no_footage", f"camera {camera} has no footage yet")
        extradata = self.capture.sources[camera].info.extradata
        return await asyncio.to_thread(jpeg_from_packets, packets, extradata)

    # -- introspection -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """State, building, cameras and session, as the local API will report it."""
        session = self.emergency.active
        return {
            "device": self.config.device_id,
            "building": self.config.building,
            "provisioned": True,
            "enrollment_version": None if self.enrollment is None else self.enrollment.version,
            "certificate": None
            if self.enrollment is None
            else dict(self.enrollment.enrollment.envelope),
            "state": self.emergency.state.value,
            "uplink_connected": self.uplink.connected,
            "cameras": [
                {
                    "id": c.id,
                    "zone": c.zone,
                    "healthy": self.capture.state[c.id].healthy,
                    "fault": self.capture.state[c.id].fault,
                }
                for c in self.config.cameras
            ],
            "share": None if self.share is None else self.share.id,
            "session": None
            if session is None
            else {
                "id": session.id,
                "started_by": dict(session.started_by),
                "expires_at": session.expires_at,
            },
        }


OWED_SAVE_S = 2.0
#: The agent warns this many days before its enrollment certificate expires.
RENEW_WARN_DAYS = 30
#: A continuous exterior share is recorded in sessions of this many hours.
SHARE_HOURS = 1.0
#: How often the audit trail's new entries get a signed checkpoint.
AUDIT_CHECKPOINT_S = 60.0
#: The receiver's access-log head is anchored in the trail at most this often.
ACCESS_ANCHOR_EVERY_S = 60.0
#: Chain checkpoints are kept this much longer than the pre-roll reaches back.
CHAIN_KEEP_EXTRA_S = 90.0
#: While no live lane streams, cameras hand packets to the loop in batches this long
#: (:meth:`agent.capture.Capture.set_live`): the pre-roll and the store need them no
#: sooner, and a loop wake-up per frame was most of an idle agent's CPU.
IDLE_HANDOFF_S = 0.25


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


def _read_enrollment(path: Path | None) -> dict[str, Any] | None:
    """The enrollment certificate to present to the receiver (it verifies it)."""
    if path is None:
        return None
    try:
        doc = json.loads(read_small(path, "enrollment certificate"))
    except (KeyFileError, ValueError) as exc:  # the receiver will refuse; the buttons work
        log.error("enrollment certificate %s: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def _by(event: Mapping[str, Any]) -> dict[str, Any]:
    """Who acted, for the audit trail (without the time: the entry has its own)."""
    return {k: v for k, v in event.items() if k not in ("at", "expires_at")}


def _boot_id() -> str:
    """This boot's id: monotonic times in segment anchors are only comparable within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read(64).strip()
    except OSError:
        return secrets.token_hex(16)


def _last_keyframe(packets: list[EncodedPacket]) -> EncodedPacket:
    return next(pkt for pkt in reversed(packets) if pkt.keyframe)
