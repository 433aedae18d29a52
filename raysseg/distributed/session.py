"""Connecting to Ray: an existing cluster (ray job submit sets RAY_ADDRESS) or a local instance."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local Ray; shut down what we started.

    A session that was already initialised (tests, notebooks) is reused and left running.
    """
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    joining = address is not None or "RAY_ADDRESS" in os.environ
    kwargs: dict = {"address": address, "log_to_driver": True}
    if not joining:
        # A new local instance, even when another Ray runs on this machine (address=None would
        # join that one). Its dashboard stays on: Ray Train's placement-group cleaner polls the
        # state API it serves, and warns every few seconds without it.
        kwargs.update(address="local", num_cpus=num_cpus)
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()
