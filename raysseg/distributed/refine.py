"""The label update between stages, as a Ray Data pipeline.

read manifest -> [actor pool, GPU when present] load the checkpoint once per actor, decode the image once,
run the model at full resolution (CAMs, saliency, A_CT within the memory budget) -> [CPU tasks] saliency CRF,
fusion, atomic PNG writes, per-image statistics -> next manifest + errors table.

Model inference and CRF are separate steps so accelerators never wait on CPU-bound CRFs. Writes are keyed by
image id and atomic, so a rerun skips every image whose labels already exist and never duplicates one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import ray.data
import torch

from raysseg import storage
from raysseg.config import Config, ResourcesConfig, from_dict, to_dict
from raysseg.data import io
from raysseg.data.checks import over_budget, over_budget_phrase
from raysseg.data.manifest import PartWriter, write_manifest
from raysseg.data.transforms import normalize
from raysseg.distributed.datasets import inference_pool_options, read_manifest_dataset
from raysseg.distributed.placement import custom_resources, require_custom_resources
from raysseg.engine.checkpoint import load_checkpoint, restore_model
from raysseg.engine.loop import autocast_for, resolve_amp_dtype
from raysseg.labels.cam import multiscale_cam
from raysseg.labels.finish import (
    ERRORS_SCHEMA,
    OUTPUT_SCHEMA,
    WORKER_MEMORY,
    finalize_row,
    labels_exist,
    pack_arrays,
    present_ids,
    private_memory_mb,
    rows_frame,
    unpack_arrays,
)
from raysseg.labels.update import infer_label_maps
from raysseg.progress import ProgressMeter
from raysseg.rundir import layout

MODES = ("initial", "refine", "ground_truth")


def update_labels(
    config: Config,
    *,
    mode: str,
    checkpoint: str,
    in_manifest: str,
    labels_root: str,
    out_manifest: str,
    errors_path: str,
    saliency_cache: str,
    name: str = "label update",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write one seg + one sal PNG per image under `labels_root` and the next manifest.

    mode: "initial" (multi-scale CAM of the warm-up classifier fused with S0), "refine" (METHOD.md stage
    update with A_CT) or "ground_truth" (the full-supervision baseline: labels from the GT masks).
    Streams: the driver holds counts and one manifest file's rows, never the whole; progress
    lines go to `log` every `resources.progress_seconds`, counted from the output rows as they
    reach the driver. Returns counts: images, written (new this run), skipped (already done),
    errors, seconds, worker_peak_private_mb.
    """
    if mode not in MODES:
        raise ValueError(f"label update mode {mode!r} is not one of {MODES}")
    started = time.perf_counter()
    resources = config.resources
    config_dict = to_dict(config)
    fused = mode != "ground_truth" and crf_in_actors(resources)
    require_custom_resources(resources, _placed_kinds(mode, fused))
    dataset, total = read_manifest_dataset(
        in_manifest, resources.refine_actors, rows_per_batch=resources.refine_batch_size
    )
    if total == 0:
        write_manifest([], out_manifest)
        return {"images": 0, "errors": 0, "written": 0, "skipped": 0, "seconds": 0.0}
    # A rerun of an interrupted update: PNG temp files of killed tasks are never reused, so clear
    # them (local filesystems only; this lists the stage's shards once).
    storage.remove_temp_files(labels_root)
    storage.remove_temp_files(saliency_cache)
    if mode != "ground_truth":
        dataset = dataset.map_batches(
            LabelInference,
            fn_constructor_kwargs={
                "config_dict": config_dict,
                "checkpoint": checkpoint,
                "mode": mode,
                "labels_root": labels_root,
                # Fused: the actor finishes each image itself (no hand-off to CRF tasks).
                "saliency_cache": saliency_cache if fused else None,
            },
            **inference_pool_options(resources),
        )
    if not fused:
        dataset = dataset.map_batches(
            finalize_batch,
            fn_kwargs={
                "config_dict": config_dict,
                "mode": mode,
                "labels_root": labels_root,
                "saliency_cache": saliency_cache,
            },
            batch_size=resources.refine_batch_size,
            num_cpus=resources.crf_cpus,
            resources=custom_resources(resources, "crf"),
            batch_format="pandas",
        )
    meter = ProgressMeter(name, total)
    summary = _run_with_progress(
        lambda: _collect_outputs(dataset, out_manifest, errors_path, meter),
        meter,
        resources.progress_seconds,
        log,
    )
    summary["seconds"] = time.perf_counter() - started
    if over_budget(summary["errors"], summary["images"], resources.error_budget):
        raise RuntimeError(
            f"label update: {summary['errors']} of {summary['images']} images failed, "
            f"{over_budget_phrase(resources.error_budget)}; first: {summary.get('first_error')}; "
            f"all: {errors_path}"
        )
    return summary


def update_stage_labels(
    config: Config, stage: int, *, mode: str, checkpoint: str, in_manifest: str
) -> dict[str, Any]:
    """`update_labels` into the run directory's places of stage `stage`: its labels, manifest and
    errors table, and the run's saliency cache (the pipeline's label steps)."""
    run = config.run_dir
    return update_labels(
        config,
        mode=mode,
        checkpoint=checkpoint,
        in_manifest=in_manifest,
        labels_root=layout.stage_labels(run, stage),
        out_manifest=layout.stage_manifest(run, stage),
        errors_path=layout.stage_errors(run, stage),
        saliency_cache=layout.saliency_cache(run),
        name=f"{layout.stage_folder(stage)} labels",
    )


def crf_in_actors(resources: ResourcesConfig) -> bool:
    """Whether the label update's CRF + fusion + writes run inside the inference actors.

    "auto" fuses them when the actors have no GPU and no `crf_custom` sends CRFs to other nodes:
    separate CRF tasks exist so an accelerator never waits on a CPU-bound CRF; on CPU they only add
    a hand-off (pack, object store, unpack) and a second process per image, measured in
    BENCHMARKS.md.
    """
    if resources.crf_placement != "auto":
        return resources.crf_placement == "actors"
    return resources.refine_gpus_per_actor == 0 and not resources.crf_custom


def _placed_kinds(mode: str, fused: bool) -> list[str]:
    """The kinds of work (placement.custom_resources) a label update schedules."""
    if mode == "ground_truth":
        return ["crf"]
    return ["refine"] if fused else ["refine", "crf"]


def _run_with_progress(
    work: Callable[[], Any],
    meter: ProgressMeter,
    interval: float,
    log: Callable[[str], None],
) -> Any:
    """Run `work` (which updates `meter`) in a thread; print the meter every `interval` seconds
    and once at the end. Returns what `work` returns."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as failure:  # re-raised on the calling thread below
            outcome["failure"] = failure

    thread = threading.Thread(target=target, name="label-update", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=interval)
        if thread.is_alive() or "failure" not in outcome:
            # The clock moves on while no block arrives: elapsed and the rate say so.
            meter.update(meter.done, meter.errors)
            log(meter.line())
    if "failure" in outcome:
        raise outcome["failure"]
    return outcome["result"]


def _collect_outputs(
    dataset: ray.data.Dataset, out_manifest: str, errors_path: str, meter: ProgressMeter
) -> dict:
    """Stream the output rows to the driver, write the next manifest and the errors table, count.

    A row is a few hundred bytes (URIs and statistics; label maps stay on the workers), a
    millionth of what the workers move. Not Ray Data's write_parquet: its Write tasks waited behind
    the actor pool and ran after the last batch, one per block (2.5 s of a 20 s update of 48
    images on one core), and a second pass read the rows back to split the failures off. Both
    outputs are staged beside their places and moved in only once complete; a stale errors table
    of an earlier run is removed. `meter` follows the rows as they arrive: exact counts (a retried
    task's rows arrive once), and no counter actor, whose idle process alone took ~1 % of a core.
    """
    stamp = time.time_ns()
    manifest = PartWriter(f"{out_manifest}.tmp-{stamp}", OUTPUT_SCHEMA)
    errors = None  # opened at the first failure
    counts: dict[str, Any] = {"images": 0, "errors": 0, "written": 0}
    peak_mb = 0.0
    for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        failed = pc.not_equal(block.column("error"), "")
        counts["images"] += block.num_rows
        counts["written"] += pc.sum(block.column("written")).as_py() or 0
        peak_mb = max(peak_mb, pc.max(block.column(WORKER_MEMORY)).as_py() or 0.0)
        if pc.any(failed).as_py():
            failures = block.filter(failed)
            counts.setdefault("first_error", failures.column("error")[0].as_py())
            counts["errors"] += failures.num_rows
            errors = errors or PartWriter(f"{errors_path}.tmp-{stamp}", ERRORS_SCHEMA)
            errors.write(failures)
        manifest.write(block.filter(pc.invert(failed)))
        meter.update(counts["images"], counts["errors"])
    counts["skipped"] = counts["images"] - counts["errors"] - counts["written"]
    storage.delete_dir(errors_path)
    if errors is not None:
        errors.close()
        storage.replace_dir(errors.path, errors_path)
    manifest.close()
    storage.replace_dir(manifest.path, out_manifest)
    counts["worker_peak_private_mb"] = peak_mb
    return counts


class LabelInference:
    """Actor: the stage checkpoint is loaded once; each batch is decoded once and run at full size.

    With `saliency_cache` set (fused, see `crf_in_actors`) the actor also runs the CRF, fusion and
    PNG writes and returns output rows; otherwise it returns the model outputs as one `.npz` payload
    per row for the `finalize_batch` tasks.
    """

    def __init__(
        self,
        config_dict: dict,
        checkpoint: str,
        mode: str,
        labels_root: str,
        saliency_cache: str | None = None,
    ) -> None:
        self.config = from_dict(config_dict)
        self.mode = mode
        self.labels_root = labels_root
        self.saliency_cache = saliency_cache
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # One intra-op thread per CPU this actor reserved: with several actors (and CRF tasks)
            # on a node, torch's default of one thread per core oversubscribes the cores.
            torch.set_num_threads(max(1, int(self.config.resources.refine_cpus_per_actor)))
        self.model = restore_model(load_checkpoint(checkpoint)).to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        # bf16/fp16 on CUDA when optim.amp (the affinity logits stay fp32 inside the model).
        self.amp_dtype = resolve_amp_dtype(self.device, self.config.optim.amp, None)

    def __call__(self, batch):  # pandas.DataFrame -> pandas.DataFrame
        if self.saliency_cache is not None:
            return self._finish_batch(batch)
        payloads, errors, done = [], [], []
        for row in batch.itertuples(index=False):
            arrays, error, labels_done = self._infer_row(row.image_id, row.image_uri, row.labels)
            payloads.append(pack_arrays(**arrays) if arrays else b"")
            errors.append(error)
            done.append(labels_done)
        batch = batch.copy()
        batch["payload"] = payloads
        batch["error"] = errors
        batch["labels_done"] = done
        batch[WORKER_MEMORY] = private_memory_mb()
        return batch

    def _finish_batch(self, batch):
        node_id = ray.get_runtime_context().get_node_id()
        rows = []
        for row in batch.to_dict("records"):
            arrays, error, done = self._infer_row(row["image_id"], row["image_uri"], row["labels"])
            row["error"] = error
            rows.append(
                finalize_row(
                    row,
                    self.config,
                    self.mode,
                    self.labels_root,
                    self.saliency_cache,
                    arrays=arrays,
                    done=done,
                    node_id=node_id,
                )
            )
        return rows_frame(rows)

    def _infer_row(self, image_id: str, image_uri: str, labels: Any) -> tuple[dict, str, bool]:
        """(decoded image + model outputs, error, labels already done) of one image."""
        if labels_exist(self.labels_root, image_id):
            return {}, "", True
        try:
            image = io.read_image(image_uri)
            return {"image": image, **self._infer(image, present_ids(labels))}, "", False
        except Exception as failure:  # recorded per image; the error budget decides
            return {}, f"{image_uri}: {type(failure).__name__}: {failure}", False

    def _infer(self, image: np.ndarray, present: list[int]) -> dict[str, np.ndarray]:
        tensor = normalize(image).to(self.device)
        with autocast_for(self.device, self.amp_dtype):
            return self._infer_maps(tensor, present)

    def _infer_maps(self, tensor: torch.Tensor, present: list[int]) -> dict[str, np.ndarray]:
        if self.mode == "initial":
            labels = self.config.labels
            cams = multiscale_cam(self.model, tensor, present, labels.cam_scales, labels.cam_flip)
            # float16 halves what travels to the CRF step; CAMs are in [0, 1].
            return {"cams": cams.cpu().numpy().astype(np.float16)}
        maps = infer_label_maps(
            self.model, tensor, present, propagate_cams=self.config.labels.propagate_cams
        )
        return {"cams": maps["cams"].astype(np.float16), "sal_prob": maps["sal_prob"]}


def finalize_batch(
    batch,
    config_dict: dict,
    mode: str,
    labels_root: str,
    saliency_cache: str,
):
    """CPU step: CRF + fusion, atomic PNG writes, statistics; one output row per input row."""
    config = from_dict(config_dict)
    node_id = ray.get_runtime_context().get_node_id()
    # Absent in mode ground_truth (no inference step).
    inference_mb = float(batch[WORKER_MEMORY].max()) if WORKER_MEMORY in batch else 0.0
    rows = []
    for row in batch.to_dict("records"):
        arrays = unpack_arrays(row.pop("payload", b"") or b"")
        done = row.pop("labels_done", None)  # absent in mode ground_truth: no inference step
        rows.append(
            finalize_row(
                row,
                config,
                mode,
                labels_root,
                saliency_cache,
                arrays=arrays,
                done=None if done is None else bool(done),
                node_id=node_id,
            )
        )
    return rows_frame(rows, inference_mb)


__all__ = ["MODES", "LabelInference", "finalize_batch", "update_labels", "update_stage_labels"]
