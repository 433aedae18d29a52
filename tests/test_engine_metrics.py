from __future__ import annotations

import numpy as np
import pytest
import torch

from raysseg.engine.metrics import (
    ConfusionMatrix,
    LabelQuality,
    as_percent,
    pseudo_label_quality,
    saliency_f_measure,
    saliency_mae,
)

# Hand example, C = 3. Pairs (gt, pred) after dropping the IGNORE pixel:
# (0,0) (1,1) (1,2) (2,2) (2,0)  -> rows gt: [1,0,0], [0,1,1], [1,0,1]
TARGET = np.array([[0, 1, 1], [2, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 2], [2, 0, 1]], dtype=np.int64)


def test_confusion_matrix_matches_hand_count():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    np.testing.assert_array_equal(cm.to_array(), [[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    # IoU: c0 1/(1+2-1), c1 1/(2+1-1), c2 1/(2+2-1)
    np.testing.assert_allclose(cm.iou(), [1 / 2, 1 / 2, 1 / 3])
    assert cm.miou() == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_confusion_matrix_ignores_255_whatever_is_predicted():
    target = np.full((4, 4), 255, dtype=np.uint8)
    target[0, 0] = 1
    pred = np.full((4, 4), 2)
    pred[0, 0] = 1
    cm = ConfusionMatrix(3).update(pred, target)
    assert cm.to_array().sum() == 1
    assert cm.miou() == 1.0


def test_confusion_matrix_torch_and_numpy_agree():
    from_numpy = ConfusionMatrix(3).update(PRED, TARGET)
    from_torch = ConfusionMatrix(3).update(
        torch.from_numpy(PRED), torch.from_numpy(TARGET.astype(np.int64))
    )
    np.testing.assert_array_equal(from_numpy.to_array(), from_torch.to_array())


def test_merge_equals_single_pass_and_array_round_trip():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 4, size=(5, 7)) for _ in range(3)]
    targets = [rng.choice([0, 1, 2, 3, 255], size=(5, 7)) for _ in range(3)]
    single = ConfusionMatrix(4)
    for pred, target in zip(preds, targets, strict=True):
        single.update(pred, target)
    parts = [ConfusionMatrix(4).update(p, t) for p, t in zip(preds, targets, strict=True)]
    merged = ConfusionMatrix(4)
    for part in parts:
        merged.merge(part)
    np.testing.assert_array_equal(merged.to_array(), single.to_array())
    np.testing.assert_array_equal((parts[0] + parts[1] + parts[2]).to_array(), single.to_array())
    # The all-reduce path: sum the arrays, rebuild.
    reduced = ConfusionMatrix.from_array(torch.from_numpy(sum(p.to_array() for p in parts)))
    assert reduced.miou() == pytest.approx(single.miou())
    # `+` does not modify its operands.
    assert parts[0].to_array().sum() == (targets[0] != 255).sum()


def test_miou_of_perfect_prediction_is_one_over_present_classes(voc_sample):
    mask = voc_sample["mask"]
    cm = ConfusionMatrix(21).update(np.where(mask == 255, 0, mask), mask)
    assert cm.miou() == 1.0
    assert cm.pixel_accuracy() == 1.0
    present = set(np.unique(mask)) - {255}
    assert int(np.sum(~np.isnan(cm.iou()))) == len(present)


def test_miou_counts_classes_present_only_in_prediction():
    target = np.zeros((2, 2), dtype=np.int64)
    pred = np.array([[0, 0], [0, 2]])
    cm = ConfusionMatrix(3).update(pred, target)
    # c0: 3/4, c1 absent everywhere (left out), c2 predicted but absent: 0.
    assert cm.miou() == pytest.approx((3 / 4 + 0.0) / 2)


def test_confusion_matrix_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="class id 7"):
        ConfusionMatrix(3).update(np.array([7]), np.array([0]))
    with pytest.raises(ValueError, match="pixels"):
        ConfusionMatrix(3).update(np.zeros(3, dtype=int), np.zeros(4, dtype=int))


def test_table_lists_every_class_and_the_mean():
    cm = ConfusionMatrix(3).update(PRED, TARGET)
    text = cm.table(["background", "cat", "dog"])
    lines = text.splitlines()
    assert len(lines) == 5
    assert "cat" in lines[2] and "50.0" in lines[2]
    assert "dog" in lines[3] and "33.3" in lines[3]
    assert lines[-1].startswith("mIoU") and "44.4" in lines[-1]
    with pytest.raises(ValueError):
        cm.table(["only", "two"])


# Pseudo-label hand example, C = 3, IGNORE in both label and GT.
GT_LQ = np.array([0, 0, 1, 1, 2, 2, 255, 1])
LABEL_LQ = np.array([0, 255, 1, 2, 2, 255, 1, 1])


def test_label_quality_hand_example_with_ignore():
    result = pseudo_label_quality(LABEL_LQ, GT_LQ, num_classes=3)
    # judged pixels (GT not IGNORE): 7; committed (label not IGNORE): 5; correct: 4
    assert result["precision"] == pytest.approx(4 / 5)
    assert result["recall"] == pytest.approx(4 / 7)
    assert result["ignore_fraction"] == pytest.approx(2 / 7)
    # IoU: c0 1/(2+1-1); c1 2/(3+2-2); c2 1/(2+2-1); IGNORE pixels are misses, never false positives
    np.testing.assert_allclose(result["iou"], [1 / 2, 2 / 3, 1 / 3])
    assert result["miou"] == pytest.approx(0.5)


def test_label_quality_accumulates_like_one_pass():
    total = LabelQuality(3).update(LABEL_LQ[:4], GT_LQ[:4])
    rest = LabelQuality(3).update(LABEL_LQ[4:], GT_LQ[4:])
    merged = LabelQuality.from_array(total.to_array() + rest.to_array())
    assert merged.compute() == pseudo_label_quality(LABEL_LQ, GT_LQ, 3)
    assert (total + rest).compute() == merged.compute()


def test_label_quality_on_real_mask(voc_sample):
    mask = voc_sample["mask"]
    label = mask.copy()
    label[:100] = 255  # the pseudo label abstains on the top rows
    result = LabelQuality(21).update(label, mask).compute()
    assert result["precision"] == 1.0
    judged = mask != 255
    expected_recall = (judged & (label != 255)).sum() / judged.sum()
    assert result["recall"] == pytest.approx(expected_recall)
    assert result["miou"] < 1.0


def test_saliency_mae_hand_example():
    pred = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    gt = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    assert saliency_mae(pred, gt) == pytest.approx((0 + 0.5 + 0 + 0.25) / 4)
    assert saliency_mae(torch.from_numpy(pred), torch.from_numpy(gt)) == pytest.approx(0.1875)


def test_saliency_f_measure_adaptive_threshold():
    gt = np.zeros((4, 4), dtype=np.float32)
    gt[:2, :2] = 1.0
    assert saliency_f_measure(gt, gt) == pytest.approx(1.0)
    # mean 0.2 -> threshold 0.4: pixels >= 0.4 are foreground
    pred = np.zeros((4, 4), dtype=np.float32)
    pred[0, :] = 0.8  # 4 predicted fg, 2 of them in the GT
    pred[1, 0] = 0.0
    pred[3, 3] = 0.0
    assert pred.mean() == pytest.approx(0.2)
    precision, recall = 2 / 4, 2 / 4
    expected = 1.3 * precision * recall / (0.3 * precision + recall)
    assert saliency_f_measure(pred, gt) == pytest.approx(expected)
    assert saliency_f_measure(np.zeros((4, 4)), gt) == 0.0


def test_as_percent_prints_scores_and_marks_missing_ones() -> None:
    assert as_percent(0.41934) == "41.93"
    assert as_percent(0.5, width=7) == "  50.00"
    assert as_percent(None, width=6) == "     -"
    assert as_percent(float("nan")) == "-"
