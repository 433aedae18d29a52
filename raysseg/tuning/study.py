"""A campaign's search state on disk: its definition, the trials it started, the Optuna study.

`campaign.json` (base config + space) is written first and a rerun with other settings is refused;
each trial writes its values (`trial.json`) before its first step. The study (a JournalStorage
file, or an RDB database named by `tune.storage`) is not the record: every start rebuilds it from
the results table (`rebuild_study`), then queues the trials that started but are not in the table,
with their old values and run names.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from raysseg import storage
from raysseg.config import RESUMABLE_KEYS, Config, ConfigError, to_flat_dict
from raysseg.rundir import campaign as campaign_layout
from raysseg.rundir import layout
from raysseg.tuning.results import finite_or_none, objective_values
from raysseg.tuning.space import Param, TuneSettings, TuneSpace

STUDY_NAME = "raysseg"


def check_campaign(campaign: str, base: Config, space: TuneSpace) -> None:
    """Write what defines the campaign first; refuse to continue it with a different definition."""
    settings = space.settings
    definition = {
        "base": {k: v for k, v in to_flat_dict(base).items() if not k.startswith(RESUMABLE_KEYS)},
        "space": {p.key: p.describe() for p in space.params},
        "objectives": list(settings.objectives),
        "trial_overrides": {
            k: v for k, v in settings.trial_overrides.items() if not k.startswith(RESUMABLE_KEYS)
        },
        "final_eval": settings.final_eval,
    }
    definition = json.loads(json.dumps(definition, default=list))
    path = campaign_layout.definition_file(campaign)
    if storage.exists(path):
        saved = json.loads(storage.read_bytes(path))
        changed = _changed(saved, definition)
        if changed:
            raise ConfigError(
                f"campaign '{campaign}' was started with other settings (differs in "
                f"{', '.join(changed)}); use a new run_dir or the same config and space"
            )
        return
    storage.makedirs(campaign)
    storage.write_bytes_atomic(path, json.dumps(definition, indent=2).encode())


def _changed(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    changed = []
    for section, value in current.items():
        old = saved.get(section)
        if isinstance(value, dict) and isinstance(old, dict):
            keys = set(value) | set(old)
            changed += [f"{section}: {k}" for k in sorted(keys) if old.get(k) != value.get(k)]
        elif old != value:
            changed.append(section)
    return changed


def distributions(params: tuple[Param, ...]) -> dict[str, Any]:
    """The Optuna distributions of the space (what `_DefineByRun` suggests from)."""
    result: dict[str, Any] = {}
    for param in params:
        if param.kind == "choice":
            result[param.key] = CategoricalDistribution(list(param.choices))
        elif param.kind == "int":
            result[param.key] = IntDistribution(int(param.low), int(param.high))
        else:
            result[param.key] = FloatDistribution(param.low, param.high, log=param.log)
    return result


def study_location(campaign: str, settings: TuneSettings) -> str:
    """Where the campaign's Optuna study lives: `tune.storage` (an RDB URL or a journal file path),
    else the journal file in a local campaign folder. A campaign on object storage needs
    `tune.storage`: Optuna's journal is a local file and an object store cannot hold it."""
    if settings.storage:
        return settings.storage
    if storage.is_uri(campaign):
        raise ConfigError(
            f"campaign '{campaign}' is on object storage, so its Optuna study needs a home every "
            "driver reaches: set 'tune.storage' in the space file to an RDB URL "
            "(sqlite:///path/study.db on a shared volume, postgresql://user@host/db, ...)"
        )
    return campaign_layout.study_journal(campaign)


def is_rdb_url(location: str) -> bool:
    """Whether a study location is a database URL (else a journal file path)."""
    return "://" in location  # `tune.storage` admits no other URLs (tuning.space._study_storage)


def _storage(location: str) -> optuna.storages.BaseStorage:
    if is_rdb_url(location):
        return RDBStorage(location)
    return JournalStorage(JournalFileBackend(location))


def open_study(campaign: str, location: str = "") -> optuna.Study:
    """The campaign's Optuna study (for inspection: trials, values, importances). `location`: the
    space file's `tune.storage` when it set one."""
    location = study_location(campaign, TuneSettings(storage=location))
    return optuna.load_study(study_name=STUDY_NAME, storage=_storage(location))


def rebuild_study(
    campaign: str,
    space: TuneSpace,
    rows: list[dict[str, Any]],
    pending: dict[str, dict[str, Any]],
) -> optuna.storages.BaseStorage:
    """A fresh study holding exactly the finished trials of the table, then the queue.

    Trials told to the previous study but missing from the table (the driver died in between) are
    dropped with it: the table is the record, and they are rerun. A journal is built under a
    temporary name and moved into place, so a crash here leaves the previous journal intact; an
    RDB study is deleted and created again under its name (a crash in between leaves a partial
    study, which the next start rebuilds the same way).
    """
    settings = space.settings
    location = study_location(campaign, settings)
    directions = ["maximize" if m == "max" else "minimize" for m in settings.modes]
    if is_rdb_url(location):
        rdb = _storage(location)
        if STUDY_NAME in optuna.get_all_study_names(storage=rdb):
            optuna.delete_study(study_name=STUDY_NAME, storage=rdb)
        study = optuna.create_study(storage=rdb, study_name=STUDY_NAME, directions=directions)
        _fill_study(study, space, rows, pending)
        return rdb
    os.makedirs(os.path.dirname(os.path.abspath(location)), exist_ok=True)
    building = f"{location}.building"
    if os.path.exists(building):
        os.remove(building)
    study = optuna.create_study(
        storage=_storage(building), study_name=STUDY_NAME, directions=directions
    )
    _fill_study(study, space, rows, pending)
    os.replace(building, location)
    return _storage(location)


def _fill_study(
    study: optuna.Study,
    space: TuneSpace,
    rows: list[dict[str, Any]],
    pending: dict[str, dict[str, Any]],
) -> None:
    settings = space.settings
    spaces = distributions(space.params)
    for row in rows:
        study.add_trial(_frozen_trial(row, spaces, settings))
    for name in sorted(pending):
        study.enqueue_trial(pending[name], user_attrs={"run_name": name})
    tried = [row["params"] for row in rows] + list(pending.values())
    for point in settings.start_points:
        if not any(_holds(values, point) for values in tried):
            study.enqueue_trial(point)


def _holds(values: dict[str, Any], point: dict[str, Any]) -> bool:
    """Whether a trial's values include the start point's (a point names only some keys, so
    Optuna's own skip_if_exists, which compares whole key sets, never matches it)."""
    return all(
        key in values
        and (
            math.isclose(float(values[key]), float(value), rel_tol=0.0, abs_tol=1e-12)
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else values[key] == value
        )
        for key, value in point.items()
    )


def _frozen_trial(
    row: dict[str, Any], spaces: dict[str, Any], settings: TuneSettings
) -> optuna.trial.FrozenTrial:
    values = objective_values(row, settings)
    intermediate = None
    if not settings.multi_objective:
        per_stage = row.get(f"{settings.objectives[0]}_per_stage") or []
        intermediate = {
            step: v
            for step, value in enumerate(per_stage, start=1)
            if (v := finite_or_none(value)) is not None
        }
    return optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE if values else optuna.trial.TrialState.FAIL,
        values=values,
        params=row["params"],
        distributions={k: spaces[k] for k in row["params"] if k in spaces},
        intermediate_values=intermediate,
        user_attrs={"run_name": row["trial"]},
    )


def trial_dirs(campaign: str) -> set[str]:
    """Names of the trial run directories under the campaign (started trials, finished or not)."""
    return set(storage.list_dirs(campaign_layout.trials_dir(campaign)))


def written_trials(campaign: str) -> set[str]:
    """Trial directories that hold a trial's values or config: their names are never reused.

    A folder with neither was made by a trial killed before its values were written (nothing of it
    ran), so its name is free again and the campaign's names stay trial_0000 ... trial_N-1.
    """
    names = set()
    for name in trial_dirs(campaign):
        run_dir = campaign_layout.trial_run_dir(campaign, name)
        files = (campaign_layout.trial_values_file(run_dir), layout.config_file(run_dir))
        if any(storage.exists(path) for path in files):
            names.add(name)
    return names


class TrialNames:
    """trial_0000, trial_0001, ...: the lowest name no finished or started trial holds.

    Lowest, not next after the count: a rerun whose cut-off trial is trial_0003 while trial_0002
    never started must name its next trial trial_0002.
    """

    def __init__(self, taken: set[str]) -> None:
        self.taken = set(taken)

    def next(self) -> str:
        index = 0
        while campaign_layout.trial_name(index) in self.taken:
            index += 1
        name = campaign_layout.trial_name(index)
        self.taken.add(name)
        return name


def interrupted_trials(campaign: str, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{run name: values} of trials that started (trial.json written) but are not in the table."""
    finished = {row["trial"] for row in rows}
    pending = {}
    for name in sorted(trial_dirs(campaign) - finished):
        values_file = campaign_layout.trial_values_file(
            campaign_layout.trial_run_dir(campaign, name)
        )
        if storage.exists(values_file):
            pending[name] = json.loads(storage.read_bytes(values_file))["params"]
    return pending


def write_trial_values(run_dir: str, name: str, params: dict[str, Any]) -> None:
    """A trial's values in its run directory, before anything else of it (its config, its first
    step): a driver killed mid-trial re-queues the trial with them (`interrupted_trials`)."""
    storage.write_bytes_atomic(
        campaign_layout.trial_values_file(run_dir),
        json.dumps({"run_name": name, "params": params}, indent=2).encode(),
    )


__all__ = [
    "STUDY_NAME",
    "TrialNames",
    "check_campaign",
    "distributions",
    "interrupted_trials",
    "is_rdb_url",
    "open_study",
    "rebuild_study",
    "study_location",
    "trial_dirs",
    "write_trial_values",
    "written_trials",
]
