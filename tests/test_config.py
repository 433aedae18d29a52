"""Config: defaults, presets, YAML, dotted overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from raysseg.config import (
    Config,
    ConfigError,
    config_hash,
    dump_yaml,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)


def test_defaults_are_the_paper_settings() -> None:
    config = load_config()
    assert config.optim.lr == 1e-3 and config.optim.momentum == 0.9
    assert config.optim.weight_decay == 5e-4 and config.optim.head_lr_mult == 10.0
    assert config.labels.cam_threshold == 0.2 and config.labels.sal_threshold == 0.06
    assert config.labels.cam_scales == (1.0, 0.5, 1.5, 2.0)
    assert config.loss.w_cls == config.loss.w_sal == config.loss.w_seg == 1.0


def test_reference_preset_reproduces_the_effective_optimiser() -> None:
    config = load_config(preset="reference")
    assert config.optim.lr == 7e-4
    assert config.optim.momentum < 1e-4
    assert config.optim.weight_decay == 0.0
    assert config.optim.epochs == 15


def test_dotted_overrides_parse_types() -> None:
    config = load_config(
        overrides=["optim.lr=0.01", "stages.count=3", "data.flip=false", "eval.scales=[1, 0.5]"]
    )
    assert config.optim.lr == 0.01
    assert config.stages.count == 3
    assert config.data.flip is False
    assert config.eval.scales == (1.0, 0.5)


def test_yaml_then_overrides(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  backbone: small\noptim:\n  lr: 0.05\n  epochs: 2\n")
    config = load_config(path, overrides=["optim.lr=0.1"])
    assert config.model.backbone == "small"
    assert config.optim.epochs == 2
    assert config.optim.lr == 0.1  # the override wins over the file


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("nosection.x=1", "unknown config key 'nosection.x'"),
        ("optim.epochs=ten", "config key 'optim.epochs': expected int"),
        ("data.flip=maybe", "config key 'data.flip': expected bool"),
        ("optim.lr=-0.1", "config key 'optim.lr': must be > 0"),
        ("stages.count=0", "config key 'stages.count': must be > 0"),
        ("labels.cam_threshold=1.5", "config key 'labels.cam_threshold': 1.5 is outside [0, 1]"),
        ("model.backbone=vgg16", "config key 'model.backbone': 'vgg16' is not one of"),
        ("optim", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert fragment in str(error.value)


def test_unknown_key_in_yaml_names_it(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rate'"):
        load_config(path)


def test_yaml_that_is_not_a_mapping_names_the_file(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml"):
        load_config(path)


def test_yaml_loader_is_safe(tmp_path) -> None:
    # A Python-object tag must not execute anything: the safe loader refuses it.
    path = tmp_path / "evil.yaml"
    path.write_text("run_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_round_trip_through_dict_and_yaml(tmp_path) -> None:
    config = load_config(overrides=["model.backbone=small", "labels.cam_scales=[1, 2]"])
    assert from_dict(to_dict(config)) == config
    path = tmp_path / "saved.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(path) == config


def test_config_hash_tracks_settings_but_not_run_dir() -> None:
    base = Config()
    moved = load_config(overrides=["run_dir=/elsewhere"])
    changed = load_config(overrides=["optim.lr=0.5"])
    assert config_hash(base) == config_hash(moved)
    assert config_hash(base) != config_hash(changed)


def test_parse_overrides_keeps_strings() -> None:
    assert parse_overrides(["data.root=s3://bucket/voc"]) == {"data.root": "s3://bucket/voc"}
