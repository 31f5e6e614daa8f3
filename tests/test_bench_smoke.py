"""The benchmarks run (``python -m tests.bench --smoke``) and print well-formed figures.

Only the shape is checked: benchmarks report times, they never judge them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"bench", "figure", "value", "unit", "peer", "peer_value", "ratio"}
FIGURES = {
    "trigger_to_first_byte_p50_ms",
    "trigger_to_first_byte_p99_ms",
    "trigger_to_live_frame_p99_ms",
    "agent_cpu_per_stream_pct",
}


@pytest.mark.timeout(200)
def test_smoke_run_prints_one_figure_per_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines, done.stderr[-4000:]
    seen = set()
    for line in lines:
        fig = json.loads(line)
        assert isinstance(fig, dict), line
        assert set(fig) == KEYS, line
        for key in ("value", "peer_value", "ratio"):
            value = fig[key]
            assert isinstance(value, int | float) and not isinstance(value, bool), line
            assert math.isfinite(value) and value > 0, line
        for key in ("bench", "figure", "unit", "peer"):
            assert isinstance(fig[key], str) and fig[key], line
        seen.add(fig["figure"])
    assert seen == FIGURES
