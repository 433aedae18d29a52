"""Progress lines for long work: done / total, rate, errors, time left. Pure arithmetic, no Ray.

The rate is measured from the first finished item, not from the start: a label update spends its
first seconds starting actors and loading the checkpoint, and counting that time would make the
estimate far too pessimistic on a long run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

# The shortest time a rate is measured over.
MIN_RATE_SECONDS = 1.0


@dataclass
class ProgressMeter:
    """Feed it running totals with `update`; `line()` says where the work stands."""

    label: str
    total: int
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    errors: int = 0
    first_done_at: float = math.nan
    first_done_count: int = 0
    now: float = math.nan  # time of the last update

    def __post_init__(self) -> None:
        if math.isnan(self.now):
            self.now = self.started

    def update(self, done: int, errors: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if done and math.isnan(self.first_done_at):
            self.first_done_at, self.first_done_count = now, done
        self.done, self.errors = done, errors
        self.now = now

    def rate(self) -> float:
        """Items per second since the first finished item; NaN until a second has passed since
        then (two blocks arriving milliseconds apart gave '952.1 images/s' for an 8-image run)."""
        elapsed = self.now - self.first_done_at
        if math.isnan(elapsed) or elapsed < MIN_RATE_SECONDS:
            return math.nan
        return (self.done - self.first_done_count) / elapsed

    def seconds_left(self) -> float:
        rate = self.rate()
        if not rate or math.isnan(rate) or rate <= 0:
            return math.nan
        return max(0, self.total - self.done) / rate

    def line(self) -> str:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done:,}/{self.total:,} images ({percent:.1f}%), "
            f"{_format_rate(self.rate())}, {self.errors:,} errors, "
            f"elapsed {format_duration(self.now - self.started)}, "
            f"ETA {format_duration(self.seconds_left())}"
        )


def _format_rate(rate: float) -> str:
    return "-- images/s" if math.isnan(rate) else f"{rate:.1f} images/s"


def format_duration(seconds: float) -> str:
    """12 -> '12s', 754 -> '12m34s', 7384 -> '2h03m'; NaN -> '--'."""
    if math.isnan(seconds):
        return "--"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


__all__ = ["ProgressMeter", "format_duration"]


# Keys of a training epoch's metrics that are not loss terms.
_NOT_LOSSES = frozenset(
    {"lr", "steps", "images", "seconds", "images_per_s", "epoch", "stage", "val_miou"}
    | {"unreadable", "val_unreadable"}
)


def epoch_line(label: str, metrics: dict, epochs: int, elapsed: float, seconds_left: float) -> str:
    """'stage_0/train: epoch 2/5, total 0.8123, cls 0.3012, lr 0.00312, 41.2 images/s, elapsed
    1m02s, ETA 2m10s, val mIoU 31.20%' (the val figure only where the epoch computed it)."""
    terms = [k for k, v in metrics.items() if k not in _NOT_LOSSES and isinstance(v, (int, float))]
    terms.sort(key=lambda key: (key != "total", key))  # the total first, then the terms by name
    losses = ", ".join(f"{key} {metrics[key]:.4f}" for key in terms)
    parts = [f"{label}: epoch {int(metrics['epoch']) + 1}/{epochs}"]
    if losses:
        parts.append(losses)
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.3g}")
    parts += [
        _format_rate(float(metrics.get("images_per_s", math.nan))),
        f"elapsed {format_duration(elapsed)}",
        f"ETA {format_duration(seconds_left)}",
    ]
    if isinstance(metrics.get("val_miou"), (int, float)):
        parts.append(f"val mIoU {100.0 * metrics['val_miou']:.2f}%")
    if metrics.get("unreadable"):
        parts.append(f"{int(metrics['unreadable'])} unreadable images replaced")
    if metrics.get("val_unreadable"):
        parts.append(f"{int(metrics['val_unreadable'])} unreadable val images left out")
    return ", ".join(parts)


def step_line(
    label: str,
    epoch: int,
    epochs: int,
    steps: int,
    steps_total: int,
    rate: float,
    elapsed: float,
    seconds_left: float,
) -> str:
    """'stage_0/train: epoch 3/5, step 120/400 (30.0%), 40.1 images/s, elapsed 1m30s, ETA 1m50s'."""
    percent = 100.0 * steps / steps_total if steps_total else 100.0
    return (
        f"{label}: epoch {epoch + 1}/{epochs}, step {steps:,}/{steps_total:,} ({percent:.1f}%), "
        f"{_format_rate(rate)}, elapsed {format_duration(elapsed)}, "
        f"ETA {format_duration(seconds_left)}"
    )
