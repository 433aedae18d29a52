"""Pure numpy/OpenCV augmentation and normalisation (deterministic given a numpy Generator).

`train_transform` follows METHOD.md: random scale (bilinear for the image and saliency, nearest for
the label map), random horizontal flip, colour jitter (brightness / contrast / saturation), then a
random crop; where the scaled image is smaller than the crop it is padded with the MEAN COLOUR and
the label map with IGNORE (255), so padding is never supervised as background.

Saliency padding: the saliency map stays in [0, 1] (padded with 0) and the output carries a
boolean `valid` mask, True on real image pixels. A loss that honours `valid` ignores the padding;
one that does not sees the padding as "not salient", which is true of a flat mean-colour border.
(A 255-style sentinel would silently corrupt a BCE target that forgot to check for it.)
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from raysseg.config import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean colour in uint8: what a padded pixel normalises to (almost exactly) zero.
MEAN_COLOR = tuple(round(m * 255) for m in IMAGENET_MEAN)  # (124, 116, 104)

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32) * 255.0
_INV_STD = 1.0 / (np.asarray(IMAGENET_STD, dtype=np.float32) * 255.0)
# ITU-R 601 luma weights, as torchvision's grayscale conversion.
_LUMA = np.asarray((0.299, 0.587, 0.114), dtype=np.float32)


def normalize_array(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) with ImageNet mean/std."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"normalize expects an (H, W, 3) RGB image, got shape {image.shape}")
    scaled = (image.astype(np.float32) - _MEAN) * _INV_STD  # (H, W, 3)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1))


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 tensor (3, H, W) with ImageNet mean/std."""
    return torch.from_numpy(normalize_array(image))


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `normalize`: float (3, H, W) -> uint8 (H, W, 3) RGB (for CRF and figures)."""
    array = tensor.detach().cpu().float().numpy().transpose(1, 2, 0)
    rgb = array / _INV_STD + _MEAN
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """Label map uint8 (H, W) -> int64 tensor; float maps keep float32."""
    if array.dtype == np.uint8 or np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(np.ascontiguousarray(array).astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def jitter_colors(
    image: np.ndarray, brightness: float, contrast: float, saturation: float
) -> np.ndarray:
    """Scale brightness, then contrast (around the mean grey), then saturation (around the grey)."""
    if brightness == contrast == saturation == 1.0:
        return image
    pixels = image.astype(np.float32) * brightness
    grey_mean = float((np.clip(pixels, 0, 255) @ _LUMA).mean())
    pixels = (pixels - grey_mean) * contrast + grey_mean
    grey = (np.clip(pixels, 0, 255) @ _LUMA)[..., None]  # (H, W, 1)
    pixels = (pixels - grey) * saturation + grey
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def _crop_window(size: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(source start, destination start, length) along one axis of a random crop.

    Larger than the crop: a random window of the source. Smaller: the whole source at a random
    offset inside the crop, the rest is padding.
    """
    if size >= crop:
        return int(rng.integers(0, size - crop + 1)), 0, crop
    return 0, int(rng.integers(0, crop - size + 1)), size


def train_transform(
    image: np.ndarray,
    seg: np.ndarray | None,
    sal: np.ndarray | None,
    rng: np.random.Generator,
    crop_size: int,
    scale_min: float,
    scale_max: float,
    flip: bool,
    color_jitter: float,
) -> dict[str, np.ndarray]:
    """Augment an image (and its label / saliency maps) into a crop_size x crop_size crop.

    Inputs: image uint8 (H, W, 3) RGB, seg uint8 (H, W) or None, sal float32 (H, W) or None.
    Returns numpy arrays: "image" uint8 (crop, crop, 3), "valid" bool (crop, crop), and "seg"
    uint8 (255-padded) / "sal" float32 (0-padded) when given. The random draws happen in a fixed
    order whatever the inputs, so one rng state gives one geometry.
    """
    height, width = image.shape[:2]
    for name, extra in (("seg", seg), ("sal", sal)):
        if extra is not None and extra.shape[:2] != (height, width):
            raise ValueError(f"train_transform: {name} shape {extra.shape} != image {image.shape}")

    scale = float(rng.uniform(scale_min, scale_max))
    do_flip = bool(rng.random() < 0.5) and flip
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 wants (w, h)
    if new_size != (width, height):
        image = cv2.resize(image, new_size, interpolation=cv2.INTER_LINEAR)
        if seg is not None:
            seg = cv2.resize(seg, new_size, interpolation=cv2.INTER_NEAREST)
        if sal is not None:
            sal = cv2.resize(sal.astype(np.float32), new_size, interpolation=cv2.INTER_LINEAR)
    if do_flip:
        image = image[:, ::-1]
        seg = seg[:, ::-1] if seg is not None else None
        sal = sal[:, ::-1] if sal is not None else None
    factors = rng.uniform(-1.0, 1.0, size=3) * color_jitter + 1.0  # each in [1 - s, 1 + s]
    image = jitter_colors(np.ascontiguousarray(image), *(float(f) for f in factors))

    scaled_h, scaled_w = image.shape[:2]
    src_y, dst_y, len_y = _crop_window(scaled_h, crop_size, rng)
    src_x, dst_x, len_x = _crop_window(scaled_w, crop_size, rng)
    source = (slice(src_y, src_y + len_y), slice(src_x, src_x + len_x))
    target = (slice(dst_y, dst_y + len_y), slice(dst_x, dst_x + len_x))

    out_image = np.empty((crop_size, crop_size, 3), dtype=np.uint8)
    out_image[:] = np.asarray(MEAN_COLOR, dtype=np.uint8)
    out_image[target] = image[source]
    valid = np.zeros((crop_size, crop_size), dtype=bool)
    valid[target] = True
    result = {"image": out_image, "valid": valid}
    if seg is not None:
        out_seg = np.full((crop_size, crop_size), IGNORE_INDEX, dtype=np.uint8)
        out_seg[target] = seg[source]
        result["seg"] = out_seg
    if sal is not None:
        out_sal = np.zeros((crop_size, crop_size), dtype=np.float32)
        out_sal[target] = sal[source]
        result["sal"] = out_sal
    return result


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MEAN_COLOR",
    "denormalize",
    "jitter_colors",
    "normalize",
    "normalize_array",
    "to_tensor",
    "train_transform",
]
