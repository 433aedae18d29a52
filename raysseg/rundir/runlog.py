"""raysseg's console lines, also kept in the run directory (`layout.run_log`).

The console is kept quiet (Ray's own output stays in Ray's session logs), so the run directory
holds the record of what raysseg said: every step, every epoch, every label update's progress,
across reruns. A local run directory gets each line appended as it is said; a URI run directory
(object stores have no append) gets the whole file rewritten at `flush()`, after every step.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from raysseg import storage
from raysseg.rundir import layout


class RunLog:
    """A `log` callable: `echo(line)`, then the line, time-stamped, into the run's log file."""

    def __init__(self, run_dir: str, echo: Callable[[str], None]) -> None:
        self.path = layout.run_log(run_dir)
        self.echo = echo
        self.remote = storage.is_uri(self.path)
        self._lock = threading.Lock()  # the training-progress thread logs too
        self._pending: list[str] = []
        if self.remote and storage.exists(self.path):
            self._pending.append(storage.read_bytes(self.path).decode().rstrip("\n"))
        elif not self.remote:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def __call__(self, line: str) -> None:
        self.echo(line)
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        with self._lock:
            if self.remote:
                self._pending.append(stamped)
            else:
                with open(self.path, "a", encoding="utf-8") as file:
                    file.write(stamped + "\n")

    def flush(self) -> None:
        """A URI run directory: write what was said so far (no-op for a local one)."""
        if not self.remote:
            return
        with self._lock:
            text = "\n".join(self._pending) + "\n"
        storage.write_bytes_atomic(self.path, text.encode())
