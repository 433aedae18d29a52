"""Class activation maps: per-class normalisation and multi-scale / flip extraction.

The model returns RAW CAMs (the classifier's 1x1 weights applied to the features); the ReLU and the
division by the spatial maximum happen here, as METHOD.md "Stages" describes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CAM_EPS = 1e-5  # keeps an all-zero CAM at 0 instead of NaN


def normalize_cam(cam: torch.Tensor) -> torch.Tensor:
    """Per-class ReLU, then division by the spatial max (+1e-5): (K, h, w) -> (K, h, w) in [0,1]."""
    if cam.dim() != 3:
        raise ValueError(
            f"normalize_cam: expected a (K, h, w) tensor, got shape {tuple(cam.shape)}"
        )
    positive = F.relu(cam)
    peak = positive.flatten(1).amax(dim=1)  # (K,)
    return positive / (peak[:, None, None] + CAM_EPS)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def present_indices(present: Sequence[int], device: torch.device) -> torch.Tensor:
    """Foreground class ids (1..C-1) -> channel indices of the (B, C-1, h, w) CAM."""
    ids = [int(c) for c in present]
    if any(c < 1 for c in ids):
        raise ValueError(f"present classes must be foreground ids >= 1, got {ids}")
    return torch.tensor([c - 1 for c in ids], dtype=torch.long, device=device)


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else fallback


def multiscale_cam(
    model: nn.Module,
    image: torch.Tensor,
    present: Sequence[int],
    scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
    flip: bool = True,
) -> torch.Tensor:
    """CAMs of the present classes, summed over scales (and flips), normalised to [0, 1].

    image: (3, H, W) normalised float tensor. Returns a float32 (K, H, W) tensor on the CPU, K =
    len(present), channel k belonging to class present[k]. Each scale's ReLU'd CAM is upsampled to
    (H, W) before summing, so every scale votes at full resolution.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"multiscale_cam: expected a (3, H, W) image, got {tuple(image.shape)}")
    height, width = image.shape[1:]
    device = model_device(model, image.device)
    channels = present_indices(present, device)
    total = torch.zeros((len(channels), height, width), dtype=torch.float32, device=device)
    if len(channels) == 0:
        return total.cpu()
    batch = image.to(device=device, dtype=torch.float32)[None]  # (1, 3, H, W)
    if flip:
        # One forward per scale: the image and its mirror image side by side in the batch.
        batch = torch.cat([batch, batch.flip(-1)])  # (2, 3, H, W)
    with eval_mode(model), torch.inference_mode():
        for scale in scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
            cam = model(scaled, heads="cls").cam[:, channels].float()  # (B, K, h, w)
            cam = F.interpolate(
                F.relu(cam), size=(height, width), mode="bilinear", align_corners=False
            )
            total += cam[0]
            if flip:
                total += cam[1].flip(-1)  # mirror back before adding
    peak = total.flatten(1).amax(dim=1)
    return (total / (peak[:, None, None] + CAM_EPS)).cpu()
