"""The Ray shell on the local CPU Ray (conftest): the label update, evaluation, run-directory
checks. The data is conftest's tiny_data: 16 train and 4 val images of 48 px.

A 2-worker training stage (it learns; a killed worker resumes) is in test_faults.py; the pipeline
end to end (and resumed) in test_ray_sources.py, on its COCO dataset.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray_helpers import tiny_config

from raysseg import storage
from raysseg.data.manifest import read_manifest, write_manifest
from raysseg.data.sources import voc_records
from raysseg.data.synth import generate_synthetic
from raysseg.distributed.refine import update_labels, update_stage_labels
from raysseg.rundir import layout

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _train_manifest(config, data_root: Path) -> str:
    path = layout.dataset_manifest(config.run_dir, "train")
    write_manifest(voc_records(str(data_root), "train"), path)
    return path


def test_label_update_writes_one_label_per_image_then_nothing(local_ray, tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path / "run")
    manifest = _train_manifest(config, tiny_data)
    arguments = {
        "mode": "ground_truth",
        "checkpoint": "",
        "in_manifest": manifest,
        "labels_root": layout.stage_labels(config.run_dir, 0),
        "out_manifest": layout.stage_manifest(config.run_dir, 0),
        "errors_path": layout.stage_errors(config.run_dir, 0),
        "saliency_cache": layout.saliency_cache(config.run_dir),
    }
    first = update_labels(config, **arguments)
    assert first["images"] == 16 and first["written"] == 16 and first["errors"] == 0
    seg_files = list(Path(arguments["labels_root"], "seg").rglob("*.png"))
    assert len(seg_files) == 16
    rows = list(read_manifest(arguments["out_manifest"]))
    assert sorted(r.image_id for r in rows) == sorted(f"train_{i:06d}" for i in range(16))
    assert all(storage.exists(r.seg_label_uri) and storage.exists(r.sal_label_uri) for r in rows)

    second = update_labels(config, **arguments)
    assert second["written"] == 0 and second["skipped"] == 16
    assert len(list(Path(arguments["labels_root"], "seg").rglob("*.png"))) == 16


def test_evaluate_command_prints_a_per_class_table(local_ray, tiny_data, tmp_path, capsys):
    from raysseg.cli import main
    from raysseg.engine.checkpoint import save_checkpoint
    from raysseg.model.network import build_model

    # The command's own work (val manifest in, table out); the weights need no training for that.
    config = tiny_config(tiny_data, tmp_path / "run", "stages.count=1")
    val_manifest = layout.dataset_manifest(config.run_dir, "val")
    write_manifest(voc_records(str(tiny_data), "val"), val_manifest)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model(config.model))
    overrides = [f"{key}={value}" for key, value in _flat_overrides(config).items()]
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--single-scale", *overrides]) == 0
    out = capsys.readouterr().out
    assert "background" in out and "mIoU" in out


def _flat_overrides(config) -> dict:
    from raysseg.config import to_flat_dict

    return {k: v for k, v in to_flat_dict(config).items() if not isinstance(v, tuple)}


def test_rerun_with_a_different_config_is_refused(local_ray, tiny_data, tmp_path) -> None:
    from raysseg.config import ConfigError
    from raysseg.distributed.pipeline import prepare_run_dir

    prepare_run_dir(tiny_config(tiny_data, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"labels\.cam_threshold"):
        prepare_run_dir(tiny_config(tiny_data, tmp_path / "run", "labels.cam_threshold=0.3"))


def test_a_broken_image_is_recorded_not_fatal_within_the_budget(local_ray, tmp_path) -> None:
    import shutil

    from raysseg.engine.checkpoint import save_checkpoint
    from raysseg.model.network import build_model

    data = tmp_path / "synth"
    generate_synthetic(str(data), n_train=10, n_val=0, size=40, seed=5)
    (data / "JPEGImages" / "train_000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    run = tmp_path / "run"

    def update(config, stage: int, log=print):
        return update_labels(
            config,
            mode="initial",
            checkpoint=str(checkpoint),
            in_manifest=layout.dataset_manifest(config.run_dir, "train"),
            labels_root=layout.stage_labels(config.run_dir, stage),
            out_manifest=layout.stage_manifest(config.run_dir, stage),
            errors_path=layout.stage_errors(config.run_dir, stage),
            saliency_cache=layout.saliency_cache(config.run_dir),
            log=log,
        )

    generous = tiny_config(data, run, "resources.error_budget=0.2")
    write_manifest(voc_records(str(data), "train"), layout.dataset_manifest(str(run), "train"))
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model(generous.model))
    lines: list[str] = []
    summary = update(generous, 0, lines.append)
    assert summary["errors"] == 1 and summary["written"] == 9
    # The progress line counts the output rows as they reach the driver: all of them at the end.
    assert lines and "10/10 images (100.0%)" in lines[-1] and "1 errors" in lines[-1], lines
    errors = pq.read_table(layout.stage_errors(str(run), 0)).to_pylist()
    assert errors[0]["image_id"] == "train_000003"
    assert "train_000003.jpg" in errors[0]["error"]
    assert len(list(read_manifest(layout.stage_manifest(str(run), 0)))) == 9

    strict = tiny_config(data, run, "resources.error_budget=0.0")
    with pytest.raises(RuntimeError, match="over the error budget"):
        update(strict, 1)
    # What the failed run wrote is kept: the 9 good labels of stage 1 exist and a rerun skips them.
    assert len(list(Path(layout.stage_labels(str(run), 1), "seg").rglob("*.png"))) == 9
    shutil.copy(data / "JPEGImages" / "train_000004.jpg", data / "JPEGImages" / "train_000003.jpg")
    rerun = update(strict, 1)
    assert rerun["written"] == 1 and rerun["skipped"] == 9 and rerun["errors"] == 0


# The first update's actor pool holds every CPU. Manifest reads hold no CPU slot: a read task
# needing one waited forever behind actors that held every CPU, and the update hung at 0 images with
# no error (RAY_NOTES); here the timeout would fail it (two updates of 16 images take well under it).
@pytest.mark.timeout(300)
def test_crf_in_the_actors_or_in_tasks_writes_the_same_labels(local_ray, tiny_data, tmp_path):
    import torch

    from raysseg.distributed.refine import crf_in_actors
    from raysseg.engine.checkpoint import save_checkpoint
    from raysseg.model.network import build_model

    base = tiny_config(tiny_data, tmp_path / "base")
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model(base.model))
    manifest = _train_manifest(base, tiny_data)
    labels = {}
    # CRFs in the actors: a pool of 2 actors x 2 CPUs holds every CPU of the local Ray.
    every_cpu = ("resources.refine_actors=2", "resources.refine_cpus_per_actor=2")
    for placement, extra in (("actors", every_cpu), ("tasks", ())):
        config = tiny_config(
            tiny_data, tmp_path / placement, f"resources.crf_placement={placement}", *extra
        )
        if placement == "actors":
            held = config.resources.refine_actors * config.resources.refine_cpus_per_actor
            assert held == ray.cluster_resources()["CPU"]
        summary = update_stage_labels(
            config, 1, mode="refine", checkpoint=str(checkpoint), in_manifest=manifest
        )
        assert summary["written"] == 16 and summary["errors"] == 0
        # The workers' memory travels with the rows; a worker that imported torch holds > 50 MiB.
        assert summary["worker_peak_private_mb"] > 50, summary
        root = Path(layout.stage_labels(config.run_dir, 1))
        labels[placement] = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.png")}
    assert len(labels["actors"]) == 32  # a seg and a sal PNG per image
    assert labels["actors"] == labels["tasks"]

    # "auto": in the actors on CPU, in tasks beside GPU actors or when CRFs are pinned elsewhere.
    assert crf_in_actors(base.resources)
    gpu = tiny_config(tiny_data, tmp_path / "gpu", "resources.refine_gpus_per_actor=1")
    pinned = tiny_config(tiny_data, tmp_path / "pin", "resources.crf_custom=crf_node=0.01")
    assert not crf_in_actors(gpu.resources) and not crf_in_actors(pinned.resources)


@pytest.mark.parametrize(
    ("rows", "workers", "batch", "blocks", "largest"),
    [
        (96, 2, 4, 8, 12),  # small: ~4 blocks per worker
        (10, 2, 4, 3, 4),  # never below one batch
        (200, 1, 1, 4, 50),
        (3000, 1, 4, 47, 64),  # large: capped, so the progress line keeps moving
    ],
)
def test_manifest_blocks_are_small_enough_to_keep_every_worker_busy(
    local_ray, tmp_path, rows, workers, batch, blocks, largest
) -> None:
    from raysseg.data.records import Record
    from raysseg.distributed.datasets import read_manifest_dataset

    records = [Record(f"img_{i:05d}", f"/data/img_{i:05d}.jpg", (1,)) for i in range(rows)]
    manifest = str(tmp_path / "manifest")
    write_manifest(records, manifest)
    dataset, total = read_manifest_dataset(manifest, workers, rows_per_batch=batch)
    sizes = [b.num_rows for b in dataset.iter_batches(batch_size=None, batch_format="pyarrow")]
    assert total == rows == sum(sizes)
    assert len(sizes) == blocks and max(sizes) <= largest, sizes
