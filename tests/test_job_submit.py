"""`ray job submit --working-dir` against a real local head with authentication disabled.

The same against a head with token authentication (a pipeline job, and clients without the token or
with a wrong one turned away) is part of test_faults.py's driver-kill test: the pipeline those killed
drivers leave unfinished is completed by `ray job submit` on that token-auth head.

The head is the test's own (`ray start --head` on 127.0.0.1, its own ports, temp dir and HOME; the
`private_head` fixture) and teardown stops exactly that head. `ray stop` is not used: it stops every
Ray process of the user on the machine, including other sessions' clusters.
"""

from __future__ import annotations

import pytest
from ray_helpers import submit_job, tiny_job_config

from raysseg.config import load_config
from raysseg.data.manifest import write_manifest
from raysseg.data.sources import voc_records
from raysseg.engine.checkpoint import save_checkpoint
from raysseg.model.network import build_model
from raysseg.rundir import layout

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


def test_job_submit_runs_a_ray_data_job_without_auth(private_head, tiny_data, tmp_path) -> None:
    # A head with auth disabled, and a short Ray Data job: `raysseg evaluate` (an actor pool) of
    # a saved checkpoint. The pipeline as a job runs on the token-auth head of test_faults.py.
    config_path = tiny_job_config(tmp_path, tiny_data)
    config = load_config(config_path)
    write_manifest(
        voc_records(config.data.root, "val"), layout.dataset_manifest(config.run_dir, "val")
    )
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model(config.model))
    command = ["evaluate", "--config", str(config_path), "--checkpoint", str(checkpoint)]
    head = private_head("disabled")
    submitted = submit_job(head, [*command, "--single-scale", "--no-crf"])
    assert "mIoU" in submitted.stdout, submitted.stdout[-3000:]
