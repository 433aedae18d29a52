"""The AuxSegNet stage loop: manifests -> warm-up -> initial labels -> (train -> update labels) x K.

A plain loop over named steps. Every step writes its outputs, then a done marker (JSON with its results)
last; a rerun of the same command skips finished steps and resumes the unfinished one (Ray Train resumes
from the stage's last checkpoint, the label update skips images already labelled).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from raysseg import layout
from raysseg.config import (
    Config,
    ConfigError,
    changed_settings,
    config_from_yaml_text,
    dump_yaml,
)
from raysseg.data import io
from raysseg.data.records import (
    Record,
    coco_records,
    folder_records,
    under_root,
    voc_records,
    write_manifest,
)
from raysseg.distributed.evaluate import evaluate_checkpoint, label_quality
from raysseg.distributed.refine import update_stage_labels
from raysseg.distributed.train import StageSpec, train_stage
from raysseg.labels.saliency import describe_saliency, resolve_saliency
from raysseg.model.weights import check_pretrained


@dataclass(frozen=True)
class Step:
    name: str  # "manifest", "warmup", "stage_0/labels", "stage_0/train", "stage_0/refine", "final"
    run: Callable[[], dict[str, Any]]


def run_pipeline(
    config: Config, full_supervision: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) every step; return the per-stage summary that is also saved as metrics.json."""
    check_pretrained(config.model)  # before anything is written: no run on silently random weights
    config = resolve_run_config(config, log)
    prepare_run_dir(config)
    steps = plan_steps(config, full_supervision)
    for index, step in enumerate(steps, start=1):
        run_step(config, step, f"[{index}/{len(steps)}]", log)
    summary = summarize(config)
    io.write_bytes_atomic(
        layout.join(config.run_dir, "metrics.json"), json.dumps(summary, indent=2).encode()
    )
    log(format_summary(summary))
    return summary


def run_single_step(config: Config, step: str, log: Callable[[str], None] = print) -> dict:
    """Run one named step (e.g. 'stage_1/train'); its predecessors must be done."""
    config = resolve_run_config(config, log)
    prepare_run_dir(config)
    steps = plan_steps(config, full_supervision=False)
    names = [s.name for s in steps]
    if step not in names:
        raise ConfigError(f"unknown step '{step}' for this config (steps: {', '.join(names)})")
    position = names.index(step)
    missing = [s.name for s in steps[:position] if not is_done(config.run_dir, s.name)]
    if missing:
        raise RuntimeError(f"step '{step}' needs these steps first: {', '.join(missing)}")
    return run_step(config, steps[position], "[1/1]", log)


def run_step(config: Config, step: Step, counter: str, log: Callable[[str], None]) -> dict:
    marker = _marker(config.run_dir, step.name)
    if io.exists(marker):
        log(f"{counter} {step.name}: done earlier, skipped")
        return json.loads(io.read_bytes(marker))
    log(f"{counter} {step.name}: running")
    started = time.perf_counter()
    result = step.run()
    result["seconds"] = round(time.perf_counter() - started, 2)
    write_result(config.run_dir, step.name, result)
    log(f"{counter} {step.name}: finished in {result['seconds']:.1f} s {_brief(result)}")
    return result


def _brief(result: dict[str, Any]) -> str:
    keys = ("images", "written", "errors", "label_miou", "label_scored_images", "val_miou", "miou")
    shown = {k: result[k] for k in keys if k in result}
    return " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
    )


def _marker(run_dir: str, step: str) -> str:
    return layout.step_marker(run_dir, step)


def write_result(run_dir: str, step: str, result: dict[str, Any]) -> None:
    """The step's done marker: its results, written last and atomically."""
    io.write_bytes_atomic(
        _marker(run_dir, step), json.dumps(result, indent=2, default=float).encode()
    )


def is_done(run_dir: str, step: str) -> bool:
    return io.exists(_marker(run_dir, step))


def read_result(run_dir: str, step: str) -> dict[str, Any]:
    return json.loads(io.read_bytes(_marker(run_dir, step)))


def _absolute_run_dir(config: Config) -> Config:
    if "://" in config.run_dir:
        return config
    return dataclasses.replace(config, run_dir=os.path.abspath(config.run_dir))


def resolve_run_config(config: Config, log: Callable[[str], None] = print) -> Config:
    """The config a run works with: an absolute run_dir and the saliency prior resolved once,
    here in the driver before any Ray work (a u2netp model is checked now), and printed.

    The resolved values are what config.yaml keeps: rerunning the same command on the same data
    resolves the same and resumes; a run whose prior would change (a saliency/ folder added since)
    is refused by `prepare_run_dir`, naming data.saliency, since its labels came from the other.
    """
    choice = resolve_saliency(config.data)
    for note in choice.notes:
        log(note)
    log(f"saliency prior: {choice.description}")
    return dataclasses.replace(_absolute_run_dir(config), data=choice.data)


RUN_DIR_SWEEP_DEPTH = 3  # run/stage_k/checkpoint/<file>, run/manifest/train/<part>
PER_IMAGE_FOLDERS = ("labels", "saliency", "coco_masks")


def prepare_run_dir(config: Config) -> None:
    """Save the resolved config first; refuse a run directory written by a different config.

    On a rerun, left-over temp files of an interrupted write are removed (one driver per run dir).
    """
    path = layout.join(config.run_dir, "config.yaml")
    if io.exists(path):
        saved = config_from_yaml_text(io.read_bytes(path).decode("utf-8"), where=path)
        changed = changed_settings(saved, config)
        if changed:
            raise ConfigError(
                f"run directory '{config.run_dir}' was written by another config (differs in "
                f"{', '.join(changed)}); use a new run_dir or the same settings"
            )
        # A rerun after a crash: half-written files of the killed run would never be reused (temp
        # names are unique), so clear them before any step starts writing. Markers, manifests and
        # checkpoints sit a few levels down; per-image shard folders are left to the label update
        # that resumes them.
        io.remove_temp_files(
            config.run_dir, max_depth=RUN_DIR_SWEEP_DEPTH, skip_dirs=PER_IMAGE_FOLDERS
        )
        return
    io.makedirs(config.run_dir)
    io.write_bytes_atomic(path, dump_yaml(config).encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# The steps


def plan_steps(config: Config, full_supervision: bool) -> list[Step]:
    run = config.run_dir
    steps = [Step("manifest", lambda: build_manifests(config))]
    # The full-supervision baseline keeps the warm-up, so both runs start from the same backbone
    # (on real data both would start from the same ImageNet weights); only the labels differ.
    steps.append(Step("warmup", lambda: _train_step(config, "warmup", "warmup", "", 0)))
    if full_supervision:
        steps.append(Step("stage_0/labels", lambda: _labels_step(config, 0, "ground_truth", "")))
    else:
        steps.append(
            Step(
                "stage_0/labels",
                lambda: _labels_step(config, 0, "initial", step_checkpoint(run, "warmup")),
            )
        )
    for stage in range(config.stages.count):
        init = _previous_checkpoint(run, stage)
        label_stage = 0 if full_supervision else stage
        steps.append(
            Step(
                f"stage_{stage}/train",
                _bind(_train_step, config, f"stage_{stage}", "full", init, label_stage),
            )
        )
        if not full_supervision:
            steps.append(
                Step(
                    f"stage_{stage}/refine",
                    _bind(
                        _labels_step,
                        config,
                        stage + 1,
                        "refine",
                        step_checkpoint(run, f"stage_{stage}/train"),
                    ),
                )
            )
    last = f"stage_{config.stages.count - 1}/train"
    steps.append(Step("final", lambda: _final_step(config, last)))
    return steps


def _bind(function: Callable[..., dict], *args: Any) -> Callable[[], dict]:
    # Early binding: a lambda in the loop above would see the last stage's values.
    return lambda: function(*args)


def step_checkpoint(run_dir: str, step: str) -> str:
    """Where a training step leaves its final weights (known before the step runs)."""
    return layout.final_checkpoint(run_dir, step.split("/")[0])


def _previous_checkpoint(run_dir: str, stage: int) -> str:
    return step_checkpoint(run_dir, "warmup" if stage == 0 else f"stage_{stage - 1}/train")


def build_manifests(config: Config) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for split, records in (("train", _train_records(config)), ("val", _val_records(config))):
        if records is None:
            continue
        counts[f"{split}_images"] = write_manifest(
            records, layout.dataset_manifest(config.run_dir, split)
        )
    if not counts.get("train_images"):
        raise ConfigError(f"data.root '{config.data.root}': the training split has no images")
    return counts


def _train_records(config: Config) -> Iterator[Record]:
    records = _records(config, config.data.train_split, config.data.coco_annotations)
    return itertools.islice(records, config.data.subset) if config.data.subset else records


def _val_records(config: Config) -> Iterator[Record] | None:
    """The validation images with a GT mask (they are scored, never trained on); None when the
    source has no validation split (folder) or none is configured."""
    data = config.data
    if data.source == "voc":
        split_file = io.join(data.root, "ImageSets", "Segmentation", f"{data.val_split}.txt")
        if not data.val_split or not io.exists(split_file):
            return None
        names = data.class_names or None
        return voc_records(
            data.root, data.val_split, names, mask_dir=data.mask_dir, masks_only=True
        )
    if data.source == "folder" or not data.coco_val_annotations:
        return None
    return _records(config, data.val_split, data.coco_val_annotations)


def _records(config: Config, split: str, coco_json: str) -> Iterator[Record]:
    data = config.data
    if data.source == "voc":
        names = data.class_names or None
        return voc_records(data.root, split, names, data.labels_file, mask_dir=data.mask_dir)
    if data.source == "coco":
        if not coco_json:
            raise ConfigError("config key 'data.coco_annotations': not set (data.source=coco)")
        mask_dir = layout.join(config.run_dir, "coco_masks", split)
        return coco_records(
            coco_json, io.join(data.root, split), mask_dir, config.model.num_classes
        )
    if not data.labels_file:
        raise ConfigError("config key 'data.labels_file': not set (data.source=folder)")
    return folder_records(
        data.root,
        data.labels_file,
        data.class_names,
        saliency_dir=data.saliency_dir,
        mask_dir=under_root(data.root, data.mask_dir) if data.mask_dir else "",
    )


def _train_step(config: Config, name: str, mode: str, init: str, label_stage: int) -> dict:
    run = config.run_dir
    warmup = mode == "warmup"
    train_manifest = (
        layout.dataset_manifest(run, "train") if warmup else layout.stage_manifest(run, label_stage)
    )
    val_manifest = layout.dataset_manifest(run, "val")
    spec = StageSpec(
        name=name,
        mode=mode,
        train_manifest=train_manifest,
        val_manifest=val_manifest if io.exists(val_manifest) else "",
        init_checkpoint=init,
        epochs=config.optim.warmup_epochs if warmup else config.optim.epochs,
        storage_path=layout.join(run, name, "train"),
    )
    result = train_stage(config, spec)
    final = step_checkpoint(run, f"{name}/train")
    io.copy_file(result["checkpoint"], final)
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    return {"checkpoint": final, **metrics}


def _labels_step(config: Config, stage: int, mode: str, checkpoint: str) -> dict:
    run = config.run_dir
    in_manifest = (
        layout.dataset_manifest(run, "train")
        if stage == 0
        else layout.stage_manifest(run, stage - 1)
    )
    summary = update_stage_labels(
        config, stage, mode=mode, checkpoint=checkpoint, in_manifest=in_manifest
    )
    # Scored on the images that have a GT mask; how many is kept beside the figures.
    quality = label_quality(layout.stage_manifest(run, stage), config.model.num_classes)
    summary.update(
        label_precision=quality["precision"],
        label_recall=quality["recall"],
        label_miou=quality["miou"],
        label_scored_images=quality["scored_images"],
    )
    return summary


def _final_step(config: Config, last_train_step: str) -> dict:
    val_manifest = layout.dataset_manifest(config.run_dir, "val")
    if not io.exists(val_manifest):
        return {"miou": float("nan"), "note": "no validation ground truth"}
    result = evaluate_checkpoint(
        config, step_checkpoint(config.run_dir, last_train_step), multiscale=True, crf=True
    )
    return {"miou": result["miou"], "iou": result["iou"], "table": result["table"]}


# ----------------------------------------------------------------------------------------------
# Summary


def summarize(config: Config) -> dict[str, Any]:
    """Per-stage label quality (with the number of images scored) and val mIoU, from the done
    markers, and the saliency prior of the (resolved) config."""
    run = config.run_dir
    stages = []
    label_keys = ("label_precision", "label_recall", "label_miou", "label_scored_images")
    for stage in range(config.stages.count + 1):
        row: dict[str, Any] = {"stage": stage}
        for step, keys in (
            (f"stage_{stage}/labels", label_keys),
            (f"stage_{stage - 1}/refine", label_keys),
            (f"stage_{stage}/train", ("val_miou",)),
        ):
            if stage - 1 < 0 and "refine" in step:
                continue
            if is_done(run, step):
                result = read_result(run, step)
                row.update({k: result[k] for k in keys if k in result})
        stages.append(row)
    final = read_result(run, "final") if is_done(run, "final") else {}
    return {
        "run_dir": run,
        "saliency_prior": describe_saliency(config.data),
        "stages": stages,
        "final_miou_ms_crf": final.get("miou"),
    }


def format_summary(summary: dict[str, Any]) -> str:
    def cell(value: Any) -> str:
        finite = isinstance(value, float) and math.isfinite(value)
        return f"{100 * value:6.2f}" if finite else f"{'-':>6s}"

    def count(value: Any) -> str:
        return f"{value:6d}" if isinstance(value, int) else f"{'-':>6s}"

    lines = [
        "stage | labels P / R / mIoU (%)   | scored | val mIoU (%) after training on them",
        "------+---------------------------+--------+------------------------------------",
    ]
    for row in summary["stages"]:
        labels = " / ".join(
            cell(row.get(k)) for k in ("label_precision", "label_recall", "label_miou")
        )
        scored = count(row.get("label_scored_images"))
        lines.append(f"{row['stage']:5d} | {labels} | {scored} | {cell(row.get('val_miou'))}")
    final = summary.get("final_miou_ms_crf")
    if isinstance(final, float) and math.isfinite(final):
        lines.append(f"final model, multi-scale + flip + CRF: val mIoU {100 * final:.2f}%")
    if summary.get("saliency_prior"):
        lines.append(f"saliency prior: {summary['saliency_prior']}")
    return "\n".join(lines)
