"""Training curves of a run, for TensorBoard and, when it is configured, MLflow. Driver side only.

`open_tracker(run_dir)` writes TensorBoard event files to `<run_dir>/tensorboard/`; view them with
`tensorboard --logdir <run_dir>/tensorboard`. One event file per tracker (per driver process); a
rerun adds a file beside the earlier ones and TensorBoard reads them all as one run. Tags:

  train/<step name>/<key>   each number of an epoch's metrics ("warmup", "stage_1/train" ...);
                            step: the run's epoch counter (below)
  val/miou                  a training stage's val mIoU (the epoch that carries `val_miou`);
                            step: the stage index
  labels/<key>              a label step's figures, "label_" dropped (labels/miou, labels/images);
                            step: the stage whose labels the step wrote

The run's epoch counter: a training step's epoch e is logged at `offset + e`, where the step's
offset is fixed the first time the step logs: one past the highest step logged so far. The warm-up's
5 epochs are steps 0..4, stage_0/train's epoch 0 is step 5, so successive stages continue one curve.

Resume: `<run_dir>/tensorboard/logged.json` records what reached the event files: each training
step's offset and logged epochs, the label stages, the MLflow run id. A point already recorded is
skipped, so a rerun may replay every epoch of every step and adds none twice. `flush` / `close`
write the record (atomically) only once the events before it are on disk or uploaded, so it never
holds a point the event files lack. Points logged since the last flush are not in the record: a
driver killed then may have left some of them in its event file, and a rerun logs them again.
Flush after each step to keep that to one step's points.

Run directories on object stores (s3://, gs://): events go to a local temp folder, and `flush` /
`close` upload the event file to `<run_dir>/tensorboard/` (tensorboardX has no portable writer for
them). Local paths and file:// URIs are written in place.

MLflow: when `MLFLOW_TRACKING_URI` is set and `mlflow` can be imported, the same tags and steps also
go to one MLflow run named after the run directory, with the flat config as its params; a rerun
continues that run. mlflow is not a dependency: with the variable set but the package missing, one
warning line says so. An MLflow error never stops training: it is printed once and MLflow logging
stops for the rest of the process.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from raysseg import storage
from raysseg.rundir import layout

RECORD_FILE = "logged.json"
EVENT_FILE_PREFIX = "events.out.tfevents."
# Not a curve: the epoch index is the x axis itself.
_NOT_CURVES = frozenset({"epoch"})


# ----------------------------------------------------------------------------------------------
# What has been logged (the resume record)


@dataclass
class LoggedRecord:
    """What the event files of a run hold: per training step its offset and logged epochs, the
    label stages, and the MLflow run the metrics went to."""

    offsets: dict[str, int] = field(default_factory=dict)
    epochs: dict[str, set[int]] = field(default_factory=dict)
    label_stages: set[int] = field(default_factory=set)
    mlflow_run_id: str = ""

    def offset_of(self, step_name: str) -> int:
        """The step's offset, fixed now if it has none: one past the highest step logged so far."""
        if step_name not in self.offsets:
            ends = [
                self.offsets[name] + max(epochs) + 1
                for name, epochs in self.epochs.items()
                if epochs and name in self.offsets
            ]
            self.offsets[step_name] = max([0, *ends])
        return self.offsets[step_name]

    def to_json(self) -> bytes:
        tree = {
            "offsets": self.offsets,
            "epochs": {name: sorted(epochs) for name, epochs in self.epochs.items()},
            "label_stages": sorted(self.label_stages),
            "mlflow_run_id": self.mlflow_run_id,
        }
        return json.dumps(tree, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> LoggedRecord:
        try:
            tree = json.loads(data)
            return cls(
                offsets={str(k): int(v) for k, v in tree["offsets"].items()},
                epochs={str(k): {int(e) for e in v} for k, v in tree["epochs"].items()},
                label_stages={int(s) for s in tree["label_stages"]},
                mlflow_run_id=str(tree.get("mlflow_run_id", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"tracking record '{where}' is not valid ({error}); delete it (and the event "
                "files beside it) to log the run's curves afresh"
            ) from error


def read_record(uri: str) -> LoggedRecord:
    """The record at `uri`, or an empty one where there is none yet."""
    if not storage.exists(uri):
        return LoggedRecord()
    return LoggedRecord.from_json(storage.read_bytes(uri), uri)


# ----------------------------------------------------------------------------------------------
# Sinks: where scalars go


class _Sink(Protocol):
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self, failed: bool) -> None: ...


def upload_events(local_dir: str, destination: str) -> list[str]:
    """Copy the event files of `local_dir` into folder `destination` (any storage URI or path);
    returns the destination URIs. Each copy replaces the earlier upload of the same file whole."""
    uploaded = []
    for name in sorted(os.listdir(local_dir)):
        if name.startswith(EVENT_FILE_PREFIX):
            target = storage.join(destination, name)
            storage.copy_file(os.path.join(local_dir, name), target)
            uploaded.append(target)
    return uploaded


class _TensorBoardSink:
    """One event file, written synchronously.

    tensorboardX's SummaryWriter hands events to a background thread, and its flush() does not wait
    for that queue: an upload or a record written right after it could miss the last points. The
    EventsWriter underneath writes in the calling thread, and its flush() fsyncs.
    """

    def __init__(self, destination: str) -> None:
        # Imported here: tensorboardX imports torch, and a disabled tracker should cost nothing.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self._destination = destination
        self._remote = not storage.is_local(destination)
        self._local_dir = (
            tempfile.mkdtemp(prefix="raysseg-tensorboard-")
            if self._remote
            else storage.resolve(destination)[1]
        )
        os.makedirs(self._local_dir, exist_ok=True)
        # tensorboardX names a file by the second and the host only; a second writer opened in the
        # same second (a quick rerun) would truncate the first one's file without a unique suffix.
        suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._writer = EventsWriter(os.path.join(self._local_dir, "events"), suffix)
        self._event = Event
        self._summary = scalar

    def scalar(self, tag: str, value: float, step: int) -> None:
        summary = self._summary(tag, value)
        self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()
        if self._remote:
            upload_events(self._local_dir, self._destination)

    def close(self, failed: bool) -> None:
        self._writer.close()
        if self._remote:
            upload_events(self._local_dir, self._destination)
            shutil.rmtree(self._local_dir, ignore_errors=True)


class _MlflowSink:
    """The active MLflow run; the first MLflow error is printed and ends MLflow logging."""

    def __init__(self, mlflow: Any, log: Callable[[str], None]) -> None:
        self._mlflow = mlflow
        self._log = log
        self._failed = False

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._failed:
            return None
        try:
            return getattr(self._mlflow, name)(*args, **kwargs)
        except Exception as error:  # a tracking server's trouble must not stop the training
            self._failed = True
            self._log(
                f"warning: MLflow {name} failed ({type(error).__name__}: {error}); "
                "MLflow logging stops for this process, TensorBoard continues"
            )
            return None

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.call("log_metric", tag, value, step=step)

    def flush(self) -> None:
        pass  # mlflow.log_metric is synchronous

    def close(self, failed: bool) -> None:
        self.call("end_run", status="FAILED" if failed else "FINISHED")


def _run_name(run_dir: str) -> str:
    path = storage.resolve(run_dir)[1] if storage.is_local(run_dir) else run_dir
    return posixpath.basename(path.rstrip("/")) or "raysseg"


def _open_mlflow(
    run_dir: str,
    params: Mapping[str, Any] | None,
    record: LoggedRecord,
    log: Callable[[str], None],
) -> _MlflowSink | None:
    """An MLflow sink with its run started, where MLFLOW_TRACKING_URI asks for one and mlflow is
    installed; sets `record.mlflow_run_id`."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    try:
        import mlflow
    except ImportError:
        log(
            "warning: MLFLOW_TRACKING_URI is set but the 'mlflow' package is not installed "
            "(pip install mlflow); curves go to TensorBoard only"
        )
        return None
    sink = _MlflowSink(mlflow, log)
    if record.mlflow_run_id:  # a rerun continues the run the earlier points went to
        resumed = sink.call("start_run", run_id=record.mlflow_run_id)
        return sink if resumed is not None else None
    run = sink.call("start_run", run_name=_run_name(run_dir))
    if run is None:
        return None
    # Params are set once per run (MLflow refuses to change one), so only a new run gets them.
    sink.call("log_params", dict(params or {}))
    record.mlflow_run_id = str(run.info.run_id)
    return sink


# ----------------------------------------------------------------------------------------------
# The tracker


def _finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite number; None for strings, flags, None, NaN, inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _curves(metrics: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(key, value) for each finite number of `metrics` but the epoch index."""
    for key, value in metrics.items():
        number = _finite_number(value)
        if number is not None and key not in _NOT_CURVES:
            yield str(key), number


class Tracker:
    """Logs a run's curves; see the module docstring for tags, steps and resume.

    Use as a context manager, or call `close` (in a `finally`): an exception ends an MLflow run as
    FAILED. A tracker opened with `enabled=False` does nothing and writes nothing.
    """

    def __init__(self, record_uri: str, record: LoggedRecord, sinks: list[_Sink]) -> None:
        self._record_uri = record_uri
        self._record = record
        self._sinks = sinks
        self._changed = bool(sinks)
        self._closed = False

    @property
    def enabled(self) -> bool:
        return bool(self._sinks)

    def epoch(
        self, step_name: str, epoch: int, metrics: Mapping[str, Any], stage: int | None = None
    ) -> bool:
        """Log one epoch of training step `step_name` (`Step.name`); False when it was logged
        before (a resumed run). `stage`: the stage a "stage_k/train" step trains, so its
        `val_miou` also goes to val/miou at step k (the warm-up has none)."""
        logged = self._record.epochs.setdefault(step_name, set())
        if not self.enabled or epoch in logged:
            return False
        step = self._record.offset_of(step_name) + epoch
        for key, value in _curves(metrics):
            self._scalar(f"train/{step_name}/{key}", value, step)
        miou = _finite_number(metrics.get("val_miou"))
        if stage is not None and miou is not None:
            self._scalar("val/miou", miou, stage)
        logged.add(epoch)
        self._changed = True
        return True

    def labels(self, stage: int, results: Mapping[str, Any]) -> bool:
        """Log a label step's results for the labels of stage `stage` (`Step.label_stage`);
        False when they were logged before."""
        if not self.enabled or stage in self._record.label_stages:
            return False
        for key, value in _curves(results):
            self._scalar(f"labels/{key.removeprefix('label_')}", value, stage)
        self._record.label_stages.add(stage)
        self._changed = True
        return True

    def flush(self) -> None:
        """Put every point logged so far on disk (or the object store), then the record."""
        if not self.enabled or self._closed:
            return
        for sink in self._sinks:
            sink.flush()
        self._write_record()

    def close(self, failed: bool = False) -> None:
        """Flush and close; `failed` ends an MLflow run as FAILED. A second call does nothing."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        for sink in self._sinks:
            sink.close(failed)
        self._write_record()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.close(failed=exc_type is not None)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        for sink in self._sinks:
            sink.scalar(tag, value, step)

    def _write_record(self) -> None:
        if self._changed:
            storage.write_bytes_atomic(self._record_uri, self._record.to_json())
            self._changed = False


def open_tracker(
    run_dir: str,
    enabled: bool = True,
    params: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Tracker:
    """The tracker of run `run_dir` (a local path or storage URI), resuming its record.

    `params`: a flat dict (e.g. `raysseg.config.to_flat_dict(config)`) for a new MLflow run.
    `log`: where the one-line warnings go (MLflow missing or failing).
    """
    folder = layout.tensorboard_dir(run_dir)
    record_uri = storage.join(folder, RECORD_FILE)
    if not enabled:
        return Tracker(record_uri, LoggedRecord(), [])
    record = read_record(record_uri)
    sinks: list[_Sink] = [_TensorBoardSink(folder)]
    mlflow_sink = _open_mlflow(run_dir, params, record, log)
    if mlflow_sink is not None:
        sinks.append(mlflow_sink)
    return Tracker(record_uri, record, sinks)


__all__ = [
    "EVENT_FILE_PREFIX",
    "RECORD_FILE",
    "LoggedRecord",
    "Tracker",
    "open_tracker",
    "read_record",
    "upload_events",
]
