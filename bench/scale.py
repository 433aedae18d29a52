"""Scale: one full label update over N tiny images, with driver and worker memory as N grows.

For each N: generate N images of 32x32 (sharded folders, streamed into a Parquet manifest), then run
the real label update (mode "refine": decode, model forward with A_CT, spectral-residual saliency
prior cached per image, saliency CRF, fusion, two PNG writes) with a freshly initialised tiny network.
Printed per N: images/s, the driver's peak RSS during the update (sampled) and over its whole life,
the workers' peak RSS (reported by the inference actors and CRF tasks), and the fullest shard folder.
Each N runs in its own driver process, so one N's memory never shows in another's figures.
The figures of every N are written to OUT/scale.json (OUT: --out).

`--resume-at F` interrupts the update (SIGINT, like Ctrl-C) once a fraction F of the images is done,
then reruns the same update and reports how many labels the rerun wrote and how many it skipped.

    python bench/scale.py --quick                       # N = 500 and 5,000
    python bench/scale.py --n 1000 10000 100000         # the documented run (~1 h on 2 cores)
    python bench/scale.py --n 100000 --resume-at 0.5    # interrupt at half, rerun
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common
import numpy as np

from raysseg import storage
from raysseg.data.manifest import write_manifest
from raysseg.data.records import Record
from raysseg.rundir import layout

IMAGE_SIZE = 32
NUM_CLASSES = 3


def main() -> None:
    args = _parse_args()
    if args.child:
        _child(args)
        return
    counts = args.n or ([500, 5000] if args.quick else [1000, 10000, 100000])
    out = Path(args.out).resolve()
    print(_common.machine_line())
    results = [_measure(out, n, args.resume_at) for n in counts]
    headers = ["N", "images/s", "driver peak MiB (update)", "driver peak MiB (life)"]
    headers += ["worker peak MiB", "fullest shard folder", "seconds"]
    rows = [
        [
            r["n"],
            r["images_per_s"],
            r["driver_update_peak_mib"],
            r["driver_life_peak_mib"],
            r["worker_peak_mib"],
            r["fullest_shard_folder"],
            r["seconds"],
        ]
        for r in results
    ]
    _common.print_table(headers, rows)
    for r in results:
        if "resume" in r:
            resume = r["resume"]
            print(
                f"resume at N={r['n']:,}: interrupted after {resume['done_before_interrupt']:,} "
                f"images; the rerun wrote {resume['written']:,} new labels and skipped "
                f"{resume['skipped']:,}"
            )
    _common.write_results(out, "scale", results=results)


def _measure(out: Path, n: int, resume_at: float) -> dict[str, Any]:
    folder = out / f"n{n}"
    interrupted_at = 0
    if resume_at:
        storage.delete_dir(str(folder / "run"))
        interrupted_at = _interrupted_run(folder, n, resume_at)
    result = _run_child(folder, n, fresh=not resume_at)
    if resume_at:
        result["resume"] = {
            "done_before_interrupt": interrupted_at,
            "written": result["written"],
            "skipped": result["skipped"],
        }
    return result


def _child_command(folder: Path, n: int, fresh: bool) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--n", str(n)]
    command += ["--out", str(folder)]
    return command + (["--fresh"] if fresh else [])


def _run_child(folder: Path, n: int, fresh: bool) -> dict[str, Any]:
    completed = subprocess.run(_child_command(folder, n, fresh), capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"scale run N={n} failed:\n{completed.stderr[-4000:]}")
    return json.loads((folder / "result.json").read_text())


PROGRESS = re.compile(r"([\d,]+)/([\d,]+) images")


def _interrupted_run(folder: Path, n: int, fraction: float) -> int:
    """Start the update, SIGINT it once `fraction` of the images is done; return images done."""
    process = subprocess.Popen(
        [*_child_command(folder, n, fresh=True), "--progress-seconds", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    done = 0
    for line in process.stdout:
        match = PROGRESS.search(line)
        if match:
            done = int(match.group(1).replace(",", ""))
            if done >= fraction * n:
                process.send_signal(signal.SIGINT)
                break
    process.wait(timeout=300)
    return done


# ----------------------------------------------------------------------------------------------
# The measured driver (one process per N)


def _child(args: argparse.Namespace) -> None:
    import ray

    from raysseg.config import load_config
    from raysseg.distributed.refine import update_labels

    n, folder = args.n[0], Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = str(folder / "manifest")
    if not storage.exists(manifest):
        write_manifest(_generate(folder / "images", n), manifest)
    run = folder / "run"
    if args.fresh:
        storage.delete_dir(str(run))
    config = load_config(
        overrides={
            "run_dir": str(run),
            "model.backbone": "small",
            "model.small_width": 8,
            "model.num_classes": NUM_CLASSES,
            "data.saliency": "spectral",
            "labels.cam_scales": [1.0],
            "labels.cam_flip": False,
            "resources.refine_actors": 1,
            "resources.refine_batch_size": 16,
            "resources.refine_cpus_per_actor": 1,
            "resources.crf_cpus": 1,
            "resources.progress_seconds": args.progress_seconds,
        }
    )
    checkpoint = _common.write_checkpoint(config, folder / "checkpoint.pt")
    # address="local": a new instance even when another Ray runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    sampler = _RssSampler()
    started = time.perf_counter()
    summary = update_labels(
        config,
        mode="refine",
        checkpoint=checkpoint,
        in_manifest=manifest,
        labels_root=str(run / "labels"),
        out_manifest=str(run / "labels_manifest"),
        errors_path=str(run / "errors"),
        saliency_cache=str(run / "saliency"),
        name=f"scale N={n:,}",
        log=lambda line: print(line, flush=True),
    )
    seconds = time.perf_counter() - started
    result = {
        "n": n,
        "images_per_s": n / seconds,
        "seconds": seconds,
        "written": summary["written"],
        "skipped": summary["skipped"],
        "errors": summary["errors"],
        "driver_update_peak_mib": sampler.stop(),
        "driver_life_peak_mib": _peak_rss_mib(),
        "worker_peak_mib": summary["worker_peak_private_mb"],
        "fullest_shard_folder": _fullest_shard_folder(run / "labels" / "seg"),
    }
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    ray.shutdown()


def _generate(images: Path, n: int) -> Iterator[Record]:
    """N small random images with 1-2 classes each, written once (reruns reuse them)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(n):
        image_id = f"img_{index:08d}"
        uri = layout.sharded_uri(str(images), image_id)
        if not os.path.exists(uri):
            os.makedirs(os.path.dirname(uri), exist_ok=True)
            pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(uri)
        labels = tuple(sorted({1 + index % (NUM_CLASSES - 1), 1 + (index // 7) % 2}))
        yield Record(image_id=image_id, image_uri=uri, labels=labels)


def _fullest_shard_folder(root: Path) -> int:
    return max((len(os.listdir(shard)) for shard in root.iterdir()), default=0)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_bytes() -> int:
    """Resident memory now, from /proc (Linux; the machines this bench documents)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler:
    """Samples this process's resident memory every 50 ms; `stop()` returns the peak in MiB."""

    def __init__(self) -> None:
        self._peak = _current_rss_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, _current_rss_bytes())
            time.sleep(0.05)

    def stop(self) -> float:
        self._running = False
        self._thread.join()
        return self._peak / 2**20


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 500 and 5,000")
    parser.add_argument("--n", type=int, nargs="+", help="image counts (default 1k, 10k, 100k)")
    parser.add_argument("--out", default="runs/bench_scale")
    parser.add_argument("--resume-at", type=float, default=0.0, help="interrupt at this fraction")
    parser.add_argument("--progress-seconds", type=float, default=10.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
