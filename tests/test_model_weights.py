"""Backbone weights as users have them: PSA's MXNet .params, torch state dicts, raysseg checkpoints,
the key policy, `model.pretrained` semantics and `raysseg weights inspect`."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raysseg.cli import main
from raysseg.config import ConfigError, ModelConfig
from raysseg.engine.checkpoint import save_checkpoint
from raysseg.model.builder import build_backbone
from raysseg.model.network import build_model
from raysseg.model.weights import (
    WeightsError,
    check_pretrained,
    load_backbone_weights,
    pretrained_choice,
    psa_to_resnet38d,
    read_mxnet_params,
    read_weights,
)

# ---------------------------------------------------------------- an MXNet NDArray-list writer
# Written from the documented layout (mxnet src/ndarray/ndarray.cc, NDArray::Save), independently
# of the reader: uint64 0x112, uint64 0, uint64 count, arrays, uint64 count, (uint64 len + bytes)*.

V1_MAGIC, V2_MAGIC = 0xF993FAC8, 0xF993FAC9
TYPE_FLAGS = {np.float32: 0, np.float64: 1, np.float16: 2, np.uint8: 3, np.int32: 4, np.int64: 6}


def ndarray_bytes(array: np.ndarray, version: str = "V2") -> bytes:
    shape = array.shape
    if version == "legacy":  # no magic: uint32 ndim, uint32 dims
        header = struct.pack(f"<I{len(shape)}I", len(shape), *shape)
    else:
        dims = struct.pack(f"<i{len(shape)}q", len(shape), *shape)
        header = (
            struct.pack("<Ii", V2_MAGIC, 0) + dims
            if version == "V2"
            else struct.pack("<I", V1_MAGIC) + dims
        )
    context = struct.pack("<ii", 1, 0)  # cpu(0)
    flag = struct.pack("<i", TYPE_FLAGS[array.dtype.type])
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return header + context + flag + data


def write_params(path: Path, arrays: dict[str, np.ndarray], version: str = "V2") -> Path:
    with open(path, "wb") as out:
        out.write(struct.pack("<QQQ", 0x112, 0, len(arrays)))
        for array in arrays.values():
            out.write(ndarray_bytes(array, version))
        out.write(struct.pack("<Q", len(arrays)))
        for name in arrays:
            encoded = name.encode()
            out.write(struct.pack("<Q", len(encoded)) + encoded)
    return path


# ---------------------------------------------------------------- PSA's names for resnet38d
# The inverse of PSA's convert_mxnet_to_torch: raysseg key -> the MXNet name in PSA's file.
BN_TO_MXNET = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_var",
}


def psa_name(key: str) -> str:
    module, *rest = key.split(".")
    param = rest[-1]
    role = "aux" if param.startswith("running") else "arg"
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    if module == "bn7":
        return f"{role}:bn7_{BN_TO_MXNET[param]}"
    kind, branch = rest[0].split("_", 1)  # conv_branch2a -> conv, branch2a
    stage, _, index = module[1:].partition("_")  # b4_5 -> 4, 5 ; b6 -> 6, ""
    block = f"{stage}a" if not index else f"{stage}b{index}"
    if kind == "conv":
        return f"arg:res{block}_{branch}_weight"
    return f"{role}:bn{block}_{branch}_{BN_TO_MXNET[param]}"


def empty_backbone(name: str, **kwargs) -> torch.nn.Module:
    """A backbone with uninitialised weights (a load overwrites them; random init takes seconds)."""
    with torch.device("meta"):
        backbone = build_backbone(name, pretrained=None, **kwargs)
    return backbone.to_empty(device="cpu")


def psa_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Every resnet38d tensor under PSA's name and shape, plus PSA's ImageNet classifier.

    Big conv weights are uint8 (a 100 MB file instead of 400 MB); batch norm in float32, float16
    and float64, so the reader's type flags are all exercised.
    """
    rng = np.random.default_rng(seed)
    with torch.device("meta"):
        expected = build_backbone("resnet38d", pretrained=None).state_dict()
    arrays = {}
    for key, tensor in expected.items():
        if key.endswith("num_batches_tracked"):
            continue
        shape = tuple(tensor.shape)
        if tensor.dim() == 4:
            array = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif key.startswith("bn7."):
            array = rng.standard_normal(shape)  # float64
        elif key.startswith("b2."):
            array = rng.standard_normal(shape).astype(np.float16)
        else:
            array = rng.standard_normal(shape, dtype=np.float32)
        arrays[psa_name(key)] = array
    arrays["arg:linear1000_weight"] = rng.integers(0, 256, size=(1000, 4096), dtype=np.uint8)
    arrays["arg:linear1000_bias"] = np.zeros(1000, dtype=np.float32)
    return arrays


@pytest.fixture(scope="module")
def psa_file(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = psa_arrays()
    path = tmp_path_factory.mktemp("psa") / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    return write_params(path, arrays), arrays


# ---------------------------------------------------------------- .params


def test_psa_names_map_as_psas_converter_does() -> None:
    assert psa_to_resnet38d("arg:conv1a_weight") == "conv1a.weight"
    assert psa_to_resnet38d("arg:res2a_branch1_weight") == "b2.conv_branch1.weight"
    assert psa_to_resnet38d("arg:res4b5_branch2b1_weight") == "b4_5.conv_branch2b1.weight"
    assert psa_to_resnet38d("arg:bn2b1_branch2a_gamma") == "b2_1.bn_branch2a.weight"
    assert psa_to_resnet38d("arg:bn5a_branch2b1_beta") == "b5.bn_branch2b1.bias"
    assert psa_to_resnet38d("aux:bn6a_branch2b2_moving_var") == "b6.bn_branch2b2.running_var"
    assert psa_to_resnet38d("aux:bn7_moving_mean") == "bn7.running_mean"
    assert psa_to_resnet38d("arg:linear1000_weight") == "linear1000_weight"  # not a backbone key


def test_psa_params_round_trip_into_resnet38d(psa_file) -> None:
    path, arrays = psa_file
    backbone = empty_backbone("resnet38d")
    match = load_backbone_weights(backbone, str(path))
    assert sorted(match.unexpected) == ["linear1000_bias", "linear1000_weight"]
    assert not match.missing and not match.wrong_shape
    state = backbone.state_dict()
    loaded = 0
    for name, array in arrays.items():
        key = psa_to_resnet38d(name)
        if key in state:
            assert torch.equal(state[key], torch.from_numpy(array).to(torch.float32)), key
            loaded += 1
    assert loaded == len(arrays) - 2 == len(match.matched)


def test_a_truncated_params_file_is_an_error_naming_the_file(psa_file, tmp_path) -> None:
    path, _ = psa_file
    truncated = tmp_path / "cut.params"
    shutil.copyfile(path, truncated)
    size = truncated.stat().st_size
    for cut in (size - 3, size // 2, 20):  # in the names, in the data, in the header
        os.truncate(truncated, cut)
        with pytest.raises(WeightsError, match=r"cut\.params.*truncated"):
            read_weights(str(truncated))


def test_a_params_file_with_a_wrong_shape_names_key_and_shapes(psa_file, tmp_path) -> None:
    arrays = dict(psa_file[1])
    arrays["arg:res3b1_branch2a_weight"] = np.zeros((256, 256, 1, 1), dtype=np.uint8)
    path = write_params(tmp_path / "wrong.params", arrays)
    with pytest.raises(WeightsError) as caught:
        load_backbone_weights(empty_backbone("resnet38d"), str(path))
    message = str(caught.value)
    assert "wrong.params" in message and "'b3_1.conv_branch2a.weight'" in message
    assert "(256, 256, 1, 1)" in message and "(256, 256, 3, 3)" in message


def test_garbage_and_corrupt_files_are_errors_naming_the_file(tmp_path) -> None:
    garbage = tmp_path / "garbage.params"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=r"garbage\.params"):
        read_weights(str(garbage))
    corrupt = tmp_path / "corrupt.params"  # the right magic, then nonsense
    corrupt.write_bytes(struct.pack("<QQQ", 0x112, 0, 3) + b"\xff" * 64)
    with pytest.raises(WeightsError, match=r"corrupt\.params"):
        read_weights(str(corrupt))
    huge = tmp_path / "huge.params"  # a corrupt shape must not allocate what it claims
    array = struct.pack("<Iii2qiii", V2_MAGIC, 0, 2, 2**40, 2**40, 1, 0, 0)
    huge.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + array)
    with pytest.raises(WeightsError, match=r"huge\.params.*array 0 data"):
        read_weights(str(huge))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty\.pth.*empty file"):
        read_weights(str(empty))


@pytest.mark.parametrize("version", ["V1", "legacy"])
def test_older_ndarray_versions_are_read(tmp_path, version) -> None:
    arrays = {"arg:a": np.arange(6, dtype=np.float32).reshape(2, 3), "aux:b": np.ones(4)}
    path = write_params(tmp_path / "old.params", arrays, version=version)
    with open(path, "rb") as stream:
        read, found = read_mxnet_params(stream, path.stat().st_size, str(path))
    assert found == version
    for name, array in arrays.items():
        np.testing.assert_array_equal(read[name], array)


# ---------------------------------------------------------------- torch files


@pytest.fixture(scope="module")
def torchvision_state() -> dict[str, torch.Tensor]:
    import torchvision

    # Built on the meta device and filled with one value per tensor: the names, shapes and dtypes
    # are torchvision's, and skipping its random init saves a second.
    with torch.device("meta"):
        net = torchvision.models.resnet50(weights=None)
    state = net.to_empty(device="cpu").state_dict()
    for index, tensor in enumerate(state.values()):
        tensor.fill_(index)
    return state


def test_a_torchvision_state_dict_loads_with_only_fc_unexpected(torchvision_state, tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_state, path)
    backbone = empty_backbone("resnet50")
    match = load_backbone_weights(backbone, str(path))
    assert sorted(match.unexpected) == ["fc.bias", "fc.weight"] and not match.missing
    loaded = backbone.state_dict()
    for key in match.matched:
        assert torch.equal(loaded[key], torchvision_state[key]), key


def test_a_state_dict_with_a_key_removed_is_an_error_naming_it(torchvision_state, tmp_path):
    state = {k: v for k, v in torchvision_state.items() if k != "layer3.2.bn2.running_var"}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"partial\.pth.*1 backbone keys missing.*layer3\.2"):
        load_backbone_weights(empty_backbone("resnet50"), str(path))


def test_a_raysseg_checkpoint_initialises_a_backbone(tmp_path) -> None:
    torch.manual_seed(3)
    model = build_model(ModelConfig(backbone="small", num_classes=3, small_width=8))
    path = save_checkpoint(tmp_path / "stage.pt", model, epoch=2)
    assert "raysseg checkpoint" in read_weights(str(path)).format
    backbone = build_backbone("small", small_width=8, pretrained=str(path))
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- model.pretrained


def test_empty_pretrained_is_refused_for_the_resnets_naming_the_key() -> None:
    for backbone in ("resnet38d", "resnet50", "resnet101"):
        with pytest.raises(ConfigError, match=r"'model\.pretrained'.*'none'"):
            check_pretrained(ModelConfig(backbone=backbone))
    assert check_pretrained(ModelConfig(backbone="small")) == "untrained"
    assert check_pretrained(ModelConfig(backbone="efficientnet_lite0")) == "packaged"
    assert check_pretrained(ModelConfig(backbone="resnet50", pretrained="none")) == "random"
    assert pretrained_choice("resnet50", "torchvision") == "torchvision"
    assert pretrained_choice("resnet38d", None) == "skip"
    with pytest.raises(WeightsError, match="torchvision"):
        pretrained_choice("resnet38d", "torchvision")


def test_a_local_weights_file_that_does_not_exist_is_refused(tmp_path) -> None:
    absent = tmp_path / "weights.pth"
    with pytest.raises(ConfigError, match=r"'model\.pretrained'.*weights\.pth"):
        check_pretrained(ModelConfig(backbone="resnet50", pretrained=str(absent)))


def test_pretrained_none_warns_of_random_weights(caplog) -> None:
    with caplog.at_level(logging.WARNING), torch.device("meta"):
        build_backbone("resnet50", pretrained="none")
    assert "random weights" in caplog.text and "resnet50" in caplog.text


def test_pipeline_with_empty_pretrained_fails_before_ray(tmp_path, capsys) -> None:
    ray_loaded = "ray" in sys.modules
    run_dir = tmp_path / "run"
    code = main(
        ["pipeline", f"data.root={tmp_path}", "model.backbone=resnet50", f"run_dir={run_dir}"]
    )
    assert code == 2
    assert "'model.pretrained'" in capsys.readouterr().err
    assert not run_dir.exists()
    assert ray_loaded or "ray" not in sys.modules


# ---------------------------------------------------------------- raysseg weights inspect


def test_weights_inspect_reports_a_good_and_a_bad_file(tmp_path, capsys) -> None:
    state = build_backbone("small", small_width=8).state_dict()
    good = tmp_path / "good.pth"
    torch.save({**state, "fc.weight": torch.zeros(2)}, good)
    assert main(["weights", "inspect", str(good), "--backbone", "small", "--small-width", "8"]) == 0
    out = capsys.readouterr().out
    assert f"matched: {len(state)}" in out and "missing: 0" in out
    assert "unexpected: 1: fc.weight" in out and "the load would succeed" in out

    del state["blocks.3.0.weight"]
    state["blocks.0.0.weight"] = torch.zeros(4, 3, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    assert main(["weights", "inspect", str(bad), "--backbone", "small", "--small-width", "8"]) == 1
    out = capsys.readouterr().out
    assert "missing: 1: blocks.3.0.weight" in out and "wrong shape: 1" in out
    assert "blocks.0.0.weight: file (4, 3, 1, 1), backbone (4, 3, 3, 3)" in out
    assert "the load would fail" in out


def test_weights_inspect_of_psas_params_and_bad_input(psa_file, tmp_path, capsys) -> None:
    path, _ = psa_file
    assert main(["weights", "inspect", str(path), "--backbone", "resnet38d"]) == 0
    out = capsys.readouterr().out
    assert "MXNet .params" in out and "unexpected: 2: linear1000_weight, linear1000_bias" in out
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    assert main(["weights", "inspect", str(garbage), "--backbone", "small"]) == 1
    assert "garbage.pth" in capsys.readouterr().err
    assert main(["weights", "inspect", str(tmp_path / "absent.pth"), "--backbone", "small"]) == 2
    assert main(["weights", "inspect", str(path), "--backbone", "vgg16"]) == 2
    assert "vgg16" in capsys.readouterr().err
