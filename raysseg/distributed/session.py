"""Connecting to Ray: an existing cluster (ray job submit sets RAY_ADDRESS) or a local instance."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import threading
from collections.abc import Iterator

import ray

# A port nothing listens on (TCP port 1, tcpmux, is never served on the machines Ray runs on).
NO_API_SERVER_PORT = 1

# Lines the driver's own Ray core (C++, straight to fd 2, so no logging handler sees them) prints
# that are known to be harmless. Each still goes to the session's python-core-driver-*.log.
HARMLESS_DRIVER_LINES = (
    # Logged at level E for every Ray Data actor pool: Ray Data always passes its map function
    # through the object store and restarts actors by default (ray-project/ray#57733).
    "has constructor arguments in the object store and max_restarts > 0",
)


@contextlib.contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, verbose: bool = False
) -> Iterator[None]:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local Ray; shut down what we started.

    The console shows raysseg's lines and warnings; Ray's own (the workers' output, Ray Data's
    execution dumps) stay in the session's log files unless `verbose`. A session that was already
    initialised (tests, notebooks) is reused and left running as it is.
    """
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    joining = address is not None or "RAY_ADDRESS" in os.environ
    # Worker output is what buries raysseg's lines: Ray Train's per-report INFO lines, harmless
    # `core_worker` lines tagged E. A failure in a worker still reaches the driver as an exception.
    kwargs: dict = {"address": address, "log_to_driver": verbose}
    if not joining:
        # A new local instance, even when another Ray runs on this machine (address=None would
        # join that one). Its dashboard stays on: Ray Train's placement-group cleaner polls the
        # state API it serves.
        kwargs.update(local_init_kwargs(num_cpus, include_dashboard=True))
    context = ray.init(**kwargs)
    if verbose:
        console: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        quiet_ray_data_console()
        print(f"Ray's own output: {_session_logs(context)} (--verbose prints it here)", flush=True)
        console = stderr_without(HARMLESS_DRIVER_LINES)
    with console:
        try:
            yield
        finally:
            ray.shutdown()


def local_init_kwargs(num_cpus: int | None, include_dashboard: bool) -> dict:
    """`ray.init` keywords for a new local instance whose jobs ask only its own state API.

    Why: each Ray Train stage starts a placement-group cleaner that polls the state API to see
    whether the stage's controller is alive, and finds the API by address discovery. With a second
    Ray on the machine (a `ray start` cluster, another local run, parallel tests) it may ask the
    other instance, not find the controller there, and remove the running stage's placement
    group: the stage's workers die mid-epoch. Naming the API server in the job's environment
    stops that. Without a dashboard the name is a closed port: the cleaner's queries then fail and
    it keeps the placement group (ray.shutdown removes it anyway).
    """
    port = free_local_port() if include_dashboard else NO_API_SERVER_PORT
    kwargs: dict = {
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": include_dashboard,
        "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    }
    if include_dashboard:
        kwargs["dashboard_port"] = port
    return kwargs


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (execution plans, a progress dump every few seconds, the Parquet
    sampling bar) leave the console; its warnings stay, and ray-data.log in the session keeps all."""
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data warns once that the bars are off and how to turn them on: they are off on purpose.
    log_once("ray_data_progress_manager_disabled")
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # the name Ray Data's logging config gives it
            handler.setLevel(logging.WARNING)


def _session_logs(context: object) -> str:
    """The session's log folder on this node (Ray keeps one per node)."""
    address = getattr(context, "address_info", None) or {}
    session = address.get("session_dir") if isinstance(address, dict) else None
    return f"{session}/logs" if session else "the Ray session folders' logs/ on each node"


@contextlib.contextmanager
def stderr_without(fragments: tuple[str, ...]) -> Iterator[None]:
    """File descriptor 2 of this process, less the lines that hold one of `fragments`.

    At the descriptor level because Ray's C++ core writes there directly. Every other byte
    (Python's tracebacks and warnings too) goes on to the original stderr, in order; on exit
    the original descriptor is back in place and whatever was still in the pipe is forwarded.
    """
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    stop = threading.Event()
    forwarder = threading.Thread(
        target=_forward_lines,
        args=(read_end, original, fragments, stop),
        name="raysseg-stderr-filter",
        daemon=True,
    )
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        # Back to the original descriptor first: a process that inherited the pipe's write end
        # would keep it open, so the forwarder stops on `stop` and a drain, not on end of file.
        os.dup2(original, 2)
        stop.set()
        forwarder.join()
        os.close(read_end)
        os.close(original)


def _forward_lines(
    read_end: int, target: int, fragments: tuple[str, ...], stop: threading.Event
) -> None:
    """Copy `read_end` to `target` line by line, dropping the lines that hold a fragment, until
    end of file, or until nothing more arrives once `stop` is set."""
    pending = b""
    wanted = tuple(fragment.encode() for fragment in fragments)
    while True:
        ready, _, _ = select.select([read_end], [], [], 0.1)
        if not ready:
            if stop.is_set():
                break
            continue
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        kept = [line + b"\n" for line in lines if not any(w in line for w in wanted)]
        _write_all(target, b"".join(kept))
    if not any(w in pending for w in wanted):
        _write_all(target, pending)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
