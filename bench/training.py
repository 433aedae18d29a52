"""Training: a Ray Train stage vs the same epoch function in plain torch, on the same data.

Both sides run `raysseg.engine.loop.train_one_epoch` in mode "train" on the small backbone, with the stage's
own loader (`raysseg.distributed.train._train_loader`) and optimiser; the plain side has no Ray at all.
Pseudo labels are the synthetic GT masks and saliency maps (the training cost does not depend on them).
Throughput = images/s of the last epoch as timed inside the epoch function (the steady state); the
end-to-end column adds Ray Train's start-up (worker processes, process group, checkpoints).
Each case is pinned to `workers` cores (unless --no-pin); each Ray worker has one torch thread (Ray sets
OMP_NUM_THREADS from its 1 CPU) and the plain loop as many threads as there are workers.

    python bench/training.py --quick        # tiny sizes, about a minute
    python bench/training.py                # 64 images of 96x96, 3 epochs, a few minutes on 2 cores
    python bench/training.py --workers 1 --no-pin --out runs/bench_training_no_pin
Each run writes its figures to OUT/training.json (OUT: --out, default runs/bench_training).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import _common
import torch

from raysseg.config import Config
from raysseg.data.manifest import read_manifest, write_manifest

SETTINGS = {
    "quick": {"images": 8, "size": 48, "width": 16, "batch": 4, "epochs": 1},
    "full": {"images": 64, "size": 96, "width": 64, "batch": 8, "epochs": 3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke)")
    parser.add_argument("--out", default="runs/bench_training")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin to `workers` cores (Ray's own daemons may then use the other cores)",
    )
    args = parser.parse_args()
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    if args.epochs:
        settings["epochs"] = args.epochs
    out = Path(args.out).resolve()
    config, manifest = _prepare(out, settings)
    cores = sorted(os.sched_getaffinity(0))
    cases: list[dict] = []
    for workers in args.workers:
        if workers > len(cores):
            print(f"skipping {workers} workers: only {len(cores)} cores usable", file=sys.stderr)
            continue
        pinned = set(cores) if args.no_pin else set(cores[:workers])
        plain = run_plain(config, manifest, settings["epochs"], pinned, workers)
        distributed = run_ray_train(config, manifest, settings["epochs"], out, workers, pinned)
        cases.append(_case(workers, len(pinned), plain, distributed))
    print(_common.machine_line())
    print(
        f"training, mode full: {settings['images']} images of {settings['size']}x{settings['size']}, "
        f"batch {settings['batch']}, {settings['epochs']} epoch(s), small backbone width "
        f"{settings['width']}"
    )
    _common.print_table(
        [
            "workers(cores)",
            "plain torch images/s",
            "ray train images/s",
            "ray / plain",
            "ray end-to-end images/s",
        ],
        [_row(case) for case in cases],
    )
    settings["pinned"] = not args.no_pin
    _common.write_results(out, "training", settings=settings, cases=cases)


def _prepare(out: Path, settings: dict) -> tuple[Config, str]:
    """Synthetic data; a manifest whose pseudo labels are the GT masks and the saliency maps."""
    data_root = out / f"data_{settings['images']}_{settings['size']}"
    _common.ensure_synthetic(data_root, settings["images"], settings["size"])
    config = _common.bench_config(
        data_root,
        out / "run",
        settings["width"],
        settings["size"],
        **{"optim.batch_size": settings["batch"], "optim.lr": 0.005},
    )
    plain = _common.write_train_manifest(data_root, out / "manifest_images")
    labelled = [
        dataclasses.replace(r, seg_label_uri=r.mask_uri, sal_label_uri=r.saliency_uri)
        for r in read_manifest(plain)
    ]
    manifest = str(out / "manifest_labelled")
    write_manifest(labelled, manifest)
    return config, manifest


def _spec(manifest: str, epochs: int, storage: Path):
    from raysseg.distributed.train import StageSpec

    return StageSpec(
        name="bench",
        mode="train",
        train_manifest=manifest,
        val_manifest="",
        init_checkpoint="",
        epochs=epochs,
        storage_path=str(storage),
    )


def run_plain(
    config: Config, manifest: str, epochs: int, cores: set[int], threads: int
) -> dict[str, float]:
    """The epoch function in one plain process: no Ray, no DDP."""
    from raysseg.distributed.train import _train_loader
    from raysseg.engine.loop import train_one_epoch
    from raysseg.engine.optim import PolyLR, build_optimizer
    from raysseg.model.network import build_model

    previous_cores, previous_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)  # as many threads as Ray gets CPUs: one per worker
    try:
        torch.manual_seed(config.optim.seed)
        model = build_model(config.model)
        optimizer = build_optimizer(model, config.optim)
        loader, sampler = _train_loader(config, _spec(manifest, epochs, Path("/tmp")), 0, 1)
        scheduler = PolyLR(
            optimizer, total_steps=epochs * len(loader), power=config.optim.poly_power
        )
        metrics, seconds = {}, 0.0
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            loader.dataset.set_epoch(epoch)
            metrics = train_one_epoch(
                model, optimizer, scheduler, loader, "cpu", loss_weights=config.loss, mode="train"
            )
            seconds += metrics["seconds"]
        return {"images_per_s": metrics["images_per_s"], "total_s": seconds}
    finally:
        os.sched_setaffinity(0, previous_cores)
        torch.set_num_threads(previous_threads)


def run_ray_train(
    config: Config, manifest: str, epochs: int, out: Path, workers: int, cores: set[int]
) -> dict[str, float]:
    """train_stage on a local Ray pinned to `cores`: `workers` DDP workers of one CPU each."""
    import ray

    from raysseg.distributed.session import local_init_kwargs
    from raysseg.distributed.train import train_stage

    resources = dataclasses.replace(config.resources, num_workers=workers, cpus_per_worker=1.0)
    config = dataclasses.replace(config, resources=resources)
    storage = out / f"ray_train_{workers}"
    shutil.rmtree(storage, ignore_errors=True)  # a leftover run would be resumed, not retrained
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)  # before ray.init: the raylet and its workers inherit it
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        # Logical CPUs above the workers' own: Train's controller must fit too (RAY_NOTES).
        # address="local": a new instance on the pinned cores even when another Ray runs here.
        ray.init(**local_init_kwargs(2 * workers + 1, include_dashboard=False), log_to_driver=False)
        result, seconds = _common.timed(
            lambda: train_stage(config, _spec(manifest, epochs, storage), max_failures=0)
        )
    finally:
        ray.shutdown()
        os.sched_setaffinity(0, previous)
    metrics = result["metrics"]
    images = metrics["images"] * epochs  # "images" is summed over workers, per epoch
    return {"images_per_s": metrics["images_per_s"], "end_to_end": images / seconds}


def _case(workers: int, cores: int, plain: dict, distributed: dict) -> dict:
    return {
        "workers": workers,
        "cores": cores,
        "plain_images_per_s": plain["images_per_s"],
        "ray_images_per_s": distributed["images_per_s"],
        "ray_end_to_end_images_per_s": distributed["end_to_end"],
    }


def _row(case: dict) -> list:
    return [
        f"{case['workers']}({case['cores']})",
        case["plain_images_per_s"],
        case["ray_images_per_s"],
        case["ray_images_per_s"] / case["plain_images_per_s"],
        case["ray_end_to_end_images_per_s"],
    ]


if __name__ == "__main__":
    main()
