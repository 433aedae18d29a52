"""Dense CRF wrappers; the only module that imports the CRF library (pydensecrf).

Two uses (METHOD.md): the 2-label saliency CRF of the label update, and the K-label CRF of test-time
post-processing. The library wants C-contiguous arrays: uint8 (H, W, 3) images and float32 (K, H*W)
unaries, so inputs are converted once here and nothing else is copied.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

PROB_CLIP = 1e-5  # keeps -log(p) finite


def _contiguous_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF: expected a uint8 (H, W, 3) image, got shape {image.shape}")
    # The library's typed memoryviews need a writable buffer; arrays handed over zero-copy by Ray
    # (or any shared-memory reader) are read-only, so copy only in that case.
    return np.require(image, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def _run_crf(
    image: np.ndarray,
    unary: np.ndarray,
    gauss_sxy: float,
    gauss_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
    iterations: int,
) -> np.ndarray:
    """unary (K, H*W) float32 energies -> (K, H, W) float32 marginals."""
    height, width = image.shape[:2]
    num_labels = unary.shape[0]
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(
        np.require(unary, dtype=np.float32, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    )
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat
    )
    marginals = crf.inference(iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(num_labels, height, width)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def saliency_crf(
    image: np.ndarray,
    sal_prob: np.ndarray,
    tau: float = 1.05,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bilateral_sxy: float = 60,
    bilateral_srgb: float = 5,
    bilateral_compat: float = 5,
    iterations: int = 1,
) -> np.ndarray:
    """2-label (bg, fg) CRF: image uint8 (H, W, 3), saliency sal_prob (H, W) -> fg marginal (H, W).

    Unaries as in METHOD.md: fg = -log(p) / (tau * sigmoid(p)), bg the same with 1 - p. The
    sigmoid of a probability lies in [0.5, 0.73], so confident pixels get slightly weaker unaries
    than a plain -log(p) and the pairwise terms can move them a little more.
    """
    image = _contiguous_image(image)
    if sal_prob.shape != image.shape[:2]:
        raise ValueError(
            f"saliency_crf: map shape {sal_prob.shape} != image size {image.shape[:2]}"
        )
    fg = np.clip(np.asarray(sal_prob, dtype=np.float32), PROB_CLIP, 1.0 - PROB_CLIP).reshape(1, -1)
    probs = np.concatenate([1.0 - fg, fg])  # (2, H*W): label 0 = bg, label 1 = fg
    unary = -np.log(probs) / (tau * _sigmoid(probs))
    marginals = _run_crf(
        image,
        unary,
        gauss_sxy,
        gauss_compat,
        bilateral_sxy,
        bilateral_srgb,
        bilateral_compat,
        iterations,
    )
    return np.clip(marginals[1], 0.0, 1.0)


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    gauss_sxy: float = 4,
    gauss_compat: float = 3,
    bilateral_sxy: float = 83,
    bilateral_srgb: float = 5,
    bilateral_compat: float = 3,
    iterations: int = 10,
) -> np.ndarray:
    """K-label CRF: image uint8 (H, W, 3), softmax (K, H, W) -> float32 marginals (K, H, W)."""
    image = _contiguous_image(image)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf: probs shape {probs.shape} does not fit image {image.shape}")
    unary = unary_from_softmax(np.asarray(probs, dtype=np.float32), clip=PROB_CLIP)  # (K, H*W)
    return _run_crf(
        image,
        unary,
        gauss_sxy,
        gauss_compat,
        bilateral_sxy,
        bilateral_srgb,
        bilateral_compat,
        iterations,
    )
