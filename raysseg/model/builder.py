"""Backbones by name: which class a name builds, and which weights it starts from.

Above the backbone classes (`backbone.py`, `efficientnet.py`) and the weights files (`weights.py`),
so that each of those imports only downwards.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from raysseg.model.backbone import Backbone, DilatedResNet, ResNet38d, SmallBackbone
from raysseg.model.efficientnet import EfficientNetLite0, load_packaged_weights
from raysseg.model.weights import (
    NO_PRETRAINED_WEIGHTS,
    KeyMatch,
    WeightsFile,
    load_backbone_weights,
    match_weights,
    pretrained_choice,
    read_weights,
)

logger = logging.getLogger(__name__)

BACKBONE_NAMES = ("resnet38d", "resnet50", "resnet101", "efficientnet_lite0", "small")


def build_backbone(
    name: str, output_stride: int = 8, pretrained: str | None = "", small_width: int = 64
) -> Backbone:
    """Build a backbone, apply `pretrained` (`load_pretrained`), freeze it.

    name: one of BACKBONE_NAMES; resnet38d and small have output stride 8 only. pretrained: a path
    or URI, "torchvision", "none" (random, warned), "" (the backbone's default weights; an error for
    the ResNets) or None (nothing loaded and nothing said: rebuilding from a checkpoint).
    """
    if name in ("resnet38d", "small") and output_stride != 8:
        raise ValueError(f"backbone '{name}' supports output_stride 8 only, got {output_stride}")
    if name == "resnet38d":
        backbone: Backbone = ResNet38d()
    elif name in ("resnet50", "resnet101"):
        backbone = DilatedResNet(
            depth=int(name.removeprefix("resnet")), output_stride=output_stride
        )
    elif name == "efficientnet_lite0":
        backbone = EfficientNetLite0(output_stride=output_stride)
    elif name == "small":
        backbone = SmallBackbone(width=small_width)
    else:
        raise ValueError(f"unknown backbone '{name}' (known: {', '.join(BACKBONE_NAMES)})")
    backbone.build_args = {"name": name, "output_stride": output_stride, "small_width": small_width}
    load_pretrained(backbone, name, pretrained)
    backbone.freeze()
    return backbone


def load_pretrained(backbone: nn.Module, name: str, pretrained: str | None) -> KeyMatch | None:
    """Apply `pretrained` to a freshly built backbone `name`; returns the match of a file load."""
    choice = pretrained_choice(name, pretrained)
    if choice == "random" and name not in NO_PRETRAINED_WEIGHTS:
        logger.warning(
            "backbone '%s': model.pretrained=none, training from random weights on purpose", name
        )
    elif choice == "packaged":
        load_packaged_weights(backbone)
    elif choice == "torchvision":
        backbone.load_torchvision_weights()
    elif choice == "file":
        return load_backbone_weights(backbone, pretrained.strip())
    return None


def inspect_weights(
    source: str, backbone: str, output_stride: int = 8, small_width: int = 64
) -> tuple[WeightsFile, KeyMatch]:
    """Read `source` and match it against backbone `backbone` as a load would (nothing loaded)."""
    weights = read_weights(source)
    # On the meta device: names and shapes only, no memory for a 4096-channel ResNet-38.
    with torch.device("meta"):
        model = build_backbone(backbone, output_stride, pretrained=None, small_width=small_width)
    return weights, match_weights(model.state_dict(), weights.state)


__all__ = ["BACKBONE_NAMES", "build_backbone", "inspect_weights", "load_pretrained"]
