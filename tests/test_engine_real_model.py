"""The engine with the real AuxSegNet (small backbone) instead of the fakes."""

from __future__ import annotations

import pytest
import torch
from fakes import tiny_batches

from raysseg.config import LossConfig, ModelConfig, OptimConfig
from raysseg.engine.checkpoint import load_checkpoint, restore_model, save_checkpoint
from raysseg.engine.loop import evaluate, predict_probs, train_one_epoch
from raysseg.engine.optim import PolyLR, build_optimizer, warmup_param_groups
from raysseg.model.network import AuxSegNet, build_model

NUM_CLASSES = 5
CPU = torch.device("cpu")


def _model(seed: int = 0) -> AuxSegNet:
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone="small", num_classes=NUM_CLASSES, small_width=16))


def _batches(seed: int = 0) -> list[dict]:
    return tiny_batches(num_batches=2, batch_size=2, size=32, num_classes=NUM_CLASSES, seed=seed)


def test_real_model_full_training_loss_goes_down():
    model = _model()
    batches = _batches()
    optimizer = build_optimizer(model, OptimConfig(lr=0.01, head_lr_mult=10.0))
    scheduler = PolyLR(optimizer, total_steps=4 * len(batches), power=0.9)
    history = [
        train_one_epoch(model, optimizer, scheduler, batches, CPU, LossConfig()) for _ in range(4)
    ]
    assert set(history[0]) >= {"cls", "sal", "sal_ref", "seg", "seg_ref", "total", "lr"}
    assert history[-1]["total"] < history[0]["total"]
    assert history[-1]["seg_ref"] < history[0]["seg_ref"]


def test_real_model_warmup_moves_only_backbone_and_classifier():
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # All heads in the optimiser with weight decay on: warm-up must still leave them alone.
    optimizer = build_optimizer(model, OptimConfig(lr=0.01))
    result = train_one_epoch(model, optimizer, None, _batches(), CPU, LossConfig(), mode="warmup")
    assert set(result) >= {"cls", "total"} and "seg" not in result
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved, "nothing was trained"
    assert all(name.startswith(("backbone.", "classifier.")) for name in moved), moved
    assert any(name.startswith("classifier.") for name in moved)


def test_real_model_warmup_groups():
    model = _model()
    groups = warmup_param_groups(model, lr=1e-3, head_lr_mult=10.0)
    held = {id(p) for g in groups for p in g["params"]}
    expected = {
        id(p)
        for p in [*model.backbone.parameters(), *model.classifier.parameters()]
        if p.requires_grad
    }
    assert held == expected
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-3, 1e-2])


def test_real_model_evaluate_and_predict_probs():
    model = _model()
    batches = _batches()
    result = evaluate(model, batches, CPU, num_classes=NUM_CLASSES)
    assert 0.0 <= result["miou"] <= 1.0
    judged = sum(int((b["gt"] != 255).sum()) for b in batches)
    assert result["confusion"].to_array().sum() == judged
    image = batches[0]["image"][:1]
    probs = predict_probs(model, image, scales=(0.75, 1.0, 1.25), flip=True, fuse="max")
    assert probs.shape == (NUM_CLASSES, 32, 32)
    torch.testing.assert_close(probs.sum(0), torch.ones(32, 32))
    single = predict_probs(model, image)
    expected = torch.nn.functional.interpolate(
        model(image).seg_refined, size=(32, 32), mode="bilinear", align_corners=False
    ).softmax(1)[0]
    torch.testing.assert_close(single, expected.detach(), atol=1e-5, rtol=1e-4)


def test_real_model_checkpoint_rebuilds_the_model(tmp_path):
    model = _model()
    optimizer = build_optimizer(model, OptimConfig(lr=0.01))
    train_one_epoch(model, optimizer, None, _batches(), CPU, LossConfig())
    path = save_checkpoint(tmp_path / "stage_0.pt", model, optimizer, epoch=1)
    checkpoint = load_checkpoint(path)
    restored = restore_model(checkpoint)
    assert isinstance(restored, AuxSegNet) and not restored.training
    assert restored.model_args() == model.model_args()
    image = _batches(seed=3)[0]["image"]
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(restored(image).seg_refined, model(image).seg_refined)
