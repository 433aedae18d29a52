"""COCO projection: core-hours of a label update over COCO train2014 from measured per-image costs.

Reads the figures `bench/label_update.py` wrote (label_update.json), or takes them as arguments, and
projects one label update (mode refine) and the label updates of a 4-stage pipeline over COCO train2014
(82,783 images), plus the cluster sizes that bring one label update under an hour.

Assumptions (printed with the figures):
  - cost per image scales with the pixel count from the measured size to COCO's ~640x480. That holds for
    the convolutions, decoding, CRF and PNG writes; the N x N affinity part grows with the square of the
    pixel count, so the projection is a lower bound where A_CT dominates;
  - the small CPU backbone that was measured, not ResNet-38 (much heavier; on GPU in practice);
  - Ray's cost per image is core-seconds at its largest measured worker count (steady-state throughput:
    the fixed seconds per update vanish over 82,783 images), so the
    parallel efficiency measured there is included; scaling out is assumed to keep it.
GPU-hours: not measured (no GPU on the machine these figures come from).

    python bench/coco_projection.py --from-json runs/bench_label_update/label_update.json \
        --out runs/bench_coco_projection             # the table also in OUT/coco_projection.json
    python bench/coco_projection.py --quick          # built-in example costs, clearly labelled
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import _common

COCO_TRAIN2014_IMAGES = 82_783
COCO_PIXELS = 640 * 480
STAGES = 4
# Used only by --quick without --from-json: a smoke test of the arithmetic, not a measurement.
EXAMPLE = {"size": 256, "serial_s": 0.3, "ray_s_per_core": 0.35}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="example costs unless --from-json")
    parser.add_argument("--from-json", default=None, help="label_update.json of the label bench")
    parser.add_argument("--size", type=int, default=None, help="measured square image side")
    parser.add_argument("--serial-s", type=float, default=None, help="serial s/image, 1 core")
    parser.add_argument("--ray-s-per-core", type=float, default=None, help="Ray core-s/image")
    parser.add_argument(
        "--out", default=None, help="also write the table to OUT/coco_projection.json"
    )
    args = parser.parse_args()
    costs, source = _costs(args)
    label_update = costs.pop("label_update", None)  # the run the costs come from, if measured
    scale = COCO_PIXELS / costs["size"] ** 2
    print(_common.machine_line())
    print(f"source: {source}; measured at {costs['size']}x{costs['size']}, x{scale:.2f} by pixels")
    projections = [
        _projection("serial loop (1 core)", costs["serial_s"] * scale),
        _projection("Ray label update", costs["ray_s_per_core"] * scale),
    ]
    _common.print_table(
        [
            "way",
            "core-s/image @640x480",
            "core-h / update",
            f"core-h / {STAGES} updates",
            "GPU-h",
            "cores for < 1 h",
            "16-core nodes",
        ],
        [_row(projection) for projection in projections],
    )
    print(
        "assumptions: pixel-count scaling (A_CT grows faster: lower bound), small CPU backbone, "
        "the measured per-core Ray cost kept when scaling out; GPU-hours not measured"
    )
    if args.out:
        _common.write_results(
            args.out,
            "coco_projection",
            source=source,
            label_update=label_update,
            costs=costs,
            pixel_scale=scale,
            stages=STAGES,
            projections=projections,
        )


def _costs(args: argparse.Namespace) -> tuple[dict, str]:
    path = args.from_json
    if (
        path is None
        and not args.quick
        and Path("runs/bench_label_update/label_update.json").exists()
    ):
        path = "runs/bench_label_update/label_update.json"
    if path is not None:
        costs, source = _from_bench(Path(path)), f"measured ({path})"
    elif args.quick:
        costs, source = dict(EXAMPLE), "EXAMPLE costs (not measured; --quick smoke test)"
    else:
        costs, source = {}, "arguments"
    given = {
        "size": args.size,
        "serial_s": args.serial_s,
        "ray_s_per_core": args.ray_s_per_core,
    }
    costs.update({k: v for k, v in given.items() if v is not None})
    missing = [k for k in EXAMPLE if k not in costs]
    if missing:
        raise SystemExit(f"missing costs {missing}: run bench/label_update.py or pass them")
    return costs, source


def _steady_rate(case: dict) -> float:
    steady = case.get("steady_images_per_s", float("nan"))
    return steady if math.isfinite(steady) and steady > 0 else case["images_per_s"]


def _from_bench(path: Path) -> dict:
    """Per-image costs from the label bench: serial on 1 core; Ray at its largest worker count."""
    record = json.loads(path.read_text())
    results = {int(k): v for k, v in record["results"].items()}
    serial = results[min(results)]["serial"]
    top = max(results)
    # Steady state: the fixed cost per update (seconds) vanishes over 82,783 images. The fastest
    # crf_placement measured at the largest worker count (the one a user would pick).
    ray_rate = max(
        _steady_rate(case)
        for name, case in results[top].items()
        if name not in ("serial", "independent")
    )
    return {
        "size": record["settings"]["size"],
        "serial_s": serial["seconds"] / serial["images"],
        "ray_s_per_core": top / ray_rate,
        "label_update": _run_of(record),
    }


def _run_of(record: dict) -> dict:
    """Which label-update run the costs come from, for the projection's first column."""
    settings = record["settings"]
    commit = record.get("facts", {}).get("commit", "unknown")
    return {"images": settings["images"], "rounds": settings.get("rounds"), "commit": commit}


def _projection(approach: str, core_s: float) -> dict:
    core_h = core_s * COCO_TRAIN2014_IMAGES / 3600.0
    cores = math.ceil(core_h)  # core-hours spread over 1 hour of wall time
    return {
        "approach": approach,
        "core_s_per_image": core_s,
        "core_h_per_update": core_h,
        "core_h_all_updates": core_h * STAGES,
        "gpu_h": None,  # not measured: no GPU on the machine the costs come from
        "cores_for_one_hour": cores,
        "nodes_of_16": math.ceil(cores / 16),
    }


def _row(projection: dict) -> list:
    keys = ("approach", "core_s_per_image", "core_h_per_update", "core_h_all_updates")
    tail = [projection["cores_for_one_hour"], projection["nodes_of_16"]]
    return [*(projection[key] for key in keys), "not measured", *tail]


if __name__ == "__main__":
    main()
