"""Quality on real pixels: weak supervision against full supervision, same network and schedule.

Runs (or resumes) three pipelines on the demo's data and settings (Fashion-MNIST products pasted onto
real photos, read by the VOC reader; ImageNet EfficientNet-Lite0; U^2-Net-P saliency):
  - weak: image labels only, with the demo's `labels.propagate_cams`;
  - weak, the other `labels.propagate_cams` (the label update's CAMs with / without A_CT);
  - full: the same network trained on the ground-truth masks for the same epochs.
It prints, and writes to OUT/quality.json:
  - pseudo-label precision / recall / mIoU per stage (goal: stage-1 labels >= stage-0 + 3 points),
  - val mIoU of the final models (single scale, and multi-scale + flip + CRF),
  - the ratio weak / full (goal: >= 0.85 with multi-scale + CRF).
`python bench/report.py OUT/quality.json` turns the JSON into BENCHMARKS.md's tables.

    python bench/quality.py --out runs/bench_quality          # the demo's sizes, ~30 min on 2 cores
    python bench/quality.py --out /tmp/q --quick              # tiny sizes (smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import run_facts

from raysseg.config import Config, parse_overrides, with_overrides
from raysseg.distributed.demo import demo_config, ensure_demo_data
from raysseg.distributed.pipeline import format_summary, run_pipeline
from raysseg.distributed.session import ray_session

STAGE1_GAIN_GOAL = 0.03
RATIO_GOAL = 0.85


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_quality")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)"
    )
    args = parser.parse_args()

    weak = demo_config(args.out, quick=args.quick, extra=parse_overrides(args.set))
    ensure_demo_data(weak, quick=args.quick)
    runs = planned_runs(weak, Path(args.out))
    results: dict[str, Any] = {
        "bench": "quality",
        "facts": run_facts(sys.argv),
        "settings": settings_of(weak),
    }
    with ray_session(num_cpus=args.num_cpus or max(4, os.cpu_count() or 1)):
        results["runs"] = {name: run_one(config, full) for name, (config, full) in runs.items()}
    results["goals"] = goals(results["runs"])
    for name, run in results["runs"].items():
        print(f"\n{name}:\n{format_summary(run['summary'])}")
    print("\n" + json.dumps(results["goals"], indent=2))
    path = Path(args.out, "quality.json")
    path.write_text(json.dumps(results, indent=2, default=float))
    print(f"written {path}")


def planned_runs(weak: Config, out: Path) -> dict[str, tuple[Config, bool]]:
    """name -> (config, full_supervision). The ablation flips the label update's CAM propagation."""
    flipped = not weak.labels.propagate_cams
    ablation = with_overrides(weak, {"labels.propagate_cams": flipped})
    ablation = dataclasses.replace(
        ablation, run_dir=str((out / f"run_propagate_{flipped}").resolve())
    )
    full = dataclasses.replace(weak, run_dir=str((out / "run_full_supervision").resolve()))
    return {
        "weak": (weak, False),
        f"weak_propagate_cams_{flipped}": (ablation, False),
        "full": (full, True),
    }


def run_one(config: Config, full_supervision: bool) -> dict[str, Any]:
    started = time.perf_counter()
    summary = run_pipeline(config, full_supervision=full_supervision, log=lambda line: None)
    return {
        "propagate_cams": config.labels.propagate_cams,
        "full_supervision": full_supervision,
        "seconds": time.perf_counter() - started,
        "summary": summary,
    }


def settings_of(config: Config) -> dict[str, Any]:
    """The settings a reader needs to place the figures (the rest is the demo's config)."""
    return {
        "backbone": config.model.backbone,
        "output_stride": config.model.output_stride,
        "crop_size": config.data.crop_size,
        "saliency": config.data.saliency,
        "batch_size": config.optim.batch_size,
        "warmup_epochs": config.optim.warmup_epochs,
        "epochs_per_stage": config.optim.epochs,
        "stages": config.stages.count,
        "warmup_lr": config.optim.warmup_lr,
        "lr": config.optim.lr,
        "head_lr_mult": config.optim.head_lr_mult,
        "propagate_cams": config.labels.propagate_cams,
    }


def goals(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's two goals for each weak run, against the full-supervision run."""
    full = runs["full"]["summary"]["final_miou_ms_crf"]
    verdicts = {}
    for name, run in runs.items():
        if run["full_supervision"]:
            continue
        labels = [row.get("label_miou") for row in run["summary"]["stages"]]
        gain = labels[1] - labels[0] if None not in labels[:2] else None
        final = run["summary"]["final_miou_ms_crf"]
        ratio = final / full if final and full else None
        verdicts[name] = {
            "stage1_minus_stage0_label_miou": gain,
            "stage1_gain_goal_met": gain is not None and gain >= STAGE1_GAIN_GOAL,
            "ratio_ms_crf": ratio,
            "ratio_goal_met": ratio is not None and ratio >= RATIO_GOAL,
        }
    return verdicts


if __name__ == "__main__":
    main()
