"""A tuning campaign on a local CPU Ray: 4 tiny trials, 2 at a time, ASHA; its driver killed
mid-campaign, and the rerun of the same command finishing it with the search history.

One campaign serves both tests (a module fixture): the first reads the finished campaign (table,
early stopping, shared warm-up, best.yaml, plots), the second what the kill and the rerun kept.
"""

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
import yaml
from ray_helpers import tiny_config

from raysseg.config import load_config, to_flat_dict
from raysseg.rundir import layout
from raysseg.tuning.results import read_results
from raysseg.tuning.study import open_study

# Each trial is a full (tiny) pipeline, each step its own Ray Train or Ray Data job: the campaign
# runs several minutes. On a machine shared by other Ray jobs (load average 50 on 2 cores) a
# campaign of 4 trials took 13 min.
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
# Start points make ASHA's decision certain: trials whose labels are sensible (GOOD, SECOND_GOOD)
# and trials whose thresholds of 0 mark nearly every pixel foreground (far worse pseudo labels).
# The objective is pseudo-label mIoU: after 1 epoch on 6 images val mIoU is ~0 for every trial.
# ASHA decides after stage 0 (its only rung), so the good trials need no second stage: one stage
# each keeps the campaign 2 Ray Train stages shorter. The bad ones plan 2, so a stop shows.
GOOD = {"stages.count": 1, "labels.cam_threshold": 0.2, "labels.sal_threshold": 0.06}
BAD = {"stages.count": 2, "labels.cam_threshold": 0.0, "labels.sal_threshold": 0.0}
WORSE = {"stages.count": 2, "labels.cam_threshold": 0.0, "labels.sal_threshold": 0.001}
SECOND_GOOD = {"stages.count": 1, "labels.cam_threshold": 0.25, "labels.sal_threshold": 0.05}
SPACE = {
    "space": {
        "stages.count": [1, 2],
        "labels.cam_threshold": "uniform(0.0, 0.4)",
        "labels.sal_threshold": "uniform(0.0, 0.2)",
        "loss.w_sal": "loguniform(0.5, 2.0)",
    },
    "tune": {
        "max_concurrent": 2,
        "trial_cpus": 0.1,
        "seed": 3,
        "objectives": ["label_miou"],
        "start_points": [GOOD, BAD, WORSE, SECOND_GOOD],
    },
}
TRIALS = 4


def _tune_command(data: Path, campaign: Path, space: Path) -> list[str]:
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
        str(TRIALS),
        "--num-cpus",
        str(NUM_CPUS),
        *overrides,
    ]


def _markers(run: Path) -> dict[str, float]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*.DONE")}


def _rows(results: Path) -> list[dict]:
    return pq.read_table(str(results)).to_pylist() if results.exists() else []


def _killable(campaign: Path) -> bool:
    """A trial was stopped early and 2 trials are in the table, while a started trial (its values
    written, not merely its folder made) is unfinished: the moment to kill the driver."""
    rows = _rows(campaign / "results.parquet")
    started = {p.name: (p / "trial.json").exists() for p in (campaign / "trials").glob("trial_*")}
    unfinished = set(started) - {row["trial"] for row in rows}
    return (
        len(rows) >= 2
        and any(row["status"] == "stopped" for row in rows)
        and bool(unfinished)
        and all(started.values())
    )


@pytest.fixture(scope="module")
def campaign(tiny_data_factory, tmp_path_factory, own_ray_temp_dir) -> dict:
    """`raysseg tune` of 4 trials (2 at a time), SIGKILLed once ASHA stopped a trial and 2 trials
    are finished while another runs; then the same command rerun to the end.

    Why the kill waits for a stopped trial: ASHA decides from the results of the session that
    runs it (a rerun starts a fresh scheduler), and with 2 trials at a time the first session's
    order makes one of BAD (if GOOD reached stage 1 first) or WORSE (judged after both) stop.
    """
    data = tiny_data_factory(n_train=6, n_val=2)
    root = tmp_path_factory.mktemp("tune")
    campaign_dir = root / "campaign"
    space = root / "space.yaml"
    # The study in an RDB (SQLite here, PostgreSQL on a cluster): rebuilt at the rerun's start.
    study_url = f"sqlite:///{root / 'study.db'}"
    space.write_text(yaml.safe_dump({**SPACE, "tune": {**SPACE["tune"], "storage": study_url}}))
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(own_ray_temp_dir),
    }
    command = _tune_command(data, campaign_dir, space)
    first_log = root / "first.log"
    with first_log.open("w") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline, ready = time.monotonic() + 1200, False
    try:
        while not ready and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            ready = _killable(campaign_dir)
        assert process.poll() is None, "the campaign ended before it could be killed"
        assert ready, first_log.read_text()[-3000:]
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        process.wait()
    first = read_results(str(campaign_dir))
    kept = {row["trial"]: row for row in first}
    trials = (campaign_dir / "trials").glob("trial_*")
    cut_off = sorted(p.name for p in trials if p.name not in kept and (p / "trial.json").exists())
    marker_times = {name: _markers(campaign_dir / "trials" / name) for name in [*kept, *cut_off]}

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    return {
        "dir": campaign_dir,
        "kept": kept,
        "marker_times": marker_times,
        "cut_off": cut_off,
        "rerun_stdout": rerun.stdout,
        "study_url": study_url,
    }


def test_campaign_of_four_trials_table_best_yaml_and_early_stopping(campaign) -> None:
    campaign_dir = campaign["dir"]
    rows = pq.read_table(str(campaign_dir / "results.parquet")).to_pylist()
    assert len(rows) == TRIALS
    assert {r["trial"] for r in rows} == {f"trial_{i:04d}" for i in range(TRIALS)}
    assert {r["status"] for r in rows} <= {"completed", "stopped"}
    for row in rows:
        assert 0.0 <= row["val_miou"] <= 1.0 and 0.0 <= row["label_miou"] <= 1.0
        assert len(row["val_miou_per_stage"]) == row["stages_done"]
        run = campaign_dir / "trials" / row["trial"]
        for stage in range(row["stages_done"]):
            assert (run / f"stage_{stage}" / "refine.DONE").exists()
        assert not (run / "final.DONE").exists()  # the costly final evaluation is skipped
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped, [(r["trial"], r["label_miou"]) for r in rows]
    for row in stopped:
        assert row["stages_done"] < row["stages_planned"]
        run = campaign_dir / "trials" / row["trial"]
        last = row["stages_planned"] - 1
        assert not (run / f"stage_{last}" / "refine.DONE").exists()
    for row in rows:
        if row["status"] == "completed":
            assert row["stages_done"] == row["stages_planned"]

    # One warm-up trained for the campaign, trials running 2 at a time: the space holds no key
    # the warm-up reads.
    shared = [p for p in (campaign_dir / "shared").iterdir() if p.is_dir()]
    assert len(shared) == 1
    shared_weights = Path(layout.final_checkpoint(str(shared[0]), "warmup")).read_bytes()
    for row in rows:
        run = str(campaign_dir / "trials" / row["trial"])
        marker = json.loads(Path(layout.step_marker(run, "warmup")).read_text())
        assert marker["shared"] == str(shared[0])
        assert Path(layout.final_checkpoint(run, "warmup")).read_bytes() == shared_weights

    # The best config: the full base pipeline with the best trial's values, loadable as it is.
    best = max(rows, key=lambda r: r["label_miou"])
    assert f"best: {best['trial']} (label_miou" in campaign["rerun_stdout"]
    config = load_config(campaign_dir / "best.yaml")
    flat = to_flat_dict(config)
    for key, value in read_results(str(campaign_dir))[0]["params"].items():
        assert key in flat and value is not None
    best_params = next(r for r in read_results(str(campaign_dir)) if r["trial"] == best["trial"])
    for key, value in best_params["params"].items():
        assert flat[key] == pytest.approx(value)
    assert config.run_dir == str(campaign_dir / "best_run")
    for name in ("objective_per_trial.png", "parallel_coordinates.png", "miou_per_stage.png"):
        assert (campaign_dir / "plots" / name).stat().st_size > 5_000


def test_killed_campaign_resumes_with_history(campaign) -> None:
    campaign_dir, kept = campaign["dir"], campaign["kept"]
    assert 2 <= len(kept) < TRIALS  # killed with trials finished and a trial unfinished
    rows = read_results(str(campaign_dir))
    assert len(rows) == TRIALS
    by_name = {row["trial"]: row for row in rows}
    for name, row in kept.items():
        assert by_name[name]["params"] == row["params"]
        assert by_name[name]["val_miou"] == row["val_miou"]
        assert by_name[name]["status"] == row["status"]
        assert _markers(campaign_dir / "trials" / name) == campaign["marker_times"][name]
    study = open_study(str(campaign_dir), campaign["study_url"])
    # Nothing left RUNNING, WAITING or FAILED: the rebuilt study holds exactly the table.
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * TRIALS
    complete = study.trials
    assert {t.user_attrs["run_name"] for t in complete} == set(by_name)
    for trial in complete:
        assert trial.params == pytest.approx(by_name[trial.user_attrs["run_name"]]["params"])
    stdout = campaign["rerun_stdout"]
    assert f"{len(kept)} trial(s) finished earlier" in stdout
    # The trials the kill cut off were rerun under their own names, in their run directories.
    cut_off = campaign["cut_off"]
    assert cut_off and set(cut_off) <= set(by_name)
    assert f"rerunning {len(cut_off)} trial(s) cut off earlier: {', '.join(cut_off)}" in stdout
    for name in cut_off:
        run = campaign_dir / "trials" / name
        # Its steps finished before the kill were skipped, not redone (their markers untouched),
        # and it kept the values it started with.
        before = campaign["marker_times"][name]
        assert {k: v for k, v in _markers(run).items() if k in before} == before
        values = json.loads((run / "trial.json").read_text())["params"]
        assert values == pytest.approx(by_name[name]["params"])
