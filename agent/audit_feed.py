"""Reads the agent's audit trail for shipping to the receiver, from any entry on.

The uplink asks for the entries after the receiver's last one
(``Welcome.audit_n``, then each ``AuditAck``); this reads them from the file
in batches of whole entries (a torn fragment a power cut left is skipped:
the trail continues on the next line). It remembers where the last batch
ended, so shipping a growing trail reads each byte once; after a reconnect
that asks for older entries it scans from the start. Blocking: call it from
a worker thread.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.protocol import MAX_AUDIT_LINES, MAX_CONTROL_BYTES

#: A batch stays well inside one control message (JSON escaping can grow a line).
MAX_BATCH_BYTES = MAX_CONTROL_BYTES // 3


class AuditFeed:
    """Batches of whole audit entries from ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._n = 0  # the entry that ends just before ``_offset``
        self._offset = 0

    def after(self, n: int) -> tuple[int, tuple[str, ...]]:
        """``(first, lines)``: the entries after entry ``n`` (empty when none yet)."""
        if n < self._n:
            self._n, self._offset = 0, 0
        lines: list[str] = []
        first = 0
        size = 0
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return 0, ()
        with fh:
            fh.seek(self._offset)
            while len(lines) < MAX_AUDIT_LINES and size < MAX_BATCH_BYTES:
                raw = fh.readline(64 * 1024)
                if not raw.endswith(b"\n"):
                    break  # the entry being written (or a torn tail): not whole yet
                try:
                    number = int(json.loads(raw)["n"])
                except (ValueError, KeyError, TypeError):
                    number = -1  # a torn fragment: skipped, the chain continues after it
                if number > n and number != -1:
                    if not lines:
                        first = number
                    lines.append(raw.rstrip(b"\n").decode("utf-8"))
                    size += len(raw)
                # Resume the next read after this line only once it is shipped: a
                # batch cut short is read again from its first line.
                if number != -1 and number <= n:
                    self._n, self._offset = number, fh.tell()
        return first, tuple(lines)
