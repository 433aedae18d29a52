"""Where a tuning campaign keeps its files. Pure path arithmetic; no I/O here.

campaign/                        = the base config's run_dir (a path, or s3:// / gs:// with tune.storage)
  campaign.json                  base config + space, written first; a rerun with others is refused
  results.parquet                one row per finished trial (values, status, per-stage metrics)
  optuna/study.journal           the Optuna study (JournalStorage), unless tune.storage names another
  trials/trial_NNNN/             a pipeline run directory per trial, with trial.json (its values)
  shared/warmup_<hash>/          a warm-up run shared by every trial with the same warm-up settings
  shared/warmup_<hash>.lock      the lock concurrent trials wait on while one trains it (local only)
  ray_tune/session_N/            Ray Tune's own folders, one per start of the command
  best.yaml                      the best trial's values on the full (not shortened) base config
  best_run/                      the run_dir best.yaml names
  plots/                         objective per trial, parallel coordinates, mIoU per stage (Pareto)
"""

from __future__ import annotations

from raysseg.storage import join

TRIALS_FOLDER = "trials"
TUNE_FOLDER = "ray_tune"


def definition_file(campaign: str) -> str:
    return join(campaign, "campaign.json")


def results_file(campaign: str) -> str:
    return join(campaign, "results.parquet")


def study_journal(campaign: str) -> str:
    return join(campaign, "optuna", "study.journal")


def trials_dir(campaign: str) -> str:
    return join(campaign, TRIALS_FOLDER)


def trial_name(index: int) -> str:
    return f"trial_{index:04d}"


def trial_run_dir(campaign: str, name: str) -> str:
    return join(trials_dir(campaign), name)


def trial_values_file(trial_run_dir: str) -> str:
    """The values a trial started with, written before its first step (for resuming it)."""
    return join(trial_run_dir, "trial.json")


def shared_warmup_dir(campaign: str, digest: str) -> str:
    return join(campaign, "shared", f"warmup_{digest}")


def lock_file(folder: str) -> str:
    return f"{folder}.lock"


def tune_storage(campaign: str) -> str:
    return join(campaign, TUNE_FOLDER)


def best_yaml(campaign: str) -> str:
    return join(campaign, "best.yaml")


def best_run_dir(campaign: str) -> str:
    return join(campaign, "best_run")


def plots_dir(campaign: str) -> str:
    return join(campaign, "plots")
