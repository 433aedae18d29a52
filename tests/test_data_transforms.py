"""raysseg.data.transforms: crop geometry, padding values, alignment, determinism."""

from __future__ import annotations

import numpy as np
import torch

from raysseg.config import IGNORE_INDEX
from raysseg.data.transforms import (
    IMAGENET_MEAN,
    MEAN_COLOR,
    denormalize,
    jitter_colors,
    normalize,
    train_transform,
)


def _inputs(height=30, width=40):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    seg = rng.integers(0, 5, size=(height, width), dtype=np.uint8)
    sal = rng.random((height, width), dtype=np.float32)
    return image, seg, sal


def _transform(image, seg, sal, seed, **overrides):
    settings = dict(crop_size=24, scale_min=0.7, scale_max=1.3, flip=True, color_jitter=0.3)
    settings.update(overrides)
    return train_transform(image, seg, sal, np.random.default_rng(seed), **settings)


def test_output_shapes_equal_crop():
    image, seg, sal = _inputs()
    for seed in range(5):
        out = _transform(image, seg, sal, seed, crop_size=24)
        assert out["image"].shape == (24, 24, 3) and out["image"].dtype == np.uint8
        assert out["seg"].shape == (24, 24) and out["seg"].dtype == np.uint8
        assert out["sal"].shape == (24, 24) and out["sal"].dtype == np.float32
        assert out["valid"].shape == (24, 24) and out["valid"].dtype == bool


def test_padding_uses_mean_colour_and_ignore():
    image, seg, sal = _inputs(10, 12)
    out = _transform(image, seg, sal, seed=1, crop_size=32, scale_min=1.0, scale_max=1.0)
    pad = ~out["valid"]
    assert pad.sum() == 32 * 32 - 10 * 12  # no scaling: exactly the image area is valid
    assert (out["image"][pad] == np.asarray(MEAN_COLOR, np.uint8)).all()
    assert (out["seg"][pad] == IGNORE_INDEX).all()
    assert (out["sal"][pad] == 0).all()
    assert (out["seg"][out["valid"]] != IGNORE_INDEX).all()  # real pixels keep their labels
    assert tuple(round(m * 255) for m in IMAGENET_MEAN) == MEAN_COLOR


def test_flip_keeps_image_and_labels_aligned():
    # seg = a function of the pixel colour, so alignment survives any flip/crop (no scaling).
    image, _, _ = _inputs(20, 20)
    seg = (image[..., 0] // 64).astype(np.uint8)  # 0..3
    sal = image[..., 1].astype(np.float32) / 255.0
    flips = set()
    for seed in range(12):
        out = _transform(
            image, seg, sal, seed, crop_size=16, scale_min=1.0, scale_max=1.0, color_jitter=0.0
        )
        np.testing.assert_array_equal(out["seg"], out["image"][..., 0] // 64)
        np.testing.assert_allclose(out["sal"], out["image"][..., 1] / 255.0, atol=1e-6)
        # Was this crop flipped? Find the crop in the original or in its mirror image.
        flips.add(_is_flipped_crop(image, out["image"]))
    assert flips == {True, False}  # both branches were exercised


def _is_flipped_crop(image: np.ndarray, crop: np.ndarray) -> bool:
    size = crop.shape[0]
    for candidate, flipped in ((image, False), (image[:, ::-1], True)):
        for y in range(image.shape[0] - size + 1):
            for x in range(image.shape[1] - size + 1):
                if np.array_equal(candidate[y : y + size, x : x + size], crop):
                    return flipped
    raise AssertionError("crop not found in the image or its mirror")


def test_scaling_uses_nearest_for_labels():
    image, seg, sal = _inputs()
    out = _transform(image, seg, sal, seed=3, scale_min=1.27, scale_max=1.3, crop_size=24)
    assert set(np.unique(out["seg"])) <= set(np.unique(seg)) | {IGNORE_INDEX}


def test_deterministic_given_rng():
    image, seg, sal = _inputs()
    first = _transform(image, seg, sal, seed=42)
    second = _transform(image, seg, sal, seed=42)
    other = _transform(image, seg, sal, seed=43)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def test_same_geometry_with_or_without_labels_and_jitter():
    image, seg, sal = _inputs()
    with_labels = _transform(image, seg, sal, seed=7, color_jitter=0.0)
    without = _transform(image, None, None, seed=7, color_jitter=0.0)
    np.testing.assert_array_equal(with_labels["image"], without["image"])
    assert set(without) == {"image", "valid"}
    jittered = _transform(image, seg, sal, seed=7, color_jitter=0.4)
    np.testing.assert_array_equal(with_labels["seg"], jittered["seg"])


def test_jitter_changes_colours_within_range():
    image, _, _ = _inputs()
    assert jitter_colors(image, 1.0, 1.0, 1.0) is image
    brighter = jitter_colors(image, 1.3, 1.0, 1.0)
    assert brighter.dtype == np.uint8 and brighter.mean() > image.mean()
    grey = jitter_colors(image, 1.0, 1.0, 0.0)
    assert np.abs(grey[..., 0].astype(int) - grey[..., 1]).max() <= 1


def test_normalize_roundtrip():
    image, _, _ = _inputs()
    tensor = normalize(image)
    assert tensor.shape == (3, 30, 40) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(denormalize(tensor), image)
    mean_pixel = normalize(np.full((2, 2, 3), MEAN_COLOR, np.uint8))
    assert mean_pixel.abs().max() < 0.01
