"""Backbones: wide ResNet-38 (`resnet38d`), dilated torchvision ResNet-50/101, a small test net.

Every backbone keeps its batch norm frozen (eval mode, no affine gradients) for good: the training
batches (4 crops) are far too small to estimate statistics, so the pretrained ones are kept.
`.train()` puts the rest of the network in training mode (dropout) and batch norm back into eval.
The first convolution of the ResNets is frozen as well (it sees raw pixels; fine-tuning it on a few
thousand images only hurts).

Weights files and the meaning of `pretrained` belong to `raysseg.model.weights`: a file or URI the
user names, `"torchvision"` (torchvision's weights API, network access, only when asked), `"none"`
(random on purpose), empty (the backbone's default), or None (nothing loaded: weights come later).
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from raysseg.model.weights import WeightsFile, load_state

logger = logging.getLogger(__name__)


class Backbone(nn.Module):
    """Base class: `forward(x) -> (B, out_channels, H/os, W/os)` with frozen batch norm."""

    def __init__(self, out_channels: int, output_stride: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.output_stride = output_stride
        # Plain keyword arguments of `build_backbone` (without weights) so a checkpoint rebuilds it.
        self.build_args: dict[str, Any] = {}

    def frozen_input_modules(self) -> list[nn.Module]:
        """Modules frozen besides batch norm (the first convolution); subclasses override."""
        return []

    def frozen_parameter_names(self) -> list[str]:
        """Names of the parameters that never train: all batch norm affines and the frozen stem."""
        frozen_ids = {
            id(p)
            for module in self.modules()
            if isinstance(module, _BatchNorm) or module in self.frozen_input_modules()
            for p in module.parameters(recurse=False)
        }
        return [name for name, p in self.named_parameters() if id(p) in frozen_ids]

    def freeze(self) -> None:
        """Stop gradients into the frozen parameters and put batch norm into eval mode."""
        frozen = set(self.frozen_parameter_names())
        for name, parameter in self.named_parameters():
            if name in frozen:
                parameter.requires_grad_(False)
        self._batch_norm_to_eval()

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        self._batch_norm_to_eval()
        return self

    def _batch_norm_to_eval(self) -> None:
        for module in self.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


# --------------------------------------------------------------------------------------------
# Wide ResNet-38 ("resnet38d", the backbone of PSA/AffinityNet and AuxSegNet).
# Module names follow the converted ImageNet weights used by that family of papers (conv1a, b2,
# b2_1, ..., bn7 and bn_branch2a / conv_branch2a / ... inside blocks), so such a state dict loads.
# --------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU shared by both branches, two 3x3 convs on the main branch."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(
            in_channels,
            mid_channels,
            kernel_size=3,
            stride=stride,
            padding=first_dilation,
            dilation=first_dilation,
            bias=False,
        )
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(
            mid_channels,
            out_channels,
            kernel_size=3,
            padding=dilation,
            dilation=dilation,
            bias=False,
        )
        needs_projection = in_channels != out_channels or stride != 1
        self.conv_branch1 = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
            if needs_projection
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(activated)
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch)))
        return shortcut + branch


class WideBottleneckBlock(nn.Module):
    """Pre-activation bottleneck (1x1 -> dilated 3x3 -> 1x1) with channel dropout (stages 6-7)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int, dropout: float) -> None:
        super().__init__()
        quarter, half = out_channels // 4, out_channels // 2
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, quarter, kernel_size=1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(quarter)
        self.dropout_2b1 = nn.Dropout2d(p=dropout)
        self.conv_branch2b1 = nn.Conv2d(
            quarter, half, kernel_size=3, padding=dilation, dilation=dilation, bias=False
        )
        self.bn_branch2b2 = nn.BatchNorm2d(half)
        self.dropout_2b2 = nn.Dropout2d(p=dropout)
        self.conv_branch2b2 = nn.Conv2d(half, out_channels, kernel_size=1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(activated)
        branch = self.conv_branch2a(activated)
        branch = self.dropout_2b1(F.relu(self.bn_branch2b1(branch)))
        branch = self.conv_branch2b1(branch)
        branch = self.dropout_2b2(F.relu(self.bn_branch2b2(branch)))
        return shortcut + self.conv_branch2b2(branch)


class ResNet38d(Backbone):
    """Wide ResNet-38, output stride 8: stage 5 dilated 2, two bottlenecks dilated 4, 4096 out."""

    def __init__(self) -> None:
        super().__init__(out_channels=4096, output_stride=8)
        self.conv1a = nn.Conv2d(3, 64, kernel_size=3, padding=1, bias=False)
        # Three stride-2 stages give the output stride of 8.
        self.b2 = WideBasicBlock(64, 128, 128, stride=2)
        self.b2_1 = WideBasicBlock(128, 128, 128)
        self.b2_2 = WideBasicBlock(128, 128, 128)
        self.b3 = WideBasicBlock(128, 256, 256, stride=2)
        self.b3_1 = WideBasicBlock(256, 256, 256)
        self.b3_2 = WideBasicBlock(256, 256, 256)
        self.b4 = WideBasicBlock(256, 512, 512, stride=2)
        self.b4_1 = WideBasicBlock(512, 512, 512)
        self.b4_2 = WideBasicBlock(512, 512, 512)
        self.b4_3 = WideBasicBlock(512, 512, 512)
        self.b4_4 = WideBasicBlock(512, 512, 512)
        self.b4_5 = WideBasicBlock(512, 512, 512)
        # Stage 5 keeps the resolution and dilates instead of striding.
        self.b5 = WideBasicBlock(512, 512, 1024, dilation=2, first_dilation=1)
        self.b5_1 = WideBasicBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = WideBasicBlock(1024, 512, 1024, dilation=2)
        self.b6 = WideBottleneckBlock(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = WideBottleneckBlock(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        self.stages = [
            self.b2, self.b2_1, self.b2_2, self.b3, self.b3_1, self.b3_2,
            self.b4, self.b4_1, self.b4_2, self.b4_3, self.b4_4, self.b4_5,
            self.b5, self.b5_1, self.b5_2, self.b6, self.b7,
        ]  # fmt: skip

    def frozen_input_modules(self) -> list[nn.Module]:
        return [self.conv1a]

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1a(x)
        for block in self.stages:
            x = block(x)
        return F.relu(self.bn7(x))  # (B, 4096, H/8, W/8)


# --------------------------------------------------------------------------------------------
# torchvision ResNet-50/101 with dilation; attribute names match torchvision's state dicts.
# --------------------------------------------------------------------------------------------


class DilatedResNet(Backbone):
    """torchvision ResNet without its classifier; stride of the last stages replaced by dilation."""

    def __init__(self, depth: int, output_stride: int) -> None:
        super().__init__(out_channels=2048, output_stride=output_stride)
        import torchvision  # lazily: the other backbones do not need it

        if depth not in (50, 101):
            raise ValueError(f"DilatedResNet: depth must be 50 or 101, got {depth}")
        if output_stride not in (8, 16):
            raise ValueError(f"resnet{depth}: output_stride must be 8 or 16, got {output_stride}")
        dilate = [False, True, True] if output_stride == 8 else [False, False, True]
        factory = torchvision.models.resnet50 if depth == 50 else torchvision.models.resnet101
        net = factory(weights=None, replace_stride_with_dilation=dilate)
        self.depth = depth
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def frozen_input_modules(self) -> list[nn.Module]:
        return [self.conv1]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x  # (B, 2048, H/os, W/os)

    def load_torchvision_weights(self) -> None:
        """Download ImageNet weights through torchvision (network); only when the user asks."""
        import torchvision

        enum = (
            torchvision.models.ResNet50_Weights
            if self.depth == 50
            else torchvision.models.ResNet101_Weights
        )
        state = enum.IMAGENET1K_V1.get_state_dict(progress=True)
        load_state(self, WeightsFile(f"torchvision {enum.__name__}", "torchvision", state))


# --------------------------------------------------------------------------------------------
# Small backbone for tests and CPU demos.
# --------------------------------------------------------------------------------------------


def _conv_gn_relu(in_channels: int, out_channels: int, stride: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
        ),
        # GroupNorm, not frozen batch norm: this backbone trains from scratch, so its normalisation
        # must learn; it is also independent of the (small, per-worker) batch size under DDP.
        nn.GroupNorm(num_groups=min(8, out_channels), num_channels=out_channels),
        nn.ReLU(inplace=True),
    )


class SmallBackbone(Backbone):
    """Six conv-GroupNorm-ReLU blocks, total stride 8, the last one dilated.

    For tests and CPU demos: no pretrained weights exist for it, so nothing in it is frozen. It trains
    in seconds to minutes on CPU at 64-128 px.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__(out_channels=width, output_stride=8)
        if width < 2:
            raise ValueError(f"small backbone: small_width must be >= 2, got {width}")
        half = max(1, width // 2)
        self.blocks = nn.Sequential(
            _conv_gn_relu(3, half, stride=2, dilation=1),
            _conv_gn_relu(half, half, stride=1, dilation=1),
            _conv_gn_relu(half, width, stride=2, dilation=1),
            _conv_gn_relu(width, width, stride=1, dilation=1),
            _conv_gn_relu(width, width, stride=2, dilation=1),
            _conv_gn_relu(width, width, stride=1, dilation=2),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)  # (B, width, H/8, W/8)


__all__ = [
    "Backbone",
    "DilatedResNet",
    "ResNet38d",
    "SmallBackbone",
]
