"""raysseg.data.records: VOC / COCO / folder readers, errors that name things, manifests."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysseg.data import io, label_files, manifest
from raysseg.data.checks import check_item_files
from raysseg.data.manifest import read_manifest, write_manifest
from raysseg.data.records import (
    COCO_CLASS_NAMES,
    VOC_CLASS_NAMES,
    DataError,
    Record,
    class_names_for,
    labels_to_multihot,
)
from raysseg.data.sources import coco_class_names, coco_records, folder_records, voc_records
from raysseg.rundir.layout import shard_of


def _write_voc(
    root: Path,
    masks: dict[str, np.ndarray | None],
    split: str = "train",
    class_names: list[str] | None = None,
    saliency_ids: tuple[str, ...] = (),
    split_ids: list[str] | None = None,
) -> None:
    """A tiny VOC-layout folder: JPEGImages, SegmentationClass (palette PNGs), ImageSets."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "saliency"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, mask in masks.items():
        shape = mask.shape if mask is not None else (8, 10)
        rgb = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{image_id}.jpg")
        if mask is not None:
            io.write_png_atomic(
                str(root / "SegmentationClass" / f"{image_id}.png"), mask, io.voc_palette()
            )
    for image_id in saliency_ids:
        io.write_png_atomic(str(root / "saliency" / f"{image_id}.png"), np.zeros((8, 10), np.uint8))
    lines = split_ids if split_ids is not None else list(masks)
    (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    if class_names is not None:
        (root / "class_names.txt").write_text("\n".join(class_names) + "\n")


def _mask(values: list[int], shape=(8, 10)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for position, value in enumerate(values):
        mask[position, :4] = value
    return mask


# ----------------------------------------------------------------------------------------------
# VOC


def test_voc_records_labels_from_palette_masks(tmp_path):
    _write_voc(
        tmp_path,
        {"a": _mask([15, 255, 2]), "b": _mask([0]), "c": _mask([20, 1])},
        saliency_ids=("a",),
    )
    records = voc_records(str(tmp_path), "train")
    assert isinstance(records, types.GeneratorType)  # streaming, not a list
    records = list(records)
    assert [r.image_id for r in records] == ["a", "b", "c"]
    assert [r.labels for r in records] == [(2, 15), (), (1, 20)]
    assert records[0].saliency_uri.endswith("saliency/a.png")
    assert records[1].saliency_uri == ""
    assert records[0].mask_uri.endswith("SegmentationClass/a.png")
    assert records[0].image_uri.endswith("JPEGImages/a.jpg")


def test_voc_records_honours_class_names_txt(tmp_path):
    names = ["background", "cat", "dog"]
    _write_voc(tmp_path, {"a": _mask([2])}, class_names=names)
    assert [r.labels for r in voc_records(str(tmp_path), "train")] == [(2,)]
    assert class_names_for("voc", root=str(tmp_path)) == names
    # An id beyond the file's classes is an error naming the mask and the value.
    _write_voc(tmp_path, {"a": _mask([2]), "b": _mask([5])}, class_names=names)
    with pytest.raises(DataError, match=r"b\.png.*class id 5"):
        list(voc_records(str(tmp_path), "train"))


def test_voc_default_class_names():
    assert class_names_for("voc") == list(VOC_CLASS_NAMES)
    assert len(VOC_CLASS_NAMES) == 21


def test_voc_records_labels_file_when_mask_absent(tmp_path):
    _write_voc(tmp_path, {"a": _mask([3]), "b": None, "c": None})
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("image_id,labels\na,cat\nb,person dog\nc,5\n")
    records = list(voc_records(str(tmp_path), "train", labels_file=str(labels_csv)))
    # With a labels file, labels come from it (cat = 8, not the mask's 3); masks stay for scoring.
    assert [r.labels for r in records] == [(8,), (12, 15), (5,)]
    assert records[0].mask_uri.endswith("SegmentationClass/a.png") and records[1].mask_uri == ""
    # A split id missing from the labels file is an error naming the file and the id.
    labels_csv.write_text("image_id,labels\na,cat\nb,person\n")
    with pytest.raises(DataError, match=r"labels\.csv' has no entry for image 'c'"):
        list(voc_records(str(tmp_path), "train", labels_file=str(labels_csv)))
    # Without one, a mask-less image is an error naming the image and the missing mask.
    with pytest.raises(DataError, match=r"'b'.*no mask.*SegmentationClass/b\.png"):
        list(voc_records(str(tmp_path), "train"))
    # Validation keeps only the images with a mask, labelled from it; the labels file is unused.
    (val,) = voc_records(str(tmp_path), "train", labels_file="unused.csv", masks_only=True)
    assert val.image_id == "a" and val.labels == (3,)


def test_voc_train_aug_masks_from_a_named_mask_folder(tmp_path):
    _write_voc(tmp_path, {"a": None, "b": None})
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    io.write_png_atomic(str(aug / "a.png"), _mask([7]), io.voc_palette())
    io.write_png_atomic(str(aug / "b.png"), _mask([0, 12]), io.voc_palette())
    records = list(voc_records(str(tmp_path), "train", mask_dir="SegmentationClassAug"))
    assert [r.labels for r in records] == [(7,), (12,)]
    assert records[0].mask_uri == str(aug / "a.png")
    # An absolute folder works the same way.
    records = list(voc_records(str(tmp_path), "train", mask_dir=str(aug)))
    assert [r.mask_uri for r in records] == [str(aug / "a.png"), str(aug / "b.png")]


def test_voc_two_column_split_names_image_and_mask(tmp_path):
    # PSA / AuxSegNet / SBD train_aug.txt: image path, mask path, both relative to the root.
    _write_voc(
        tmp_path,
        {"2007_000032": None, "2007_000039": None, "2007_000063": _mask([4])},
        split_ids=[
            "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png",
            "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png",
            "2007_000063",  # one-column lines keep working, also mixed in
        ],
    )
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    io.write_png_atomic(str(aug / "2007_000032.png"), _mask([1, 15]), io.voc_palette())
    labels = _cls_labels({"2007_000032": (1, 15), "2007_000039": (2,), "2007_000063": (4,)})
    np.save(tmp_path / "cls_labels.npy", labels)
    # 2007_000039's listed mask is not there: it is trained on (labels from the file), unscored.
    labels_file = str(tmp_path / "cls_labels.npy")
    records = list(voc_records(str(tmp_path), "train", labels_file=labels_file))
    assert [r.image_id for r in records] == ["2007_000032", "2007_000039", "2007_000063"]
    assert [r.labels for r in records] == [(1, 15), (2,), (4,)]
    assert records[0].mask_uri == str(aug / "2007_000032.png")
    assert records[1].mask_uri == ""
    assert records[2].mask_uri.endswith("SegmentationClass/2007_000063.png")
    assert records[0].image_uri.endswith("JPEGImages/2007_000032.jpg")


# ----------------------------------------------------------------------------------------------
# cls_labels.npy (PSA / AuxSegNet image labels)


def _cls_labels(labels: dict[str, tuple[int, ...]], length: int = 20) -> dict[str, np.ndarray]:
    """The file's content: image id -> float32 0/1 vector, index c-1 for class c."""
    vectors = {}
    for image_id, present in labels.items():
        vector = np.zeros(length, np.float32)
        vector[[c - 1 for c in present]] = 1.0
        vectors[image_id] = vector
    return vectors


def test_cls_labels_npy_reads_as_psa_writes_it(tmp_path):
    path = tmp_path / "cls_labels.npy"
    np.save(path, _cls_labels({"2007_000032": (1, 15), "2007_000039": (), "2008_000002": (20,)}))
    table = label_files.read_cls_labels(str(path), 21)
    assert table == {"2007_000032": (1, 15), "2007_000039": (), "2008_000002": (20,)}
    assert label_files.read_labels_table(str(path), VOC_CLASS_NAMES) == table


class _RunsCode:
    def __reduce__(self):
        return (Path.write_text, (Path("never-written"), "x"))


def test_cls_labels_npy_never_runs_pickled_code(tmp_path):
    path = tmp_path / "cls_labels.npy"
    np.save(path, np.array({"a": _RunsCode()}, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"cls_labels\.npy'.*refused to load global 'pathlib"):
        label_files.read_cls_labels(str(path), 21)
    assert not Path("never-written").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.zeros((3, 20), np.float32), r"expected a pickled dict.*float32 and shape \(3, 20\)"),
        (np.array(["a", "b"], dtype=object), r"expected a pickled dict.*object and shape \(2,\)"),
        (np.array(["x"], dtype=object)[0], r"expected a dict image id -> label vector, found str"),
        ({"2007_000032": np.ones(19)}, r"image '2007_000032': label vector of shape \(19,\)"),
        ({"2007_000032": np.full(20, 0.5)}, r"image '2007_000032': .* not all 0 / 1"),
    ],
)
def test_cls_labels_npy_that_is_not_such_a_dict_names_the_file(tmp_path, content, message):
    path = tmp_path / "cls_labels.npy"
    np.save(path, np.array(content, dtype=object) if isinstance(content, str) else content)
    with pytest.raises(DataError, match=rf"labels file '{path}'.*{message}"):
        label_files.read_cls_labels(str(path), 21)


def test_cls_labels_npy_of_text_names_the_file(tmp_path):
    path = tmp_path / "cls_labels.npy"
    path.write_text("image_id,labels\n")
    with pytest.raises(DataError, match=r"cls_labels\.npy': not a \.npy file"):
        label_files.read_cls_labels(str(path), 21)


def test_voc_missing_split_file_named(tmp_path):
    _write_voc(tmp_path, {"a": _mask([3])})
    with pytest.raises(DataError, match=r"val\.txt"):
        list(voc_records(str(tmp_path), "val"))


def test_voc_split_lists_missing_image(tmp_path):
    _write_voc(tmp_path, {"a": _mask([3])}, split_ids=["a", "ghost"])
    with pytest.raises(DataError, match=r"ghost.*JPEGImages/ghost\.jpg"):
        list(voc_records(str(tmp_path), "train"))


def test_voc_duplicate_id(tmp_path):
    _write_voc(tmp_path, {"a": _mask([3]), "b": _mask([4])}, split_ids=["a", "b", "a"])
    with pytest.raises(DataError, match=r"train\.txt.*duplicate image id 'a'"):
        list(voc_records(str(tmp_path), "train"))


def test_voc_real_image_through_tiny_voc_folder(tmp_path, voc_sample):
    """The real VOC image + mask, written as a VOC folder, reads back exactly (mask) / closely."""
    root = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(voc_sample["rgb"]).save(root / "JPEGImages" / "real.jpg", quality=95)
    io.write_png_atomic(
        str(root / "SegmentationClass" / "real.png"), voc_sample["mask"], io.voc_palette()
    )
    (root / "ImageSets/Segmentation/val.txt").write_text("real\n")
    (record,) = list(voc_records(str(root), "val", class_names=voc_sample["class_names"]))
    expected = sorted(int(c) for c in np.unique(voc_sample["mask"]) if c not in (0, 255))
    assert record.labels == tuple(expected) and expected
    np.testing.assert_array_equal(io.read_label(record.mask_uri), voc_sample["mask"])
    rgb = io.read_image(record.image_uri)
    assert rgb.shape == (375, 500, 3)
    assert np.abs(rgb.astype(int) - voc_sample["rgb"]).mean() < 4  # JPEG re-encoding loss


# ----------------------------------------------------------------------------------------------
# COCO

# The 80 COCO category ids: 1..90 without these ten.
_COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
_COCO_IDS = [i for i in range(1, 91) if i not in _COCO_GAPS]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major flattening, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def _coco_json(path: Path) -> None:
    height, width = 20, 30
    crowd = np.zeros((height, width), np.uint8)
    crowd[10:20, 0:30] = 1  # the bottom half is a crowd
    categories = [
        {"id": cid, "name": COCO_CLASS_NAMES[i + 1].replace("_", " "), "supercategory": "x"}
        for i, cid in enumerate(_COCO_IDS)
    ]
    annotations = [
        # person: a polygon square x 2..12, y 2..8
        {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 60.0,
         "segmentation": [[2, 2, 12, 2, 12, 8, 2, 8]], "bbox": [2, 2, 10, 6]},
        # toothbrush (category 90 -> class 80): a polygon inside the crowd region
        {"id": 2, "image_id": 7, "category_id": 90, "iscrowd": 0, "area": 40.0,
         "segmentation": [[20, 12, 28, 12, 28, 17, 20, 17]], "bbox": [20, 12, 8, 5]},
        # a crowd of dogs (category 18 -> class 17) as an uncompressed RLE
        {"id": 3, "image_id": 7, "category_id": 18, "iscrowd": 1, "area": 300.0,
         "segmentation": _uncompressed_rle(crowd), "bbox": [0, 10, 30, 10]},
    ]  # fmt: skip
    images = [
        {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": height, "width": width},
        {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "height": 10, "width": 12},
    ]
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))


def test_coco_records_masks_and_labels(tmp_path):
    annotation_json = tmp_path / "instances.json"
    _coco_json(annotation_json)
    mask_dir = tmp_path / "masks"
    records = list(coco_records(str(annotation_json), str(tmp_path / "images"), str(mask_dir)))
    # Image-id order: image 3 (no annotations) first.
    assert [r.image_id for r in records] == [
        "COCO_train2014_000000000003",
        "COCO_train2014_000000000007",
    ]
    empty, full = records
    assert empty.labels == ()
    assert (io.read_label(empty.mask_uri) == 0).all()
    assert io.read_label(empty.mask_uri).shape == (10, 12)
    # Crowd annotations count for image labels (dog = class 17); category 90 -> class 80.
    assert full.labels == (1, 17, 80)
    mask = io.read_label(full.mask_uri)
    assert mask.shape == (20, 30)
    assert (mask[3:7, 3:11] == 1).all()  # person interior
    assert (mask[13:16, 21:27] == 80).all()  # toothbrush wins over the crowd under it
    assert mask[18, 2] == 255 and mask[11, 15] == 255  # crowd elsewhere is ignored
    assert mask[0, 29] == 0  # background
    assert 17 not in np.unique(mask)  # a crowd is never painted as its class
    assert full.image_uri.endswith("images/COCO_train2014_000000000007.jpg")


def test_coco_masks_written_once(tmp_path):
    annotation_json = tmp_path / "instances.json"
    _coco_json(annotation_json)
    mask_dir = tmp_path / "masks"
    first = list(coco_records(str(annotation_json), str(tmp_path), str(mask_dir)))
    marker = np.full((10, 12), 9, np.uint8)  # overwrite one mask: a rerun must keep it
    io.write_png_atomic(first[0].mask_uri, marker, io.voc_palette())
    list(coco_records(str(annotation_json), str(tmp_path), str(mask_dir)))
    assert (io.read_label(first[0].mask_uri) == 9).all()
    written = sorted(p.relative_to(mask_dir).as_posix() for p in mask_dir.rglob("*") if p.is_file())
    assert written == sorted(f"{shard_of(r.image_id)}/{r.image_id}.png" for r in first)


def test_coco_81_class_mapping(tmp_path):
    annotation_json = tmp_path / "instances.json"
    _coco_json(annotation_json)
    names = coco_class_names(str(annotation_json))
    assert len(names) == 81 and names[0] == "background"
    assert names == list(COCO_CLASS_NAMES)
    assert names[1] == "person" and names[80] == "toothbrush"
    assert class_names_for("coco") == list(COCO_CLASS_NAMES)


def test_coco_category_count_must_match_num_classes(tmp_path):
    annotation_json = tmp_path / "instances.json"
    _coco_json(annotation_json)
    with pytest.raises(
        DataError, match=r"instances\.json' has 80 categories.*'model\.num_classes' is 21"
    ):
        list(coco_records(str(annotation_json), str(tmp_path), str(tmp_path / "m"), num_classes=21))
    assert (
        len(list(coco_records(str(annotation_json), str(tmp_path), str(tmp_path / "m"), 81))) == 2
    )


def test_coco_corrupt_json_names_file(tmp_path):
    bad = tmp_path / "broken_instances.json"
    bad.write_text('{"images": [1, 2')
    with pytest.raises(DataError, match=r"broken_instances\.json"):
        list(coco_records(str(bad), str(tmp_path), str(tmp_path / "m")))
    bad.write_text('{"images": []}')
    with pytest.raises(DataError, match=r"broken_instances\.json.*annotations"):
        list(coco_records(str(bad), str(tmp_path), str(tmp_path / "m")))


# ----------------------------------------------------------------------------------------------
# Folder


def _touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / name)


def test_folder_records_csv(tmp_path):
    _touch_images(tmp_path / "img", ["x.jpg", "y.png", "z.jpg"])
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("image_id,labels\nx,dog cat\ny,2\nz.jpg,\n")
    names = ["background", "cat", "dog"]
    records = folder_records(str(tmp_path / "img"), str(labels_csv), names)
    assert isinstance(records, types.GeneratorType)
    records = list(records)
    assert [(r.image_id, r.labels) for r in records] == [("x", (1, 2)), ("y", (2,)), ("z", ())]
    assert records[1].image_uri.endswith("img/y.png")
    assert records[2].image_uri.endswith("img/z.jpg")


def test_folder_records_masks_where_they_exist(tmp_path):
    _touch_images(tmp_path / "img", ["x.jpg", "y.jpg"])
    (tmp_path / "labels.csv").write_text("image_id,labels\nx,dog\ny,cat\n")
    (tmp_path / "masks").mkdir()
    io.write_png_atomic(str(tmp_path / "masks" / "x.png"), np.full((4, 4), 2, np.uint8))
    masks = str(tmp_path / "masks")

    def read() -> list[Record]:
        names = ["background", "cat", "dog"]
        labels = str(tmp_path / "labels.csv")
        return list(folder_records(str(tmp_path / "img"), labels, names, mask_dir=masks))

    assert [r.mask_uri for r in read()] == [str(tmp_path / "masks" / "x.png"), ""]
    # A mask with an id past the classes is the manifest step's file check's problem, naming it.
    io.write_png_atomic(str(tmp_path / "masks" / "y.png"), np.full((4, 4), 7, np.uint8))
    y = read()[1]
    [(file, message)] = check_item_files(y.image_uri, y.mask_uri, "", num_classes=3)
    assert file == y.mask_uri and "y.png' has class id 7" in message


def test_folder_records_parquet_and_names_file(tmp_path):
    _touch_images(tmp_path / "img", ["p.jpg", "q.jpg"])
    table = pa.table({"image_id": ["p", "q"], "labels": [["bird"], ["cat", "bird"]]})
    pq.write_table(table, tmp_path / "labels.parquet")
    names_file = tmp_path / "names.txt"
    names_file.write_text("background\ncat\nbird\n")
    records = list(
        folder_records(str(tmp_path / "img"), str(tmp_path / "labels.parquet"), str(names_file))
    )
    assert [r.labels for r in records] == [(2,), (1, 2)]


def test_folder_records_unknown_class_name(tmp_path):
    _touch_images(tmp_path / "img", ["x.jpg"])
    labels_csv = tmp_path / "my_labels.csv"
    labels_csv.write_text("image_id,labels\nx,dog unicorn\n")
    with pytest.raises(DataError, match=r"my_labels\.csv.*'x'.*unicorn"):
        list(folder_records(str(tmp_path / "img"), str(labels_csv), ["background", "dog"]))


def test_folder_records_bad_id_and_duplicates(tmp_path):
    _touch_images(tmp_path / "img", ["x.jpg"])
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("image_id,labels\nx,7\n")
    with pytest.raises(DataError, match="'7'"):
        list(folder_records(str(tmp_path / "img"), str(labels_csv), ["background", "dog"]))
    labels_csv.write_text("image_id,labels\nx,dog\nx,dog\n")
    with pytest.raises(DataError, match="duplicate image id 'x'"):
        list(folder_records(str(tmp_path / "img"), str(labels_csv), ["background", "dog"]))
    labels_csv.write_text("image_id,labels\nmissing,dog\n")
    with pytest.raises(DataError, match="missing"):
        list(folder_records(str(tmp_path / "img"), str(labels_csv), ["background", "dog"]))


# ----------------------------------------------------------------------------------------------
# Manifest, multi-hot


def _many_records(count: int):
    for index in range(count):
        yield Record(
            image_id=f"img{index:05d}",
            image_uri=f"s3://bucket/images/img{index:05d}.jpg",
            labels=tuple(sorted({1 + index % 20, 1 + (index * 7) % 20})),
            mask_uri="" if index % 3 else f"/data/masks/img{index:05d}.png",
            saliency_uri=f"/sal/{index}.png" if index % 2 else "",
            seg_label_uri=f"run/stage_0/labels/img{index:05d}_seg.png",
            sal_label_uri=f"run/stage_0/labels/img{index:05d}_sal.png",
        )


def test_manifest_roundtrip_over_several_files(tmp_path):
    path = str(tmp_path / "manifest.parquet")
    written = write_manifest(_many_records(2500), path, rows_per_file=1000)
    assert written == 2500
    parts = sorted(p.name for p in Path(path).iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    schema = pq.read_schema(Path(path) / parts[0])
    assert schema.field("labels").type == pa.list_(pa.int16())
    stream = read_manifest(path, batch_size=100)
    assert isinstance(stream, types.GeneratorType)
    assert next(stream) == next(_many_records(1))
    assert list(read_manifest(path)) == list(_many_records(2500))


def test_manifest_overwrite_removes_stale_parts(tmp_path):
    path = str(tmp_path / "m")
    write_manifest(_many_records(30), path, rows_per_file=10)
    write_manifest(_many_records(5), path, rows_per_file=10)
    assert len(list(Path(path).iterdir())) == 1
    assert list(read_manifest(path)) == list(_many_records(5))
    write_manifest(iter(()), path)
    assert list(read_manifest(path)) == []


def test_part_writer_groups_small_tables_into_full_row_groups_and_files(tmp_path, monkeypatch):
    # A label update hands the writer a few rows at a time; readers index whole row groups.
    monkeypatch.setattr(manifest, "ROWS_PER_GROUP", 8)
    schema = pa.schema([("n", pa.int32()), ("name", pa.string())])
    writer = manifest.PartWriter(str(tmp_path / "out"), schema, rows_per_file=20)
    for start in range(0, 75, 3):
        numbers = list(range(start, start + 3))
        # Columns in another order and wider types: the writer selects and casts to its schema.
        writer.write(pa.table({"name": [f"r{n}" for n in numbers], "n": numbers}))
    assert writer.close() == 75
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [f"part-0000{i}.parquet" for i in range(4)]
    groups = []
    for file in files:
        metadata = pq.ParquetFile(file).metadata
        groups.append([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
    assert groups == [[8, 8, 4], [8, 8, 4], [8, 8, 4], [8, 7]]
    table = pq.read_table(tmp_path / "out")
    assert table.schema == schema
    assert sorted(table.column("n").to_pylist()) == list(range(75))


def test_part_writer_without_rows_writes_one_empty_part_with_the_schema(tmp_path):
    schema = pa.schema([("n", pa.int32())])
    assert manifest.PartWriter(str(tmp_path / "out"), schema).close() == 0
    (only,) = (tmp_path / "out").iterdir()
    assert pq.read_schema(only) == schema and pq.read_metadata(only).num_rows == 0


def test_manifest_missing_named(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        list(read_manifest(str(tmp_path / "nowhere")))


def test_labels_to_multihot():
    multihot = labels_to_multihot((1, 3, 20), 21)
    assert multihot.dtype == np.float32 and multihot.shape == (20,)
    assert multihot.nonzero()[0].tolist() == [0, 2, 19]
    with pytest.raises(DataError, match="21"):
        labels_to_multihot((21,), 21)
