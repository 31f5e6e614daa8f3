"""The agent fixes glibc's mmap threshold so the segment writer's buffers go back when freed."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

# A child process: allocate and free segment-sized buffers (as the writer does every
# few seconds per camera), then report how much of them its heap still holds.
CHILD = """
import sys
from agent.memory import return_large_buffers
if sys.argv[1] == "fixed":
    assert return_large_buffers()
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
big = bytearray(2 << 20); del big  # the first large buffer: glibc raises its threshold
base = rss_kib()
kept = []  # packets that outlive the buffers around them (the pre-roll)
for _ in range(20):
    held = []
    for _ in range(8):  # a segment's plaintext and sealed copy, between packets
        held.append(bytearray(1 << 20))
        kept.append(bytearray(20_000))
    del held
print(rss_kib() - base - sum(len(k) for k in kept) // 1024)
"""


def held_kib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=30, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator (Linux)")
def test_large_buffers_freed_are_returned_with_the_fixed_threshold() -> None:
    assert held_kib("fixed") < 1024  # nothing of the 8 MiB stays
    assert held_kib("default") >= 4096  # glibc's own rule keeps them in the heap
