"""Offline saliency sources on the real VOC image: folder PNGs, U^2-Net-P, spectral, cache."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx_helpers import saliency_onnx
from PIL import Image

from raysseg.config import ConfigError, DataConfig
from raysseg.labels.saliency import (
    CachedSaliency,
    FolderSaliency,
    SaliencySource,
    SpectralResidualSaliency,
    U2NetPSaliency,
    build_saliency,
    check_saliency_onnx,
    resolve_saliency,
    u2netp_model_path,
)
from raysseg.rundir.layout import shard_of


def _check_map(saliency: np.ndarray, shape: tuple[int, int]) -> None:
    assert saliency.shape == shape
    assert saliency.dtype == np.float32
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    assert saliency.max() > saliency.min()  # not a constant map


@pytest.fixture(scope="module")
def u2netp() -> U2NetPSaliency:
    return U2NetPSaliency()


def test_folder_saliency_reads_grey_png(tmp_path: Path, voc_sample: dict) -> None:
    mask = voc_sample["mask"]
    grey = np.where(mask > 0, 200, 10).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "2007_000001.png")
    saliency = FolderSaliency(tmp_path)(voc_sample["rgb"], "2007_000001")
    _check_map(saliency, mask.shape)
    np.testing.assert_allclose(saliency, grey / 255.0, atol=1e-6)


def test_folder_saliency_missing_file_names_it(tmp_path: Path, voc_sample: dict) -> None:
    with pytest.raises(FileNotFoundError, match=r"no_such_image\.png"):
        FolderSaliency(tmp_path)(voc_sample["rgb"], "no_such_image")


def test_folder_saliency_wrong_size_names_file_and_sizes(tmp_path: Path, voc_sample: dict) -> None:
    Image.fromarray(np.zeros((10, 20), np.uint8), mode="L").save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"small\.png.*\(10, 20\).*\(375, 500\)"):
        FolderSaliency(tmp_path)(voc_sample["rgb"], "small")


def test_image_ids_cannot_escape_the_folder(tmp_path: Path, voc_sample: dict) -> None:
    with pytest.raises(ValueError, match="relative"):
        FolderSaliency(tmp_path / "a")(voc_sample["rgb"], "../secret")


def test_u2netp_finds_the_object(u2netp: U2NetPSaliency, voc_sample: dict) -> None:
    saliency = u2netp(voc_sample["rgb"], "voc")
    _check_map(saliency, voc_sample["mask"].shape)
    objects = (voc_sample["mask"] > 0) & (voc_sample["mask"] != 255)
    inside, outside = saliency[objects].mean(), saliency[~objects].mean()
    assert inside > 2.5 * outside and inside - outside > 0.15, (inside, outside)
    # Loading the ONNX file from the installed package did not import (execute) rembg.
    assert "rembg" not in sys.modules


def test_u2netp_is_deterministic_and_picklable(u2netp: U2NetPSaliency, voc_sample: dict) -> None:
    first = u2netp(voc_sample["rgb"], "voc")
    copy = pickle.loads(pickle.dumps(u2netp))
    assert copy._session is None  # the ONNX session is rebuilt lazily on the other side
    np.testing.assert_allclose(copy(voc_sample["rgb"], "voc"), first, atol=1e-5)


def test_spectral_residual(voc_sample: dict) -> None:
    saliency = SpectralResidualSaliency()(voc_sample["rgb"], "voc")
    _check_map(saliency, voc_sample["mask"].shape)
    assert saliency.max() == pytest.approx(1.0) and saliency.min() == pytest.approx(0.0)


class CountingSource(SaliencySource):
    def __init__(self, inner: SaliencySource) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, image: np.ndarray, image_id: str) -> np.ndarray:
        self.calls += 1
        return self.inner(image, image_id)


def test_cache_writes_then_reads_without_recomputing(tmp_path: Path, voc_sample: dict) -> None:
    counting = CountingSource(SpectralResidualSaliency())
    cached = CachedSaliency(counting, tmp_path / "cache")
    first = cached(voc_sample["rgb"], "img_1")
    assert counting.calls == 1
    shard = tmp_path / "cache" / shard_of("img_1")
    assert (shard / "img_1.png").is_file()
    assert sorted(p.name for p in shard.iterdir()) == ["img_1.png"]  # no temp file
    second = cached(voc_sample["rgb"], "img_1")
    assert counting.calls == 1
    np.testing.assert_array_equal(first, second)
    # The stored map is the computed one up to PNG quantisation.
    direct = SpectralResidualSaliency()(voc_sample["rgb"], "img_1")
    assert np.abs(first - direct).max() <= 0.5 / 255 + 1e-6
    # A new wrapper over the same folder reuses the files (the next stage / a resumed run).
    fresh = CountingSource(SpectralResidualSaliency())
    np.testing.assert_array_equal(
        CachedSaliency(fresh, tmp_path / "cache")(voc_sample["rgb"], "img_1"), first
    )
    assert fresh.calls == 0
    cached(voc_sample["rgb"], "img_2")
    assert counting.calls == 2


def test_build_saliency_picks_the_configured_source(tmp_path: Path) -> None:
    folder = build_saliency(DataConfig(saliency="folder", saliency_dir=str(tmp_path)), None)
    assert isinstance(folder, FolderSaliency)
    assert isinstance(build_saliency(DataConfig(saliency="u2netp"), None), U2NetPSaliency)
    spectral = build_saliency(DataConfig(saliency="spectral"), str(tmp_path))
    assert isinstance(spectral, CachedSaliency)
    assert isinstance(spectral.source, SpectralResidualSaliency)
    with pytest.raises(ValueError, match=r"data\.saliency_dir"):
        build_saliency(DataConfig(saliency="folder", saliency_dir=""), None)
    with pytest.raises(ValueError, match=r"data\.saliency'"):
        build_saliency(DataConfig(saliency="dss"), None)


# ----------------------------------------------------------------------------------------------
# Which prior a run uses ("auto"), and a user's own ONNX saliency net


def _voc_root(tmp_path: Path, with_saliency: bool) -> Path:
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    if with_saliency:
        (root / "saliency").mkdir()
    return root


def test_auto_uses_the_dataset_saliency_folder_when_it_is_there(tmp_path: Path) -> None:
    root = _voc_root(tmp_path, with_saliency=True)
    choice = resolve_saliency(DataConfig(root=str(root)))  # data.saliency defaults to "auto"
    assert choice.data.saliency == "folder"
    assert choice.data.saliency_dir == str(root / "saliency")
    assert choice.description == f"folder {root / 'saliency'}" and choice.notes == ()
    assert isinstance(build_saliency(DataConfig(root=str(root)), None), FolderSaliency)
    # Resolving a resolved config changes nothing (what config.yaml keeps resolves the same).
    assert resolve_saliency(choice.data).data == choice.data


def test_auto_without_a_folder_is_the_packaged_u2netp(tmp_path: Path) -> None:
    root = _voc_root(tmp_path, with_saliency=False)
    choice = resolve_saliency(DataConfig(root=str(root)))
    assert choice.data.saliency == "u2netp" and choice.notes == ()
    assert choice.description == f"u2netp {u2netp_model_path()}"
    # COCO / folder sources look only at data.saliency_dir, never at root/saliency.
    coco = _voc_root(tmp_path / "coco", with_saliency=True)
    assert resolve_saliency(DataConfig(source="coco", root=str(coco))).data.saliency == "u2netp"


def test_an_explicit_choice_is_kept_and_the_ignored_folder_is_said(tmp_path: Path) -> None:
    root = _voc_root(tmp_path, with_saliency=True)
    choice = resolve_saliency(DataConfig(root=str(root), saliency="spectral"))
    assert choice.data.saliency == "spectral"
    assert choice.notes == (
        f"saliency prior: the folder {root / 'saliency'} is ignored (data.saliency=spectral)",
    )
    # saliency=folder without saliency_dir takes the dataset's folder.
    folder = resolve_saliency(DataConfig(root=str(root), saliency="folder"))
    assert folder.data.saliency_dir == str(root / "saliency")


def test_a_named_saliency_dir_that_is_missing_is_a_config_error(tmp_path: Path) -> None:
    for choice in ("auto", "folder"):
        config = DataConfig(saliency=choice, saliency_dir=str(tmp_path / "no_maps"))
        with pytest.raises(ConfigError, match=r"data\.saliency_dir': '.*no_maps' is not a folder"):
            resolve_saliency(config)


def test_a_users_onnx_saliency_net_is_checked_and_used(tmp_path: Path, voc_sample: dict) -> None:
    model = saliency_onnx(tmp_path / "my_saliency.onnx", size=64)
    assert check_saliency_onnx(model) == (64, 64)
    config = DataConfig(saliency="u2netp", saliency_model=str(model))
    choice = resolve_saliency(config)
    assert choice.description == f"u2netp {model}"
    source = build_saliency(config, None)
    assert isinstance(source, U2NetPSaliency) and source.model_path == str(model)
    _check_map(source(voc_sample["rgb"], "voc"), voc_sample["mask"].shape)
    # The packaged model passes the same check (its input size is symbolic: 320 x 320 is used).
    assert check_saliency_onnx(u2netp_model_path()) == (320, 320)
