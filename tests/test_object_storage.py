"""The dataset and the run directory on S3: an S3-compatible server (moto) started by the test on
127.0.0.1.

The pipeline here is a folder-source run (images in a folder, image labels from a CSV, masks for
half the images), every input read from the bucket, so it also serves as the folder source's
end-to-end test.

Credentials, region and endpoint reach pyarrow, Ray Data and Ray Train only through the
environment (AWS_* variables set before `ray.init`, so every Ray worker inherits them), as on a
cluster whose runtime_env or instance role provides them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray
from moto_s3 import DUMMY_SECRET, moto_bucket
from ray_helpers import tiny_config

from raysseg import storage
from raysseg.data import io
from raysseg.data.manifest import read_manifest, write_manifest
from raysseg.data.records import Record
from raysseg.data.synth import generate_synthetic
from raysseg.distributed.pipeline import run_pipeline
from raysseg.distributed.refine import update_labels
from raysseg.distributed.session import local_init_kwargs
from raysseg.distributed.train import StageSpec, train_stage
from raysseg.engine.checkpoint import load_checkpoint, save_checkpoint
from raysseg.model.network import build_model
from raysseg.rundir import layout

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

BUCKET = "raysseg-test"
SECRET = DUMMY_SECRET  # must never be written into the bucket


@pytest.fixture(scope="module")
def s3_bucket():
    """s3://raysseg-test on a moto server; AWS_* environment set for this module, then restored."""
    with moto_bucket(BUCKET) as uri:
        yield uri


@pytest.fixture(scope="module")
def ray_with_s3(s3_bucket, own_ray_temp_dir):
    # A Ray of its own, not conftest's local_ray: it must start after the AWS_* variables are set,
    # since Ray workers inherit the environment the driver had when Ray started.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(**local_init_kwargs(4, include_dashboard=False), _temp_dir=str(own_ray_temp_dir))
    yield s3_bucket
    ray.shutdown()


def _objects(bucket_uri: str, prefix: str) -> list[str]:
    filesystem, path = storage.resolve(storage.join(bucket_uri, prefix))
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)


def test_io_round_trips_on_s3(s3_bucket, tmp_path) -> None:
    root = storage.join(s3_bucket, "io")
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    io.write_png_atomic(storage.join(root, "a", "label.png"), label, palette=io.voc_palette())
    assert storage.exists(storage.join(root, "a", "label.png"))
    assert not storage.exists(storage.join(root, "a", "other.png"))
    np.testing.assert_array_equal(io.read_label(storage.join(root, "a", "label.png")), label)

    local = tmp_path / "local.png"
    io.write_png_atomic(str(local), label)
    storage.copy_file(str(local), storage.join(root, "b", "copied.png"))  # local -> S3
    # S3 -> S3
    storage.copy_file(storage.join(root, "b", "copied.png"), storage.join(root, "c", "again.png"))
    np.testing.assert_array_equal(io.read_label(storage.join(root, "c", "again.png")), label)
    # S3 -> local
    storage.copy_file(storage.join(root, "c", "again.png"), str(tmp_path / "back.png"))
    assert (tmp_path / "back.png").read_bytes() == local.read_bytes()

    # Replaces a/label.png by copied.png.
    storage.replace_dir(storage.join(root, "b"), storage.join(root, "a"))
    assert storage.list_files(storage.join(root, "a")) == [storage.join(root, "a", "copied.png")]
    assert not storage.exists(storage.join(root, "b", "copied.png"))

    records = [Record(f"img_{i}", f"s3://elsewhere/img_{i}.jpg", (i % 3 + 1,)) for i in range(5)]
    manifest = storage.join(root, "manifest")
    assert write_manifest(records, manifest, rows_per_file=2) == 5
    assert len(storage.list_files(manifest, suffix=".parquet")) == 3
    assert list(read_manifest(manifest)) == records
    assert write_manifest(records[:1], manifest) == 1  # stale parts of the old manifest removed
    assert list(read_manifest(manifest)) == records[:1]

    checkpoint = storage.join(root, "weights", "checkpoint.pt")
    config = tiny_config(Path("unused"), Path("unused"))
    save_checkpoint(checkpoint, build_model(config.model), epoch=3)
    assert load_checkpoint(checkpoint)["epoch"] == 3
    assert not [key for key in _objects(s3_bucket, "io") if ".tmp" in key]


def _upload_folder(local: Path, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.copy_file(str(path), storage.join(uri, path.relative_to(local).as_posix()))


@pytest.fixture(scope="module")
def pipeline_on_s3(ray_with_s3, tmp_path_factory):
    """The whole pipeline (one stage) of a folder source with its dataset AND its run directory on
    S3; shared by the tests below: (config, summary, log lines, the dataset's URI)."""
    # Its own dataset (not tiny_data): half its masks are deleted before the upload, so only
    # those images are scored.
    data = tmp_path_factory.mktemp("synth")
    generate_synthetic(str(data), n_train=8, n_val=0, size=40, seed=2)
    masks = data / "SegmentationClass"
    for path in sorted(masks.glob("*.png"))[::2]:
        path.unlink()
    data_uri = storage.join(ray_with_s3, "data")
    _upload_folder(data, data_uri)
    run_dir = storage.join(ray_with_s3, "run")
    # No validation split in a folder source: the final step has no figure to compute, and the
    # module stays within a few minutes on 2 cores.
    config = tiny_config(
        Path("unused"),
        Path("unused"),
        f"data.root={storage.join(data_uri, 'JPEGImages')}",
        f"run_dir={run_dir}",
        "stages.count=1",
        "data.source=folder",
        f"data.labels_file={storage.join(data_uri, 'image_labels.csv')}",
        f"data.class_names={storage.join(data_uri, 'class_names.txt')}",
        f"data.mask_dir={storage.join(data_uri, 'SegmentationClass')}",
        "data.saliency=auto",
        f"data.saliency_dir={storage.join(data_uri, 'saliency')}",
    )
    lines: list[str] = []
    summary = run_pipeline(config, log=lines.append)
    return config, summary, lines, data_uri


def test_pipeline_keeps_every_artifact_on_s3_and_resumes(pipeline_on_s3, s3_bucket) -> None:
    config, summary, _, _ = pipeline_on_s3
    run_dir = config.run_dir
    steps = ["manifest", "warmup", "stage_0/labels", "stage_0/train", "stage_0/refine", "final"]
    for step in steps:
        assert storage.exists(storage.join(run_dir, f"{step}.DONE")), step
    assert storage.exists(storage.join(run_dir, "config.yaml")) and storage.exists(
        storage.join(run_dir, "metrics.json")
    )
    for stage in ("warmup", "stage_0"):
        final = load_checkpoint(storage.join(run_dir, stage, "checkpoint", "checkpoint.pt"))
        assert final["epoch"] == 1
    assert len(list(read_manifest(layout.stage_manifest(run_dir, 1)))) == 8
    label_keys = ["label_miou", "label_precision", "label_recall", "label_scored_images", "stage"]
    assert [sorted(row) for row in summary["stages"]] == [label_keys, label_keys]

    # A rerun finds every step done on S3.
    lines: list[str] = []
    run_pipeline(config, log=lines.append)
    assert sum("done earlier, skipped" in line for line in lines) == len(steps), lines

    # Credentials come from the environment and are never persisted with the run.
    for key in _objects(s3_bucket, "run"):
        assert SECRET.encode() not in storage.read_bytes(f"s3://{key}"), key


def test_training_stage_resumes_from_its_checkpoint_on_s3(pipeline_on_s3, s3_bucket) -> None:
    config, _, _, _ = pipeline_on_s3
    run_dir = config.run_dir
    train_storage = storage.join(run_dir, "warmup", "train")
    before = [k for k in _objects(s3_bucket, "run/warmup/train") if k.endswith("checkpoint.pt")]
    assert len(before) == 1
    first_bytes = storage.read_bytes(f"s3://{before[0]}")
    spec = StageSpec(
        name="warmup",
        mode="warmup",
        train_manifest=layout.dataset_manifest(run_dir, "train"),
        val_manifest="",
        init_checkpoint="",
        epochs=2,
        storage_path=train_storage,
    )
    # One more epoch than the pipeline's warm-up: training continues from the stored checkpoint,
    # one new epoch and checkpoint, the first left as it was (a restart would train two epochs).
    resumed = train_stage(config, spec)
    assert resumed["checkpoint"].startswith(f"{train_storage}/")
    assert load_checkpoint(resumed["checkpoint"])["epoch"] == 2
    after = [k for k in _objects(s3_bucket, "run/warmup/train") if k.endswith("checkpoint.pt")]
    assert len(after) == 2, after
    assert storage.read_bytes(f"s3://{before[0]}") == first_bytes


def test_label_update_on_s3_skips_done_images_and_redoes_lost_ones(pipeline_on_s3, s3_bucket):
    config, _, _, _ = pipeline_on_s3
    run_dir = config.run_dir
    arguments = {
        "mode": "initial",
        "checkpoint": storage.join(run_dir, "warmup", "checkpoint", "checkpoint.pt"),
        "in_manifest": layout.dataset_manifest(run_dir, "train"),
        "labels_root": layout.stage_labels(run_dir, 0),
        "out_manifest": layout.stage_manifest(run_dir, 0),
        "errors_path": layout.stage_errors(run_dir, 0),
        "saliency_cache": layout.saliency_cache(run_dir),
    }
    # Three labels lost (as after an interrupted update): a rerun computes only those and skips
    # the five it finds on S3.
    rows = list(read_manifest(arguments["out_manifest"]))
    for row in rows[:3]:
        storage.delete_file(row.seg_label_uri)
    resumed = update_labels(config, **arguments)
    assert (resumed["written"], resumed["skipped"], resumed["errors"]) == (3, 5, 0), resumed
    rows = list(read_manifest(arguments["out_manifest"]))
    assert len(rows) == 8
    for row in rows:
        assert row.seg_label_uri.startswith(f"{s3_bucket}/run/stage_0/labels/seg/")
        assert io.read_label(row.seg_label_uri).shape == (40, 40)
    labels = _objects(s3_bucket, "run/stage_0/labels")
    assert len(labels) == 16 and not [key for key in labels if ".tmp" in key]


def test_folder_source_runs_end_to_end_and_scores_the_images_with_masks(pipeline_on_s3) -> None:
    config, summary, lines, data_uri = pipeline_on_s3
    run_dir = config.run_dir
    saliency = storage.join(data_uri, "saliency")
    assert f"saliency prior: folder {saliency}" in lines
    assert summary["saliency_prior"] == f"folder {saliency}"
    train = list(read_manifest(layout.dataset_manifest(run_dir, "train")))
    assert len(train) == 8 and sum(bool(r.mask_uri) for r in train) == 4
    # Every input came from the bucket: images, masks and saliency maps by their s3:// URIs.
    for record in train:
        assert record.image_uri.startswith(f"{data_uri}/JPEGImages/")
        assert record.saliency_uri == "" or record.saliency_uri.startswith(f"{saliency}/")
        assert record.mask_uri == "" or record.mask_uri.startswith(f"{data_uri}/SegmentationClass/")
    for stage in (0, 1):
        for record in train:
            assert storage.exists(
                layout.label_uri(layout.stage_labels(run_dir, stage), "seg", record.image_id)
            )
    for row in summary["stages"]:
        assert row["label_scored_images"] == 4 and 0.0 <= row["label_miou"] <= 1.0
    assert any("label_scored_images=4" in line for line in lines), lines
    # No validation split in a folder source: the final figure is absent, not an error.
    final = json.loads(storage.read_bytes(storage.join(run_dir, "final.DONE")))
    assert final["note"] == "no validation ground truth"


def test_a_tuning_campaign_on_s3_keeps_its_study_in_an_rdb_and_resumes(ray_with_s3, tmp_path):
    """`raysseg tune` with its campaign folder on S3 and the Optuna study in SQLite: the one
    warm-up trained by the driver first and shared, every file of the campaign on S3; the same
    command again finds the trial done and starts none. One trial: running two at once is
    test_ray_tune's (a local campaign); here what changes is where everything is kept."""
    from raysseg.distributed.tune import run_campaign
    from raysseg.tuning.results import read_results
    from raysseg.tuning.space import parse_space
    from raysseg.tuning.study import open_study

    data = tmp_path / "synth"
    generate_synthetic(str(data), n_train=6, n_val=2, size=40, seed=4)
    campaign = storage.join(ray_with_s3, "campaign")
    base = tiny_config(
        data,
        Path("unused"),
        f"run_dir={campaign}",
        "resources.cpus_per_worker=0.3",
        "resources.refine_cpus_per_actor=0.3",
        "resources.crf_cpus=0.25",
    )
    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = parse_space(
        {"labels.cam_threshold": "uniform(0.1, 0.3)"},
        {
            "storage": url,
            "objectives": ["label_miou"],
            "trial_cpus": 0.1,
            "trial_overrides": {"stages.count": 1},
        },
        base,
    )
    lines: list[str] = []
    outputs = run_campaign(base, space, trials=1, log=lines.append)

    rows = read_results(campaign)
    assert [(row["trial"], row["status"]) for row in rows] == [("trial_0000", "completed")]
    assert storage.list_dirs(storage.join(campaign, "trials")) == ["trial_0000"]
    [shared] = storage.list_dirs(storage.join(campaign, "shared"))
    for row in rows:
        run = storage.join(campaign, "trials", row["trial"])
        marker = json.loads(storage.read_bytes(layout.step_marker(run, "warmup")))
        assert marker["shared"] == storage.join(campaign, "shared", shared)
        assert storage.exists(storage.join(run, "stage_0", "refine.DONE"))
    assert outputs["best_yaml"] == storage.join(campaign, "best.yaml")
    assert b"run_dir: s3://" in storage.read_bytes(outputs["best_yaml"])
    assert all(storage.exists(plot) and plot.startswith("s3://") for plot in outputs["plots"])
    study = open_study(campaign, url)
    assert [(t.state.name, t.user_attrs["run_name"]) for t in study.trials] == [
        ("COMPLETE", "trial_0000")
    ]

    again: list[str] = []
    run_campaign(base, space, trials=1, log=again.append)
    assert any("1 trial(s) finished earlier, 0 to run" in line for line in again), again
    assert len(open_study(campaign, url).trials) == 1
