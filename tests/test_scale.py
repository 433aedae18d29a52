"""Scale checks: driver memory flat from N = 500 to N = 5,000, shard folders bounded, resume at scale.

Both run bench/scale.py (each N in its own driver process) and read the figures it saves.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysseg import layout

BENCH = Path(__file__).resolve().parents[1] / "bench"
# What the driver may gain between N = 500 and N = 5,000. A driver holding per-image state grows
# with N; one holding counts does not. The margin covers sampling noise between two processes.
DRIVER_GROWTH_BOUND_MIB = 64


def _scale(out: Path, *args: str, timeout: int) -> tuple[str, list[dict]]:
    completed = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        cwd=BENCH.parent,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout, json.loads((out / "scale.json").read_text())


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_driver_memory_stays_flat_and_shard_folders_stay_small(tmp_path) -> None:
    printed, results = _scale(tmp_path, "--quick", timeout=580)
    small, large = results
    assert (small["n"], large["n"]) == (500, 5000)
    for result in results:
        assert result["written"] == result["n"] and result["errors"] == 0
        # Sha1 shards spread evenly: no folder far above N / SHARD_COUNT.
        expected = result["n"] / layout.SHARD_COUNT
        assert result["fullest_shard_folder"] <= math.ceil(expected + 5 * math.sqrt(expected) + 3)
    growth = large["driver_update_peak_mib"] - small["driver_update_peak_mib"]
    assert growth < DRIVER_GROWTH_BOUND_MIB, (small, large)
    assert large["worker_peak_mib"] > 0
    assert "images/s" in printed and "driver peak MiB (update)" in printed


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_an_interrupted_update_rerun_writes_only_the_rest(tmp_path) -> None:
    n = 800
    printed, [result] = _scale(tmp_path, "--n", str(n), "--resume-at", "0.4", timeout=380)
    resume = result["resume"]
    assert resume["done_before_interrupt"] >= 0.4 * n
    # Labels finished before the interrupt are skipped; only the rest is written, each once.
    assert resume["written"] + resume["skipped"] == n
    assert 0 < resume["written"] <= n - resume["done_before_interrupt"]
    labels = tmp_path / f"n{n}" / "run" / "labels"
    for kind in ("seg", "sal"):
        assert len(list((labels / kind).rglob("*.png"))) == n
    leftovers = [p for p in labels.rglob("*") if p.is_file() and p.suffix != ".png"]
    assert leftovers == []
    assert f"the rerun wrote {resume['written']:,} new labels" in printed
