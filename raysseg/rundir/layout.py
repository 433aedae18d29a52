"""Where a run keeps its artifacts. Pure path arithmetic on local paths or URIs; no I/O here.

run/
  config.yaml                      the resolved config, written first
  manifest/{train,val}/            Parquet manifests of the dataset (Record rows)
  saliency/<shard>/<id>.png        cached prior saliency S0 (computed sources only)
  warmup/                          stage 0a: Ray Train storage, checkpoint/, DONE
  stage_k/                         k = 0..K-1: the labels stage k trains on, then its training:
    labels/seg/<shard>/<id>.png      segmentation pseudo label Y_k (VOC palette)
    labels/sal/<shard>/<id>.png      saliency pseudo label S_k (grey)
    manifest/ errors/                Parquet: rows with label URIs + statistics, and failed images
    labels.DONE                      written last by the label step
    train/ checkpoint/ train.DONE    Ray Train storage, the final weights, the marker
    metrics.json
  stage_K/labels ...               the final labels (after the last stage's update)
"""

from __future__ import annotations

import hashlib

from raysseg.data.io import join

# 4,096 shard folders: COCO train (82,783 images) -> ~20 files per folder, Open Images (9 M) -> ~2,200,
# 20 M images -> ~4,900. Object stores do not care; local filesystems and `ls` slow down past that.
SHARD_HEX_DIGITS = 3
SHARD_COUNT = 16**SHARD_HEX_DIGITS


def shard_of(image_id: str) -> str:
    """Stable shard folder name from the image id, so no folder grows with the dataset."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:SHARD_HEX_DIGITS]


def sharded_uri(root: str, image_id: str, suffix: str = ".png") -> str:
    """`root/<shard>/<safe id><suffix>`: every per-image file of a run lives in a shard folder."""
    return join(root, shard_of(image_id), f"{safe_name(image_id)}{suffix}")


def safe_name(image_id: str) -> str:
    """File name for an image id: ids may hold '/' (nested source folders)."""
    return image_id.replace("/", "__")


def stage_dir(run_dir: str, stage: int) -> str:
    return join(run_dir, f"stage_{stage}")


def final_checkpoint(run_dir: str, name: str) -> str:
    """The final weights of a training step: name "warmup" or "stage_k" (known before it runs)."""
    return join(run_dir, name, "checkpoint", "checkpoint.pt")


def step_marker(run_dir: str, step: str) -> str:
    """The done marker of a pipeline step ("manifest", "stage_0/labels", ...), written last."""
    return join(run_dir, f"{step}.DONE")


def label_uri(labels_root: str, kind: str, image_id: str) -> str:
    """kind: 'seg' or 'sal'."""
    return sharded_uri(join(labels_root, kind), image_id)


def dataset_manifest(run_dir: str, split: str) -> str:
    return join(run_dir, "manifest", split)


def stage_manifest(run_dir: str, stage: int) -> str:
    return join(stage_dir(run_dir, stage), "manifest")


def stage_errors(run_dir: str, stage: int) -> str:
    return join(stage_dir(run_dir, stage), "errors")


def stage_labels(run_dir: str, stage: int) -> str:
    return join(stage_dir(run_dir, stage), "labels")


def saliency_cache(run_dir: str) -> str:
    return join(run_dir, "saliency")
