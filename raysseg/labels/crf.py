"""Dense CRF wrappers; the only module that imports the CRF library (pydensecrf).

Two uses (METHOD.md): the 2-label saliency CRF of the label update, and the K-label CRF of test-time
post-processing. The library wants C-contiguous arrays: uint8 (H, W, 3) images and float32 (K, H*W)
unaries, so inputs are converted once here and nothing else is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from raysseg.config import EvalConfig, LabelsConfig

PROB_CLIP = 1e-5  # keeps -log(p) finite


def _contiguous_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF: expected a uint8 (H, W, 3) image, got shape {image.shape}")
    # The library's typed memoryviews need a writable buffer; arrays handed over zero-copy by Ray
    # (or any shared-memory reader) are read-only, so copy only in that case.
    return np.require(image, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])


@dataclass(frozen=True)
class CrfParams:
    """The pairwise terms and iteration count of one dense CRF (pydensecrf's argument names)."""

    gauss_sxy: float
    gauss_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    iterations: int

    @classmethod
    def from_section(cls, section: object, prefix: str) -> CrfParams:
        """Read `<prefix>gauss_sxy`, ... from a config section: the one mapping of config keys to CRFs."""
        return cls(**{name.name: getattr(section, prefix + name.name) for name in fields(cls)})


# The two CRFs of METHOD.md, with the config's defaults (one source of the numbers).
SALIENCY_CRF_PREFIX = "sal_crf_"  # LabelsConfig: the 2-label saliency CRF of the label update
INFERENCE_CRF_PREFIX = "crf_"  # EvalConfig: the K-label CRF of test-time post-processing
SALIENCY_CRF = CrfParams.from_section(LabelsConfig(), SALIENCY_CRF_PREFIX)
INFERENCE_CRF = CrfParams.from_section(EvalConfig(), INFERENCE_CRF_PREFIX)


def saliency_crf_params(labels_config: LabelsConfig) -> CrfParams:
    return CrfParams.from_section(labels_config, SALIENCY_CRF_PREFIX)


def inference_crf_params(eval_config: EvalConfig) -> CrfParams:
    return CrfParams.from_section(eval_config, INFERENCE_CRF_PREFIX)


def _run_crf(image: np.ndarray, unary: np.ndarray, params: CrfParams) -> np.ndarray:
    """unary (K, H*W) float32 energies -> (K, H, W) float32 marginals."""
    height, width = image.shape[:2]
    num_labels = unary.shape[0]
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(
        np.require(unary, dtype=np.float32, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    )
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=image,
        compat=params.bilateral_compat,
    )
    marginals = crf.inference(params.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(num_labels, height, width)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def saliency_crf(
    image: np.ndarray,
    sal_prob: np.ndarray,
    tau: float = LabelsConfig.crf_tau,
    params: CrfParams = SALIENCY_CRF,
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
    marginals = _run_crf(image, unary, params)
    return np.clip(marginals[1], 0.0, 1.0)


def dense_crf(
    image: np.ndarray, probs: np.ndarray, params: CrfParams = INFERENCE_CRF
) -> np.ndarray:
    """K-label CRF: image uint8 (H, W, 3), softmax (K, H, W) -> float32 marginals (K, H, W)."""
    image = _contiguous_image(image)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf: probs shape {probs.shape} does not fit image {image.shape}")
    unary = unary_from_softmax(np.asarray(probs, dtype=np.float32), clip=PROB_CLIP)  # (K, H*W)
    return _run_crf(image, unary, params)
