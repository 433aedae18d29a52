"""Search-space parsing and the results helpers of tuning campaigns (pure: no Ray)."""

from __future__ import annotations

import optuna
import pytest

from raysseg.config import Config, ConfigError
from raysseg.rundir import campaign as campaign_layout
from raysseg.rundir.steps import MANIFEST, WARMUP, refine_step, train_step
from raysseg.tuning.results import best_trial, format_results, pareto_front, step_gpus
from raysseg.tuning.space import (
    Param,
    TuneSettings,
    best_config,
    load_space,
    parse_param,
    parse_space,
    trial_config,
)
from raysseg.tuning.study import (
    STUDY_NAME,
    TrialNames,
    open_study,
    rebuild_study,
    study_location,
    write_trial_values,
    written_trials,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([1, 5], Param("k", "int", 1, 5)),
        ([0.1, 2], Param("k", "float", 0.1, 2.0)),
        ("uniform(0.05, 0.5)", Param("k", "float", 0.05, 0.5)),
        ("loguniform(1e-4, 1e-2)", Param("k", "float", 1e-4, 1e-2, log=True)),
        ("int(2, 8)", Param("k", "int", 2, 8)),
        ("choice([max, mean])", Param("k", "choice", choices=("max", "mean"))),
        ("choice([[1.0], [0.5, 1.0]])", Param("k", "choice", choices=([1.0], [0.5, 1.0]))),
    ],
)
def test_space_syntax(value, expected) -> None:
    assert parse_param("k", value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([5, 1], "need low < high"),
        ([1, 2, 3], "two numbers"),
        ("loguniform(0, 1)", "low > 0"),
        ("int(1.5, 3)", "whole numbers"),
        ("normal(0, 1)", "not a range"),
        ("choice([])", "at least one"),
        (3, "not a range"),
    ],
)
def test_bad_ranges_name_key_and_value(value, message) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        parse_param("loss.w_sal", value)
    assert "loss.w_sal" in str(error.value)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"loss.w_sall": [0.1, 1.0]}, "loss.w_sall"),  # unknown key
        ({"labels.cam_threshold": [0.1, 1.5]}, r"labels\.cam_threshold.*1\.5"),  # outside [0, 1]
        ({"stages.count": [0.5, 3.5]}, r"stages\.count.*takes ints"),
        ({"eval.fuse": [1, 2]}, r"eval\.fuse.*choice"),  # a range on a string key
        ({"eval.fuse": "choice([max, median])"}, "median"),
        ({"run_dir": "choice([a, b])"}, "run_dir"),
    ],
)
def test_space_keys_are_checked_against_the_config(space, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space(space, {}, Config())


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"objectives": ["val_miou", "speed"]}, "tune.objectives"),
        ({"scheduler": "pbt"}, "tune.scheduler"),
        ({"max_concurrent": 0}, "tune.max_concurrent"),
        ({"trial_overrides": {"optim.epochz": 1}}, "optim.epochz"),
        ({"trial_overrides": {"loss.w_sal": 1.0}}, "also searched"),
        ({"start_points": [{"loss.w_sal": 50.0}]}, r"loss\.w_sal=50\.0 is outside"),
        ({"start_points": [{"loss.w_cls": 1.0}]}, "not a searched key"),
        ({"max_trials": 3}, "tune.max_trials"),
        ({"storage": "s3://bucket/study.journal"}, r"tune\.storage.*object store cannot hold"),
        ({"storage": 5}, r"tune\.storage.*expected a URL or a path"),
    ],
)
def test_tune_settings_are_checked(tune, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space({"loss.w_sal": "loguniform(0.1, 10)"}, tune, Config())


def test_space_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("space:\n  optim.lr: [0.1, 0.01]\n")
    with pytest.raises(ConfigError, match=rf"{path.name}.*optim\.lr"):
        load_space(path, Config())
    path.write_text("spaces:\n  optim.lr: [0.01, 0.1]\n")
    with pytest.raises(ConfigError, match="spaces"):
        load_space(path, Config())


def test_shipped_space_file_loads_and_shortens_trials() -> None:
    space = load_space("jobs/tune_space.yaml", Config())
    keys = set(space.keys)
    assert {"stages.count", "loss.w_sal", "labels.cam_threshold", "labels.sal_threshold"} <= keys
    assert "optim.lr" in keys
    assert space.max_stages(Config()) >= 2
    trial = trial_config(Config(), {"loss.w_sal": 2.0}, space.settings, "runs/t/trials/trial_0000")
    assert trial.loss.w_sal == 2.0 and trial.run_dir.endswith("trial_0000")
    assert trial.optim.epochs < Config().optim.epochs  # shortened
    full = best_config(Config(), {"loss.w_sal": 2.0}, "runs/t/best_run")
    assert full.optim.epochs == Config().optim.epochs and full.loss.w_sal == 2.0


def test_step_gpus_counts_fractional_gpus() -> None:
    from raysseg.config import with_overrides

    config = with_overrides(
        Config(),
        {
            "resources.use_gpu": True,
            "resources.num_workers": 2,
            "resources.gpus_per_worker": 0.5,
            "resources.refine_actors": 3,
            "resources.refine_gpus_per_actor": 0.25,
        },
    )
    assert step_gpus(config, train_step(1)) == 1.0
    assert step_gpus(config, refine_step(1)) == 0.75
    assert step_gpus(config, MANIFEST) == 0.0
    assert step_gpus(Config(), WARMUP) == 0.0  # CPU config


def _row(name: str, miou: float | None, hours: float, status: str = "completed") -> dict:
    return {
        "trial": name,
        "status": status,
        "stages_done": 2,
        "stages_planned": 2,
        "val_miou": miou,
        "label_miou": 0.3,
        "gpu_hours": hours,
        "params": {"loss.w_sal": 1.0},
    }


def test_best_and_pareto_front() -> None:
    rows = [_row("a", 0.5, 2.0), _row("b", 0.6, 3.0), _row("c", 0.4, 3.5), _row("d", None, 0.1)]
    single = TuneSettings()
    assert best_trial(rows, single)["trial"] == "b"
    two = TuneSettings(objectives=("val_miou", "gpu_hours"))
    assert {row["trial"] for row in pareto_front(rows, two)} == {"a", "b"}
    assert best_trial([_row("x", None, 1.0, "error")], single) is None
    table = format_results(rows, ("loss.w_sal",))
    assert "60.00" in table and table.count("\n") == len(rows)


def test_trials_share_a_warmup_only_when_its_settings_match() -> None:
    from raysseg.distributed.tune import warmup_config  # imports Ray Tune; starts nothing

    base = Config()
    settings = TuneSettings(trial_overrides={"stages.count": 1})

    def folder(**params) -> str:
        return warmup_config(base, params, settings, "/campaign").run_dir

    same = folder(**{"labels.cam_threshold": 0.1, "loss.w_sal": 1.0, "stages.count": 2})
    assert same.startswith("/campaign/shared/warmup_")
    # Keys the warm-up never reads: the same folder.
    assert folder(**{"labels.cam_threshold": 0.3, "loss.w_seg": 2.0, "eval.fuse": "mean"}) == same
    # Keys it does read (its optimiser, the classification weight, the data): another folder each.
    others = {
        folder(**{"optim.warmup_lr": 0.02}),
        folder(**{"loss.w_cls": 0.5}),
        folder(**{"data.crop_size": 256}),
    }
    assert len(others) == 3 and same not in others
    # The shared config holds the warm-up values and the base's values elsewhere.
    shared = warmup_config(
        base, {"optim.warmup_lr": 0.02, "labels.cam_threshold": 0.3}, settings, "/c"
    )
    assert shared.optim.warmup_lr == 0.02
    assert shared.labels.cam_threshold == base.labels.cam_threshold


def test_a_rerun_names_its_new_trials_with_the_lowest_free_names(tmp_path) -> None:
    """The driver was killed while trial_0003 ran and trial_0002 was named but not started: the
    rerun re-queues trial_0003 and names its next new trials trial_0002, then trial_0004."""
    campaign = str(tmp_path)
    for name in ("trial_0000", "trial_0001"):  # finished: values and config written
        write_trial_values(campaign_layout.trial_run_dir(campaign, name), name, {})
        (tmp_path / "trials" / name / "config.yaml").write_text("{}")
    write_trial_values(campaign_layout.trial_run_dir(campaign, "trial_0003"), "trial_0003", {})
    (tmp_path / "trials" / "trial_0002").mkdir()  # made, then killed before its values
    taken = written_trials(campaign)
    assert taken == {"trial_0000", "trial_0001", "trial_0003"}
    names = TrialNames(taken)
    assert [names.next(), names.next()] == ["trial_0002", "trial_0004"]


def test_a_campaign_on_object_storage_needs_a_study_storage() -> None:
    with pytest.raises(ConfigError, match=r"s3://b/c' is on object storage.*'tune\.storage'"):
        study_location("s3://b/c", TuneSettings())
    assert study_location("s3://b/c", TuneSettings(storage="sqlite:////x.db")) == "sqlite:////x.db"
    assert study_location("/c", TuneSettings()) == "/c/optuna/study.journal"


def test_an_rdb_study_is_rebuilt_from_the_table_at_every_start(tmp_path) -> None:
    """SQLite, as a cluster's PostgreSQL would be: the table's trials (values, per-stage
    intermediates, run names), the interrupted trial queued under its name, and only the start
    points no trial has tried; a stale trial of the previous start is gone after the rebuild."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    tune = {
        "storage": url,
        "objectives": ["val_miou"],
        "start_points": [{"loss.w_sal": 1.0}, {"loss.w_sal": 3.0}],
    }
    space = parse_space(
        {"loss.w_sal": "loguniform(0.1, 10)", "loss.w_seg": [0.5, 2.0]}, tune, Config()
    )
    finished = {**_row("trial_0000", 0.5, 1.0), "val_miou_per_stage": [0.4, 0.5]}
    finished["params"] = {"loss.w_sal": 1.0, "loss.w_seg": 0.7}  # start point 1, w_seg drawn
    pending = {"trial_0001": {"loss.w_sal": 2.0, "loss.w_seg": 1.1}}
    storage = rebuild_study("/unused", space, [finished], pending)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "WAITING", "WAITING"]
    queued = [(t.params or t.system_attrs["fixed_params"]) for t in study.trials[1:]]
    assert queued == [pending["trial_0001"], {"loss.w_sal": 3.0}]  # start point 1 was tried
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))  # stale

    second = {**_row("trial_0001", 0.6, 1.0), "val_miou_per_stage": [0.6]}
    second["params"] = pending["trial_0001"]
    third = {**_row("trial_0002", 0.4, 1.0), "val_miou_per_stage": [0.4]}
    third["params"] = {"loss.w_sal": 3.0, "loss.w_seg": 1.9}
    rebuild_study("/unused", space, [finished, second, third], {})
    trials = open_study("/unused", url).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # nothing stale, nothing queued
    assert [t.user_attrs["run_name"] for t in trials] == ["trial_0000", "trial_0001", "trial_0002"]
    assert [t.value for t in trials] == [0.5, 0.6, 0.4]
    assert trials[0].intermediate_values == {1: 0.4, 2: 0.5}
