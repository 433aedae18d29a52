"""The AuxSegNet stage loop: runs the steps of `rundir.steps.plan_steps` in order, resumably.

manifests -> warm-up -> initial labels -> (train -> update labels) x K -> final evaluation. Every step
writes its outputs, then its done marker (JSON with its results) last; a rerun of the same command skips
finished steps and resumes the unfinished one (Ray Train resumes from the stage's last checkpoint, the
label update skips images already labelled). Where each step reads and writes is `raysseg.rundir`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

from raysseg import storage
from raysseg.config import Config, ConfigError, to_flat_dict
from raysseg.distributed.evaluate import evaluate_checkpoint, label_quality
from raysseg.distributed.manifests import build_manifests
from raysseg.distributed.refine import update_stage_labels
from raysseg.distributed.train import StageSpec, train_stage
from raysseg.engine.metrics import as_percent
from raysseg.labels.saliency import describe_saliency, resolve_saliency
from raysseg.model.weights import check_pretrained
from raysseg.rundir import layout
from raysseg.rundir.markers import is_done, read_result, write_result
from raysseg.rundir.prepare import prepare_run_dir
from raysseg.rundir.runlog import RunLog
from raysseg.rundir.steps import (
    FINAL,
    WARMUP,
    Step,
    StepKind,
    init_step,
    label_step,
    plan_steps,
    step_checkpoint,
    step_train_storage,
    train_step,
)
from raysseg.tracking import Tracker, open_tracker


def run_pipeline(
    config: Config, full_supervision: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) every step; return the per-stage summary that is also saved as metrics.json."""
    check_pretrained(config.model)  # before anything is written: no run on silently random weights
    run_log = RunLog(_absolute_run_dir(config).run_dir, log)
    config = resolve_run_config(config, run_log)
    prepare_run_dir(config)
    steps = plan_steps(config, full_supervision)
    with open_tracker(config.run_dir, params=to_flat_dict(config), log=run_log) as tracker:
        for index, step in enumerate(steps, start=1):
            try:
                result = run_step(
                    config, step, f"[{index}/{len(steps)}]", run_log, full_supervision
                )
            finally:
                run_log.flush()  # after every step, a failed one's lines too
            track_step(tracker, step, result)
    summary = summarize(config)
    storage.write_bytes_atomic(
        layout.metrics_file(config.run_dir), json.dumps(summary, indent=2).encode()
    )
    run_log(format_summary(summary))
    run_log.flush()
    return summary


def track_step(tracker: Tracker, step: Step, result: dict[str, Any]) -> None:
    """A step's curves for TensorBoard (and MLflow): a training's epochs, a label step's quality.
    Steps done earlier are replayed from their markers; the tracker skips what it logged."""
    for row in result.get("history", []):
        tracker.epoch(step.name, int(row["epoch"]), row, stage=step.stage)
    if step.label_stage is not None:
        tracker.labels(step.label_stage, result)
    tracker.flush()


def run_single_step(config: Config, step: Step, log: Callable[[str], None] = print) -> dict:
    """Run one step (e.g. `train_step(1)`); its predecessors must be done."""
    config = resolve_run_config(config, log)
    prepare_run_dir(config)
    steps = plan_steps(config, full_supervision=False)
    if step not in steps:
        names = ", ".join(s.name for s in steps)
        raise ConfigError(f"unknown step '{step.name}' for this config (steps: {names})")
    position = steps.index(step)
    missing = [s.name for s in steps[:position] if not is_done(config.run_dir, s)]
    if missing:
        raise RuntimeError(f"step '{step.name}' needs these steps first: {', '.join(missing)}")
    return run_step(config, step, "[1/1]", log)


def run_step(
    config: Config,
    step: Step,
    counter: str,
    log: Callable[[str], None],
    full_supervision: bool = False,
) -> dict:
    """Run `step` unless its marker says it is done; write the marker; return its results."""
    if is_done(config.run_dir, step):
        log(f"{counter} {step.name}: done earlier, skipped")
        return read_result(config.run_dir, step)
    log(f"{counter} {step.name}: running")
    started = time.perf_counter()
    result = _execute(config, step, full_supervision, log)
    result["seconds"] = round(time.perf_counter() - started, 2)
    write_result(config.run_dir, step, result)
    log(f"{counter} {step.name}: finished in {result['seconds']:.1f} s {_brief(result)}")
    return result


def _brief(result: dict[str, Any]) -> str:
    keys = ("train_images", "val_images", "problems", "images", "written", "errors", "unreadable")
    keys += ("label_miou", "label_scored_images", "val_miou", "miou")
    shown = {k: result[k] for k in keys if k in result}
    return " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
    )


def _absolute_run_dir(config: Config) -> Config:
    if storage.is_uri(config.run_dir):
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


# ----------------------------------------------------------------------------------------------
# The steps


def _execute(
    config: Config, step: Step, full_supervision: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    run = config.run_dir
    if step.kind is StepKind.MANIFEST:
        return build_manifests(config, log)
    if step.kind is StepKind.WARMUP:
        return _train_step(config, step, None, log)
    if step.kind is StepKind.LABELS:
        if full_supervision:
            return _labels_step(config, step.label_stage, "ground_truth", "", log)
        return _labels_step(config, step.label_stage, "initial", step_checkpoint(run, WARMUP), log)
    if step.kind is StepKind.TRAIN:
        # The baseline trains every stage on the GT labels of stage 0.
        return _train_step(config, step, 0 if full_supervision else step.stage, log)
    if step.kind is StepKind.REFINE:
        checkpoint = step_checkpoint(run, train_step(step.stage))
        return _labels_step(config, step.label_stage, "refine", checkpoint, log)
    return _final_step(config)


def _train_step(
    config: Config, step: Step, label_stage: int | None, log: Callable[[str], None]
) -> dict:
    """A training step: the warm-up on image labels (label_stage None), or stage k on the
    labels of stage `label_stage`; its epochs are printed as they finish."""
    run = config.run_dir
    warmup = step.kind is StepKind.WARMUP
    train_manifest = (
        layout.dataset_manifest(run, "train") if warmup else layout.stage_manifest(run, label_stage)
    )
    val_manifest = layout.dataset_manifest(run, "val")
    spec = StageSpec(
        name=layout.WARMUP_FOLDER if warmup else layout.stage_folder(step.stage),
        mode="warmup" if warmup else "train",
        train_manifest=train_manifest,
        val_manifest=val_manifest if storage.exists(val_manifest) else "",
        init_checkpoint="" if warmup else step_checkpoint(run, init_step(step.stage)),
        epochs=config.optim.warmup_epochs if warmup else config.optim.epochs,
        storage_path=step_train_storage(run, step),
    )
    result = train_stage(config, spec, log=log, label=step.name)
    final = step_checkpoint(run, step)
    storage.copy_file(result["checkpoint"], final)
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    return {"checkpoint": final, **metrics, "history": result["history"]}


def _labels_step(
    config: Config, stage: int, mode: str, checkpoint: str, log: Callable[[str], None]
) -> dict:
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
        label_mismatched_masks=quality["mismatched_masks"],
    )
    if quality["mismatched_masks"]:
        log(
            f"{layout.stage_folder(stage)} label quality: {quality['mismatched_masks']} GT mask(s) "
            f"not scored, of another size than their pseudo label; first: "
            f"{quality['first_mismatch']}"
        )
    return summary


def _final_step(config: Config) -> dict:
    val_manifest = layout.dataset_manifest(config.run_dir, "val")
    if not storage.exists(val_manifest):
        return {"miou": float("nan"), "note": "no validation ground truth"}
    last = train_step(config.stages.count - 1)
    result = evaluate_checkpoint(
        config, step_checkpoint(config.run_dir, last), multiscale=True, crf=True
    )
    kept = ("miou", "iou", "table", "unreadable", "first_unreadable")
    return {key: result[key] for key in kept if key in result}


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
        for step, keys in ((label_step(stage), label_keys), (train_step(stage), ("val_miou",))):
            if is_done(run, step):
                result = read_result(run, step)
                row.update({k: result[k] for k in keys if k in result})
        stages.append(row)
    final = read_result(run, FINAL) if is_done(run, FINAL) else {}
    return {
        "run_dir": run,
        "saliency_prior": describe_saliency(config.data),
        "stages": stages,
        "final_miou_ms_crf": final.get("miou"),
    }


def format_summary(summary: dict[str, Any]) -> str:
    def count(value: Any) -> str:
        return f"{value:6d}" if isinstance(value, int) else f"{'-':>6s}"

    lines = [
        "stage | labels P / R / mIoU (%)   | scored | val mIoU (%) after training on them",
        "------+---------------------------+--------+------------------------------------",
    ]
    for row in summary["stages"]:
        labels = " / ".join(
            as_percent(row.get(k), 6) for k in ("label_precision", "label_recall", "label_miou")
        )
        scored = count(row.get("label_scored_images"))
        lines.append(
            f"{row['stage']:5d} | {labels} | {scored} | {as_percent(row.get('val_miou'), 6)}"
        )
    final = summary.get("final_miou_ms_crf")
    if isinstance(final, float) and math.isfinite(final):
        lines.append(f"final model, multi-scale + flip + CRF: val mIoU {as_percent(final)}%")
    if summary.get("saliency_prior"):
        lines.append(f"saliency prior: {summary['saliency_prior']}")
    return "\n".join(lines)
