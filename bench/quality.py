"""Quality on real pixels: weak supervision against full supervision, same network and schedule.

Runs (or resumes) the weakly supervised pipeline of `raysseg demo` (Fashion-MNIST products pasted onto
real photos, read by the VOC reader; ImageNet EfficientNet-Lite0; U^2-Net-P saliency) and the same
network trained on the ground-truth masks for the same epochs (`--full-supervision`), then prints:
  - pseudo-label precision / recall / mIoU per stage (goal: stage-1 labels >= stage-0 + 3 points),
  - val mIoU of both final models (single scale, and multi-scale + flip + CRF),
  - the ratio weak / full (goal: >= 0.85 with multi-scale + CRF).

    python bench/quality.py --out runs/bench_quality          # the demo's sizes
    python bench/quality.py --out /tmp/q --quick              # tiny sizes (smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from raysseg.distributed.demo import demo_config, ensure_demo_data
from raysseg.distributed.pipeline import format_summary, run_pipeline
from raysseg.distributed.session import ray_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_quality")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args()

    weak = demo_config(args.out, quick=args.quick)
    full = dataclasses.replace(weak, run_dir=str(Path(args.out, "run_full_supervision").resolve()))
    ensure_demo_data(weak, quick=args.quick)
    timings = {}
    with ray_session(num_cpus=args.num_cpus or max(4, os.cpu_count() or 1)):
        started = time.perf_counter()
        weak_summary = run_pipeline(weak, log=lambda line: None)
        timings["weak_s"] = time.perf_counter() - started
        started = time.perf_counter()
        full_summary = run_pipeline(full, full_supervision=True, log=lambda line: None)
        timings["full_s"] = time.perf_counter() - started

    print("weakly supervised (image labels only):")
    print(format_summary(weak_summary))
    print("\nfully supervised (GT masks), same epochs:")
    print(format_summary(full_summary))
    weak_val = weak_summary["stages"][weak.stages.count - 1].get("val_miou")
    full_val = full_summary["stages"][full.stages.count - 1].get("val_miou")
    weak_final, full_final = weak_summary["final_miou_ms_crf"], full_summary["final_miou_ms_crf"]
    labels = [row.get("label_miou") for row in weak_summary["stages"]]
    gain = labels[1] - labels[0] if None not in labels[:2] else None
    result = {
        "label_miou_per_stage": labels,
        "stage1_minus_stage0_label_miou": gain,
        "stage1_gain_goal_met (>= 0.03)": gain >= 0.03 if gain is not None else None,
        "val_miou_single_scale": {"weak": weak_val, "full": full_val},
        "val_miou_ms_crf": {"weak": weak_final, "full": full_final},
        "ratio_single_scale": weak_val / full_val if weak_val and full_val else None,
        "ratio_ms_crf": weak_final / full_final if weak_final and full_final else None,
        "ratio_goal_met (>= 0.85)": weak_final / full_final >= 0.85
        if weak_final and full_final
        else None,
        "seconds": timings,
    }
    print("\n" + json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
