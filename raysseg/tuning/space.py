"""Tuning search spaces in the config's dotted keys, and the settings of a campaign. Pure: no Ray.

A space file is YAML with two sections:

    space:                                  # dotted config keys -> a range or a list of choices
      stages.count: [1, 4]                  # two ints: an int range (bounds included)
      labels.cam_threshold: [0.05, 0.5]     # two numbers, one a float: uniform
      loss.w_sal: loguniform(0.1, 10)       # also uniform(a, b), int(a, b), choice([...])
    tune:                                   # how the campaign runs (every key optional)
      objectives: [val_miou]                # or two, e.g. [val_miou, gpu_hours] (multi-objective)
      trial_overrides: {optim.epochs: 2}    # fixed settings that shorten every trial
      ...

Every key is checked against the config before any trial starts: an unknown key, a bound outside the
key's valid range or a float range on an int key is a ConfigError naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysseg.config import Config, ConfigError, read_yaml, to_flat_dict, with_overrides

# What each objective measures and which way is better. The metrics are what a trial reports after
# every stage: single-scale val mIoU, pseudo-label mIoU, GPU-hours spent so far, stages finished.
OBJECTIVES: dict[str, str] = {
    "val_miou": "max",
    "label_miou": "max",
    "gpu_hours": "min",
    "stages": "min",
}
SCHEDULERS = ("asha", "none")
_FUNCTION = re.compile(r"^\s*(uniform|loguniform|int|choice)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Param:
    """One searched key: an int or float range (optionally log-scaled) or a list of choices."""

    key: str
    kind: str  # "int" | "float" | "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice({list(self.choices)})"
        scale = "log" if self.log else ""
        return f"{scale}{self.kind}({self.low}, {self.high})"


@dataclass(frozen=True)
class TuneSettings:
    objectives: tuple[str, ...] = ("val_miou",)
    scheduler: str = "asha"  # asha | none (always none with two objectives: ASHA ranks by one)
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each stage
    max_concurrent: int = 2  # trials running at once
    trial_cpus: float = 0.1  # the trial's own driver loop; its Train workers and actors ask apart
    seed: int = 0
    max_failures: int = 1  # reruns of a failed trial (it resumes its run directory's steps)
    final_eval: bool = False  # run the costly multi-scale + CRF evaluation at the end of a trial
    trial_overrides: dict[str, Any] = field(default_factory=dict)  # shorten every trial
    start_points: tuple[dict[str, Any], ...] = ()  # tried first (e.g. the paper's settings)
    # The Optuna study: "" = a journal file in the (local) campaign folder; else an RDB URL
    # (sqlite:///..., postgresql://...) or a journal file path that every driver node reaches.
    storage: str = ""

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(OBJECTIVES[name] for name in self.objectives)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


@dataclass(frozen=True)
class TuneSpace:
    params: tuple[Param, ...]
    settings: TuneSettings

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.params)

    def max_stages(self, base: Config) -> int:
        """The largest stage count a trial can run (ASHA's budget axis)."""
        for param in self.params:
            if param.key == "stages.count":
                return int(max(param.choices) if param.kind == "choice" else param.high)
        return int(self.settings.trial_overrides.get("stages.count", base.stages.count))


def load_space(path: str | Path, base: Config) -> TuneSpace:
    """Read and check a space file against `base`; errors name the file, the key and the value."""
    tree = read_yaml(path)
    unknown = sorted(set(tree) - {"space", "tune"})
    if unknown:
        raise ConfigError(f"tune space '{path}': unknown section(s) {unknown} (known: space, tune)")
    try:
        return parse_space(tree.get("space") or {}, tree.get("tune") or {}, base)
    except ConfigError as error:
        raise ConfigError(f"tune space '{path}': {error}") from error


def parse_space(space: dict[str, Any], tune: dict[str, Any], base: Config) -> TuneSpace:
    if not isinstance(space, dict) or not space:
        raise ConfigError("section 'space': expected a mapping of dotted keys to ranges")
    params = tuple(check_param(parse_param(key, value), base) for key, value in space.items())
    settings = parse_settings(tune, base, params)
    return TuneSpace(params=params, settings=settings)


def parse_param(key: str, value: Any) -> Param:
    """`[lo, hi]`, `uniform(a, b)`, `loguniform(a, b)`, `int(a, b)` or `choice([...])` -> Param."""
    if isinstance(value, list):
        return _range(key, value, value)
    if isinstance(value, str):
        match = _FUNCTION.match(value)
        if match:
            name, inner = match.groups()
            try:
                args = yaml.safe_load(f"[{inner}]")
            except yaml.YAMLError:
                args = None
            if name == "choice":
                if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], list)):
                    raise ConfigError(
                        f"space key '{key}': expected choice([a, b, ...]), got {value!r}"
                    )
                if not args[0]:
                    raise ConfigError(f"space key '{key}': choice() needs at least one value")
                return Param(key=key, kind="choice", choices=tuple(args[0]))
            if isinstance(args, list):
                return _range(key, args, value, kind=name)
    raise ConfigError(
        f"space key '{key}': {value!r} is not a range; use [lo, hi], uniform(a, b), "
        "loguniform(a, b), int(a, b) or choice([...])"
    )


def _range(key: str, bounds: list, value: Any, kind: str = "") -> Param:
    bounds = [_as_number(b) for b in bounds]
    numbers = all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
    if len(bounds) != 2 or not numbers:
        raise ConfigError(f"space key '{key}': expected two numbers (low, high), got {value!r}")
    low, high = bounds
    if not low < high:
        raise ConfigError(f"space key '{key}': need low < high, got {value!r}")
    if kind == "int" or (not kind and all(isinstance(b, int) for b in bounds)):
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"space key '{key}': int() needs whole numbers, got {value!r}")
        return Param(key=key, kind="int", low=int(low), high=int(high))
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"space key '{key}': loguniform needs low > 0, got {value!r}")
    return Param(key=key, kind="float", low=float(low), high=float(high), log=kind == "loguniform")


def _as_number(value: Any) -> Any:
    # YAML reads 1e-4 (no dot) as a string; numbers written that way are still numbers here.
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def check_param(param: Param, base: Config) -> Param:
    """The key must exist, take numbers for a range, and accept both bounds (or every choice)."""
    flat = to_flat_dict(base)
    if param.key == "run_dir":
        raise ConfigError("space key 'run_dir': the campaign sets each trial's run directory")
    if param.key not in flat:
        # with_overrides names the section's known keys in its message.
        with_overrides(base, {param.key: None})
    default = flat[param.key]
    if param.kind != "choice":
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise ConfigError(
                f"space key '{param.key}': a range needs a numeric key ({type(default).__name__} "
                f"here); use choice([...])"
            )
        if isinstance(default, int) and param.kind == "float":
            raise ConfigError(
                f"space key '{param.key}': takes ints, got the float range {param.describe()}"
            )
    values = param.choices if param.kind == "choice" else (param.low, param.high)
    for value in values:
        try:
            with_overrides(base, {param.key: value})
        except ConfigError as error:
            raise ConfigError(
                f"space key '{param.key}': value {value!r} refused: {error}"
            ) from error
    return param


def parse_settings(tune: dict[str, Any], base: Config, params: tuple[Param, ...]) -> TuneSettings:
    if not isinstance(tune, dict):
        raise ConfigError("section 'tune': expected a mapping")
    names = {f.name for f in dataclasses.fields(TuneSettings)}
    unknown = sorted(set(tune) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {['tune.' + k for k in unknown]} (known: {sorted(names)})"
        )
    defaults = TuneSettings()
    objectives = tune.get("objectives", list(defaults.objectives))
    objectives = [objectives] if isinstance(objectives, str) else objectives
    if (
        not isinstance(objectives, list)
        or not 1 <= len(objectives) <= 2
        or any(o not in OBJECTIVES for o in objectives)
    ):
        raise ConfigError(
            f"key 'tune.objectives': expected one or two of {sorted(OBJECTIVES)}, got {objectives!r}"
        )
    settings = TuneSettings(
        objectives=tuple(objectives),
        scheduler=_choice("tune.scheduler", tune.get("scheduler", defaults.scheduler), SCHEDULERS),
        reduction_factor=_number("tune.reduction_factor", tune, defaults.reduction_factor, 1.0),
        max_concurrent=int(_number("tune.max_concurrent", tune, defaults.max_concurrent, 0.0)),
        trial_cpus=_number("tune.trial_cpus", tune, defaults.trial_cpus, 0.0),
        seed=int(_number("tune.seed", tune, defaults.seed, -1.0)),
        max_failures=int(_number("tune.max_failures", tune, defaults.max_failures, -1.0)),
        final_eval=bool(tune.get("final_eval", defaults.final_eval)),
        trial_overrides=_trial_overrides(tune.get("trial_overrides") or {}, base, params),
        start_points=_start_points(tune.get("start_points") or [], base, params),
        storage=_study_storage(tune.get("storage", defaults.storage)),
    )
    return settings


# Databases Optuna's RDBStorage (SQLAlchemy) opens, by URL scheme (a "+driver" suffix allowed).
STUDY_DATABASES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def _study_storage(value: Any) -> str:
    """`tune.storage`: an RDB URL of a known database, or a path; an object-store URI is refused
    (Optuna's journal is a local file)."""
    if not isinstance(value, str):
        raise ConfigError(f"key 'tune.storage': expected a URL or a path, got {value!r}")
    if "://" in value and value.split("://", 1)[0].split("+", 1)[0] not in STUDY_DATABASES:
        raise ConfigError(
            f"key 'tune.storage': {value!r} is neither a database URL "
            f"({', '.join(f'{name}://' for name in STUDY_DATABASES)}) nor a path; an object store "
            "cannot hold an Optuna study"
        )
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"key '{key}': {value!r} is not one of {choices}")
    return value


def _number(key: str, tree: dict[str, Any], default: float, above: float) -> float:
    value = tree.get(key.split(".", 1)[1], default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > above:
        raise ConfigError(f"key '{key}': expected a number > {above:g}, got {value!r}")
    return float(value)


def _trial_overrides(
    overrides: dict[str, Any], base: Config, params: tuple[Param, ...]
) -> dict[str, Any]:
    if not isinstance(overrides, dict):
        raise ConfigError(f"key 'tune.trial_overrides': expected a mapping, got {overrides!r}")
    searched = sorted(set(overrides) & {p.key for p in params})
    if searched:
        raise ConfigError(f"key 'tune.trial_overrides': {searched} are also searched in 'space'")
    if "run_dir" in overrides:
        raise ConfigError("key 'tune.trial_overrides': run_dir is set by the campaign")
    try:
        with_overrides(base, overrides)
    except ConfigError as error:
        raise ConfigError(f"key 'tune.trial_overrides': {error}") from error
    return dict(overrides)


def _start_points(
    points: list, base: Config, params: tuple[Param, ...]
) -> tuple[dict[str, Any], ...]:
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"key 'tune.start_points': expected a list of mappings, got {points!r}")
    by_key = {p.key: p for p in params}
    for point in points:
        for key, value in point.items():
            if key not in by_key:
                raise ConfigError(f"key 'tune.start_points': '{key}' is not a searched key")
            if not in_domain(by_key[key], value):
                raise ConfigError(
                    f"key 'tune.start_points': {key}={value!r} is outside {by_key[key].describe()}"
                )
    return tuple(dict(p) for p in points)


def in_domain(param: Param, value: Any) -> bool:
    if param.kind == "choice":
        return value in param.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if param.kind == "int" and not float(value).is_integer():
        return False
    return param.low <= value <= param.high


def trial_config(
    base: Config, params: dict[str, Any], settings: TuneSettings, run_dir: str
) -> Config:
    """The config a trial runs: base + the shortening overrides + the trial's own values."""
    return with_overrides(base, {**settings.trial_overrides, **params, "run_dir": run_dir})


def best_config(base: Config, params: dict[str, Any], run_dir: str) -> Config:
    """The full (not shortened) pipeline with the best trial's values."""
    return with_overrides(base, {**params, "run_dir": run_dir})


__all__ = [
    "OBJECTIVES",
    "SCHEDULERS",
    "STUDY_DATABASES",
    "Param",
    "TuneSettings",
    "TuneSpace",
    "best_config",
    "check_param",
    "in_domain",
    "load_space",
    "parse_param",
    "parse_settings",
    "parse_space",
    "trial_config",
]
