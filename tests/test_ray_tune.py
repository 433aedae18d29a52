"""Tuning campaigns on a local CPU Ray: 4 tiny trials, 2 at a time; ASHA; kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray_helpers import tiny_config

from raysseg import layout
from raysseg.config import load_config, to_flat_dict
from raysseg.data.synth import generate_synthetic
from raysseg.distributed.tune import open_study, read_results, run_campaign
from raysseg.tune_space import load_space

# Each test runs several minutes: 4+ trials of a full (tiny) pipeline, each step its own Ray Train or
# Ray Data job. On a machine shared by other Ray jobs (load average 50 on 2 cores) test 1 took 13 min.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]

# Two trials at once: each trial's own loop, Train worker, label-inference actor and CRF tasks take
# fractions of a CPU. Ray Data's read tasks ask for 1 CPU each, so the cluster has 4 logical CPUs:
# with 2, two label updates hold both CPUs with reads and their actors never start (RAY_NOTES).
NUM_CPUS = 4
FRACTIONAL = (
    "resources.cpus_per_worker=0.3",
    "resources.refine_cpus_per_actor=0.3",
    "resources.crf_cpus=0.25",
)
SPACE = {
    "space": {
        "stages.count": [1, 2],
        "labels.cam_threshold": "uniform(0.0, 0.4)",
        "labels.sal_threshold": "uniform(0.0, 0.2)",
        "loss.w_sal": "loguniform(0.5, 2.0)",
    },
    "tune": {"max_concurrent": 2, "trial_cpus": 0.1, "seed": 3},
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(str(root), n_train=6, n_val=2, size=48, seed=1)
    return root


@pytest.fixture
def ray_tmp(tmp_path_factory) -> Path:
    # Short: Ray's socket paths under it must stay within 107 bytes.
    return tmp_path_factory.mktemp("ray")


def _space_file(folder: Path, one_stage: bool = False, **tune) -> Path:
    space = dict(SPACE["space"])
    if one_stage:  # the cheapest trials: one stage each (no early stopping then)
        del space["stages.count"]
        tune["trial_overrides"] = {"stages.count": 1}
    tree = {"space": space, "tune": {**SPACE["tune"], **tune}}
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_campaign_of_four_trials_table_best_yaml_and_early_stopping(tiny_data, tmp_path, ray_tmp):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    base = tiny_config(tiny_data, tmp_path / "campaign", *FRACTIONAL)
    # Start points make ASHA's decision certain: one trial whose labels are sensible, then three
    # whose thresholds of 0 mark nearly every pixel foreground (far worse pseudo labels). The
    # objective is pseudo-label mIoU: after 1 epoch on 4 images val mIoU is ~0 for every trial.
    good = {"stages.count": 2, "labels.cam_threshold": 0.2, "labels.sal_threshold": 0.06}
    bad = [
        {"stages.count": 2, "labels.cam_threshold": 0.0, "labels.sal_threshold": t}
        for t in (0.0, 0.001, 0.002)
    ]
    space = load_space(
        _space_file(tmp_path, start_points=[good, *bad], objectives=["label_miou"]), base
    )
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, _temp_dir=str(ray_tmp))
    try:
        started = time.perf_counter()
        outputs = run_campaign(base, space, trials=4)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    print(f"campaign of 4 trials: {seconds:.0f} s")

    campaign = tmp_path / "campaign"
    rows = pq.read_table(str(campaign / "results.parquet")).to_pylist()
    assert len(rows) == 4
    assert {r["trial"] for r in rows} == {f"trial_{i:04d}" for i in range(4)}
    assert {r["status"] for r in rows} <= {"completed", "stopped"}
    for row in rows:
        assert 0.0 <= row["val_miou"] <= 1.0 and 0.0 <= row["label_miou"] <= 1.0
        assert len(row["val_miou_per_stage"]) == row["stages_done"]
        run = campaign / "trials" / row["trial"]
        for stage in range(row["stages_done"]):
            assert (run / f"stage_{stage}" / "refine.DONE").exists()
        assert not (run / "final.DONE").exists()  # the costly final evaluation is skipped
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped, [(r["trial"], r["val_miou"]) for r in rows]
    for row in stopped:
        assert row["stages_done"] < row["stages_planned"]
        run = campaign / "trials" / row["trial"]
        last = row["stages_planned"] - 1
        assert not (run / f"stage_{last}" / "refine.DONE").exists()
    for row in rows:
        if row["status"] == "completed":
            assert row["stages_done"] == row["stages_planned"]

    # One warm-up trained for the campaign: the space holds no key the warm-up reads.
    shared = [p for p in (campaign / "shared").iterdir() if p.is_dir()]
    assert len(shared) == 1
    shared_weights = Path(layout.final_checkpoint(str(shared[0]), "warmup")).read_bytes()
    for row in rows:
        run = str(campaign / "trials" / row["trial"])
        marker = json.loads(Path(layout.step_marker(run, "warmup")).read_text())
        assert marker["shared"] == str(shared[0])
        assert Path(layout.final_checkpoint(run, "warmup")).read_bytes() == shared_weights

    # The best config: the full base pipeline with the best trial's values, loadable as it is.
    best = max(rows, key=lambda r: r["label_miou"])
    assert outputs["best"]["trial"] == best["trial"]
    config = load_config(campaign / "best.yaml")
    flat = to_flat_dict(config)
    for key, value in read_results(str(campaign))[0]["params"].items():
        assert key in flat and value is not None
    best_params = next(r for r in read_results(str(campaign)) if r["trial"] == best["trial"])
    for key, value in best_params["params"].items():
        assert flat[key] == pytest.approx(value)
    assert config.run_dir == str(campaign / "best_run")
    for name in ("objective_per_trial.png", "parallel_coordinates.png", "miou_per_stage.png"):
        assert (campaign / "plots" / name).stat().st_size > 5_000


def _tune_command(data: Path, campaign: Path, space: Path, trials: int) -> list[str]:
    config = tiny_config(data, campaign, *FRACTIONAL)
    overrides = [
        f"{k}={v}" for k, v in to_flat_dict(config).items() if not isinstance(v, (tuple, list))
    ]
    overrides += ["labels.cam_scales=[1.0]", "eval.scales=[1.0]"]
    return [
        sys.executable,
        "-m",
        "raysseg",
        "tune",
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--num-cpus",
        str(NUM_CPUS),
        *overrides,
    ]


def _markers(run: Path) -> dict[str, float]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*.DONE")}


def test_killed_campaign_resumes_with_history(tiny_data, tmp_path, ray_tmp):
    campaign = tmp_path / "campaign"
    space = _space_file(tmp_path, one_stage=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(ray_tmp),
    }
    command = _tune_command(tiny_data, campaign, space, trials=4)
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    results = campaign / "results.parquet"
    deadline = time.monotonic() + 1000
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if results.exists() and pq.read_table(str(results)).num_rows >= 2:
                break
            time.sleep(0.5)
        assert process.poll() is None, "the campaign ended before it could be killed"
        assert pq.read_table(str(results)).num_rows >= 2, "no 2 trials finished in time"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        process.wait()
    first = read_results(str(campaign))
    assert 2 <= len(first) < 4
    kept = {row["trial"]: row for row in first}
    marker_times = {name: _markers(campaign / "trials" / name) for name in kept}

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1000)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    rows = read_results(str(campaign))
    assert len(rows) == 4
    by_name = {row["trial"]: row for row in rows}
    for name, row in kept.items():
        assert by_name[name]["params"] == row["params"]
        assert by_name[name]["val_miou"] == row["val_miou"]
        assert _markers(campaign / "trials" / name) == marker_times[name]  # not retrained
    study = open_study(str(campaign))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    assert {t.user_attrs["run_name"] for t in complete} == set(by_name)
    for trial in complete:
        assert trial.params == pytest.approx(by_name[trial.user_attrs["run_name"]]["params"])
    assert "finished earlier" in rerun.stdout
