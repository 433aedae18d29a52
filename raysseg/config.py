"""Typed, frozen run configuration.

One `Config` holds every setting of a run, in sections at most two levels deep. It is built from
defaults, then a preset, then a YAML file, then dotted overrides ("optim.lr=0.01"), in that order.
The same dotted keys serve the CLI, the job configs and the Tune search spaces.
Unknown keys, wrong types and out-of-range values are errors that name the key.
One file of about 500 lines: the sections and the checks of their values sit together, so that
each key's default, type and valid range are read in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysseg.errors import InputError

IGNORE_INDEX = 255


class ConfigError(InputError):
    """A configuration key, type or value is wrong; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet38d"  # resnet38d | resnet50 | resnet101 | efficientnet_lite0 | small
    output_stride: int = 8  # 8 or 16 (resnets, efficientnet_lite0); resnet38d and small are 8
    # Backbone weights: a path or URI (.pth / .params / raysseg checkpoint), "torchvision" (resnet50/101,
    # network), "none" (random, on purpose); empty: the backbone's default, refused for the ResNets.
    pretrained: str = ""
    num_classes: int = 21  # including background
    affinity_temperature: float = 1.0  # divides theta.phi^T before the row softmax
    affinity_memory_mb: int = 256  # budget for N x N tensors at inference (chunked products)
    small_width: int = 64  # channels of the small test/demo backbone


@dataclass(frozen=True)
class DataConfig:
    source: str = "voc"  # voc | coco | folder
    root: str = ""  # dataset root (local path or URI)
    train_split: str = "train_aug"
    val_split: str = "val"
    class_names: str = ""  # file with one class name per line; "" = the source's default
    # Image labels: CSV/Parquet `image_id,labels` (folder source; VOC too) or PSA/AuxSegNet's
    # cls_labels.npy (VOC). Given for VOC, it is the label source of every training image.
    labels_file: str = ""
    # GT masks <id>.png (e.g. SegmentationClassAug), relative to root or a path/URI;
    # "" = VOC's SegmentationClass (folder source: no masks)
    mask_dir: str = ""
    coco_annotations: str = ""  # COCO: instances_*.json of the train split
    coco_val_annotations: str = ""
    # auto = the folder (saliency_dir, or root/saliency for VOC) when there is one, else u2netp
    saliency: str = "auto"  # auto | folder | u2netp | spectral
    saliency_dir: str = ""  # folder of grey PNGs <id>.png (saliency=folder / auto)
    saliency_model: str = ""  # saliency=u2netp: an ONNX file; "" = rembg's packaged u2netp.onnx
    subset: int = 0  # use only the first N training records (0 = all)
    crop_size: int = 321
    scale_min: float = 0.7
    scale_max: float = 1.3
    flip: bool = True
    color_jitter: float = 0.3  # brightness/contrast/saturation strength; 0 disables
    num_workers: int = 2  # decode workers per training process


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    batch_size: int = 4
    epochs: int = 10  # per stage
    warmup_epochs: int = 15  # stage 0a, classifier only
    warmup_lr: float = 0.0  # base lr of stage 0a; 0 = optim.lr (the paper does not set it apart)
    amp: bool = True  # mixed precision when running on CUDA
    seed: int = 0


@dataclass(frozen=True)
class LossConfig:
    w_cls: float = 1.0
    w_sal: float = 1.0
    w_seg: float = 1.0


@dataclass(frozen=True)
class LabelsConfig:
    cam_threshold: float = 0.2
    sal_threshold: float = 0.06
    sal_binarize: float = 0.5  # S = saliency pseudo label > 0.5 for the BCE target
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    cam_flip: bool = True
    crf_tau: float = 1.05
    sal_crf_gauss_sxy: float = 3.0
    sal_crf_gauss_compat: float = 3.0
    sal_crf_bilateral_sxy: float = 60.0
    sal_crf_bilateral_srgb: float = 5.0
    sal_crf_bilateral_compat: float = 5.0
    sal_crf_iterations: int = 1
    # M~ = A_CT . M in the label update (METHOD.md). False keeps the CAM M as it is: an ablation
    # for schedules too short for A_CT to become selective (see BENCHMARKS.md, real pixels).
    propagate_cams: bool = True


@dataclass(frozen=True)
class EvalConfig:
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    flip: bool = True
    fuse: str = "max"  # max | mean
    crf: bool = True
    crf_gauss_sxy: float = 4.0
    crf_gauss_compat: float = 3.0
    crf_bilateral_sxy: float = 83.0
    crf_bilateral_srgb: float = 5.0
    crf_bilateral_compat: float = 3.0
    crf_iterations: int = 10


@dataclass(frozen=True)
class StagesConfig:
    count: int = 4  # stages 0..count-1, each train -> update labels


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    refine_actors: int = 1  # inference actors in the label update
    refine_batch_size: int = 4
    refine_cpus_per_actor: float = 1.0
    refine_gpus_per_actor: float = 0.0
    crf_cpus: float = 1.0  # CPUs per CRF/fusion task
    # Where the label update's CRF + fusion + PNG writes run: "tasks" (separate CPU tasks, so GPU
    # actors never wait on CRFs), "actors" (inside the inference actors: no hand-off between
    # processes) or "auto" (actors when they have no GPU and no crf_custom pins the CRFs elsewhere).
    crf_placement: str = "auto"
    # Custom Ray resources, "name=amount,name=amount" (e.g. "crf_node=0.01"): pin each kind of work to
    # the nodes that advertise the resource, so CPU-bound CRFs never occupy GPU nodes.
    train_custom: str = ""  # per Ray Train worker
    refine_custom: str = ""  # per label-inference actor
    crf_custom: str = ""  # per CRF/fusion task
    # How long to wait for a node advertising a custom resource above (an autoscaler is asked for
    # one) before failing with an error that names the key; 0 = fail at once.
    placement_wait_s: float = 300.0
    # Fraction of a split's items (manifest step) or of a label update's images that may fail.
    error_budget: float = 0.01
    max_failures: int = 2  # Ray Train restarts of a stage after a worker / node failure
    progress_seconds: float = 10.0  # how often long work prints done/total, rate, errors, ETA
    # Ray Train checkpoints kept per training stage (each holds weights and optimizer state: close
    # to 1 GB for ResNet-38); the stage's final weights are kept apart, where the next step reads them.
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


# Presets are dotted overrides on top of the defaults (which are the paper's settings).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # The reference code's effective optimiser: positional arguments put 1e-5 into momentum and
    # leave weight decay at 0; 7e-4 base lr and 15 epochs per stage.
    "reference": {
        "optim.lr": 7e-4,
        "optim.momentum": 1e-5,
        "optim.weight_decay": 0.0,
        "optim.epochs": 15,
        "data.color_jitter": 0.0,
    },
}

_CHOICES: dict[str, tuple[Any, ...]] = {
    "model.backbone": ("resnet38d", "resnet50", "resnet101", "efficientnet_lite0", "small"),
    "model.output_stride": (8, 16),
    "data.source": ("voc", "coco", "folder"),
    "data.saliency": ("auto", "folder", "u2netp", "spectral"),
    "eval.fuse": ("max", "mean"),
    "resources.crf_placement": ("auto", "tasks", "actors"),
}
_UNIT_INTERVAL = (
    "labels.cam_threshold",
    "labels.sal_threshold",
    "labels.sal_binarize",
    "resources.error_budget",
    "data.color_jitter",
)
_POSITIVE = (
    "optim.lr",
    "optim.batch_size",
    "optim.head_lr_mult",
    "data.crop_size",
    "model.num_classes",
    "model.affinity_temperature",
    "model.affinity_memory_mb",
    "model.small_width",
    "stages.count",
    "resources.num_workers",
    "resources.refine_actors",
    "resources.refine_batch_size",
    "resources.keep_checkpoints",  # at least the last one: a restart resumes from it
    "labels.crf_tau",
)
_NON_NEGATIVE = (
    "optim.momentum",
    "optim.weight_decay",
    "optim.warmup_lr",
    "optim.epochs",
    "optim.warmup_epochs",
    "data.subset",
    "data.num_workers",
    "resources.cpus_per_worker",
    "resources.gpus_per_worker",
    "resources.refine_cpus_per_actor",
    "resources.refine_gpus_per_actor",
    "resources.crf_cpus",
    "resources.progress_seconds",
    "resources.max_failures",
    "resources.placement_wait_s",
)
_CUSTOM_RESOURCES = ("resources.train_custom", "resources.refine_custom", "resources.crf_custom")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, expected: Any) -> Any:
    """Return `value` as `expected`, or raise ConfigError naming the key."""
    if typing.get_origin(expected) is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list of numbers, got {value!r}")
        (item_type, _) = typing.get_args(expected)
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}': expected bool, got {value!r}")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected int, got {value!r}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected float, got {value!r}")
    if expected is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected str, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {expected}")


def _apply(config: Config, updates: dict[str, Any]) -> Config:
    """Apply {"section.key": value} updates (already flattened) to a config."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    top_types = _field_types(Config)
    for key, value in updates.items():
        parts = key.split(".")
        if parts[0] not in top_types:
            raise ConfigError(f"unknown config key '{key}' (sections: {', '.join(top_types)})")
        section_type = top_types[parts[0]]
        if not dataclasses.is_dataclass(section_type):
            if len(parts) != 1:
                raise ConfigError(f"unknown config key '{key}'")
            top[parts[0]] = _coerce(key, value, section_type)
            continue
        if len(parts) != 2:
            raise ConfigError(f"config key '{key}': expected '{parts[0]}.<name>'")
        names = _field_types(section_type)
        if parts[1] not in names:
            raise ConfigError(
                f"unknown config key '{key}' (known in '{parts[0]}': {', '.join(names)})"
            )
        sections.setdefault(parts[0], {})[parts[1]] = _coerce(key, value, names[parts[1]])
    for name, changes in sections.items():
        top[name] = dataclasses.replace(getattr(config, name), **changes)
    return dataclasses.replace(config, **top)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """["optim.lr=0.01", "stages.count=4"] -> {"optim.lr": 0.01, "stages.count": 4}."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected key=value, e.g. optim.lr=0.01")
        # YAML scalars: "4" -> 4, "1e-3" -> 0.001, "true" -> True, "[1, 0.5]" -> list.
        value = yaml.safe_load(raw) if raw.strip() else ""
        parsed[key.strip()] = raw if value is None else value
    return parsed


def validate(config: Config) -> Config:
    """Check value ranges and choices; raise ConfigError naming the first bad key."""
    flat = to_flat_dict(config)
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"config key '{key}': {flat[key]!r} is not one of {choices}")
    for key in _UNIT_INTERVAL:
        if not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"config key '{key}': {flat[key]!r} is outside [0, 1]")
    for key in _POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {flat[key]!r}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"config key '{key}': must be >= 0, got {flat[key]!r}")
    if config.data.scale_min <= 0 or config.data.scale_min > config.data.scale_max:
        raise ConfigError(
            f"config keys 'data.scale_min'/'data.scale_max': need 0 < min <= max, got "
            f"{config.data.scale_min}, {config.data.scale_max}"
        )
    for key in _CUSTOM_RESOURCES:
        parse_custom_resources(flat[key], key)
    for key in ("labels.cam_scales", "eval.scales"):
        if not flat[key] or any(s <= 0 for s in flat[key]):
            raise ConfigError(f"config key '{key}': need positive scales, got {flat[key]!r}")
    if config.model.backbone in ("resnet38d", "small") and config.model.output_stride != 8:
        raise ConfigError(
            f"config key 'model.output_stride': {config.model.backbone} supports only 8, "
            f"got {config.model.output_stride}"
        )
    return config


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """`config` with {"section.key": value} applied and validated (errors name the key)."""
    return validate(_apply(config, overrides))


def parse_custom_resources(text: str, key: str = "resources") -> dict[str, float]:
    """ "crf_node=0.01, big_mem=1" -> {"crf_node": 0.01, "big_mem": 1.0}; errors name the key."""
    resources: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value < 0:
            raise ConfigError(
                f"config key '{key}': expected 'name=amount,...' with amounts >= 0, got {item!r}"
            )
        resources[name.strip()] = value
    return resources


def load_config(
    path: str | Path | None = None,
    overrides: typing.Iterable[str] | dict[str, Any] = (),
    preset: str = "paper",
) -> Config:
    """Defaults -> preset -> YAML file -> dotted overrides, validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    config = _apply(Config(), PRESETS[preset])
    if path is not None:
        config = _apply(config, flatten(read_yaml(path)))
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return validate(_apply(config, extra))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"config file '{path}': cannot read ({error.strerror})") from error
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}': not valid YAML ({error})") from error
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}': expected a mapping of sections")
    return tree


def to_dict(config: Config) -> dict[str, Any]:
    """Nested plain dict (tuples become lists), for YAML and for handing to Ray workers."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def to_flat_dict(config: Config) -> dict[str, Any]:
    return flatten(dataclasses.asdict(config))


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config from `to_dict` output (workers, checkpoints, saved runs)."""
    return validate(_apply(Config(), flatten(tree)))


def config_from_yaml_text(text: str, where: str) -> Config:
    """Parse a saved config (e.g. a run directory's config.yaml); errors name `where`."""
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{where}': not valid YAML ({error})") from error
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{where}': expected a mapping of sections")
    try:
        return from_dict(tree)
    except ConfigError as error:
        raise ConfigError(f"config file '{where}': {error}") from error


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def config_hash(config: Config, exclude: tuple[str, ...] = ("run_dir",)) -> str:
    """Stable short hash of the settings that change results (a run dir is tied to one)."""
    flat = {k: v for k, v in to_flat_dict(config).items() if k not in exclude}
    payload = json.dumps(flat, sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Settings that may change between reruns of one run directory without invalidating its artifacts.
RESUMABLE_KEYS = ("run_dir", "resources.", "data.num_workers")


def changed_settings(saved: Config, current: Config) -> list[str]:
    """Dotted keys whose values differ, leaving out RESUMABLE_KEYS (sorted)."""
    old, new = to_flat_dict(saved), to_flat_dict(current)
    return sorted(
        key for key in new if old.get(key) != new[key] and not key.startswith(RESUMABLE_KEYS)
    )


def describe_keys() -> list[tuple[str, str, Any]]:
    """(dotted key, type name, default) for every setting, for `raysseg config --keys`."""
    rows = []
    for key, value in to_flat_dict(Config()).items():
        rows.append((key, type(value).__name__, value))
    return rows


__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "RESUMABLE_KEYS",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LabelsConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ResourcesConfig",
    "StagesConfig",
    "changed_settings",
    "config_from_yaml_text",
    "config_hash",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_config",
    "parse_custom_resources",
    "parse_overrides",
    "to_dict",
    "to_flat_dict",
    "validate",
    "with_overrides",
]
