"""AuxSegNet model: shapes, frozen parts, affinity maths, chunking, lr groups, rebuilding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from raysseg.config import ModelConfig
from raysseg.losses import auxseg_losses
from raysseg.model import AuxSegNet, build_backbone, build_model, build_model_from_args
from raysseg.model.affinity import (
    NXN_ROWS_PER_CHUNK_ROW,
    AffinityState,
    CrossTaskAffinity,
    TaskAffinity,
    affinity_products,
    chunk_peak_bytes,
    chunk_rows_for_budget,
    from_rows,
    to_rows,
)
from raysseg.model.weights import load_backbone_weights

NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny tensors: intra-op threads only add synchronisation, which is slow on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(
    seed: int = 0, width: int = 16, memory_mb: float = 256, temperature: float = 1.0
) -> AuxSegNet:
    torch.manual_seed(seed)
    backbone = build_backbone("small", small_width=width)
    return AuxSegNet(
        backbone,
        num_classes=NUM_CLASSES,
        affinity_temperature=temperature,
        affinity_memory_mb=memory_mb,
    )


def images(batch: int = 2, height: int = 64, width: int = 80, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


# ---------------------------------------------------------------- shapes


def test_forward_shapes_all_heads() -> None:
    model = small_model().eval()
    with torch.no_grad():
        out = model(images())  # 64 x 80 -> 8 x 10 features
    assert out.cls_logits.shape == (2, NUM_CLASSES - 1)
    assert out.cam.shape == (2, NUM_CLASSES - 1, 8, 10)
    assert out.seg.shape == out.seg_refined.shape == (2, NUM_CLASSES, 8, 10)
    assert out.sal.shape == out.sal_refined.shape == (2, 1, 8, 10)
    assert out.affinity.num_positions == 80 and out.affinity.batch_size == 2


def test_cls_heads_only_leaves_dense_outputs_empty() -> None:
    model = small_model().eval()
    with torch.no_grad():
        out = model(images(), heads="cls")
        full = model(images())
    assert out.seg is None and out.sal is None and out.affinity is None
    assert out.seg_refined is None and out.sal_refined is None
    torch.testing.assert_close(out.cls_logits, full.cls_logits)
    torch.testing.assert_close(out.cam, full.cam)
    with pytest.raises(ValueError, match="heads"):
        model(images(), heads="seg")


def test_cam_uses_the_classifier_weights_and_gap_gives_the_logits_in_eval() -> None:
    model = small_model().eval()
    with torch.no_grad():
        out = model(images(), heads="cls")
    # Without dropout, GAP and the 1x1 conv commute: logits = spatial mean of the raw CAM.
    torch.testing.assert_close(out.cls_logits, out.cam.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)


def test_resnet38d_shape_and_channels() -> None:
    backbone = build_backbone("resnet38d", pretrained=None).eval()
    assert backbone.out_channels == 4096 and backbone.output_stride == 8
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 65, 65))
    assert features.shape == (1, 4096, 9, 9)
    assert "conv1a.weight" in backbone.frozen_parameter_names()


@pytest.mark.parametrize(("output_stride", "size"), [(8, 9), (16, 5)])
def test_resnet50_dilated_shapes(output_stride: int, size: int) -> None:
    backbone = build_backbone("resnet50", output_stride=output_stride, pretrained=None).eval()
    assert backbone.out_channels == 2048 and backbone.output_stride == output_stride
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 65, 65))
    assert features.shape == (1, 2048, size, size)
    assert "conv1.weight" in backbone.frozen_parameter_names()


def test_bad_backbone_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="resnet38"):
        build_backbone("resnet38")
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("small", output_stride=16)
    with pytest.raises(ValueError, match="torchvision"):
        build_backbone("small", pretrained="torchvision")


# ---------------------------------------------------------------- frozen parts


def test_batch_norm_and_first_conv_are_frozen() -> None:
    backbone = build_backbone("resnet50", pretrained=None)
    frozen = set(backbone.frozen_parameter_names())
    for module_name, module in backbone.named_modules():
        if isinstance(module, _BatchNorm) or module_name == "conv1":
            for param_name, param in module.named_parameters(recurse=False):
                assert f"{module_name}.{param_name}" in frozen
                assert not param.requires_grad
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and not set(trainable) & frozen
    assert "layer1.0.conv1.weight" in trainable


def test_batch_norm_stays_in_eval_after_train() -> None:
    backbone = build_backbone("resnet50", pretrained=None)
    backbone.train()
    batch_norms = [m for m in backbone.modules() if isinstance(m, _BatchNorm)]
    assert batch_norms and all(not m.training for m in batch_norms)
    assert backbone.training  # the module itself did switch to training mode
    stats_before = [m.running_mean.clone() for m in batch_norms]
    backbone(torch.randn(1, 3, 33, 33))
    for before, module in zip(stats_before, batch_norms, strict=True):
        torch.testing.assert_close(module.running_mean, before)


def test_small_backbone_normalisation_trains() -> None:
    # No pretrained weights exist for it: its GroupNorm affines learn like everything else.
    backbone = build_backbone("small", small_width=16)
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(p.requires_grad for m in norms for p in m.parameters())


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one() -> None:
    model = small_model().train()
    out = model(images())
    losses = auxseg_losses(
        out,
        image_labels=torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]),
        sal_target=torch.rand(2, 64, 80),
        seg_target=torch.randint(0, NUM_CLASSES, (2, 64, 80)),
        w_cls=1.0,
        w_sal=1.0,
        w_seg=1.0,
    )
    losses["total"].backward()
    # The small backbone trains from scratch: nothing in it is frozen (resnets: see below).
    frozen = {f"backbone.{n}" for n in model.backbone.frozen_parameter_names()}
    assert not frozen
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None, name
        else:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- affinity maths


def reference_cross_task(
    cross: CrossTaskAffinity, a_seg: torch.Tensor, a_sal: torch.Tensor
) -> torch.Tensor:
    """A_CT straight from the definition: a padded 3x3 conv over the whole 2-channel N x N map."""
    stacked = torch.stack((a_seg, a_sal), dim=1)  # (B, 2, N, N)
    hidden = F.relu(F.conv2d(stacked, cross.conv3x3.weight, cross.conv3x3.bias, padding=1))
    omega = torch.softmax(F.conv2d(hidden, cross.conv1x1.weight, cross.conv1x1.bias), dim=1)
    return omega[:, 0] * a_seg + omega[:, 1] * a_sal


def random_state(batch: int = 2, height: int = 5, width: int = 7, dim: int = 6) -> AffinityState:
    generator = torch.Generator().manual_seed(3)
    parts = [torch.randn(batch, height * width, dim, generator=generator) for _ in range(4)]
    return AffinityState(*parts, height=height, width=width)


def full_task_affinities(state: AffinityState) -> tuple[torch.Tensor, torch.Tensor]:
    a_seg = torch.softmax(state.seg_query @ state.seg_key.transpose(1, 2), dim=-1)
    a_sal = torch.softmax(state.sal_query @ state.sal_key.transpose(1, 2), dim=-1)
    return a_seg, a_sal


def test_task_affinity_is_row_stochastic_and_uses_the_temperature() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 4)
    hot = TaskAffinity(channels=8, temperature=1.0)
    cool = TaskAffinity(channels=8, temperature=4.0)
    cool.load_state_dict(hot.state_dict())
    a_hot, a_cool = hot(x), cool(x)
    assert a_hot.shape == (2, 12, 12)
    torch.testing.assert_close(a_hot.sum(-1), torch.ones(2, 12))
    logits = to_rows(hot.theta(x)) @ to_rows(hot.phi(x)).transpose(1, 2)
    torch.testing.assert_close(a_cool, torch.softmax(logits / 4.0, dim=-1))
    with pytest.raises(ValueError, match="temperature"):
        TaskAffinity(channels=8, temperature=0.0)


def test_cross_task_affinity_rows_sum_to_about_one() -> None:
    torch.manual_seed(0)
    state = random_state()
    a_seg, a_sal = full_task_affinities(state)
    cross = CrossTaskAffinity()
    a_ct = cross.full(a_seg, a_sal)
    assert (a_ct >= 0).all()
    torch.testing.assert_close(a_ct.sum(-1), torch.ones(2, 35), atol=0.05, rtol=0)
    # Mixing a matrix with itself gives it back whatever Omega is: rows then sum to 1 exactly.
    torch.testing.assert_close(cross.full(a_seg, a_seg), a_seg)


def test_chunked_cross_task_affinity_matches_the_definition() -> None:
    torch.manual_seed(0)
    state = random_state()
    cross = CrossTaskAffinity()
    expected = reference_cross_task(cross, *full_task_affinities(state))
    identity = torch.eye(35).expand(2, 35, 35)  # A_CT . I = A_CT
    for chunk_rows in (1, 2, 4, 34, 35, 100):
        got = affinity_products(state, cross, chunk_rows=chunk_rows, cross_values=identity)
        torch.testing.assert_close(got.cross, expected, msg=f"chunk_rows={chunk_rows}")


def test_chunked_task_products_match_whole_matrices() -> None:
    state = random_state()
    a_seg, a_sal = full_task_affinities(state)
    values = torch.randn(2, 35, 3)
    for chunk_rows in (1, 3, 8, 35):
        got = affinity_products(
            state, CrossTaskAffinity(), chunk_rows=chunk_rows, seg_values=values, sal_values=values
        )
        torch.testing.assert_close(got.seg, a_seg @ values)
        torch.testing.assert_close(got.sal, a_sal @ values)
        assert got.cross is None


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 79, 80])
def test_forward_chunked_equals_unchunked(chunk_rows: int) -> None:
    # 8 x 10 features: N = 80; 3 and 7 do not divide it; with 1 every row is a halo row twice.
    # At initialisation the affinities are nearly uniform; sharper theta / phi and a stronger Omega
    # conv make rows and gates differ, so a wrong halo row would show well above the tolerance.
    model = small_model().eval()
    with torch.no_grad():
        for task in (model.seg_affinity, model.sal_affinity):
            task.theta.weight.mul_(30.0)
            task.phi.weight.mul_(30.0)
        model.cross_task_affinity.conv3x3.weight.mul_(30.0)
    x = images()
    with torch.no_grad():
        whole = model(x, chunk_rows=80)
        chunked = model(x, chunk_rows=chunk_rows)
    for field in ("seg", "sal", "seg_refined", "sal_refined"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), msg=field)
    cams = torch.relu(whole.cam)
    torch.testing.assert_close(
        model.propagate(whole.affinity, cams, chunk_rows=chunk_rows),
        model.propagate(whole.affinity, cams, chunk_rows=80),
    )


def test_forward_enhancement_equals_explicit_formula() -> None:
    # X' = X + W(A_t . g(X)) and P_ref = A_CT . P from whole matrices, against the model's outputs.
    model = small_model().eval()
    x = images(batch=1)
    with torch.no_grad():
        out = model(x, chunk_rows=3)
        features = model.backbone(x)
        x_seg = model.seg_features(features)
        a_seg = model.seg_affinity(x_seg)
        attended = a_seg @ to_rows(model.seg_affinity.g(x_seg))
        x_seg_enhanced = x_seg + model.seg_affinity.output(from_rows(attended, 8, 10))
        torch.testing.assert_close(out.seg, model.seg_predictor(x_seg_enhanced))
        a_sal = model.sal_affinity(model.sal_features(features))
        a_ct = reference_cross_task(model.cross_task_affinity, a_seg, a_sal)
        expected_refined = from_rows(a_ct @ to_rows(out.seg), 8, 10)
    torch.testing.assert_close(out.seg_refined, expected_refined)


def test_propagate_rejects_maps_of_another_size() -> None:
    model = small_model().eval()
    with torch.no_grad():
        out = model(images())
        with pytest.raises(ValueError, match="propagate"):
            model.propagate(out.affinity, torch.zeros(2, 3, 4, 4))


# ---------------------------------------------------------------- memory budget


def test_chunk_rows_follow_the_budget() -> None:
    n, batch = 4800, 1  # a 640 x 480 image at output stride 8
    row_bytes = batch * n * 4 * NXN_ROWS_PER_CHUNK_ROW
    for budget_mb in (8, 64, 256):
        rows = chunk_rows_for_budget(n, batch, memory_bytes=budget_mb * 2**20)
        assert chunk_peak_bytes(rows, n, batch) <= budget_mb * 2**20
        assert chunk_peak_bytes(rows + 1, n, batch) > budget_mb * 2**20  # and uses it
        assert rows == budget_mb * 2**20 // row_bytes - 2
    assert chunk_rows_for_budget(n, 8, memory_bytes=256 * 2**20) < chunk_rows_for_budget(
        n, 1, memory_bytes=256 * 2**20
    )
    assert chunk_rows_for_budget(100, 1, memory_bytes=2**40) == 100  # never beyond N
    assert chunk_rows_for_budget(n, 64, memory_bytes=1) == 1  # never below one row


def record_cross_task_chunks(model: AuxSegNet) -> tuple[list[tuple[int, ...]], object]:
    shapes: list[tuple[int, ...]] = []

    def hook(module, inputs, output) -> None:
        shapes.append(tuple(inputs[0].shape))

    return shapes, model.cross_task_affinity.register_forward_hook(hook)


def test_inference_keeps_affinity_chunks_under_the_budget() -> None:
    budget_mb = 2.0
    model = small_model(width=8, memory_mb=budget_mb).eval()
    x = images(batch=1, height=256, width=256)  # 32 x 32 features, N = 1024
    shapes, handle = record_cross_task_chunks(model)
    with torch.no_grad():
        budgeted = model(x)
    handle.remove()
    n = 1024
    assert len(shapes) > 10  # the budget forced many chunks
    for batch, channels, padded_rows, width in shapes:
        assert (batch, channels, width) == (1, 2, n)
        nxn_bytes = padded_rows * n * 4 * NXN_ROWS_PER_CHUNK_ROW
        assert nxn_bytes <= budget_mb * 2**20
    with torch.no_grad():
        whole = model(x, chunk_rows=n)
    torch.testing.assert_close(budgeted.seg_refined, whole.seg_refined)
    torch.testing.assert_close(budgeted.sal_refined, whole.sal_refined)


PEAK_MEMORY_SCRIPT = """
import torch
from raysseg.model.affinity import AffinityState, CrossTaskAffinity, affinity_products
from raysseg.model.affinity import chunk_rows_for_budget

torch.set_num_threads(1)
torch.manual_seed(0)

def state_of(h, w):
    return AffinityState(*[torch.randn(1, h * w, 128) * 0.1 for _ in range(4)], height=h, width=w)

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (peak RSS) to the current RSS
    return status_mb("VmRSS")

cross = CrossTaskAffinity()
with torch.no_grad():  # warm-up: kernels and thread pools allocate once
    affinity_products(state_of(4, 4), cross, chunk_rows=3, cross_values=torch.randn(1, 16, 3))
state, values = state_of(40, 40), torch.randn(1, 1600, 22)
with torch.no_grad():
    rows = chunk_rows_for_budget(1600, 1, memory_bytes=16 * 2**20)
    start = reset_peak()
    affinity_products(state, cross, chunk_rows=rows, cross_values=values, seg_values=values)
    chunked = status_mb("VmHWM") - start
    start = reset_peak()
    affinity_products(state, cross, chunk_rows=1600, cross_values=values, seg_values=values)
    whole = status_mb("VmHWM") - start
print(chunked, whole)
"""


def test_measured_peak_memory_follows_the_budget() -> None:
    # Peak RSS (Linux VmHWM, reset before each run) of a fresh process: N = 1600 with a 16 MB
    # budget against whole 10 MB matrices. Part of the chunked peak is fixed overhead (allocator).
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    chunked_mb, whole_mb = (float(v) for v in result.stdout.split())
    assert chunked_mb < 16 + 32, (chunked_mb, whole_mb)
    assert whole_mb > 4 * chunked_mb, (chunked_mb, whole_mb)


def test_training_forms_whole_affinities() -> None:
    model = small_model(memory_mb=0.001).train()
    shapes, handle = record_cross_task_chunks(model)
    model(images(batch=1))
    handle.remove()
    assert shapes == [(1, 2, 80 + 2, 80)]  # one chunk: all N rows plus the zero border rows


# ---------------------------------------------------------------- optimisation


def test_param_groups_cover_trainable_parameters_once() -> None:
    model = small_model()
    groups = model.param_groups(lr=0.01, head_lr_mult=10.0)
    seen = [id(p) for group in groups for p in group["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)) and set(seen) == trainable
    by_name = {group["name"]: group for group in groups}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in by_name["backbone"]["params"]} <= backbone_ids
    assert not {id(p) for p in by_name["heads"]["params"]} & backbone_ids
    assert by_name["backbone"]["lr"] == pytest.approx(0.01)
    assert by_name["heads"]["lr"] == pytest.approx(0.1)
    for group in groups:
        assert group["initial_lr"] == pytest.approx(0.01 * group["lr_mult"])
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_a_few_sgd_steps_reduce_the_loss() -> None:
    model = small_model()
    x = images(batch=2, height=64, width=64)
    seg_target = torch.zeros(2, 64, 64, dtype=torch.long)
    seg_target[0, :, 32:] = 1  # right half class 1
    seg_target[1, 16:48, 16:48] = 3  # centre square class 3
    targets = {
        "image_labels": torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]),
        "sal_target": (seg_target > 0).float(),
        "seg_target": seg_target,
    }

    def total_loss() -> torch.Tensor:
        return auxseg_losses(model(x), **targets, w_cls=1.0, w_sal=1.0, w_seg=1.0)["total"]

    with torch.no_grad():
        before = total_loss().item()
    groups = model.param_groups(lr=0.01, head_lr_mult=10.0)
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    model.train()
    for _ in range(12):
        optimizer.zero_grad()
        total_loss().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = total_loss().item()
    assert after < before * 0.85


# ---------------------------------------------------------------- rebuilding and weights


def test_model_args_round_trip_gives_identical_outputs() -> None:
    model = small_model(seed=1).eval()
    args = json.loads(json.dumps(model.model_args()))  # plain JSON
    rebuilt = build_model_from_args(args).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        first, second = model(x), rebuilt(x)
    torch.testing.assert_close(first.seg_refined, second.seg_refined, rtol=0, atol=0)
    torch.testing.assert_close(first.cls_logits, second.cls_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="colour"):
        build_model_from_args({**args, "colour": 1})


def test_build_model_from_config() -> None:
    config = ModelConfig(backbone="small", num_classes=3, small_width=8, affinity_temperature=2.0)
    model = build_model(config)
    assert model.num_classes == 3 and model.backbone.out_channels == 8
    assert model.seg_affinity.temperature == 2.0
    assert model.model_args()["backbone"] == "small"


def test_weights_load_from_a_path_and_a_uri(tmp_path) -> None:
    torch.manual_seed(7)
    source = build_backbone("small", small_width=8)
    path = tmp_path / "small.pt"
    torch.save(source.state_dict(), path)
    for pretrained in (str(path), path.as_uri()):
        loaded = build_backbone("small", small_width=8, pretrained=pretrained)
        for (name, a), b in zip(
            source.state_dict().items(), loaded.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(a, b, msg=name)
        assert set(loaded.frozen_parameter_names()) == {
            n for n, p in loaded.named_parameters() if not p.requires_grad
        }


def test_weights_of_a_whole_model_load_into_the_backbone(tmp_path) -> None:
    model = small_model(seed=3, width=8)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = build_backbone("small", small_width=8, pretrained=str(path))
    first_conv = "blocks.0.0.weight"
    torch.testing.assert_close(
        loaded.state_dict()[first_conv], model.backbone.state_dict()[first_conv]
    )


def test_unexpected_keys_are_reported_and_a_missing_key_is_an_error(tmp_path) -> None:
    state = build_backbone("small", small_width=8).state_dict()
    state["fc.weight"] = torch.zeros(2)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    match = load_backbone_weights(build_backbone("small", small_width=8), str(path))
    assert match.missing == [] and match.unexpected == ["fc.weight"]
    del state["blocks.3.0.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"extra\.pt.*missing.*blocks\.3\.0\.weight"):
        load_backbone_weights(build_backbone("small", small_width=8), str(path))


def test_missing_or_bad_weights_files_are_named(tmp_path) -> None:
    absent = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=r"weights\.pth"):
        build_backbone("small", pretrained=str(absent))
    with pytest.raises(FileNotFoundError, match=r"weights\.pth"):
        build_backbone("small", pretrained=absent.as_uri())
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        build_backbone("small", pretrained=str(garbage))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"something.else": torch.zeros(1)}, unrelated)
    with pytest.raises(ValueError, match=r"unrelated\.pth"):
        build_backbone("small", pretrained=str(unrelated))
