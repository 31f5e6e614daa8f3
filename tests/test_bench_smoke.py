"""The benchmarks run (``python -m tests.bench --smoke``) and print well-formed figures.

Only the shape is checked: benchmarks report times, they never judge them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.__main__ import BENCHMARKS
from tests.bench.enroll import NoNetworkNamespace, check_unshare
from tests.browser import CHROMIUM

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"bench", "figure", "value", "unit", "peer", "peer_value", "ratio"}
FIGURES = {
    "trigger_to_first_byte_p50_ms",
    "trigger_to_first_byte_p99_ms",
    "trigger_to_live_frame_p99_ms",
    "agent_cpu_per_stream_pct",
    "agent_cpu_floor_per_stream_pct",
    "agent_cpu_live_per_stream_pct",
    "agent_rss_mb_8_cameras",
    "store_write_amplification",
    "store_write_amplification_fs",
    "store_recovery_s_10k_segments",
    "store_seal_mb_s",
    "backfill_throughput_ratio",
    "backfill_wire_bytes_per_media_byte",
    "backfill_seconds",
    "backfill_sealed_share",
    "backfill_reconnect_s",
    "receiver_ingest_streams_per_core",
    "receiver_ingest_ratio",
    "trigger_verify_per_s",
    "fuzz_cases_rejected",
    "fuzz_cases_accepted",
    "discover_to_enrolled_s",
    "glass_to_browser_p50_ms",
    "glass_to_browser_p95_ms",
}
#: Counts whose ideal is 0 (value and peer 0, ratio 1.0 by convention).
ZERO_FIGURES = {"fuzz_cases_accepted"}


#: The figures of each benchmark (its smoke run must print exactly these), and the
#: bound of that run in seconds.
SMOKE: dict[str, tuple[set[str], float]] = {
    "trigger": ({f for f in FIGURES if f.startswith("trigger_to_")}, 90),
    "agent_cpu": ({f for f in FIGURES if f.startswith("agent_")}, 110),
    "store": ({f for f in FIGURES if f.startswith("store_")}, 30),
    "backfill": ({f for f in FIGURES if f.startswith("backfill_")}, 80),
    "triggers": ({"trigger_verify_per_s", "fuzz_cases_rejected", "fuzz_cases_accepted"}, 30),
    "enroll": ({"discover_to_enrolled_s"}, 160),
    "receiver_ingest": ({f for f in FIGURES if f.startswith("receiver_ingest_")}, 110),
    "glass": ({"glass_to_browser_p50_ms", "glass_to_browser_p95_ms"}, 110),
}


def need_netns() -> None:
    """Skip (with the reason) where ``unshare -n`` is not permitted: ``enroll`` cannot run.

    The benchmark's own check (the benchmark raises ``NoNetworkNamespace`` there).
    """
    try:
        check_unshare()
    except NoNetworkNamespace as exc:
        pytest.skip(str(exc))


def need_chromium() -> None:
    """Skip (with the reason) where Debian's Chromium is missing: ``glass`` cannot run."""
    if CHROMIUM is None:
        pytest.skip("needs chromium (apt-get install chromium) for the glass benchmark")


def smoke_figures(names: list[str], cache: Path, timeout: float) -> set[str]:
    """Run ``python -m tests.bench NAMES --smoke``; check every line; the figures seen."""
    env = dict(os.environ, BREAKGLASS_BENCH_CACHE=str(cache))  # test streams made here
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench", *names, "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
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
            assert math.isfinite(value), line
            assert value > 0 or (fig["figure"] in ZERO_FIGURES and value == 0), line
        for key in ("bench", "figure", "unit", "peer"):
            assert isinstance(fig[key], str) and fig[key], line
        seen.add(fig["figure"])
    return seen


def test_every_benchmark_has_a_smoke_run_and_every_figure_a_benchmark() -> None:
    assert set(SMOKE) == set(BENCHMARKS)
    assert set().union(*(figures for figures, _ in SMOKE.values())) == FIGURES
    assert sum(len(figures) for figures, _ in SMOKE.values()) == len(FIGURES)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Test streams, generated once for every smoke run of this module."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.timeout(bound + 10))
        for name, (_, bound) in SMOKE.items()
    ],
)
def test_smoke_run(name: str, cache: Path) -> None:
    if name == "enroll":
        need_netns()
    if name == "glass":
        need_chromium()
    figures, bound = SMOKE[name]
    assert smoke_figures([name], cache, timeout=bound) == figures
