"""Test-time prediction (multi-scale + flip + dense CRF) for one image, and `raysseg predict`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from raysseg import storage
from raysseg.config import Config
from raysseg.data import io
from raysseg.data.transforms import normalize
from raysseg.engine.checkpoint import load_checkpoint, restore_model
from raysseg.engine.loop import predict_probs
from raysseg.labels.crf import dense_crf, inference_crf_params

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def predict_label(
    model: torch.nn.Module, image: np.ndarray, config: Config, multiscale: bool, crf: bool
) -> np.ndarray:
    """uint8 (H, W) class map for one RGB image with the test-time recipe of METHOD.md."""
    evaluation = config.eval
    device = next(model.parameters()).device
    scales = evaluation.scales if multiscale else (1.0,)
    flip = evaluation.flip and multiscale
    tensor = normalize(image)[None].to(device)
    probs = predict_probs(model, tensor, scales=scales, flip=flip, fuse=evaluation.fuse)
    probs = probs.float().cpu().numpy()  # (C, H, W)
    if crf:
        probs = dense_crf(image, probs, inference_crf_params(evaluation))
    return probs.argmax(axis=0).astype(np.uint8)


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colours of a class map over the image (background left as is)."""
    colours = io.voc_palette()[label]  # (H, W, 3)
    blended = image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    keep = (label == 0)[..., None]
    return np.where(keep, image, blended).clip(0, 255).astype(np.uint8)


def _expand_inputs(inputs: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"predict: input '{item}' is neither a file nor a folder")
    return paths


def predict_paths(
    config: Config, checkpoint: str, inputs: Sequence[str], out_dir: str, crf: bool = True
) -> int:
    """Write <name>.png (palette class map) and <name>_overlay.png for every input image."""
    model = restore_model(load_checkpoint(checkpoint)).eval()
    storage.makedirs(out_dir)  # a local path or a URI; the inputs are local files
    written = 0
    for path in _expand_inputs(inputs):
        image = io.read_image(str(path))
        label = predict_label(model, image, config, multiscale=True, crf=crf)
        io.write_png_atomic(
            storage.join(out_dir, f"{path.stem}.png"), label, palette=io.voc_palette()
        )
        io.write_png_atomic(
            storage.join(out_dir, f"{path.stem}_overlay.png"), overlay(image, label)
        )
        written += 1
    return written
