"""`raysseg verify RUN_DIR` on a tiny run directory built with the core (no Ray): clean, then defects."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from ray_helpers import tiny_config

from raysseg import storage
from raysseg.cli import main
from raysseg.config import dump_yaml, to_dict
from raysseg.data import io
from raysseg.data.manifest import read_manifest, write_manifest
from raysseg.data.sources import voc_records
from raysseg.data.synth import generate_synthetic
from raysseg.engine.checkpoint import save_checkpoint
from raysseg.model.network import build_model
from raysseg.rundir import layout

N_IMAGES = 6


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """config.yaml, dataset manifest, stage-0 labels + manifest + marker, warm-up checkpoint."""
    data = tmp_path / "synth"
    generate_synthetic(str(data), n_train=N_IMAGES, n_val=0, size=40, seed=2)
    run = tmp_path / "run"
    config = tiny_config(data, run)
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(config))
    records = list(voc_records(str(data), "train"))
    write_manifest(records, layout.dataset_manifest(str(run), "train"))
    labels_root = layout.stage_labels(str(run), 0)
    labelled = []
    for record in records:  # ground-truth labels, as the full-supervision label step writes them
        mask = io.read_label(record.mask_uri)
        seg_uri = layout.label_uri(labels_root, "seg", record.image_id)
        sal_uri = layout.label_uri(labels_root, "sal", record.image_id)
        io.write_png_atomic(sal_uri, ((mask > 0) * 255).astype(np.uint8))
        io.write_png_atomic(seg_uri, mask, palette=io.voc_palette())
        labelled.append(replace(record, seg_label_uri=seg_uri, sal_label_uri=sal_uri))
    write_manifest(labelled, layout.stage_manifest(str(run), 0))
    marker = {"images": N_IMAGES, "errors": 0, "written": N_IMAGES}
    storage.write_bytes_atomic(
        layout.step_marker(str(run), "stage_0/labels"), json.dumps(marker).encode()
    )
    save_checkpoint(
        layout.final_checkpoint(str(run), "warmup"),
        build_model(config.model),
        config_dict=to_dict(config),
    )
    return run


def _verify(run: Path, capsys) -> tuple[int, str]:
    code = main(["verify", str(run)])
    return code, capsys.readouterr().out


def _first_row(run: Path):
    return next(read_manifest(layout.stage_manifest(str(run), 0)))


def test_clean_run_directory_passes(run_dir: Path, capsys) -> None:
    code, out = _verify(run_dir, capsys)
    assert code == 0, out
    assert "0 problem(s)" in out
    assert f"{N_IMAGES} label rows" in out and "1 checkpoints" in out


def test_deleted_label_is_reported(run_dir: Path, capsys) -> None:
    row = _first_row(run_dir)
    Path(row.seg_label_uri).unlink()
    code, out = _verify(run_dir, capsys)
    assert code == 1
    assert f"label of image '{row.image_id}' is missing" in out
    assert f"{N_IMAGES - 1} segmentation label files for {N_IMAGES} manifest rows" in out


def test_wrong_size_label_is_reported(run_dir: Path, capsys) -> None:
    row = _first_row(run_dir)
    io.write_png_atomic(row.seg_label_uri, np.zeros((7, 9), np.uint8), palette=io.voc_palette())
    code, out = _verify(run_dir, capsys)
    assert code == 1
    assert f"label map '{row.seg_label_uri}' is (H, W) = (7, 9)" in out


def test_out_of_range_label_value_is_reported(run_dir: Path, capsys) -> None:
    row = _first_row(run_dir)
    label = io.read_label(row.seg_label_uri)
    label[0, 0] = 17  # 6 classes: ids 0..5 and 255 are valid
    io.write_png_atomic(row.seg_label_uri, label, palette=io.voc_palette())
    code, out = _verify(run_dir, capsys)
    assert code == 1
    assert f"label map '{row.seg_label_uri}' has class id 17" in out


def test_corrupted_checkpoint_is_reported(run_dir: Path, capsys) -> None:
    path = Path(layout.final_checkpoint(str(run_dir), "warmup"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, out = _verify(run_dir, capsys)
    assert code == 1
    assert f"{path}: does not load" in out


def test_edited_config_is_reported(run_dir: Path, capsys) -> None:
    config_file = run_dir / "config.yaml"
    config_file.write_text(
        config_file.read_text().replace("cam_threshold: 0.2", "cam_threshold: 0.4")
    )
    code, out = _verify(run_dir, capsys)
    assert code == 1
    assert "written by another config than config.yaml (differs in labels.cam_threshold)" in out


def test_left_over_temp_file_and_bad_marker_are_reported(run_dir: Path, capsys) -> None:
    row = _first_row(run_dir)
    leftover = Path(row.seg_label_uri).with_name(".x.png.tmp-0123abcd")
    leftover.write_bytes(b"half")
    Path(layout.step_marker(str(run_dir), "warmup")).write_text("{not json")
    code, out = _verify(run_dir, capsys)
    assert code == 1
    assert f"{leftover}: left-over temporary file" in out
    assert "warmup.DONE: done marker is not valid JSON" in out


def test_missing_run_directory_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_verify_command_runs_as_a_module(run_dir: Path) -> None:
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "raysseg", "verify", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
