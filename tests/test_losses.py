"""AuxSegNet losses: near-zero on perfect predictions, IGNORE handling, weights, warm-up path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raysseg.config import IGNORE_INDEX
from raysseg.losses import auxseg_losses, saliency_loss, segmentation_loss
from raysseg.model.network import AuxSegOutputs

NUM_CLASSES = 4
MARGIN = 40.0  # logits this far apart make every term ~exp(-40) ~ 0


def confident_outputs(seg_labels: torch.Tensor, saliency: torch.Tensor, present: torch.Tensor):
    """Outputs that predict the given labels with a large margin, at the labels' resolution."""
    seg = MARGIN * F.one_hot(seg_labels.clamp(max=NUM_CLASSES - 1), NUM_CLASSES).permute(0, 3, 1, 2)
    sal = (MARGIN * (2 * (saliency > 0.5).float() - 1)).unsqueeze(1)
    batch, height, width = seg_labels.shape
    return AuxSegOutputs(
        cls_logits=MARGIN * (2 * present - 1),
        cam=torch.zeros(batch, NUM_CLASSES - 1, height, width),
        seg=seg.float().requires_grad_(),
        sal=sal.requires_grad_(),
        seg_refined=seg.float().clone().requires_grad_(),
        sal_refined=sal.clone().requires_grad_(),
    )


def labelled_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seg = torch.zeros(2, 6, 8, dtype=torch.long)
    seg[0, :, 4:] = 2
    seg[1, 1:4, 1:5] = 3
    saliency = torch.where(seg > 0, 0.9, 0.1)
    present = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return seg, saliency, present


def test_losses_vanish_on_a_confident_correct_prediction() -> None:
    seg, saliency, present = labelled_batch()
    outputs = confident_outputs(seg, saliency, present)
    losses = auxseg_losses(outputs, present, saliency, seg, w_cls=1.0, w_sal=1.0, w_seg=1.0)
    assert set(losses) == {"cls", "sal", "sal_ref", "seg", "seg_ref", "total"}
    for name, value in losses.items():
        assert 0 <= value.item() < 1e-6, name


def test_losses_are_large_on_a_confident_wrong_prediction() -> None:
    seg, saliency, present = labelled_batch()
    outputs = confident_outputs((seg + 1) % NUM_CLASSES, 1 - saliency, 1 - present)
    losses = auxseg_losses(outputs, present, saliency, seg, w_cls=1.0, w_sal=1.0, w_seg=1.0)
    for name, value in losses.items():
        assert value.item() > 10, name


def test_total_is_the_weighted_sum() -> None:
    generator = torch.Generator().manual_seed(0)
    outputs = AuxSegOutputs(
        cls_logits=torch.randn(2, 3, generator=generator),
        cam=torch.zeros(2, 3, 4, 4),
        seg=torch.randn(2, NUM_CLASSES, 4, 4, generator=generator),
        sal=torch.randn(2, 1, 4, 4, generator=generator),
        seg_refined=torch.randn(2, NUM_CLASSES, 4, 4, generator=generator),
        sal_refined=torch.randn(2, 1, 4, 4, generator=generator),
    )
    seg, saliency, present = labelled_batch()  # 6 x 8 targets: logits are upsampled from 4 x 4
    losses = auxseg_losses(outputs, present, saliency, seg, w_cls=0.5, w_sal=2.0, w_seg=3.0)
    expected = (
        0.5 * losses["cls"]
        + 2.0 * (losses["sal"] + losses["sal_ref"])
        + 3.0 * (losses["seg"] + losses["seg_ref"])
    )
    torch.testing.assert_close(losses["total"], expected)
    upsampled = F.interpolate(outputs.seg, size=(6, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["seg"], F.cross_entropy(upsampled, seg))
    torch.testing.assert_close(
        losses["cls"], F.multilabel_soft_margin_loss(outputs.cls_logits, present)
    )


def test_warm_up_gives_only_the_classification_loss() -> None:
    present = torch.tensor([[1.0, 0.0, 1.0]])
    outputs = AuxSegOutputs(cls_logits=torch.randn(1, 3), cam=torch.zeros(1, 3, 2, 2))
    losses = auxseg_losses(outputs, present, None, None, w_cls=2.0, w_sal=1.0, w_seg=1.0)
    assert set(losses) == {"cls", "total"}
    torch.testing.assert_close(losses["total"], 2.0 * losses["cls"])
    with pytest.raises(ValueError, match="seg_target"):
        auxseg_losses(outputs, present, None, torch.zeros(1, 2, 2, dtype=torch.long), 1.0, 1.0, 1.0)


def test_ignored_pixels_do_not_contribute() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, NUM_CLASSES, 5, 5, generator=generator, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (1, 5, 5), generator=generator)
    labels[0, :2] = IGNORE_INDEX
    loss = segmentation_loss(logits, labels)
    # Same as the mean over the valid pixels only.
    valid = labels != IGNORE_INDEX
    per_pixel = F.cross_entropy(
        logits.detach(), labels.clamp(max=NUM_CLASSES - 1), reduction="none"
    )
    torch.testing.assert_close(loss.detach(), per_pixel[valid].mean())
    # Changing the logits under ignored pixels changes nothing, and they get no gradient.
    changed = logits.detach().clone()
    changed[0, :, :2] = 100 * torch.randn(NUM_CLASSES, 2, 5, generator=generator)
    torch.testing.assert_close(segmentation_loss(changed, labels), loss.detach())
    loss.backward()
    assert logits.grad[0, :, :2].abs().max() == 0
    assert logits.grad[0, :, 2:].abs().max() > 0


def test_all_ignore_target_gives_zero_without_nan() -> None:
    logits = torch.randn(2, NUM_CLASSES, 3, 3, requires_grad=True)
    labels = torch.full((2, 12, 12), IGNORE_INDEX, dtype=torch.long)
    loss = segmentation_loss(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


def test_saliency_target_is_binarised() -> None:
    logits = torch.randn(1, 1, 4, 4)
    soft = torch.tensor([[0.6, 0.4, 0.51, 0.2]]).repeat(4, 1).unsqueeze(0)  # (1, 4, 4)
    hard = (soft > 0.5).float()
    torch.testing.assert_close(
        saliency_loss(logits, soft), F.binary_cross_entropy_with_logits(logits[:, 0], hard)
    )
    # A different threshold moves pixels across.
    stricter = saliency_loss(logits, soft, binarize=0.55)
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], (soft > 0.55).float())
    torch.testing.assert_close(stricter, expected)


def test_shape_errors_name_the_function() -> None:
    with pytest.raises(ValueError, match="segmentation_loss"):
        segmentation_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="classification_loss"):
        auxseg_losses(
            AuxSegOutputs(cls_logits=torch.zeros(1, 3), cam=torch.zeros(1, 3, 2, 2)),
            torch.zeros(1, 4),
            None,
            None,
            1.0,
            1.0,
            1.0,
        )
