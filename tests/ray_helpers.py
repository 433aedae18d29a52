"""Helpers shared by the Ray tests (plain functions; fixtures live in the test modules)."""

from __future__ import annotations

from pathlib import Path

from raysseg.config import Config, load_config


def tiny_config(data_root: Path, run_dir: Path, *extra: str) -> Config:
    """A config that runs the whole pipeline on a tiny synthetic dataset in seconds."""
    return load_config(
        overrides=[
            f"run_dir={run_dir}",
            "model.backbone=small",
            "model.num_classes=6",
            "model.small_width=16",
            "data.source=voc",
            f"data.root={data_root}",
            "data.train_split=train",
            "data.val_split=val",
            "data.saliency=folder",
            f"data.saliency_dir={data_root / 'saliency'}",
            "data.crop_size=48",
            "data.num_workers=0",
            "optim.batch_size=4",
            "optim.lr=0.01",
            "optim.warmup_epochs=1",
            "optim.epochs=1",
            "stages.count=2",
            "labels.cam_scales=[1.0]",
            "labels.cam_flip=false",
            "eval.scales=[1.0]",
            "eval.crf_iterations=2",
            "resources.num_workers=1",
            "resources.cpus_per_worker=1",
            "resources.refine_actors=1",
            "resources.refine_batch_size=4",
            *extra,
        ]
    )


# The steps of a one-stage pipeline run, in order.
ONE_STAGE_STEPS = (
    "manifest",
    "warmup",
    "stage_0/labels",
    "stage_0/train",
    "stage_0/refine",
    "final",
)


def assert_steps_done(run_dir: Path, steps: tuple[str, ...] = ONE_STAGE_STEPS) -> None:
    """Every step wrote its `.DONE` marker (a step writes it last)."""
    for step in steps:
        assert (run_dir / f"{step}.DONE").is_file(), step
