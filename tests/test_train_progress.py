"""Training progress without Ray: rank 0's file (raysseg.distributed.train_progress) and the lines
the driver prints from it (raysseg.progress)."""

from __future__ import annotations

import math

from raysseg.distributed.train_progress import ProgressWatcher, open_writer, read_progress
from raysseg.progress import epoch_line, step_line

EPOCH = {"epoch": 1, "cls": 0.3012, "total": 0.8123, "lr": 0.00312, "images_per_s": 41.2}


def test_epoch_line_shows_the_total_first_then_terms_rate_and_time() -> None:
    line = epoch_line("stage_0/train", {**EPOCH, "seconds": 3.0}, 5, 62.0, 130.0)
    assert line == (
        "stage_0/train: epoch 2/5, total 0.8123, cls 0.3012, lr 0.00312, 41.2 images/s, "
        "elapsed 1m02s, ETA 2m10s"
    )
    with_val = epoch_line("stage_0/train", {**EPOCH, "val_miou": 0.312}, 2, 5.0, 0.0)
    assert with_val.endswith("ETA 0s, val mIoU 31.20%")


def test_step_line_gives_the_step_share_and_unknowns_as_dashes() -> None:
    line = step_line("warmup", 0, 3, 120, 400, 40.1, 90.0, math.nan)
    assert line == ("warmup: epoch 1/3, step 120/400 (30.0%), 40.1 images/s, elapsed 1m30s, ETA --")


def test_watcher_prints_each_epoch_once_and_ticks_with_an_eta(tmp_path) -> None:
    path = str(tmp_path / "progress.json")
    lines: list[str] = []
    writer = open_writer(path, epochs=3, start_epoch=0)
    watcher = ProgressWatcher(path, "stage_1/train", lines.append)
    writer.epoch_done({**EPOCH, "epoch": 0, "seconds": 10.0, "stage": "stage_1"})
    watcher.poll()
    writer.tick(epoch=1, steps=25, steps_total=100, images=200, seconds=2.5)
    watcher.poll()
    watcher.poll()  # nothing new: nothing printed
    assert len(lines) == 2, lines
    assert lines[0].startswith("stage_1/train: epoch 1/3, total 0.8123")
    assert "ETA 20s" in lines[0]  # 2 epochs left at 10 s each
    # 75 steps left at 0.1 s, then one epoch at the finished one's 10 s; 200 images in 2.5 s.
    assert lines[1].startswith("stage_1/train: epoch 2/3, step 25/100 (25.0%), 80.0 images/s")
    assert lines[1].endswith("ETA 18s")


def test_a_restarted_stage_keeps_the_epochs_it_does_not_train_again(tmp_path) -> None:
    path = str(tmp_path / "progress.json")
    first = open_writer(path, epochs=3, start_epoch=0)
    for epoch in range(2):
        first.epoch_done({**EPOCH, "epoch": epoch, "seconds": 1.0})
    # The restart resumes from the checkpoint of epoch 0: epoch 1 is trained again.
    again = open_writer(path, epochs=3, start_epoch=1)
    again.epoch_done({**EPOCH, "epoch": 1, "seconds": 1.0})
    assert [row["epoch"] for row in read_progress(path)["history"]] == [0, 1]
    # A driver started after the restart prints only epochs it has not seen in the file.
    lines: list[str] = []
    with ProgressWatcher(path, "warmup", lines.append, poll_seconds=60):
        again.epoch_done({**EPOCH, "epoch": 2, "seconds": 1.0})
    assert [line.split(",")[0] for line in lines] == ["warmup: epoch 3/3"]
