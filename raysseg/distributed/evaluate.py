"""Dataset-wide scores on Ray Data: pseudo-label quality and model mIoU (multi-scale + flip + CRF).

Each batch returns one count matrix; the driver sums them, so nothing per image travels back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.data.expressions import col

from raysseg.config import Config, from_dict, to_dict
from raysseg.data import io
from raysseg.data.checks import over_budget, over_budget_phrase
from raysseg.data.records import DataError, check_label_map, class_names_for
from raysseg.data.sources import coco_class_names
from raysseg.distributed.datasets import inference_pool_options, read_manifest_dataset
from raysseg.distributed.placement import require_custom_resources
from raysseg.engine.checkpoint import load_checkpoint, restore_model
from raysseg.engine.metrics import ConfusionMatrix, LabelQuality
from raysseg.predict import predict_label
from raysseg.rundir import layout


def label_quality(manifest: str, num_classes: int, batch_size: int = 16) -> dict[str, Any]:
    """Precision / recall / mIoU of a stage's pseudo labels against the GT masks in the manifest.

    Only the images with a GT mask are scored (train_aug has one for every image, a user's split
    may have some): the others are left out, not errors. `scored_images` says how many were
    scored; with none, the figures are NaN. A mask whose size is not its pseudo label's (a file
    replaced after the manifest step checked it) is not scored and does not stop the stage:
    `mismatched_masks` counts them and `first_mismatch` names the first, with its image id.
    """
    dataset, _ = read_manifest_dataset(
        manifest,
        parallelism=2,
        columns=["image_id", "seg_label_uri", "mask_uri"],
        rows_per_batch=batch_size,
    )
    dataset = dataset.filter(expr=col("mask_uri") != "")
    counts = dataset.map_batches(
        _label_quality_batch,
        fn_kwargs={"num_classes": num_classes},
        batch_size=batch_size,
        batch_format="pandas",
    )
    total = LabelQuality(num_classes)
    scored, mismatches = 0, []
    for row in counts.iter_rows():
        total.merge(LabelQuality.from_array(np.asarray(row["counts"]).reshape(num_classes, -1)))
        scored += int(row["images"])
        mismatches += list(row["mismatches"])
    result = {**total.compute(), "scored_images": scored, "mismatched_masks": len(mismatches)}
    if mismatches:
        result["first_mismatch"] = mismatches[0]
    return result


def _label_quality_batch(batch, num_classes: int):
    import pandas as pd

    quality = LabelQuality(num_classes)
    mismatches = []
    for image_id, seg_uri, mask_uri in zip(
        batch["image_id"], batch["seg_label_uri"], batch["mask_uri"], strict=True
    ):
        seg, mask = io.read_label(seg_uri), io.read_label(mask_uri)
        if seg.shape != mask.shape:
            mismatches.append(
                f"image '{image_id}': GT mask '{mask_uri}' is (H, W) = {mask.shape}, but its "
                f"pseudo label '{seg_uri}' is {seg.shape}"
            )
            continue
        quality.update(seg, mask)
    scored = len(batch) - len(mismatches)
    return pd.DataFrame(
        {"counts": [quality.to_array().ravel()], "images": [scored], "mismatches": [mismatches]}
    )


def evaluate_checkpoint(
    config: Config,
    checkpoint: str,
    *,
    multiscale: bool = True,
    crf: bool = True,
    manifest: str = "",
) -> dict[str, Any]:
    """Val mIoU of a checkpoint with the test-time recipe of METHOD.md (or single scale, no CRF).

    An image or mask that cannot be read (or whose mask is not the image's size) is left out and
    counted ("unreadable", "first_unreadable"); past `resources.error_budget` it is a DataError.
    """
    manifest = manifest or layout.dataset_manifest(config.run_dir, "val")
    resources = config.resources
    require_custom_resources(resources, ["refine"])
    dataset, _ = read_manifest_dataset(
        manifest, resources.refine_actors, rows_per_batch=resources.refine_batch_size
    )
    matrices = dataset.map_batches(
        _Scorer,
        fn_constructor_kwargs={
            "config_dict": to_dict(config),
            "checkpoint": checkpoint,
            "multiscale": multiscale,
            "crf": crf,
        },
        **inference_pool_options(resources),
    )
    num_classes = config.model.num_classes
    confusion = ConfusionMatrix(num_classes)
    images, unreadable = 0, []
    for row in matrices.iter_rows():
        matrix = np.asarray(row["confusion"]).reshape(num_classes, num_classes)
        confusion.merge(ConfusionMatrix.from_array(matrix))
        images += int(row["images"])
        unreadable += list(row["unreadable"])
    if over_budget(len(unreadable), images, resources.error_budget):
        raise DataError(
            f"evaluation of '{manifest}': {len(unreadable)} of {images} images could not be read, "
            f"{over_budget_phrase(resources.error_budget)}; first: {unreadable[0]}"
        )
    scores = {
        "miou": confusion.miou(),
        "iou": confusion.iou().tolist(),
        "pixel_accuracy": confusion.pixel_accuracy(),
        "table": confusion.table(_class_names(config)),
        "unreadable": len(unreadable),
    }
    if unreadable:
        scores["first_unreadable"] = unreadable[0]
    return scores


def _class_names(config: Config) -> list[str] | None:
    """Names for the table: the source's (a COCO-format file of other categories than COCO's 80
    names its own, read only then); None (class numbers) if they do not match the classes."""
    data = config.data
    names = class_names_for(data.source, data.root, data.class_names)
    annotations = data.coco_val_annotations or data.coco_annotations
    if data.source == "coco" and len(names) != config.model.num_classes and annotations:
        names = coco_class_names(annotations)
    return names if len(names) == config.model.num_classes else None


class _Scorer:
    """Actor: predicts (multi-scale + flip), optionally CRFs, and counts one confusion per batch."""

    def __init__(self, config_dict: dict, checkpoint: str, multiscale: bool, crf: bool) -> None:
        self.config = from_dict(config_dict)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = restore_model(load_checkpoint(checkpoint)).to(self.device).eval()
        self.multiscale = multiscale
        self.crf = crf

    def __call__(self, batch):
        import pandas as pd

        num_classes = self.config.model.num_classes
        confusion = ConfusionMatrix(num_classes)
        unreadable = []
        for image_uri, mask_uri in zip(batch["image_uri"], batch["mask_uri"], strict=True):
            try:
                image = io.read_image(image_uri)
                mask = io.read_label(mask_uri)
                check_label_map(mask, num_classes, mask_uri, image.shape, image_uri)
            except (OSError, DataError) as error:
                unreadable.append(str(error))
                continue
            prediction = predict_label(self.model, image, self.config, self.multiscale, self.crf)
            confusion.update(prediction, mask)
        return pd.DataFrame(
            {
                "confusion": [confusion.to_array().ravel()],
                "images": [len(batch)],
                "unreadable": [unreadable],
            }
        )
