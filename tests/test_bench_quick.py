"""Every bench script runs end to end in --quick mode and prints its figures (no timed assertions).

Where a bench is given `--out`, the JSON it writes must carry its name and run facts, and
bench/report.py must render it: BENCHMARKS.md's tables come from that JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
FACTS = {"command", "commit", "date", "machine", "torch"}


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


def _check_results(folder: Path, bench: str) -> None:
    """OUT/<bench>.json names its bench, says where and when it ran, and renders to a table."""
    results = json.loads((folder / f"{bench}.json").read_text())
    assert results["bench"] == bench and set(results["facts"]) >= FACTS, results.get("facts")
    if str(BENCH) not in sys.path:  # report.py imports the benches' _common
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert "|---|" in report.RENDERERS[bench]([results])


def test_crf_bench_prints_overhead_and_cost_per_megapixel(tmp_path) -> None:
    out = _run("crf.py", "--out", str(tmp_path))
    assert "overhead %" in out and "raysseg s/MP" in out
    assert "saliency, 2 labels / 1 iter" in out and "inference, 3 labels / 10 iter" in out
    _check_results(tmp_path, "crf")


def test_memory_bench_prints_chunked_and_naive_peaks(tmp_path) -> None:
    out = _run("memory.py", "--out", str(tmp_path))
    assert "naive peak MiB" in out and "128x96" in out and "160x120" in out
    _check_results(tmp_path, "memory")


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_label_update_bench_and_coco_projection(tmp_path) -> None:
    # One worker keeps the smoke test short; the 2-worker case is the documented full run.
    out = _run("label_update.py", "--out", str(tmp_path), "--workers", "1", timeout=300)
    assert "serial images/s" in out and "ray steady images/s" in out
    assert "ray with 1 worker(s), crf_placement auto / serial loop on 1 core" in out
    _check_results(tmp_path, "label_update")
    projection = _run(
        "coco_projection.py",
        "--from-json",
        str(tmp_path / "label_update.json"),
        "--out",
        str(tmp_path),
    )
    assert "core-h / update" in projection and "not measured" in projection
    _check_results(tmp_path, "coco_projection")


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_training_bench_prints_images_per_second(tmp_path) -> None:
    out = _run("training.py", "--out", str(tmp_path), "--workers", "1", timeout=300)
    assert "plain torch images/s" in out and "ray train images/s" in out
    _check_results(tmp_path, "training")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_parquet_read_bench_prints_both_readers(tmp_path) -> None:
    out = _run("parquet_read.py", "--out", str(tmp_path), timeout=240)
    assert "raysseg read_parquet (V1)" in out and "Ray default (V2)" in out
    assert "the time per read" in out
    _check_results(tmp_path, "parquet_read")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_idle_bench_prints_each_ray_process_and_the_total(tmp_path) -> None:
    out = _run("ray_idle.py", "--out", str(tmp_path), timeout=240)
    assert "% of a core" in out and "raylet" in out and "gcs_server" in out
    assert "all Ray processes and the driver:" in out
    _check_results(tmp_path, "ray_idle")


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_gpu_check_cpu_quick_mode_runs_every_step(tmp_path) -> None:
    # One pipeline (the demo's backbone): resnet50's is the same step function with another
    # backbone name, and costs 2 more Ray Train stages (~40 s of start-up); the GPU run does both.
    # ~2 minutes on 2 cores, mostly the start-up of two Ray Train stages.
    out = _run(
        "gpu_check.py",
        "--device",
        "cpu",
        "--backbones",
        "efficientnet_lite0",
        "--out",
        str(tmp_path),
        timeout=870,
    )
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["device"] == "cpu" and results["torch"] and results["ray"]
    assert "--device" in results["command"]
    expected = {
        "data",
        "pipeline_efficientnet_lite0",
        "label_update",
        "predict",
        "training",
        "act_memory",
        "amp_labels",
        "torch_compile",
    }
    steps = results["steps"]
    assert set(steps) == expected, sorted(steps)
    # A step that fails records its error and the script goes on: every one must be "ok" here.
    failed = {name: step.get("error") for name, step in steps.items() if step["status"] != "ok"}
    assert not failed, failed
    assert all(step["seconds"] >= 0 for step in steps.values())
    training = steps["training"]
    for variant in ("fp32", "amp", "amp_channels_last"):
        rate = training[variant]["images_per_s"]
        assert isinstance(rate, float) and math.isfinite(rate) and rate > 0, (variant, rate)
    # raysseg autocasts on CUDA only: on CPU the "amp" figure ran in fp32, and the JSON says so.
    assert training["amp"]["autocast_dtype"] == "float32" and "CUDA only" in training["amp"]["note"]
    labels = steps["amp_labels"]
    agreement = labels["pixel_agreement"]
    fraction = isinstance(agreement, float) and 0.0 <= agreement <= 1.0
    assert fraction or "CUDA only" in labels["note"], labels
    assert steps["label_update"]["images"] > 0 and steps["label_update"]["images_per_s"] > 0
    assert steps["label_update"]["gpu_busy"] == {"available": False, "reason": "device is cpu"}
    memory = steps["act_memory"]
    assert memory["fp32_whole"]["peak_mib"] > memory["fp32_chunked"]["peak_mib"], memory
    assert memory["fp32_whole"]["chunk_rows"] > memory["fp32_chunked"]["chunk_rows"]
    assert steps["torch_compile"]["compile"]["status"] in ("ok", "failed")
    assert "pipeline_efficientnet_lite0" in out and "written" in out
    assert steps["label_update"]["backbone"] == "efficientnet_lite0"


def test_process_cpu_counts_each_kind_of_process_the_command_starts(tmp_path) -> None:
    done = tmp_path / "burned"
    burner = tmp_path / "burner.py"
    # About 0.6 s of CPU, then alive a while longer: the kind of work a Ray worker does.
    burner.write_text(
        "import pathlib, time\n"
        "end = time.process_time() + 0.6\n"
        "while time.process_time() < end: pass\n"
        f"pathlib.Path({str(done)!r}).touch(); time.sleep(1.0)\n"
    )
    # The burner is started by a process that exits at once (as `ray start` leaves its daemons):
    # an orphan, which the bench must still count.
    starter = f"import subprocess, sys; subprocess.Popen([sys.executable, {str(burner)!r}])"
    parent = (
        "import pathlib, subprocess, sys, time\n"
        f"subprocess.run([sys.executable, '-c', {starter!r}])\n"
        f"while not pathlib.Path({str(done)!r}).exists(): time.sleep(0.05)\n"
        "time.sleep(0.3); sys.exit(3)\n"
    )
    bench = [sys.executable, str(BENCH / "process_cpu.py"), "--interval", "0.05"]
    bench += ["--out", str(tmp_path), "--"]
    completed = subprocess.run(
        [*bench, sys.executable, "-c", parent],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=BENCH.parent,
    )
    assert completed.returncode == 3, completed.stderr  # the command's own exit status
    rows = {line.split()[0]: line.split() for line in completed.stdout.splitlines() if line.strip()}
    assert "burner.py" in rows, completed.stdout
    count, cpu = int(rows["burner.py"][1]), float(rows["burner.py"][2])
    assert count == 1 and 0.4 <= cpu <= 2.0, completed.stdout
    assert "exit 3" in completed.stdout and "machine CPU" in completed.stdout
    _check_results(tmp_path, "process_cpu")
