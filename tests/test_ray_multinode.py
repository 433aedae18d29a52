"""A label update on the simulated 3-node cluster (conftest) spreads its work over more than one node."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray_helpers import tiny_config

from raysseg.data.manifest import write_manifest
from raysseg.data.sources import voc_records
from raysseg.distributed.refine import update_labels
from raysseg.rundir import layout

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_label_update_uses_several_nodes(ray_cluster, tiny_data_factory, tmp_path) -> None:
    data_root = tiny_data_factory(n_train=24, n_val=0, size=40, seed=3)
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
