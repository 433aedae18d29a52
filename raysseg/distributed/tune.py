"""Tuning campaigns: Ray Tune runs trials, Optuna (TPE) suggests them, ASHA stops bad ones early.

A trial is a shortened pipeline in its own run directory under the campaign folder; its steps start their
own TorchTrainer and Ray Data jobs (the Ray Train V2 way: no `Tuner(trainer)`), and it reports after every
stage (training_iteration = stages finished), so ASHA decides at stage boundaries.

Resume keeps the search history: every finished trial is a row of `results.parquet` (written atomically by
the driver when the trial ends). Each start rebuilds the Optuna study (a JournalStorage file) from that
table, re-queues the trials that were running when the driver died (same values, same run directory, so
their finished steps are skipped), and runs only the trials still missing. Ray's own `Tuner.restore` is not
used: it drops the searcher's state.

campaign/                        = the base config's run_dir
  campaign.json                  base config + space, written first; a rerun with others is refused
  results.parquet                one row per finished trial (values, status, per-stage metrics)
  optuna/study.journal           the Optuna study (JournalStorage)
  trials/trial_NNNN/             a pipeline run directory per trial, with trial.json (its values)
  shared/warmup_<hash>/          a warm-up run shared by every trial with the same warm-up settings
  ray_tune/session_N/            Ray Tune's own folders, one per start of the command
  best.yaml                      the best trial's values on the full (not shortened) base config
  plots/                         objective per trial, parallel coordinates, mIoU per stage (Pareto)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import ray.tune
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raysseg import layout
from raysseg.config import RESUMABLE_KEYS, Config, ConfigError, dump_yaml, to_flat_dict
from raysseg.data import io
from raysseg.distributed.pipeline import (
    is_done,
    plan_steps,
    prepare_run_dir,
    read_result,
    resolve_run_config,
    run_step,
    step_checkpoint,
    write_result,
)
from raysseg.report import plot_campaign
from raysseg.tune_space import (
    Param,
    TuneSettings,
    TuneSpace,
    best_config,
    best_trial,
    finite_or_none,
    format_results,
    objective_values,
    pareto_front,
    step_gpus,
    trial_config,
)

STUDY_NAME = "raysseg"


def print_line(line: str) -> None:
    """The default log: a module function, so Tune can pickle the callbacks that hold it (the
    builtin `print` cannot be pickled once a library has patched it, as Ray Train does)."""
    print(line, flush=True)


RESULTS_FILE = "results.parquet"


def run_campaign(
    base: Config, space: TuneSpace, trials: int, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run (or resume) a campaign until `trials` trials are finished; write the table, best.yaml, plots."""
    log = log or print_line
    campaign = _campaign_dir(base)
    base = resolve_run_config(base, log)  # one saliency prior for every trial, resolved here
    check_campaign(campaign, base, space)
    rows = read_results(campaign)
    remaining = trials - len(rows)
    log(f"campaign {campaign}: {len(rows)} trial(s) finished earlier, {max(0, remaining)} to run")
    if remaining > 0:
        _run_trials(base, space, campaign, rows, remaining, log)
        rows = read_results(campaign)
    if len(rows) < trials:
        log(f"campaign stopped with {len(rows)}/{trials} trials; rerun the command to continue")
    return write_outputs(base, space, campaign, rows, log)


def _campaign_dir(base: Config) -> str:
    if "://" in base.run_dir:
        raise ConfigError(
            f"config key 'run_dir': '{base.run_dir}' is a URI; a campaign folder must be a local or "
            "mounted path (the Optuna study is a journal file)"
        )
    return os.path.abspath(base.run_dir)


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
    path = layout.join(campaign, "campaign.json")
    if io.exists(path):
        saved = json.loads(io.read_bytes(path))
        changed = _changed(saved, definition)
        if changed:
            raise ConfigError(
                f"campaign '{campaign}' was started with other settings (differs in "
                f"{', '.join(changed)}); use a new run_dir or the same config and space"
            )
        return
    io.makedirs(campaign)
    io.write_bytes_atomic(path, json.dumps(definition, indent=2).encode())


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


# ----------------------------------------------------------------------------------------------
# Driver side: study, searcher, scheduler, Tuner


def _run_trials(
    base: Config,
    space: TuneSpace,
    campaign: str,
    rows: list[dict[str, Any]],
    count: int,
    log: Callable[[str], None],
) -> None:
    settings = space.settings
    pending = interrupted_trials(campaign, rows)
    if pending:
        log(f"rerunning {len(pending)} trial(s) cut off earlier: {', '.join(sorted(pending))}")
    storage = rebuild_study(campaign, space, rows, pending)
    names = _RunNames(taken={row["trial"] for row in rows} | set(pending) | _trial_dirs(campaign))
    searcher = OptunaSearch(
        space=_DefineByRun(space.params, names),
        metric=list(settings.objectives) if settings.multi_objective else settings.objectives[0],
        mode=list(settings.modes) if settings.multi_objective else settings.modes[0],
        # A new seed per start: the same seed would replay the first start's random draws.
        sampler=optuna.samplers.TPESampler(seed=settings.seed + len(rows) + len(pending)),
        study_name=STUDY_NAME,
        storage=storage,
    )
    stopped: set[str] = set()
    scheduler = _scheduler(space, base, stopped, log)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, base=base, settings=settings, campaign=campaign),
        {"CPU": settings.trial_cpus},
    )
    tuner = ray.tune.Tuner(
        trainable,
        param_space={},
        tune_config=ray.tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=count,
            max_concurrent_trials=settings.max_concurrent,
        ),
        run_config=ray.tune.RunConfig(
            name=f"session_{_next_session(campaign)}",
            storage_path=layout.join(campaign, "ray_tune"),
            callbacks=[_ResultRecorder(campaign, base, settings, stopped, log)],
            # A failed trial (e.g. a lost worker) is rerun; its finished steps are skipped.
            failure_config=ray.tune.FailureConfig(max_failures=settings.max_failures),
            verbose=1,
        ),
    )
    tuner.fit()


def _scheduler(
    space: TuneSpace, base: Config, stopped: set[str], log: Callable[[str], None]
) -> ASHAScheduler | None:
    settings = space.settings
    if settings.scheduler == "none":
        return None
    if settings.multi_objective:
        log(
            "two objectives: ASHA ranks trials by one metric, so no early stopping in this campaign"
        )
        return None
    max_stages = space.max_stages(base)
    if max_stages < 2:
        return None  # one stage: nothing to stop early
    return _StageASHA(
        stopped=stopped,
        time_attr="training_iteration",
        metric=settings.objectives[0],
        mode=settings.modes[0],
        max_t=max_stages,
        grace_period=1,
        reduction_factor=settings.reduction_factor,
    )


class _StageASHA(ASHAScheduler):
    """ASHA that remembers the trials it stopped, so the table can tell them from finished ones."""

    def __init__(self, stopped: set[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopped = stopped

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP:
            self.stopped.add(trial.trial_id)
        return decision


class _RunNames:
    """trial_0000, trial_0001, ...: never reuses a name of a finished or started trial."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = set(taken)

    def next(self) -> str:
        index = len(self.taken)
        while f"trial_{index:04d}" in self.taken:
            index += 1
        name = f"trial_{index:04d}"
        self.taken.add(name)
        return name


class _DefineByRun:
    """Optuna define-by-run space: suggests every key, and names the trial's run directory.

    A re-queued trial (cut off by a killed driver) carries its old run name as a user attribute,
    so it resumes in its old run directory.
    """

    def __init__(self, params: tuple[Param, ...], names: _RunNames) -> None:
        self.params = params
        self.names = names

    def __call__(self, trial) -> dict[str, Any]:
        for param in self.params:
            if param.kind == "choice":
                trial.suggest_categorical(param.key, list(param.choices))
            elif param.kind == "int":
                trial.suggest_int(param.key, int(param.low), int(param.high))
            else:
                trial.suggest_float(param.key, param.low, param.high, log=param.log)
        name = trial.user_attrs.get("run_name") or self.names.next()
        trial.set_user_attr("run_name", name)
        return {"run_name": name}


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


def study_path(campaign: str) -> str:
    return layout.join(campaign, "optuna", "study.journal")


def open_study(campaign: str) -> optuna.Study:
    """The campaign's Optuna study (for inspection: trials, values, importances)."""
    storage = JournalStorage(JournalFileBackend(study_path(campaign)))
    return optuna.load_study(study_name=STUDY_NAME, storage=storage)


def rebuild_study(
    campaign: str,
    space: TuneSpace,
    rows: list[dict[str, Any]],
    pending: dict[str, dict[str, Any]],
) -> JournalStorage:
    """A fresh study journal holding exactly the finished trials of the table, then the queue.

    The journal is built under a temporary name and moved into place, so a crash here leaves the
    previous journal intact. Trials told to the previous journal but missing from the table (the
    driver died in between) are dropped with it: the table is the record, and they are rerun.
    """
    settings = space.settings
    path = study_path(campaign)
    io.makedirs(os.path.dirname(path))
    building = f"{path}.building"
    if os.path.exists(building):
        os.remove(building)
    study = optuna.create_study(
        storage=JournalStorage(JournalFileBackend(building)),
        study_name=STUDY_NAME,
        directions=["maximize" if m == "max" else "minimize" for m in settings.modes],
    )
    spaces = distributions(space.params)
    for row in rows:
        study.add_trial(_frozen_trial(row, spaces, settings))
    for name in sorted(pending):
        study.enqueue_trial(pending[name], user_attrs={"run_name": name})
    for point in settings.start_points:
        study.enqueue_trial(point, skip_if_exists=True)
    os.replace(building, path)
    return JournalStorage(JournalFileBackend(path))


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


def _trial_dirs(campaign: str) -> set[str]:
    folder = os.path.join(campaign, "trials")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def interrupted_trials(campaign: str, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{run name: values} of trials that started (trial.json written) but are not in the table."""
    finished = {row["trial"] for row in rows}
    pending = {}
    for name in sorted(_trial_dirs(campaign) - finished):
        marker = layout.join(campaign, "trials", name, "trial.json")
        if io.exists(marker):
            pending[name] = json.loads(io.read_bytes(marker))["params"]
    return pending


def _next_session(campaign: str) -> int:
    folder = os.path.join(campaign, "ray_tune")
    return len(os.listdir(folder)) if os.path.isdir(folder) else 0


# ----------------------------------------------------------------------------------------------
# Trial side


def run_trial(trial: dict[str, Any], base: Config, settings: TuneSettings, campaign: str) -> None:
    """One trial: a shortened pipeline in its own run directory, a report after every stage."""
    name = trial["run_name"]
    params = {k: v for k, v in trial.items() if k != "run_name"}
    config = trial_config(base, params, settings, layout.join(campaign, "trials", name))
    prepare_run_dir(config)  # a rerun trial must have the same values as its run directory
    io.write_bytes_atomic(
        layout.join(config.run_dir, "trial.json"),
        json.dumps({"run_name": name, "params": params}, indent=2).encode(),
    )
    share_warmup(warmup_config(base, params, settings, campaign), config, name)
    steps = plan_steps(config, full_supervision=False)
    if not settings.final_eval:
        steps = [step for step in steps if step.name != "final"]
    last_refine = f"stage_{config.stages.count - 1}/refine"
    for index, step in enumerate(steps, start=1):
        run_step(config, step, f"[{name} {index}/{len(steps)}]", print_line)
        stage_ended = step.name.endswith("/refine")
        if step.name == "final" or (
            stage_ended and not (settings.final_eval and step.name == last_refine)
        ):
            ray.tune.report(stage_metrics(config, step_stage(step.name, config)))


# Keys the manifest and warm-up steps never read (the warm-up trains the classifier alone, on image
# labels): trials that differ only in these train the same warm-up, so they share one.
WARMUP_FREE_KEYS = ("labels.", "stages.", "eval.", "loss.w_sal", "loss.w_seg")


def warmup_config(
    base: Config, params: dict[str, Any], settings: TuneSettings, campaign: str
) -> Config:
    """The config of the warm-up a trial shares: its values of the keys the warm-up reads, in a
    folder named by their hash (trials with other warm-up values get another folder)."""
    relevant = {k: v for k, v in params.items() if not k.startswith(WARMUP_FREE_KEYS)}
    config = trial_config(base, relevant, settings, "")
    skipped = RESUMABLE_KEYS + WARMUP_FREE_KEYS
    flat = {k: v for k, v in to_flat_dict(config).items() if not k.startswith(skipped)}
    digest = hashlib.sha1(json.dumps(flat, sort_keys=True, default=list).encode()).hexdigest()
    return dataclasses.replace(
        config, run_dir=layout.join(campaign, "shared", f"warmup_{digest[:12]}")
    )


def share_warmup(shared: Config, trial: Config, name: str) -> None:
    """Run the warm-up once in `shared.run_dir` (a lock file makes concurrent trials wait for
    it), then give `trial` a copy of its checkpoint and its done marker.

    The marker keeps the warm-up's seconds: a trial's GPU-hours stay what it would cost alone.
    """
    if is_done(trial.run_dir, "warmup"):
        return
    with _file_lock(f"{shared.run_dir}.lock"):
        prepare_run_dir(shared)
        for step in plan_steps(shared, full_supervision=False):
            if step.name in ("manifest", "warmup"):
                run_step(shared, step, f"[{name} shared]", print_line)
    checkpoint = step_checkpoint(trial.run_dir, "warmup")
    io.copy_file(step_checkpoint(shared.run_dir, "warmup"), checkpoint)
    result = read_result(shared.run_dir, "warmup")
    write_result(
        trial.run_dir, "warmup", {**result, "checkpoint": checkpoint, "shared": shared.run_dir}
    )


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive flock (campaign folders are local or mounted paths; a killed holder's lock
    is released by the kernel)."""
    io.makedirs(os.path.dirname(path))
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def step_stage(step: str, config: Config) -> int:
    """The stage a reporting step closes: stage_k/refine -> k; final -> the last stage."""
    if step == "final":
        return config.stages.count - 1
    return int(step.split("/")[0].removeprefix("stage_"))


def stage_metrics(config: Config, stage: int) -> dict[str, Any]:
    """What a trial reports after stage `stage` (0-based), read from the run's step markers."""
    run = config.run_dir
    train = read_result(run, f"stage_{stage}/train")
    refine = read_result(run, f"stage_{stage}/refine")
    gpu_seconds = 0.0
    for step in plan_steps(config, full_supervision=False):
        if is_done(run, step.name):
            gpu_seconds += read_result(run, step.name).get("seconds", 0.0) * step_gpus(
                config, step.name
            )
    metrics = {
        "val_miou": train.get("val_miou", float("nan")),
        "label_miou": refine.get("label_miou", float("nan")),
        "stages": stage + 1,
        "stages_planned": config.stages.count,
        "gpu_hours": gpu_seconds / 3600.0,
    }
    if is_done(run, "final"):
        metrics["final_miou"] = read_result(run, "final").get("miou", float("nan"))
    return metrics


# ----------------------------------------------------------------------------------------------
# The results table


class _ResultRecorder(ray.tune.Callback):
    """Appends a row to results.parquet when a trial ends (finished, stopped by ASHA, or failed).

    A trial that ends otherwise (Ctrl-C stops the campaign mid-stage) is not recorded: the next start
    reruns it in its run directory.
    """

    def __init__(
        self,
        campaign: str,
        base: Config,
        settings: TuneSettings,
        stopped: set[str],
        log: Callable[[str], None],
    ) -> None:
        self.campaign = campaign
        self.base = base
        self.settings = settings
        self.stopped = stopped
        self.log = log
        self.history: dict[str, list[dict[str, Any]]] = {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        # Also called when a failed trial is rerun: it reports its stages again from the first.
        self.history[trial.trial_id] = []

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.history.setdefault(trial.trial_id, []).append(dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        history = self.history.get(trial.trial_id, [])
        planned = self._planned(trial.config)
        done = history[-1]["stages"] if history else 0
        if done >= planned:
            self._record(trial.config, history, "completed", planned)
        elif trial.trial_id in self.stopped:
            self._record(trial.config, history, "stopped", planned)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        history = self.history.get(trial.trial_id, [])
        self._record(trial.config, history, "error", self._planned(trial.config))

    def _planned(self, trial: dict[str, Any]) -> int:
        params = {k: v for k, v in trial.items() if k != "run_name"}
        return trial_config(self.base, params, self.settings, "unused").stages.count

    def _record(
        self, trial: dict[str, Any], history: list[dict[str, Any]], status: str, planned: int
    ) -> None:
        last = history[-1] if history else {}
        row = {
            "trial": trial["run_name"],
            "status": status,
            "stages_planned": planned,
            "stages_done": int(last.get("stages", 0)),
            "val_miou": finite_or_none(last.get("val_miou")),
            "label_miou": finite_or_none(last.get("label_miou")),
            "gpu_hours": finite_or_none(last.get("gpu_hours")),
            "stages": int(last.get("stages", 0)),
            "final_miou": finite_or_none(last.get("final_miou")),
            "val_miou_per_stage": [finite_or_none(r.get("val_miou")) for r in history],
            "label_miou_per_stage": [finite_or_none(r.get("label_miou")) for r in history],
            "params": {k: v for k, v in trial.items() if k != "run_name"},
        }
        rows = [r for r in read_results(self.campaign) if r["trial"] != row["trial"]]
        write_results(self.campaign, [*rows, row])
        self.log(
            f"trial {row['trial']} {status} after {row['stages_done']}/{planned} stage(s): "
            f"val mIoU {row['val_miou']}"
        )


def write_results(campaign: str, rows: list[dict[str, Any]]) -> None:
    """The table as Parquet, replaced atomically (readers never see half a table)."""
    records = []
    for row in rows:
        record = {k: v for k, v in row.items() if k != "params"}
        record["params_json"] = json.dumps(row["params"], sort_keys=True)
        record.update({f"param:{k}": _column_value(v) for k, v in row["params"].items()})
        records.append(record)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), sink)
    io.write_bytes_atomic(layout.join(campaign, RESULTS_FILE), sink.getvalue().to_pybytes())


def _column_value(value: Any) -> Any:
    # One Parquet type per column: choices may mix types, so those are written as text.
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def read_results(campaign: str) -> list[dict[str, Any]]:
    path = layout.join(campaign, RESULTS_FILE)
    if not io.exists(path):
        return []
    rows = []
    for record in pq.read_table(path).to_pylist():
        row = {k: v for k, v in record.items() if not k.startswith("param")}
        row["params"] = json.loads(record["params_json"])
        rows.append(row)
    return rows


def write_outputs(
    base: Config,
    space: TuneSpace,
    campaign: str,
    rows: list[dict[str, Any]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Print the table; write best.yaml (full pipeline, best values) and the plots."""
    settings = space.settings
    log(format_results(rows, space.keys))
    best = best_trial(rows, settings)
    outputs: dict[str, Any] = {"campaign": campaign, "rows": rows, "best": best, "best_yaml": None}
    if best is not None:
        config = best_config(base, best["params"], layout.join(campaign, "best_run"))
        outputs["best_yaml"] = layout.join(campaign, "best.yaml")
        io.write_bytes_atomic(outputs["best_yaml"], dump_yaml(config).encode("utf-8"))
        log(
            f"best: {best['trial']} ({settings.objectives[0]} {best[settings.objectives[0]]}); "
            f"run it in full with: raysseg pipeline --config {outputs['best_yaml']}"
        )
    if settings.multi_objective:
        front = pareto_front(rows, settings)
        outputs["pareto"] = [row["trial"] for row in front]
        log(f"Pareto front ({' vs '.join(settings.objectives)}): {', '.join(outputs['pareto'])}")
    if rows:
        plots = layout.join(campaign, "plots")
        io.makedirs(plots)
        outputs["plots"] = plot_campaign(rows, space.keys, settings.objectives, plots)
    return outputs
