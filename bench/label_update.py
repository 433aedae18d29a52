"""Label update: the Ray Data pipeline vs a plain serial loop doing the same work per image.

Both sides run mode "refine" with the same small-backbone checkpoint on the same synthetic images: decode,
model forward at full resolution (CAMs, saliency, A_CT propagation), saliency CRF + fusion, two PNG writes.
The serial loop is the reference implementation's way (one image after the other, CRF on the same thread).
Each case is pinned to `workers` cores with sched_setaffinity (Ray's processes inherit it), so "1 worker"
really means one core even on a bigger machine. Every run writes to a fresh labels folder (nothing skipped).
Ray side, for each `--placements` value (resources.crf_placement: the CRF inside the inference actors, or
in separate CPU tasks), in one Ray session: an untimed first update (worker start-up, imports), then warm
updates of a quarter of the images and of all of them; their difference gives the steady-state images/s
and the fixed cost per update (actor start, manifest read and writes), which COCO-sized
updates amortise. The serial loop's steady rate is timed the same way, over the images past its
first quarter (its model load and saliency set-up left out).
Every case runs once per round (`--rounds`) right after its own serial baseline (odd rounds: right
before it, cases in reverse order): the speed of this shared machine drifts by 10-20 % over minutes,
so each ratio compares runs a minute apart. The figures printed are medians over the rounds, with
each round's ratio listed.
One file of about 500 lines: both sides of the ratio, and the way they are timed, must be read
side by side to trust it.

    python bench/label_update.py --quick                 # tiny sizes, one round, seconds
    python bench/label_update.py                         # full: 96 images of 256x256, 3 rounds
Every run writes its figures to OUT/label_update.json (OUT: --out, default runs/bench_label_update).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import _common
import torch

from raysseg.config import Config
from raysseg.data import io
from raysseg.data.manifest import read_manifest, write_manifest
from raysseg.data.transforms import normalize
from raysseg.engine.checkpoint import load_checkpoint, restore_model
from raysseg.labels.saliency import build_saliency
from raysseg.labels.update import finalize_labels, infer_label_maps
from raysseg.rundir import layout

NOT_RAY = ("serial", "independent")  # result keys that are not a crf_placement case
# Ray's rate / the serial loop's on 1 core, by worker count: the label update's speed goals.
GOALS = {"1": 0.95, "2": 1.8}
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
    cases = _cases(args, config, checkpoint, manifest, out)
    rounds = []
    for index in range(args.rounds or (1 if args.quick else 3)):
        rounds.append(_run_round(cases, reverse=index % 2 == 1))
    settings["rounds"] = len(rounds)
    _report(settings, rounds, out)


Case = tuple[str, str, Callable[[], dict], Callable[[], dict]]


def _run_round(cases: list[Case], reverse: bool) -> dict[str, dict[str, dict]]:
    """Every case next to its own serial baseline, run just before it (or just after: `reverse`
    also reverses the order of the cases), so that the machine's speed, which drifts by 10-20 %
    over minutes here, is the same on both sides of a ratio."""
    measured: dict[str, dict[str, dict]] = {}
    for group, name, baseline, run in cases[::-1] if reverse else cases:
        if reverse:
            result, serial = run(), baseline()
        else:
            serial, result = baseline(), run()
        measured.setdefault(group, {})[name] = {"serial": serial, "case": result}
    return measured


def _cases(
    args: argparse.Namespace, config: Config, checkpoint: str, manifest: str, out: Path
) -> list[Case]:
    """(group, case, its serial baseline, run); group "1", "2", ... or "free"."""
    cores = sorted(os.sched_getaffinity(0))
    placements = args.placements or (["auto"] if args.quick else ["actors", "tasks"])
    # The goals' baseline: the serial loop on 1 core (faster here than with more threads).
    one_core = partial(run_serial, config, checkpoint, manifest, out / "labels_serial", {cores[0]})
    cases = []
    for workers in args.workers:
        if workers > len(cores):
            print(f"skipping {workers} workers: only {len(cores)} cores usable", file=sys.stderr)
            continue
        pinned = set(cores[:workers])
        if workers > 1:
            # The ceiling on these cores: independent serial processes, one per core, no Ray.
            run = partial(run_independent, config, checkpoint, manifest, out, sorted(pinned))
            cases.append((str(workers), "independent", one_core, run))
        for placement in placements:
            placed = _placed(config, placement)
            run = partial(run_ray, placed, checkpoint, manifest, out, workers, pinned, args)
            cases.append((str(workers), placement, one_core, run))
    if args.free_daemons and not args.quick and len(cores) > 1:
        # One worker on the whole machine: one torch thread on each side, as above, but Ray's own
        # processes (raylet, GCS, driver loop, Ray Data's actors) may run on the other cores.
        whole = set(cores)
        labels = out / "labels_serial_free"
        baseline = partial(run_serial, config, checkpoint, manifest, labels, whole, 1)
        placed = _placed(config, "actors")
        run = partial(run_ray, placed, checkpoint, manifest, out, 1, whole, args)
        cases.append(("free", "actors", baseline, run))
    return cases


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
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="repeats of every case, interleaved; figures are medians (default 3; quick: 1)",
    )
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
    records = list(read_manifest(manifest))
    # Timed like the Ray side: the images past the first quarter give the steady rate, without
    # the model load and saliency set-up that come once per update.
    quarter, quarter_s = max(1, len(records) // 4), float("nan")
    for record in records:
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
        if count == quarter:
            quarter_s = _now() - started
    seconds = _now() - started
    steady = (count - quarter) / (seconds - quarter_s) if count > quarter else float("nan")
    return {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "steady_images_per_s": steady,
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
        # address="local": a Ray of this bench's own, on the pinned cores, even when another
        # Ray runs on this machine.
        ray.init(
            address="local",
            num_cpus=args.cpus_per_core * workers,
            include_dashboard=False,
            log_to_driver=False,
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


def _report(settings: dict, rounds: list[dict], out: Path) -> None:
    medians = _median_results(rounds)
    ratios = _ratios(rounds)
    print(_common.machine_line())
    print(
        f"label update, mode refine: {settings['images']} images of {settings['size']}x"
        f"{settings['size']}, small backbone width {settings['width']}; medians of "
        f"{len(rounds)} round(s), every case next to its own serial baseline"
    )
    cases = _case_medians(medians, rounds)
    rows = [
        [
            _group_label(case["group"]),
            case["crf_placement"],
            case["serial_images_per_s"],
            case["images_per_s"],
            case["steady_images_per_s"],
            case["fixed_s"],
        ]
        for case in cases
    ]
    _common.print_table(
        [
            "workers(cores)",
            "crf_placement",
            "serial images/s",
            "ray images/s",
            "ray steady images/s",
            "ray fixed s/update",
        ],
        rows,
    )
    _print_ratios(medians, ratios, rounds)
    _common.write_results(
        out,
        "label_update",
        settings={**settings, "cores": len(os.sched_getaffinity(0))},
        results={group: cases for group, cases in medians.items() if group != "free"},
        one_worker_free_daemons=medians.get("free", {}),
        cases=cases,
        ratios=ratios,
        goals=GOALS,
        rounds=rounds,
    )


def _case_medians(medians: dict, rounds: list[dict]) -> list[dict[str, Any]]:
    """One entry per Ray case: its medians, and the median of its own serial baselines."""
    cases = []
    for group, results in medians.items():
        for name, result in results.items():
            if name in NOT_RAY:
                continue
            serial = _common.finite_median(
                [r[group][name]["serial"]["images_per_s"] for r in rounds]
            )
            case = {"group": group, "crf_placement": name, "serial_images_per_s": serial}
            cases.append({**case, **result})
    return cases


def _print_ratios(medians: dict, ratios: dict, rounds: list[dict]) -> None:
    for group, cases in ratios.items():
        for name, ratio in cases.items():
            if name == "independent":
                rate = medians[group][name]["images_per_s"]
                print(
                    f"{group} independent serial processes, one per core (no Ray): {rate:.3f} "
                    f"images/s = {_median_line(ratio['end_to_end'])} the serial loop on 1 core"
                )
                continue
            if group == "free":
                who = (
                    "ray with 1 worker, Ray's processes free to use the other cores / serial loop "
                    "with 1 thread"
                )
            else:
                who = f"ray with {group} worker(s), crf_placement {name} / serial loop on 1 core"
            print(
                f"{who}: {_median_line(ratio['end_to_end'])} end to end, "
                f"{_median_line(ratio['steady'])} steady state"
            )
    serials = [
        c["serial"] for r in rounds for g, cs in r.items() if g != "free" for c in cs.values()
    ]
    if serials:
        rates = sorted(s["images_per_s"] for s in serials)
        median = _medians(serials)
        print(
            f"serial loop on 1 core: {len(rates)} runs, {rates[0]:.3f} to {rates[-1]:.3f} images/s; "
            f"per image: inference {median['infer_s_per_image']:.4f} s, CRF + fusion + PNG writes "
            f"{median['finalize_s_per_image']:.4f} s"
        )


def _median_line(ratios: list[float]) -> str:
    """'1.890x (rounds 1.967 / 1.890 / 1.867)': the median ratio, then each round's."""
    median = f"{_common.finite_median(ratios):.3f}x"
    if len(ratios) == 1:
        return median
    return f"{median} (rounds {' / '.join(f'{v:.3f}' for v in ratios)})"


def _group_label(group: str) -> str:
    return f"1 (of {len(os.sched_getaffinity(0))})" if group == "free" else group


def _median_results(rounds: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Each figure of each case over the rounds, as medians; "serial": every baseline of the group."""
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for group, cases in rounds[0].items():
        baselines = [r[group][name]["serial"] for r in rounds for name in cases]
        medians[group] = {"serial": _medians(baselines)}
        for name in cases:
            medians[group][name] = _medians([r[group][name]["case"] for r in rounds])
    return medians


def _medians(results: list[dict[str, float]]) -> dict[str, float]:
    return {key: _common.finite_median([result[key] for result in results]) for key in results[0]}


def _ratios(rounds: list[dict]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Each case against its own serial baseline of the same round, end to end and steady state."""
    ratios: dict[str, dict[str, dict[str, list[float]]]] = {}
    for measured in rounds:
        for group, cases in measured.items():
            for name, pair in cases.items():
                serial, result = pair["serial"], pair["case"]
                entry = ratios.setdefault(group, {}).setdefault(
                    name, {"end_to_end": [], "steady": []}
                )
                entry["end_to_end"].append(result["images_per_s"] / serial["images_per_s"])
                # Steady state on both sides: each rate leaves out its own once-per-update cost.
                if "steady_images_per_s" in result:
                    entry["steady"].append(
                        result["steady_images_per_s"] / serial["steady_images_per_s"]
                    )
    return ratios


def _now() -> float:
    import time

    return time.perf_counter()


if __name__ == "__main__":
    main()
