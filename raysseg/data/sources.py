"""The dataset sources: VOC layout, COCO annotations, a plain folder + labels table -> Records.

Builders are generators: they yield one record at a time and never hold the whole dataset in a list
(COCO and web-scale folders have hundreds of thousands to millions of images). The only
per-dataset state they keep is the set of image ids seen so far, to reject duplicates.
`train_records(config)` / `val_records(config)` pick the builder and its arguments from the config.
One file for the three sources (about 420 lines): they are one job, Records from a dataset on disk,
and share the mask, saliency and duplicate-id conventions a reader checks them against.
"""

from __future__ import annotations

import contextlib
import io as _io
import itertools
import json
import posixpath
from collections.abc import Iterator, Sequence

import numpy as np

from raysseg import storage
from raysseg.config import IGNORE_INDEX, Config, ConfigError
from raysseg.data import io
from raysseg.data.checks import Report, raise_problem
from raysseg.data.label_files import (
    check_label_columns,
    iter_label_rows,
    parse_labels,
    read_labels_table,
)
from raysseg.data.records import (
    VOC_CLASS_NAMES,
    DataError,
    Record,
    labels_from_mask,
    resolve_class_names,
    utf8_lines,
)
from raysseg.rundir import layout

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------
# VOC layout


def under_root(root: str, path: str) -> str:
    """`path` itself when it is absolute or a URI, else `root/path`."""
    if storage.is_uri(path) or path.startswith("/"):
        return path
    return storage.join(root, path)


def _split_entries(split_file: str, root: str) -> Iterator[tuple[str, str]]:
    """(image id, listed mask uri or "") per line of an ImageSets split file.

    One column: the image id. Two columns, as PSA/AuxSegNet's and SBD's train_aug.txt
    (`/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`): the id is the first
    column's stem and the second column is the mask, relative to the dataset root.
    """
    if not storage.exists(split_file):
        raise DataError(f"split file not found: '{split_file}'")
    for line in utf8_lines(split_file):
        tokens = line.split()
        if not tokens:
            continue
        image_id = posixpath.splitext(posixpath.basename(tokens[0]))[0]
        listed_mask = storage.join(root, tokens[1].lstrip("/")) if len(tokens) > 1 else ""
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
    report: Report = raise_problem,
) -> Iterator[Record]:
    """Records of a VOC-layout folder, in split-file order.

    root/JPEGImages/<id>.jpg, GT masks (palette PNGs, read as indices) in `voc_mask_dir(root,
    mask_dir)` or as the split file's second column, root/ImageSets/Segmentation/<split>.txt,
    optional root/saliency/<id>.png and root/class_names.txt. An image without a mask file has
    mask_uri "" (it is trained on, not scored). Image labels: from `labels_file` when one is given
    (CSV/Parquet `image_id,labels` or cls_labels.npy; every split id must be in it), else from
    the mask. `masks_only` (validation: scored against masks, never trained on): only the images
    with a mask, labels from it, `labels_file` unused. An item with a problem (duplicate id,
    missing image, unreadable mask, no labels) goes to `report` and is left out.
    """
    if class_names is None and storage.exists(storage.join(root, "class_names.txt")):
        class_names = storage.join(root, "class_names.txt")
    names = resolve_class_names(class_names, VOC_CLASS_NAMES)
    split_file = storage.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    use_file = bool(labels_file) and not masks_only
    label_table = read_labels_table(labels_file, names) if use_file else {}
    masks = voc_mask_dir(root, mask_dir)
    seen: set[str] = set()
    for image_id, listed_mask in _split_entries(split_file, root):
        if image_id in seen:
            report(image_id, "", f"split file '{split_file}': duplicate image id '{image_id}'")
            continue
        seen.add(image_id)
        image_uri = storage.join(root, "JPEGImages", f"{image_id}.jpg")
        if not storage.exists(image_uri):
            message = (
                f"split file '{split_file}' lists image '{image_id}', but '{image_uri}' is missing"
            )
            report(image_id, image_uri, message)
            continue
        mask_uri = listed_mask or storage.join(masks, f"{image_id}.png")
        has_mask = storage.exists(mask_uri)
        if masks_only and not has_mask:
            continue
        try:
            # The mask is read here only when the labels come from it; the manifest step's file
            # check decodes every mask (in parallel) either way.
            mask_labels = None
            if has_mask and not use_file:
                mask_labels = labels_from_mask(io.read_label(mask_uri), len(names), mask_uri)
            source = labels_file if use_file else ""
            labels = _voc_labels(image_id, label_table, source, mask_labels, mask_uri, split_file)
        except (OSError, DataError) as error:
            report(image_id, mask_uri if has_mask else "", str(error))
            continue
        yield Record(
            image_id=image_id,
            image_uri=image_uri,
            labels=labels,
            mask_uri=mask_uri if has_mask else "",
            saliency_uri=_existing(storage.join(root, "saliency", f"{image_id}.png")),
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
    return uri if uri and storage.exists(uri) else ""


# ----------------------------------------------------------------------------------------------
# COCO


def _load_coco(annotation_json: str):
    """A pycocotools COCO index built from a local path or URI; bad JSON errors name the file."""
    from pycocotools.coco import COCO  # local import: only the COCO source needs it

    try:
        dataset = json.loads(storage.read_bytes(annotation_json).decode("utf-8"))
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
    annotation_json: str,
    image_dir: str,
    mask_dir: str,
    num_classes: int = 0,
    report: Report = raise_problem,
) -> Iterator[Record]:
    """Records of a COCO split, in image-id order; semantic masks written once to `mask_dir`.

    Image labels: every annotated category, crowd annotations INCLUDED (a crowd of people still
    shows people: telling the classifier otherwise would teach it a wrong label). The crowd pixels
    themselves are 255 in the mask, so they are neither trained on as GT nor scored.
    Images without annotations get labels () and an all-background mask.
    Classes: background + the file's categories mapped to 1..K in category-id order (K = 80 for
    COCO 2014/2017, giving 81 classes); `num_classes` > 0 must be K + 1. An image with a
    problem (no file name or size, a duplicate id, a bad annotation) goes to `report`, left out.
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
            message = (
                f"COCO annotation file '{annotation_json}': image {image_key} lacks "
                f"file_name/height/width"
            )
            report(str(image_key), "", message)
            continue
        image_id = posixpath.splitext(posixpath.basename(file_name))[0]
        if image_id in seen:
            message = f"COCO annotation file '{annotation_json}': duplicate image id '{image_id}'"
            report(image_id, "", message)
            continue
        seen.add(image_id)
        annotations = coco.imgToAnns.get(image_key, [])
        labels = tuple(sorted({category_map.get(a["category_id"], -1) for a in annotations} - {-1}))
        mask_uri = layout.sharded_uri(mask_dir, image_id)
        if not storage.exists(mask_uri):
            try:
                mask = render_coco_mask(coco, image_info, category_map, annotation_json)
            except DataError as error:
                report(image_id, "", str(error))
                continue
            io.write_png_atomic(mask_uri, mask, palette=palette)
        yield Record(
            image_id=image_id,
            image_uri=storage.join(image_dir, file_name),
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
        return image_id, storage.join(image_dir, file_name)
    stem, extension = posixpath.splitext(image_id)
    if extension.lower() in IMAGE_EXTENSIONS:
        return stem, storage.join(image_dir, image_id)
    for candidate in IMAGE_EXTENSIONS:
        uri = storage.join(image_dir, image_id + candidate)
        if storage.exists(uri):
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
    report: Report = raise_problem,
) -> Iterator[Record]:
    """Records of a plain image folder labelled by a CSV or Parquet table, in table order.

    Columns: `image_id`, `labels` (space-separated class names or ids, or a list), optional
    `file_name` (relative to image_dir). Without file_name, an id ending in an image extension
    names the file; otherwise '<id>.jpg' (then .jpeg, .png, ...) is looked up. Optional GT
    masks `<mask_dir>/<id>.png` (class-id PNGs) are used for scoring where they exist. A row with
    a problem (no image file, an unknown class, a duplicate id) goes to `report`, left out.
    """
    names = resolve_class_names(class_names, ())
    if len(names) < 2:
        raise DataError("folder_records needs class names: background + at least one class")
    if not storage.exists(labels_file):
        raise DataError(f"labels file not found: '{labels_file}'")
    seen: set[str] = set()
    for row_number, row in iter_label_rows(labels_file):
        check_label_columns(row, labels_file)  # a missing column is the file's, not a row's
        raw_id = str(row["image_id"]).strip()
        try:
            image_id, image_uri = _folder_image_file(image_dir, raw_id, row, labels_file)
            labels = parse_labels(row["labels"], names, labels_file, image_id)
        except DataError as error:
            report(raw_id, "", str(error))
            continue
        if image_id in seen:
            message = (
                f"labels file '{labels_file}', row {row_number}: duplicate image id '{image_id}'"
            )
            report(image_id, "", message)
            continue
        seen.add(image_id)
        yield Record(
            image_id=image_id,
            image_uri=image_uri,
            labels=labels,
            # Masks are decoded and checked by the manifest step's file check, in parallel.
            mask_uri=_existing(storage.join(mask_dir, f"{image_id}.png") if mask_dir else ""),
            saliency_uri=_existing(
                storage.join(saliency_dir, f"{image_id}.png") if saliency_dir else ""
            ),
        )


# ----------------------------------------------------------------------------------------------
# The config's choice


def train_records(config: Config, report: Report = raise_problem) -> Iterator[Record]:
    """The training images of the configured source (`data.subset` of them when set)."""
    records = _records(config, config.data.train_split, config.data.coco_annotations, report)
    return itertools.islice(records, config.data.subset) if config.data.subset else records


def val_records(config: Config, report: Report = raise_problem) -> Iterator[Record] | None:
    """The validation images with a GT mask (they are scored, never trained on); None when the
    source has no validation split (folder) or none is configured."""
    data = config.data
    if data.source == "voc":
        split_file = storage.join(data.root, "ImageSets", "Segmentation", f"{data.val_split}.txt")
        if not data.val_split or not storage.exists(split_file):
            return None
        names = data.class_names or None
        return voc_records(
            data.root,
            data.val_split,
            names,
            mask_dir=data.mask_dir,
            masks_only=True,
            report=report,
        )
    if data.source == "folder" or not data.coco_val_annotations:
        return None
    return _records(config, data.val_split, data.coco_val_annotations, report)


def _records(config: Config, split: str, coco_json: str, report: Report) -> Iterator[Record]:
    data = config.data
    if data.source == "voc":
        names = data.class_names or None
        return voc_records(
            data.root, split, names, data.labels_file, mask_dir=data.mask_dir, report=report
        )
    if data.source == "coco":
        if not coco_json:
            raise ConfigError("config key 'data.coco_annotations': not set (data.source=coco)")
        return coco_records(
            coco_json,
            storage.join(data.root, split),
            layout.coco_masks(config.run_dir, split),
            config.model.num_classes,
            report=report,
        )
    if not data.labels_file:
        raise ConfigError("config key 'data.labels_file': not set (data.source=folder)")
    return folder_records(
        data.root,
        data.labels_file,
        data.class_names,
        saliency_dir=data.saliency_dir,
        mask_dir=under_root(data.root, data.mask_dir) if data.mask_dir else "",
        report=report,
    )


__all__ = [
    "IMAGE_EXTENSIONS",
    "coco_category_map",
    "coco_class_names",
    "coco_records",
    "folder_records",
    "render_coco_mask",
    "train_records",
    "under_root",
    "val_records",
    "voc_mask_dir",
    "voc_records",
]
