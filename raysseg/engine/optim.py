"""SGD with per-group learning rates and the poly schedule.

The reference implementation passed SGD's arguments positionally and so trained with momentum 1e-5
and no weight decay; everything here goes into torch by keyword, and the `reference` config preset
reproduces that optimiser on purpose when wanted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from raysseg.config import OptimConfig
from raysseg.engine.checkpoint import unwrap_model


def _param_groups_of(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict[str, Any]]:
    # A DDP wrapper does not forward attribute access; the groups live on the wrapped model.
    return unwrap_model(model).param_groups(lr=lr, head_lr_mult=head_lr_mult)


def restrict_param_groups(
    groups: list[dict[str, Any]], keep: Iterable[torch.Tensor]
) -> list[dict[str, Any]]:
    """The same groups (same lr) holding only the parameters in `keep`; empty groups are dropped."""
    keep_ids = {id(param) for param in keep}
    restricted = []
    for group in groups:
        params = [param for param in group["params"] if id(param) in keep_ids]
        if params:
            restricted.append({**group, "params": params})
    return restricted


def warmup_param_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict[str, Any]]:
    """Stage 0a groups: backbone at `lr`, classification head at `lr * head_lr_mult`, nothing else.

    Uses the model's `backbone` and `classifier` sub-modules (AuxSegNet's names). The segmentation /
    saliency / affinity heads are left out so the optimiser cannot touch them (nor can weight decay
    shrink them) before stage 0 starts.
    """
    inner = unwrap_model(model)
    for name in ("backbone", "classifier"):
        if not isinstance(getattr(inner, name, None), nn.Module):
            raise ValueError(f"warmup_param_groups: the model has no '{name}' sub-module")
    keep = [*inner.backbone.parameters(), *inner.classifier.parameters()]
    return restrict_param_groups(_param_groups_of(inner, lr, head_lr_mult), keep)


def build_optimizer(
    model: nn.Module,
    optim_config: OptimConfig,
    head_lr_mult: float | None = None,
    groups: list[dict[str, Any]] | None = None,
) -> torch.optim.SGD:
    """SGD over `model.param_groups(lr, head_lr_mult)`, or over `groups` (e.g. the warm-up ones).

    head_lr_mult defaults to optim_config.head_lr_mult (10 in the paper: heads learn 10x faster).
    """
    mult = optim_config.head_lr_mult if head_lr_mult is None else head_lr_mult
    if groups is None:
        groups = _param_groups_of(model, optim_config.lr, mult)
    if not groups or not any(group["params"] for group in groups):
        raise ValueError("build_optimizer: no trainable parameters in the given groups")
    return torch.optim.SGD(
        groups,
        lr=optim_config.lr,
        momentum=optim_config.momentum,
        weight_decay=optim_config.weight_decay,
    )


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """lr = base_lr * (1 - step / total_steps) ** power for every group, stepped once per iteration.

    Each group decays from its own base lr, so heads at 10x stay at 10x the backbone's lr.
    The value is computed in closed form from the step count, so a restored state dict continues at
    exactly the lr an uninterrupted run would have (and the lr reaches 0 at `total_steps`).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"PolyLR: total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.power = power
        super().__init__(optimizer, last_epoch=-1)

    def factor(self, step: int) -> float:
        progress = min(max(step, 0), self.total_steps) / self.total_steps
        return (1.0 - progress) ** self.power

    def get_lr(self) -> list[float]:
        # `last_epoch` counts scheduler steps (iterations here, not epochs).
        scale = self.factor(self.last_epoch)
        return [base_lr * scale for base_lr in self.base_lrs]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Put the restored lr into the optimizer too, in case its own state was not restored after.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


__all__ = ["PolyLR", "build_optimizer", "restrict_param_groups", "warmup_param_groups"]
