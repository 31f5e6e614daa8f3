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

from tests.bench.enroll import NoNetworkNamespace, check_unshare
from tests.browser import CHROMIUM

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"bench", "figure", "value", "unit", "peer", "peer_value", "ratio"}
FIGURES = {
    "trigger_to_first_byte_p50_ms",
    "trigger_to_first_byte_p99_ms",
    "trigger_to_live_frame_p99_ms",
    "agent_cpu_per_stream_pct",
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


STORE_FIGURES = {f for f in FIGURES if f.startswith("store_")}
BACKFILL_FIGURES = {f for f in FIGURES if f.startswith("backfill_")}
INGEST_FIGURES = {f for f in FIGURES if f.startswith("receiver_ingest_")}
TRIGGERS_FIGURES = {"trigger_verify_per_s", "fuzz_cases_rejected", "fuzz_cases_accepted"}
ENROLL_FIGURES = {"discover_to_enrolled_s"}
GLASS_FIGURES = {"glass_to_browser_p50_ms", "glass_to_browser_p95_ms"}


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


@pytest.mark.timeout(40)
def test_store_smoke_run(tmp_path: Path) -> None:
    assert smoke_figures(["store"], tmp_path, timeout=30) == STORE_FIGURES


@pytest.mark.timeout(90)
def test_backfill_smoke_run(tmp_path: Path) -> None:
    assert smoke_figures(["backfill"], tmp_path, timeout=80) == BACKFILL_FIGURES


@pytest.mark.timeout(120)
def test_receiver_ingest_smoke_run(tmp_path: Path) -> None:
    assert smoke_figures(["receiver_ingest"], tmp_path, timeout=110) == INGEST_FIGURES


@pytest.mark.timeout(40)
def test_triggers_smoke_run(tmp_path: Path) -> None:
    figures = smoke_figures(["triggers"], tmp_path, timeout=30)
    assert figures == TRIGGERS_FIGURES


@pytest.mark.timeout(170)
def test_enroll_smoke_run(tmp_path: Path) -> None:
    need_netns()
    assert smoke_figures(["enroll"], tmp_path, timeout=160) == ENROLL_FIGURES


@pytest.mark.timeout(120)
def test_glass_smoke_run(tmp_path: Path) -> None:
    need_chromium()
    assert smoke_figures(["glass"], tmp_path, timeout=110) == GLASS_FIGURES


@pytest.mark.timeout(300)
def test_smoke_run_prints_one_figure_per_line(tmp_path: Path) -> None:
    need_netns()  # the whole run includes enroll
    need_chromium()  # and glass
    assert smoke_figures([], tmp_path, timeout=280) == FIGURES
