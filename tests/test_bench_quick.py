"""Every bench script runs end to end in --quick mode and prints its figures (no timed assertions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str, timeout: int = 240) -> str:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    completed = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=BENCH.parent,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


def test_crf_bench_prints_overhead_and_cost_per_megapixel() -> None:
    out = _run("crf.py")
    assert "overhead %" in out and "raysseg s/MP" in out
    assert "saliency, 2 labels / 1 iter" in out and "inference, 3 labels / 10 iter" in out


def test_memory_bench_prints_chunked_and_naive_peaks() -> None:
    out = _run("memory.py")
    assert "naive peak MiB" in out and "128x96" in out and "160x120" in out


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_label_update_bench_and_coco_projection(tmp_path) -> None:
    # One worker keeps the smoke test short; the 2-worker case is the documented full run.
    out = _run("label_update.py", "--out", str(tmp_path), "--workers", "1", timeout=300)
    assert "serial images/s" in out and "ray steady images/s" in out
    assert "ray with 1 worker(s), crf_placement auto / serial loop on 1 core" in out
    projection = _run("coco_projection.py", "--from-json", str(tmp_path / "label_update.json"))
    assert "core-h / update" in projection and "not measured" in projection


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_training_bench_prints_images_per_second(tmp_path) -> None:
    out = _run("training.py", "--out", str(tmp_path), "--workers", "1", timeout=300)
    assert "plain torch images/s" in out and "ray train images/s" in out


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_parquet_read_bench_prints_both_readers(tmp_path) -> None:
    out = _run("parquet_read.py", "--out", str(tmp_path), timeout=240)
    assert "raysseg read_parquet (V1)" in out and "Ray default (V2)" in out
    assert "the time per read" in out


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_idle_bench_prints_each_ray_process_and_the_total() -> None:
    out = _run("ray_idle.py", timeout=240)
    assert "% of a core" in out and "raylet" in out and "gcs_server" in out
    assert "all Ray processes and the driver:" in out
