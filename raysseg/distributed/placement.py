"""Where each kind of work runs: the Ray resources that Train workers, label-inference actors and
CRF tasks request, from `config.resources`.

Custom resources ("crf_node=0.01") pin work to the nodes that advertise them (`ray start
--resources`, the cluster YAMLs), so CPU-bound CRFs never occupy a GPU node. Ray waits silently
forever for a resource that no node has; `require_custom_resources` turns a misspelt or missing
resource into an error that names the config key, after giving an autoscaler time to add a node.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import ray
from ray.autoscaler.sdk import request_resources

from raysseg.config import ResourcesConfig, parse_custom_resources
from raysseg.errors import InputError

# Kind of work -> the config key of its custom resources.
CUSTOM_RESOURCE_KEYS = {
    "train": "resources.train_custom",
    "refine": "resources.refine_custom",
    "crf": "resources.crf_custom",
}
_POLL_SECONDS = 2.0


class PlacementError(InputError, RuntimeError):
    """No node advertises a custom resource the config asks for; the message names the key."""


def custom_resources(resources: ResourcesConfig, kind: str) -> dict[str, float]:
    """The custom resources one unit of `kind` ("train", "refine", "crf") requests."""
    key = CUSTOM_RESOURCE_KEYS[kind]
    return parse_custom_resources(getattr(resources, key.split(".", 1)[1]), key)


def train_worker_resources(resources: ResourcesConfig) -> dict[str, float]:
    """ScalingConfig.resources_per_worker: CPUs, GPUs when used, custom resources."""
    bundle = {"CPU": resources.cpus_per_worker, **custom_resources(resources, "train")}
    if resources.use_gpu:
        bundle["GPU"] = resources.gpus_per_worker
    return bundle


def require_custom_resources(resources: ResourcesConfig, kinds: Iterable[str]) -> None:
    """Return once some alive node advertises every custom resource of `kinds`.

    A missing resource is requested from the autoscaler (`request_resources`; a no-op without
    one) and waited for up to `resources.placement_wait_s`, then PlacementError names the key
    and what the nodes do advertise. Only custom resources are checked: CPUs and GPUs are Ray's
    and the autoscaler's usual business, and a GPU cluster may well start with no GPU node.
    """
    wanted = {
        name: (CUSTOM_RESOURCE_KEYS[kind], amount)
        for kind in kinds
        for name, amount in custom_resources(resources, kind).items()
    }
    missing = _missing(wanted)
    if not missing:
        return
    deadline = time.monotonic() + resources.placement_wait_s
    request_resources(bundles=[{name: wanted[name][1]} for name in missing])
    try:
        while missing and time.monotonic() < deadline:
            time.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            missing = _missing(wanted)
    finally:
        # The request is cluster-wide and replaces earlier ones: clear it, the work itself keeps
        # a node once placed (Ray Data renews its own requests while it runs).
        request_resources(bundles=[])
    if missing:
        advertised = sorted(_node_resource_names())
        problems = "; ".join(
            f"config key '{wanted[name][0]}' asks for '{name}={wanted[name][1]:g}'"
            for name in missing
        )
        raise PlacementError(
            f"{problems}, but no node advertises '{', '.join(missing)}' (waited "
            f"{resources.placement_wait_s:g} s, resources.placement_wait_s). Nodes advertise: "
            f"{', '.join(advertised)}. Start nodes with `ray start --resources` (see "
            f"cluster/README.md) or clear the key."
        )


def _missing(wanted: dict[str, tuple[str, float]]) -> list[str]:
    """Names in `wanted` that no alive node holds in the requested amount."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    return sorted(
        name
        for name, (_, amount) in wanted.items()
        if not any(node.get(name, 0.0) >= amount for node in nodes)
    )


def _node_resource_names() -> set[str]:
    names = set()
    for node in ray.nodes():
        if node.get("Alive"):
            # Per-node bookkeeping names ("node:10.0.0.1", "accelerator_type:...") are noise here.
            names.update(n for n in node["Resources"] if ":" not in n)
    return names


__all__ = [
    "CUSTOM_RESOURCE_KEYS",
    "PlacementError",
    "custom_resources",
    "require_custom_resources",
    "train_worker_resources",
]
