"""raysseg.tracking: TensorBoard curves read back from the event files, resume without duplicate
points, the MLflow path against a fake `mlflow` module, run directories on S3 (a moto server)."""

from __future__ import annotations

import math
import os
import struct
import sys
import tempfile
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from moto_s3 import moto_bucket
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from raysseg import storage
from raysseg.rundir import layout
from raysseg.tracking import (
    EVENT_FILE_PREFIX,
    RECORD_FILE,
    Tracker,
    open_tracker,
    read_record,
    upload_events,
)

Point = tuple[str, int, float]


def parse_events(data: bytes) -> list[Point]:
    """(tag, step, simple_value) of every scalar in one TFRecord event file; checks both CRCs."""
    points = []
    position = 0
    while position < len(data):
        header = data[position : position + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[position + 8 : position + 12])
        assert header_crc == masked_crc32c(header)
        body = data[position + 12 : position + 12 + length]
        (body_crc,) = struct.unpack("<I", data[position + 12 + length : position + 16 + length])
        assert body_crc == masked_crc32c(body)
        position += 16 + length
        event = Event.FromString(body)
        points += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
    return points


def read_points(folder: str) -> list[Point]:
    """Every scalar point of the event files in `folder` (a local path or URI)."""
    return [
        point
        for uri in storage.list_files(folder)
        if os.path.basename(uri).startswith(EVENT_FILE_PREFIX)
        for point in parse_events(storage.read_bytes(uri))
    ]


def curve(points: list[Point], tag: str) -> list[tuple[int, float]]:
    return sorted((step, value) for name, step, value in points if name == tag)


def train_metrics(epoch: int, last: bool) -> dict[str, Any]:
    """One epoch's metrics as a training step reports them (numbers, a string, val on the last)."""
    metrics = {
        "epoch": epoch,
        "stage": "stage_x",
        "total": 1.0 - 0.125 * epoch,
        "cls": 0.5,
        "lr": 0.01,
        "images_per_s": 40.0,
        "seconds": 12.5,
        "images": 512,
        "steps": 64,
    }
    if last:
        metrics["val_miou"] = 0.25 + 0.125 * epoch
    return metrics


def label_results(stage: int) -> dict[str, Any]:
    return {
        "images": 100,
        "errors": 0,
        "written": 100,
        "label_precision": 0.5,
        "label_recall": 0.625,
        "label_miou": 0.25 + 0.125 * stage,
        "label_scored_images": 50,
        "first_error": "",
    }


# (step name, stage of a stage's training or None, epochs): a warm-up and one stage.
RUN = (("warmup", None, 3), ("stage_0/train", 0, 2))


def log_run(tracker: Tracker, run: tuple = RUN, label_stages: tuple[int, ...] = (0, 1)) -> int:
    """Log `run`'s epochs (label stage 0 after the first step, stage 1 after the second), the
    order the pipeline runs them in; returns how many calls logged something new."""
    new = 0
    for index, (name, stage, epochs) in enumerate(run):
        for epoch in range(epochs):
            new += tracker.epoch(name, epoch, train_metrics(epoch, epoch == epochs - 1), stage)
        if index < len(label_stages):
            new += tracker.labels(label_stages[index], label_results(label_stages[index]))
    return new


def test_a_run_writes_train_val_and_label_curves(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    with open_tracker(run_dir) as tracker:
        assert log_run(tracker) == 7
    points = read_points(layout.tensorboard_dir(run_dir))

    # The run's epoch counter: the warm-up is steps 0..2, stage_0/train continues at 3.
    assert curve(points, "train/warmup/total") == [(0, 1.0), (1, 0.875), (2, 0.75)]
    assert curve(points, "train/stage_0/train/total") == [(3, 1.0), (4, 0.875)]
    assert curve(points, "train/stage_0/train/images") == [(3, 512.0), (4, 512.0)]
    assert curve(points, "val/miou") == [(0, 0.375)]  # stage 0's last epoch; the warm-up has none
    assert curve(points, "labels/miou") == [(0, 0.25), (1, 0.375)]
    assert curve(points, "labels/scored_images") == [(0, 50.0), (1, 50.0)]

    tags = {tag for tag, _, _ in points}
    keys = ("total", "cls", "lr", "images_per_s", "seconds", "images", "steps")
    expected = {f"train/{name}/{key}" for name, _, _ in RUN for key in keys}
    expected |= {"train/warmup/val_miou", "train/stage_0/train/val_miou", "val/miou"}
    expected |= {
        f"labels/{key}"
        for key in ("images", "errors", "written", "precision", "recall", "miou", "scored_images")
    }
    assert tags == expected  # no "epoch", no "stage" string, no "first_error" string


def test_a_file_uri_run_dir_is_written_in_place(tmp_path: Path) -> None:
    with open_tracker(f"file://{tmp_path}/run") as tracker:
        tracker.labels(0, label_results(0))
    assert curve(read_points(str(tmp_path / "run" / "tensorboard")), "labels/miou") == [(0, 0.25)]
    assert (tmp_path / "run" / "tensorboard" / RECORD_FILE).is_file()


def test_values_that_are_not_finite_numbers_are_skipped(tmp_path: Path) -> None:
    metrics = {
        "nan": math.nan,
        "inf": math.inf,
        "none": None,
        "flag": True,
        "text": "0.5",
        "numpy": np.float32(0.5),
        "integer": np.int64(3),
        "val_miou": math.nan,
    }
    with open_tracker(str(tmp_path)) as tracker:
        tracker.epoch("stage_0/train", 0, metrics, stage=0)
    points = read_points(layout.tensorboard_dir(str(tmp_path)))
    assert sorted(points) == [
        ("train/stage_0/train/integer", 0, 3.0),
        ("train/stage_0/train/numpy", 0, 0.5),
    ]


def test_a_rerun_replays_every_epoch_without_duplicate_points(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    # The first driver stops after two warm-up epochs (its tracker closed in a `finally`).
    with open_tracker(run_dir) as tracker:
        assert log_run(tracker, (("warmup", None, 2),), label_stages=()) == 2
    # The rerun replays the run from the start: only the warm-up's last epoch and later are new.
    with open_tracker(run_dir) as tracker:
        assert log_run(tracker) == 5
    # A third run replays it all and adds stage_1's training.
    longer = (*RUN, ("stage_1/train", 1, 2))
    with open_tracker(run_dir) as tracker:
        assert log_run(tracker, longer) == 2

    folder = layout.tensorboard_dir(run_dir)
    assert len([name for name in os.listdir(folder) if name.startswith(EVENT_FILE_PREFIX)]) == 3
    points = read_points(folder)
    repeated = [key for key, count in Counter((t, s) for t, s, _ in points).items() if count > 1]
    assert repeated == []
    assert curve(points, "train/warmup/total") == [(0, 1.0), (1, 0.875), (2, 0.75)]
    assert curve(points, "train/stage_1/train/total") == [(5, 1.0), (6, 0.875)]
    assert curve(points, "val/miou") == [(0, 0.375), (1, 0.375)]
    record = read_record(os.path.join(folder, RECORD_FILE))
    assert record.offsets == {"warmup": 0, "stage_0/train": 3, "stage_1/train": 5}
    assert record.label_stages == {0, 1}


def test_a_disabled_tracker_writes_nothing(tmp_path: Path) -> None:
    tracker = open_tracker(str(tmp_path / "run"), enabled=False)
    assert not tracker.epoch("warmup", 0, train_metrics(0, last=True))
    assert not tracker.labels(0, label_results(0))
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_a_corrupt_record_is_an_error_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "tensorboard"
    folder.mkdir()
    (folder / RECORD_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=RECORD_FILE):
        open_tracker(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# MLflow


class FakeMlflow(types.ModuleType):
    """The part of mlflow's fluent API the tracker uses; records every call."""

    def __init__(self, fail_on: str = "") -> None:
        super().__init__("mlflow")
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail_on = fail_on

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))
        if name == self.fail_on:
            raise ConnectionError("tracking server unreachable")

    def start_run(self, **kwargs: Any) -> Any:
        self._record("start_run", **kwargs)
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="fake-run-1"))

    def log_params(self, params: dict) -> None:
        self._record("log_params", params)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self._record("log_metric", key, value, step=step)

    def end_run(self, status: str = "FINISHED") -> None:
        self._record("end_run", status=status)

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for call, args, kwargs in self.calls if call == name]

    def metric_points(self) -> list[Point]:
        return [(key, kwargs["step"], value) for (key, value), kwargs in self.named("log_metric")]


@pytest.fixture
def fake_mlflow(monkeypatch: pytest.MonkeyPatch) -> FakeMlflow:
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.invalid:5000")
    return fake


def test_mlflow_gets_the_same_points_in_one_run_continued_by_a_rerun(
    tmp_path: Path, fake_mlflow: FakeMlflow
) -> None:
    run_dir = str(tmp_path / "my_run")
    params = {"optim.epochs": 2, "model.num_classes": 21}
    with open_tracker(run_dir, params=params) as tracker:
        log_run(tracker)
    assert fake_mlflow.named("start_run") == [((), {"run_name": "my_run"})]
    assert fake_mlflow.named("log_params") == [((params,), {})]
    assert fake_mlflow.named("end_run") == [((), {"status": "FINISHED"})]
    # The same points; an event file keeps float32, MLflow gets the float itself.
    sent = [
        (tag, step, float(np.float32(value))) for tag, step, value in fake_mlflow.metric_points()
    ]
    assert sorted(sent) == sorted(read_points(layout.tensorboard_dir(run_dir)))

    # The rerun continues the same MLflow run, sets no params again and adds only new points;
    # an exception inside the `with` ends the run as FAILED.
    fake_mlflow.calls.clear()
    with pytest.raises(RuntimeError), open_tracker(run_dir, params=params) as tracker:
        log_run(tracker, (*RUN, ("stage_1/train", 1, 1)))
        raise RuntimeError("stage_1 failed")
    assert fake_mlflow.named("start_run") == [((), {"run_id": "fake-run-1"})]
    assert fake_mlflow.named("log_params") == []
    assert {tag for tag, _, _ in fake_mlflow.metric_points()} == {
        f"train/stage_1/train/{key}"
        for key in ("total", "cls", "lr", "images_per_s", "seconds", "images", "steps", "val_miou")
    } | {"val/miou"}
    assert fake_mlflow.named("end_run") == [((), {"status": "FAILED"})]


def test_without_the_tracking_uri_mlflow_is_not_used(
    tmp_path: Path, fake_mlflow: FakeMlflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with open_tracker(str(tmp_path)) as tracker:
        log_run(tracker)
    assert fake_mlflow.calls == []


def test_tracking_uri_without_mlflow_installed_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.invalid:5000")
    lines: list[str] = []
    with open_tracker(str(tmp_path), log=lines.append) as tracker:
        log_run(tracker)
    assert len(lines) == 1
    assert (
        "'mlflow'" in lines[0] and "not installed" in lines[0] and "MLFLOW_TRACKING_URI" in lines[0]
    )
    assert curve(read_points(layout.tensorboard_dir(str(tmp_path))), "labels/miou") == [
        (0, 0.25),
        (1, 0.375),
    ]


def test_an_mlflow_error_warns_once_and_tensorboard_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeMlflow(fail_on="log_metric")
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.invalid:5000")
    lines: list[str] = []
    with open_tracker(str(tmp_path), log=lines.append) as tracker:
        log_run(tracker)
    assert len(lines) == 1 and "log_metric" in lines[0] and "unreachable" in lines[0]
    assert len(fake.named("log_metric")) == 1  # nothing more was sent after the failure
    assert fake.named("end_run") == []
    assert len(curve(read_points(layout.tensorboard_dir(str(tmp_path))), "train/warmup/total")) == 3


# ----------------------------------------------------------------------------------------------
# Run directories on object stores


def test_upload_events_copies_only_event_files(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / f"{EVENT_FILE_PREFIX}123.host.1.ab").write_bytes(b"events")
    (local / "notes.txt").write_text("not an event file")
    target = str(tmp_path / "target")
    uploaded = upload_events(str(local), target)
    assert uploaded == [os.path.join(target, f"{EVENT_FILE_PREFIX}123.host.1.ab")]
    assert sorted(os.listdir(target)) == [f"{EVENT_FILE_PREFIX}123.host.1.ab"]
    # A second upload of the grown file replaces the first copy.
    (local / f"{EVENT_FILE_PREFIX}123.host.1.ab").write_bytes(b"events, more events")
    upload_events(str(local), target)
    assert storage.read_bytes(uploaded[0]) == b"events, more events"


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    with moto_bucket("raysseg-tracking") as uri:
        yield uri


def test_an_s3_run_dir_gets_its_events_on_flush_and_resumes(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_temp = tmp_path / "tmp"
    local_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_temp))  # where the local event files go
    run_dir = f"{s3_bucket}/run"
    folder = layout.tensorboard_dir(run_dir)
    tracker = open_tracker(run_dir)
    log_run(tracker, (("warmup", None, 3),), label_stages=(0,))
    tracker.flush()  # the points are on the bucket before the tracker is closed
    assert curve(read_points(folder), "train/warmup/total") == [(0, 1.0), (1, 0.875), (2, 0.75)]
    tracker.close()

    with open_tracker(run_dir) as tracker:
        assert log_run(tracker) == 3  # stage_0/train's two epochs and label stage 1
    points = read_points(folder)
    assert max(Counter((t, s) for t, s, _ in points).values()) == 1
    assert curve(points, "train/stage_0/train/total") == [(3, 1.0), (4, 0.875)]
    assert curve(points, "labels/miou") == [(0, 0.25), (1, 0.375)]
    assert read_record(storage.join(folder, RECORD_FILE)).offsets == {
        "warmup": 0,
        "stage_0/train": 3,
    }
    assert list(local_temp.iterdir()) == []  # each tracker removed its local folder on close
