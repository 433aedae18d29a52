"""Helpers shared by the bench scripts: synthetic data, a bench config, a checkpoint, table printing.

Bench scripts run as `python bench/<name>.py`, so this folder is on sys.path and `import _common` works.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from raysseg import storage
from raysseg.config import Config, load_config, to_dict
from raysseg.data.manifest import write_manifest
from raysseg.data.sources import voc_records
from raysseg.data.synth import generate_synthetic
from raysseg.engine.checkpoint import save_checkpoint
from raysseg.model.network import build_model


def bench_config(data_root: Path, run_dir: Path, width: int, crop: int, **extra: Any) -> Config:
    """Small-backbone config on the synthetic VOC-layout data (as the demo, without its stages)."""
    overrides = {
        "run_dir": str(run_dir),
        "model.backbone": "small",
        "model.num_classes": 6,
        "model.small_width": width,
        "data.source": "voc",
        "data.root": str(data_root),
        "data.train_split": "train",
        "data.val_split": "val",
        "data.saliency": "folder",
        "data.saliency_dir": str(data_root / "saliency"),
        "data.crop_size": crop,
        "data.num_workers": 0,
        **extra,
    }
    return load_config(overrides=overrides)


def ensure_synthetic(data_root: Path, n_train: int, size: int, n_val: int = 0) -> None:
    """Generate once per (folder): reruns of a bench reuse the same images."""
    if not storage.exists(str(data_root / "class_names.txt")):
        generate_synthetic(str(data_root), n_train=n_train, n_val=n_val, size=size, seed=0)


def write_train_manifest(data_root: Path, path: Path) -> str:
    write_manifest(voc_records(str(data_root), "train"), str(path))
    return str(path)


def write_checkpoint(config: Config, path: Path, seed: int = 0) -> str:
    """A checkpoint of a freshly initialised network: inference cost does not depend on the weights."""
    import torch

    torch.manual_seed(seed)
    model = build_model(config.model)
    save_checkpoint(path, model, config_dict=to_dict(config))
    return str(path)


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


# Taken when a bench starts, before it pins itself to fewer cores: the machine line describes the
# machine the bench was given, whichever cores one of its cases used.
_USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_line() -> str:
    return (
        f"machine: {platform.machine()}, {_USABLE_CORES} usable cores, "
        f"python {platform.python_version()}"
    )


def run_facts(argv: Sequence[str]) -> dict[str, Any]:
    """Where and when a bench ran, for its JSON: the report prints them beside the tables."""
    import subprocess

    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "command": "python " + " ".join(argv),
        "commit": (commit or "unknown") + ("+changes" if dirty else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_line().removeprefix("machine: "),
        "torch": torch.__version__,
    }


def write_results(out: str | Path, bench: str, **figures: Any) -> Path:
    """OUT/<bench>.json: the bench's raw figures with its run facts, which bench/report.py turns
    into BENCHMARKS.md's section of that bench."""
    path = Path(out) / f"{bench}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"bench": bench, "facts": run_facts(sys.argv), **figures}
    path.write_text(json.dumps(record, indent=2, default=float))
    print(f"figures written to {path}")
    return path


def finite_median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when none is (a tiny quick-mode run can leave a steady
    rate undefined)."""
    finite = [value for value in values if math.isfinite(value)]
    return statistics.median(finite) if finite else math.nan


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Plain fixed-width table; floats with 3 significant decimals."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# /proc readers (Linux) for the benches that measure processes: ray_idle.py, process_cpu.py

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (fields 3...), or [] if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def proc_command(pid: int) -> str | None:
    """The command line of `pid`, words joined by spaces; None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return None


def proc_cpu_seconds(fields: list[str]) -> float:
    """User + system CPU seconds from proc_stat_fields' fields (utime, stime in clock ticks)."""
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_descendants(root: int) -> dict[int, list[str]]:
    """{pid: proc_stat_fields} of every live process below `root` (root itself not included)."""
    stats = {int(n): proc_stat_fields(int(n)) for n in os.listdir("/proc") if n.isdigit()}
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        if fields:
            children.setdefault(int(fields[1]), []).append(pid)
    found, pending = {}, list(children.get(root, []))
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        if stats[pid]:
            found[pid] = stats[pid]
    return found


def cpu_by_kind(processes: Iterable[tuple[str, float]]) -> list[dict[str, Any]]:
    """(kind, CPU s) per process -> [{"kind", "count", "cpu_s"}], the busiest kind first."""
    totals: dict[str, list[float]] = {}
    for kind, cpu in processes:
        entry = totals.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += cpu
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])
    return [{"kind": kind, "count": int(count), "cpu_s": cpu} for kind, (count, cpu) in ranked]
