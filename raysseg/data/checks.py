"""Dataset problems: what is wrong with one image's files, found before any training starts.

The manifest step collects every problem instead of stopping at the first (a dataset with five
broken files needs one rerun, not five): the sources report listing problems (a missing image, a
duplicate id, a class id out of range) through `report`, and `check_rows` decodes each listed
image, GT mask and saliency map and checks their sizes and values. Each problem is a `Problem`
row of the run's problems table; the items with a problem are left out of the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from raysseg.data import io
from raysseg.data.records import DataError, check_label_map

PROBLEMS_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("image_id", pa.string()),
        ("file", pa.string()),
        ("message", pa.string()),
    ]
)
# The column `check_rows` adds to a batch of manifest rows: "" for a sound item, else a JSON list
# of its problems (an item can have several: a truncated image and a mask of another size).
PROBLEMS_COLUMN = "problems"
# How many problems the summary line quotes; the table holds them all.
QUOTED_PROBLEMS = 3


@dataclass(frozen=True)
class Problem:
    """One problem of one item. `file` is the file at fault when one is ("" for a listing one);
    `message` names the file, the key and the value, like every DataError."""

    split: str
    image_id: str
    file: str
    message: str


# What a source calls for an item it leaves out: report(image id, file at fault or "", message).
Report = Callable[[str, str, str], None]


def raise_problem(image_id: str, file: str, message: str) -> None:
    """The sources' default report: stop at the first problem (a direct call, a test)."""
    raise DataError(message)


def check_item_files(
    image_uri: str, mask_uri: str, saliency_uri: str, num_classes: int
) -> list[tuple[str, str]]:
    """(file, message) of each problem of one item's files: the image decodes (header, pixel
    limit, every pixel), the GT mask and the saliency map decode and have the image's (H, W), and
    the mask's ids are classes or 255."""
    try:
        shape = io.read_image(image_uri).shape[:2]
    except (OSError, DataError) as error:
        return [(image_uri, str(error))]  # nothing to compare the other files with
    problems = []
    if mask_uri:
        try:
            check_label_map(io.read_label(mask_uri), num_classes, mask_uri, shape, image_uri)
        except (OSError, DataError) as error:
            problems.append((mask_uri, str(error)))
    if saliency_uri:
        try:
            saliency_shape = io.read_saliency(saliency_uri).shape[:2]
        except (OSError, DataError) as error:
            problems.append((saliency_uri, str(error)))
        else:
            if saliency_shape != shape:
                problems.append(
                    (
                        saliency_uri,
                        f"saliency map '{saliency_uri}' is (H, W) = {saliency_shape}, but its "
                        f"image '{image_uri}' is {shape}",
                    )
                )
    return problems


def check_rows(batch: pa.Table, num_classes: int) -> pa.Table:
    """`batch` (manifest rows) with the PROBLEMS_COLUMN added (Ray Data's map_batches or a
    plain loop over a manifest's batches call it the same way)."""
    columns = batch.to_pydict()
    found = [
        check_item_files(image, mask or "", saliency or "", num_classes)
        for image, mask, saliency in zip(
            columns["image_uri"], columns["mask_uri"], columns["saliency_uri"], strict=True
        )
    ]
    encoded = [json.dumps(problems) if problems else "" for problems in found]
    return batch.append_column(PROBLEMS_COLUMN, pa.array(encoded, pa.string()))


def decode_problems(split: str, image_ids: Sequence[str], encoded: Sequence[str]) -> list[Problem]:
    """The Problem rows of a checked batch's PROBLEMS_COLUMN."""
    return [
        Problem(split, image_id, file, message)
        for image_id, text in zip(image_ids, encoded, strict=True)
        if text
        for file, message in json.loads(text)
    ]


def problems_table(problems: Sequence[Problem]) -> pa.Table:
    rows = [asdict(problem) for problem in problems]
    return pa.Table.from_pylist(rows, schema=PROBLEMS_SCHEMA)


def over_budget(bad_items: int, items: int, budget: float) -> bool:
    """Whether more than `budget` (a fraction) of `items` had a problem (the label update's rule)."""
    return bad_items > budget * max(1, items)


def over_budget_phrase(budget: float) -> str:
    """How every step that stops on the budget says so, naming the key."""
    return f"over the error budget (resources.error_budget = {budget:.1%})"


def problems_summary(problems: Sequence[Problem], bad_items: int, items: int, table: str) -> str:
    """One line: how many items had problems, the first few messages, where the table is."""
    quoted = "; ".join(f"[{p.split} {p.image_id}] {p.message}" for p in problems[:QUOTED_PROBLEMS])
    more = len(problems) - QUOTED_PROBLEMS
    rest = f"; and {more} more" if more > 0 else ""
    return (
        f"{bad_items} of {items} listed images have problems ({len(problems)} in all): "
        f"{quoted}{rest}. Every problem: {table}"
    )


def is_sound(encoded: np.ndarray | Sequence[str]) -> np.ndarray:
    """Mask of the rows of a checked batch with no problem."""
    return np.asarray([not text for text in encoded], dtype=bool)


__all__ = [
    "PROBLEMS_COLUMN",
    "PROBLEMS_SCHEMA",
    "QUOTED_PROBLEMS",
    "Problem",
    "Report",
    "check_item_files",
    "check_rows",
    "decode_problems",
    "is_sound",
    "over_budget",
    "over_budget_phrase",
    "problems_summary",
    "problems_table",
    "raise_problem",
]
