"""jobs/ and cluster/: configs load, launcher YAMLs and KubeRay manifests match their schemas (offline),
and every entrypoint they name exists. Also: a job with a bad config fails before touching Ray."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from raysseg.cli import build_parser
from raysseg.config import load_config
from raysseg.tuning.space import load_space

REPO = Path(__file__).resolve().parents[1]
# Run configs; runtime_env.yaml is Ray's, tune_space.yaml a search space (checked below).
NOT_RUN_CONFIGS = ("runtime_env.yaml", "tune_space.yaml")
JOB_CONFIGS = sorted(p for p in (REPO / "jobs").glob("*.yaml") if p.name not in NOT_RUN_CONFIGS)
LAUNCHER_YAMLS = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
KUBERAY_MANIFESTS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
# KubeRay's CRDs (commit feeaf72f, v1.7.0-rc.0+5) live in ../shared/kuberay-crds beside every checkout,
# CI's included; they are read from there, not copied into the project.
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"
CRDS = {
    "RayCluster": SHARED_CRDS / "ray.io_rayclusters.yaml",
    "RayJob": SHARED_CRDS / "ray.io_rayjobs.yaml",
}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _cli_commands() -> set[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("the CLI has no subcommands")


def _check_entrypoint(command: str) -> None:
    """`python -m raysseg <cmd> [--config jobs/x.yaml] ...`: the command exists, the config loads."""
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "raysseg"], command
    assert words[3] in _cli_commands(), f"unknown raysseg command in {command!r}"
    build_parser().parse_args(words[3:])  # exits (SystemExit) on unknown flags
    if "--config" in words:
        config = REPO / words[words.index("--config") + 1]
        assert config.is_file(), f"{command!r} names a missing config"
        load_config(config)


# ----------------------------------------------------------------------------------------------
# jobs/


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_configs_load(path: Path) -> None:
    load_config(path)


def test_the_shipped_tune_space_loads_against_every_job_config() -> None:
    for path in JOB_CONFIGS:
        space = load_space(REPO / "jobs" / "tune_space.yaml", load_config(path))
        assert space.params, path.name


def test_paper_and_coco_configs_have_their_class_counts() -> None:
    voc = load_config(REPO / "jobs" / "voc2012.yaml")
    coco = load_config(REPO / "jobs" / "coco2014.yaml")
    assert (voc.model.backbone, voc.model.num_classes, voc.stages.count) == ("resnet38d", 21, 4)
    assert voc.resources.num_workers * voc.optim.batch_size == 4  # the paper's global batch
    assert (coco.data.source, coco.model.num_classes) == ("coco", 81)


def test_runtime_env_pins_match_pyproject() -> None:
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = {re.split(r"[\[=]", dep)[0]: dep for dep in project["dependencies"]}
    for package in runtime_env["pip"]["packages"]:
        assert pinned[package.split("==")[0]] == package, package
    # ray comes from the cluster, whose version must match; everything else must be listed.
    assert set(pinned) - {p.split("==")[0] for p in runtime_env["pip"]["packages"]} == {"ray"}


def test_readmes_name_existing_commands() -> None:
    for readme in (REPO / "jobs" / "README.md", REPO / "cluster" / "README.md"):
        text = readme.read_text().replace("\\\n", " ")
        for match in re.finditer(r"python -m raysseg ([a-z]+)", text):
            command = match.group(1)
            assert command in _cli_commands(), f"{readme.name}: {command}"
        for config in re.findall(r"--config (jobs/\S+\.yaml)", text):
            assert (REPO / config).is_file(), f"{readme.name}: {config}"


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysseg", *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("override", "named"),
    [("optim.lrate=1", "optim.lrate"), ("data.root=/nonexistent/voc", "data.root")],
)
def test_job_with_a_bad_config_exits_2_before_any_cluster_work(tmp_path, override, named) -> None:
    # RAY_ADDRESS points at a closed port: a command that tried to join would hang or fail differently.
    result = _run_cli(
        "pipeline", "--config", str(REPO / "jobs" / "demo.yaml"), override, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "raysseg: config error:" in result.stderr and f"'{named}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written, not even the run directory


# ----------------------------------------------------------------------------------------------
# cluster launcher


@pytest.fixture(scope="module")
def launcher_schema() -> dict[str, Any]:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_matches_rays_schema(path: Path, launcher_schema: dict[str, Any]) -> None:
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, launcher_schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # a head without tasks
    assert {"gpu_worker", "cpu_worker"} <= set(types)
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert commands.count("RAY_AUTH_MODE=token") == 2
    assert "pip install" in " ".join(config["setup_commands"])
    for local in config["file_mounts"].values():
        if not local.startswith("~"):
            assert (REPO / local).exists(), local


# ----------------------------------------------------------------------------------------------
# KubeRay


def _crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load(CRDS[kind].read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _undeclared_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Keys the schema does not declare: openAPI schemas accept them, Kubernetes silently drops them."""
    if isinstance(value, list) and "items" in schema:
        return [
            e for i, v in enumerate(value) for e in _undeclared_fields(v, schema["items"], where)
        ]
    if not isinstance(value, dict) or "properties" not in schema:
        return []
    found = []
    for key, child in value.items():
        if key not in schema["properties"]:
            found.append(f"{where}.{key}")
        else:
            found += _undeclared_fields(child, schema["properties"][key], f"{where}.{key}")
    return found


def _kuberay_resources() -> list[tuple[str, dict[str, Any]]]:
    resources = []
    for path in KUBERAY_MANIFESTS:
        for doc in _documents(path):
            if doc["kind"] in CRDS:
                resources.append((f"{path.name}:{doc['kind']}", doc))
    return resources


def test_kuberay_manifests_exist() -> None:
    kinds = sorted(doc["kind"] for _, doc in _kuberay_resources())
    assert kinds == ["RayCluster", "RayJob"]


@pytest.mark.parametrize("name_doc", _kuberay_resources(), ids=lambda item: item[0])
def test_kuberay_manifest_matches_its_crd(name_doc: tuple[str, dict[str, Any]]) -> None:
    _, doc = name_doc
    schema = _crd_schema(doc["kind"])
    jsonschema.validate(doc, schema)
    assert _undeclared_fields(doc, schema) == []
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert cluster["authOptions"]["mode"] == "token"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in str(groups["cpu"])
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_runs_an_existing_entrypoint() -> None:
    (job,) = [doc for _, doc in _kuberay_resources() if doc["kind"] == "RayJob"]
    spec = job["spec"]
    _check_entrypoint(spec["entrypoint"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]  # where jobs/ resolves inside the image
    assert spec["shutdownAfterJobFinishes"] is True
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        assert spec[key] > 0, key


def test_shared_storage_path_matches_the_job_configs() -> None:
    (job,) = [doc for _, doc in _kuberay_resources() if doc["kind"] == "RayJob"]
    mounts = {
        mount["mountPath"]
        for container in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ]
        for mount in container["volumeMounts"]
    }
    for path in JOB_CONFIGS:
        config = load_config(path)
        if config.run_dir.startswith("/mnt/"):
            assert any(config.run_dir.startswith(m + "/") for m in mounts), path.name
