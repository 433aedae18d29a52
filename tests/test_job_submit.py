"""`ray job submit --working-dir` against a real local head, with and without token authentication.

Each test starts its own head (`ray start --head` on 127.0.0.1, its own ports, temp dir and HOME) and
stops exactly that head afterwards. `ray stop` is not used: it stops every Ray process of the user on
the machine, including other sessions' clusters.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ray_helpers import assert_steps_done

from raysseg import layout
from raysseg.config import load_config
from raysseg.data.records import voc_records, write_manifest
from raysseg.data.synth import generate_synthetic
from raysseg.engine.checkpoint import save_checkpoint
from raysseg.model.network import build_model

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Flags of `ray start` that take a port; every one gets a free port so heads of parallel runs never clash.
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


@dataclass(frozen=True)
class Head:
    temp_dir: Path  # short: Ray's unix socket paths under it must stay below 107 characters
    dashboard_url: str
    env: dict[str, str]  # the environment a client of this head uses (HOME, auth mode)
    address: str = ""  # the GCS address a driver joins (RAY_ADDRESS)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _base_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # A private HOME keeps ~/.ray/auth_token of the test away from the user's real one; the venv's
    # bin first, so the job's `python` is the interpreter that has raysseg's dependencies.
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _processes_under(temp_dir: Path) -> list[int]:
    """Pids of the processes whose command line names `temp_dir`, and all their descendants."""
    parents: dict[int, int] = {}
    roots = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        if str(temp_dir) in cmdline:
            roots.append(pid)
    found = set(roots)
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def _stop_head(temp_dir: Path, grace_s: float = 5.0) -> None:
    """Terminate only this head's processes (SIGTERM, then SIGKILL after a grace period)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_under(temp_dir):
            with contextlib.suppress(ProcessLookupError):  # exited since the scan
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while _processes_under(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _processes_under(temp_dir):
            return


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # pytest's tmp_path is too long for Ray's socket paths (session dir + sockets/plasma_store).
    path = Path(tempfile.mkdtemp(prefix="rsj", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start_head(root: Path, auth_mode: str) -> Head:
    home = root / "home"
    home.mkdir()
    env = _base_env(home)
    env["RAY_AUTH_MODE"] = auth_mode
    if auth_mode == "token":
        generated = _run([RAY, "get-auth-token", "--generate"], env, timeout=60)
        assert generated.returncode == 0, generated.stderr
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    args = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "4"]
    args += ["--temp-dir", str(root / "r"), "--disable-usage-stats"]
    for flag, port in ports.items():
        args += [flag, str(port)]
    started = _run(args, env, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    return Head(
        root / "r",
        f"http://127.0.0.1:{ports['--dashboard-port']}",
        env,
        address=f"127.0.0.1:{ports['--port']}",
    )


def _tiny_job_config(root: Path) -> Path:
    """Synthetic data + a pipeline config that runs in about a minute on 2 cores (ray_helpers)."""
    data = root / "data"
    generate_synthetic(str(data), n_train=16, n_val=4, size=48, seed=1)
    tree = {
        "run_dir": str(root / "run"),
        "model": {"backbone": "small", "num_classes": 6, "small_width": 16},
        "data": {
            "source": "voc",
            "root": str(data),
            "train_split": "train",
            "val_split": "val",
            "saliency": "folder",
            "saliency_dir": str(data / "saliency"),
            "crop_size": 48,
            "num_workers": 0,
        },
        "optim": {"batch_size": 4, "lr": 0.01, "warmup_epochs": 1, "epochs": 1},
        # One stage and no test-time CRF: every step of the pipeline still runs once.
        "stages": {"count": 1},
        "labels": {"cam_scales": [1.0], "cam_flip": False},
        "eval": {"scales": [1.0], "flip": False, "crf": False},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "refine_actors": 1},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _submit(head: Head, raysseg_args: list[str], job_id: str) -> subprocess.CompletedProcess:
    """`ray job submit` of `python -m raysseg ...` (blocks, following the logs), then `ray job
    status`; outputs joined."""
    env = head.env
    args = [RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", job_id]
    args += ["--working-dir", str(REPO), "--"]
    args += ["python", "-m", "raysseg", *raysseg_args]
    submitted = _run(args, env, timeout=300)
    status = _run([RAY, "job", "status", "--address", head.dashboard_url, job_id], env, 60)
    # The CLI logs through stderr; keep everything for the assertion message.
    submitted.stdout += "\n" + submitted.stderr
    submitted.stderr = status.stdout + status.stderr
    return submitted


def _assert_run_finished(run_dir: Path) -> None:
    assert (run_dir / "config.yaml").is_file()
    assert_steps_done(run_dir)
    assert (run_dir / "metrics.json").is_file()


def _submit_and_check(head: Head, raysseg_args: list[str]) -> subprocess.CompletedProcess:
    job_id = f"raysseg-test-{os.getpid()}-{time.monotonic_ns()}"
    submitted = _submit(head, raysseg_args, job_id)
    assert submitted.returncode == 0, submitted.stdout[-6000:]
    assert f"Job '{job_id}' succeeded" in submitted.stderr, submitted.stderr
    return submitted


def _refused(head: Head, home: Path, **auth_env: str) -> str:
    """Output of `ray job list` by a client without the head's token; asserts it failed."""
    home.mkdir(exist_ok=True)
    env = _base_env(home)
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(auth_env)
    listed = _run([RAY, "job", "list", "--address", head.dashboard_url], env, timeout=60)
    assert listed.returncode != 0, listed.stdout
    return listed.stdout + listed.stderr


def test_job_submit_runs_the_pipeline_with_token_auth(short_tmp: Path) -> None:
    config = _tiny_job_config(short_tmp)
    try:
        head = _start_head(short_tmp, "token")
        _submit_and_check(head, ["pipeline", "--config", str(config)])
        _assert_run_finished(short_tmp / "run")
        # The head itself turns away clients without the token, or with a wrong one.
        assert "Unauthorized" in _refused(head, short_tmp / "nobody")
        wrong = _refused(head, short_tmp / "nobody", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32)
        assert "token is invalid" in wrong
    finally:
        _stop_head(short_tmp / "r")
    assert not _processes_under(short_tmp / "r")


def test_job_submit_runs_a_ray_data_job_without_auth(short_tmp: Path) -> None:
    # The pipeline through the Jobs API is the test above; here the head has auth disabled and the
    # job is a shorter Ray Data one: `raysseg evaluate` (an actor pool) of a saved checkpoint.
    config_path = _tiny_job_config(short_tmp)
    config = load_config(config_path)
    write_manifest(
        voc_records(config.data.root, "val"), layout.dataset_manifest(config.run_dir, "val")
    )
    checkpoint = short_tmp / "model.pt"
    save_checkpoint(checkpoint, build_model(config.model))
    command = ["evaluate", "--config", str(config_path), "--checkpoint", str(checkpoint)]
    try:
        head = _start_head(short_tmp, "disabled")
        submitted = _submit_and_check(head, [*command, "--single-scale", "--no-crf"])
        assert "mIoU" in submitted.stdout, submitted.stdout[-3000:]
    finally:
        _stop_head(short_tmp / "r")
    assert not _processes_under(short_tmp / "r")
