from __future__ import annotations

import itertools

import pytest
import torch
from fakes import FakeSegNet

from raysseg.config import OptimConfig, load_config
from raysseg.engine.optim import PolyLR, build_optimizer, restrict_param_groups, warmup_param_groups


def test_sgd_gets_momentum_and_weight_decay_by_keyword():
    model = FakeSegNet()
    config = OptimConfig(lr=0.01, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.SGD)
    backbone, heads = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(0.01)
    assert heads["lr"] == pytest.approx(0.1)
    for group in optimizer.param_groups:
        assert group["momentum"] == 0.9
        assert group["weight_decay"] == 5e-4
    assert build_optimizer(model, config, head_lr_mult=3.0).param_groups[1]["lr"] == pytest.approx(
        0.03
    )


def test_weight_decay_really_acts():
    model = FakeSegNet()
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.5))
    param = model.seg_head.weight
    before = param.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # zero gradient: only decay moves the weights, by lr_head * wd * w = 1.0 * 0.5 * w
    torch.testing.assert_close(param.detach(), before * 0.5)


def test_reference_preset_reproduces_the_reference_optimiser():
    config = load_config(preset="reference").optim
    optimizer = build_optimizer(FakeSegNet(), config)
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(1e-5)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(7e-4)


def test_poly_lr_values_for_both_groups():
    optimizer = build_optimizer(FakeSegNet(), OptimConfig(lr=1e-3, head_lr_mult=10.0))
    scheduler = PolyLR(optimizer, total_steps=10, power=0.9)
    lrs = [[g["lr"] for g in optimizer.param_groups]]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
    assert lrs[0] == pytest.approx([1e-3, 1e-2])
    assert lrs[5] == pytest.approx([1e-3 * 0.5**0.9, 1e-2 * 0.5**0.9])
    assert lrs[10] == pytest.approx([0.0, 0.0])
    for backbone_lr, head_lr in lrs[:10]:
        assert head_lr == pytest.approx(10 * backbone_lr)
    assert all(a[0] > b[0] for a, b in itertools.pairwise(lrs))  # strictly decreasing
    assert scheduler.get_last_lr() == pytest.approx(lrs[10])


def _run(optimizer, scheduler, steps):
    seen = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        seen.append([g["lr"] for g in optimizer.param_groups])
    return seen


def test_poly_lr_resume_continues_the_same_sequence():
    config = OptimConfig(lr=0.02)
    optimizer = build_optimizer(FakeSegNet(), config)
    scheduler = PolyLR(optimizer, total_steps=12, power=0.9)
    uninterrupted = _run(optimizer, scheduler, 12)

    optimizer = build_optimizer(FakeSegNet(), config)
    scheduler = PolyLR(optimizer, total_steps=12, power=0.9)
    first = _run(optimizer, scheduler, 5)
    saved = scheduler.state_dict()

    # Restore only the scheduler into a fresh optimizer: the lr must still be right at once.
    fresh_optimizer = build_optimizer(FakeSegNet(), config)
    fresh_scheduler = PolyLR(fresh_optimizer, total_steps=12, power=0.9)
    fresh_scheduler.load_state_dict(saved)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == pytest.approx(first[-1])
    rest = _run(fresh_optimizer, fresh_scheduler, 7)
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(uninterrupted))


def test_poly_lr_rejects_bad_total():
    optimizer = build_optimizer(FakeSegNet(), OptimConfig())
    with pytest.raises(ValueError, match="total_steps"):
        PolyLR(optimizer, total_steps=0, power=0.9)


def test_warmup_groups_hold_backbone_and_classifier_only():
    model = FakeSegNet()
    groups = warmup_param_groups(model, lr=1e-3, head_lr_mult=10.0)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), groups=groups)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    expected = {id(p) for p in [*model.backbone.parameters(), *model.classifier.parameters()]}
    assert held == expected
    assert id(model.seg_head.weight) not in held
    # The classifier keeps the head lr.
    classifier_group = next(
        g for g in optimizer.param_groups if any(p is model.classifier.weight for p in g["params"])
    )
    assert classifier_group["lr"] == pytest.approx(1e-2)


def test_restrict_param_groups_drops_empty_groups():
    model = FakeSegNet()
    groups = model.param_groups(lr=1.0, head_lr_mult=10.0)
    restricted = restrict_param_groups(groups, model.backbone.parameters())
    assert len(restricted) == 1 and restricted[0]["lr"] == 1.0
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig(), groups=restrict_param_groups(groups, []))
