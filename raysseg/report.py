"""Report figures of a run: mIoU per stage and a grid of labels. Plain numpy / matplotlib."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from raysseg import layout
from raysseg.config import Config
from raysseg.data import io
from raysseg.data.records import read_manifest


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
    checkpoint = layout.join(run, f"stage_{last - 1}", "checkpoint", "checkpoint.pt")
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
