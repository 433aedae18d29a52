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
