"""CAM normalisation and multi-scale / flip CAM extraction, with tiny fake models."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raysseg.labels.cam import multiscale_cam, normalize_cam


@dataclass
class ClsOutputs:
    cls_logits: torch.Tensor
    cam: torch.Tensor


class FakeCamModel(nn.Module):
    """Features at stride 8 by bilinear resizing (flip-equivariant), CAM = 1x1 conv on them.

    With `ramp` > 0 a left-to-right ramp is added to the features, which breaks flip symmetry.
    """

    def __init__(self, num_fg: int = 4, ramp: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.classifier = nn.Conv2d(3, num_fg, kernel_size=1, bias=False)
        self.ramp = ramp
        self.calls: list[tuple[int, ...]] = []
        self.training_flags: list[bool] = []

    def forward(self, images: torch.Tensor, heads: str = "all") -> ClsOutputs:
        self.calls.append(tuple(images.shape))
        self.training_flags.append(self.training)
        height, width = images.shape[-2:]
        features = F.interpolate(
            images, size=(-(-height // 8), -(-width // 8)), mode="bilinear", align_corners=False
        )
        features = features + self.ramp * torch.linspace(0, 1, features.shape[-1])
        cam = self.classifier(features)  # (B, C-1, h, w)
        return ClsOutputs(cls_logits=cam.mean((2, 3)), cam=cam)


def _image(height: int = 40, width: int = 56) -> torch.Tensor:
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(1))


def test_normalize_cam_relu_and_per_class_max() -> None:
    cam = torch.randn(3, 9, 7, generator=torch.Generator().manual_seed(0))
    cam[2] = -cam[2].abs()  # a class with no positive evidence at all
    normalized = normalize_cam(cam)
    assert normalized.shape == cam.shape
    assert normalized.min() >= 0
    assert torch.all(normalized[cam <= 0] == 0)
    peaks = normalized.flatten(1).amax(1)
    assert torch.allclose(peaks[:2], torch.ones(2), atol=1e-4)
    assert peaks[2] == 0
    # Positive values keep their ratios within a class.
    positive = F.relu(cam[0])
    assert torch.allclose(normalized[0], positive / (positive.max() + 1e-5))


def test_normalize_cam_rejects_a_batch() -> None:
    with pytest.raises(ValueError, match="K, h, w"):
        normalize_cam(torch.zeros(1, 2, 3, 4))


def test_multiscale_cam_shape_range_and_calls() -> None:
    model = FakeCamModel(num_fg=4).train()
    scales = (1.0, 0.5, 1.5)
    cams = multiscale_cam(model, _image(), present=(2, 4), scales=scales, flip=True)
    assert cams.shape == (2, 40, 56)
    assert cams.dtype == torch.float32
    assert cams.min() >= 0 and cams.max() <= 1
    assert torch.allclose(cams.flatten(1).amax(1), torch.ones(2), atol=1e-4)
    # One forward per scale, the flipped copy in the same batch, eval mode during, train after.
    assert [shape[0] for shape in model.calls] == [2, 2, 2]
    assert [shape[-2:] for shape in model.calls] == [(40, 56), (20, 28), (60, 84)]
    assert model.training_flags == [False, False, False]
    assert model.training


def test_multiscale_cam_takes_the_present_channels() -> None:
    model = FakeCamModel(num_fg=4)
    both = multiscale_cam(model, _image(), present=(1, 3), scales=(1.0,), flip=False)
    third = multiscale_cam(model, _image(), present=(3,), scales=(1.0,), flip=False)
    assert torch.allclose(both[1], third[0])
    assert not torch.allclose(both[0], third[0])


def test_multiscale_cam_single_scale_matches_upsampled_raw_cam() -> None:
    model = FakeCamModel(num_fg=4)
    image = _image()
    cams = multiscale_cam(model, image, present=(2,), scales=(1.0,), flip=False)
    raw = model(image[None]).cam[:, 1:2].detach()
    expected = F.interpolate(F.relu(raw), size=(40, 56), mode="bilinear", align_corners=False)[0]
    expected = expected / (expected.max() + 1e-5)
    assert torch.allclose(cams, expected, atol=1e-5)


def test_flip_changes_nothing_for_a_symmetric_model() -> None:
    model = FakeCamModel(num_fg=3)
    image = _image()
    with_flip = multiscale_cam(model, image, present=(1, 2, 3), scales=(1.0, 0.5), flip=True)
    without = multiscale_cam(model, image, present=(1, 2, 3), scales=(1.0, 0.5), flip=False)
    assert torch.allclose(with_flip, without, atol=1e-5)


def test_flip_makes_the_cam_mirror_equivariant_for_any_model() -> None:
    model = FakeCamModel(num_fg=3, ramp=3.0)  # not symmetric
    image = _image()
    present, scales = (1, 2, 3), (1.0, 0.5)
    cams = multiscale_cam(model, image, present=present, scales=scales, flip=True)
    mirrored = multiscale_cam(model, image.flip(-1), present=present, scales=scales, flip=True)
    assert torch.allclose(mirrored, cams.flip(-1), atol=1e-5)
    # Without the flip the asymmetric model is not mirror-equivariant (the check above can fail).
    plain = multiscale_cam(model, image, present=present, scales=scales, flip=False)
    plain_mirrored = multiscale_cam(
        model, image.flip(-1), present=present, scales=scales, flip=False
    )
    assert not torch.allclose(plain_mirrored, plain.flip(-1), atol=1e-3)


def test_multiscale_cam_without_present_classes_is_empty() -> None:
    model = FakeCamModel()
    cams = multiscale_cam(model, _image(), present=(), scales=(1.0,), flip=True)
    assert cams.shape == (0, 40, 56)
    assert model.calls == []


def test_multiscale_cam_rejects_background_as_present() -> None:
    with pytest.raises(ValueError, match="foreground"):
        multiscale_cam(FakeCamModel(), _image(), present=(0, 1), scales=(1.0,), flip=False)
