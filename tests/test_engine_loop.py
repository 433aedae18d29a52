from __future__ import annotations

import pytest
import torch
from fakes import FakeOutputs, FakeSegNet, OracleSegNet, tiny_batches
from torch import nn

from raysseg.config import LossConfig, OptimConfig
from raysseg.engine.loop import (
    NonFiniteLossError,
    evaluate,
    fuse_probs,
    make_grad_scaler,
    predict_probs,
    resolve_amp_dtype,
    train_one_epoch,
)
from raysseg.engine.optim import PolyLR, build_optimizer, warmup_param_groups

CPU = torch.device("cpu")


def _train(model, batches, epochs, mode="train", groups=None, lr=0.05):
    torch.manual_seed(0)
    optimizer = build_optimizer(model, OptimConfig(lr=lr, head_lr_mult=1.0), groups=groups)
    scheduler = PolyLR(optimizer, total_steps=epochs * len(batches), power=0.9)
    return [
        train_one_epoch(model, optimizer, scheduler, batches, CPU, LossConfig(), mode=mode)
        for _ in range(epochs)
    ]


def test_full_training_loss_goes_down_on_a_fixed_data_set():
    torch.manual_seed(0)
    history = _train(FakeSegNet(), tiny_batches(), epochs=8)
    first, last = history[0], history[-1]
    for key in ("cls", "sal", "sal_ref", "seg", "seg_ref", "total"):
        assert key in first
    assert last["total"] < 0.7 * first["total"]
    assert last["seg"] < first["seg"]
    assert first["images"] == 4 and first["steps"] == 2
    assert first["images_per_s"] > 0 and first["seconds"] > 0
    assert last["lr"] == pytest.approx(0.0)  # poly schedule reached its end


def test_warmup_updates_only_backbone_and_classifier():
    torch.manual_seed(0)
    model = FakeSegNet()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # All parameters in the optimiser, with weight decay: the heads must still not move.
    history = _train(model, tiny_batches(), epochs=3, mode="warmup")
    assert set(history[0]) >= {"cls", "total"}
    assert "seg" not in history[0]
    assert history[-1]["cls"] < history[0]["cls"]
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        expected = name.startswith(("backbone.", "classifier."))
        assert moved == expected, name


def test_warmup_with_warmup_groups():
    torch.manual_seed(0)
    model = FakeSegNet()
    seg_before = model.seg_head.weight.detach().clone()
    groups = warmup_param_groups(model, lr=0.05, head_lr_mult=1.0)
    history = _train(model, tiny_batches(), epochs=2, mode="warmup", groups=groups)
    assert history[-1]["steps"] == 2
    assert torch.equal(model.seg_head.weight, seg_before)


def test_works_with_a_torch_dataloader_and_max_steps():
    samples = [
        {key: value[i] for key, value in batch.items()}
        for batch in tiny_batches(num_batches=3, batch_size=2)
        for i in range(2)
    ]
    loader = torch.utils.data.DataLoader(samples, batch_size=2, shuffle=False)
    model = FakeSegNet()
    optimizer = build_optimizer(model, OptimConfig(lr=0.01))
    result = train_one_epoch(
        model, optimizer, None, loader, "cpu", LossConfig(), max_steps=2, log_every=1
    )
    assert result["steps"] == 2 and result["images"] == 4
    assert result["lr"] == pytest.approx(0.01)  # no scheduler: lr unchanged


def test_non_finite_loss_names_step_and_images():
    batches = tiny_batches(num_batches=2)
    batches[1]["image"][0, 0, 0, 0] = float("nan")
    model = FakeSegNet()
    optimizer = build_optimizer(model, OptimConfig(lr=0.01))
    with pytest.raises(NonFiniteLossError, match=r"step 1.*img_1_0"):
        train_one_epoch(model, optimizer, None, batches, CPU, LossConfig())


def test_bad_mode_is_rejected():
    model = FakeSegNet()
    optimizer = build_optimizer(model, OptimConfig())
    with pytest.raises(ValueError, match="mode"):
        train_one_epoch(model, optimizer, None, [], CPU, LossConfig(), mode="cls")


def test_unreadable_items_are_counted_and_the_first_error_kept():
    model = FakeSegNet()
    optimizer = build_optimizer(model, OptimConfig(lr=0.01))
    batches = tiny_batches(num_batches=3)
    marks = (["", ""], ["", "cannot read image 'a.jpg'"], ["x", "y"])
    for batch, unreadable in zip(batches, marks, strict=True):
        batch["unreadable"] = unreadable
    result = train_one_epoch(model, optimizer, None, batches, CPU, LossConfig())
    assert result["unreadable"] == 3 and result["first_unreadable"] == "cannot read image 'a.jpg'"
    assert result["steps"] == 3 and result["images"] == 6  # stand-ins are trained on
    clean = train_one_epoch(model, optimizer, None, tiny_batches(), CPU, LossConfig())
    assert clean["unreadable"] == 0 and "first_unreadable" not in clean


def test_amp_falls_back_to_full_precision_on_cpu():
    assert resolve_amp_dtype(CPU, amp=True, amp_dtype=torch.float16) is None
    assert make_grad_scaler(CPU, amp=True) is None
    model = FakeSegNet()
    optimizer = build_optimizer(model, OptimConfig(lr=0.01))
    result = train_one_epoch(model, optimizer, None, tiny_batches(), CPU, LossConfig(), amp=True)
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["total"]))


def _class_batches(num_classes=4):
    """Images whose channel 0 holds the class id; GT with an ignored block."""
    torch.manual_seed(1)
    batches = []
    for index in range(3):
        gt = torch.randint(0, num_classes, (1, 9, 11))
        image = torch.randn(1, 3, 9, 11)
        image[:, 0] = gt.float()
        gt[:, :2, :3] = 255
        batches.append({"image": image, "gt": gt, "image_id": [f"val_{index}"]})
    return batches


def test_evaluate_perfect_model_scores_one():
    result = evaluate(OracleSegNet(4), _class_batches(), CPU, num_classes=4)
    assert result["miou"] == pytest.approx(1.0)
    assert result["pixel_accuracy"] == pytest.approx(1.0)
    assert len(result["iou"]) == 4
    assert result["confusion"].to_array().sum() == 3 * (9 * 11 - 6)
    assert result["unreadable"] == 0


def test_evaluate_leaves_out_an_unreadable_image_and_counts_it():
    batches = _class_batches()
    batches.insert(1, {"image_id": ["val_x"], "unreadable": ["cannot read image 'x.jpg'"]})
    result = evaluate(OracleSegNet(4), batches, CPU, num_classes=4)
    assert result["unreadable"] == 1
    assert result["confusion"].to_array().sum() == 3 * (9 * 11 - 6)  # the 3 readable ones


class ConstantModel(nn.Module):
    """Predicts class 0 everywhere at half resolution (exercises the upsampling)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, images, heads="all"):
        batch, _, height, width = images.shape
        logits = torch.zeros(batch, self.num_classes, (height + 1) // 2, (width + 1) // 2)
        logits[:, 0] = 1.0
        zeros = torch.zeros(batch, self.num_classes - 1)
        return FakeOutputs(cls_logits=zeros, cam=zeros, seg=logits, seg_refined=logits)


def test_evaluate_hand_check_with_constant_prediction():
    batches = _class_batches()
    result = evaluate(ConstantModel(4), batches, CPU, num_classes=4)
    gt = torch.cat([b["gt"] for b in batches])
    judged = gt != 255
    background_share = float(((gt == 0) & judged).sum() / judged.sum())
    # class 0: TP = #gt0, union = all judged pixels -> IoU = share of background; others 0.
    assert result["iou"][0] == pytest.approx(background_share)
    assert result["iou"][1:] == [0.0, 0.0, 0.0]
    assert result["miou"] == pytest.approx(background_share / 4)


class ScaleDependentModel(nn.Module):
    """Per-scale fixed probabilities (keyed by input height) to tell max from mean fusion."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # {height: [p0, p1, p2]}

    def forward(self, images, heads="all"):
        batch, _, height, width = images.shape
        probs = torch.tensor(self.table[height]).clamp_min(1e-6)
        logits = probs.log().view(1, -1, 1, 1).expand(batch, -1, height, width)
        zeros = torch.zeros(batch, 2)
        return FakeOutputs(cls_logits=zeros, cam=zeros, seg=logits, seg_refined=logits)


def test_predict_probs_max_and_mean_fusion_differ():
    # scale 1 (h=8): peaked on class 2; scales 0.5 and 1.5: moderate class 1 everywhere.
    table = {8: [0.0, 0.2, 0.8], 4: [0.4, 0.6, 0.0], 12: [0.4, 0.6, 0.0]}
    model = ScaleDependentModel(table)
    image = torch.zeros(1, 3, 8, 10)
    by_max = predict_probs(model, image, scales=(0.5, 1.0, 1.5), fuse="max")
    by_mean = predict_probs(model, image, scales=(0.5, 1.0, 1.5), fuse="mean")
    assert by_max.shape == by_mean.shape == (3, 8, 10)
    torch.testing.assert_close(by_max.sum(0), torch.ones(8, 10))
    torch.testing.assert_close(by_mean.sum(0), torch.ones(8, 10))
    assert bool((by_max.argmax(0) == 2).all())  # the single confident view wins
    assert bool((by_mean.argmax(0) == 1).all())  # the consistent class wins on average
    torch.testing.assert_close(
        by_mean[:, 0, 0], torch.tensor([0.8, 1.4, 0.8]) / 3, atol=1e-4, rtol=0
    )


def test_fuse_probs_max_is_at_least_mean_before_renormalising():
    probs = torch.rand(4, 3, 5, 5).softmax(dim=1)
    assert bool((probs.amax(0) >= probs.mean(0)).all())
    fused = fuse_probs(probs, "max")
    torch.testing.assert_close(fused, probs.amax(0) / probs.amax(0).sum(0, keepdim=True))
    with pytest.raises(ValueError, match="fuse"):
        fuse_probs(probs, "median")


class PointwiseModel(nn.Module):
    """1x1 conv on the image: flip-equivariant. With `ramp`, adds a left-to-right bias (not)."""

    def __init__(self, ramp=False):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.ramp = ramp

    def forward(self, images, heads="all"):
        logits = self.conv(images)
        if self.ramp:
            logits = logits + torch.linspace(-2, 2, images.shape[-1]).view(1, 1, 1, -1)
        zeros = torch.zeros(images.shape[0], 2)
        return FakeOutputs(cls_logits=zeros, cam=zeros, seg=logits, seg_refined=logits)


def test_predict_probs_flip_is_undone_before_fusing():
    image = torch.randn(1, 3, 7, 9)
    model = PointwiseModel()
    plain = predict_probs(model, image, scales=(1.0,), flip=False, fuse="mean")
    flipped = predict_probs(model, image, scales=(1.0,), flip=True, fuse="mean")
    torch.testing.assert_close(plain, flipped)  # equivariant model: flip TTA changes nothing
    assert not model.training

    ramp = PointwiseModel(ramp=True)
    with_flip = predict_probs(ramp, image, scales=(1.0,), flip=True, fuse="mean")
    direct = ramp(image).seg_refined.softmax(1)[0]
    mirrored = ramp(image.flip(-1)).seg_refined.softmax(1)[0].flip(-1)
    torch.testing.assert_close(with_flip, (direct + mirrored).detach() / 2)


def test_predict_probs_odd_scales_and_bad_input():
    image = torch.randn(1, 3, 11, 13)
    probs = predict_probs(PointwiseModel(), image, scales=(0.5, 0.75, 1.25), flip=True)
    assert probs.shape == (3, 11, 13)
    assert bool((probs >= 0).all())
    with pytest.raises(ValueError, match="one image"):
        predict_probs(PointwiseModel(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="fuse"):
        predict_probs(PointwiseModel(), image, fuse="vote")


def test_grad_scaler_path_matches_plain_training():
    # A CPU GradScaler exercises the scale -> step -> update branch used with fp16 on CUDA.
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        torch.manual_seed(0)
        model = FakeSegNet()
        optimizer = build_optimizer(model, OptimConfig(lr=0.05))
        for _ in range(2):
            result = train_one_epoch(
                model, optimizer, None, tiny_batches(), CPU, LossConfig(), scaler=scaler
            )
        results.append((result["total"], model.seg_head.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
