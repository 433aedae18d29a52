"""Data: one `Record` type for every source, streaming readers, I/O over local paths and URIs,
augmentation, the stage Dataset and a synthetic dataset generator."""

from raysseg.data.dataset import StageDataset, build_stage_dataset, collate
from raysseg.data.io import (
    ImageReadError,
    read_image,
    read_label,
    read_saliency,
    voc_palette,
    write_png_atomic,
)
from raysseg.data.records import (
    DataError,
    Record,
    class_names_for,
    coco_records,
    folder_records,
    labels_to_multihot,
    read_manifest,
    voc_records,
    write_manifest,
)
from raysseg.data.synth import generate_synthetic
from raysseg.data.transforms import normalize, train_transform

__all__ = [
    "DataError",
    "ImageReadError",
    "Record",
    "StageDataset",
    "build_stage_dataset",
    "class_names_for",
    "coco_records",
    "collate",
    "folder_records",
    "generate_synthetic",
    "labels_to_multihot",
    "normalize",
    "read_image",
    "read_label",
    "read_manifest",
    "read_saliency",
    "train_transform",
    "voc_palette",
    "voc_records",
    "write_manifest",
    "write_png_atomic",
]
