"""CAM + saliency -> segmentation pseudo label (METHOD.md "Stages", the fuse rule).

Per pixel: m = max over the present classes of their CAM; cam_fg = m > cam_threshold and
sal_fg = saliency > sal_threshold. Both say foreground -> the present class with the largest CAM;
both say on background -> 0; they disagree -> IGNORE (neither cue is trusted alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from raysseg.config import IGNORE_INDEX


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def fuse_labels(
    cams: np.ndarray | torch.Tensor,
    present: Sequence[int] | np.ndarray,
    saliency: np.ndarray | torch.Tensor,
    cam_threshold: float = 0.2,
    sal_threshold: float = 0.06,
) -> np.ndarray:
    """cams (K, H, W) of the present classes, present (K,) fg ids, saliency (H, W) -> uint8 (H, W).

    Only ids in `present` (or 0 / IGNORE) can appear; with no present class every salient pixel is
    IGNORE and the rest background.
    """
    cams = _as_numpy(cams)
    saliency = _as_numpy(saliency)
    ids = _as_numpy(present).astype(np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != len(ids):
        raise ValueError(
            f"fuse_labels: cams shape {cams.shape} does not match {len(ids)} present classes"
        )
    if saliency.shape != cams.shape[1:]:
        raise ValueError(
            f"fuse_labels: saliency shape {saliency.shape} != cam size {cams.shape[1:]}"
        )
    if np.any((ids < 1) | (ids >= IGNORE_INDEX)):
        raise ValueError(f"fuse_labels: present ids must be in 1..{IGNORE_INDEX - 1}, got {ids}")
    sal_fg = saliency > sal_threshold
    if len(ids) == 0:
        return np.where(sal_fg, IGNORE_INDEX, 0).astype(np.uint8)
    best = cams.argmax(axis=0)  # (H, W) index into `ids`
    cam_fg = np.take_along_axis(cams, best[None], axis=0)[0] > cam_threshold
    labels = np.full(saliency.shape, IGNORE_INDEX, dtype=np.uint8)
    both = cam_fg & sal_fg
    labels[both] = ids[best[both]]
    labels[~cam_fg & ~sal_fg] = 0
    return labels
