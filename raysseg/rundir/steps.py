"""The step plan of a run, as data: a step is (kind, stage), never a string to parse.

Weakly supervised (METHOD.md "Stages"):
  manifest -> warmup -> stage_0/labels -> (stage_k/train -> stage_k/refine) for k < K -> final
Full-supervision baseline (labels from the GT masks, same warm-up and schedule):
  manifest -> warmup -> stage_0/labels -> stage_k/train for k < K -> final

`Step.name` ("stage_0/labels") is the one spelling of a step: the CLI's, the logs' and the done
marker's (`<run>/stage_0/labels.DONE`); it is derived here and nowhere else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from raysseg.config import Config
from raysseg.rundir import layout


class StepKind(enum.Enum):
    MANIFEST = "manifest"  # the dataset manifests
    WARMUP = "warmup"  # stage 0a: the classifier alone, on image labels
    LABELS = "labels"  # stage 0's labels: initial (CAM + saliency) or, baseline, the GT masks
    TRAIN = "train"  # stage k's training, on stage k's labels
    REFINE = "refine"  # the label update after stage k's training: stage k + 1's labels
    FINAL = "final"  # the last model's val mIoU, multi-scale + flip + CRF


_STAGED = frozenset({StepKind.LABELS, StepKind.TRAIN, StepKind.REFINE})


@dataclass(frozen=True)
class Step:
    kind: StepKind
    stage: int | None = None  # set exactly for the kinds that belong to a stage

    def __post_init__(self) -> None:
        if (self.stage is None) == (self.kind in _STAGED):
            raise ValueError(f"step kind {self.kind.value!r} with stage {self.stage!r}")

    @property
    def name(self) -> str:
        if self.stage is None:
            return self.kind.value
        return f"{layout.stage_folder(self.stage)}/{self.kind.value}"

    @property
    def trains(self) -> bool:
        return self.kind in (StepKind.WARMUP, StepKind.TRAIN)

    @property
    def label_stage(self) -> int | None:
        """The stage whose labels this step writes (refine after stage k writes k + 1's)."""
        if self.kind is StepKind.LABELS:
            return self.stage
        if self.kind is StepKind.REFINE:
            return self.stage + 1
        return None

    def __str__(self) -> str:
        return self.name


MANIFEST = Step(StepKind.MANIFEST)
WARMUP = Step(StepKind.WARMUP)
FINAL = Step(StepKind.FINAL)


def train_step(stage: int) -> Step:
    return Step(StepKind.TRAIN, stage)


def refine_step(stage: int) -> Step:
    return Step(StepKind.REFINE, stage)


def label_step(stage: int) -> Step:
    """The step that writes the labels stage `stage` trains on."""
    return Step(StepKind.LABELS, 0) if stage == 0 else refine_step(stage - 1)


def init_step(stage: int) -> Step:
    """The training whose final weights stage `stage` starts from."""
    return WARMUP if stage == 0 else train_step(stage - 1)


def plan_steps(config: Config, full_supervision: bool = False) -> list[Step]:
    """Every step of a run of `config`, in order."""
    # The full-supervision baseline keeps the warm-up, so both runs start from the same backbone
    # (on real data both would start from the same ImageNet weights); only the labels differ.
    steps = [MANIFEST, WARMUP, label_step(0)]
    for stage in range(config.stages.count):
        steps.append(train_step(stage))
        if not full_supervision:
            steps.append(refine_step(stage))
    steps.append(FINAL)
    return steps


def _training_folder(step: Step) -> str:
    if not step.trains:
        raise ValueError(f"step '{step.name}' trains nothing, so it has no checkpoint")
    return layout.WARMUP_FOLDER if step.kind is StepKind.WARMUP else layout.stage_folder(step.stage)


def step_checkpoint(run_dir: str, step: Step) -> str:
    """Where a training step leaves its final weights (known before the step runs)."""
    return layout.final_checkpoint(run_dir, _training_folder(step))


def step_train_storage(run_dir: str, step: Step) -> str:
    """Ray Train's storage of a training step (its per-epoch checkpoints, for resuming)."""
    return layout.train_storage(run_dir, _training_folder(step))
