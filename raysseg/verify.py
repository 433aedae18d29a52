"""`raysseg verify RUN_DIR`: check that a run directory is whole and consistent, without Ray.

What is checked (each failure is one `Problem` naming the file):
- `config.yaml` exists and parses; every final checkpoint loads (weights_only), rebuilds its model
  and was written by the same settings (keys that may change between reruns left out);
- every done marker is valid JSON;
- every label manifest row has its seg and sal label files, both the size of the image, seg ids in
  0..C-1 or 255; no image id twice; for a finished label step, manifest rows = images - errors of
  its marker = seg label files on disk (exactly one label per image, no orphans);
- no temp / half-moved files are left (names the atomic writers use).

Manifests are streamed (one Parquet batch at a time); only the set of image ids of the manifest
being checked is held, to find duplicates.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from raysseg import storage
from raysseg.config import Config, ConfigError, changed_settings, config_from_yaml_text, from_dict
from raysseg.data import io
from raysseg.data.manifest import read_manifest
from raysseg.data.records import DataError, Record, check_label_map
from raysseg.engine.checkpoint import CheckpointError, load_checkpoint, restore_model
from raysseg.rundir import layout
from raysseg.rundir.markers import marker_path
from raysseg.rundir.steps import WARMUP, label_step, step_checkpoint, train_step


@dataclass(frozen=True)
class Problem:
    path: str  # the file or folder that is wrong
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def verify_run(run_dir: str, tally: Counter | None = None) -> Iterator[Problem]:
    """Yield every problem found in `run_dir`; `tally` (if given) counts what was checked."""
    tally = Counter() if tally is None else tally
    config_path = layout.config_file(run_dir)
    config = None
    if not storage.exists(config_path):
        yield Problem(config_path, "missing (every run writes its resolved config first)")
    else:
        try:
            config = config_from_yaml_text(
                storage.read_bytes(config_path).decode("utf-8"), config_path
            )
        except (ConfigError, UnicodeDecodeError) as error:
            yield Problem(config_path, f"cannot be parsed ({error})")
    markers, seg_files = yield from _survey_files(run_dir, tally)
    stages = _stage_count(run_dir)
    yield from _check_checkpoints(run_dir, config, stages, tally)
    for stage in range(stages):
        yield from _check_stage_labels(run_dir, stage, config, markers, seg_files[stage], tally)


def _walk_files(run_dir: str) -> Iterator[tuple[str, list[str]]]:
    """(URI, path parts relative to `run_dir`) of every file under it, one at a time."""
    filesystem, root = storage.resolve(run_dir)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        if info.type == pafs.FileType.File:
            relative = posixpath.relpath(info.path, root)
            yield storage.join(run_dir, relative), relative.replace("\\", "/").split("/")


def _survey_files(
    run_dir: str, tally: Counter
) -> Generator[Problem, None, tuple[dict[str, dict], Counter]]:
    """One pass over the files: temp leftovers, the done markers ({path: result} of the valid
    ones, returned) and the segmentation PNGs per stage (counted, returned). Nothing per file is
    kept, so a run of millions of images verifies in bounded memory."""
    markers: dict[str, dict] = {}
    seg_files: Counter = Counter()
    for path, parts in _walk_files(run_dir):
        if any(storage.is_temp_name(part) for part in parts):
            yield Problem(path, "left-over temporary file of an interrupted write")
        elif layout.is_step_marker(path):
            tally["done markers"] += 1
            try:
                markers[path] = json.loads(storage.read_bytes(path))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                yield Problem(path, f"done marker is not valid JSON ({error})")
        elif (stage := layout.label_file_stage(parts, "seg")) is not None:
            seg_files[stage] += 1
    return markers, seg_files


def _check_checkpoints(
    run_dir: str, config: Config | None, stages: int, tally: Counter
) -> Iterator[Problem]:
    for step in [WARMUP] + [train_step(k) for k in range(stages)]:
        path = step_checkpoint(run_dir, step)
        if not storage.exists(path):
            continue
        tally["checkpoints"] += 1
        try:
            checkpoint = load_checkpoint(path)
            restore_model(checkpoint)
        except CheckpointError as error:
            yield Problem(path, f"does not load: {error}")
            continue
        saved = checkpoint.get("config")
        if config is None or saved is None:
            continue
        try:
            changed = changed_settings(from_dict(saved), config)
        except ConfigError as error:
            yield Problem(path, f"holds a config that does not parse ({error})")
            continue
        if changed:
            yield Problem(
                path,
                f"written by another config than config.yaml (differs in {', '.join(changed)})",
            )


def _stage_count(run_dir: str) -> int:
    count = 0
    while storage.exists(layout.stage_dir(run_dir, count)):
        count += 1
    return count


def _check_stage_labels(
    run_dir: str,
    stage: int,
    config: Config | None,
    markers: dict[str, dict],
    seg_files: int,
    tally: Counter,
) -> Iterator[Problem]:
    manifest = layout.stage_manifest(run_dir, stage)
    writer = label_step(stage)
    marker_file = marker_path(run_dir, writer)
    marker = markers.get(marker_file)
    if not storage.exists(manifest):
        if marker is not None:
            yield Problem(manifest, f"missing, but {writer.name} is marked done")
        return
    num_classes = config.model.num_classes if config is not None else 256
    rows = 0
    seen: set[str] = set()
    try:
        for record in read_manifest(manifest):
            rows += 1
            if record.image_id in seen:
                yield Problem(manifest, f"image id '{record.image_id}' appears twice")
            seen.add(record.image_id)
            yield from _check_label_row(record, num_classes)
    except DataError as error:
        yield Problem(manifest, f"cannot be read ({error})")
        return
    tally["label rows"] += rows
    if marker is None:
        tally["unfinished label steps"] += 1
        return
    expected = int(marker.get("images", rows)) - int(marker.get("errors", 0))
    if rows != expected:
        yield Problem(
            manifest,
            f"{rows} rows, but {marker_file} counts {marker.get('images')} images - "
            f"{marker.get('errors', 0)} errors = {expected}",
        )
    seg_root = layout.label_dir(layout.stage_labels(run_dir, stage), "seg")
    if seg_files != rows:
        yield Problem(seg_root, f"{seg_files} segmentation label files for {rows} manifest rows")


def _check_label_row(record: Record, num_classes: int) -> Iterator[Problem]:
    """The row's label files exist, have the image's size, and hold valid class ids."""
    for uri in (record.seg_label_uri, record.sal_label_uri):
        if not uri or not storage.exists(uri):
            yield Problem(uri or record.image_id, f"label of image '{record.image_id}' is missing")
            return
    try:
        image_shape = io.read_image_size(record.image_uri)
        check_label_map(
            io.read_label(record.seg_label_uri),
            num_classes,
            record.seg_label_uri,
            image_shape,
            record.image_uri,
        )
        sal_shape = io.read_image_size(record.sal_label_uri)
    except (DataError, OSError, ValueError) as error:
        yield Problem(record.seg_label_uri, str(error))
        return
    if sal_shape != image_shape:
        yield Problem(
            record.sal_label_uri,
            f"saliency label is (H, W) = {sal_shape}, but image '{record.image_uri}' is "
            f"{image_shape}",
        )


__all__ = ["Problem", "verify_run"]
