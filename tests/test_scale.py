"""Scale checks: driver memory flat from N = 500 to N = 3,000, shard folders bounded, resume at scale.

One run of bench/scale.py serves both tests (each N in its own driver process; the figures it saves
are read back): for each N the label update is interrupted (SIGINT) at 40 % and rerun, and the
rerun's update is the one measured. It reads all N rows, skips the labels the interrupted run
finished and writes the rest, so its driver memory still follows N. (bench/scale.py --quick runs
N = 5,000; 3,000 keeps the test within about two minutes on 2 cores, and a driver that kept
per-image state would still grow with the 2,500 more rows.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysseg.rundir import layout

BENCH = Path(__file__).resolve().parents[1] / "bench"
# What the driver may gain between N = 500 and N = 3,000. A driver holding per-image state grows
# with N; one holding counts does not. The margin covers sampling noise between two processes.
DRIVER_GROWTH_BOUND_MIB = 64
RESUME_AT = 0.4
SIZES = ("--n", "500", "3000", "--resume-at", str(RESUME_AT))

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory) -> tuple[Path, str, list[dict]]:
    out = tmp_path_factory.mktemp("scale")
    completed = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--out", str(out), *SIZES],
        capture_output=True,
        text=True,
        timeout=880,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        cwd=BENCH.parent,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out, completed.stdout, json.loads((out / "scale.json").read_text())["results"]


def test_driver_memory_stays_flat_and_shard_folders_stay_small(scale_run) -> None:
    _, printed, results = scale_run
    small, large = results
    assert (small["n"], large["n"]) == (500, 3000)
    for result in results:
        # Every image labelled, none failed: by the interrupted run or by the measured rerun.
        assert result["written"] + result["skipped"] == result["n"] and result["errors"] == 0
        # Sha1 shards spread evenly: no folder far above N / SHARD_COUNT.
        expected = result["n"] / layout.SHARD_COUNT
        assert result["fullest_shard_folder"] <= math.ceil(expected + 5 * math.sqrt(expected) + 3)
    growth = large["driver_update_peak_mib"] - small["driver_update_peak_mib"]
    assert growth < DRIVER_GROWTH_BOUND_MIB, (small, large)
    assert large["worker_peak_mib"] > 0
    assert "images/s" in printed and "driver peak MiB (update)" in printed


def test_an_interrupted_update_rerun_writes_only_the_rest(scale_run) -> None:
    out, printed, results = scale_run
    for result in results:
        n, resume = result["n"], result["resume"]
        assert resume["done_before_interrupt"] >= RESUME_AT * n
        # Labels finished before the interrupt are skipped; only the rest is written, each once.
        assert resume["written"] + resume["skipped"] == n
        assert 0 < resume["written"] <= n - resume["done_before_interrupt"]
        labels = out / f"n{n}" / "run" / "labels"
        for kind in ("seg", "sal"):
            assert len(list((labels / kind).rglob("*.png"))) == n
        leftovers = [p for p in labels.rglob("*") if p.is_file() and p.suffix != ".png"]
        assert leftovers == []
        assert f"the rerun wrote {resume['written']:,} new labels" in printed
