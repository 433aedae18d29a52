"""The `raysseg` command line: help, config printing and errors, synthetic data, predict."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from raysseg import cli
from raysseg.cli import main
from raysseg.config import ModelConfig
from raysseg.data import io
from raysseg.engine.checkpoint import save_checkpoint
from raysseg.model.network import build_model


def test_help_lists_the_subcommands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "raysseg", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for command in ("pipeline", "train", "refine", "evaluate", "predict", "demo", "data", "config"):
        assert command in result.stdout


def test_config_prints_resolved_yaml(capsys) -> None:
    assert main(["config", "--preset", "reference", "optim.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 7e-4
    assert printed["optim"]["epochs"] == 3


def test_config_keys_lists_every_setting(capsys) -> None:
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "labels.cam_threshold" in out and "optim.lr" in out


def test_bad_override_exits_2_naming_the_key(capsys) -> None:
    assert main(["config", "optim.lrate=1"]) == 2
    assert "optim.lrate" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "size"), [("synth", "40"), ("composite", "64")])
def test_data_commands_write_a_voc_layout(tmp_path, kind: str, size: str) -> None:
    assert (
        main(["data", kind, "--out", str(tmp_path), "--n", "3", "--n-val", "2", "--size", size])
        == 0
    )
    assert len(list((tmp_path / "JPEGImages").glob("*.jpg"))) == 5
    train_ids = (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(train_ids) == 3


@pytest.mark.parametrize("crf", [False, True])
def test_predict_writes_palette_pngs_and_overlays(tmp_path, crf: bool) -> None:
    model = build_model(ModelConfig(backbone="small", num_classes=4, small_width=8))
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        io.write_png_atomic(
            str(images / f"{name}.png"), rng.integers(0, 255, (30, 42, 3), dtype=np.uint8)
        )
    out = tmp_path / "out"
    arguments = [
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--inputs",
        str(images),
        "--out",
        str(out),
        "model.num_classes=4",
        "eval.scales=[1.0]",
        "eval.crf_iterations=2",
    ]
    assert main([*arguments, *([] if crf else ["--no-crf"])]) == 0
    label = io.read_label(str(out / "a.png"))
    assert label.shape == (30, 42) and label.max() < 4
    assert io.read_image(str(out / "b_overlay.png")).shape == (30, 42, 3)


def test_predict_missing_input_names_it(tmp_path) -> None:
    model = build_model(ModelConfig(backbone="small", num_classes=3, small_width=8))
    save_checkpoint(tmp_path / "m.pt", model)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "m.pt"),
                "--inputs",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "o"),
            ]
        )


def _raising_config_command(error: BaseException):
    def run(args):
        raise error

    return run


def test_an_input_error_is_one_line_and_exit_2_also_when_wrapped(monkeypatch, capsys) -> None:
    from raysseg.data.records import DataError

    # How a Ray worker's error reaches the driver: wrapped, the original as its `cause`.
    wrapped = RuntimeError("ray::MapBatches() failed\nTraceback (most recent call last): ...")
    wrapped.cause = DataError("GT mask 'x.png' is (H, W) = (4, 4), but its image is (8, 8)")
    monkeypatch.setattr(cli, "_cmd_config", _raising_config_command(wrapped))
    assert cli.main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        "raysseg: data error: GT mask 'x.png' is (H, W) = (4, 4), but its image is (8, 8)"
    )
    assert "Traceback" not in err and "--debug" in err
    # --debug: the traceback of the same error, as raised.
    with pytest.raises(RuntimeError, match="MapBatches"):
        cli.main(["--debug", "config"])


def test_any_other_error_keeps_its_traceback(monkeypatch) -> None:
    monkeypatch.setattr(cli, "_cmd_config", _raising_config_command(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.main(["config"])
