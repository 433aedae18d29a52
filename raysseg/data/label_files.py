"""Image-label tables: which classes each image shows, from CSV, Parquet or PSA's cls_labels.npy.

A table maps an image id to its labels: class names or ids, space-separated or as a list. PSA's
`cls_labels.npy` (a pickled dict) is read through an unpickler that can run no code.
"""

from __future__ import annotations

import csv
import io
import pickle
from collections.abc import Iterator, Sequence

import numpy as np

from raysseg import storage
from raysseg.data.manifest import iter_parquet_batches
from raysseg.data.records import DataError, utf8_lines


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


def iter_label_rows(labels_file: str) -> Iterator[tuple[int, dict]]:
    """Stream (row number, row dict) from a CSV (header row) or Parquet labels file."""
    if labels_file.endswith(".parquet") or storage.is_dir(labels_file):
        row_number = 0
        for batch in iter_parquet_batches(labels_file):
            for row in batch.to_pylist():
                row_number += 1
                yield row_number, row
        return
    for row_number, row in enumerate(csv.DictReader(utf8_lines(labels_file)), start=2):
        yield row_number, row  # line 1 is the header


def check_label_columns(row: dict, labels_file: str) -> None:
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
    for row_number, row in iter_label_rows(labels_file):
        check_label_columns(row, labels_file)
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
    stream = io.BytesIO(storage.read_bytes(uri))
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


__all__ = [
    "check_label_columns",
    "iter_label_rows",
    "parse_labels",
    "read_cls_labels",
    "read_labels_table",
]
