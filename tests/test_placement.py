"""Resource placement: each kind of work requests the resources its config keys name."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import ray
from ray_helpers import tiny_config

from raysseg.data.manifest import write_manifest
from raysseg.data.sources import voc_records
from raysseg.distributed.datasets import inference_pool_options
from raysseg.distributed.placement import PlacementError, train_worker_resources
from raysseg.distributed.refine import update_labels
from raysseg.distributed.train import StageSpec, train_stage
from raysseg.engine.checkpoint import save_checkpoint
from raysseg.model.network import build_model
from raysseg.rundir import layout


def test_config_keys_become_ray_resource_requests(tmp_path) -> None:
    config = tiny_config(
        tmp_path,
        tmp_path / "run",
        "resources.use_gpu=true",
        "resources.gpus_per_worker=0.5",
        "resources.cpus_per_worker=3",
        "resources.train_custom=gpu_node=1",
        "resources.refine_gpus_per_actor=0.25",
        "resources.refine_custom=gpu_node=0.1, big_memory=2",
    )
    assert train_worker_resources(config.resources) == {"CPU": 3.0, "GPU": 0.5, "gpu_node": 1.0}
    options = inference_pool_options(config.resources)
    assert options["num_gpus"] == 0.25
    assert options["resources"] == {"gpu_node": 0.1, "big_memory": 2.0}


@pytest.fixture(scope="module")
def cluster_with_crf_node(ray_cluster, tiny_data_factory):
    """The simulated 3-node cluster (conftest): only one worker advertises `crf_node`."""
    data_root = tiny_data_factory(n_train=12, n_val=0, size=40, seed=4)
    return ray_cluster.crf_node_id, data_root


def _label_update_arguments(config, data_root) -> dict:
    manifest = layout.dataset_manifest(config.run_dir, "train")
    write_manifest(voc_records(str(data_root), "train"), manifest)
    return {
        "in_manifest": manifest,
        "labels_root": layout.stage_labels(config.run_dir, 0),
        "out_manifest": layout.stage_manifest(config.run_dir, 0),
        "errors_path": layout.stage_errors(config.run_dir, 0),
        "saliency_cache": layout.saliency_cache(config.run_dir),
    }


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_crf_tasks_run_only_on_the_node_with_the_custom_resource(cluster_with_crf_node, tmp_path):
    crf_node_id, data_root = cluster_with_crf_node
    config = tiny_config(
        data_root,
        tmp_path / "run",
        "resources.refine_batch_size=2",
        "resources.crf_custom=crf_node=0.01",
    )
    arguments = _label_update_arguments(config, data_root)
    summary = update_labels(config, mode="ground_truth", checkpoint="", **arguments)
    assert summary["written"] == 12 and summary["errors"] == 0
    nodes = pq.read_table(arguments["out_manifest"]).column("node_id").to_pylist()
    assert len(nodes) == 12 and set(nodes) == {crf_node_id}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_resource_no_node_has_fails_fast_naming_the_key(cluster_with_crf_node, tmp_path):
    _, data_root = cluster_with_crf_node
    config = tiny_config(
        data_root,
        tmp_path / "run",
        "resources.refine_custom=gpu_node=1",
        "resources.train_custom=gpu_node=1",
        "resources.placement_wait_s=2",
    )
    checkpoint = str(tmp_path / "warmup.pt")
    save_checkpoint(checkpoint, build_model(config.model))
    arguments = _label_update_arguments(config, data_root)
    actors_before, groups_before = _actor_ids(), set(ray.util.placement_group_table())
    # The error comes after resources.placement_wait_s (no autoscaler adds a node), not never.
    with pytest.raises(PlacementError, match=r"resources\.refine_custom.*gpu_node=1.*waited 2 s"):
        update_labels(config, mode="initial", checkpoint=checkpoint, **arguments)
    spec = StageSpec(
        name="warmup",
        mode="warmup",
        train_manifest=arguments["in_manifest"],
        val_manifest="",
        init_checkpoint="",
        epochs=1,
        storage_path=str(tmp_path / "run" / "warmup" / "train"),
    )
    with pytest.raises(PlacementError, match=r"resources\.train_custom.*crf_node"):
        train_stage(config, spec)  # the message lists what the nodes do advertise
    # Nothing was started: no actor (inference pool, Train controller or worker), no placement
    # group for the Train workers, no label written.
    assert _actor_ids() == actors_before
    assert set(ray.util.placement_group_table()) == groups_before
    assert not os.path.exists(arguments["labels_root"])


def _actor_ids() -> set[str]:
    """Every actor the cluster's GCS knows of, alive or dead (no dashboard needed)."""
    from ray._private import state

    return set(state.actors())
