"""Bad input, one test per kind: each is refused with an error naming the file / key / value, or
recorded (errors table with the reason) within the error budget, and nothing already written is lost.

Decisions documented here and in docs/DESIGN.md:
- huge images are refused from the file header (`io.MAX_IMAGE_PIXELS`, 40 MP) before any pixel is
  decoded, so a decompression bomb never allocates;
- non-UTF-8 text (split / labels / class-name files) and non-UTF-8 file names are errors naming the
  file (pyarrow paths and Parquet strings are UTF-8);
- label maps of another size than their image, or with ids past the classes (255 = ignore is fine),
  are refused naming the file; in a label update they are recorded per image.
"""

from __future__ import annotations

import hashlib
import io as pyio
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from ray_helpers import tiny_config

from raysseg import storage
from raysseg.config import ConfigError, load_config
from raysseg.data import io
from raysseg.data.dataset import StageDataset
from raysseg.data.manifest import read_manifest, write_manifest
from raysseg.data.records import DataError, Record
from raysseg.data.sources import coco_records, folder_records, voc_records
from raysseg.data.synth import generate_synthetic
from raysseg.engine.checkpoint import CheckpointError, load_checkpoint
from raysseg.labels.saliency import FolderSaliency
from raysseg.labels.update import initial_labels
from raysseg.rundir import layout

REPO = Path(__file__).resolve().parents[1]


def _rgb(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _jpeg_bytes(array: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = pyio.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """A tiny synthetic VOC-layout dataset (6 classes, 6 train images, 40 px)."""
    root = tmp_path / "voc"
    generate_synthetic(str(root), n_train=6, n_val=0, size=40, seed=3)
    return root


# ---------------------------------------------------------------------------------------------
# Image files


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    data = _jpeg_bytes(_rgb(64, 64))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.ImageReadError, match=r"cannot read image '.*cut\.jpg'"):
        io.read_image(str(path))


def test_zero_byte_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(io.ImageReadError, match=r"'.*empty\.jpg': the file is empty \(0 bytes\)"):
        io.read_image(str(path))


def test_non_image_with_image_extension_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is a text file, not a PNG")
    with pytest.raises(io.ImageReadError, match=r"cannot read image '.*notes\.png'"):
        io.read_image(str(path))


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    ys, xs = np.mgrid[0:32, 0:32]
    rgb = np.stack([xs * 8, ys * 8, np.full_like(xs, 128)], axis=2).astype(np.uint8)
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(_jpeg_bytes(rgb, mode="CMYK"))
    assert Image.open(path).mode == "CMYK"
    out = io.read_image(str(path))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 6  # JPEG loss only, same colours


def test_16_bit_png_is_scaled_to_8_bit(tmp_path: Path) -> None:
    grey16 = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(grey16).save(path)
    assert Image.open(path).mode.startswith("I;16")
    out = io.read_image(str(path))
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    expected = np.clip(grey16 / 257.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_grayscale_image_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = _rgb()[..., 0]
    path = tmp_path / "grey.png"
    Image.fromarray(grey, mode="L").save(path)
    out = io.read_image(str(path))
    assert out.shape == (24, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], grey)


def test_rgba_image_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([_rgb(), np.full((24, 32, 1), 7, np.uint8)], axis=2)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    np.testing.assert_array_equal(io.read_image(str(path)), rgba[..., :3])


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height; its pixel data stops after one row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    first_row = zlib.compress(b"\x00" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", first_row)
        + _png_chunk(b"IEND", b"")
    )


def test_huge_image_is_refused_from_its_header_before_decoding(tmp_path: Path) -> None:
    # 8000 x 8000 = 64 MP declared in a file of a few dozen bytes: decoding would allocate 192 MB
    # as RGB. The refusal names the size and the limit, which only the header check produces
    # (decoding this file would fail differently, on the missing rows). Above 179 MP PIL itself
    # refuses in Image.open (DecompressionBombError), also reported naming the file.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(8000, 8000))
    assert path.stat().st_size < 200
    with pytest.raises(io.ImageReadError, match=r"bomb\.png'.*8000 x 8000 = 64000000 pixels"):
        io.read_image(str(path))
    with pytest.raises(io.ImageReadError, match=r"over the limit of 40000000"):
        io.read_image_size(str(path))
    path.write_bytes(_png_declaring(30_000, 30_000))
    with pytest.raises(io.ImageReadError, match=r"bomb\.png'.*decompression bomb"):
        io.read_label(str(path))


def test_image_smaller_than_the_crop_is_padded(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.fromarray(_rgb(10, 14)).save(path)
    dataset = StageDataset(
        [Record("small", str(path), (1,))],
        "warmup",
        num_classes=3,
        crop_size=32,
        scale_min=1.0,  # no rescaling: the 10 x 14 image stays 10 x 14 inside the 32 x 32 crop
        scale_max=1.0,
        flip=False,
    )
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32)
    # Only the real pixels are marked valid; the rest is padding the losses leave out.
    assert int(item["valid"].sum()) == 10 * 14


# ---------------------------------------------------------------------------------------------
# Label and saliency maps


def _train_record(tmp_path: Path, seg: np.ndarray, image_size=(24, 32)) -> Record:
    image = tmp_path / "img.png"
    Image.fromarray(_rgb(*image_size)).save(image)
    seg_uri, sal_uri = str(tmp_path / "seg.png"), str(tmp_path / "sal.png")
    io.write_png_atomic(seg_uri, seg, palette=io.voc_palette())
    io.write_png_atomic(sal_uri, np.zeros(image_size, np.uint8))
    return Record("img", str(image), (1,), seg_label_uri=seg_uri, sal_label_uri=sal_uri)


def test_label_png_of_the_wrong_size_names_the_file_and_sizes(tmp_path: Path) -> None:
    record = _train_record(tmp_path, np.zeros((20, 30), np.uint8))
    dataset = StageDataset([record], "train", num_classes=3, crop_size=16)
    with pytest.raises(DataError, match=r"seg\.png' is \(H, W\) = \(20, 30\).*\(24, 32\)"):
        dataset[0]


def test_label_values_outside_the_class_range_name_file_and_value(tmp_path: Path) -> None:
    seg = np.zeros((24, 32), np.uint8)
    seg[0, 0], seg[1, 1] = 255, 9  # 255 (ignore) is fine; 9 is not a class of 3
    dataset = StageDataset([_train_record(tmp_path, seg)], "train", num_classes=3, crop_size=16)
    with pytest.raises(DataError, match=r"seg\.png' has class id 9, but there are only 3"):
        dataset[0]
    seg[1, 1] = 2
    io.write_png_atomic(str(tmp_path / "seg.png"), seg, palette=io.voc_palette())
    assert dataset[0]["seg"].shape == (16, 16)


def test_gt_mask_with_values_outside_the_class_range_is_refused_by_the_manifest(voc: Path):
    mask = voc / "SegmentationClass" / "train_000002.png"
    label = io.read_label(str(mask))
    label[0, 0] = 17
    io.write_png_atomic(str(mask), label, palette=io.voc_palette())
    with pytest.raises(DataError, match=r"train_000002\.png' has class id 17"):
        list(voc_records(str(voc), "train"))


def test_saliency_map_missing_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"saliency map '.*img_7\.png' does not exist"):
        FolderSaliency(tmp_path)(_rgb(), "img_7")


def test_saliency_map_of_the_wrong_size_names_the_file_and_sizes(tmp_path: Path) -> None:
    io.write_png_atomic(str(tmp_path / "img_8.png"), np.zeros((5, 6), np.uint8))
    with pytest.raises(ValueError, match=r"img_8\.png' has size \(H, W\) = \(5, 6\).*\(24, 32\)"):
        FolderSaliency(tmp_path)(_rgb(), "img_8")


def test_image_with_no_positive_class_trains_and_labels_as_background(tmp_path: Path) -> None:
    path = tmp_path / "empty_scene.png"
    Image.fromarray(_rgb()).save(path)
    item = StageDataset([Record("e", str(path), ())], "warmup", num_classes=4, crop_size=16)[0]
    assert item["labels"].tolist() == [0.0, 0.0, 0.0]  # a valid all-negative target
    saliency = np.random.default_rng(0).random((24, 32)).astype(np.float32)
    label = initial_labels(np.zeros((0, 24, 32), np.float32), [], saliency, load_config().labels)
    assert set(np.unique(label).tolist()) <= {0, 255}  # background or ignore, never a class


# ---------------------------------------------------------------------------------------------
# Dataset lists


def _folder_dataset(tmp_path: Path, rows: str) -> tuple[Path, Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.fromarray(_rgb()).save(images / f"{name}.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,labels\n" + rows)
    names = tmp_path / "names.txt"
    names.write_text("background\ncat\ndog\n")
    return images, labels, names


def test_unknown_class_name_names_file_image_and_name(tmp_path: Path) -> None:
    images, labels, names = _folder_dataset(tmp_path, "a,cat\nb,zebra\n")
    with pytest.raises(DataError, match=r"labels\.csv', image 'b': unknown class name 'zebra'"):
        list(folder_records(str(images), str(labels), str(names)))


def test_duplicate_image_ids_name_the_id_and_row(tmp_path: Path, voc: Path) -> None:
    images, labels, names = _folder_dataset(tmp_path, "a,cat\nb,dog\na,dog\n")
    with pytest.raises(DataError, match=r"labels\.csv', row 4: duplicate image id 'a'"):
        list(folder_records(str(images), str(labels), str(names)))
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    split.write_text(split.read_text() + "train_000001\n")
    with pytest.raises(DataError, match=r"train\.txt': duplicate image id 'train_000001'"):
        list(voc_records(str(voc), "train"))


def test_missing_file_listed_in_a_split_names_id_and_path(voc: Path) -> None:
    (voc / "JPEGImages" / "train_000004.jpg").unlink()
    with pytest.raises(DataError, match=r"lists image 'train_000004', but '.*train_000004\.jpg'"):
        list(voc_records(str(voc), "train"))


def test_cls_labels_npy_lacking_an_id_of_the_split_names_file_and_id(voc: Path) -> None:
    # PSA/AuxSegNet's cls_labels.npy: image id -> 0/1 vector of the C-1 = 5 foreground classes.
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    vectors = {image_id: np.eye(5, dtype=np.float32)[0] for image_id in ids if image_id != ids[3]}
    np.save(voc / "cls_labels.npy", vectors)
    labels_file = str(voc / "cls_labels.npy")
    with pytest.raises(DataError, match=rf"cls_labels\.npy' has no entry for image '{ids[3]}'"):
        list(voc_records(str(voc), "train", labels_file=labels_file))
    # Vectors of another length than the classes name the file, the id and the length.
    np.save(voc / "cls_labels.npy", {image_id: np.ones(20, np.float32) for image_id in ids})
    with pytest.raises(DataError, match=rf"cls_labels\.npy', image '{ids[0]}'.*\(20,\).*length 5"):
        list(voc_records(str(voc), "train", labels_file=labels_file))


def test_onnx_file_that_is_not_a_saliency_net_stops_the_run_before_work(voc, tmp_path) -> None:
    from onnx_helpers import classifier_onnx, three_channel_onnx

    from raysseg.distributed.pipeline import resolve_run_config  # needs no running Ray

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not a protobuf")
    cases = [
        (classifier_onnx(tmp_path / "classifier.onnx"), r"found inputs \[x: \('N', 10\)"),
        (three_channel_onnx(tmp_path / "rgb.onnx"), r"outputs \[y: \('N', 3, 'H', 'W'\)"),
        (garbage, "is not an ONNX model onnxruntime can load"),
        (tmp_path / "missing.onnx", "does not exist"),
    ]
    for model, message in cases:
        config = tiny_config(
            voc, tmp_path / "run", "data.saliency=u2netp", f"data.saliency_model={model}"
        )
        with pytest.raises(DataError, match=rf"saliency model '{model}'.*{message}"):
            resolve_run_config(config, log=lambda line: None)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_non_utf8_split_file_names_the_file_and_line(voc: Path) -> None:
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    split.write_bytes(split.read_bytes() + b"caf\xe9_001\n")
    with pytest.raises(DataError, match=r"train\.txt' is not UTF-8 text: line 7 reads 'caf"):
        list(voc_records(str(voc), "train"))


def test_non_utf8_labels_and_class_names_files_name_the_file(tmp_path: Path) -> None:
    images, labels, names = _folder_dataset(tmp_path, "a,cat\n")
    labels.write_bytes(labels.read_bytes() + b"b,d\xf6g\n")
    with pytest.raises(DataError, match=r"labels\.csv' is not UTF-8 text: line 3"):
        list(folder_records(str(images), str(labels), str(names)))
    names.write_bytes(b"background\nc\xe4t\n")
    with pytest.raises(DataError, match=r"names\.txt' is not UTF-8 text: line 2"):
        list(folder_records(str(images), str(labels), str(names)))


def test_non_utf8_file_names_are_named_not_crashed_on(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    raw_name = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    with open(raw_name, "wb") as handle:
        handle.write(_jpeg_bytes(_rgb()))
    path = os.fsdecode(raw_name)  # 'caf\udce9.png': how Python hands such names over
    with pytest.raises(ValueError, match=r"caf\\udce9\.png' is not valid UTF-8"):
        io.read_image(path)
    with pytest.raises(ValueError, match=r"folder '.*imgs' holds a file whose name is not valid"):
        storage.list_files(str(folder))


def test_corrupt_coco_json_names_the_file(tmp_path: Path) -> None:
    annotations = tmp_path / "instances_train.json"
    annotations.write_text('{"images": [{"id": 1, "file_name": "a.jpg"')  # cut short
    with pytest.raises(DataError, match=r"instances_train\.json': not valid JSON"):
        list(coco_records(str(annotations), str(tmp_path), str(tmp_path / "masks")))
    annotations.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataError, match=r"instances_train\.json': missing list 'annotations'"):
        list(coco_records(str(annotations), str(tmp_path), str(tmp_path / "masks")))


def test_empty_dataset_is_refused_naming_the_root(voc: Path, tmp_path: Path) -> None:
    from raysseg.distributed.manifests import build_manifests  # a small check needs no Ray

    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    config = tiny_config(voc, tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"data\.root '{voc}': the training split has no images"):
        build_manifests(config)


def _break_in_seven_ways(voc: Path) -> dict[str, str]:
    """Damage the 6-image `voc` fixture: {image id: a phrase of the problem it must report}."""
    jpegs, masks = voc / "JPEGImages", voc / "SegmentationClass"
    (jpegs / "train_000000.jpg").write_bytes(b"")
    (jpegs / "train_000001.jpg").write_bytes((jpegs / "train_000001.jpg").read_bytes()[:300])
    io.write_png_atomic(str(masks / "train_000002.png"), np.zeros((20, 20), np.uint8))
    out_of_range = io.read_label(str(masks / "train_000003.png"))
    out_of_range[0, 0] = 17
    io.write_png_atomic(str(masks / "train_000003.png"), out_of_range, palette=io.voc_palette())
    io.write_png_atomic(str(voc / "saliency" / "train_000004.png"), np.zeros((9, 9), np.uint8))
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    split.write_text(split.read_text() + "train_000005\ntrain_999999\n")
    return {
        "train_000000": "the file is empty (0 bytes)",
        "train_000001": "train_000001.jpg",
        "train_000002": "train_000002.png' is (H, W) = (20, 20), but its image",
        "train_000003": "train_000003.png' has class id 17",
        "train_000004": "train_000004.png' is (H, W) = (9, 9), but its image",
        "train_000005": "duplicate image id 'train_000005'",
        "train_999999": "lists image 'train_999999', but",
    }


def _check_problems_table(run: str, expected: dict[str, str]) -> None:
    rows = pq.read_table(layout.problems_table(run)).to_pylist()
    assert sorted(row["image_id"] for row in rows) == sorted(expected)
    for row in rows:
        assert row["split"] == "train"
        assert expected[row["image_id"]] in row["message"], row


@pytest.mark.parametrize("on_cluster", [False, True], ids=["in_the_driver", "with_ray_data"])
def test_manifest_step_finds_every_problem_at_once_and_leaves_them_out_within_the_budget(
    request, voc: Path, tmp_path: Path, on_cluster: bool
) -> None:
    """Seven kinds of breakage found in one pass: one table, one line quoting the first three.
    Over the error budget the step fails; within it the one sound item of 8 goes on."""
    from raysseg.distributed.manifests import build_manifests

    if on_cluster:
        request.getfixturevalue("local_ray")  # the shared Ray of this module
    expected = _break_in_seven_ways(voc)
    in_process_max = 0 if on_cluster else 1000
    config = tiny_config(voc, tmp_path / "run")
    with pytest.raises(DataError) as failure:
        build_manifests(config, in_process_max=in_process_max)
    message = str(failure.value)
    assert "resources.error_budget = 1.0%" in message
    assert "train: 7 of 8 listed images have problems (7 in all)" in message, message
    assert "and 4 more" in message and layout.problems_table(config.run_dir) in message
    _check_problems_table(config.run_dir, expected)

    lines: list[str] = []
    config = tiny_config(voc, tmp_path / "run", "resources.error_budget=0.9")
    counts = build_manifests(config, log=lines.append, in_process_max=in_process_max)
    assert counts["train_images"] == 1 and counts["train_left_out"] == 7
    assert counts["problems"] == 7
    kept = [r.image_id for r in read_manifest(layout.dataset_manifest(config.run_dir, "train"))]
    assert kept == ["train_000005"]
    assert any(line.startswith("manifest train: left out 7 of 8") for line in lines), lines
    _check_problems_table(config.run_dir, expected)
    assert not storage.exists(layout.listed_manifest(config.run_dir, "train"))


@pytest.mark.ray
def test_label_quality_records_a_mask_of_another_size_with_its_image_id(local_ray, tmp_path):
    from raysseg.distributed.evaluate import label_quality

    labels = np.zeros((12, 16), np.uint8)
    labels[:6] = 1
    rows = []
    for index, mask_shape in enumerate([(12, 16), (12, 16), (8, 8)]):
        seg, mask = tmp_path / f"seg_{index}.png", tmp_path / f"mask_{index}.png"
        io.write_png_atomic(str(seg), labels, palette=io.voc_palette())
        io.write_png_atomic(str(mask), np.ones(mask_shape, np.uint8), palette=io.voc_palette())
        rows.append(Record(f"img_{index}", "", (1,), mask_uri=str(mask), seg_label_uri=str(seg)))
    write_manifest(rows, str(tmp_path / "manifest"))
    quality = label_quality(str(tmp_path / "manifest"), num_classes=3)
    assert quality["scored_images"] == 2 and quality["mismatched_masks"] == 1
    assert quality["first_mismatch"].startswith("image 'img_2': GT mask '")
    assert "mask_2.png' is (H, W) = (8, 8), but its pseudo label" in quality["first_mismatch"]
    assert quality["recall"] == pytest.approx(0.5)  # half of each scored mask's pixels labelled 1


@pytest.mark.ray
def test_training_stops_with_one_line_when_images_broke_after_the_manifest(local_ray, tmp_path):
    """2 of 8 JPEGs truncated after the manifest step: the warm-up trains on stand-ins, counts
    them, and past the error budget stops after the epoch with a DataError naming the first
    file (no Ray Train retries of the same epoch, no traceback from the workers)."""
    from raysseg.distributed.train import StageSpec, train_stage
    from raysseg.distributed.train_progress import read_progress

    data = tmp_path / "synth"
    generate_synthetic(str(data), n_train=8, n_val=0, size=40, seed=5)
    config = tiny_config(data, tmp_path / "run", "resources.error_budget=0.1")
    manifest = layout.dataset_manifest(config.run_dir, "train")
    write_manifest(voc_records(str(data), "train"), manifest)
    for index in (2, 6):
        jpeg = data / "JPEGImages" / f"train_{index:06d}.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[:150])
    storage_path = tmp_path / "run" / "warmup" / "train"
    spec = StageSpec("warmup", "warmup", manifest, "", "", 2, str(storage_path))
    with pytest.raises(DataError) as failure:
        train_stage(config, spec)
    message = str(failure.value)
    assert message.startswith("stage warmup, epoch 1: 2 of 8 training images could not be read")
    assert "resources.error_budget = 10.0%" in message and "train_00000" in message
    # The failing epoch left no checkpoint and no history row: a rerun trains it again.
    assert read_progress(layout.train_progress(str(storage_path)))["history"] == []
    assert not list(storage_path.rglob("checkpoint_*"))


# ---------------------------------------------------------------------------------------------
# Configs and run directories


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-0.01", "config key 'optim.lr': must be > 0, got -0.01"),
        ("stages.count=0", "config key 'stages.count': must be > 0, got 0"),
        ("labels.cam_threshold=1.2", "config key 'labels.cam_threshold': 1.2 is outside [0, 1]"),
        ("labels.sal_threshold=-0.1", "config key 'labels.sal_threshold': -0.1 is outside [0, 1]"),
        ("resources.error_budget=2", "config key 'resources.error_budget': 2.0 is outside [0, 1]"),
        ("model.backbone=vgg16", "config key 'model.backbone': 'vgg16' is not one of"),
        ("resources.max_failures=-1", "config key 'resources.max_failures': must be >= 0"),
    ],
)
def test_bad_config_values_name_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert message in str(error.value)


def test_run_directory_written_by_another_config_is_refused_and_kept(voc, tmp_path) -> None:
    from raysseg.distributed.pipeline import prepare_run_dir  # needs no running Ray

    run = tmp_path / "run"
    prepare_run_dir(tiny_config(voc, run))
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"written by another config \(differs in optim\.lr\)"):
        prepare_run_dir(tiny_config(voc, run, "optim.lr=0.5"))
    assert (run / "config.yaml").read_text() == saved  # nothing overwritten
    prepare_run_dir(tiny_config(voc, run, "resources.refine_actors=2"))  # resources may change


def test_auto_saliency_resumes_and_refuses_a_run_whose_prior_would_change(voc, tmp_path) -> None:
    from raysseg.distributed.pipeline import prepare_run_dir, resolve_run_config

    shutil.move(voc / "saliency", tmp_path / "maps")  # no saliency folder: auto = u2netp
    auto = ("data.saliency=auto", "data.saliency_dir=")
    lines: list[str] = []
    first = resolve_run_config(tiny_config(voc, tmp_path / "run", *auto), lines.append)
    prepare_run_dir(first)
    assert first.data.saliency == "u2netp" and lines[-1].startswith("saliency prior: u2netp ")
    assert "saliency: u2netp" in (tmp_path / "run" / "config.yaml").read_text()  # the resolved
    prepare_run_dir(resolve_run_config(tiny_config(voc, tmp_path / "run", *auto), print))
    # The maps appear: the same command would now use them, so the run directory is refused.
    shutil.move(tmp_path / "maps", voc / "saliency")
    again = resolve_run_config(tiny_config(voc, tmp_path / "run", *auto), lines.append)
    assert lines[-1] == f"saliency prior: folder {voc / 'saliency'}"
    with pytest.raises(ConfigError, match=r"differs in data\.saliency, data\.saliency_dir"):
        prepare_run_dir(again)


# ---------------------------------------------------------------------------------------------
# Security


def test_yaml_with_a_python_tag_is_refused_naming_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"config file '.*evil\.yaml': not valid YAML"):
        load_config(path)
    assert not marker.exists()


def test_job_config_never_executes_code(tmp_path: Path) -> None:
    # The job entrypoint (`python -m raysseg pipeline --config ...`) reads the config the same way.
    marker = tmp_path / "pwned"
    config = tmp_path / "job.yaml"
    config.write_text("data:\n  root: !!python/object/new:os.system [touch " + str(marker) + "]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "raysseg", "pipeline", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "job.yaml" in done.stderr and "not valid YAML" in done.stderr
    assert not marker.exists()
    for shipped in sorted((REPO / "jobs").glob("*.yaml")):
        assert "!!python" not in shipped.read_text(), shipped


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_a_pickled_object_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "raysseg-checkpoint-v1", "model_args": {}, "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"checkpoint '.*evil\.pt': cannot be read"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Bad input met during a label update: recorded with reasons, nothing already written is lost


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_label_update_records_bad_inputs_and_keeps_everything_written(
    local_ray, tmp_path: Path
) -> None:
    from raysseg.distributed.refine import update_labels
    from raysseg.engine.checkpoint import save_checkpoint
    from raysseg.model.network import build_model

    data = tmp_path / "synth"  # its own data set (not tiny_data): the test damages its files
    generate_synthetic(str(data), n_train=10, n_val=0, size=40, seed=8)
    config = tiny_config(data, tmp_path / "run", "resources.error_budget=0.5")
    run = config.run_dir
    manifest = layout.dataset_manifest(run, "train")
    write_manifest(voc_records(str(data), "train"), manifest)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model(config.model))

    def update(stage: int, mode: str, source: str) -> dict:
        return update_labels(
            config,
            mode=mode,
            checkpoint=str(checkpoint),
            in_manifest=source,
            labels_root=layout.stage_labels(run, stage),
            out_manifest=layout.stage_manifest(run, stage),
            errors_path=layout.stage_errors(run, stage),
            saliency_cache=layout.saliency_cache(run),
        )

    assert update(0, "ground_truth", manifest)["written"] == 10
    stage_0 = _digest(Path(layout.stage_dir(run, 0)))

    # Image and saliency defects, met by the inference actors and the CRF/fusion tasks.
    jpegs = data / "JPEGImages"
    (jpegs / "train_000001.jpg").write_bytes((jpegs / "train_000001.jpg").read_bytes()[:200])
    (jpegs / "train_000002.jpg").write_bytes(b"")
    (data / "saliency" / "train_000003.png").unlink()
    io.write_png_atomic(str(data / "saliency" / "train_000004.png"), np.zeros((5, 5), np.uint8))
    summary = update(1, "initial", layout.stage_manifest(run, 0))
    # GT-mask defects, met by the full-supervision label step.
    masks = data / "SegmentationClass"
    io.write_png_atomic(str(masks / "train_000005.png"), np.zeros((7, 7), np.uint8))
    out_of_range = io.read_label(str(masks / "train_000006.png"))
    out_of_range[0, 0] = 40
    io.write_png_atomic(str(masks / "train_000006.png"), out_of_range, palette=io.voc_palette())
    gt_summary = update(2, "ground_truth", manifest)

    assert summary["errors"] == 4 and summary["written"] == 6
    reasons = {
        row["image_id"]: row["error"]
        for row in pq.read_table(layout.stage_errors(run, 1)).to_pylist()
    }
    assert "train_000001.jpg" in reasons["train_000001"]
    assert "empty (0 bytes)" in reasons["train_000002"]
    assert "train_000003.png' does not exist" in reasons["train_000003"]
    assert "train_000004.png' has size (H, W) = (5, 5)" in reasons["train_000004"]
    good = sorted(r.image_id for r in read_manifest(layout.stage_manifest(run, 1)))
    assert good == [f"train_{i:06d}" for i in (0, 5, 6, 7, 8, 9)]

    # Images 1 and 2 are still broken (4 errors in all); 5 and 6 have bad masks.
    assert gt_summary["errors"] == 4 and gt_summary["written"] == 6
    reasons = {
        row["image_id"]: row["error"]
        for row in pq.read_table(layout.stage_errors(run, 2)).to_pylist()
    }
    assert "train_000005.png' is (H, W) = (7, 7)" in reasons["train_000005"]
    assert "train_000006.png' has class id 40" in reasons["train_000006"]
    # Nothing already written is lost: the earlier stage's labels and manifest are untouched.
    assert _digest(Path(layout.stage_dir(run, 0))) == stage_0
