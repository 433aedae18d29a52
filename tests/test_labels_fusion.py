"""CAM + saliency fusion: the truth table, argmax among present classes, never an absent class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysseg.config import IGNORE_INDEX
from raysseg.labels.fusion import fuse_labels


def _reference_fuse(cams, present, saliency, cam_threshold, sal_threshold) -> np.ndarray:
    """Pixel-by-pixel statement of the rule, for comparison."""
    height, width = saliency.shape
    out = np.zeros((height, width), dtype=np.uint8)
    for y in range(height):
        for x in range(width):
            scores = [cams[k, y, x] for k in range(len(present))]
            cam_fg = bool(scores) and max(scores) > cam_threshold
            sal_fg = saliency[y, x] > sal_threshold
            if cam_fg and sal_fg:
                out[y, x] = present[int(np.argmax(scores))]
            elif cam_fg or sal_fg:
                out[y, x] = IGNORE_INDEX
    return out


def test_truth_table() -> None:
    # Four pixels: (cam fg, sal fg) = (yes, yes), (no, no), (yes, no), (no, yes).
    cams = np.array([[[0.9, 0.1, 0.9, 0.1]], [[0.5, 0.05, 0.3, 0.0]]], dtype=np.float32)
    saliency = np.array([[0.5, 0.01, 0.01, 0.5]], dtype=np.float32)
    labels = fuse_labels(cams, (7, 12), saliency, cam_threshold=0.2, sal_threshold=0.06)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[7, 0, IGNORE_INDEX, IGNORE_INDEX]]


def test_argmax_picks_the_present_class_with_the_largest_cam() -> None:
    cams = np.array([[[0.3, 0.8]], [[0.6, 0.4]], [[0.5, 0.9]]], dtype=np.float32)
    saliency = np.ones((1, 2), dtype=np.float32)
    labels = fuse_labels(cams, (3, 9, 15), saliency)
    assert labels.tolist() == [[9, 15]]


def test_thresholds_are_strict_and_configurable() -> None:
    cams = np.full((1, 1, 3), 0.2, dtype=np.float32)
    saliency = np.array([[0.06, 0.5, 0.01]], dtype=np.float32)
    assert fuse_labels(cams, (4,), saliency).tolist() == [[0, IGNORE_INDEX, 0]]
    relaxed = fuse_labels(cams, (4,), saliency, cam_threshold=0.1, sal_threshold=0.05)
    assert relaxed.tolist() == [[4, 4, IGNORE_INDEX]]


@pytest.mark.parametrize("seed", range(20))
def test_random_inputs_follow_the_rule_and_never_show_absent_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_present = int(rng.integers(1, 5))
    present = tuple(sorted(rng.choice(np.arange(1, 21), size=num_present, replace=False).tolist()))
    height, width = 9, 11
    cams = rng.random((num_present, height, width), dtype=np.float32) ** 2
    saliency = rng.random((height, width), dtype=np.float32) ** 3
    cam_threshold, sal_threshold = float(rng.uniform(0.05, 0.5)), float(rng.uniform(0.01, 0.3))
    labels = fuse_labels(cams, present, saliency, cam_threshold, sal_threshold)
    assert set(np.unique(labels).tolist()) <= {0, IGNORE_INDEX, *present}
    expected = _reference_fuse(cams, present, saliency, cam_threshold, sal_threshold)
    np.testing.assert_array_equal(labels, expected)


def test_image_without_present_classes() -> None:
    saliency = np.array([[0.0, 0.05, 0.07, 1.0]], dtype=np.float32)
    labels = fuse_labels(np.zeros((0, 1, 4), np.float32), (), saliency)
    assert labels.tolist() == [[0, 0, IGNORE_INDEX, IGNORE_INDEX]]


def test_accepts_torch_tensors() -> None:
    rng = np.random.default_rng(0)
    cams = rng.random((2, 5, 6), dtype=np.float32)
    saliency = rng.random((5, 6), dtype=np.float32)
    expected = fuse_labels(cams, (2, 5), saliency)
    labels = fuse_labels(torch.from_numpy(cams), torch.tensor([2, 5]), torch.from_numpy(saliency))
    assert isinstance(labels, np.ndarray)
    np.testing.assert_array_equal(labels, expected)


def test_bad_inputs_are_errors() -> None:
    cams = np.zeros((2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="1 present classes"):
        fuse_labels(cams, (1,), np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="saliency shape"):
        fuse_labels(cams, (1, 2), np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="present ids"):
        fuse_labels(cams, (0, 2), np.zeros((3, 3), np.float32))
