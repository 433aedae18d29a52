"""Report figures of a run: mIoU per stage and a grid of labels. Plain numpy / matplotlib."""

from __future__ import annotations

import itertools
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from raysseg import storage
from raysseg.config import Config
from raysseg.data import io
from raysseg.data.manifest import read_manifest
from raysseg.rundir import layout
from raysseg.rundir.steps import step_checkpoint, train_step


def plot_stages(summary: dict[str, Any], path: Path) -> None:
    """Pseudo-label mIoU of each stage's labels and val mIoU after training on them."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    stages = summary["stages"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, name in (("label_miou", "pseudo labels (train)"), ("val_miou", "model (val)")):
        points = [(row["stage"], 100 * row[key]) for row in stages if row.get(key) is not None]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=name)
    final = summary.get("final_miou_ms_crf")
    if isinstance(final, float):
        axis.axhline(100 * final, linestyle="--", color="grey", label="final, multi-scale + CRF")
    axis.set_xlabel("stage")
    axis.set_xticks([row["stage"] for row in stages])
    axis.set_ylabel("mIoU (%)")
    axis.set_title("raysseg: quality per stage")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


GRID_COLUMNS = ("image", "ground truth", "stage-0 labels", "final labels", "final model")


def write_label_grid(config: Config, path: Path, rows: int = 6) -> None:
    """Rows of training images: image | GT | stage-0 label | final label | final model prediction.

    Label colours are the VOC palette; cream is IGNORE (255), pixels the labels leave unsupervised.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raysseg.engine.checkpoint import load_checkpoint, restore_model
    from raysseg.predict import predict_label

    run = config.run_dir
    last = config.stages.count
    first_labels, final_labels = layout.stage_labels(run, 0), layout.stage_labels(run, last)
    checkpoint = step_checkpoint(run, train_step(last - 1))
    model = restore_model(load_checkpoint(checkpoint)).eval()
    palette = io.voc_palette()
    records = list(itertools.islice(read_manifest(layout.dataset_manifest(run, "train")), rows))
    figure, axes = plt.subplots(
        len(records),
        len(GRID_COLUMNS),
        figsize=(2 * len(GRID_COLUMNS), 2 * len(records)),
        squeeze=False,
    )
    for row, record in enumerate(records):
        image = io.read_image(record.image_uri)
        blank = np.zeros(image.shape[:2], np.uint8)
        panels = [
            image,
            palette[io.read_label(record.mask_uri) if record.mask_uri else blank],
            palette[io.read_label(layout.label_uri(first_labels, "seg", record.image_id))],
            palette[io.read_label(layout.label_uri(final_labels, "seg", record.image_id))],
            palette[predict_label(model, image, config, multiscale=False, crf=False)],
        ]
        for column, panel in enumerate(panels):
            axis = axes[row][column]
            axis.imshow(panel, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(GRID_COLUMNS[column], fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_campaign(
    rows: list[dict[str, Any]], keys: tuple[str, ...], objectives: tuple[str, ...], folder: str
) -> list[str]:
    """Figures of a tuning campaign; returns the written paths or URIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [
        _plot_objective_per_trial(plt, rows, objectives[0], folder),
        _plot_parallel_coordinates(plt, rows, keys, objectives[0], folder),
        _plot_miou_per_stage(plt, rows, folder),
    ]
    if len(objectives) > 1:
        paths.append(_plot_pareto(plt, rows, objectives, folder))
    return paths


def _number(value: Any) -> float:
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan
    )


def _plot_objective_per_trial(plt, rows: list[dict], objective: str, folder: str) -> str:
    figure, axis = plt.subplots(figsize=(6, 4))
    values = np.array([_number(row.get(objective)) for row in rows])
    for status, marker in (("completed", "o"), ("stopped", "x"), ("error", "s")):
        index = [i for i, row in enumerate(rows) if row["status"] == status]
        if index:
            axis.scatter(index, values[index], marker=marker, label=status)
    if np.isfinite(values).any():
        best = np.fmax.accumulate(values) if "miou" in objective else np.fmin.accumulate(values)
        axis.step(range(len(rows)), best, where="post", color="grey", label="best so far")
    axis.set_xlabel("trial (in order of finishing)")
    axis.set_ylabel(objective)
    axis.set_title("raysseg tune: objective per trial")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(plt, figure, folder, "objective_per_trial.png")


def _plot_parallel_coordinates(plt, rows: list[dict], keys, objective: str, folder: str) -> str:
    """One line per trial across the searched values (each axis scaled to its own range)."""
    columns = [*keys, objective]
    table = np.array(
        [_axis_values([row["params"].get(k) for row in rows]) for k in keys]
        + [[_number(row.get(objective)) for row in rows]],
        float,
    ).T  # (trials, columns)
    low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
    scaled = (table - low) / np.where(high > low, high - low, 1.0)
    score = table[:, -1]
    finite = np.isfinite(score)
    span = (np.nanmin(score), np.nanmax(score)) if finite.any() else (0.0, 1.0)
    colors = plt.get_cmap("viridis")
    figure, axis = plt.subplots(figsize=(1.6 * len(columns) + 2, 4))
    for line, value in zip(scaled, score, strict=True):
        shade = 0.0 if not np.isfinite(value) else (value - span[0]) / max(span[1] - span[0], 1e-12)
        axis.plot(range(len(columns)), line, color=colors(shade), alpha=0.8, marker="o")
    axis.set_xticks(range(len(columns)))
    axis.set_xticklabels(
        [f"{c}\n[{lo:.3g}, {hi:.3g}]" for c, lo, hi in zip(columns, low, high, strict=True)],
        fontsize=8,
    )
    axis.set_yticks([])
    axis.set_title(f"raysseg tune: searched values, colour = {objective} (yellow best)")
    return _save(plt, figure, folder, "parallel_coordinates.png")


def _axis_values(values: list[Any]) -> list[float]:
    """Numbers as they are; other choices (strings, lists) as their rank among the values seen."""
    if all(np.isfinite(_number(v)) or v is None for v in values):
        return [_number(v) for v in values]
    ranks = {text: i for i, text in enumerate(sorted({str(v) for v in values}))}
    return [float(ranks[str(v)]) for v in values]


def _plot_miou_per_stage(plt, rows: list[dict], folder: str) -> str:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for row in rows:
        for axis, key in zip(axes, ("val_miou_per_stage", "label_miou_per_stage"), strict=True):
            values = [100 * _number(v) for v in row.get(key) or []]
            if values:
                style = "--" if row["status"] == "stopped" else "-"
                axis.plot(range(len(values)), values, style, marker="o", label=row["trial"])
    for axis, title in zip(axes, ("val mIoU after each stage", "pseudo-label mIoU"), strict=True):
        axis.set_xlabel("stage")
        axis.set_ylabel("mIoU (%)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="dashed: stopped early")
    return _save(plt, figure, folder, "miou_per_stage.png")


def _plot_pareto(plt, rows: list[dict], objectives: tuple[str, ...], folder: str) -> str:
    figure, axis = plt.subplots(figsize=(6, 4))
    x = [_number(row.get(objectives[1])) for row in rows]
    y = [_number(row.get(objectives[0])) for row in rows]
    axis.scatter(x, y)
    for row, xi, yi in zip(rows, x, y, strict=True):
        axis.annotate(row["trial"], (xi, yi), fontsize=7)
    axis.set_xlabel(objectives[1])
    axis.set_ylabel(objectives[0])
    axis.set_title("raysseg tune: trade-off between the two objectives")
    axis.grid(alpha=0.3)
    return _save(plt, figure, folder, "pareto.png")


def _save(plt, figure, folder: str, name: str) -> str:
    """PNG bytes through raysseg.storage: a campaign folder may be on object storage."""
    uri = storage.join(folder, name)
    buffer = BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    storage.write_bytes_atomic(uri, buffer.getvalue())
    return uri
