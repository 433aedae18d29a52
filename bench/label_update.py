"""Label update: the Ray Data pipeline vs a plain serial loop doing the same work per image.

Both sides run mode "refine" with the same small-backbone checkpoint on the same synthetic images: decode,
model forward at full resolution (CAMs, saliency, A_CT propagation), saliency CRF + fusion, two PNG writes.
The serial loop is the reference implementation's way (one image after the other, CRF on the same thread).
Each case is pinned to `workers` cores with sched_setaffinity (Ray's processes inherit it), so "1 worker"
really means one core even on a bigger machine. Every run writes to a fresh labels folder (nothing skipped).
Ray side, for each `--placements` value (resources.crf_placement: the CRF inside the inference actors, or
in separate CPU tasks), in one Ray session: an untimed first update (worker start-up, imports), then warm
updates of a quarter of the images and of all of them; their difference gives the steady-state images/s
and the fixed cost per update (actor start, reads, repartition, manifest writes), which COCO-sized
updates amortise.

    python bench/label_update.py --quick                 # tiny sizes, seconds
    python bench/label_update.py                         # full: 96 images of 256x256, ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import _common
import torch

from raysseg import layout
from raysseg.config import Config
from raysseg.data import io
from raysseg.data.records import read_manifest, write_manifest
from raysseg.data.transforms import normalize
from raysseg.engine.checkpoint import load_checkpoint, restore_model
from raysseg.labels.saliency import build_saliency
from raysseg.labels.update import finalize_labels, infer_label_maps

NOT_RAY = ("serial", "independent")  # result keys that are not a crf_placement case
SETTINGS = {
    "quick": {"images": 8, "size": 48, "width": 16},
    "full": {"images": 96, "size": 256, "width": 64},
}


def main() -> None:
    args = _parse_args()
    settings = {**SETTINGS["quick" if args.quick else "full"], **_explicit(args)}
    out = Path(args.out).resolve()
    data_root = out / f"data_{settings['images']}_{settings['size']}"
    _common.ensure_synthetic(data_root, settings["images"], settings["size"])
    config = _common.bench_config(
        data_root, out / "run", settings["width"], settings["size"], **_resources(args.batch_size)
    )
    manifest = _common.write_train_manifest(data_root, out / "manifest")
    checkpoint = _common.write_checkpoint(config, out / "checkpoint.pt")
    cores = sorted(os.sched_getaffinity(0))
    placements = args.placements or (["auto"] if args.quick else ["actors", "tasks"])
    rows, results = [], {}
    for workers in args.workers:
        if workers > len(cores):
            print(f"skipping {workers} workers: only {len(cores)} cores usable", file=sys.stderr)
            continue
        pinned = set(cores[:workers])
        serial = run_serial(config, checkpoint, manifest, out / f"labels_serial_{workers}", pinned)
        results[workers] = {"serial": serial}
        if workers > 1:
            # The ceiling on these cores: independent serial processes, one per core, no Ray.
            results[workers]["independent"] = run_independent(
                config, checkpoint, manifest, out, sorted(pinned)
            )
        for placement in placements:
            distributed = run_ray(
                _placed(config, placement), checkpoint, manifest, out, workers, pinned, args
            )
            results[workers][placement] = distributed
            rows.append(_row(str(workers), placement, serial, distributed))
    free = {}
    if args.free_daemons and not args.quick and len(cores) > 1:
        # One worker on the whole machine: one torch thread on each side, as above, but Ray's own
        # processes (raylet, GCS, driver loop, Ray Data's actors) may run on the other cores.
        serial = run_serial(config, checkpoint, manifest, out / "labels_serial_free", set(cores), 1)
        distributed = run_ray(
            _placed(config, "actors"), checkpoint, manifest, out, 1, set(cores), args
        )
        free = {"serial": serial, "actors": distributed}
        rows.append(_row(f"1 (of {len(cores)})", "actors", serial, distributed))
    _report(settings, rows, results, free, out)


def _placed(config: Config, placement: str) -> Config:
    resources = dataclasses.replace(config.resources, crf_placement=placement)
    return dataclasses.replace(config, resources=resources)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke)")
    parser.add_argument("--out", default="runs/bench_label_update")
    parser.add_argument("--images", type=int, default=None, help="number of images")
    parser.add_argument("--size", type=int, default=None, help="square image side in pixels")
    parser.add_argument("--width", type=int, default=None, help="small backbone width")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=4, help="resources.refine_batch_size")
    parser.add_argument(
        "--no-free-daemons",
        dest="free_daemons",
        action="store_false",
        help="skip the case of 1 worker with Ray's own processes free to use the other cores",
    )
    parser.add_argument(
        "--placements",
        nargs="+",
        choices=["auto", "actors", "tasks"],
        default=None,
        help="resources.crf_placement cases (default: actors and tasks; quick: auto)",
    )
    parser.add_argument(
        "--cpus-per-core",
        type=int,
        default=2,
        help="Ray logical CPUs per pinned core: actors and CRF tasks must both fit (RAY_NOTES)",
    )
    return parser.parse_args()


def _explicit(args: argparse.Namespace) -> dict[str, int]:
    given = {"images": args.images, "size": args.size, "width": args.width}
    return {key: value for key, value in given.items() if value is not None}


def _resources(batch_size: int) -> dict[str, Any]:
    return {"resources.refine_batch_size": batch_size, "resources.refine_cpus_per_actor": 1}


def run_serial(
    config: Config,
    checkpoint: str,
    manifest: str,
    labels_root: Path,
    cores: set[int],
    threads: int | None = None,
) -> dict[str, float]:
    """The reference's way: one process, one image at a time; torch uses the pinned cores (or
    `threads` threads)."""
    shutil.rmtree(labels_root, ignore_errors=True)
    previous_cores, previous_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads or len(cores))
    try:
        return _serial_loop(config, checkpoint, manifest, str(labels_root))
    finally:
        os.sched_setaffinity(0, previous_cores)
        torch.set_num_threads(previous_threads)


def run_independent(
    config: Config, checkpoint: str, manifest: str, out: Path, cores: list[int]
) -> dict[str, float]:
    """One serial loop per core (1 torch thread each, every n-th image), all at once, no Ray:
    what these cores can do for this work when nothing is shared but the machine."""
    import multiprocessing

    records = list(read_manifest(manifest))
    parts = []
    for index, _ in enumerate(cores):
        parts.append(str(out / f"manifest_part_{index}_of_{len(cores)}"))
        write_manifest(records[index :: len(cores)], parts[-1])
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(cores)) as pool:
        arguments = [
            (config, checkpoint, part, out / f"labels_independent_{index}", {core})
            for index, (part, core) in enumerate(zip(parts, cores, strict=True))
        ]
        results = pool.starmap(run_serial, arguments)
    # Each loop's own time (model load included, process start-up not), as for the serial case.
    seconds = max(result["seconds"] for result in results)
    images = sum(result["images"] for result in results)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def _serial_loop(config: Config, checkpoint: str, manifest: str, labels_root: str) -> dict:
    started = _now()
    model = restore_model(load_checkpoint(checkpoint))
    saliency = build_saliency(config.data)
    infer_s = finalize_s = 0.0
    count = 0
    for record in read_manifest(manifest):
        step = _now()
        image = io.read_image(record.image_uri)
        maps = infer_label_maps(model, normalize(image), record.labels)
        middle = _now()
        prior = saliency(image, record.image_id)
        seg, sal = finalize_labels(
            image, maps["cams"], maps["sal_prob"], prior, record.labels, config.labels
        )
        io.write_png_atomic(
            layout.label_uri(labels_root, "sal", record.image_id), io.saliency_to_uint8(sal)
        )
        io.write_png_atomic(
            layout.label_uri(labels_root, "seg", record.image_id), seg, palette=io.voc_palette()
        )
        infer_s += middle - step
        finalize_s += _now() - middle
        count += 1
    seconds = _now() - started
    return {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "infer_s_per_image": infer_s / count,
        "finalize_s_per_image": finalize_s / count,
    }


def run_ray(
    config: Config,
    checkpoint: str,
    manifest: str,
    out: Path,
    workers: int,
    cores: set[int],
    args: argparse.Namespace,
) -> dict[str, float]:
    """update_labels on a local Ray pinned to `cores`: `workers` inference actors (+ CRF tasks)."""
    import ray
    import ray.data

    from raysseg.distributed.refine import update_labels

    resources = dataclasses.replace(config.resources, refine_actors=workers)
    config = dataclasses.replace(config, resources=resources)
    run = out / f"ray_{workers}_of_{len(cores)}_{config.resources.crf_placement}"
    shutil.rmtree(run, ignore_errors=True)
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)  # set before ray.init: the raylet and its workers inherit it
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        ray.init(
            num_cpus=args.cpus_per_core * workers, include_dashboard=False, log_to_driver=False
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        subsets = _subset_manifests(manifest, out, workers * config.resources.refine_batch_size)

        def update(source: str, name: str) -> tuple[dict, float]:
            return _common.timed(
                lambda: _update(update_labels, config, checkpoint, source, run / name)
            )

        # First update in a fresh Ray pays worker start-up and imports (once per pipeline): untimed.
        update(subsets["tiny"], "cold")
        small, small_s = update(subsets["quarter"], "warm_quarter")
        summary, seconds = update(manifest, "warm_all")
    finally:
        ray.shutdown()
        os.sched_setaffinity(0, previous)
    if summary["written"] != summary["images"]:
        raise RuntimeError(f"Ray label update wrote {summary['written']} of {summary['images']}")
    # Two warm updates of different sizes separate the fixed cost per update from the per-image cost.
    extra_images = summary["images"] - small["images"]
    steady = (
        extra_images / (seconds - small_s) if seconds > small_s and extra_images else float("nan")
    )
    return {
        "images": summary["images"],
        "seconds": seconds,
        "images_per_s": summary["images"] / seconds,
        "steady_images_per_s": steady,
        "fixed_s": seconds - summary["images"] / steady,
    }


def _subset_manifests(manifest: str, out: Path, tiny: int) -> dict[str, str]:
    """First `tiny` images (warm-up) and the first quarter (the small timed update)."""
    records = list(read_manifest(manifest))
    sizes = {"tiny": max(1, min(tiny, len(records))), "quarter": max(1, len(records) // 4)}
    paths = {}
    for name, size in sizes.items():
        paths[name] = str(out / f"manifest_{name}")
        write_manifest(records[:size], paths[name])
    return paths


def _update(update_labels, config: Config, checkpoint: str, manifest: str, run: Path) -> dict:
    return update_labels(
        config,
        mode="refine",
        checkpoint=checkpoint,
        in_manifest=manifest,
        labels_root=str(run / "labels"),
        out_manifest=str(run / "manifest"),
        errors_path=str(run / "errors"),
        saliency_cache=str(run / "saliency_cache"),
    )


def _row(workers: str, placement: str, serial: dict, distributed: dict) -> list[Any]:
    return [
        workers,
        placement,
        serial["images_per_s"],
        distributed["images_per_s"],
        distributed["images_per_s"] / serial["images_per_s"],
        distributed["steady_images_per_s"],
        distributed["fixed_s"],
    ]


def _report(settings: dict, rows: list, results: dict, free: dict, out: Path) -> None:
    print(_common.machine_line())
    print(
        f"label update, mode refine: {settings['images']} images of {settings['size']}x"
        f"{settings['size']}, small backbone width {settings['width']}"
    )
    _common.print_table(
        [
            "workers(cores)",
            "crf_placement",
            "serial images/s",
            "ray images/s",
            "ray / serial (same cores)",
            "ray steady images/s",
            "ray fixed s/update",
        ],
        rows,
    )
    if 1 in results:
        base = results[1]["serial"]["images_per_s"]
        for workers, cases in sorted(results.items()):
            for placement, result in cases.items():
                if placement in NOT_RAY:
                    continue
                ratio = result["images_per_s"] / base
                steady = result["steady_images_per_s"] / base
                print(
                    f"ray with {workers} worker(s), crf_placement {placement} / serial loop on 1 "
                    f"core: {ratio:.3f}x end to end, {steady:.3f}x steady state"
                )
        for workers, cases in sorted(results.items()):
            if "independent" in cases:
                ceiling = cases["independent"]["images_per_s"]
                print(
                    f"{workers} independent serial processes, one per core (no Ray): "
                    f"{ceiling:.3f} images/s = {ceiling / base:.3f}x the serial loop on 1 core"
                )
        serial = results[1]["serial"]
        print(
            f"serial per-image cost on 1 core: inference {serial['infer_s_per_image']:.4f} s, "
            f"CRF + fusion + PNG writes {serial['finalize_s_per_image']:.4f} s"
        )
    if free:
        ratio = free["actors"]["images_per_s"] / free["serial"]["images_per_s"]
        steady = free["actors"]["steady_images_per_s"] / free["serial"]["images_per_s"]
        print(
            "ray with 1 worker, Ray's processes free to use the other cores / serial loop with 1 "
            f"thread: {ratio:.3f}x end to end, {steady:.3f}x steady state"
        )
    record = {
        "settings": settings,
        "results": {str(k): v for k, v in results.items()},
        "one_worker_free_daemons": free,
    }
    (out / "label_update.json").write_text(json.dumps(record, indent=2))
    print(f"per-image costs written to {out / 'label_update.json'}")


def _now() -> float:
    import time

    return time.perf_counter()


if __name__ == "__main__":
    main()
