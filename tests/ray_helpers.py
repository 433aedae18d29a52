"""Helpers shared by the Ray tests: tiny configs, step markers, private `ray start` heads and the
job config they run (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from raysseg.config import Config, load_config


def tiny_config(data_root: Path, run_dir: Path, *extra: str) -> Config:
    """A config that runs the whole pipeline on a tiny synthetic dataset in seconds."""
    return load_config(
        overrides=[
            f"run_dir={run_dir}",
            "model.backbone=small",
            "model.num_classes=6",
            "model.small_width=16",
            "data.source=voc",
            f"data.root={data_root}",
            "data.train_split=train",
            "data.val_split=val",
            "data.saliency=folder",
            f"data.saliency_dir={data_root / 'saliency'}",
            "data.crop_size=48",
            "data.num_workers=0",
            "optim.batch_size=4",
            "optim.lr=0.01",
            "optim.warmup_epochs=1",
            "optim.epochs=1",
            "stages.count=2",
            "labels.cam_scales=[1.0]",
            "labels.cam_flip=false",
            "eval.scales=[1.0]",
            "eval.crf_iterations=2",
            "resources.num_workers=1",
            "resources.cpus_per_worker=1",
            "resources.refine_actors=1",
            "resources.refine_batch_size=4",
            *extra,
        ]
    )


# The steps of a one-stage pipeline run, in order.
ONE_STAGE_STEPS = (
    "manifest",
    "warmup",
    "stage_0/labels",
    "stage_0/train",
    "stage_0/refine",
    "final",
)


def assert_steps_done(run_dir: Path, steps: tuple[str, ...] = ONE_STAGE_STEPS) -> None:
    """Every step wrote its `.DONE` marker (a step writes it last)."""
    for step in steps:
        assert (run_dir / f"{step}.DONE").is_file(), step


# ---------------------------------------------------------------------------------------------
# Private heads: `ray start --head` on 127.0.0.1 with its own ports, temp dir and HOME, stopped by
# the pids of its own processes. `ray stop` is never used: it stops every Ray process of the user
# on the machine, including other sessions' clusters.

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


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def base_env(home: Path) -> dict[str, str]:
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


def run_command(
    args: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def processes_under(temp_dir: Path) -> list[int]:
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


def stop_head(temp_dir: Path, grace_s: float = 5.0) -> None:
    """Terminate only this head's processes (SIGTERM, then SIGKILL after a grace period)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_under(temp_dir):
            with contextlib.suppress(ProcessLookupError):  # exited since the scan
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while processes_under(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not processes_under(temp_dir):
            return


def start_head(root: Path, auth_mode: str) -> Head:
    """A head under `root` (its HOME in root/home, temp dir root/r); auth_mode "token" or "disabled"."""
    home = root / "home"
    home.mkdir()
    env = base_env(home)
    env["RAY_AUTH_MODE"] = auth_mode
    if auth_mode == "token":
        generated = run_command([RAY, "get-auth-token", "--generate"], env, timeout=60)
        assert generated.returncode == 0, generated.stderr
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    args = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "4"]
    args += ["--temp-dir", str(root / "r"), "--disable-usage-stats"]
    for flag, port in ports.items():
        args += [flag, str(port)]
    started = run_command(args, env, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    return Head(
        root / "r",
        f"http://127.0.0.1:{ports['--dashboard-port']}",
        env,
        address=f"127.0.0.1:{ports['--port']}",
    )


def tiny_job_config(root: Path, data: Path) -> Path:
    """A pipeline config (root/tiny.yaml, run dir root/run) over the dataset `data` that runs in
    about a minute on 2 cores: one stage and no test-time CRF, every step of the pipeline once."""
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
        "stages": {"count": 1},
        "labels": {"cam_scales": [1.0], "cam_flip": False},
        "eval": {"scales": [1.0], "flip": False, "crf": False},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "refine_actors": 1},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


REPO = Path(__file__).resolve().parents[1]


def submit_job(head: Head, raysseg_args: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir REPO -- python -m raysseg ...` (blocks, following the logs);
    asserts that it and `ray job status` report success. stdout: the job's output and the CLI's
    log (stderr) joined; stderr: `ray job status`'s output."""
    job_id = f"raysseg-test-{os.getpid()}-{time.monotonic_ns()}"
    env = head.env
    args = [RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", job_id]
    args += ["--working-dir", str(REPO), "--"]
    args += ["python", "-m", "raysseg", *raysseg_args]
    submitted = run_command(args, env, timeout=300)
    status = run_command([RAY, "job", "status", "--address", head.dashboard_url, job_id], env, 60)
    # The CLI logs through stderr; keep everything for the assertion message.
    submitted.stdout += "\n" + submitted.stderr
    submitted.stderr = status.stdout + status.stderr
    assert submitted.returncode == 0, submitted.stdout[-6000:]
    assert f"Job '{job_id}' succeeded" in submitted.stderr, submitted.stderr
    return submitted


def refused_output(head: Head, home: Path, **auth_env: str) -> str:
    """Output of `ray job list` by a client without the head's token; asserts it failed."""
    home.mkdir(exist_ok=True)
    env = base_env(home)
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(auth_env)
    listed = run_command([RAY, "job", "list", "--address", head.dashboard_url], env, timeout=60)
    assert listed.returncode != 0, listed.stdout
    return listed.stdout + listed.stderr
