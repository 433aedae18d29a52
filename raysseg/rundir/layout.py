"""Where a run keeps its artifacts. Pure path arithmetic on local paths or URIs; no I/O here.

run/
  config.yaml                      the resolved config, written first
  manifest/{train,val}/            Parquet manifests of the dataset (Record rows)
  manifest/problems/               Parquet: the dataset's problems the manifest step found
  manifest.DONE warmup.DONE        done markers of the steps outside a stage (steps.py names them)
  saliency/<shard>/<id>.png        cached prior saliency S0 (computed sources only)
  coco_masks/<split>/<shard>/      GT masks rendered from COCO annotations (COCO sources only)
  warmup/                          stage 0a: Ray Train storage train/, checkpoint/checkpoint.pt
  stage_k/                         k = 0..K-1: the labels stage k trains on, then its training:
    labels/seg/<shard>/<id>.png      segmentation pseudo label Y_k (VOC palette)
    labels/sal/<shard>/<id>.png      saliency pseudo label S_k (grey)
    manifest/ errors/                Parquet: rows with label URIs + statistics, and failed images
    labels.DONE                      written last by the label step (stage 0)
    train/ checkpoint/ train.DONE    Ray Train storage, the final weights, the marker
    refine.DONE                      the label update after stage k (writes stage_{k+1}/labels)
  stage_K/labels ...               the final labels (after the last stage's update)
  final.DONE metrics.json          the final evaluation's marker, the run's summary
"""

from __future__ import annotations

import hashlib

from raysseg.storage import join

# 4,096 shard folders: COCO train (82,783 images) -> ~20 files per folder, Open Images (9 M) -> ~2,200,
# 20 M images -> ~4,900. Object stores do not care; local filesystems and `ls` slow down past that.
SHARD_HEX_DIGITS = 3
SHARD_COUNT = 16**SHARD_HEX_DIGITS

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
MARKER_SUFFIX = ".DONE"
WARMUP_FOLDER = "warmup"
LABEL_KINDS = ("seg", "sal")
# Folders that hold one file per image (millions on large datasets): sweeps of the run directory
# never enter them. Everything else (markers, manifests, checkpoints) sits a few levels down.
PER_IMAGE_FOLDERS = ("labels", "saliency", "coco_masks")
SWEEP_DEPTH = 3  # run/stage_k/checkpoint/<file>, run/manifest/train/<part>


def shard_of(image_id: str) -> str:
    """Stable shard folder name from the image id, so no folder grows with the dataset."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:SHARD_HEX_DIGITS]


def sharded_uri(root: str, image_id: str, suffix: str = ".png") -> str:
    """`root/<shard>/<safe id><suffix>`: every per-image file of a run lives in a shard folder."""
    return join(root, shard_of(image_id), f"{safe_name(image_id)}{suffix}")


def safe_name(image_id: str) -> str:
    """File name for an image id: ids may hold '/' (nested source folders)."""
    return image_id.replace("/", "__")


def config_file(run_dir: str) -> str:
    return join(run_dir, CONFIG_FILE)


def metrics_file(run_dir: str) -> str:
    return join(run_dir, METRICS_FILE)


def stage_folder(stage: int) -> str:
    """The folder name of stage `stage` ("stage_k"), also the first part of its steps' names."""
    return f"stage_{stage}"


def stage_of_folder(name: str) -> int | None:
    """Inverse of `stage_folder`: "stage_3" -> 3; any other name -> None."""
    digits = name.removeprefix("stage_")
    return int(digits) if name.startswith("stage_") and digits.isdigit() else None


def stage_dir(run_dir: str, stage: int) -> str:
    return join(run_dir, stage_folder(stage))


def final_checkpoint(run_dir: str, name: str) -> str:
    """The final weights of a training: name "warmup" or "stage_k" (known before it runs)."""
    return join(run_dir, name, "checkpoint", CHECKPOINT_FILE)


def train_storage(run_dir: str, name: str) -> str:
    """Ray Train's storage of a training ("warmup" or "stage_k"): its per-epoch checkpoints."""
    return join(run_dir, name, "train")


def tensorboard_dir(run_dir: str) -> str:
    """The run's TensorBoard event files and the record of what they hold (raysseg.tracking)."""
    return join(run_dir, "tensorboard")


def run_log(run_dir: str) -> str:
    """raysseg's own console lines of every command run on this run directory, appended."""
    return join(run_dir, "logs", "raysseg.log")


def train_progress(storage_path: str) -> str:
    """Where a training's rank 0 writes its progress (per-epoch metrics, the current epoch's step)."""
    return join(storage_path, "progress.json")


def step_marker(run_dir: str, step_name: str) -> str:
    """The done marker of a pipeline step, by its name (`steps.Step.name`), written last."""
    return join(run_dir, f"{step_name}{MARKER_SUFFIX}")


def is_step_marker(name: str) -> bool:
    return name.endswith(MARKER_SUFFIX)


def label_dir(labels_root: str, kind: str) -> str:
    """kind: 'seg' or 'sal'."""
    return join(labels_root, kind)


def label_uri(labels_root: str, kind: str, image_id: str) -> str:
    """kind: 'seg' or 'sal'."""
    return sharded_uri(label_dir(labels_root, kind), image_id)


def label_file_stage(parts: list[str], kind: str = "seg") -> int | None:
    """The stage of a label file from its path parts relative to the run directory
    (`stage_k/labels/<kind>/<shard>/<id>.png` -> k); None for any other file."""
    if len(parts) != 5 or parts[1:3] != ["labels", kind] or not parts[4].endswith(".png"):
        return None
    return stage_of_folder(parts[0])


def dataset_manifest(run_dir: str, split: str) -> str:
    return join(run_dir, "manifest", split)


def listed_manifest(run_dir: str, split: str) -> str:
    """A split's items as the source listed them, before the manifest step checked their files
    (removed once the checked manifest is written)."""
    return join(run_dir, "manifest", f"{split}_listed")


def problems_table(run_dir: str) -> str:
    """Parquet: every problem the manifest step found (split, image id, file, message)."""
    return join(run_dir, "manifest", "problems")


def stage_manifest(run_dir: str, stage: int) -> str:
    return join(stage_dir(run_dir, stage), "manifest")


def stage_errors(run_dir: str, stage: int) -> str:
    return join(stage_dir(run_dir, stage), "errors")


def stage_labels(run_dir: str, stage: int) -> str:
    return join(stage_dir(run_dir, stage), "labels")


def saliency_cache(run_dir: str) -> str:
    return join(run_dir, "saliency")


def coco_masks(run_dir: str, split: str) -> str:
    """Where the COCO source renders the GT masks of `split` (once, reused by reruns)."""
    return join(run_dir, "coco_masks", split)
