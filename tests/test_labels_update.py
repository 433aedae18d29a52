"""The per-image label update (model step + CPU step) on the real VOC image with a fake model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import FakeOutputs
from torch import nn

from raysseg.config import IGNORE_INDEX, LabelsConfig, ModelConfig
from raysseg.data.transforms import normalize
from raysseg.labels.cam import multiscale_cam, normalize_cam
from raysseg.labels.update import finalize_labels, infer_label_maps, initial_labels
from raysseg.model.network import build_model


class FakeAuxModel(nn.Module):
    """Follows the AuxSegNet contract with 1x1 convs on a stride-8 resized image.

    affinity: "softmax" (rows = softmax of negative feature distances), "uniform" (every row the
    mean) or "identity"; the state is simply the (B, N, N) matrix.
    """

    def __init__(self, num_classes: int = 21, affinity: str = "softmax") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cam_head = nn.Conv2d(3, num_classes - 1, kernel_size=1, bias=False)
        self.seg_head = nn.Conv2d(3, num_classes, kernel_size=1)
        self.sal_head = nn.Conv2d(3, 1, kernel_size=1)
        self.dropout = nn.Dropout(0.5)  # makes a forgotten eval() visible
        self.affinity_kind = affinity
        self.propagate_calls = 0

    def _affinity(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(2).transpose(1, 2)  # (B, N, 3)
        n = flat.shape[1]
        if self.affinity_kind == "uniform":
            return torch.full((flat.shape[0], n, n), 1.0 / n)
        if self.affinity_kind == "identity":
            return torch.eye(n).expand(flat.shape[0], n, n)
        return torch.softmax(-4.0 * torch.cdist(flat, flat) ** 2, dim=-1)  # (B, N, N)

    def propagate(self, state: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        self.propagate_calls += 1
        batch, channels, height, width = values.shape
        mixed = torch.bmm(state, values.flatten(2).transpose(1, 2))  # (B, N, K)
        return mixed.transpose(1, 2).reshape(batch, channels, height, width)

    def forward(self, images: torch.Tensor, heads: str = "all") -> FakeOutputs:
        height, width = images.shape[-2:]
        size = (-(-height // 8), -(-width // 8))
        features = self.dropout(F.interpolate(images, size=size, mode="bilinear"))
        cam = self.cam_head(features)
        outputs = FakeOutputs(cls_logits=cam.mean((2, 3)), cam=cam)
        if heads == "cls":
            return outputs
        affinity = self._affinity(features)
        seg, sal = self.seg_head(features), self.sal_head(features)
        return replace(
            outputs,
            seg=seg,
            sal=sal,
            seg_refined=self.propagate(affinity, seg),
            sal_refined=self.propagate(affinity, sal),
            affinity=affinity,
        )


@pytest.fixture(scope="module")
def voc(voc_sample: dict) -> dict:
    present = tuple(int(c) for c in np.unique(voc_sample["mask"]) if 0 < c < IGNORE_INDEX)
    objects = (voc_sample["mask"] > 0) & (voc_sample["mask"] != IGNORE_INDEX)
    # A prior S0 that knows the objects (as a good saliency detector would).
    prior = np.where(objects, 0.95, 0.05).astype(np.float32)
    return {**voc_sample, "present": present, "objects": objects, "prior": prior}


def test_infer_label_maps_shapes_and_mode(voc: dict) -> None:
    model = FakeAuxModel().train()
    maps = infer_label_maps(model, normalize(voc["rgb"]), voc["present"])
    height, width = voc["mask"].shape
    assert maps["cams"].shape == (len(voc["present"]), height, width)
    assert maps["sal_prob"].shape == (height, width)
    assert maps["cams"].dtype == np.float32 and maps["sal_prob"].dtype == np.float32
    assert maps["cams"].min() >= 0 and maps["cams"].max() <= 1 + 1e-4
    assert maps["sal_prob"].min() >= 0 and maps["sal_prob"].max() <= 1
    assert model.training  # restored
    # Eval mode inside: the dropout is off, so two runs agree.
    again = infer_label_maps(model, normalize(voc["rgb"]), voc["present"])
    np.testing.assert_array_equal(maps["cams"], again["cams"])


def test_infer_label_maps_propagates_the_normalised_cam(voc: dict) -> None:
    image = normalize(voc["rgb"])[:, :120, :160]
    present = (3, 9)
    model = FakeAuxModel(affinity="uniform")
    maps = infer_label_maps(model, image, present)
    with torch.no_grad():
        outputs = model.eval()(image[None])
        normalized = normalize_cam(outputs.cam[0, [2, 8]])  # (K, h, w)
        sal = torch.sigmoid(outputs.sal_refined)
    # A uniform affinity replaces every position by the mean: M~ is constant per class.
    expected_means = normalized.flatten(1).mean(1).numpy()
    np.testing.assert_allclose(maps["cams"].reshape(2, -1).min(1), expected_means, rtol=1e-4)
    np.testing.assert_allclose(maps["cams"].reshape(2, -1).max(1), expected_means, rtol=1e-4)
    expected_sal = F.interpolate(sal, size=(120, 160), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(maps["sal_prob"], expected_sal[0, 0].numpy(), atol=1e-6)
    # Identity affinity: M~ is M upsampled, so each class peaks at 1.
    identity = infer_label_maps(FakeAuxModel(affinity="identity"), image, present)
    np.testing.assert_allclose(identity["cams"].reshape(2, -1).max(1), 1.0, atol=1e-3)
    # propagate_cams=False (the ablation) skips A_CT: the uniform affinity leaves M as it is.
    unpropagated = infer_label_maps(model, image, present, propagate_cams=False)
    np.testing.assert_allclose(unpropagated["cams"], identity["cams"], atol=1e-5)
    assert unpropagated["cams"].reshape(2, -1).std(1).min() > 0.01


def test_infer_label_maps_without_present_classes(voc: dict) -> None:
    model = FakeAuxModel()
    maps = infer_label_maps(model, normalize(voc["rgb"])[:, :64, :64], ())
    assert maps["cams"].shape == (0, 64, 64)
    assert model.propagate_calls == 2  # only the model's own refinements, no CAM propagation


def test_update_end_to_end_on_voc(voc: dict) -> None:
    model = FakeAuxModel()
    maps = infer_label_maps(model, normalize(voc["rgb"]), voc["present"])
    seg_label, sal_label = finalize_labels(
        voc["rgb"], maps["cams"], maps["sal_prob"], voc["prior"], voc["present"], LabelsConfig()
    )
    assert seg_label.shape == voc["mask"].shape and seg_label.dtype == np.uint8
    assert sal_label.shape == voc["mask"].shape and sal_label.dtype == np.float32
    assert sal_label.min() >= 0 and sal_label.max() <= 1
    assert set(np.unique(seg_label).tolist()) <= {0, IGNORE_INDEX, *voc["present"]}
    assert set(np.unique(seg_label).tolist()) & set(voc["present"])  # some class pixels
    # S_bar averages with the prior S0, which knows the objects: the CRF result follows them.
    agreement = ((sal_label > 0.5) == voc["objects"]).mean()
    assert agreement > 0.9, agreement
    # Pixels labelled as a class are salient, background pixels are not.
    assert np.all(sal_label[(seg_label > 0) & (seg_label != IGNORE_INDEX)] > 0.06)
    assert np.all(sal_label[seg_label == 0] <= 0.06)


def test_finalize_labels_uses_the_config_thresholds(voc: dict) -> None:
    height, width = voc["mask"].shape
    cams = np.full((1, height, width), 0.5, dtype=np.float32)
    sal_prob = np.full((height, width), 0.5, dtype=np.float32)
    args = (voc["rgb"], cams, sal_prob, voc["prior"], (7,))
    default, _ = finalize_labels(*args, LabelsConfig())
    strict, _ = finalize_labels(*args, LabelsConfig(cam_threshold=0.6))
    assert 7 in default
    assert 7 not in strict and set(np.unique(strict).tolist()) <= {0, IGNORE_INDEX}


def test_initial_labels_from_multiscale_cam(voc: dict) -> None:
    model = FakeAuxModel()
    image = normalize(voc["rgb"])
    cams = multiscale_cam(model, image, voc["present"], scales=(1.0, 0.5), flip=True)
    labels = initial_labels(cams, voc["present"], voc["prior"], LabelsConfig())
    assert labels.shape == voc["mask"].shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, IGNORE_INDEX, *voc["present"]}
    # Where the prior says background and the CAM is weak, the label is background.
    weak = (cams.numpy().max(0) <= 0.2) & ~voc["objects"]
    assert np.all(labels[weak] == 0)


def test_update_with_the_real_small_model(voc: dict) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="small", num_classes=21, small_width=16))
    image = normalize(voc["rgb"])
    present = voc["present"]
    cams = multiscale_cam(model, image, present, scales=(1.0, 0.5), flip=True)
    assert cams.shape == (len(present), *voc["mask"].shape)
    assert cams.min() >= 0 and cams.max() <= 1
    stage0 = initial_labels(cams, present, voc["prior"], LabelsConfig())
    assert set(np.unique(stage0).tolist()) <= {0, IGNORE_INDEX, *present}
    maps = infer_label_maps(model, image, present)
    assert maps["cams"].shape == cams.shape and maps["cams"].dtype == np.float32
    assert maps["cams"].min() >= 0 and maps["cams"].max() <= 1.01  # rows of A_CT sum to ~1
    assert maps["sal_prob"].shape == voc["mask"].shape
    seg_label, sal_label = finalize_labels(
        voc["rgb"], maps["cams"], maps["sal_prob"], voc["prior"], present, LabelsConfig()
    )
    assert seg_label.dtype == np.uint8 and seg_label.shape == voc["mask"].shape
    assert set(np.unique(seg_label).tolist()) <= {0, IGNORE_INDEX, *present}
    assert sal_label.dtype == np.float32 and 0 <= sal_label.min() <= sal_label.max() <= 1
