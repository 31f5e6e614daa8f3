"""The receiver's copy of a device's audit trail (receiver.audit_copy) when two
connections of one device append at once: a device that reconnects may have its old
connection's append still in one thread while the new one appends in another."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from agent import protocol as p
from agent.audit import AuditChain, verify_chain
from agent.config import load_config
from agent.daemon import Agent
from breakglass.demo import write_agent_config
from receiver import audit_copy, ingest
from receiver.audit_copy import AuditCopies
from receiver.server import Receiver

pytestmark = pytest.mark.timeout(30)


def trail(entries: int) -> tuple[str, ...]:
    chain = AuditChain()
    return tuple(
        chain.entry(1_767_000_000.0 + i, "button_press", {"button": "office"}).decode().rstrip("\n")
        for i in range(entries)
    )


def test_two_threads_appending_one_batch_hold_each_entry_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies = AuditCopies(tmp_path)
    lines = trail(3)
    other: list[int] = []
    others: list[threading.Thread] = []
    fsync = os.fsync

    def fsync_while_the_other_appends(fd: int) -> None:
        # The first append is between its write and its fsync (the disk is slow): the
        # other connection's append of the same batch runs now, as far as it can.
        if not others:
            thread = threading.Thread(target=lambda: other.append(copies.append("d-1", 1, lines)))
            others.append(thread)
            thread.start()
            thread.join(0.5)  # it waits for the first append, or it is done
        fsync(fd)

    monkeypatch.setattr(audit_copy.os, "fsync", fsync_while_the_other_appends)
    assert copies.append("d-1", 1, lines) == 3
    others[0].join(10)
    assert other == [3]
    held = copies.path("d-1").read_bytes().splitlines()
    assert len(held) == 3
    assert verify_chain(held)[0] == 3
    assert copies.last_n("d-1") == 3


def test_a_fork_sent_again_and_again_is_kept_once_and_forks_are_bounded(
    tmp_path: Path,
) -> None:
    """A device replaced under the same id ships a trail the copy does not continue; it
    sent it again after each ack, and each time the receiver stored another fork file:
    1,491 in a few seconds (found by the agent benchmark). The same fork is kept once,
    and at most MAX_FORKS different ones per device."""
    copies = AuditCopies(tmp_path)
    assert copies.append("d-1", 1, trail(2)) == 2
    chain = AuditChain()  # another device's trail under the same id: none of it chains
    other = tuple(
        chain.entry(1_767_000_100.0 + k, "agent_started", {}).decode().rstrip("\n")
        for k in range(3)
    )
    for _ in range(100):
        assert copies.append("d-1", 1, other) == 2
    assert len(list(tmp_path.glob("d-1.fork-*.log"))) == 1
    for i in range(3, 3 + 2 * audit_copy.MAX_FORKS):  # forks, each different
        chain = AuditChain()
        lines = tuple(
            chain.entry(1_767_000_000.0 + i + k, "button_press", {"k": i}).decode().rstrip("\n")
            for k in range(3)  # its entry 3 does not follow the copy's entry 2
        )
        copies.append("d-1", 1, lines)
    assert len(list(tmp_path.glob("d-1.fork-*.log"))) == audit_copy.MAX_FORKS
    assert copies.last_n("d-1") == 2


async def test_an_agent_whose_trail_the_receiver_does_not_hold_ships_it_once_a_connection(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Pi re-provisioned under the same device id (a new SD card): the receiver's copy
    holds the old trail, so it takes none of the new one and acks where it was; the
    agent sent the same batch again at once, over and over (46 % of a core in the
    benchmark, a fork file each time). It now sends it once per connection."""
    monkeypatch.setattr(ingest, "HEARTBEAT_S", 1.0)  # the agent beats as often
    appends: list[int] = []
    real_append = AuditCopies.append

    def counted(self: AuditCopies, device: str, first: int, lines: tuple[str, ...]) -> int:
        appends.append(first)
        return real_append(self, device, first, lines)

    monkeypatch.setattr(AuditCopies, "append", counted)
    beats: list[p.Heartbeat] = []
    three = asyncio.Event()
    real_receive = p.Uplink.receive

    def receive(self: p.Uplink, message: str | bytes) -> p.Event:
        event = real_receive(self, message)
        if isinstance(event, p.Heartbeat) and self.role is p.Role.RECEIVER:
            beats.append(event)
            if len(beats) >= 3:
                three.set()
        return event

    monkeypatch.setattr(p.Uplink, "receive", receive)
    first = write_agent_config(tmp_path / "old", receiver, fps=15)
    async with Agent(load_config(first)) as old:
        await old.uplink.wait_until(lambda: old.uplink.audit_acked > 0)  # the copy has it
    again = write_agent_config(tmp_path / "new", receiver, fps=15)  # same id, new card
    async with Agent(load_config(again)) as new:
        new.audit.record("camera_fault", camera="front-door", error="test")  # entry 2 on
        forks = receiver.data_dir / "audit"
        await new.uplink.wait_until(lambda: len(list(forks.glob("*.fork-*"))) == 1)
        shipped = len(appends)
        beats.clear()
        three.clear()
        new.audit.record("camera_recovered", camera="front-door")  # more: still not resent
        async with asyncio.timeout(10):
            await three.wait()  # three heartbeats later (one a second)
        assert len(appends) == shipped
