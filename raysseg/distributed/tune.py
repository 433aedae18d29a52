"""Tuning campaigns on Ray: Ray Tune runs trials, Optuna (TPE) suggests them, ASHA stops bad ones early.

A trial is a shortened pipeline in its own run directory under the campaign folder; its steps start their
own TorchTrainer and Ray Data jobs (the Ray Train V2 way: no `Tuner(trainer)`), and it reports after every
stage (training_iteration = stages finished), so ASHA decides at stage boundaries.

Resume keeps the search history: every finished trial is a row of `results.parquet` (written atomically by
the driver when the trial ends). Each start rebuilds the Optuna study (a JournalStorage file) from that
table, re-queues the trials that were running when the driver died (same values, same run directory, so
their finished steps are skipped), and runs only the trials still missing. Ray's own `Tuner.restore` is not
used: it drops the searcher's state. The campaign folder's layout is `raysseg.rundir.campaign`'s; the
study, the table and the space are `raysseg.tuning`'s (pure); this module is the Ray Tune driver.
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
import ray.tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raysseg import storage
from raysseg.config import RESUMABLE_KEYS, Config, to_flat_dict
from raysseg.distributed.pipeline import resolve_run_config, run_step
from raysseg.distributed.storage import train_storage
from raysseg.rundir import campaign as campaign_layout
from raysseg.rundir.markers import is_done, read_result, write_result
from raysseg.rundir.prepare import prepare_run_dir
from raysseg.rundir.steps import (
    FINAL,
    MANIFEST,
    WARMUP,
    Step,
    StepKind,
    plan_steps,
    refine_step,
    step_checkpoint,
)
from raysseg.tuning.results import (
    read_results,
    result_row,
    stage_metrics,
    write_outputs,
    write_results,
)
from raysseg.tuning.space import Param, TuneSettings, TuneSpace, trial_config
from raysseg.tuning.study import (
    STUDY_NAME,
    TrialNames,
    check_campaign,
    interrupted_trials,
    rebuild_study,
    study_location,
    write_trial_values,
    written_trials,
)


def print_line(line: str) -> None:
    """The default log: a module function, so Tune can pickle the callbacks that hold it (the
    builtin `print` cannot be pickled once a library has patched it, as Ray Train does)."""
    print(line, flush=True)


def run_campaign(
    base: Config, space: TuneSpace, trials: int, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run (or resume) a campaign until `trials` trials are finished; write the table, best.yaml, plots."""
    log = log or print_line
    campaign = _campaign_dir(base)
    study_location(campaign, space.settings)  # a campaign on object storage needs tune.storage
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
    return base.run_dir if storage.is_uri(base.run_dir) else os.path.abspath(base.run_dir)


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
    journal = rebuild_study(campaign, space, rows, pending)
    names = TrialNames(
        taken={row["trial"] for row in rows} | set(pending) | written_trials(campaign)
    )
    searcher = OptunaSearch(
        space=_DefineByRun(space.params, names),
        metric=list(settings.objectives) if settings.multi_objective else settings.objectives[0],
        mode=list(settings.modes) if settings.multi_objective else settings.modes[0],
        # A new seed per start: the same seed would replay the first start's random draws.
        sampler=optuna.samplers.TPESampler(seed=settings.seed + len(rows) + len(pending)),
        study_name=STUDY_NAME,
        storage=journal,
    )
    stopped: set[str] = set()
    scheduler = _scheduler(space, base, stopped, log)
    share = _share_warmups(base, space, campaign, log)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial, base=base, settings=settings, campaign=campaign, share_warmups=share
        ),
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
            **train_storage(campaign_layout.tune_storage(campaign)),
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


class _DefineByRun:
    """Optuna define-by-run space: suggests every key, and names the trial's run directory.

    A re-queued trial (cut off by a killed driver) carries its old run name as a user attribute,
    so it resumes in its old run directory.
    """

    def __init__(self, params: tuple[Param, ...], names: TrialNames) -> None:
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


def _next_session(campaign: str) -> int:
    return len(storage.list_dirs(campaign_layout.tune_storage(campaign)))


def _share_warmups(
    base: Config, space: TuneSpace, campaign: str, log: Callable[[str], None]
) -> bool:
    """Whether trials share their warm-ups; the campaign's one warm-up trained here first.

    When neither the space nor a start point holds a key the warm-up reads, every trial shares
    one warm-up: the driver trains it before any trial starts. Otherwise trials with the same
    warm-up values share one under a file lock, which needs a local or mounted campaign folder;
    on object storage each trial then trains its own.
    """
    keys = {param.key for param in space.params}
    keys |= {key for point in space.settings.start_points for key in point}
    if not any(not key.startswith(WARMUP_FREE_KEYS) for key in keys):
        train_shared_warmup(warmup_config(base, {}, space.settings, campaign), "campaign")
        return True
    if storage.is_uri(campaign):
        log(
            "the space changes warm-up settings and the campaign is on object storage (no file "
            "lock there): each trial trains its own warm-up"
        )
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Trial side


def run_trial(
    trial: dict[str, Any],
    base: Config,
    settings: TuneSettings,
    campaign: str,
    share_warmups: bool = True,
) -> None:
    """One trial: a shortened pipeline in its own run directory, a report after every stage."""
    name = trial["run_name"]
    params = {k: v for k, v in trial.items() if k != "run_name"}
    config = trial_config(base, params, settings, campaign_layout.trial_run_dir(campaign, name))
    # The values first: a trial killed after them is rerun with them in this directory, and
    # prepare_run_dir then checks that the rerun's config is the one saved here.
    write_trial_values(config.run_dir, name, params)
    prepare_run_dir(config)
    if share_warmups:
        share_warmup(warmup_config(base, params, settings, campaign), config, name)
    steps = plan_steps(config, full_supervision=False)
    if not settings.final_eval:
        steps = [step for step in steps if step != FINAL]
    for index, step in enumerate(steps, start=1):
        run_step(config, step, f"[{name} {index}/{len(steps)}]", print_line)
        stage = _reported_stage(step, config, settings.final_eval)
        if stage is not None:
            ray.tune.report(stage_metrics(config, stage))


def _reported_stage(step: Step, config: Config, final_eval: bool) -> int | None:
    """The stage a trial reports after `step`: each label update closes its stage; with the final
    evaluation, the last stage is reported after it instead (one report per stage)."""
    last = config.stages.count - 1
    if step == FINAL:
        return last
    if step.kind is StepKind.REFINE and not (final_eval and step == refine_step(last)):
        return step.stage
    return None


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
        config, run_dir=campaign_layout.shared_warmup_dir(campaign, digest[:12])
    )


def share_warmup(shared: Config, trial: Config, name: str) -> None:
    """Run the warm-up once in `shared.run_dir` unless it is done (a lock file makes concurrent
    trials wait for it), then give `trial` a copy of its checkpoint and its done marker.

    The marker keeps the warm-up's seconds: a trial's GPU-hours stay what it would cost alone.
    """
    if is_done(trial.run_dir, WARMUP):
        return
    if not is_done(shared.run_dir, WARMUP):
        with _file_lock(campaign_layout.lock_file(shared.run_dir)):
            train_shared_warmup(shared, name)
    checkpoint = step_checkpoint(trial.run_dir, WARMUP)
    storage.copy_file(step_checkpoint(shared.run_dir, WARMUP), checkpoint)
    result = read_result(shared.run_dir, WARMUP)
    write_result(
        trial.run_dir, WARMUP, {**result, "checkpoint": checkpoint, "shared": shared.run_dir}
    )


def train_shared_warmup(shared: Config, name: str) -> None:
    """The manifest and warm-up steps in a shared warm-up folder (skipped where done)."""
    prepare_run_dir(shared)
    for step in (MANIFEST, WARMUP):
        run_step(shared, step, f"[{name} shared]", print_line)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive flock (campaign folders are local or mounted paths; a killed holder's lock
    is released by the kernel)."""
    storage.makedirs(os.path.dirname(path))
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        params = {k: v for k, v in trial.items() if k != "run_name"}
        row = result_row(trial["run_name"], params, history, status, planned)
        rows = [r for r in read_results(self.campaign) if r["trial"] != row["trial"]]
        write_results(self.campaign, [*rows, row])
        self.log(
            f"trial {row['trial']} {status} after {row['stages_done']}/{planned} stage(s): "
            f"val mIoU {row['val_miou']}"
        )
