"""The per-image pseudo-label update of METHOD.md "Stages", split in two steps.

`infer_label_maps` is the model step (GPU or CPU; one forward at full resolution) and
`finalize_labels` the CPU step (saliency CRF + fusion), so a pipeline can keep accelerators busy
while CRFs run elsewhere. `initial_labels` builds the stage-0 label Y0 from multi-scale CAMs and the
off-the-shelf saliency S0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysseg.config import LabelsConfig
from raysseg.labels.cam import eval_mode, model_device, normalize_cam, present_indices
from raysseg.labels.crf import saliency_crf, saliency_crf_params
from raysseg.labels.fusion import fuse_labels


def infer_label_maps(
    model: nn.Module, image: torch.Tensor, present: Sequence[int], propagate_cams: bool = True
) -> dict[str, np.ndarray]:
    """One eval forward of a normalised (3, H, W) image -> the maps the label update needs.

    Returns float32 numpy arrays at the image size:
      cams     (K, H, W): M~ = A_CT . M with M = normalize_cam(raw CAM of the present classes), at
               feature resolution, then upsampled. Not renormalised: rows of A_CT sum to about
               1, so values stay about in [0, 1]. propagate_cams=False returns M itself.
      sal_prob (H, W): sigmoid(refined saliency logits), upsampled.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"infer_label_maps: expected a (3, H, W) image, got {tuple(image.shape)}")
    size = tuple(image.shape[1:])
    device = model_device(model, image.device)
    channels = present_indices(present, device)
    with eval_mode(model), torch.inference_mode():
        outputs = model(image.to(device=device, dtype=torch.float32)[None], heads="all")
        sal = torch.sigmoid(outputs.sal_refined.float())  # (1, 1, h, w)
        sal = F.interpolate(sal, size=size, mode="bilinear", align_corners=False)[0, 0]
        if len(channels) == 0:  # nothing to propagate; torch cannot upsample 0 channels
            cams = torch.zeros((0, *size))
        else:
            cam = normalize_cam(outputs.cam[0, channels].float())  # (K, h, w)
            cam = cam[None]  # (1, K, h, w)
            if propagate_cams:
                cam = model.propagate(outputs.affinity, cam)  # A_CT . M
            cams = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0]
    return {
        "cams": cams.float().cpu().numpy(),
        "sal_prob": sal.float().cpu().numpy(),
    }


def finalize_labels(
    image: np.ndarray,
    cams: np.ndarray,
    sal_prob: np.ndarray,
    prior_saliency: np.ndarray,
    present: Sequence[int],
    labels_config: LabelsConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """CPU half of the update -> (seg_label uint8 (H, W), sal_label float32 (H, W) in [0, 1]).

    S_bar = (sal_prob + S0) / 2, always with the ORIGINAL prior S0 so errors cannot compound across
    stages; S_next = saliency CRF of S_bar; Y_next = fuse(M~, S_next).
    """
    if sal_prob.shape != prior_saliency.shape:
        raise ValueError(
            f"finalize_labels: predicted saliency {sal_prob.shape} != prior saliency "
            f"{prior_saliency.shape}"
        )
    averaged = (sal_prob.astype(np.float32) + prior_saliency.astype(np.float32)) / 2.0
    sal_label = saliency_crf(
        image, averaged, tau=labels_config.crf_tau, params=saliency_crf_params(labels_config)
    )
    seg_label = fuse_labels(
        cams,
        present,
        sal_label,
        cam_threshold=labels_config.cam_threshold,
        sal_threshold=labels_config.sal_threshold,
    )
    return seg_label, sal_label.astype(np.float32)


def initial_labels(
    cams: np.ndarray | torch.Tensor,
    present: Sequence[int],
    prior_saliency: np.ndarray,
    labels_config: LabelsConfig,
) -> np.ndarray:
    """Stage-0 label Y0 = fuse(multi-scale CAM, S0) -> uint8 (H, W)."""
    return fuse_labels(
        cams,
        present,
        prior_saliency,
        cam_threshold=labels_config.cam_threshold,
        sal_threshold=labels_config.sal_threshold,
    )
