"""Training progress the driver prints while a Ray Train stage runs.

Rank 0 writes a small JSON file beside the stage's checkpoints (`layout.train_progress`): the
metrics of every finished epoch, and during an epoch the step it is at (every
`resources.progress_seconds`). The driver polls that file in a thread and prints one line per
epoch and one per progress tick.

Why a file: Ray Train V2's `fit()` gives the driver nothing until the stage ends, and a worker's
prints reach the console (when they do) prefixed by Ray and mixed with Ray's own lines. The run
directory is shared storage (a local path or a URI) that the driver reads anyway; the file is
rewritten atomically, so a poll never reads half of it.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raysseg import storage
from raysseg.progress import epoch_line, step_line


@dataclass
class ProgressWriter:
    """Rank 0's side: `epoch_done` after each epoch, `tick` during one."""

    path: str
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    ticks: int = 0
    failure: str = ""

    def epoch_done(self, metrics: dict[str, Any]) -> None:
        self.history.append({k: v for k, v in metrics.items() if _is_number(v)})
        self._write(current=None)

    def tick(self, epoch: int, steps: int, steps_total: int, images: int, seconds: float) -> None:
        """Where epoch `epoch` stands: `steps` of `steps_total` done, `images` in `seconds`."""
        current = {
            "epoch": epoch,
            "steps": steps,
            "steps_total": steps_total,
            "images": images,
            "seconds": seconds,
        }
        self._write(current)

    def data_error(self, message: str) -> None:
        """The stage stops on bad data: the driver raises `message` as a DataError once fit()
        returns (raised in the workers, Ray Train would retry the same epoch max_failures times)."""
        self.failure = message
        self._write(current=None)

    def _write(self, current: dict[str, Any] | None) -> None:
        self.ticks += 1
        state = {
            "epochs": self.epochs,
            "history": self.history,
            "current": current,
            "tick": self.ticks,
        }
        if self.failure:
            state["data_error"] = self.failure
        storage.write_bytes_atomic(self.path, json.dumps(state).encode())


def open_writer(path: str, epochs: int, start_epoch: int) -> ProgressWriter:
    """A writer that keeps the history of the epochs a restarted stage does not train again."""
    history = [row for row in read_progress(path).get("history", []) if row["epoch"] < start_epoch]
    return ProgressWriter(path, epochs, history)


def read_progress(path: str) -> dict[str, Any]:
    """The progress file's contents; {} before rank 0 first wrote it."""
    if not storage.exists(path):
        return {}
    return json.loads(storage.read_bytes(path))


class ProgressWatcher:
    """The driver's side: a thread that prints new epochs and ticks until `stop()`."""

    def __init__(
        self, path: str, label: str, log: Callable[[str], None], poll_seconds: float = 1.0
    ) -> None:
        self.path, self.label, self.log, self.poll_seconds = path, label, log, poll_seconds
        self.started = time.perf_counter()
        self.epochs_shown: set[int] = set()
        self.last_tick = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress {label}", daemon=True)

    def __enter__(self) -> ProgressWatcher:
        # Epochs finished before a restart of the driver are not printed again.
        self.epochs_shown = {
            int(row["epoch"]) for row in read_progress(self.path).get("history", [])
        }
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last epoch's line, written just before fit() returned

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except (OSError, ValueError) as failure:  # storage hiccup or a torn read: next poll
                self.log(f"{self.label}: progress not readable ({failure}); training goes on")

    def poll(self) -> None:
        state = read_progress(self.path)
        if not state or state.get("tick", 0) <= self.last_tick:
            return
        self.last_tick = state["tick"]
        epochs, history = int(state["epochs"]), state["history"]
        elapsed = time.perf_counter() - self.started
        for row in history:
            if int(row["epoch"]) not in self.epochs_shown:
                self.epochs_shown.add(int(row["epoch"]))
                left = (epochs - int(row["epoch"]) - 1) * _epoch_seconds(history)
                self.log(epoch_line(self.label, row, epochs, elapsed, left))
        current = state.get("current")
        if current:
            self.log(self._step_line(current, epochs, history, elapsed))

    def _step_line(
        self, current: dict[str, Any], epochs: int, history: list[dict], elapsed: float
    ) -> str:
        epoch, steps, total = int(current["epoch"]), int(current["steps"]), current["steps_total"]
        seconds = float(current["seconds"])
        rate = current["images"] / seconds if seconds > 0 else float("nan")
        # The rest of this epoch at its pace so far; later epochs at the finished ones' pace.
        per_step = seconds / steps if steps else float("nan")
        whole_epoch = _epoch_seconds(history) if history else per_step * total
        left = (total - steps) * per_step + (epochs - epoch - 1) * whole_epoch
        return step_line(self.label, epoch, epochs, steps, total, rate, elapsed, left)


def _epoch_seconds(history: list[dict[str, Any]]) -> float:
    """The typical epoch's seconds (the median: the first epoch of a stage also warms caches)."""
    seconds = [float(row["seconds"]) for row in history if "seconds" in row]
    return statistics.median(seconds) if seconds else float("nan")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
