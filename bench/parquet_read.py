"""Reading a manifest through Ray Data: raysseg's reader (Ray Data's V1 Parquet reader) vs Ray 2.60's default.

Ray 2.60 reads Parquet through its DataSourceV2 path by default, which lists files on a pool of
footer-reading actors (32 unless RAY_DATA_PARQUET_FOOTER_NUM_ACTORS says otherwise) started for every
read. `raysseg.distributed.storage.read_parquet` uses the V1 reader instead. Both sides read the same
one-file manifest (as a label update does: read, then iterate every row) in one Ray session, alternating,
after an untimed read of each; the median of `--repeats` reads is printed, and every read's time is
written to OUT/parquet_read.json.

    python bench/parquet_read.py --quick       # 64 rows, 3 reads each, on ray.init(num_cpus=2)
    python bench/parquet_read.py               # 10,000 rows, 7 reads each
    python bench/parquet_read.py --pin 1 --out runs/bench_parquet_read_pin1   # pinned to one core
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import _common

from raysseg.data.manifest import write_manifest
from raysseg.data.records import Record

SETTINGS = {"quick": {"rows": 64, "repeats": 3}, "full": {"rows": 10_000, "repeats": 7}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke)")
    parser.add_argument("--out", default="runs/bench_parquet_read")
    parser.add_argument("--pin", type=int, default=0, help="pin to this many cores (0: all)")
    args = parser.parse_args()
    settings = SETTINGS["quick" if args.quick else "full"]
    if args.pin:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.pin]))
    manifest = Path(args.out).resolve() / f"manifest_{settings['rows']}"
    write_manifest(_records(settings["rows"]), str(manifest))
    seconds = measure(str(manifest), settings["repeats"])
    print(_common.machine_line())
    print(f"one-file manifest of {settings['rows']:,} rows, read + every row iterated")
    rows = [[name, statistics.median(times), min(times), max(times)] for name, times in seconds]
    _common.print_table(["reader", "median s", "min s", "max s"], rows)
    ratio = statistics.median(seconds[1][1]) / statistics.median(seconds[0][1])
    print(f"Ray 2.60 default / raysseg read_parquet: {ratio:.1f}x the time per read")
    settings = {**settings, "pin": args.pin, "cores": len(os.sched_getaffinity(0))}
    # Keyed by reader version, the names the report's columns use.
    reads = {"v1": seconds[0][1], "v2": seconds[1][1]}
    _common.write_results(args.out, "parquet_read", settings=settings, seconds=reads)


def _records(count: int) -> list[Record]:
    return [
        Record(image_id=f"img_{i:07d}", image_uri=f"/data/img_{i:07d}.jpg", labels=(i % 5 + 1,))
        for i in range(count)
    ]


def measure(manifest: str, repeats: int) -> list[tuple[str, list[float]]]:
    import ray
    import ray.data

    from raysseg.distributed.storage import read_parquet

    def default_reader(uri: str) -> ray.data.Dataset:
        return ray.data.read_parquet(uri)  # the context's default: DataSourceV2 in Ray 2.60

    readers = [("raysseg read_parquet (V1)", read_parquet), ("Ray default (V2)", default_reader)]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpus = max(2, len(os.sched_getaffinity(0)))
    # address="local": a new instance even when another Ray runs on this machine.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        times: dict[str, list[float]] = {name: [] for name, _ in readers}
        for repeat in range(repeats + 1):
            for name, reader in readers:
                started = time.perf_counter()
                rows = sum(len(batch["image_id"]) for batch in reader(manifest).iter_batches())
                if repeat:  # the first read of each starts workers: untimed
                    times[name].append(time.perf_counter() - started)
                assert rows > 0
    finally:
        ray.shutdown()
    return [(name, times[name]) for name, _ in readers]


if __name__ == "__main__":
    main()
