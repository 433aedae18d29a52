"""raysseg.data.io: decoding odd images, strict errors, palette label maps, atomic writes."""

from __future__ import annotations

import io as pyio
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from raysseg import storage
from raysseg.data import io


def _rgb(height: int = 20, width: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _save(image: Image.Image, path: Path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def test_read_image_rgb_png_roundtrip(tmp_path):
    rgb = _rgb()
    uri = _save(Image.fromarray(rgb), tmp_path / "a.png")
    out = io.read_image(uri)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb)


def test_read_image_file_uri(tmp_path):
    rgb = _rgb()
    path = _save(Image.fromarray(rgb), tmp_path / "a.png")
    np.testing.assert_array_equal(io.read_image(f"file://{path}"), rgb)


def test_read_image_grey_becomes_rgb(tmp_path):
    grey = _rgb()[..., 0]
    out = io.read_image(_save(Image.fromarray(grey, mode="L"), tmp_path / "g.png"))
    assert out.shape == (20, 30, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], grey)


def test_read_image_rgba_drops_alpha(tmp_path):
    rgba = np.concatenate([_rgb(), np.full((20, 30, 1), 7, np.uint8)], axis=2)
    out = io.read_image(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "a.png"))
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_read_image_16bit_grey_and_rgb(tmp_path):
    grey8 = _rgb()[..., 0]
    grey16 = grey8.astype(np.uint16) * 257  # 8-bit value v -> 16-bit v * 257
    cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    out = io.read_image(str(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out[..., 1], grey8)

    rgb8 = _rgb(seed=1)
    rgb16 = rgb8.astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # cv2 writes BGR
    out = io.read_image(str(tmp_path / "c16.png"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb8)


def test_read_image_cmyk_jpeg(tmp_path):
    # Smooth content so JPEG loss stays small; CMYK must come back as the same RGB colours.
    ys, xs = np.mgrid[0:32, 0:32]
    rgb = np.stack([xs * 8, ys * 8, np.full_like(xs, 128)], axis=2).astype(np.uint8)
    path = _save(Image.fromarray(rgb).convert("CMYK"), tmp_path / "c.jpg", quality=98)
    assert Image.open(path).mode == "CMYK"
    out = io.read_image(path)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 6


@pytest.mark.parametrize("kind", ["empty", "truncated_jpeg", "truncated_png", "text"])
def test_bad_images_raise_with_file_name(tmp_path, kind):
    buffer = pyio.BytesIO()
    if kind == "truncated_jpeg":
        Image.fromarray(_rgb(64, 64)).save(buffer, format="JPEG")
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    elif kind == "truncated_png":
        Image.fromarray(_rgb(64, 64)).save(buffer, format="PNG")
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    elif kind == "text":
        data = b"this is not an image at all"
    else:
        data = b""
    path = tmp_path / f"bad_{kind}.jpg"
    path.write_bytes(data)
    with pytest.raises(io.ImageReadError, match=f"bad_{kind}.jpg"):
        io.read_image(str(path))
    with pytest.raises(io.ImageReadError, match=f"bad_{kind}.jpg"):
        io.read_label(str(path))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        io.read_image(str(tmp_path / "nope.png"))


def test_voc_palette_known_colours():
    palette = io.voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert tuple(palette[0]) == (0, 0, 0)
    assert tuple(palette[1]) == (128, 0, 0)
    assert tuple(palette[15]) == (192, 128, 128)  # person
    assert tuple(palette[255]) == (224, 224, 192)  # the VOC "void" border colour


def test_label_png_read_as_palette_index(tmp_path):
    label = np.zeros((10, 12), np.uint8)
    label[2:5, 3:7] = 15
    label[0, :] = 255
    uri = str(tmp_path / "label.png")
    io.write_png_atomic(uri, label, palette=io.voc_palette())
    assert Image.open(uri).mode == "P"
    np.testing.assert_array_equal(io.read_label(uri), label)


def test_label_rgb_mapped_through_palette_and_unknown_colour(tmp_path):
    label = np.array([[0, 1, 2], [15, 255, 3]], np.uint8)
    coloured = io.voc_palette()[label]
    uri = _save(Image.fromarray(coloured), tmp_path / "rgb_label.png")
    np.testing.assert_array_equal(io.read_label(uri), label)
    coloured[0, 0] = (1, 2, 3)
    uri = _save(Image.fromarray(coloured), tmp_path / "odd_label.png")
    with pytest.raises(io.ImageReadError, match=r"odd_label\.png"):
        io.read_label(uri)


def test_saliency_read_scales_to_unit_interval(tmp_path):
    grey = np.array([[0, 128, 255]], np.uint8)
    uri = str(tmp_path / "s.png")
    io.write_png_atomic(uri, grey)
    saliency = io.read_saliency(uri)
    assert saliency.dtype == np.float32
    np.testing.assert_allclose(saliency, [[0.0, 128 / 255, 1.0]], atol=1e-6)
    grey16 = np.array([[0, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "s16.png"), grey16)
    np.testing.assert_allclose(io.read_saliency(str(tmp_path / "s16.png")), [[0.0, 1.0]])


def test_write_png_atomic_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "deeper" / "x.png"
    io.write_png_atomic(str(target), np.full((4, 4), 3, np.uint8), palette=io.voc_palette())
    io.write_png_atomic(str(target), np.full((4, 4), 5, np.uint8), palette=io.voc_palette())
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]
    assert (io.read_label(str(target)) == 5).all()


def test_write_png_atomic_rejects_float(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        io.write_png_atomic(str(tmp_path / "f.png"), np.zeros((3, 3), np.float32))
    assert not (tmp_path / "f.png").exists()


def test_join_exists_list_files(tmp_path):
    assert storage.join("s3://bucket/root", "a", "b.png") == "s3://bucket/root/a/b.png"
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "c.bin").write_text("x")
    assert storage.exists(storage.join(str(tmp_path), "a.txt"))
    assert not storage.exists(storage.join(str(tmp_path), "zzz.txt"))
    listed = storage.list_files(str(tmp_path), suffix=".txt")
    assert [Path(p).name for p in listed] == ["a.txt", "b.txt"]


def test_copy_file_and_replace_dir(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"weights" * 1000)
    destination = tmp_path / "run" / "stage_0" / "model.pt"
    storage.copy_file(str(source), str(destination))
    assert destination.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in destination.parent.iterdir()) == ["model.pt"]
    with pytest.raises(FileNotFoundError, match="absent"):
        storage.copy_file(str(tmp_path / "absent"), str(destination))

    old, new = tmp_path / "manifest", tmp_path / "manifest.tmp-1"
    old.mkdir()
    (old / "stale.parquet").write_text("old")
    new.mkdir()
    (new / "part-0.parquet").write_text("new")
    storage.replace_dir(str(new), str(old))
    assert sorted(p.name for p in old.iterdir()) == ["part-0.parquet"]
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest", "run", "src.bin"]
    fresh = tmp_path / "fresh.tmp"
    fresh.mkdir()
    (fresh / "a").write_text("a")
    storage.replace_dir(str(fresh), str(tmp_path / "nested" / "target"))
    assert (tmp_path / "nested" / "target" / "a").read_text() == "a"


def test_write_atomic_streams_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt" / "model.pt"
    storage.write_atomic(str(target), lambda stream: stream.write(b"first"), durable=True)
    assert target.read_bytes() == b"first"

    def broken(stream) -> None:
        stream.write(b"half of the second")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        storage.write_atomic(str(target), broken, durable=True)
    assert target.read_bytes() == b"first"  # the old file survives, no temp file is left
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]


def test_seekable_source_is_the_local_path_and_names_missing_files(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x")
    assert storage.is_local(str(path)) and storage.is_local(f"file://{path}")
    assert not storage.is_local("s3://bucket/w.pt")
    assert storage.seekable_source(str(path)) == str(path)
    assert storage.seekable_source(f"file://{path}") == str(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        storage.seekable_source(str(tmp_path / "nope.pt"))
