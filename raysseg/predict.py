"""Test-time prediction (multi-scale + flip + dense CRF) and the per-image work of `raysseg predict`.

Pure (no Ray): the in-process loop below and the Ray Data job (`raysseg.distributed.predict_job`)
run the same per-image functions, so both write the same files. An image's outputs are
`<name>.png` (palette PNG, pixel values = class ids) and `<name>_overlay.png` under the output
folder, each written atomically; an image whose two outputs exist is skipped, so a rerun only does
what is missing.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow.fs as pafs
import torch

from raysseg import storage
from raysseg.config import Config
from raysseg.data import io
from raysseg.data.transforms import normalize
from raysseg.engine.checkpoint import load_checkpoint, restore_model
from raysseg.engine.loop import predict_probs
from raysseg.labels.crf import dense_crf, inference_crf_params

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Up to this many images `raysseg predict` runs in its own process when no cluster is around:
# starting Ray and an actor pool costs ~10 s on a small machine, more than a handful of images.
IN_PROCESS_MAX_IMAGES = 8

WRITTEN, SKIPPED, ERROR = "written", "skipped", "error"


@dataclass(frozen=True)
class PredictItem:
    """One input image and its output name under the output folder (no suffix)."""

    uri: str
    name: str


def predict_scores(
    model: torch.nn.Module, image: np.ndarray, config: Config, multiscale: bool
) -> np.ndarray:
    """float32 (C, H, W) class probabilities of one RGB image (scales + flip of config.eval)."""
    evaluation = config.eval
    device = next(model.parameters()).device
    scales = evaluation.scales if multiscale else (1.0,)
    flip = evaluation.flip and multiscale
    tensor = normalize(image)[None].to(device)
    probs = predict_probs(model, tensor, scales=scales, flip=flip, fuse=evaluation.fuse)
    return probs.float().cpu().numpy()


def finish_label(image: np.ndarray, probs: np.ndarray, config: Config, crf: bool) -> np.ndarray:
    """uint8 (H, W) class map from the probabilities, after the dense CRF when `crf`."""
    if crf:
        probs = dense_crf(image, probs, inference_crf_params(config.eval))
    return probs.argmax(axis=0).astype(np.uint8)


def predict_label(
    model: torch.nn.Module, image: np.ndarray, config: Config, multiscale: bool, crf: bool
) -> np.ndarray:
    """uint8 (H, W) class map for one RGB image with the test-time recipe of METHOD.md."""
    return finish_label(image, predict_scores(model, image, config, multiscale), config, crf)


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colours of a class map over the image (background left as is)."""
    colours = io.voc_palette()[label]  # (H, W, 3)
    blended = image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    keep = (label == 0)[..., None]
    return np.where(keep, image, blended).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Inputs and output names


def expand_inputs(inputs: Sequence[str], exclude: str = "") -> list[str]:
    """Image paths / URIs of `inputs`: files as given, folders and URI prefixes listed recursively
    (IMAGE_SUFFIXES, sorted). Local paths come back absolute (actors may run elsewhere), each
    image once. Files under `exclude` (the output folder) are left out, so outputs written inside
    an input folder are not predicted on the next run.
    """
    found: dict[str, None] = {}  # ordered set
    skip = _comparable(exclude) + "/" if exclude else None
    for item in inputs:
        filesystem, path = storage.resolve(item)
        kind = filesystem.get_file_info(path).type
        if kind == pafs.FileType.File:
            found[_uri_of(item, path)] = None
        elif kind == pafs.FileType.Directory:
            for uri in _list_images(item, filesystem, path):
                if skip is None or not _comparable(uri).startswith(skip):
                    found[uri] = None
        else:
            raise FileNotFoundError(
                f"predict: input '{item}' is neither a file nor a folder / URI prefix"
            )
    return list(found)


def _list_images(item: str, filesystem: pafs.FileSystem, path: str) -> list[str]:
    selector = pafs.FileSelector(path, recursive=True)
    paths = sorted(
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File
        and posixpath.splitext(info.path)[1].lower() in IMAGE_SUFFIXES
        and not storage.is_temp_name(posixpath.basename(info.path))  # an unfinished write
    )
    return [_uri_of(item, found) for found in paths]


def _uri_of(item: str, path: str) -> str:
    """`path` (as the filesystem of `item` names it) in the form of `item`: a local path or URI."""
    if not storage.is_uri(item):
        return path
    return f"{urlparse(item).scheme}://{path}"  # s3: "bucket/key"; file: "/abs/path"


def _comparable(uri: str) -> str:
    """A local path or file:// URI as an absolute path; other URIs as they are."""
    return storage.resolve(uri)[1] if storage.is_local(uri) else uri.rstrip("/")


def output_names(uris: Sequence[str]) -> list[str]:
    """The output name of each input: its stem, or, for a stem several inputs share, its path
    (without suffix) under the deepest folder they have in common ("a/x", "b/x").

    Raises ValueError naming the inputs when two would still write the same files (x.jpg and
    x.png in one folder): outputs are never silently overwritten.
    """
    stems = [_stem(uri) for uri in uris]
    shared: dict[str, list[int]] = {}
    for index, stem in enumerate(stems):
        shared.setdefault(stem, []).append(index)
    names = list(stems)
    for indices in shared.values():
        if len(indices) > 1:
            relative = _relative_names([uris[i] for i in indices])
            for index, name in zip(indices, relative, strict=True):
                names[index] = name
    owner: dict[str, str] = {}  # output file stem -> the input that writes it
    for uri, name in zip(uris, names, strict=True):
        for written in (name, f"{name}_overlay"):  # x_overlay.jpg would hit x.jpg's overlay
            if written in owner:
                raise ValueError(
                    f"predict: inputs '{owner[written]}' and '{uri}' would both write "
                    f"'{written}.png'; rename one or predict them into separate output folders"
                )
            owner[written] = uri
    return names


def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(_parts(uri)[-1]))[0]


def _parts(uri: str) -> list[str]:
    """Path components of a local path (absolute) or URI (scheme and bucket first)."""
    if storage.is_local(uri):
        path = storage.resolve(uri)[1].replace(os.sep, "/")
        return [part for part in path.split("/") if part]
    parsed = urlparse(uri)
    return [parsed.scheme, parsed.netloc, *(p for p in parsed.path.split("/") if p)]


def _relative_names(uris: Sequence[str]) -> list[str]:
    parts = [_parts(uri) for uri in uris]
    common = 0
    shortest = min(len(p) for p in parts) - 1  # the file name itself is never common
    while common < shortest and all(p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join([*p[common:-1], posixpath.splitext(p[-1])[0]]) for p in parts]


def plan_items(inputs: Sequence[str], out_dir: str) -> list[PredictItem]:
    """The images of `inputs` with their output names (see `expand_inputs`, `output_names`)."""
    uris = expand_inputs(inputs, exclude=out_dir)
    return [PredictItem(uri, name) for uri, name in zip(uris, output_names(uris), strict=True)]


def output_uris(out_dir: str, name: str) -> tuple[str, str]:
    """(class map PNG, overlay PNG) of output name `name`."""
    return storage.join(out_dir, f"{name}.png"), storage.join(out_dir, f"{name}_overlay.png")


def outputs_exist(out_dir: str, name: str) -> bool:
    return all(storage.exists(uri) for uri in output_uris(out_dir, name))


# ---------------------------------------------------------------------------------------------
# One image: model step, CRF step, writes; one small result row


def result_row(item: PredictItem, status: str, error: str = "") -> dict[str, str]:
    return {"uri": item.uri, "name": item.name, "status": status, "error": error}


def _error_text(item: PredictItem, failure: Exception) -> str:
    return f"{item.uri}: {type(failure).__name__}: {failure}"


def score_item(
    model: torch.nn.Module, config: Config, item: PredictItem, out_dir: str
) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The model step of one image: (row, {"image", "probs"}), or (skipped / error row, {})."""
    if outputs_exist(out_dir, item.name):
        return result_row(item, SKIPPED), {}
    try:
        image = io.read_image(item.uri)
        probs = predict_scores(model, image, config, multiscale=True)
    except Exception as failure:  # recorded per image: one bad file does not stop the others
        return result_row(item, ERROR, _error_text(item, failure)), {}
    return result_row(item, ""), {"image": image, "probs": probs}


def finish_item(
    config: Config, item: PredictItem, arrays: dict[str, np.ndarray], out_dir: str, crf: bool
) -> dict[str, str]:
    """The CRF step of one image: class map from the model step's arrays, both PNGs written."""
    try:
        label = finish_label(arrays["image"], arrays["probs"], config, crf)
        write_prediction(out_dir, item.name, arrays["image"], label)
    except Exception as failure:  # recorded per image, as in score_item
        return result_row(item, ERROR, _error_text(item, failure))
    return result_row(item, WRITTEN)


def predict_item(
    model: torch.nn.Module, config: Config, item: PredictItem, out_dir: str, crf: bool
) -> dict[str, str]:
    """Both steps of one image in this process; returns its row (written / skipped / error)."""
    row, arrays = score_item(model, config, item, out_dir)
    return finish_item(config, item, arrays, out_dir, crf) if arrays else row


def write_prediction(out_dir: str, name: str, image: np.ndarray, label: np.ndarray) -> None:
    """Both PNGs, atomically; the class map last (a reader that finds it finds the overlay)."""
    label_uri, overlay_uri = output_uris(out_dir, name)
    io.write_png_atomic(overlay_uri, overlay(image, label))
    io.write_png_atomic(label_uri, label, palette=io.voc_palette())


# ---------------------------------------------------------------------------------------------
# Summary and the in-process loop


@dataclass
class PredictSummary:
    """Counts of a predict run and the error texts (each names its file)."""

    images: int = 0
    written: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.images += 1
        if row["status"] == WRITTEN:
            self.written += 1
        elif row["status"] == SKIPPED:
            self.skipped += 1
        else:
            self.errors.append(str(row["error"]))

    def line(self, out_dir: str) -> str:
        return (
            f"predict: {self.written} written, {self.skipped} skipped, {len(self.errors)} errors "
            f"of {self.images} images -> {out_dir}"
        )


def load_predictor(checkpoint: str) -> torch.nn.Module:
    """The checkpoint's model in eval mode, on the GPU when this process sees one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return restore_model(load_checkpoint(checkpoint)).to(device).eval()


def predict_local(
    config: Config, checkpoint: str, items: Sequence[PredictItem], out_dir: str, crf: bool
) -> PredictSummary:
    """Predict `items` in this process (a handful of images, no cluster)."""
    summary = PredictSummary()
    if not items:
        return summary
    model = load_predictor(checkpoint)
    storage.makedirs(out_dir)
    for item in items:
        summary.add(predict_item(model, config, item, out_dir, crf))
    return summary


def predict_paths(
    config: Config, checkpoint: str, inputs: Sequence[str], out_dir: str, crf: bool = True
) -> int:
    """`predict_local` on the images of `inputs` (files, folders, URI prefixes); returns how many
    were written. Unreadable images are left out; `predict_local` reports them."""
    summary = predict_local(config, checkpoint, plan_items(inputs, out_dir), out_dir, crf)
    return summary.written


__all__ = [
    "IMAGE_SUFFIXES",
    "IN_PROCESS_MAX_IMAGES",
    "PredictItem",
    "PredictSummary",
    "expand_inputs",
    "finish_item",
    "finish_label",
    "load_predictor",
    "output_names",
    "output_uris",
    "outputs_exist",
    "overlay",
    "plan_items",
    "predict_item",
    "predict_label",
    "predict_local",
    "predict_paths",
    "predict_scores",
    "score_item",
    "write_prediction",
]
