"""Segmentation, pseudo-label and saliency metrics.

Every accumulator keeps plain integer counts so that workers can reduce it with one all-reduce of
one array (`to_array` -> sum across workers -> `from_array`), the way torchvision's references
reduce their confusion matrix once at the end of evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from raysseg.config import IGNORE_INDEX

ArrayLike = Any  # np.ndarray or torch.Tensor


def _as_flat_int64(values: ArrayLike, name: str) -> np.ndarray:
    """Flatten a numpy array or tensor (any device) to int64 numpy."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu")
        return values.reshape(-1).to(torch.int64).numpy()
    array = np.asarray(values)
    if array.dtype.kind not in "iub":
        raise TypeError(f"{name}: expected integer class ids, got dtype {array.dtype}")
    return array.reshape(-1).astype(np.int64, copy=False)


def _check_same_size(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction has {pred.size} pixels but target has {target.size}; shapes must match"
        )


def _check_range(values: np.ndarray, upper: int, name: str) -> None:
    """Raise naming the first value outside [0, upper)."""
    bad = (values < 0) | (values >= upper)
    if bad.any():
        raise ValueError(
            f"{name}: class id {int(values[bad][0])} outside [0, {upper}) and not IGNORE"
        )


def _iou_from_counts(
    intersection: np.ndarray, gt_total: np.ndarray, pred_total: np.ndarray
) -> np.ndarray:
    """Per-class IoU; NaN for classes absent from both ground truth and prediction."""
    union = gt_total + pred_total - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


class ConfusionMatrix:
    """C x C pixel counts: rows = ground truth class, columns = predicted class.

    Pixels whose ground truth is IGNORE (255) are skipped. `miou()` averages the IoU over the
    classes that occur in the ground truth or in the prediction (a class absent from both has no
    defined IoU and is left out, so a perfect prediction of an image with 3 classes scores 1.0,
    not 3/21).
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: ArrayLike, target: ArrayLike) -> ConfusionMatrix:
        """Add the pixels of one prediction / ground-truth pair (any matching shape)."""
        pred_flat = _as_flat_int64(pred, "prediction")
        target_flat = _as_flat_int64(target, "target")
        _check_same_size(pred_flat, target_flat)
        keep = target_flat != IGNORE_INDEX
        pred_flat, target_flat = pred_flat[keep], target_flat[keep]
        _check_range(target_flat, self.num_classes, "target")
        _check_range(pred_flat, self.num_classes, "prediction")
        counts = np.bincount(
            target_flat * self.num_classes + pred_flat, minlength=self.num_classes**2
        )
        self.matrix += counts.reshape(self.num_classes, self.num_classes)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (in place)."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge confusion matrices of {self.num_classes} and "
                f"{other.num_classes} classes"
            )
        self.matrix += other.matrix
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return ConfusionMatrix.from_array(self.matrix.copy()).merge(other)

    def to_array(self) -> np.ndarray:
        """A copy of the (C, C) int64 counts, e.g. to all-reduce across workers."""
        return self.matrix.copy()

    @classmethod
    def from_array(cls, matrix: ArrayLike) -> ConfusionMatrix:
        if isinstance(matrix, torch.Tensor):
            matrix = matrix.detach().cpu().numpy()
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square (C, C) matrix, got shape {matrix.shape}")
        result = cls(matrix.shape[0])
        result.matrix = matrix.astype(np.int64, copy=True)
        return result

    def iou(self) -> np.ndarray:
        """(C,) IoU per class; NaN where a class is in neither ground truth nor prediction."""
        diagonal = np.diag(self.matrix)
        return _iou_from_counts(diagonal, self.matrix.sum(axis=1), self.matrix.sum(axis=0))

    def miou(self) -> float:
        """Mean IoU over the classes present in the ground truth or the prediction."""
        return _nanmean(self.iou())

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.diag(self.matrix).sum() / total) if total else float("nan")

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """Per-class IoU in percent, one class per line, then the mean."""
        names = list(class_names) if class_names else [str(c) for c in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"got {len(names)} class names for {self.num_classes} classes")
        width = max(len("mIoU"), *(len(name) for name in names))
        lines = [f"{'class':<{width}}  IoU %"]
        for name, value in zip(names, self.iou(), strict=True):
            shown = "   -" if np.isnan(value) else f"{100 * value:5.1f}"
            lines.append(f"{name:<{width}}  {shown}")
        lines.append(f"{'mIoU':<{width}}  {100 * self.miou():5.1f}")
        return "\n".join(lines)


class LabelQuality:
    """Pseudo-label quality against ground truth: precision, recall, mIoU (the paper's table).

    Counts a C x (C + 1) matrix: rows = ground-truth class (GT IGNORE pixels are skipped),
    columns = pseudo-label class, with the last column for pseudo-label IGNORE.
    - precision: of the pixels the pseudo label commits to (not IGNORE), the fraction correct;
    - recall: of all ground-truth pixels, the fraction labelled correctly (IGNORE counts as a miss);
    - mIoU: IGNORE is a separate prediction that matches no class, so an IGNORE pixel is a false
      negative for its ground-truth class and a false positive for none; averaged over the classes
      present in the ground truth or the pseudo label.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, label: ArrayLike, gt: ArrayLike) -> LabelQuality:
        label_flat = _as_flat_int64(label, "pseudo label")
        gt_flat = _as_flat_int64(gt, "ground truth")
        _check_same_size(label_flat, gt_flat)
        keep = gt_flat != IGNORE_INDEX
        label_flat, gt_flat = label_flat[keep], gt_flat[keep]
        _check_range(gt_flat, self.num_classes, "ground truth")
        ignore_column = self.num_classes
        label_flat = np.where(label_flat == IGNORE_INDEX, ignore_column, label_flat)
        _check_range(label_flat, self.num_classes + 1, "pseudo label")
        columns = self.num_classes + 1
        counts = np.bincount(gt_flat * columns + label_flat, minlength=self.num_classes * columns)
        self.matrix += counts.reshape(self.num_classes, columns)
        return self

    def merge(self, other: LabelQuality) -> LabelQuality:
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge label-quality counts of {self.num_classes} and "
                f"{other.num_classes} classes"
            )
        self.matrix += other.matrix
        return self

    def __add__(self, other: LabelQuality) -> LabelQuality:
        return LabelQuality.from_array(self.matrix.copy()).merge(other)

    def to_array(self) -> np.ndarray:
        return self.matrix.copy()

    @classmethod
    def from_array(cls, matrix: ArrayLike) -> LabelQuality:
        if isinstance(matrix, torch.Tensor):
            matrix = matrix.detach().cpu().numpy()
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[1] != matrix.shape[0] + 1:
            raise ValueError(f"expected a (C, C + 1) matrix, got shape {matrix.shape}")
        result = cls(matrix.shape[0])
        result.matrix = matrix.astype(np.int64, copy=True)
        return result

    def compute(self) -> dict[str, Any]:
        """{"precision", "recall", "miou", "iou" (per class), "ignore_fraction"}, all in [0, 1]."""
        classified = self.matrix[:, : self.num_classes]  # (C, C) without the IGNORE column
        correct = np.diag(classified).astype(np.float64)
        committed = classified.sum()
        total = self.matrix.sum()
        iou = _iou_from_counts(correct, self.matrix.sum(axis=1), classified.sum(axis=0))
        return {
            "precision": float(correct.sum() / committed) if committed else float("nan"),
            "recall": float(correct.sum() / total) if total else float("nan"),
            "miou": _nanmean(iou),
            "iou": iou.tolist(),
            "ignore_fraction": float(self.matrix[:, -1].sum() / total) if total else float("nan"),
        }


def pseudo_label_quality(label: ArrayLike, gt: ArrayLike, num_classes: int) -> dict[str, Any]:
    """One-shot `LabelQuality` of a single pseudo label (use the class to accumulate a data set)."""
    return LabelQuality(num_classes).update(label, gt).compute()


def _as_float_array(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def saliency_mae(pred: ArrayLike, gt: ArrayLike) -> float:
    """Mean absolute error between a saliency map and the ground truth, both in [0, 1]."""
    pred_array, gt_array = _as_float_array(pred), _as_float_array(gt)
    if pred_array.shape != gt_array.shape:
        raise ValueError(f"saliency shapes differ: {pred_array.shape} vs {gt_array.shape}")
    return float(np.abs(pred_array - gt_array).mean())


def saliency_f_measure(pred: ArrayLike, gt: ArrayLike, beta2: float = 0.3) -> float:
    """F-measure at the adaptive threshold 2 * mean(pred) (capped at 1), GT binarised at 0.5.

    beta2 = 0.3 weights precision over recall, the usual choice in saliency detection.
    """
    pred_array, gt_array = _as_float_array(pred), _as_float_array(gt)
    if pred_array.shape != gt_array.shape:
        raise ValueError(f"saliency shapes differ: {pred_array.shape} vs {gt_array.shape}")
    # The floor keeps an all-zero map from counting every pixel as foreground.
    threshold = min(max(2.0 * float(pred_array.mean()), 1e-8), 1.0)
    pred_fg = pred_array >= threshold
    gt_fg = gt_array >= 0.5
    true_positive = float(np.logical_and(pred_fg, gt_fg).sum())
    precision = true_positive / pred_fg.sum() if pred_fg.any() else 0.0
    recall = true_positive / gt_fg.sum() if gt_fg.any() else 0.0
    if precision + recall == 0:
        return 0.0
    return float((1 + beta2) * precision * recall / (beta2 * precision + recall))


def as_percent(value: Any, width: int = 0) -> str:
    """A score in [0, 1] as a percentage with 2 decimals, right-aligned to `width`; "-" when it is
    absent or not finite (a stage that scored nothing). Every table of scores prints through this."""
    finite = isinstance(value, float) and np.isfinite(value)
    return f"{100 * value:{width}.2f}" if finite else "-".rjust(width)


__all__ = [
    "ConfusionMatrix",
    "LabelQuality",
    "as_percent",
    "pseudo_label_quality",
    "saliency_f_measure",
    "saliency_mae",
]
