"""A COCO data source through the whole pipeline on the local Ray (conftest): manifest -> warm-up ->
stage-0 labels -> 2 stages of training and refinement -> final, on a small COCO dataset the test
writes; then the pipeline resumed. One run (a module fixture) serves both tests.

The folder source runs end to end in test_object_storage.py (its pipeline, with the run directory on
S3, is a folder-source run); the VOC layout through the pipeline command in test_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from ray_helpers import ONE_STAGE_STEPS, assert_steps_done, tiny_config

from raysseg import storage
from raysseg.config import IGNORE_INDEX
from raysseg.data import io
from raysseg.data.manifest import read_manifest
from raysseg.distributed.pipeline import run_pipeline
from raysseg.rundir import layout

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

# Small backbone, one warm-up epoch, two stages of one epoch each, tiny crops.
FAST = (
    "model.small_width=8",
    "data.crop_size=32",
    "stages.count=2",
    "optim.batch_size=4",
)
TWO_STAGE_STEPS = (*ONE_STAGE_STEPS[:-1], "stage_1/train", "stage_1/refine", "final")


# ----------------------------------------------------------------------------------------------
# COCO

SIZE = 48
# Three categories with ids that have gaps, as COCO's do: they map to classes 1, 2, 3.
CATEGORIES = [
    {"id": 2, "name": "red box"},
    {"id": 5, "name": "green box"},
    {"id": 9, "name": "disc"},
]
COLORS = {2: (220, 40, 40), 5: (40, 200, 60), 9: (40, 60, 220)}


def _box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _disc(cx: int, cy: int, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2).astype(np.uint8)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major flattening, starting with 0s."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": ([0] if flat[0] else []) + counts, "size": list(mask.shape)}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {"counts": rle["counts"].decode("ascii"), "size": list(rle["size"])}


def _annotation(kind: str, index: int, category: int, mask: np.ndarray, crowd: int = 0) -> dict:
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
    if kind == "polygon":  # the box's outline (polygons suit boxes)
        x0, y0, w, h = bbox
        segmentation = [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]]
    elif kind == "rle":
        segmentation = _uncompressed_rle(mask)
    else:
        segmentation = _compressed_rle(mask)
    return {
        "id": index,
        "category_id": category,
        "iscrowd": crowd,
        "area": float(mask.sum()),
        "bbox": bbox,
        "segmentation": segmentation,
    }


def _coco_split(root: Path, split: str, count: int, seed: int) -> Path:
    """`count` images of SIZE px: a polygon box, an RLE disc and a compressed-RLE box each, and a
    crowd (uncompressed RLE, iscrowd=1) in the bottom strip of every other image."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for image_index in range(count):
        image = rng.integers(90, 140, (SIZE, SIZE, 3)).astype(np.uint8)
        shapes = [
            ("polygon", 2, _box(*rng.integers(2, 8, 2), *rng.integers(16, 22, 2))),
            ("rle", 9, _disc(int(rng.integers(30, 38)), int(rng.integers(10, 18)), 6)),
        ]
        if image_index % 2:
            shapes.append(("compressed", 5, _box(26, 24, 40, 34)))
            shapes.append(("rle", 5, _box(0, 40, SIZE, SIZE)))  # the crowd
        for number, (kind, category, mask) in enumerate(shapes):
            crowd = int(kind == "rle" and category == 5)
            image[mask.astype(bool)] = COLORS[category]
            annotation_id = 100 * image_index + number
            annotations.append(_annotation(kind, annotation_id, category, mask, crowd))
            annotations[-1]["image_id"] = image_index + 1
        file_name = f"{split}_{image_index:04d}.jpg"
        Image.fromarray(image).save(root / split / file_name, quality=95)
        images.append(
            {"id": image_index + 1, "file_name": file_name, "height": SIZE, "width": SIZE}
        )
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    return path


@pytest.fixture(scope="module")
def coco_run(local_ray, tmp_path_factory) -> tuple:
    """The whole pipeline (2 stages) over 8 train and 2 val COCO images: (config, summary, log)."""
    root = tmp_path_factory.mktemp("coco")
    train_json = _coco_split(root, "train", 8, seed=0)
    val_json = _coco_split(root, "val", 2, seed=1)
    config = tiny_config(
        root,
        root / "run",
        *FAST,
        "model.num_classes=4",
        "data.source=coco",
        f"data.coco_annotations={train_json}",
        f"data.coco_val_annotations={val_json}",
        "data.saliency=spectral",
        "data.saliency_dir=",
    )
    lines: list[str] = []
    summary = run_pipeline(config, log=lines.append)
    return config, summary, lines


def test_coco_source_runs_end_to_end(coco_run) -> None:
    config, summary, lines = coco_run
    run = Path(config.run_dir)
    assert "saliency prior: spectral (OpenCV spectral residual)" in lines
    assert_steps_done(run, TWO_STAGE_STEPS)

    train = list(read_manifest(layout.dataset_manifest(str(run), "train")))
    assert len(train) == 8
    # Crowd annotations count for the image labels (class 2 = category 5) but are IGNORE pixels.
    crowded = train[1]
    assert crowded.labels == (1, 2, 3)
    mask = io.read_label(crowded.mask_uri)
    assert (mask[42:, :] == IGNORE_INDEX).all()
    assert (mask[26:32, 28:38] == 2).all()  # the compressed-RLE box
    assert train[0].labels == (1, 3) and IGNORE_INDEX not in np.unique(
        io.read_label(train[0].mask_uri)
    )
    # Stage-0 and refined labels exist for every train image.
    for stage in (0, 1):
        for record in train:
            assert storage.exists(
                layout.label_uri(layout.stage_labels(str(run), stage), "seg", record.image_id)
            )
    # COCO masks exist for every image: all are scored.
    assert summary["stages"][0]["label_scored_images"] == 8
    assert 0.0 <= summary["stages"][0]["label_miou"] <= 1.0
    assert 0.0 <= summary["stages"][0]["val_miou"] <= 1.0
    assert 0.0 <= summary["final_miou_ms_crf"] <= 1.0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["saliency_prior"].startswith("spectral") and "val_miou" in metrics["stages"][0]
    # The per-class table names the file's categories.
    assert "red_box" in json.loads((run / "final.DONE").read_text())["table"]


# ----------------------------------------------------------------------------------------------
# The pipeline end to end, then resumed


def test_pipeline_end_to_end_then_resume(coco_run) -> None:
    config, summary, _ = coco_run
    run = Path(config.run_dir)
    assert (run / "config.yaml").exists()
    assert_steps_done(run, TWO_STAGE_STEPS)
    labels_0 = summary["stages"][0]
    assert 0.0 <= labels_0["label_miou"] <= 1.0
    assert isinstance(summary["final_miou_ms_crf"], float)
    train_images = len(list(read_manifest(layout.dataset_manifest(str(run), "train"))))
    final_rows = pq.read_table(str(run / "stage_2" / "manifest")).num_rows
    assert final_rows == train_images == 8

    # Delete the last step's marker: the rerun redoes only that step.
    (run / "final.DONE").unlink()
    logs: list[str] = []
    run_pipeline(config, log=logs.append)
    ran = [line for line in logs if line.endswith(": running")]
    assert ran == ["[8/8] final: running"], logs
    assert json.loads((run / "final.DONE").read_text())["miou"] >= 0.0
