"""The manifest step: list each split, check every listed file, write the manifests and the
problems table.

Per split: the source's records are written as a listed manifest (a few MB of URIs, streamed);
every item's image, GT mask and saliency map are then decoded and checked (`data.checks`), on the
cluster through Ray Data for a large split, in the driver for a small one; the sound rows become
the split's manifest. Every problem, the sources' and the files', goes to one table,
`manifest/problems/`, and one summary line quotes the first few. Over `resources.error_budget`
of a split's items the step fails with that line (nothing is lost: the step only reads the data);
within it the items are left out and the run goes on, saying so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
import ray.data

from raysseg import storage
from raysseg.config import Config, ConfigError
from raysseg.data.checks import (
    PROBLEMS_COLUMN,
    PROBLEMS_SCHEMA,
    Problem,
    check_rows,
    decode_problems,
    is_sound,
    over_budget,
    over_budget_phrase,
    problems_summary,
    problems_table,
)
from raysseg.data.manifest import MANIFEST_SCHEMA, PartWriter, iter_parquet_batches, write_manifest
from raysseg.data.records import DataError
from raysseg.data.sources import train_records, val_records
from raysseg.distributed.datasets import read_manifest_dataset
from raysseg.distributed.placement import custom_resources, require_custom_resources
from raysseg.progress import ProgressMeter
from raysseg.rundir import layout

# Up to this many listed images the driver checks the files itself: decoding 1,000 VOC-sized
# images and masks is ~10 s of one core, about what a Ray Data job's start-up costs.
IN_PROCESS_MAX_IMAGES = 1000
CHECK_BATCH_ROWS = 32


def build_manifests(
    config: Config,
    log: Callable[[str], None] = print,
    in_process_max: int = IN_PROCESS_MAX_IMAGES,
) -> dict[str, Any]:
    """Write the train (and val) manifests of the configured source; returns their counts."""
    run = config.run_dir
    counts: dict[str, Any] = {}
    problems: list[Problem] = []
    failures: list[str] = []
    for split, records_of in (("train", train_records), ("val", val_records)):
        found: list[Problem] = []
        records = records_of(config, _reporter(split, found))
        if records is None:
            continue
        listed_path = layout.listed_manifest(run, split)
        listed = write_manifest(records, listed_path)
        items = listed + len(found)  # each item a source reported is left out of the listing
        out_path = layout.dataset_manifest(run, split)
        checking = Checking(split, listed, config.model.num_classes, listed <= in_process_max)
        kept = _check_files(config, checking, listed_path, out_path, found, log)
        storage.delete_dir(listed_path)
        bad = items - kept
        counts[f"{split}_images"] = kept
        counts[f"{split}_left_out"] = bad
        problems += found
        if bad:
            summary = problems_summary(found, bad, items, layout.problems_table(run))
            if over_budget(bad, items, config.resources.error_budget):
                failures.append(f"{split}: {summary}")
            else:
                log(f"manifest {split}: left out {summary}")
    counts["problems"] = len(problems)
    _write_problems(run, problems)
    if failures:
        raise DataError(
            f"the dataset has problems {over_budget_phrase(config.resources.error_budget)}. "
            + " | ".join(failures)
        )
    if not counts.get("train_images"):
        raise ConfigError(f"data.root '{config.data.root}': the training split has no images")
    return counts


def _reporter(split: str, found: list[Problem]) -> Callable[[str, str, str], None]:
    def report(image_id: str, file: str, message: str) -> None:
        found.append(Problem(split, image_id, file, message))

    return report


@dataclass(frozen=True)
class Checking:
    """What one split's file check works on: `listed` items, checked in the driver or not."""

    split: str
    listed: int
    num_classes: int
    in_process: bool


def _check_files(
    config: Config,
    checking: Checking,
    listed_path: str,
    out_path: str,
    found: list[Problem],
    log: Callable[[str], None],
) -> int:
    """Check the listed items' files into `out_path` (sound rows only); their problems are
    appended to `found`; a progress line every `resources.progress_seconds`. Returns the rows
    kept."""
    if checking.in_process:
        batches = _checked_here(listed_path, checking.num_classes)
    else:
        batches = _checked_on_cluster(config, listed_path, checking.num_classes)
    writer = PartWriter(f"{out_path}.tmp-{time.time_ns()}", MANIFEST_SCHEMA)
    meter = ProgressMeter(f"manifest {checking.split} check", checking.listed)
    last_line = meter.started
    for batch in batches:
        codes = batch.column(PROBLEMS_COLUMN).to_pylist()
        sound = is_sound(codes)
        found += decode_problems(checking.split, batch.column("image_id").to_pylist(), codes)
        writer.write(batch.filter(pa.array(sound)))
        meter.update(meter.done + batch.num_rows, meter.errors + int((~sound).sum()))
        if meter.now - last_line >= config.resources.progress_seconds:
            log(meter.line())
            last_line = meter.now
    kept = writer.close()
    storage.replace_dir(writer.path, out_path)
    return kept


def _checked_here(listed_path: str, num_classes: int) -> Iterator[pa.Table]:
    for batch in iter_parquet_batches(listed_path, batch_size=CHECK_BATCH_ROWS):
        yield check_rows(pa.Table.from_batches([batch]), num_classes)


def _checked_on_cluster(config: Config, listed_path: str, num_classes: int) -> Iterator[pa.Table]:
    """Ray Data tasks decode the files where CPU work runs (the CRF tasks' placement: CPU
    workers on the shipped clusters); the rows come back in listed order."""
    resources = config.resources
    require_custom_resources(resources, ["crf"])
    parallelism = max(1, int(ray.cluster_resources().get("CPU", 1)))
    dataset, _ = read_manifest_dataset(listed_path, parallelism, rows_per_batch=CHECK_BATCH_ROWS)
    checked = dataset.map_batches(
        check_rows,
        fn_kwargs={"num_classes": num_classes},
        batch_size=CHECK_BATCH_ROWS,
        batch_format="pyarrow",
        num_cpus=resources.crf_cpus,
        resources=custom_resources(resources, "crf"),
    )
    # The manifest keeps the listed order: training's seeded shuffle starts from it.
    checked.context.execution_options.preserve_order = True
    yield from checked.iter_batches(batch_size=None, batch_format="pyarrow")


def _write_problems(run: str, problems: list[Problem]) -> None:
    """The run's problems table, replacing an earlier attempt's; none when nothing was found."""
    path = layout.problems_table(run)
    storage.delete_dir(path)
    if not problems:
        return
    writer = PartWriter(f"{path}.tmp-{time.time_ns()}", PROBLEMS_SCHEMA)
    writer.write(problems_table(problems))
    writer.close()
    storage.replace_dir(writer.path, path)


__all__ = ["CHECK_BATCH_ROWS", "IN_PROCESS_MAX_IMAGES", "build_manifests"]
