"""One training stage as a Ray Train (V2) TorchTrainer over the core epoch function.

The driver builds the trainer; `_train_worker` runs on every worker: DDP (gloo on CPU, NCCL on GPU), AMP on
CUDA, poly LR with heads at 10x, a checkpoint every epoch, metrics per epoch, val mIoU at the end.
Rerunning the same stage resumes from its last checkpoint (same RunConfig name + storage path).
"""

from __future__ import annotations

import posixpath
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from torch.utils.data import DataLoader

from raysseg.config import Config, from_dict, to_dict
from raysseg.data.checks import over_budget, over_budget_phrase
from raysseg.data.dataset import EpochSampler, build_stage_dataset, build_train_loader, collate
from raysseg.data.manifest import ManifestRows
from raysseg.data.records import DataError
from raysseg.distributed.placement import require_custom_resources, train_worker_resources
from raysseg.distributed.storage import train_storage, uri_in_storage
from raysseg.distributed.train_progress import ProgressWatcher, open_writer, read_progress
from raysseg.engine.checkpoint import (
    load_checkpoint,
    load_model_state,
    restore_training_state,
    save_checkpoint,
)
from raysseg.engine.loop import evaluate, make_grad_scaler, train_one_epoch
from raysseg.engine.metrics import ConfusionMatrix
from raysseg.engine.optim import PolyLR, build_optimizer, warmup_param_groups
from raysseg.model.network import build_model
from raysseg.rundir import layout
from raysseg.rundir.layout import CHECKPOINT_FILE


@dataclass(frozen=True)
class StageSpec:
    """What one training stage needs; paths are local paths or URIs."""

    name: str  # "warmup", "stage_0", ...
    mode: str  # engine.loop.MODES: "warmup" (classifier only) or "train" (every head)
    train_manifest: str
    val_manifest: str  # "" when there is no validation GT
    init_checkpoint: str  # "" = from the backbone's own initialisation
    epochs: int
    storage_path: str  # Ray Train storage (absolute path or URI)


def train_stage(
    config: Config,
    spec: StageSpec,
    max_failures: int | None = None,
    log: Callable[[str], None] | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Fit one stage on the Ray cluster; return {"checkpoint": uri of checkpoint.pt, "metrics":
    the last epoch's, "history": every epoch's metrics}.

    `max_failures`: worker-group restarts after a crash (None = `resources.max_failures`); each
    restart resumes from the stage's last checkpoint. `log`: where the per-epoch lines and the
    progress ticks go (`label` names the stage in them; default the stage's name).
    """
    resources = config.resources
    if max_failures is None:
        max_failures = resources.max_failures
    require_custom_resources(resources, ["train"])
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": to_dict(config), "spec": spec.__dict__},
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker=train_worker_resources(resources),
        ),
        run_config=RunConfig(
            name=spec.name,
            **train_storage(spec.storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            # The last K per-epoch checkpoints: resuming needs only the newest, and each holds
            # weights and optimizer state. The pipeline copies the final one out before going on.
            checkpoint_config=CheckpointConfig(num_to_keep=resources.keep_checkpoints),
            # Per-report INFO lines drown the pipeline's own progress; warnings still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    progress_path = layout.train_progress(spec.storage_path)
    if log is None:
        result = trainer.fit()
    else:
        with ProgressWatcher(progress_path, label or spec.name, log):
            result = trainer.fit()
    progress = read_progress(progress_path)
    if progress.get("data_error"):
        raise DataError(progress["data_error"])
    if result.checkpoint is None:
        raise RuntimeError(f"stage {spec.name}: training finished without a checkpoint")
    # Ray reports the path inside the storage filesystem ("bucket/run/..." on S3).
    checkpoint_uri = uri_in_storage(
        spec.storage_path, posixpath.join(result.checkpoint.path, CHECKPOINT_FILE)
    )
    history = progress.get("history", [])
    return {"checkpoint": checkpoint_uri, "metrics": dict(result.metrics or {}), "history": history}


def _train_worker(loop_config: dict[str, Any]) -> None:
    config = from_dict(loop_config["config"])
    spec = StageSpec(**loop_config["spec"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.optim.seed + rank)

    model = build_model(config.model)
    if spec.init_checkpoint:
        load_model_state(load_checkpoint(spec.init_checkpoint), model)
    model.to(device)
    warmup = spec.mode == "warmup"
    warmup_lr = config.optim.warmup_lr or config.optim.lr
    groups = warmup_param_groups(model, warmup_lr, config.optim.head_lr_mult) if warmup else None
    optimizer = build_optimizer(model, config.optim, groups=groups)

    loader, sampler = _train_loader(config, spec, rank, world_size)
    scheduler = PolyLR(
        optimizer, total_steps=max(1, spec.epochs * len(loader)), power=config.optim.poly_power
    )
    use_amp = config.optim.amp and device.type == "cuda"
    scaler = make_grad_scaler(device, use_amp)  # None on CPU and with bf16

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(str(Path(folder) / CHECKPOINT_FILE))
        restore_training_state(state, model, optimizer, scheduler, scaler)
        start_epoch = int(state["epoch"])  # epochs finished before the restart

    # Rank 0 alone writes (and reads back) the progress file.
    progress = (
        open_writer(layout.train_progress(spec.storage_path), spec.epochs, start_epoch)
        if rank == 0
        else None
    )

    # Warm-up leaves the seg/sal heads unused: DDP must be told, or it waits for their gradients.
    ddp_model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": warmup}
    )
    for epoch in range(start_epoch, spec.epochs):
        # The global torch RNG (Dropout2d) restarts from (seed, epoch, rank) every epoch, so an epoch
        # replayed after a worker crash draws the same masks as in an uninterrupted run.
        torch.manual_seed(epoch_seed(config.optim.seed, epoch, rank))
        # The sampler tags each index with the epoch, so the (persistent) DataLoader workers draw
        # this epoch's crops; the dataset's own epoch only serves plain integer indices.
        sampler.set_epoch(epoch)

        def tick(steps: int, images: int, seconds: float, epoch: int = epoch) -> None:
            # Rank 0's images times the workers: each worker trains an equal share.
            progress.tick(epoch, steps, len(loader), images * world_size, seconds)

        metrics = train_one_epoch(
            ddp_model,
            optimizer,
            scheduler,
            loader,
            device,
            loss_weights=config.loss,
            mode=spec.mode,
            scaler=scaler,
            amp=use_amp,
            sal_binarize=config.labels.sal_binarize,
            on_progress=tick if progress is not None else None,
            progress_seconds=config.resources.progress_seconds,
        )
        first_unreadable = metrics.get("first_unreadable", "")
        metrics = {**_mean_across_workers(metrics, device), "epoch": epoch, "stage": spec.name}
        # Every rank holds the same summed count, so all of them stop at the same epoch.
        unreadable = int(metrics["unreadable"])
        if over_budget(unreadable, int(metrics["images"]), config.resources.error_budget):
            if progress is not None:
                progress.data_error(
                    f"stage {spec.name}, epoch {epoch + 1}: {unreadable} of "
                    f"{int(metrics['images'])} training images could not be read, "
                    f"{over_budget_phrase(config.resources.error_budget)}; "
                    f"first: {first_unreadable or 'on another worker'}"
                )
            return  # without this epoch's checkpoint: the stage's last one stays the newest
        if epoch == spec.epochs - 1 and spec.val_manifest and not warmup:
            metrics["val_miou"], metrics["val_unreadable"] = _validate(
                model, config, spec.val_manifest, device, rank, world_size
            )
        if progress is not None:
            progress.epoch_done(metrics)
        _report_with_checkpoint(metrics, model, optimizer, scheduler, scaler, epoch, config, rank)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A torch seed for one (run seed, epoch, worker rank): independent streams, reproducible."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _train_loader(
    config: Config, spec: StageSpec, rank: int, world_size: int
) -> tuple[DataLoader, EpochSampler]:
    # The manifest is indexed by row group, never listed: each worker holds one group at a time.
    records = ManifestRows(spec.train_manifest)
    dataset = build_stage_dataset(
        records, spec.mode, config.data, config.model.num_classes, config.optim.seed
    )
    return build_train_loader(
        dataset,
        records.group_sizes(),
        batch_size=config.optim.batch_size,
        num_workers=config.data.num_workers,
        seed=config.optim.seed,
        rank=rank,
        world_size=world_size,
    )


def _mean_across_workers(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over workers (images/s is summed: it is a throughput)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    world = dist.get_world_size()
    summed = {"images", "images_per_s", "unreadable"}
    return {k: v if k in summed else v / world for k, v in zip(keys, values.tolist(), strict=True)}


def _validate(
    model: torch.nn.Module,
    config: Config,
    manifest: str,
    device: torch.device,
    rank: int,
    world_size: int,
) -> tuple[float, int]:
    """(single-scale val mIoU, val images that could not be read and were left out): each worker
    scores its shard, one all-reduce of the confusion matrix and the count."""
    records = ManifestRows(manifest)
    dataset = build_stage_dataset(records, "eval", config.data, config.model.num_classes, 0)
    # A range is a sampler too: this worker's share, in manifest order, without an index list.
    shard = range(rank, len(records), world_size)
    loader = DataLoader(dataset, batch_size=1, sampler=shard, collate_fn=collate)
    confusion, unreadable = ConfusionMatrix(config.model.num_classes), 0
    if len(shard):
        scores = evaluate(model, loader, device, config.model.num_classes)
        confusion, unreadable = scores["confusion"], scores["unreadable"]
    # The count rides in the matrix's all-reduce as one extra element.
    flat = np.append(confusion.to_array().ravel(), unreadable)
    summed = torch.as_tensor(flat, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(summed)
    summed = summed.cpu().numpy()
    matrix = summed[:-1].reshape(confusion.to_array().shape)
    return ConfusionMatrix.from_array(matrix).miou(), int(summed[-1])


def _report_with_checkpoint(
    metrics: dict[str, Any],
    model,
    optimizer,
    scheduler,
    scaler,
    epoch: int,
    config: Config,
    rank: int,
) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_checkpoint(
                str(Path(folder) / CHECKPOINT_FILE),
                model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                epoch=epoch + 1,
                config_dict=to_dict(config),
                extra={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            )
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
