"""What Ray's own processes cost a core while nothing runs: CPU seconds per process over an idle window.

A local Ray pinned to `--cores` cores (Ray's processes inherit the pinning) runs one small Ray Data
pipeline with an actor pool, as a label update does, so Ray Data's helper actors exist. Then it idles
and this script reads every Ray process's CPU time from /proc before and after the window. On a label
update pinned to one core these processes share that core with the work: their sum is what the
"1 worker pinned" case loses to the serial loop at steady state.

    python bench/ray_idle.py --quick        # 2 s window
    python bench/ray_idle.py                # 20 s window, 1 core
    python bench/ray_idle.py --out runs/bench_ray_idle     # the same, figures also in ray_idle.json
"""

from __future__ import annotations

import argparse
import os
import time

import _common

KINDS = ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py")


def main() -> None:
    args = _parse_args()
    seconds = 2.0 if args.quick else args.seconds
    cores = set(sorted(os.sched_getaffinity(0))[: args.cores])
    os.sched_setaffinity(0, cores)  # before ray.init: the raylet and its workers inherit it
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    # address="local": the processes measured are this instance's, never another Ray's.
    ray.init(address="local", num_cpus=2 * len(cores), include_dashboard=False, log_to_driver=False)
    try:
        _run_a_pipeline()
        time.sleep(args.settle)
        before = cpu_seconds_by_process(os.getpid())
        time.sleep(seconds)
        after = cpu_seconds_by_process(os.getpid())
    finally:
        ray.shutdown()
    processes = _report(before, after, seconds, len(cores))
    if args.out:
        settings = {"cores": len(cores), "seconds": seconds}
        _common.write_results(args.out, "ray_idle", settings=settings, processes=processes)


def _run_a_pipeline() -> None:
    """An actor-pool map over a few rows: starts the helper actors a label update starts."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.range(8, override_num_blocks=2).map_batches(
        _Identity, compute=ray.data.ActorPoolStrategy(size=1), batch_size=4
    )
    dataset.materialize()


class _Identity:
    def __call__(self, batch):
        return batch


def cpu_seconds_by_process(root: int) -> dict[int, tuple[str, float]]:
    """{pid: (kind, user + system CPU seconds)} of `root` and every process below it."""
    processes = {root: _common.proc_stat_fields(root), **_common.proc_descendants(root)}
    return {
        pid: (_kind(pid, root), _common.proc_cpu_seconds(fields))
        for pid, fields in processes.items()
        if fields
    }


def _kind(pid: int, root: int) -> str:
    if pid == root:
        return "driver (this script)"
    command = _common.proc_command(pid)
    if command is None:
        return "?"
    for kind in KINDS:
        if kind in command:
            return kind
    return command.split()[0] if command.startswith("ray::") else command[:40]


def _report(before: dict, after: dict, seconds: float, cores: int) -> list[dict]:
    """Print CPU seconds per kind of process; return them, busiest first, as ray_idle.json holds them."""
    # A process born in the window is not counted.
    used = [(kind, cpu - before.get(pid, (kind, cpu))[1]) for pid, (kind, cpu) in after.items()]
    processes = _common.cpu_by_kind(used)
    print(_common.machine_line())
    print(f"Ray idle on {cores} core(s), {seconds:.0f} s window, after one actor-pool pipeline")
    rows = [[p["kind"], p["count"], p["cpu_s"], 100.0 * p["cpu_s"] / seconds] for p in processes]
    _common.print_table(["process", "count", "cpu s", "% of a core"], rows)
    total = sum(p["cpu_s"] for p in processes)
    print(
        f"all Ray processes and the driver: {sum(p['count'] for p in processes)} processes, "
        f"{total:.2f} cpu s = {100.0 * total / seconds:.1f} % of a core while idle"
    )
    return processes


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s window (CI smoke)")
    parser.add_argument("--seconds", type=float, default=20.0, help="idle window")
    parser.add_argument("--settle", type=float, default=3.0, help="wait before the window")
    parser.add_argument("--cores", type=int, default=1, help="cores Ray is pinned to")
    parser.add_argument("--out", default=None, help="also write the figures to OUT/ray_idle.json")
    return parser.parse_args()


if __name__ == "__main__":
    main()
