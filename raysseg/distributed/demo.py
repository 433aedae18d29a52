"""`raysseg demo`: real-pixel composites, a local Ray, the pipeline on EfficientNet-Lite0, a report.

The data are Fashion-MNIST products pasted onto real photos (`raysseg.data.composite`), the backbone
the ImageNet EfficientNet-Lite0 a package ships, and the saliency prior U^2-Net-P: nothing comes
from the ground-truth masks except the scores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raysseg import storage
from raysseg.config import Config, load_config
from raysseg.data.composite import generate_composites
from raysseg.distributed.pipeline import run_pipeline
from raysseg.distributed.session import ray_session

# Sizes chosen so the whole demo stays within about 11 minutes on 2 CPU cores (see README).
DEMO_SETTINGS = {
    "full": {
        "n_train": 240,
        "n_val": 60,
        "size": 128,
        "warmup_epochs": 6,
        # 5 epochs per stage, 2 stages: at 3 epochs the stage-1 model barely improves on the labels
        # it was trained on (+2.8 points against +4.5 at 5; BENCHMARKS.md, real pixels).
        "epochs": 5,
        "stages": 2,
    },
    "quick": {"n_train": 24, "n_val": 8, "size": 64, "warmup_epochs": 1, "epochs": 1, "stages": 2},
}


def demo_config(out_dir: str, quick: bool = False, extra: dict[str, Any] | None = None) -> Config:
    """The demo's config: EfficientNet-Lite0 (ImageNet), composite VOC-layout data, U^2-Net-P."""
    settings = DEMO_SETTINGS["quick" if quick else "full"]
    data_root = str(Path(out_dir, "data").resolve())
    overrides = {
        "run_dir": str(Path(out_dir, "run").resolve()),
        "model.backbone": "efficientnet_lite0",
        # Output stride 16: dilated depthwise convolutions are slow on CPU (OS 8 costs ~8x).
        "model.output_stride": 16,
        "model.num_classes": 6,
        "data.source": "voc",
        "data.root": data_root,
        "data.train_split": "train",
        "data.val_split": "val",
        "data.saliency": "u2netp",
        "data.crop_size": settings["size"],
        "data.num_workers": 0,
        "optim.batch_size": 8,
        # Pretrained backbone, heads from scratch: a low backbone lr and 30x on the heads. At 10x the
        # classifier barely moves in the warm-up's 180 steps; backbone lr 0.01 diverges.
        "optim.warmup_lr": 0.001,
        "optim.lr": 0.0005,
        "optim.head_lr_mult": 30.0,
        "optim.warmup_epochs": settings["warmup_epochs"],
        "optim.epochs": settings["epochs"],
        "stages.count": settings["stages"],
        "labels.cam_scales": [1.0, 0.75, 1.25],
        # The label update keeps the CAMs M instead of A_CT . M: after 16 CPU epochs A_CT is still
        # diffuse, and propagating through it leaves the labels flat (BENCHMARKS.md, real pixels).
        "labels.propagate_cams": False,
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
    """Write the demo's composite dataset under config.data.root unless it is already there."""
    if storage.exists(os.path.join(config.data.root, "class_names.txt")):
        return
    settings = DEMO_SETTINGS["quick" if quick else "full"]
    print(f"writing the real-pixel composite dataset to {config.data.root}")
    generate_composites(
        config.data.root,
        n_train=settings["n_train"],
        n_val=settings["n_val"],
        size=settings["size"],
        seed=0,
    )


def run_demo(
    out_dir: str = "runs/demo",
    quick: bool = False,
    num_cpus: int | None = None,
    verbose: bool = False,
) -> dict:
    config = demo_config(out_dir, quick)
    ensure_demo_data(config, quick)
    # Logical CPUs above the core count keep Ray Data reads from starving behind the actor pools.
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    with ray_session(num_cpus=cpus, verbose=verbose):
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
