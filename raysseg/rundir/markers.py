"""A step's done marker: its results as JSON, written last and atomically.

A rerun skips every step whose marker exists; a step without one is (re)run, and resumes from
what it wrote (Ray Train's checkpoints, the label files already there).
"""

from __future__ import annotations

import json
from typing import Any

from raysseg import storage
from raysseg.rundir.layout import step_marker
from raysseg.rundir.steps import Step


def marker_path(run_dir: str, step: Step) -> str:
    return step_marker(run_dir, step.name)


def write_result(run_dir: str, step: Step, result: dict[str, Any]) -> None:
    """The step's done marker: its results, written last and atomically."""
    data = json.dumps(result, indent=2, default=float).encode()
    storage.write_bytes_atomic(marker_path(run_dir, step), data)


def is_done(run_dir: str, step: Step) -> bool:
    return storage.exists(marker_path(run_dir, step))


def read_result(run_dir: str, step: Step) -> dict[str, Any]:
    return json.loads(storage.read_bytes(marker_path(run_dir, step)))
