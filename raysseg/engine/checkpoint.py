"""One-file checkpoints: weights, the model's own constructor arguments, optional training state.

The file holds only tensors and plain containers, so it loads with `torch.load(weights_only=True)`
(no pickled code runs on load), and it carries `model.model_args()` so that the checkpoint alone
rebuilds the network (nanoGPT's habit) -- label-update actors need nothing else.
Paths are local paths or object-store URIs (`raysseg.storage`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysseg import storage
from raysseg.errors import InputError
from raysseg.model.network import build_model_from_args
from raysseg.model.weights import CHECKPOINT_FORMAT as FORMAT
from raysseg.model.weights import strip_wrapper_prefixes


class CheckpointError(InputError, RuntimeError):
    """A checkpoint file is missing, unreadable or incomplete; the message names the path."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int = 0,
    config_dict: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str | Path:
    """Write one checkpoint file atomically (local: temp file + fsync + rename; object store: one
    upload); a reader sees either the old checkpoint or the new one. Returns `path` as given.

    `epoch` is the number of finished epochs; `extra` holds plain values (metrics, stage index).
    """
    inner = unwrap_model(model)
    payload = {
        "format": FORMAT,
        "model_args": inner.model_args(),
        "model_state": strip_wrapper_prefixes(inner.state_dict()),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "epoch": int(epoch),
        "config": config_dict,
        "extra": extra or {},
    }
    storage.write_atomic(os.fspath(path), lambda stream: torch.save(payload, stream), durable=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; errors name the path. Adds "path" to the dict."""
    path = os.fspath(path)
    try:
        source = storage.seekable_source(path)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint '{path}': file not found") from error
    try:
        checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint '{path}': cannot be read ({error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}': not a raysseg checkpoint (expected {FORMAT})")
    for key in ("model_args", "model_state"):
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint '{path}': missing '{key}'")
    checkpoint["path"] = path
    return checkpoint


def _where(checkpoint: dict[str, Any]) -> str:
    return f"checkpoint '{checkpoint.get('path', '<in memory>')}'"


def restore_model(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network from the checkpoint's own arguments and weights (CPU, eval mode)."""
    model = build_model_from_args(dict(checkpoint["model_args"]))
    load_model_state(checkpoint, model)
    return model.eval()


def load_model_state(checkpoint: dict[str, Any], model: nn.Module) -> None:
    """Load the checkpoint's weights into `model` (plain or wrapped), strictly."""
    try:
        unwrap_model(model).load_state_dict(strip_wrapper_prefixes(checkpoint["model_state"]))
    except RuntimeError as error:
        raise CheckpointError(
            f"{_where(checkpoint)}: weights do not fit the model ({error})"
        ) from error


def restore_training_state(
    checkpoint: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """Restore weights and whatever training state is given; returns the saved epoch count.

    Asking to restore a part the checkpoint does not hold is an error (silently restarting an
    optimizer or schedule would change the run without notice).
    """
    load_model_state(checkpoint, model)
    parts = (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler))
    for key, target in parts:
        if target is None:
            continue
        state = checkpoint.get(key)
        if state is None:
            raise CheckpointError(f"{_where(checkpoint)}: holds no '{key}' state to restore")
        target.load_state_dict(state)
    return int(checkpoint.get("epoch", 0))


__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_model_state",
    "restore_model",
    "restore_training_state",
    "save_checkpoint",
    "strip_wrapper_prefixes",
    "unwrap_model",
]
