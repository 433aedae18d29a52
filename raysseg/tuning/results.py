"""The results table of a tuning campaign: one row per finished trial, and how rows rank.

A row is a plain dict (trial, status, stages done / planned, the objectives, per-stage metrics,
params); `results.parquet` stores them, replaced atomically by the driver when a trial ends. The
figures a trial reports after each stage are read from its run directory's done markers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raysseg import storage
from raysseg.config import Config, dump_yaml
from raysseg.report import plot_campaign
from raysseg.rundir import campaign as campaign_layout
from raysseg.rundir.markers import is_done, read_result
from raysseg.rundir.steps import FINAL, Step, StepKind, plan_steps, refine_step, train_step
from raysseg.tuning.space import TuneSettings, TuneSpace, best_config


def step_gpus(config: Config, step: Step) -> float:
    """GPUs a pipeline step holds while it runs (0 on CPU-only configs), for GPU-hour accounting."""
    resources = config.resources
    if step.trains or step.kind is StepKind.FINAL:
        if not resources.use_gpu:
            return 0.0
        return resources.num_workers * resources.gpus_per_worker
    if step.label_stage is not None:
        return resources.refine_actors * resources.refine_gpus_per_actor
    return 0.0


def stage_metrics(config: Config, stage: int) -> dict[str, Any]:
    """What a trial reports after stage `stage` (0-based), read from the run's step markers."""
    run = config.run_dir
    train = read_result(run, train_step(stage))
    refine = read_result(run, refine_step(stage))
    gpu_seconds = 0.0
    for step in plan_steps(config, full_supervision=False):
        if is_done(run, step):
            gpu_seconds += read_result(run, step).get("seconds", 0.0) * step_gpus(config, step)
    metrics = {
        "val_miou": train.get("val_miou", float("nan")),
        "label_miou": refine.get("label_miou", float("nan")),
        "stages": stage + 1,
        "stages_planned": config.stages.count,
        "gpu_hours": gpu_seconds / 3600.0,
    }
    if is_done(run, FINAL):
        metrics["final_miou"] = read_result(run, FINAL).get("miou", float("nan"))
    return metrics


def result_row(
    name: str,
    params: dict[str, Any],
    history: list[dict[str, Any]],
    status: str,
    planned: int,
) -> dict[str, Any]:
    """The table row of a trial that ended with `status` after reporting `history` (one
    `stage_metrics` dict per stage finished)."""
    last = history[-1] if history else {}
    return {
        "trial": name,
        "status": status,
        "stages_planned": planned,
        "stages_done": int(last.get("stages", 0)),
        "val_miou": finite_or_none(last.get("val_miou")),
        "label_miou": finite_or_none(last.get("label_miou")),
        "gpu_hours": finite_or_none(last.get("gpu_hours")),
        "stages": int(last.get("stages", 0)),
        "final_miou": finite_or_none(last.get("final_miou")),
        "val_miou_per_stage": [finite_or_none(r.get("val_miou")) for r in history],
        "label_miou_per_stage": [finite_or_none(r.get("label_miou")) for r in history],
        "params": params,
    }


def finite_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def objective_values(row: dict[str, Any], settings: TuneSettings) -> list[float] | None:
    """The row's objective values, or None when one is missing or not finite (a failed trial)."""
    values = [finite_or_none(row.get(name)) for name in settings.objectives]
    return None if any(v is None for v in values) else values


def best_trial(rows: list[dict[str, Any]], settings: TuneSettings) -> dict[str, Any] | None:
    """The best row by the first objective (with two objectives it is also on the Pareto front)."""
    scored = [row for row in rows if objective_values(row, settings) is not None]
    if not scored:
        return None
    sign = 1.0 if settings.modes[0] == "max" else -1.0
    return max(scored, key=lambda row: sign * objective_values(row, settings)[0])


def pareto_front(rows: list[dict[str, Any]], settings: TuneSettings) -> list[dict[str, Any]]:
    """Rows no other row beats on every objective (and strictly on one)."""
    signs = [1.0 if mode == "max" else -1.0 for mode in settings.modes]
    scored = [
        (row, [s * v for s, v in zip(signs, values, strict=True)])
        for row in rows
        if (values := objective_values(row, settings)) is not None
    ]

    def dominated(mine: list[float]) -> bool:
        return any(
            all(o >= m for o, m in zip(other, mine, strict=True)) and other != mine
            for _, other in scored
        )

    return [row for row, mine in scored if not dominated(mine)]


def format_results(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    """A fixed-width table: trial, status, stages run / planned, metrics, searched values."""

    def cell(value: Any, percent: bool = False) -> str:
        number = finite_or_none(value)
        if number is None:
            return f"{'-' if value is None else str(value):>10.10s}"
        return f"{100 * number:10.2f}" if percent else f"{number:10.4g}"

    head = ["trial     ", "status   ", "stages", "val mIoU %", "lbl mIoU %", " GPU-hours"]
    lines = [" ".join(head + [f"{k[-10:]:>10s}" for k in keys])]
    for row in rows:
        params = row.get("params", {})
        lines.append(
            " ".join(
                [
                    f"{row['trial']:10s}",
                    f"{row['status']:9s}",
                    f"{row['stages_done']:>3d}/{row['stages_planned']:<2d}",
                    cell(row.get("val_miou"), percent=True),
                    cell(row.get("label_miou"), percent=True),
                    cell(row.get("gpu_hours")),
                ]
                + [cell(params.get(k)) for k in keys]
            )
        )
    return "\n".join(lines)


def write_results(campaign: str, rows: list[dict[str, Any]]) -> None:
    """The table as Parquet, replaced atomically (readers never see half a table)."""
    records = []
    for row in rows:
        record = {k: v for k, v in row.items() if k != "params"}
        record["params_json"] = json.dumps(row["params"], sort_keys=True)
        record.update({f"param:{k}": _column_value(v) for k, v in row["params"].items()})
        records.append(record)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), sink)
    storage.write_bytes_atomic(campaign_layout.results_file(campaign), sink.getvalue().to_pybytes())


def _column_value(value: Any) -> Any:
    # One Parquet type per column: choices may mix types, so those are written as text.
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def read_results(campaign: str) -> list[dict[str, Any]]:
    path = campaign_layout.results_file(campaign)
    if not storage.exists(path):
        return []
    rows = []
    for record in pq.read_table(storage.seekable_source(path)).to_pylist():
        row = {k: v for k, v in record.items() if not k.startswith("param")}
        row["params"] = json.loads(record["params_json"])
        rows.append(row)
    return rows


def write_outputs(
    base: Config,
    space: TuneSpace,
    campaign: str,
    rows: list[dict[str, Any]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Print the table; write best.yaml (full pipeline, best values) and the plots."""
    settings = space.settings
    log(format_results(rows, space.keys))
    best = best_trial(rows, settings)
    outputs: dict[str, Any] = {"campaign": campaign, "rows": rows, "best": best, "best_yaml": None}
    if best is not None:
        config = best_config(base, best["params"], campaign_layout.best_run_dir(campaign))
        outputs["best_yaml"] = campaign_layout.best_yaml(campaign)
        storage.write_bytes_atomic(outputs["best_yaml"], dump_yaml(config).encode("utf-8"))
        log(
            f"best: {best['trial']} ({settings.objectives[0]} {best[settings.objectives[0]]}); "
            f"run it in full with: raysseg pipeline --config {outputs['best_yaml']}"
        )
    if settings.multi_objective:
        front = pareto_front(rows, settings)
        outputs["pareto"] = [row["trial"] for row in front]
        log(f"Pareto front ({' vs '.join(settings.objectives)}): {', '.join(outputs['pareto'])}")
    if rows:
        plots = campaign_layout.plots_dir(campaign)
        storage.makedirs(plots)
        outputs["plots"] = plot_campaign(rows, space.keys, settings.objectives, plots)
    return outputs


__all__ = [
    "best_trial",
    "finite_or_none",
    "format_results",
    "objective_values",
    "pareto_front",
    "read_results",
    "result_row",
    "stage_metrics",
    "step_gpus",
    "write_outputs",
    "write_results",
]
