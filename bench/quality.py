"""Quality bar of issue B, measured side by side on the demo's synthetic data.

Runs (or resumes) the weakly supervised pipeline of `raysseg demo` and the same network trained on the
ground-truth masks for the same number of epochs (`--full-supervision`), then prints:
  - pseudo-label precision / recall / mIoU per stage (stage-1 labels should beat stage-0 labels),
  - val mIoU of both final models (single scale, and multi-scale + flip + CRF),
  - the ratio weak / full (goal: >= 0.8).

    python bench/quality.py --out runs/bench_quality          # full demo sizes (~25 min on 2 cores)
    python bench/quality.py --out /tmp/q --quick              # tiny sizes, seconds (CI smoke)
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
    result = {
        "label_miou_per_stage": labels,
        "stage1_labels_beat_stage0": labels[1] > labels[0] if None not in labels[:2] else None,
        "val_miou_single_scale": {"weak": weak_val, "full": full_val},
        "val_miou_ms_crf": {"weak": weak_final, "full": full_final},
        "ratio_single_scale": weak_val / full_val if weak_val and full_val else None,
        "ratio_ms_crf": weak_final / full_final if weak_final and full_final else None,
        "seconds": timings,
    }
    print("\n" + json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
