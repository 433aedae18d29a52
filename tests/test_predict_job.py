"""`raysseg predict` as a Ray Data job and in process: the same palette PNGs, reruns skip what
exists, a bad image is an error row, shared stems keep their sub-paths.

Three Ray Data jobs in all (one with the CRF in the actors, its rerun, one with CRF tasks).
"""

from __future__ import annotations

import contextlib
import io as text_io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysseg.cli import main
from raysseg.config import Config, load_config
from raysseg.data import io
from raysseg.engine.checkpoint import load_checkpoint, restore_model, save_checkpoint
from raysseg.model.network import build_model
from raysseg.predict import (
    expand_inputs,
    output_names,
    plan_items,
    predict_label,
    predict_local,
    write_prediction,
)

OVERRIDES = ("eval.scales=[1.0,0.5]", "eval.crf_iterations=2", "resources.refine_batch_size=2")
# Output files of the good images: the two x.png share a stem and keep their folders.
EXPECTED = sorted(
    f"{name}{suffix}" for name in ("a/x", "b/x", "y") for suffix in (".png", "_overlay.png")
)


@dataclass(frozen=True)
class Inputs:
    checkpoint: Path
    images: Path
    sources: dict[str, Path]  # output name -> its input image


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = build_model(load_config(overrides=_model_overrides()).model)
    checkpoint = root / "model.pt"
    save_checkpoint(checkpoint, model)
    images = root / "images"
    rng = np.random.default_rng(0)
    sources = {"a/x": images / "a" / "x.png", "b/x": images / "b" / "x.png", "y": images / "y.jpg"}
    for index, path in enumerate(sources.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (32 + 8 * index, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (images / "notes.txt").write_text("not an image")
    return Inputs(checkpoint, images, sources)


def _model_overrides() -> list[str]:
    return ["model.backbone=small", "model.num_classes=4", "model.small_width=8"]


def _config(*extra: str) -> Config:
    return load_config(overrides=[*_model_overrides(), *OVERRIDES, *extra])


def _predict_cli(inputs: Inputs, source: str, out: Path, *extra: str) -> int:
    arguments = ["--checkpoint", str(inputs.checkpoint), "--inputs", source, "--out", str(out)]
    return main(["predict", *arguments, *_model_overrides(), *OVERRIDES, *extra])


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


@dataclass(frozen=True)
class RayRun:
    out: Path
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def ray_run(local_ray, inputs, tmp_path_factory) -> RayRun:
    """One Ray Data job over the images folder, given as a file:// URI prefix."""
    out = tmp_path_factory.mktemp("ray_out")
    # capsys is function-scoped: this module-scoped fixture captures by hand.
    stdout, stderr = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = _predict_cli(inputs, inputs.images.as_uri(), out)
    return RayRun(out, code, stdout.getvalue(), stderr.getvalue())


def test_output_names_keep_sub_paths_only_for_shared_stems() -> None:
    names = output_names(["/d/a/x.jpg", "/d/b/sub/x.jpg", "/d/y.jpg"])
    assert names == ["a/x", "b/sub/x", "y"]
    assert output_names(["s3://bucket/p/a/x.jpg", "s3://bucket/p/b/x.jpg"]) == ["a/x", "b/x"]
    with pytest.raises(ValueError, match=r"x\.jpg.*x\.png"):
        output_names(["/d/x.jpg", "/d/x.png"])
    with pytest.raises(ValueError, match=r"x_overlay\.png"):
        output_names(["/d/x.jpg", "/d/x_overlay.jpg"])  # the overlay of x.jpg


def test_a_uri_prefix_lists_its_images_recursively(inputs) -> None:
    listed = expand_inputs([inputs.images.as_uri()])
    expected = sorted([*inputs.sources.values(), inputs.images / "broken.jpg"])
    assert listed == [path.as_uri() for path in expected]  # notes.txt is not an image


def test_outputs_and_unfinished_writes_are_not_inputs(tmp_path) -> None:
    out = tmp_path / "predictions"  # an output folder inside the input folder
    for path in (
        tmp_path / "x.jpg",
        out / "x.png",
        out / "x_overlay.png",
        tmp_path / ".y.png.tmp-0a",
    ):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    assert expand_inputs([str(tmp_path)], exclude=str(out)) == [str(tmp_path / "x.jpg")]


def test_ray_job_writes_palette_maps_and_names_the_bad_image(ray_run, inputs) -> None:
    assert ray_run.code == 1  # one unreadable image
    assert "predict: 3 written, 0 skipped, 1 errors of 4 images" in ray_run.stdout
    assert "broken.jpg" in ray_run.stderr
    assert sorted(_outputs(ray_run.out)) == EXPECTED
    config = _config()
    model = restore_model(load_checkpoint(inputs.checkpoint))
    for name, source in inputs.sources.items():
        image = io.read_image(str(source))
        expected = predict_label(model, image, config, multiscale=True, crf=True)
        assert expected.any()  # not all background (index 0, colour black)
        # A random tiny model predicts one class everywhere (not 0: indices differ from colours);
        # test_class_map_png_holds_the_indices checks a map of several classes.
        _assert_palette_png(ray_run.out / f"{name}.png", expected)
        with Image.open(ray_run.out / f"{name}_overlay.png") as written:
            assert written.mode == "RGB" and written.size == image.shape[1::-1]


def _assert_palette_png(path: Path, label: np.ndarray) -> None:
    palette = io.voc_palette().reshape(-1).tolist()
    with Image.open(path) as written:
        assert written.mode == "P"
        assert written.getpalette()[: len(palette)] == palette
        np.testing.assert_array_equal(np.asarray(written), label)  # the raw indices


def test_class_map_png_holds_the_indices(tmp_path) -> None:
    label = np.repeat(np.arange(4, dtype=np.uint8), 10)[None].repeat(6, axis=0)  # 4 stripes
    image = np.full((*label.shape, 3), 90, dtype=np.uint8)
    write_prediction(str(tmp_path), "sub/z", image, label)
    _assert_palette_png(tmp_path / "sub" / "z.png", label)
    overlay = io.read_image(str(tmp_path / "sub" / "z_overlay.png"))
    assert (overlay[:, :10] == 90).all() and not (overlay[:, 10:] == 90).all()  # background kept


def test_in_process_loop_writes_the_same_files(ray_run, inputs, tmp_path) -> None:
    items = plan_items([str(inputs.images)], str(tmp_path))
    summary = predict_local(_config(), str(inputs.checkpoint), items, str(tmp_path), crf=True)
    assert (summary.written, summary.skipped, len(summary.errors)) == (3, 0, 1)
    assert "broken.jpg" in summary.errors[0]
    assert _outputs(tmp_path) == _outputs(ray_run.out)


def test_rerun_writes_nothing_and_reports_skipped(ray_run, inputs, capsys) -> None:
    before = {p: p.stat().st_mtime_ns for p in ray_run.out.rglob("*") if p.is_file()}
    assert _predict_cli(inputs, inputs.images.as_uri(), ray_run.out) == 1  # broken.jpg again
    assert "predict: 0 written, 3 skipped, 1 errors of 4 images" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in ray_run.out.rglob("*") if p.is_file()}
    assert after == before


def test_crf_tasks_write_the_same_files(ray_run, inputs, tmp_path, capsys) -> None:
    code = _predict_cli(inputs, str(inputs.images), tmp_path, "resources.crf_placement=tasks")
    assert code == 1
    assert "predict: 3 written, 0 skipped, 1 errors" in capsys.readouterr().out
    assert _outputs(tmp_path) == _outputs(ray_run.out)
