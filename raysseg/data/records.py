"""One record type for every data source, streaming builders, and Parquet manifests.

A `Record` names one training/evaluation image and the files that go with it. Builders are
generators: they yield one record at a time and never hold the whole dataset in a list (COCO and
web-scale folders have hundreds of thousands to millions of images). The only per-dataset state
they keep is the set of image ids seen so far, to reject duplicates.

Errors on bad input are `DataError`s that name the file, the key (image id / line) and the value.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import os
import pickle
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysseg.config import IGNORE_INDEX
from raysseg.data import io
from raysseg.layout import sharded_uri

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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_ROWS_PER_FILE = 100_000
# Row groups bound what a random-access reader (ManifestRows) holds: one group, ~2-4 MB of URIs.
ROWS_PER_GROUP = 16_384
_PART_PREFIX = "part-"


class DataError(ValueError):
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


def _utf8_lines(uri: str) -> Iterator[str]:
    """Lines of a text file (newlines kept); a line that is not UTF-8 is a DataError naming it.

    Decoding with surrogateescape and checking line by line gives the exact line number (a strict
    stream decoder fails per 8 KB chunk, far from the line at fault).
    """
    with io.open_text(uri, errors="surrogateescape") as text:
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
    names = [line.strip() for line in _utf8_lines(uri) if line.strip()]
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
        if root and io.exists(io.join(root, "class_names.txt")):
            return read_class_names(io.join(root, "class_names.txt"))
        return list(VOC_CLASS_NAMES)
    if source == "coco":
        return list(COCO_CLASS_NAMES)
    if source == "folder":
        raise DataError("data source 'folder' needs a class names file (data.class_names)")
    raise DataError(f"unknown data source '{source}' (known: voc, coco, folder)")


def _resolve_class_names(class_names: Sequence[str] | str | None, default: Sequence[str]) -> list:
    if class_names is None or (isinstance(class_names, str) and not class_names):
        return list(default)  # "" = config default "use the source's own names"
    if isinstance(class_names, (str, os.PathLike)):
        return read_class_names(os.fspath(class_names))
    return list(class_names)


def parse_labels(
    value: object, class_names: Sequence[str], source: str, image_id: str
) -> tuple[int, ...]:
    """Labels given as a space-separated string or a list of class names or ids -> sorted ids.

    `source` (the labels file) and `image_id` only serve the error message.
    """
    if value is None:
        tokens: list = []
    elif isinstance(value, str):
        tokens = value.replace(",", " ").replace(";", " ").split()
    else:
        tokens = list(value)
    name_to_id = {name: index for index, name in enumerate(class_names)}
    ids = set()
    for token in tokens:
        text = str(token).strip()
        if text in name_to_id:
            class_id = name_to_id[text]
        elif text.lstrip("-").isdigit():
            class_id = int(text)
        else:
            raise DataError(
                f"labels file '{source}', image '{image_id}': unknown class name '{text}' "
                f"(known: {', '.join(class_names[1:])})"
            )
        if not 1 <= class_id < len(class_names):
            raise DataError(
                f"labels file '{source}', image '{image_id}': label '{text}' is not a foreground "
                f"class (ids 1..{len(class_names) - 1})"
            )
        ids.add(class_id)
    return tuple(sorted(ids))


def _iter_label_rows(labels_file: str) -> Iterator[tuple[int, dict]]:
    """Stream (row number, row dict) from a CSV (header row) or Parquet labels file."""
    if labels_file.endswith(".parquet") or io.is_dir(labels_file):
        row_number = 0
        for batch in _iter_parquet_batches(labels_file):
            for row in batch.to_pylist():
                row_number += 1
                yield row_number, row
        return
    for row_number, row in enumerate(csv.DictReader(_utf8_lines(labels_file)), start=2):
        yield row_number, row  # line 1 is the header


def _check_label_columns(row: dict, labels_file: str) -> None:
    missing = [key for key in ("image_id", "labels") if key not in row]
    if missing:
        raise DataError(
            f"labels file '{labels_file}': missing column '{missing[0]}' "
            f"(expected columns image_id,labels; found {', '.join(map(str, row))})"
        )


def read_labels_table(labels_file: str, class_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """image_id -> labels for the (VOC) split lookup; the file is small next to the images.

    A `.npy` file is PSA/AuxSegNet's `cls_labels.npy` (`read_cls_labels`); anything else is a
    CSV or Parquet table `image_id,labels`.
    """
    if labels_file.endswith(".npy"):
        return read_cls_labels(labels_file, len(class_names))
    table: dict[str, tuple[int, ...]] = {}
    for row_number, row in _iter_label_rows(labels_file):
        _check_label_columns(row, labels_file)
        image_id = str(row["image_id"]).strip()
        if image_id in table:
            raise DataError(
                f"labels file '{labels_file}', row {row_number}: duplicate image id '{image_id}'"
            )
        table[image_id] = parse_labels(row["labels"], class_names, labels_file, image_id)
    return table


# Globals a pickled dict of numpy vectors refers to (numpy 1.x and 2.x module names), and nothing
# else: unpickling runs whatever callable a pickle names, so any other name is refused.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles (numpy arrays written by Python 2)
    ("builtins", "dict"),
    ("builtins", "str"),
}


class _NumpyDictUnpickler(pickle.Unpickler):
    """Loads numpy arrays, dicts, lists, strings and numbers only.

    Safe because code runs in a pickle only through the callables `find_class` hands out (REDUCE,
    NEWOBJ, BUILD call them or their `__setstate__`): here array reconstruction, dtype and
    scalar constructors, `codecs.encode` and the dict / str types, none of which reaches the
    file system, imports or evaluates anything.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load global '{module}.{name}'")
        if module.startswith("numpy.") and module.endswith("multiarray"):
            from numpy._core import multiarray  # numpy 2 home of numpy.core.multiarray

            return getattr(multiarray, name)
        return super().find_class(module, name)


def _load_pickled_dict(uri: str) -> dict:
    """The dict that `np.save(path, dict)` wrote (a 0-d object array), through the restricted
    unpickler; anything else is a DataError naming the file."""
    stream = _io.BytesIO(io.read_bytes(uri))
    try:
        version = np.lib.format.read_magic(stream)
        header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = header(stream)
    except ValueError as error:
        raise DataError(f"labels file '{uri}': not a .npy file ({error})") from error
    if dtype != np.dtype(object) or shape != ():
        raise DataError(
            f"labels file '{uri}': expected a pickled dict image id -> label vector "
            f"(np.save of a dict), found an array of dtype {dtype} and shape {shape}"
        )
    try:
        value = _NumpyDictUnpickler(stream).load()
    except Exception as error:  # a refused global, a truncated or corrupt pickle
        raise DataError(f"labels file '{uri}': cannot read its pickled dict ({error})") from error
    value = value.item() if isinstance(value, np.ndarray) and value.shape == () else value
    if not isinstance(value, dict):
        raise DataError(
            f"labels file '{uri}': expected a dict image id -> label vector, found "
            f"{type(value).__name__}"
        )
    return value


def read_cls_labels(uri: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """PSA/AuxSegNet's `cls_labels.npy`: {"2007_000032": float (C-1,) 0/1 vector} -> image id ->
    present fg ids (index i stands for class i + 1). Errors name the file, the id and the value."""
    table: dict[str, tuple[int, ...]] = {}
    for key, vector in _load_pickled_dict(uri).items():
        image_id = key.decode("utf-8") if isinstance(key, bytes) else key
        if not isinstance(image_id, str):
            raise DataError(f"labels file '{uri}': image id {key!r} is not a string")
        values = np.asarray(vector)
        if values.ndim != 1 or values.shape[0] != num_classes - 1:
            raise DataError(
                f"labels file '{uri}', image '{image_id}': label vector of shape {values.shape}, "
                f"expected length {num_classes - 1} (model.num_classes - 1)"
            )
        if values.dtype.kind not in "biuf" or not np.isin(values, (0, 1)).all():
            raise DataError(
                f"labels file '{uri}', image '{image_id}': label vector {values.tolist()} is "
                "not all 0 / 1"
            )
        table[image_id] = tuple(int(i) + 1 for i in np.flatnonzero(values))
    return table


# ----------------------------------------------------------------------------------------------
# VOC layout


def under_root(root: str, path: str) -> str:
    """`path` itself when it is absolute or a URI, else `root/path`."""
    if "://" in path or path.startswith("/"):
        return path
    return io.join(root, path)


def _split_entries(split_file: str, root: str) -> Iterator[tuple[str, str]]:
    """(image id, listed mask uri or "") per line of an ImageSets split file.

    One column: the image id. Two columns, as PSA/AuxSegNet's and SBD's train_aug.txt
    (`/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`): the id is the first
    column's stem and the second column is the mask, relative to the dataset root.
    """
    if not io.exists(split_file):
        raise DataError(f"split file not found: '{split_file}'")
    for line in _utf8_lines(split_file):
        tokens = line.split()
        if not tokens:
            continue
        image_id = posixpath.splitext(posixpath.basename(tokens[0]))[0]
        listed_mask = io.join(root, tokens[1].lstrip("/")) if len(tokens) > 1 else ""
        yield image_id, listed_mask


def voc_mask_dir(root: str, mask_dir: str = "") -> str:
    """Where the GT masks of a VOC-layout root are: `mask_dir` (relative to root, or a path/URI),
    by default root/SegmentationClass (train_aug: SBD's SegmentationClassAug)."""
    return under_root(root, mask_dir or "SegmentationClass")


def voc_records(
    root: str,
    split: str,
    class_names: Sequence[str] | str | None = None,
    labels_file: str = "",
    mask_dir: str = "",
    masks_only: bool = False,
) -> Iterator[Record]:
    """Records of a VOC-layout folder, in split-file order.

    root/JPEGImages/<id>.jpg, GT masks (palette PNGs, read as indices) in `voc_mask_dir(root,
    mask_dir)` or as the split file's second column, root/ImageSets/Segmentation/<split>.txt,
    optional root/saliency/<id>.png and root/class_names.txt. An image without a mask file has
    mask_uri "" (it is trained on, not scored). Image labels: from `labels_file` when one is given
    (CSV/Parquet `image_id,labels` or cls_labels.npy; every split id must be in it), else from
    the mask. `masks_only` (validation: scored against masks, never trained on): only the images
    with a mask, labels from it, `labels_file` unused.
    """
    if class_names is None and io.exists(io.join(root, "class_names.txt")):
        class_names = io.join(root, "class_names.txt")
    names = _resolve_class_names(class_names, VOC_CLASS_NAMES)
    split_file = io.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    use_file = bool(labels_file) and not masks_only
    label_table = read_labels_table(labels_file, names) if use_file else {}
    masks = voc_mask_dir(root, mask_dir)
    seen: set[str] = set()
    for image_id, listed_mask in _split_entries(split_file, root):
        if image_id in seen:
            raise DataError(f"split file '{split_file}': duplicate image id '{image_id}'")
        seen.add(image_id)
        image_uri = io.join(root, "JPEGImages", f"{image_id}.jpg")
        if not io.exists(image_uri):
            raise DataError(
                f"split file '{split_file}' lists image '{image_id}', but '{image_uri}' is missing"
            )
        mask_uri = listed_mask or io.join(masks, f"{image_id}.png")
        has_mask = io.exists(mask_uri)
        if masks_only and not has_mask:
            continue
        # Read even when the labels come from the file: a bad mask fails here, naming it,
        # not in the label-quality step after a stage.
        mask_labels = None
        if has_mask:
            mask_labels = labels_from_mask(io.read_label(mask_uri), len(names), mask_uri)
        source = labels_file if use_file else ""
        yield Record(
            image_id=image_id,
            image_uri=image_uri,
            labels=_voc_labels(image_id, label_table, source, mask_labels, mask_uri, split_file),
            mask_uri=mask_uri if has_mask else "",
            saliency_uri=_existing(io.join(root, "saliency", f"{image_id}.png")),
        )


def _voc_labels(
    image_id: str,
    table: dict[str, tuple[int, ...]],
    labels_file: str,
    mask_labels: tuple[int, ...] | None,
    mask_uri: str,
    split_file: str,
) -> tuple[int, ...]:
    """The labels file's entry when a file is given (a missing id is an error), else the mask's."""
    if labels_file:
        if image_id not in table:
            raise DataError(
                f"labels file '{labels_file}' has no entry for image '{image_id}' of split file "
                f"'{split_file}'"
            )
        return table[image_id]
    if mask_labels is None:
        raise DataError(
            f"image '{image_id}' (split file '{split_file}') has no mask '{mask_uri}' and no "
            "labels file (data.labels_file) gives its labels"
        )
    return mask_labels


def _existing(uri: str) -> str:
    return uri if uri and io.exists(uri) else ""


# ----------------------------------------------------------------------------------------------
# COCO


def _load_coco(annotation_json: str):
    """A pycocotools COCO index built from a local path or URI; bad JSON errors name the file."""
    from pycocotools.coco import COCO  # local import: only the COCO source needs it

    try:
        dataset = json.loads(io.read_bytes(annotation_json).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"COCO annotation file '{annotation_json}': not valid JSON ({error})"
        ) from error
    if not isinstance(dataset, dict):
        raise DataError(f"COCO annotation file '{annotation_json}': expected a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise DataError(f"COCO annotation file '{annotation_json}': missing list '{key}'")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(_io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def coco_category_map(coco) -> tuple[dict[int, int], list[str]]:
    """COCO category id -> contiguous class id 1..K (in category-id order), and class names."""
    category_ids = sorted(coco.cats)
    mapping = {category_id: index + 1 for index, category_id in enumerate(category_ids)}
    names = ["background"] + [coco.cats[c]["name"].replace(" ", "_") for c in category_ids]
    return mapping, names


def render_coco_mask(
    coco, image_info: dict, category_map: dict[int, int], source: str
) -> np.ndarray:
    """uint8 (H, W) semantic mask from the instance annotations of one image.

    Crowd regions are painted 255 (ignore) FIRST, then ordinary instances from largest to smallest
    on top: an individually annotated object inside a crowd keeps its class, and a small object
    lying on a larger one is not hidden by it.
    """
    height, width = int(image_info["height"]), int(image_info["width"])
    mask = np.zeros((height, width), dtype=np.uint8)
    annotations = coco.imgToAnns.get(image_info["id"], [])
    crowds = [a for a in annotations if a.get("iscrowd", 0)]
    instances = sorted(
        (a for a in annotations if not a.get("iscrowd", 0)),
        key=lambda a: -float(a.get("area", 0.0)),
    )
    for annotation in crowds + instances:
        if annotation["category_id"] not in category_map:
            raise DataError(
                f"COCO annotation file '{source}': annotation {annotation.get('id')} has unknown "
                f"category_id {annotation['category_id']}"
            )
        try:
            instance = coco.annToMask(annotation).astype(bool)
        except Exception as error:  # pycocotools raises assorted types on malformed segmentations
            raise DataError(
                f"COCO annotation file '{source}': annotation {annotation.get('id')} has a bad "
                f"segmentation ({error})"
            ) from error
        if instance.shape != mask.shape:
            raise DataError(
                f"COCO annotation file '{source}': annotation {annotation.get('id')} mask shape "
                f"{instance.shape} != image {image_info['id']} size {mask.shape}"
            )
        value = (
            IGNORE_INDEX
            if annotation.get("iscrowd", 0)
            else category_map[annotation["category_id"]]
        )
        mask[instance] = value
    return mask


def coco_records(
    annotation_json: str, image_dir: str, mask_dir: str, num_classes: int = 0
) -> Iterator[Record]:
    """Records of a COCO split, in image-id order; semantic masks written once to `mask_dir`.

    Image labels: every annotated category, crowd annotations INCLUDED (a crowd of people still
    shows people: telling the classifier otherwise would teach it a wrong label). The crowd pixels
    themselves are 255 in the mask, so they are neither trained on as GT nor scored.
    Images without annotations get labels () and an all-background mask.
    Classes: background + the file's categories mapped to 1..K in category-id order (K = 80 for
    COCO 2014/2017, giving 81 classes); `num_classes` > 0 must be K + 1.
    """
    coco = _load_coco(annotation_json)
    category_map, _ = coco_category_map(coco)
    if num_classes and len(category_map) + 1 != num_classes:
        raise DataError(
            f"COCO annotation file '{annotation_json}' has {len(category_map)} categories, so "
            f"{len(category_map) + 1} classes with background, but config key "
            f"'model.num_classes' is {num_classes}"
        )
    palette = io.voc_palette()
    seen: set[str] = set()
    for image_key in sorted(coco.imgs):
        image_info = coco.imgs[image_key]
        file_name = image_info.get("file_name")
        if not file_name or "height" not in image_info or "width" not in image_info:
            raise DataError(
                f"COCO annotation file '{annotation_json}': image {image_key} lacks "
                f"file_name/height/width"
            )
        image_id = posixpath.splitext(posixpath.basename(file_name))[0]
        if image_id in seen:
            raise DataError(
                f"COCO annotation file '{annotation_json}': duplicate image id '{image_id}'"
            )
        seen.add(image_id)
        annotations = coco.imgToAnns.get(image_key, [])
        labels = tuple(sorted({category_map.get(a["category_id"], -1) for a in annotations} - {-1}))
        mask_uri = sharded_uri(mask_dir, image_id)
        if not io.exists(mask_uri):
            mask = render_coco_mask(coco, image_info, category_map, annotation_json)
            io.write_png_atomic(mask_uri, mask, palette=palette)
        yield Record(
            image_id=image_id,
            image_uri=io.join(image_dir, file_name),
            labels=labels,
            mask_uri=mask_uri,
        )


def coco_class_names(annotation_json: str) -> list[str]:
    """Background + the file's category names in category-id order."""
    return coco_category_map(_load_coco(annotation_json))[1]


# ----------------------------------------------------------------------------------------------
# Plain folder + labels table


def _folder_image_file(image_dir: str, image_id: str, row: dict, labels_file: str) -> tuple:
    """(image id, image uri) from the row's optional file_name column or the id itself."""
    file_name = str(row.get("file_name") or "").strip()
    if file_name:
        return image_id, io.join(image_dir, file_name)
    stem, extension = posixpath.splitext(image_id)
    if extension.lower() in IMAGE_EXTENSIONS:
        return stem, io.join(image_dir, image_id)
    for candidate in IMAGE_EXTENSIONS:
        uri = io.join(image_dir, image_id + candidate)
        if io.exists(uri):
            return image_id, uri
    raise DataError(
        f"labels file '{labels_file}': no image file for id '{image_id}' in '{image_dir}' "
        f"(tried {', '.join(IMAGE_EXTENSIONS)})"
    )


def folder_records(
    image_dir: str,
    labels_file: str,
    class_names: Sequence[str] | str,
    saliency_dir: str = "",
    mask_dir: str = "",
) -> Iterator[Record]:
    """Records of a plain image folder labelled by a CSV or Parquet table, in table order.

    Columns: `image_id`, `labels` (space-separated class names or ids, or a list), optional
    `file_name` (relative to image_dir). Without file_name, an id ending in an image extension
    names the file; otherwise '<id>.jpg' (then .jpeg, .png, ...) is looked up. Optional GT
    masks `<mask_dir>/<id>.png` (class-id PNGs) are used for scoring where they exist.
    """
    names = _resolve_class_names(class_names, ())
    if len(names) < 2:
        raise DataError("folder_records needs class names: background + at least one class")
    if not io.exists(labels_file):
        raise DataError(f"labels file not found: '{labels_file}'")
    seen: set[str] = set()
    for row_number, row in _iter_label_rows(labels_file):
        _check_label_columns(row, labels_file)
        raw_id = str(row["image_id"]).strip()
        image_id, image_uri = _folder_image_file(image_dir, raw_id, row, labels_file)
        if image_id in seen:
            raise DataError(
                f"labels file '{labels_file}', row {row_number}: duplicate image id '{image_id}'"
            )
        seen.add(image_id)
        mask_uri = _existing(io.join(mask_dir, f"{image_id}.png") if mask_dir else "")
        if mask_uri:  # refused here, naming it, rather than when a stage's labels are scored
            check_label_map(io.read_label(mask_uri), len(names), mask_uri)
        yield Record(
            image_id=image_id,
            image_uri=image_uri,
            labels=parse_labels(row["labels"], names, labels_file, image_id),
            mask_uri=mask_uri,
            saliency_uri=_existing(
                io.join(saliency_dir, f"{image_id}.png") if saliency_dir else ""
            ),
        )


# ----------------------------------------------------------------------------------------------
# Manifests: a folder of Parquet part files, read back as a stream

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_uri", pa.string()),
        ("labels", pa.list_(pa.int16())),
        ("mask_uri", pa.string()),
        ("saliency_uri", pa.string()),
        ("seg_label_uri", pa.string()),
        ("sal_label_uri", pa.string()),
    ]
)
_RECORD_FIELDS = tuple(f.name for f in fields(Record))


def record_to_row(record: Record) -> dict:
    """Plain dict (labels as a list), e.g. for a Ray Data row."""
    row = asdict(record)
    row["labels"] = list(record.labels)
    return row


def record_from_row(row: dict) -> Record:
    """Inverse of `record_to_row`; extra keys (label statistics ...) are ignored."""
    values = {name: row.get(name) for name in _RECORD_FIELDS}
    values["labels"] = tuple(int(c) for c in (values["labels"] or ()))
    for name in _RECORD_FIELDS:
        if name not in ("labels",) and values[name] is None:
            values[name] = ""
    return Record(**values)


class PartWriter:
    """Streams Arrow tables into a folder as part-00000.parquet, part-00001.parquet, ...

    Row groups of ROWS_PER_GROUP rows (what ManifestRows indexes), however small the tables that
    come in; files of at most `rows_per_file` rows, each written atomically once full (at most one
    file is held in memory). No row at all still writes one empty part that carries the schema.
    """

    def __init__(
        self, path: str, schema: pa.Schema, rows_per_file: int = DEFAULT_ROWS_PER_FILE
    ) -> None:
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
        self.path, self.schema, self.rows_per_file = path, schema, rows_per_file
        self.rows = 0
        self._parts = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file_rows = 0
        self._sink: pa.BufferOutputStream | None = None
        self._writer: pq.ParquetWriter | None = None
        io.makedirs(path)

    def write(self, table: pa.Table) -> None:
        """Append `table` (its columns in `schema`'s order, castable to it)."""
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._group_rows():
            self._write_group(self._group_rows())

    def close(self) -> int:
        """Write what is pending; returns the number of rows written."""
        if self._pending_rows:
            self._write_group(self._pending_rows)
        if self._writer is None and self._parts == 0:
            self._open_part()
        self._close_part()
        return self.rows

    def _group_rows(self) -> int:
        return min(ROWS_PER_GROUP, self.rows_per_file - self._file_rows)

    def _write_group(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        if self._writer is None:
            self._open_part()
        self._writer.write_table(pending.slice(0, rows), row_group_size=rows)
        rest = pending.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self._file_rows += rows
        self.rows += rows
        if self._file_rows == self.rows_per_file:
            self._close_part()

    def _open_part(self) -> None:
        self._sink = pa.BufferOutputStream()
        self._writer = pq.ParquetWriter(self._sink, self.schema)

    def _close_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        uri = io.join(self.path, f"{_PART_PREFIX}{self._parts:05d}.parquet")
        io.write_bytes_atomic(uri, self._sink.getvalue().to_pybytes())
        self._parts += 1
        self._writer, self._sink, self._file_rows = None, None, 0


def _records_table(records: list[Record]) -> pa.Table:
    columns = {name: [getattr(r, name) for r in records] for name in _RECORD_FIELDS}
    columns["labels"] = [list(r.labels) for r in records]
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def write_manifest(
    records: Iterable[Record], path: str, rows_per_file: int = DEFAULT_ROWS_PER_FILE
) -> int:
    """Write records to folder `path` as part-00000.parquet, part-00001.parquet, ...

    Streams: at most one file of records is held at once. Part files of an earlier manifest
    at the same path are removed first, so the folder always holds exactly this manifest.
    Returns the number of records written.
    """
    if io.exists(path):
        if not io.is_dir(path):
            raise DataError(f"manifest path '{path}' exists and is not a folder")
        for stale in io.list_files(path, suffix=".parquet"):
            if posixpath.basename(stale).startswith(_PART_PREFIX):
                io.delete_file(stale)
    writer = PartWriter(path, MANIFEST_SCHEMA, rows_per_file)
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == 4096:  # Record objects -> Arrow a few thousand at a time
            writer.write(_records_table(chunk))
            chunk = []
    writer.write(_records_table(chunk))
    return writer.close()


def manifest_files(path: str) -> list[str]:
    """The Parquet files of a manifest folder (or the single file `path`), in written order."""
    if not io.exists(path):
        raise DataError(f"manifest not found: '{path}'")
    return io.list_files(path, suffix=".parquet") if io.is_dir(path) else [path]


@contextlib.contextmanager
def _parquet_file(uri: str) -> Iterator[pq.ParquetFile]:
    filesystem, file_path = io.resolve(uri)
    try:
        parquet = pq.ParquetFile(file_path, filesystem=filesystem)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"cannot read Parquet file '{uri}': {error}") from error
    with parquet:
        yield parquet


def _iter_parquet_batches(
    path: str, batch_size: int = 4096, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    for uri in manifest_files(path):
        try:
            with _parquet_file(uri) as parquet:
                yield from parquet.iter_batches(batch_size=batch_size, columns=columns)
        except pa.ArrowInvalid as error:
            raise DataError(f"cannot read Parquet file '{uri}': {error}") from error


def read_manifest(path: str, batch_size: int = 4096) -> Iterator[Record]:
    """Stream the records of a manifest folder (or a single Parquet file), in written order."""
    for batch in _iter_parquet_batches(path, batch_size=batch_size):
        for row in batch.to_pylist():
            yield record_from_row(row)


def manifest_row_count(path: str) -> int:
    """Rows of a manifest from the Parquet footers alone: no row is read."""
    total = 0
    for uri in manifest_files(path):
        with _parquet_file(uri) as parquet:
            total += parquet.metadata.num_rows
    return total


class ManifestRows(Sequence[Record]):
    """Random access to a manifest's records without holding them: the index keeps one entry per
    Parquet row group (file, group, first row), and each process caches the one group it read last.

    Readers that walk a group at a time (`BlockShuffleSampler` in raysseg.data.dataset) read every
    group once per epoch; memory stays one row group, whatever the dataset size.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.group_files: list[str] = []
        self.group_indices: list[int] = []
        starts = [0]
        for uri in manifest_files(path):
            with _parquet_file(uri) as parquet:
                metadata = parquet.metadata
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                if rows:
                    self.group_files.append(uri)
                    self.group_indices.append(group)
                    starts.append(starts[-1] + rows)
        self.group_starts = np.asarray(starts, dtype=np.int64)  # (groups + 1,)
        self._cached_group = -1
        self._cached_table: pa.Table | None = None

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def group_sizes(self) -> np.ndarray:
        return np.diff(self.group_starts)

    def __getitem__(self, index):  # int -> Record (slices are not needed by any reader)
        if not -len(self) <= index < len(self):
            raise IndexError(f"manifest '{self.path}' has {len(self)} rows, asked for {index}")
        index %= len(self)
        group = int(np.searchsorted(self.group_starts, index, side="right")) - 1
        if group != self._cached_group:
            with _parquet_file(self.group_files[group]) as parquet:
                self._cached_table = parquet.read_row_group(self.group_indices[group])
            self._cached_group = group
        offset = index - int(self.group_starts[group])
        return record_from_row(self._cached_table.slice(offset, 1).to_pylist()[0])

    def __getstate__(self) -> dict:
        # DataLoader workers get the index only, never another process's cached group.
        return {**self.__dict__, "_cached_group": -1, "_cached_table": None}


__all__ = [
    "COCO_CLASS_NAMES",
    "DEFAULT_ROWS_PER_FILE",
    "MANIFEST_SCHEMA",
    "ROWS_PER_GROUP",
    "VOC_CLASS_NAMES",
    "DataError",
    "ManifestRows",
    "PartWriter",
    "Record",
    "check_label_map",
    "class_names_for",
    "coco_category_map",
    "coco_class_names",
    "coco_records",
    "folder_records",
    "labels_from_mask",
    "labels_to_multihot",
    "manifest_files",
    "manifest_row_count",
    "parse_labels",
    "read_class_names",
    "read_cls_labels",
    "read_labels_table",
    "read_manifest",
    "record_from_row",
    "record_to_row",
    "render_coco_mask",
    "under_root",
    "voc_mask_dir",
    "voc_records",
    "write_manifest",
]
