"""The real-pixel composite dataset: IDX reading, product masks, a VOC layout voc_records reads."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from raysseg.data import io
from raysseg.data.composite import (
    FASHION_ENV,
    fashion_mnist_dir,
    generate_composites,
    product_silhouette,
    read_idx,
)
from raysseg.data.records import labels_from_mask
from raysseg.data.sources import voc_records


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip_and_truncation(tmp_path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    with gzip.open(tmp_path / "b.gz", "wb") as handle:
        handle.write(bytes([0, 0, 0x08, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match=r"b\.gz"):
        read_idx(tmp_path / "b.gz")


def test_silhouette_fills_pinholes_but_keeps_openings() -> None:
    product = np.zeros((28, 28), dtype=np.uint8)
    product[4:24, 4:24] = 200
    product[10, 10] = 0  # a dark pinhole inside: object
    product[14:20, 12:18] = 0  # a 36-pixel opening (a bag's handle): background
    mask = product_silhouette(product)
    assert mask[10, 10] == 1 and mask[16, 14] == 0 and mask[0, 0] == 0 and mask[5, 5] == 1


def test_named_folder_without_the_files_is_an_error_naming_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        fashion_mnist_dir()


def test_composites_read_back_through_the_voc_reader(tmp_path) -> None:
    info = generate_composites(str(tmp_path), n_train=6, n_val=2, size=64, seed=3)
    assert info["class_names"][0] == "background" and len(info["class_names"]) == 6
    train = list(voc_records(str(tmp_path), "train"))
    assert len(train) == 6 and len(list(voc_records(str(tmp_path), "val"))) == 2
    for record in train:
        image, mask = io.read_image(record.image_uri), io.read_label(record.mask_uri)
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert 1 <= len(record.labels) <= 2
        assert record.labels == labels_from_mask(mask, 6)
        # Real photo pixels around the products: far from a flat fill.
        assert image[mask == 0].std() > 10
    again = tmp_path / "again"
    generate_composites(str(again), n_train=1, n_val=0, size=64, seed=3)
    np.testing.assert_array_equal(
        io.read_label(str(again / "SegmentationClass" / "train_000000.png")),
        io.read_label(train[0].mask_uri),
    )
