"""Where a command's CPU time goes: every process it starts, by kind, sampled from /proc.

Ray names a worker process after the actor or task it runs ("ray::RayTrainWorker",
"ray::MapWorker"), so over a pipeline, a bench or the whole test suite the table shows what each
kind of Ray process costs in all. A worker keeps the last name it had before going back to
"ray::IDLE"; one that never ran anything is counted as "ray::IDLE". Processes that live shorter
than one sampling interval are missed, so the machine's own CPU count over the run is printed
beside the sampled total (it also holds whatever else ran on the machine meanwhile).

    python bench/process_cpu.py -- python -m pytest -n 2 --dist loadfile   # the suite, ~21 min
    python bench/process_cpu.py --interval 0.2 -- raysseg pipeline ...
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common

# Ray's daemons by a fragment of their command line, in the order they are tried.
DAEMONS = (
    "raylet",
    "gcs_server",
    "dashboard_agent",
    "runtime_env",
    "log_monitor",
    "monitor.py",
    "dashboard",
)
# Names that say less than an earlier one: a Ray worker back without a job, Python starting, and
# "?" for a process that ended and is not yet reaped (a zombie has no command line, but its CPU
# times are final).
UNSETTLED = ("ray::IDLE", "python", "?")
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def main() -> None:
    args = _parse_args()
    # Processes that `ray start` or a daemon leaves behind are re-parented to this process, not to
    # init, so every process the command starts stays in this process's tree.
    become_subreaper()
    started, machine_before = time.monotonic(), machine_cpu_seconds()
    child = subprocess.Popen(args.command)
    seen: dict[tuple[int, int], tuple[str, float]] = {}
    while child.poll() is None:
        sample(seen)
        reap_orphans(child.pid)
        time.sleep(args.interval)
    sample(seen)
    wall, machine = time.monotonic() - started, machine_cpu_seconds() - machine_before
    processes = _common.cpu_by_kind(seen.values())
    report(processes, wall, machine, child.returncode)
    if args.out:
        _common.write_results(
            args.out,
            "process_cpu",
            measured=" ".join(args.command),
            returncode=child.returncode,
            wall_s=wall,
            machine_cpu_s=machine,
            processes=processes,
        )
    sys.exit(child.returncode)


def become_subreaper() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_orphans(command_pid: int) -> None:
    """Wait for re-parented processes that ended (the command itself is Popen's to wait for)."""
    while True:
        try:
            ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if ended is None or ended.si_pid == command_pid:
            return
        os.waitpid(ended.si_pid, 0)


def sample(seen: dict) -> None:
    """Fold the descendants of this process alive now into `seen`, keeping each one's last
    settled kind. Key: (pid, start time in ticks), so a reused pid is another process."""
    for pid, fields in _common.proc_descendants(os.getpid()).items():
        command = _common.proc_command(pid)
        if command is None:
            continue
        key, kind = (pid, int(fields[19])), kind_of(command)
        previous = seen.get(key)
        if previous is not None and kind in UNSETTLED:
            kind = previous[0]
        seen[key] = (kind, _common.proc_cpu_seconds(fields))


def kind_of(command: str) -> str:
    ray_process = re.match(r"\(?ray::([A-Za-z_]+)", command)
    if ray_process:
        return f"ray::{ray_process.group(1)}"
    for daemon in DAEMONS:
        if daemon in command:
            return daemon
    words = command.split()
    if words[1:2] == ["-c"] and "sys.stdin.readline()" not in command:
        return "python -c"
    if "-m pytest" in command or "sys.stdin.readline()" in command:  # pytest, xdist's workers
        return "pytest"
    script = re.search(r"(\S+\.py)\b", command)
    if script:
        return Path(script.group(1)).name
    return Path(words[0]).name if words else "?"


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all of /proc/stat's cpu line but idle and
    iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / _common.CLOCK_TICKS


def report(processes: list[dict[str, Any]], wall: float, machine: float, returncode: int) -> None:
    sampled = sum(p["cpu_s"] for p in processes)
    print(_common.machine_line())
    print(
        f"wall {wall:.0f} s, exit {returncode}; machine CPU {machine:.0f} s, "
        f"sampled in the command's processes {sampled:.0f} s"
    )
    rows = [
        [p["kind"], p["count"], p["cpu_s"], 100.0 * p["cpu_s"] / sampled if sampled else 0.0]
        for p in processes
    ]
    _common.print_table(["process", "count", "cpu s", "% of sampled"], rows)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument(
        "--out", default=None, help="also write the figures to OUT/process_cpu.json"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS ...]")
    args = parser.parse_args()
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the command to measure after --")
    return args


if __name__ == "__main__":
    main()
