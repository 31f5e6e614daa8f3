"""The receiver's copy of a device's audit trail (receiver.audit_copy) when two
connections of one device append at once: a device that reconnects may have its old
connection's append still in one thread while the new one appends in another."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.audit import AuditChain, verify_chain
from receiver import audit_copy
from receiver.audit_copy import AuditCopies

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
