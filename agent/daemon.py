"""The building agent: wires cameras, pre-roll, buttons, emergency and uplink.

Lifecycle in one place: :class:`Agent` is an async context manager; entering
it starts every task (named, referenced), leaving it stops them and closes the
hardware. Library threads (gpiozero) only ever reach the loop through
``loop.call_soon_threadsafe``.

The agent builds and connects its parts; what each does is in its own module:

- :mod:`agent.alarm`: presses, remote triggers and expiry start, extend and end
  the emergency (:mod:`agent.emergency`, the state machine);
- :mod:`agent.streaming`: each session on the uplink (pre-roll, live lane, the
  exterior share) and what it discloses;
- :mod:`agent.owed_sessions`: sessions still owed to the receiver across restarts;
- :mod:`agent.checkpoints`: where the footage chain's checkpoints go;
- :mod:`agent.state_files`: ``emergency.json``, ``owed.json``, ``sequences.json``;
- :mod:`agent.feedback`: the status LED and buzzer at the buttons;
- :mod:`agent.renewal`: warnings before what the district signed expires;
- :mod:`agent.lan_presence`: the status, the mDNS state and the technician's snapshots;
- :mod:`agent.devices`: the camera sources and GPIO pin factory the config names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from agent import chain as hash_chain
from agent import lan_presence
from agent.alarm import Alarm
from agent.audit import AuditLog
from agent.audit_feed import AuditFeed
from agent.capture import Capture
from agent.changes import Changes
from agent.checkpoints import Checkpoints, attest
from agent.config import AgentConfig, CameraConfig
from agent.devices import make_pin_factory as make_pin_factory
from agent.devices import make_source as make_source
from agent.devices import open_source
from agent.discovery import Advertiser
from agent.emergency import Emergency, Ended, Session
from agent.enrollment_state import Enrolled
from agent.feedback import StatusFeedback, led_pattern
from agent.lan_presence import Advertising
from agent.local_api import LocalApi
from agent.memory import return_large_buffers
from agent.owed_sessions import OwedSessions
from agent.policy import Outcome
from agent.renewal import RenewalWatch
from agent.sdnotify import tasks_alive
from agent.segment import StreamDesc, parse_recipient
from agent.state_files import StateWriter, sequence_reservations, state_damaged
from agent.statefile import read_state
from agent.store import SegmentStore
from agent.streaming import Streaming
from agent.technician import TechnicianDesk
from agent.trigger_gate import TriggerGate
from agent.uplink import UplinkClient
from hardware import CameraSource, EncodedPacket
from hardware.button import PanicButton, PressEvent, loop_callback
from hardware.buzzer import StatusBuzzer
from hardware.led import StatusLed
from provisioning.errors import KeyFileError, ProvisioningError
from provisioning.keys import load_private_key, read_small

log = logging.getLogger(__name__)
#: Presses the agent keeps in memory (the audit trail has every one).
PRESS_LOG_MAX = 256


class Agent:
    """One building agent: ``async with Agent(config) as agent:`` runs it in the block."""

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
        self.changes = Changes()
        self.state_path = config.state_dir / "emergency.json"
        self.owed_path = config.state_dir / "owed.json"
        self.emergency = Emergency(config.building, config.session_duration_s)
        #: The sessions still owed to the receiver (owed.json), resumed after a restart.
        self.owed = OwedSessions(self.owed_path)
        self.buttons: dict[str, PanicButton] = {}
        #: The status LED and the buzzer at the buttons (each if the building has one).
        self.feedback = StatusFeedback()
        self.capture: Capture
        self.uplink: UplinkClient
        self.store: SegmentStore
        self.audit: AuditLog
        self.gate: TriggerGate
        self.checkpoints: Checkpoints
        self.state_writer: StateWriter
        self.streaming: Streaming
        self.alarm: Alarm
        self.renewal: RenewalWatch
        self.local_api: LocalApi | None = None
        self.mdns = Advertising(config, self.changes, self.device_state)
        self._streams: dict[str, StreamDesc] = {}
        #: The receiver's access-log head last anchored in the trail, and when (monotonic).
        self._access_anchor: tuple[int, str, float] = (0, "", -math.inf)
        self._tasks: list[asyncio.Task[None]] = []
        self._audit_held = False  # entries wait in RAM for the trail (shown on the LED)
        #: The latest presses (:data:`PRESS_LOG_MAX`); the count is ``alarm.presses``.
        self.press_log: deque[PressEvent] = deque(maxlen=PRESS_LOG_MAX)

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        return_large_buffers()  # the segment writer's buffers go back when freed
        cfg = self.config
        key = load_private_key(cfg.device_key)
        self.device_public_key = key.public_key()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(cfg.state_dir / "audit.log", self.clock, signer=key)
        self.renewal = RenewalWatch(
            cfg.device_id, self.audit, clock=self.clock, on_change=self._update_led
        )
        # A damaged state file is moved aside and audited: the buttons arm regardless.
        self.emergency, why = read_state(
            self.state_path,
            lambda doc: Emergency.from_json(cfg.building, cfg.session_duration_s, doc),
            self.emergency,
        )
        state_damaged(self.audit, self.state_path, why)
        state_damaged(self.audit, self.owed_path, self.owed.load())
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
            busy=functools.partial(lan_presence.busy, self.emergency),
            snapshot=self.snapshot,
            zones={c.id: c.zone for c in cfg.cameras},
        )
        self.desk.current = self.enrollment
        self.gate = TriggerGate(
            cfg.building, cfg.trust, cfg.state_dir, self.audit, device=cfg.device_id,
            clock=self.clock,
        )  # fmt: skip
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
            attest=functools.partial(attest, self.chains),
        )
        await asyncio.to_thread(self.store.open)
        self.owed.pin(self.store)  # before the first segment is written: retention runs then
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
            sealed_to=cfg.store.recipients,
        )
        self.checkpoints = Checkpoints(self.chains, self.uplink)
        self.state_writer = StateWriter(
            self.state_path,
            self.emergency,
            self.owed,
            self.uplink,
            self.audit,
            on_change=self._update_led,
        )
        sources = {c.id: open_source(c, self._source_factory, self.audit) for c in cfg.cameras}
        self.capture = Capture(
            sources,
            sequence_reservations(
                cfg.state_dir / "sequences.json", self.store, cfg.cameras, self.audit
            ),
            preroll_s=cfg.preroll_s,
            preroll_max_bytes=cfg.preroll_max_bytes,
            watchdog_s={c.id: c.watchdog_s for c in cfg.cameras},
            idle_handoff_s=IDLE_HANDOFF_S,
            audit=self.audit,
            on_change=self._update_led,  # a camera fault shows on the LED
        )
        self.streaming = Streaming(
            cfg,
            self.emergency,
            self.capture,
            self.uplink,
            self.store,
            self.checkpoints,
            self.owed,
            self.audit,
            clock=self.clock,
            persist=self.state_writer.persist,
            on_change=self._update_led,
            spawn=self._spawn,
        )
        self.alarm = Alarm(
            cfg,
            self.emergency,
            self.gate,
            self.streaming,
            self.audit,
            clock=self.clock,
            persist=self.state_writer.persist,
            changes=self.changes,
            press_log=self.press_log,
        )
        loop = asyncio.get_running_loop()
        self.audit.on_written = lambda: self._audit_written(loop)
        # First: chained before anything sees it.
        self.capture.subscribe(self.checkpoints.chain_packet)
        self.capture.subscribe(self._to_store)
        self.capture.subscribe(self.streaming.on_packet)
        self.store.on_sealed(lambda _: self.uplink.segment_sealed())
        if cfg.led_pin is not None:
            self.feedback.led = StatusLed(cfg.led_pin, pin_factory=self.pin_factory)
        if cfg.buzzer_pin is not None:
            self.feedback.buzzer = StatusBuzzer(cfg.buzzer_pin, pin_factory=self.pin_factory)
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
            self._spawn(self.mdns.run(self.local_api, self.audit), "mdns")
        active = self.emergency.active
        if active is not None:  # after a restart: stream again once cameras run
            self._spawn(self.streaming.when_ready(active), "resume-session")
        else:
            self.streaming.resume_owed()
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
        writes = self.state_writer.pending
        if writes:  # never abandon a state write half way
            await asyncio.gather(*writes, return_exceptions=True)
        if self.local_api is not None:
            await self.local_api.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.capture.aclose()
        await self.store.close()  # seals the segments being filled
        self.checkpoints.cut_live()  # what was streamed live is signed up to its last packet
        # The buttons stay armed until here: a press now is still audited and persisted
        # (emergency.json), and the session streams when the agent starts again.
        for button in self.buttons.values():
            await asyncio.to_thread(button.close)  # may join gpiozero's hold thread
        while writes:  # a press's state write, and any still under way
            await asyncio.gather(*writes, return_exceptions=True)
        await self.owed.save(self.uplink)
        self.gate.close()
        await asyncio.to_thread(self.audit.close)  # writes what is queued
        self.feedback.close()

    def alive(self) -> bool:
        """False once a background task died: systemd's watchdog then restarts the agent."""
        return tasks_alive(self._tasks)

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    # -- events: presses, triggers, the end -----------------------------------

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked after every press, session change or ack."""
        await self.changes.wait_until(predicate)

    def on_press(self, event: PressEvent) -> None:
        """A panic button was pressed (runs on the loop). Never depends on any key list."""
        self.alarm.press(event)

    def submit_trigger(self, body: bytes | str | Mapping[str, Any], *, via: str) -> Outcome:
        """Verify a remote trigger and apply it; every attempt is audited. Never raises."""
        return self.alarm.trigger(body, via=via)

    def _on_uplink_trigger(self, envelope: Mapping[str, Any]) -> tuple[int, Mapping[str, Any]]:
        outcome = self.submit_trigger(envelope, via="uplink")
        return outcome.status, outcome.body

    def end(self, reason: str) -> Ended | None:
        """End the open session (callers verify the authority to do so)."""
        return self.alarm.end(reason)

    # -- between the parts: the audit trail, the store ------------------------

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
        self.audit.record_soon("receiver_access_head", receiver=origin, entry=n, head=digest)

    def _audit_written(self, loop: asyncio.AbstractEventLoop) -> None:
        # Any thread: an entry landed; wake the uplink's writer to ship it.
        with contextlib.suppress(RuntimeError):  # the loop is closing: shipped next start
            loop.call_soon_threadsafe(self.uplink.audit_recorded)

    def _to_store(self, packet: EncodedPacket) -> None:
        desc = self._streams.get(packet.camera)
        if desc is None or packet.keyframe:  # a camera may renegotiate SPS/PPS on reconnect
            info = self.capture.sources[packet.camera].info
            desc = StreamDesc(info.codec, info.width, info.height, info.fps, info.extradata)
            self._streams[packet.camera] = desc
        self.store.push(packet, desc)

    # -- housekeeping (every 0.5 s) -------------------------------------------

    def _check_expiry(self) -> None:
        """Warn ahead of what the district signed expiring (:mod:`agent.renewal`)."""
        self.renewal.check(self.enrollment, self.gate.keyring.current)

    async def _housekeeping(self) -> None:
        last_save = last_checkpoint = time.monotonic()
        while True:
            self._check_expiry()
            self.alarm.expire()
            self.streaming.keep_share()
            # A camera gone silent: what it sent last goes to disk, not waits in RAM.
            self.store.seal_idle(time.monotonic_ns(), max(2.0, self.config.store.segment_s))
            self.store.retain_soon(time.monotonic())  # ages footage out with no camera writing
            if self.audit.held:  # the card failed: write what waits as soon as it can be
                self.audit.retry_soon()
            if bool(self.audit.held) != self._audit_held:
                self._audit_held = not self._audit_held
                self._update_led()
            now = time.monotonic()
            if now - last_checkpoint >= AUDIT_CHECKPOINT_S:
                last_checkpoint = now
                self.audit.checkpoint_soon()  # signs what is new (nothing when nothing is)
            if now - last_save >= OWED_SAVE_S:
                last_save = now
                # Acks move while a session is active or owed: keep resume cheap. An idle
                # agent has nothing that changes without an event that persists it, so
                # it does not rewrite (and fsync) the same state files every 2 s.
                if (
                    self.emergency.active is not None
                    or self.owed.entries
                    or self.uplink.streams
                    or self.state_writer.failed is not None  # until it is written
                ):
                    self.state_writer.persist()
            await asyncio.sleep(0.5)

    # -- what the principal, the LAN and the technician see -------------------

    def _faulty(self) -> bool:
        """A camera is down or sends B-frames, the state files or the audit trail cannot be
        written, the enrollment certificate has expired, or the receiver cannot open the
        sealed store."""
        return (
            self.renewal.certificate_expired
            or self.uplink.sealing_fault is not None
            or self.state_writer.failed is not None
            or bool(self.audit.held)
            or any(s.fault or s.reorders_frames for s in self.capture.state.values())
        )

    def _update_led(self) -> None:
        """Show the state on the LED (and chirp once when the police have the alarm)."""
        self.changes.notify()
        self.feedback.show(
            led_pattern(
                emergency=self.emergency.active is not None,
                faulty=self._faulty,
                live=self.streaming.live_stream,
            )
        )

    @property
    def led(self) -> StatusLed | None:
        """The status LED at the buttons, if the building has one."""
        return self.feedback.led

    @property
    def buzzer(self) -> StatusBuzzer | None:
        """The buzzer that chirps once the police have the alarm, if the building has one."""
        return self.feedback.buzzer

    @property
    def share(self) -> Session | None:
        """The continuous exterior share streaming now (the building's policy), if any."""
        return self.streaming.share

    def device_state(self) -> str:
        """What mDNS says of the device: ``armed``, ``emergency`` or ``fault``."""
        return lan_presence.device_state(self.emergency, self._faulty)

    @property
    def advertiser(self) -> Advertiser | None:
        """The Local API's mDNS advertisement while it runs."""
        return self.mdns.advertiser

    @property
    def enrolled(self) -> asyncio.Event:
        """Set when a technician installed a new enrollment: the agent must start again."""
        return self.desk.enrolled

    async def snapshot(self, camera: str) -> bytes:
        """A JPEG still of ``camera`` from its pre-roll (raises SnapshotError)."""
        return await lan_presence.snapshot(self.capture, camera)

    def status(self) -> dict[str, Any]:
        """State, building, cameras and session, as the local API will report it."""
        return lan_presence.status_report(
            self.config, self.enrollment, self.emergency, self.uplink, self.capture, self.share
        )


OWED_SAVE_S = 2.0
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


def _boot_id() -> str:
    """This boot's id: monotonic times in segment anchors are only comparable within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read(64).strip()
    except OSError:
        return secrets.token_hex(16)
