"""Dense CRF wrappers: shapes, ranges, normalisation, and that they follow image edges."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from raysseg.config import EvalConfig, LabelsConfig
from raysseg.labels.crf import (
    INFERENCE_CRF,
    SALIENCY_CRF,
    dense_crf,
    inference_crf_params,
    saliency_crf,
    saliency_crf_params,
)


def _edge_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left half dark, right half bright; truth = right half; a noisy foreground probability."""
    rng = np.random.default_rng(seed)
    height, width = 40, 60
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = 30
    image[:, width // 2 :] = 220
    truth = np.zeros((height, width), dtype=bool)
    truth[:, width // 2 :] = True
    noisy = 0.5 + 0.15 * np.where(truth, 1.0, -1.0) + rng.normal(0.0, 0.25, truth.shape)
    return image, truth, np.clip(noisy, 0.0, 1.0).astype(np.float32)


def test_saliency_crf_shape_dtype_range() -> None:
    image, _, prob = _edge_scene()
    out = saliency_crf(image, prob)
    assert out.shape == prob.shape
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_saliency_crf_cleans_a_noisy_map_along_an_edge(seed: int) -> None:
    image, truth, prob = _edge_scene(seed)
    before = ((prob > 0.5) == truth).mean()
    after = ((saliency_crf(image, prob) > 0.5) == truth).mean()
    assert before < 0.85  # the input really is noisy
    assert after > before + 0.1
    assert after > 0.9


def test_saliency_crf_keeps_confident_maps() -> None:
    image, truth, _ = _edge_scene()
    confident = np.where(truth, 0.99, 0.01).astype(np.float32)
    out = saliency_crf(image, confident)
    np.testing.assert_array_equal(out > 0.5, truth)


def test_saliency_crf_accepts_non_contiguous_inputs() -> None:
    image, _, prob = _edge_scene()
    view_image, view_prob = image[:, ::-1], prob[:, ::-1].astype(np.float64)
    assert not view_image.flags.c_contiguous
    expected = saliency_crf(np.ascontiguousarray(view_image), np.ascontiguousarray(view_prob))
    np.testing.assert_allclose(saliency_crf(view_image, view_prob), expected, atol=1e-6)


def test_dense_crf_marginals_sum_to_one_and_follow_the_edge() -> None:
    image, truth, prob = _edge_scene()
    probs = np.stack([1.0 - prob, prob])  # (2, H, W)
    marginals = dense_crf(image, probs)
    assert marginals.shape == probs.shape
    assert marginals.dtype == np.float32
    np.testing.assert_allclose(marginals.sum(axis=0), 1.0, atol=1e-4)
    assert marginals.min() >= 0.0
    before = ((prob > 0.5) == truth).mean()
    after = ((marginals.argmax(0) == 1) == truth).mean()
    assert after > before + 0.1


def test_dense_crf_three_labels() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    logits = rng.normal(size=(3, 12, 16))
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    marginals = dense_crf(image, probs, replace(INFERENCE_CRF, iterations=3))
    assert marginals.shape == (3, 12, 16)
    np.testing.assert_allclose(marginals.sum(axis=0), 1.0, atol=1e-4)


def test_shape_mismatch_is_an_error() -> None:
    image, _, prob = _edge_scene()
    with pytest.raises(ValueError, match="saliency_crf"):
        saliency_crf(image, prob[:, :-1])
    with pytest.raises(ValueError, match="dense_crf"):
        dense_crf(image, np.stack([prob, prob])[:, :-1])


def test_crf_accepts_read_only_inputs() -> None:
    # Ray hands numpy arrays over zero-copy and read-only; the CRF must not fail on them.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
    prob = rng.random((20, 24)).astype(np.float32)
    image.setflags(write=False)
    prob.setflags(write=False)
    writable = saliency_crf(image.copy(), prob.copy())
    assert np.allclose(saliency_crf(image, prob), writable)


def test_crf_params_come_from_the_users_config_keys() -> None:
    labels = LabelsConfig(sal_crf_bilateral_sxy=40.0, sal_crf_iterations=3)
    evaluation = EvalConfig(crf_gauss_compat=1.5, crf_iterations=4)
    assert saliency_crf_params(labels) == replace(SALIENCY_CRF, bilateral_sxy=40.0, iterations=3)
    assert inference_crf_params(evaluation) == replace(
        INFERENCE_CRF, gauss_compat=1.5, iterations=4
    )
    assert SALIENCY_CRF.iterations == 1 and INFERENCE_CRF.iterations == 10  # METHOD.md


def test_the_configured_crf_parameters_change_the_result() -> None:
    image, _, prob = _edge_scene()
    default = saliency_crf(image, prob)
    params = saliency_crf_params(
        LabelsConfig(sal_crf_bilateral_compat=0.0, sal_crf_gauss_compat=0.0)
    )
    assert not np.allclose(saliency_crf(image, prob, params=params), default)
