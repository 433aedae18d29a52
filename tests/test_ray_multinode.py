"""A label update on a simulated 3-node cluster spreads its work over more than one node."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster
from ray_helpers import tiny_config

from raysseg import layout
from raysseg.data.records import voc_records, write_manifest
from raysseg.data.synth import generate_synthetic
from raysseg.distributed.refine import update_labels

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture
def three_nodes():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_label_update_uses_several_nodes(three_nodes, tmp_path) -> None:
    data_root = tmp_path / "synth"
    generate_synthetic(str(data_root), n_train=24, n_val=0, size=40, seed=3)
    config = tiny_config(data_root, tmp_path / "run", "resources.refine_batch_size=2")
    manifest = layout.dataset_manifest(config.run_dir, "train")
    write_manifest(voc_records(str(data_root), "train"), manifest)
    summary = update_labels(
        config,
        mode="ground_truth",
        checkpoint="",
        in_manifest=manifest,
        labels_root=layout.stage_labels(config.run_dir, 0),
        out_manifest=layout.stage_manifest(config.run_dir, 0),
        errors_path=layout.stage_errors(config.run_dir, 0),
        saliency_cache=layout.saliency_cache(config.run_dir),
    )
    assert summary["written"] == 24
    table = pq.read_table(str(Path(layout.stage_manifest(config.run_dir, 0))))
    nodes = set(table.column("node_id").to_pylist())
    assert len(nodes) >= 2, nodes
