from __future__ import annotations

import pytest
import torch
from fakes import FakeSegNet, tiny_batches
from torch import nn

from raysseg.config import LossConfig, OptimConfig
from raysseg.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    strip_wrapper_prefixes,
    unwrap_model,
)
from raysseg.engine.loop import train_one_epoch
from raysseg.engine.optim import PolyLR, build_optimizer


def _trained(steps_epochs: int = 2):
    torch.manual_seed(0)
    model = FakeSegNet()
    optimizer = build_optimizer(model, OptimConfig(lr=0.05))
    scheduler = PolyLR(optimizer, total_steps=10, power=0.9)
    for _ in range(steps_epochs):
        train_one_epoch(model, optimizer, scheduler, tiny_batches(), "cpu", LossConfig())
    return model, optimizer, scheduler


def test_round_trip_restores_weights_optimizer_schedule_and_epoch(tmp_path):
    model, optimizer, scheduler = _trained()
    path = save_checkpoint(
        tmp_path / "ckpt" / "model.pt",
        model,
        optimizer,
        scheduler,
        epoch=2,
        config_dict={"optim": {"lr": 0.05}},
        extra={"miou": 0.5},
    )
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    checkpoint = load_checkpoint(path)
    assert checkpoint["model_args"] == model.model_args()
    assert checkpoint["config"] == {"optim": {"lr": 0.05}}
    assert checkpoint["extra"] == {"miou": 0.5}

    torch.manual_seed(123)
    fresh = FakeSegNet(**checkpoint["model_args"])
    fresh_optimizer = build_optimizer(fresh, OptimConfig(lr=0.05))
    fresh_scheduler = PolyLR(fresh_optimizer, total_steps=10, power=0.9)
    epoch = restore_training_state(checkpoint, fresh, fresh_optimizer, fresh_scheduler)
    assert epoch == 2

    images = tiny_batches()[0]["image"]
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(images).seg_refined, model(images).seg_refined)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 4
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [
        g["lr"] for g in optimizer.param_groups
    ]
    for old, new in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(
            fresh_optimizer.state[new]["momentum_buffer"], optimizer.state[old]["momentum_buffer"]
        )

    # Both continue identically.
    batches = tiny_batches(seed=5)
    model.train(), fresh.train()
    a = train_one_epoch(model, optimizer, scheduler, batches, "cpu", LossConfig())
    b = train_one_epoch(fresh, fresh_optimizer, fresh_scheduler, batches, "cpu", LossConfig())
    assert a["total"] == pytest.approx(b["total"])
    assert a["lr"] == pytest.approx(b["lr"])


def test_file_is_plain_data_loadable_with_weights_only(tmp_path):
    model, optimizer, scheduler = _trained(1)
    path = save_checkpoint(tmp_path / "m.pt", model, optimizer, scheduler, epoch=1)
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 1 and raw["scaler"] is None


def test_wrapped_model_is_saved_without_prefix_and_restores_into_wrapped(tmp_path):
    model = FakeSegNet()
    wrapped = nn.DataParallel(model)  # adds "module." like DDP; works on CPU
    assert next(iter(wrapped.state_dict())).startswith("module.")
    path = save_checkpoint(tmp_path / "w.pt", wrapped, epoch=3)
    checkpoint = load_checkpoint(path)
    assert not any(key.startswith("module.") for key in checkpoint["model_state"])
    target = nn.DataParallel(FakeSegNet())
    assert restore_training_state(checkpoint, target) == 3
    assert unwrap_model(target) is target.module
    for a, b in zip(model.parameters(), target.module.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_prefixed_state_dicts_are_accepted():
    state = {"module.backbone.0.weight": torch.zeros(1), "_orig_mod.module.x": torch.ones(1)}
    assert list(strip_wrapper_prefixes(state)) == ["backbone.0.weight", "x"]


def test_missing_file_error_names_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=r"nope\.pt"):
        load_checkpoint(missing)


def test_corrupt_file_error_names_path(tmp_path):
    model, optimizer, _ = _trained(1)
    path = save_checkpoint(tmp_path / "broken.pt", model, optimizer)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as by a crash without atomic writes
    with pytest.raises(CheckpointError, match=r"broken\.pt"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"broken\.pt"):
        load_checkpoint(path)


class _Payload:
    """Arbitrary pickled object: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_refuses_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "raysseg-checkpoint-v1", "obj": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_foreign_file_and_missing_parts_are_errors(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"other\.pt.*not a raysseg checkpoint"):
        load_checkpoint(path)
    model = FakeSegNet()
    saved = load_checkpoint(save_checkpoint(tmp_path / "bare.pt", model))
    optimizer = build_optimizer(model, OptimConfig())
    with pytest.raises(CheckpointError, match=r"bare\.pt.*optimizer"):
        restore_training_state(saved, model, optimizer)
    with pytest.raises(CheckpointError, match=r"bare\.pt.*do not fit"):
        restore_training_state(saved, FakeSegNet(num_classes=4))
