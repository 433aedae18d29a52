"""Faults survived: killed drivers (between steps, then mid label update) with the pipeline finished
by `ray job submit` on a token-auth head, the node of a worker of a 2-worker training stage lost
mid-epoch, the node running label work removed during a label update.

Everything killed here was started by the test itself: drivers are subprocesses in their own
process group, found by pid; nodes belong to this test's simulated cluster, found from the actors
they run. Never `ray stop` or kill by name: other Ray sessions share the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray_helpers import (
    REPO,
    Head,
    assert_steps_done,
    refused_output,
    submit_job,
    tiny_config,
    tiny_job_config,
)

from raysseg.data.manifest import read_manifest, write_manifest
from raysseg.data.sources import voc_records
from raysseg.distributed.refine import update_stage_labels
from raysseg.distributed.train import StageSpec, train_stage
from raysseg.distributed.train_progress import read_progress
from raysseg.engine.checkpoint import load_checkpoint, save_checkpoint
from raysseg.model.network import build_model
from raysseg.rundir import layout
from raysseg.rundir.markers import write_result
from raysseg.rundir.prepare import prepare_run_dir
from raysseg.rundir.steps import label_step
from raysseg.verify import verify_run

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(poll_s)


def _seg_files(run_dir: Path, stage: int) -> list[Path]:
    return list(Path(layout.stage_labels(str(run_dir), stage), "seg").rglob("*.png"))


def _split_ids(data_root: Path) -> list[str]:
    return (data_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


# ---------------------------------------------------------------------------------------------
# The driver killed (SIGKILL) between steps, its rerun killed mid label update, then the same
# pipeline submitted as a job: all on one private head with token authentication.


def _pipeline_args(config: Path) -> list[str]:
    # refine_batch_size=1: labels appear one image at a time, so the kill lands mid-update.
    return ["pipeline", "--config", str(config), "resources.refine_batch_size=1"]


def _start_driver(head: Head, config: Path, log: Path) -> subprocess.Popen:
    env = {
        **head.env,  # HOME holds the head's token; RAY_AUTH_MODE=token
        "RAY_ADDRESS": head.address,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",  # every log line reaches the file before the kill
    }
    with open(log, "ab") as out:
        # Own session = own process group: the kill reaches the driver and anything it spawned.
        return subprocess.Popen(
            [sys.executable, "-m", "raysseg", *_pipeline_args(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill_driver(driver: subprocess.Popen) -> None:
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)


def _settled_count(run_dir: Path, stage: int) -> int:
    """Label files once the killed job's last tasks are gone (the count stops changing)."""
    previous, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 3.0:
        count = len(_seg_files(run_dir, stage))
        if count != previous:
            previous, stable_since = count, time.monotonic()
        time.sleep(0.2)
    return previous


def _step_names(log: Path, wanted: Callable[[str], bool]) -> list[str]:
    """The steps named by the driver's `wanted` log lines ("[3/6] stage_0/labels: running")."""
    lines = log.read_text().splitlines()
    return [line.split("] ", 1)[1].split(":")[0] for line in lines if wanted(line)]


@pytest.mark.timeout(900)
def test_killed_drivers_then_a_token_auth_job_finish_the_pipeline_labelling_each_image_once(
    private_head, tiny_data: Path, tmp_path: Path
) -> None:
    head = private_head("token")
    root = head.temp_dir.parent
    config = tiny_job_config(root, tiny_data)
    run_dir = root / "run"
    images = len(_split_ids(tiny_data))

    # 1. The driver killed between steps: as soon as the warm-up is done.
    first_log = tmp_path / "first.log"
    driver = _start_driver(head, config, first_log)
    _wait_for(
        lambda: (run_dir / "warmup.DONE").exists() or driver.poll() is not None,
        300,
        "the warm-up to finish",
    )
    _kill_driver(driver)
    done = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.DONE"))
    assert "warmup.DONE" in done, first_log.read_text()[-3000:]
    _assert_quiet_console_with_epoch_lines(first_log.read_text(), "warmup")
    warmup_weights = (run_dir / "warmup" / "checkpoint" / "checkpoint.pt").read_bytes()
    labels_before = _settled_count(run_dir, 0)

    # 2. The same command rerun starts at the next unfinished step; killed mid label update.
    second_log = tmp_path / "second.log"
    rerun = _start_driver(head, config, second_log)
    _wait_for(
        lambda: len(_seg_files(run_dir, 0)) > labels_before or rerun.poll() is not None,
        300,
        "the first stage-0 label of the rerun",
    )
    _kill_driver(rerun)
    ran = _step_names(second_log, lambda line: line.endswith(": running"))
    skipped = _step_names(second_log, lambda line: "done earlier" in line)
    finished_before = [name.removesuffix(".DONE") for name in done]
    assert sorted(skipped) == sorted(finished_before), second_log.read_text()[-3000:]
    assert ran and ran[0] not in finished_before and "warmup" not in ran, ran
    assert not (run_dir / "stage_0" / "labels.DONE").exists(), second_log.read_text()[-3000:]
    before_job = _settled_count(run_dir, 0)
    assert 0 < before_job <= images

    # 3. The pipeline submitted as a job (`ray job submit --working-dir`) on the token-auth head.
    job = submit_job(head, _pipeline_args(config))
    _assert_quiet_console_with_epoch_lines(job.stdout, "stage_0/train")
    # Every command's lines, the killed ones' too, are kept in the run directory.
    kept = (run_dir / "logs" / "raysseg.log").read_text()
    assert "warmup: epoch 1/" in kept and "stage_0/train: epoch 1/" in kept, kept[-3000:]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()
    assert_steps_done(run_dir)
    marker = json.loads((run_dir / "stage_0" / "labels.DONE").read_text())
    # Labelled exactly once: what the killed run finished is skipped, only the rest is written.
    assert marker["skipped"] == before_job and marker["written"] == images - before_job
    assert len(_seg_files(run_dir, 0)) == images
    assert len(list(read_manifest(layout.stage_manifest(str(run_dir), 0)))) == images
    # The finished warm-up was not retrained: its weights are byte for byte those of the first run.
    assert (run_dir / "warmup" / "checkpoint" / "checkpoint.pt").read_bytes() == warmup_weights
    assert [str(p) for p in verify_run(str(run_dir))] == []  # also: no temp / partial files

    # The head itself turns away clients without the token, or with a wrong one.
    assert "Unauthorized" in refused_output(head, root / "nobody")
    wrong = refused_output(head, root / "nobody", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32)
    assert "token is invalid" in wrong


# Ray's INFO output that buried raysseg's lines (worker output, Ray Data's execution dumps).
RAY_NOISE = (
    "Reporting training result",
    "logging_progress.py",
    "Execution plan of Dataset",
    "Parquet dataset sampling",
    "PreemptionWatcher",
    "has constructor arguments in the object store",  # the driver's own core, for Ray Data actors
    "(RayTrainWorker",
    "(TrainController",
)


def _assert_quiet_console_with_epoch_lines(console: str, step: str) -> None:
    """The training step printed a line per epoch, and none of Ray's noise reached the console."""
    assert f"{step}: epoch 1/" in console, console[-3000:]
    noise = [line for line in console.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, noise[:5]


# ---------------------------------------------------------------------------------------------
# A node of a 2-worker training stage lost mid-epoch


def _actor_node(class_name: str, worker_node_ids: set[str]) -> str | None:
    """A worker node that runs an alive actor whose class name holds `class_name`, if any.

    From the GCS's actor table (`ray._private.state.actors`): the public state API needs the
    dashboard, which the simulated cluster does not start.
    """
    for info in ray._private.state.actors(actor_state_name="ALIVE").values():
        node = info["Address"]["NodeID"]
        if class_name in info["ActorClassName"] and node in worker_node_ids:
            return node
    return None


def _checkpoint_states(storage: Path) -> list[dict]:
    """The checkpoints Ray Train registered for the stage (its snapshot file), in epoch order.

    A folder whose upload a kill interrupted is never registered, and is not counted.
    """
    snapshot = json.loads((storage / "warmup" / "checkpoint_manager_snapshot.json").read_text())
    folders = [
        storage / "warmup" / r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]
    ]
    states = [load_checkpoint(str(folder / "checkpoint.pt")) for folder in folders]
    return sorted(states, key=lambda state: state["epoch"])


def test_two_worker_training_learns_and_resumes_to_the_same_weights_after_losing_a_node(
    fresh_ray_cluster, tiny_data_factory, tmp_path: Path
) -> None:
    """A 2-worker DDP warm-up, one worker per node: uninterrupted it learns; with the node of one
    worker killed mid-epoch (a spare node waiting), the group restarts from the last checkpoint
    and ends with the uninterrupted run's weights."""
    cluster = fresh_ray_cluster.cluster
    # Three 1-CPU nodes with one Ray Train slot each (resources.train_custom): each worker gets a
    # node of its own, and the third waits as the spare an autoscaler would bring.
    slots = [cluster.add_node(num_cpus=1, resources={"train_slot": 1}) for _ in range(3)]
    cluster.wait_for_nodes()
    data = tiny_data_factory(n_train=64, n_val=0, size=64, seed=4)
    # Four epochs: the loss lands in the second, right after the first one's checkpoint, and the
    # losses of the last two can be compared with the first two's.
    epochs = 4

    def run(name: str, lose_node: bool, keep: int) -> tuple[dict, list[dict], list]:
        # 64 images of 64 px: an epoch lasts about a second, so the node goes inside one.
        # No colour or scale augmentation, a higher rate: the loss falls within 4 epochs.
        config = tiny_config(
            data,
            tmp_path / name,
            "resources.max_failures=1",
            f"resources.keep_checkpoints={keep}",
            "resources.num_workers=2",
            "resources.train_custom=train_slot=1",
            "data.crop_size=64",
            "optim.lr=0.05",
            "data.color_jitter=0",
            "data.scale_min=1.0",
            "data.scale_max=1.0",
        )
        manifest = layout.dataset_manifest(config.run_dir, "train")
        write_manifest(voc_records(str(data), "train"), manifest)
        storage = tmp_path / name / "train"
        spec = StageSpec("warmup", "warmup", manifest, "", "", epochs, str(storage))
        lost: list = []
        if lose_node:
            threading.Thread(
                target=_remove_a_train_node_after_first_checkpoint,
                args=(cluster, slots, storage, lost),
                daemon=True,
            ).start()
        result = train_stage(config, spec)
        return load_checkpoint(result["checkpoint"]), _checkpoint_states(storage), lost

    # The reference keeps the default 2 checkpoints: only the last two epochs' stay on disk.
    reference, reference_states, _ = run("reference", lose_node=False, keep=2)
    assert [s["epoch"] for s in reference_states] == [epochs - 1, epochs]
    folders = (tmp_path / "reference" / "train" / "warmup").glob("checkpoint_*")
    assert len([folder for folder in folders if folder.is_dir()]) == 2
    progress = read_progress(str(tmp_path / "reference" / "train" / "progress.json"))
    history = [row["total"] for row in progress["history"]]
    # It learns: every later epoch's mean loss is below the first's (which starts untrained).
    assert len(history) == epochs and max(history[1:]) < history[0], history
    # The run that loses a node keeps every checkpoint, so each epoch's shows (and shows once).
    final, states, lost = run("lost_node", lose_node=True, keep=epochs)

    assert lost, "no node running a Ray Train worker was found and removed"
    node_id, checkpoints_at_loss = lost
    assert node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert 1 <= checkpoints_at_loss < epochs  # lost during training, not after it
    # One checkpoint per epoch, each epoch once: the restarted workers resumed from the last
    # checkpoint (epoch 1) instead of training from scratch (which would report epoch 1 twice).
    assert [s["epoch"] for s in states] == list(range(1, epochs + 1))
    # The same learning rate at every epoch as the uninterrupted run (PolyLR restored exactly).
    assert [s["extra"]["lr"] for s in states[-2:]] == [s["extra"]["lr"] for s in reference_states]
    assert final["epoch"] == reference["epoch"] == epochs
    # Tolerance: CPU kernels with the same thread count are deterministic, every source of
    # randomness is reseeded per epoch and rank (data order, crops, Dropout2d), and an all-reduce
    # of two workers' gradients sums in one order: the replayed epochs are the same computation;
    # 1e-6 only allows for float32 rounding, not for a different run.
    for name, tensor in reference["model_state"].items():
        torch.testing.assert_close(
            final["model_state"][name], tensor, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def _registered_checkpoints(snapshot: Path) -> int:
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return 0


def _remove_a_train_node_after_first_checkpoint(
    cluster, workers, storage: Path, lost: list
) -> None:
    """Kill the node of a Ray Train worker as soon as epoch 1's checkpoint is registered (mid-epoch
    2); a spare node the test added lets the 2-worker group start again.

    The node is looked up beforehand, so the kill follows the registration within one poll (10 ms)
    while an epoch takes about a second. Registered = listed in Ray Train's snapshot file (a
    checkpoint folder alone may still be uploading and would be discarded by the restart).
    """
    snapshot = storage / "warmup" / "checkpoint_manager_snapshot.json"
    by_id = {worker.node_id: worker for worker in workers}
    deadline, node = time.monotonic() + 300, None
    while time.monotonic() < deadline:
        if node is None:
            node = _actor_node("RayTrainWorker", set(by_id))
        registered = _registered_checkpoints(snapshot)
        if node is not None and registered:
            cluster.remove_node(by_id[node], allow_graceful=False)  # SIGKILL of its raylet
            lost.extend([node, registered])
            return
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# A worker node removed from a 3-node cluster during a label update (last in this module: the
# fresh cluster replaces the local Ray above)


def test_the_node_running_label_work_removed_mid_update_loses_no_label(
    fresh_ray_cluster, tiny_data_factory, tmp_path
) -> None:
    """The worker node one of the 2 label actors runs on is killed once half the labels exist.
    Its finished rows are kept, its images are redone elsewhere, each image is labelled once,
    and `raysseg verify` finds the stage clean."""
    cluster, workers = fresh_ray_cluster.cluster, fresh_ray_cluster.workers
    n_images = 24
    data = tiny_data_factory(n_train=n_images, n_val=0, size=40, seed=6)
    # Two actors of 1 CPU: the head has 1, so at least one of them runs on a worker node.
    config = tiny_config(
        data, tmp_path / "run", "resources.refine_batch_size=1", "resources.refine_actors=2"
    )
    prepare_run_dir(config)
    manifest = layout.dataset_manifest(config.run_dir, "train")
    write_manifest(voc_records(str(data), "train"), manifest)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model(config.model))
    run_dir = Path(config.run_dir)
    by_id = {worker.node_id: worker for worker in workers}
    removed: list = []

    def remove_the_label_node() -> None:
        _wait_for(lambda: len(_seg_files(run_dir, 0)) >= n_images // 2, 300, "half the labels")
        node = _actor_node("MapWorker", set(by_id))  # Ray Data's label-inference actor
        assert node is not None, "no label actor on a worker node"
        labelled_before = len(_seg_files(run_dir, 0))
        cluster.remove_node(by_id[node], allow_graceful=False)  # SIGKILL of that node's raylet
        removed.extend([node, time.monotonic(), labelled_before])

    threading.Thread(target=remove_the_label_node, daemon=True).start()
    summary = update_stage_labels(
        config, 0, mode="initial", checkpoint=str(checkpoint), in_manifest=manifest
    )
    finished_at = time.monotonic()
    assert removed, "the node was not removed before the label update finished"
    node_id, removed_at, labelled_before = removed
    assert removed_at < finished_at and labelled_before < n_images  # removed mid-update
    assert summary["errors"] == 0 and summary["images"] == n_images
    assert len(_seg_files(run_dir, 0)) == n_images
    table = pq.read_table(layout.stage_manifest(config.run_dir, 0)).to_pylist()
    assert sorted(row["image_id"] for row in table) == sorted(_split_ids(data))  # each once
    # The removed node had done label work that the update kept: rows it wrote reached the
    # manifest before it died.
    assert any(row["node_id"] == node_id for row in table), {r["node_id"] for r in table}
    write_result(config.run_dir, label_step(0), summary)
    assert [str(problem) for problem in verify_run(config.run_dir)] == []
    # The cluster itself saw the node die (the GCS notices a killed raylet within seconds).
    _wait_for(
        lambda: node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]},
        120,
        "the GCS to mark the removed node dead",
        poll_s=1.0,
    )
