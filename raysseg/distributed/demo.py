"""`raysseg demo`: synthetic data, a local Ray, the full pipeline on the small backbone, a report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raysseg.config import Config, load_config
from raysseg.data import io
from raysseg.data.synth import generate_synthetic
from raysseg.distributed.pipeline import run_pipeline
from raysseg.distributed.session import ray_session

# Sizes chosen so the whole demo stays well under 15 minutes on 2 CPU cores (see README).
DEMO_SETTINGS = {
    "full": {
        "n_train": 600,
        "n_val": 120,
        "size": 96,
        "warmup_epochs": 8,
        "epochs": 5,
        "stages": 3,
    },
    "quick": {"n_train": 48, "n_val": 12, "size": 64, "warmup_epochs": 1, "epochs": 1, "stages": 2},
}


def demo_config(out_dir: str, quick: bool = False, extra: dict[str, Any] | None = None) -> Config:
    """The demo's config: small backbone, synthetic VOC-layout data with its simulated saliency."""
    settings = DEMO_SETTINGS["quick" if quick else "full"]
    data_root = str(Path(out_dir, "data").resolve())
    overrides = {
        "run_dir": str(Path(out_dir, "run").resolve()),
        "model.backbone": "small",
        "model.num_classes": 6,
        "model.small_width": 32 if quick else 64,
        "data.source": "voc",
        "data.root": data_root,
        "data.train_split": "train",
        "data.val_split": "val",
        "data.saliency": "folder",
        "data.saliency_dir": str(Path(data_root, "saliency")),
        "data.crop_size": settings["size"],
        "data.num_workers": 0,
        "optim.batch_size": 8,
        # From-scratch small backbone: the classifier warm-up takes a high lr; the full network with
        # its unscaled affinity logits diverges above ~0.01 (NaN at 0.02), so stages use 0.005.
        "optim.warmup_lr": 0.02,
        "optim.lr": 0.005,
        "optim.warmup_epochs": settings["warmup_epochs"],
        "optim.epochs": settings["epochs"],
        "stages.count": settings["stages"],
        "labels.cam_scales": [1.0, 0.75, 1.25],
        "eval.scales": [0.75, 1.0, 1.25],
        "resources.num_workers": 1,
        "resources.cpus_per_worker": 1,
        # Two CPU actors, each running inference and the CRF (crf_placement auto): both cores
        # label images; Ray is started with at least 4 logical CPUs, so reads and writes still run.
        "resources.refine_actors": 2,
        "resources.refine_batch_size": 16,
        "resources.refine_cpus_per_actor": 1,
        "resources.crf_cpus": 1,
        **(extra or {}),
    }
    return load_config(overrides=overrides)


def ensure_demo_data(config: Config, quick: bool) -> None:
    """Generate the demo's synthetic dataset under config.data.root unless it is already there."""
    if io.exists(os.path.join(config.data.root, "class_names.txt")):
        return
    settings = DEMO_SETTINGS["quick" if quick else "full"]
    print(f"generating the synthetic dataset in {config.data.root}")
    generate_synthetic(
        config.data.root,
        n_train=settings["n_train"],
        n_val=settings["n_val"],
        size=settings["size"],
        seed=0,
    )


def run_demo(out_dir: str = "runs/demo", quick: bool = False, num_cpus: int | None = None) -> dict:
    config = demo_config(out_dir, quick)
    ensure_demo_data(config, quick)
    # Logical CPUs above the core count keep Ray Data reads from starving behind the actor pools.
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    with ray_session(num_cpus=cpus):
        summary = run_pipeline(config)
    report = write_report(config, Path(out_dir, "report"), summary)
    print(f"report written to {report}")
    return summary


def write_report(config: Config, folder: Path, summary: dict[str, Any]) -> Path:
    """metrics.json, a plot of mIoU per stage and a grid of GT / stage-0 / final labels / predictions."""
    from raysseg.report import plot_stages, write_label_grid

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    plot_stages(summary, folder / "miou_per_stage.png")
    write_label_grid(config, folder / "labels_grid.png", rows=6)
    return folder.resolve()
