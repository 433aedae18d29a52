"""AuxSegNet losses (METHOD.md, Losses): pure functions, named terms plus the weighted total.

L = w_cls * MultiLabelSoftMargin(z, y)
  + w_sal * (BCE(P_sal, S) + BCE(P_ref_sal, S))      S = saliency pseudo label > sal_binarize
  + w_seg * (CE(P_seg, Y) + CE(P_ref_seg, Y))        Y = segmentation pseudo label, IGNORE = 255
Dense logits are upsampled bilinearly to the target size first.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from raysseg.config import IGNORE_INDEX
from raysseg.model.network import AuxSegOutputs


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, h, w) -> (B, K, H, W) float32, bilinear, align_corners=False."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def classification_loss(cls_logits: Tensor, image_labels: Tensor) -> Tensor:
    """Multi-label soft margin between logits (B, C-1) and multi-hot labels (B, C-1)."""
    if cls_logits.shape != image_labels.shape:
        raise ValueError(
            f"classification_loss: logits {tuple(cls_logits.shape)} and image_labels "
            f"{tuple(image_labels.shape)} differ (expected (B, C-1) multi-hot labels)"
        )
    return F.multilabel_soft_margin_loss(cls_logits.float(), image_labels.float())


def saliency_loss(logits: Tensor, saliency: Tensor, binarize: float = 0.5) -> Tensor:
    """BCE with logits between P_sal (B, 1, h, w) and the saliency label (B, H, W) > binarize."""
    _check_dense_target("saliency_loss", logits, saliency)
    upsampled = upsample_logits(logits, saliency.shape[-2:])[:, 0]  # (B, H, W)
    target = (saliency > binarize).to(upsampled.dtype)
    return F.binary_cross_entropy_with_logits(upsampled, target)


def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross entropy between P_seg (B, C, h, w) and labels (B, H, W) long, IGNORE pixels left out.

    Mean over the valid pixels; an all-IGNORE batch gives 0 (still attached to the graph) instead of
    the 0/0 = NaN of a plain mean reduction.
    """
    _check_dense_target("segmentation_loss", logits, labels)
    upsampled = upsample_logits(logits, labels.shape[-2:])  # (B, C, H, W)
    total = F.cross_entropy(upsampled, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    valid = (labels != IGNORE_INDEX).sum()
    return total / valid.clamp(min=1)


def auxseg_losses(
    outputs: AuxSegOutputs,
    image_labels: Tensor,
    sal_target: Tensor | None,
    seg_target: Tensor | None,
    w_cls: float,
    w_sal: float,
    w_seg: float,
    sal_binarize: float = 0.5,
) -> dict[str, Tensor]:
    """Named losses {cls, sal, sal_ref, seg, seg_ref, total}.

    A term is present when both the prediction and its target are: the warm-up (heads="cls", targets
    None) gives only {cls, total}. A target without the matching prediction is an error.
    """
    losses = {"cls": classification_loss(outputs.cls_logits, image_labels)}
    total = w_cls * losses["cls"]
    if sal_target is not None:
        if outputs.sal is None or outputs.sal_refined is None:
            raise ValueError("auxseg_losses: sal_target given but the outputs have no saliency")
        losses["sal"] = saliency_loss(outputs.sal, sal_target, sal_binarize)
        losses["sal_ref"] = saliency_loss(outputs.sal_refined, sal_target, sal_binarize)
        total = total + w_sal * (losses["sal"] + losses["sal_ref"])
    if seg_target is not None:
        if outputs.seg is None or outputs.seg_refined is None:
            raise ValueError("auxseg_losses: seg_target given but the outputs have no segmentation")
        losses["seg"] = segmentation_loss(outputs.seg, seg_target)
        losses["seg_ref"] = segmentation_loss(outputs.seg_refined, seg_target)
        total = total + w_seg * (losses["seg"] + losses["seg_ref"])
    losses["total"] = total
    return losses


def _check_dense_target(where: str, logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"{where}: expected logits (B, K, h, w) and target (B, H, W), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )


__all__ = [
    "auxseg_losses",
    "classification_loss",
    "saliency_loss",
    "segmentation_loss",
    "upsample_logits",
]
