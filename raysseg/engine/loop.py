"""One training epoch, evaluation and test-time prediction as plain functions (no Ray).

Ray Train workers call these with a DDP-wrapped model and a sharded loader; tests call them with a
tiny model on CPU. Mixed precision is used on CUDA only: CPU autocast gains little here and would
make CPU and GPU runs numerically different for no reason.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raysseg.config import LossConfig
from raysseg.engine.metrics import ConfusionMatrix
from raysseg.losses import auxseg_losses

# The training modes, as the stage datasets name them (raysseg.data.dataset.MODES adds "eval").
MODES = ("warmup", "train")
FUSE_MODES = ("max", "mean")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the batch's image ids."""


def resolve_amp_dtype(
    device: torch.device, amp: bool, amp_dtype: torch.dtype | None
) -> torch.dtype | None:
    """The autocast dtype to use, or None when running in full precision (always on CPU)."""
    if not amp or torch.device(device).type != "cuda":
        return None
    if amp_dtype is not None:
        return amp_dtype
    # bf16 keeps fp32's range (no loss scaling needed); fp16 only on GPUs without bf16.
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_grad_scaler(
    device: torch.device, amp: bool, amp_dtype: torch.dtype | None = None
) -> torch.amp.GradScaler | None:
    """A GradScaler when training will run in fp16 on CUDA, else None (bf16 and fp32 need none)."""
    if resolve_amp_dtype(device, amp, amp_dtype) == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def autocast_for(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype` on `device`, or a no-op when dtype is None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _image_ids(batch: dict[str, Any]) -> list[str]:
    ids = batch.get("image_id", [])
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [str(i) for i in ids]


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    # The first group is the backbone's (base) lr; heads run at a fixed multiple of it.
    return float(optimizer.param_groups[0]["lr"])


def _train_step(
    model: nn.Module,
    batch: dict[str, Any],
    device: torch.device,
    loss_weights: LossConfig,
    mode: str,
    amp_dtype: torch.dtype | None,
    sal_binarize: float,
    loss_fn: Callable[..., dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Forward + losses for one batch (no backward)."""
    images = batch["image"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True).float()
    warmup = mode == "warmup"
    sal_target = None if warmup else batch["sal"].to(device, non_blocking=True).float()
    seg_target = None if warmup else batch["seg"].to(device, non_blocking=True).long()
    with autocast_for(device, amp_dtype):
        outputs = model(images, heads="cls" if warmup else "all")
        return loss_fn(
            outputs,
            labels,
            sal_target,
            seg_target,
            w_cls=loss_weights.w_cls,
            w_sal=loss_weights.w_sal,
            w_seg=loss_weights.w_seg,
            sal_binarize=sal_binarize,
        )


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loader: Iterable[dict[str, Any]],
    device: torch.device | str,
    loss_weights: LossConfig,
    mode: str = "train",
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    log_every: int = 0,
    max_steps: int | None = None,
    amp_dtype: torch.dtype | None = None,
    sal_binarize: float = 0.5,
    loss_fn: Callable[..., dict[str, torch.Tensor]] = auxseg_losses,
    on_progress: Callable[[int, int, float], None] | None = None,
    progress_seconds: float = 10.0,
) -> dict[str, float]:
    """Train for one pass over `loader` (or `max_steps` batches); the scheduler steps every batch.

    `on_progress(steps, images, seconds)` is called every `progress_seconds` during the epoch
    (a long epoch would otherwise say nothing until it ends).

    mode "train" trains all heads on the batch's "seg"/"sal" pseudo labels; mode "warmup" (stage 0a)
    runs only the classification branch on the image labels. Returns the mean of every loss term,
    the lr after the last step, "steps", "images", "seconds", "images_per_s" and "unreadable" (items
    that could not be read and were trained on as a stand-in, `StageDataset.skip_unreadable`; with
    "first_unreadable", the first one's error, when there were any).
    Raises NonFiniteLossError naming the step and image ids when the loss is NaN/inf.
    """
    if mode not in MODES:
        raise ValueError(f"train_one_epoch: mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    dtype = resolve_amp_dtype(device, amp, amp_dtype)
    if dtype == torch.float16 and scaler is None:
        # fp16 gradients underflow without loss scaling; keep a scaler for this epoch at least.
        scaler = torch.amp.GradScaler("cuda")
    model.train()
    names: list[str] = []
    sums: torch.Tensor | None = (
        None  # running sums of the loss terms, kept on device (one sync/step)
    )
    steps = images_seen = 0
    unreadable, first_unreadable = 0, ""
    start = time.perf_counter()
    next_progress = start + progress_seconds
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        messages = [message for message in batch.get("unreadable", ()) if message]
        unreadable += len(messages)
        first_unreadable = first_unreadable or next(iter(messages), "")
        losses = _train_step(model, batch, device, loss_weights, mode, dtype, sal_binarize, loss_fn)
        if not names:
            names = list(losses)
        terms = torch.stack([losses[name].detach().float() for name in names])  # (T,)
        if not bool(torch.isfinite(terms).all()):
            values = {name: float(value) for name, value in zip(names, terms.tolist(), strict=True)}
            raise NonFiniteLossError(
                f"non-finite loss at step {steps} ({values}); images: {_image_ids(batch)}"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses["total"].backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        sums = terms if sums is None else sums + terms
        steps += 1
        images_seen += int(batch["image"].shape[0])
        if log_every and steps % log_every == 0:
            shown = ", ".join(
                f"{n}={v:.4f}" for n, v in zip(names, (sums / steps).tolist(), strict=True)
            )
            print(f"[{mode}] step {steps}: {shown}, lr={_current_lr(optimizer):.3g}", flush=True)
        if on_progress is not None and time.perf_counter() >= next_progress:
            on_progress(steps, images_seen, time.perf_counter() - start)
            next_progress = time.perf_counter() + progress_seconds
    seconds = time.perf_counter() - start
    means = {} if sums is None else dict(zip(names, (sums / steps).tolist(), strict=True))
    result = {
        **means,
        "lr": _current_lr(optimizer),
        "steps": steps,
        "images": images_seen,
        "seconds": seconds,
        "images_per_s": images_seen / seconds if seconds > 0 else 0.0,
        "unreadable": unreadable,
    }
    if unreadable:
        result["first_unreadable"] = first_unreadable
    return result


def _segmentation_logits(
    model: nn.Module, images: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Refined segmentation logits upsampled bilinearly to `size`: (B, C, H, W) in float32."""
    outputs = model(images, heads="all")
    logits = outputs.seg_refined.float()  # (B, C, h, w) at feature resolution
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device | str,
    num_classes: int,
    amp: bool = False,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Single-scale mIoU of argmax(refined segmentation) against the batch's "gt" maps.

    Returns {"miou", "iou" (per-class list, NaN for absent classes), "pixel_accuracy", "confusion",
    "unreadable"} (images that could not be read are skipped and counted; see
    `StageDataset.skip_unreadable`). Distributed callers all-reduce `confusion.to_array()` and
    rebuild with `ConfusionMatrix.from_array`.
    """
    device = torch.device(device)
    dtype = resolve_amp_dtype(device, amp, None)
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    unreadable = 0
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        if any(batch.get("unreadable", ())):
            unreadable += 1  # eval batches hold one image (full size)
            continue
        images = batch["image"].to(device, non_blocking=True)
        gt = batch["gt"]  # (B, H, W) int64, 255 = ignore
        with autocast_for(device, dtype):
            logits = _segmentation_logits(model, images, tuple(gt.shape[-2:]))
        confusion.update(logits.argmax(dim=1).cpu(), gt)
    return {
        "miou": confusion.miou(),
        "iou": confusion.iou().tolist(),
        "pixel_accuracy": confusion.pixel_accuracy(),
        "confusion": confusion,
        "unreadable": unreadable,
    }


def fuse_probs(probs: torch.Tensor, fuse: str) -> torch.Tensor:
    """Fuse (K, C, H, W) per-view probabilities to (C, H, W).

    "mean" averages; "max" takes the per-class maximum over views and renormalises over classes so
    the result is still a distribution (the CRF's unary is -log p; the argmax is unchanged by it).
    """
    if fuse == "mean":
        return probs.mean(dim=0)
    if fuse == "max":
        peak = probs.amax(dim=0)
        return peak / peak.sum(dim=0, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    fuse: str = "max",
    amp: bool = False,
) -> torch.Tensor:
    """Test-time class probabilities (C, H, W) for one normalised image (1, 3, H, W).

    Every scale (and its horizontal flip) is predicted, upsampled back to H x W, softmaxed and
    fused by `fuse_probs`. CRF post-processing is the caller's step (raysseg.labels.crf).
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(
            f"predict_probs: expected one image (1, 3, H, W), got {tuple(image.shape)}"
        )
    if fuse not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
    if not scales or any(scale <= 0 for scale in scales):
        raise ValueError(f"predict_probs: scales must be positive, got {tuple(scales)}")
    model.eval()
    device = image.device
    dtype = resolve_amp_dtype(device, amp, None)
    height, width = image.shape[-2:]
    views = []
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = (
            image
            if size == (height, width)
            else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        )
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled  # (1 or 2, 3, h, w)
        with autocast_for(device, dtype):
            logits = _segmentation_logits(model, batch, (height, width))
        probs = logits.softmax(dim=1)  # (1 or 2, C, H, W)
        views.append(probs[0])
        if flip:
            views.append(probs[1].flip(-1))  # undo the flip so pixels line up again
    return fuse_probs(torch.stack(views), fuse)


__all__ = [
    "NonFiniteLossError",
    "evaluate",
    "fuse_probs",
    "make_grad_scaler",
    "predict_probs",
    "resolve_amp_dtype",
    "train_one_epoch",
]
