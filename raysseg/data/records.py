"""One record type for every data source: `Record`, its class ids and class names.

A `Record` names one training/evaluation image and the files that go with it; the sources
(`raysseg.data.sources`) yield them and the manifests (`raysseg.data.manifest`) store them.
Errors on bad input are `DataError`s that name the file, the key (image id / line) and the value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from raysseg import storage
from raysseg.config import IGNORE_INDEX
from raysseg.errors import InputError

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# The 80 COCO categories in category-id order (ids 1..90 with gaps); raysseg's class c = position.
COCO_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic_light",
    "fire_hydrant",
    "stop_sign",
    "parking_meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports_ball",
    "kite",
    "baseball_bat",
    "baseball_glove",
    "skateboard",
    "surfboard",
    "tennis_racket",
    "bottle",
    "wine_glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot_dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted_plant",
    "bed",
    "dining_table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell_phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy_bear",
    "hair_drier",
    "toothbrush",
)


class DataError(InputError):
    """Bad dataset input; the message names the file, key and value."""


@dataclass(frozen=True)
class Record:
    """One image and its files. `labels`: present foreground class ids (1..C-1), sorted, unique."""

    image_id: str
    image_uri: str
    labels: tuple[int, ...]
    mask_uri: str = ""  # ground-truth class-id PNG (evaluation, label quality), optional
    saliency_uri: str = ""  # the prior saliency map S0 (grey PNG), optional
    seg_label_uri: str = ""  # this stage's segmentation pseudo label (class-id PNG), optional
    sal_label_uri: str = ""  # this stage's saliency pseudo label (grey PNG), optional


def labels_to_multihot(labels: Iterable[int], num_classes: int) -> np.ndarray:
    """Present fg ids -> float32 (C-1,) multi-hot; index c-1 stands for class c."""
    multihot = np.zeros(num_classes - 1, dtype=np.float32)
    for class_id in labels:
        if not 1 <= class_id < num_classes:
            raise DataError(f"class id {class_id} is not a foreground id in 1..{num_classes - 1}")
        multihot[class_id - 1] = 1.0
    return multihot


def check_label_map(
    label: np.ndarray,
    num_classes: int,
    uri: str,
    image_shape: tuple[int, ...] | None = None,
    image_uri: str = "",
) -> np.ndarray:
    """`label` itself when its ids are in 0..C-1 or 255 and its (H, W) is the image's; else DataError.

    A label map of another size would be silently resized or crash a loss far from its file; an id
    outside the classes would index past the logits. Both name the file and the value.
    """
    if image_shape is not None and tuple(label.shape[:2]) != tuple(image_shape[:2]):
        raise DataError(
            f"label map '{uri}' is (H, W) = {tuple(label.shape[:2])}, but its image "
            f"'{image_uri}' is {tuple(image_shape[:2])}"
        )
    present = np.unique(label)
    too_large = present[(present >= num_classes) & (present != IGNORE_INDEX)]
    if too_large.size:
        raise DataError(
            f"label map '{uri}' has class id {int(too_large[0])}, but there are only "
            f"{num_classes} classes (ids 0..{num_classes - 1}, 255 = ignore)"
        )
    return label


def labels_from_mask(mask: np.ndarray, num_classes: int, mask_uri: str = "") -> tuple[int, ...]:
    """Present fg ids of a class-id mask (0 = background and 255 = ignore excluded)."""
    check_label_map(mask, num_classes, mask_uri)
    present = np.unique(mask)
    present = present[(present != 0) & (present != IGNORE_INDEX)]
    return tuple(int(c) for c in present)


def _not_utf8(uri: str, line: int, text: str) -> DataError:
    return DataError(f"file '{uri}' is not UTF-8 text: line {line} reads {text.strip()!r}")


def utf8_lines(uri: str) -> Iterator[str]:
    """Lines of a text file (newlines kept); a line that is not UTF-8 is a DataError naming it.

    Decoding with surrogateescape and checking line by line gives the exact line number (a strict
    stream decoder fails per 8 KB chunk, far from the line at fault).
    """
    with storage.open_text(uri, errors="surrogateescape") as text:
        for number, line in enumerate(text, start=1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                raise _not_utf8(uri, number, line) from None
            yield line


# ----------------------------------------------------------------------------------------------
# Class names


def read_class_names(uri: str) -> list[str]:
    """One class name per line (blank lines skipped); the first is the background."""
    names = [line.strip() for line in utf8_lines(uri) if line.strip()]
    if len(names) < 2:
        raise DataError(f"class names file '{uri}': needs background + at least one class")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"class names file '{uri}': duplicate class name '{duplicates[0]}'")
    return names


def class_names_for(source: str, root: str = "", class_names_file: str = "") -> list[str]:
    """Class names (background first) for a data source.

    An explicit `class_names_file` wins; a VOC-layout root may carry its own `class_names.txt`
    (synthetic data does); otherwise VOC / COCO defaults. A folder source needs a names file.
    """
    if class_names_file:
        return read_class_names(class_names_file)
    if source == "voc":
        if root and storage.exists(storage.join(root, "class_names.txt")):
            return read_class_names(storage.join(root, "class_names.txt"))
        return list(VOC_CLASS_NAMES)
    if source == "coco":
        return list(COCO_CLASS_NAMES)
    if source == "folder":
        raise DataError("data source 'folder' needs a class names file (data.class_names)")
    raise DataError(f"unknown data source '{source}' (known: voc, coco, folder)")


def resolve_class_names(class_names: Sequence[str] | str | None, default: Sequence[str]) -> list:
    if class_names is None or (isinstance(class_names, str) and not class_names):
        return list(default)  # "" = config default "use the source's own names"
    if isinstance(class_names, (str, os.PathLike)):
        return read_class_names(os.fspath(class_names))
    return list(class_names)


__all__ = [
    "COCO_CLASS_NAMES",
    "VOC_CLASS_NAMES",
    "DataError",
    "Record",
    "check_label_map",
    "class_names_for",
    "labels_from_mask",
    "labels_to_multihot",
    "read_class_names",
    "resolve_class_names",
    "utf8_lines",
]
