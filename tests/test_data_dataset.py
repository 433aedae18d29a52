"""raysseg.data.dataset: the three modes, per-item determinism, collate."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from raysseg.config import DataConfig
from raysseg.data import io
from raysseg.data.dataset import StageDataset, build_stage_dataset, build_train_loader, collate
from raysseg.data.records import DataError, Record

NUM_CLASSES = 4


def _records(tmp_path, count=3):
    rng = np.random.default_rng(0)
    records = []
    for index in range(count):
        height, width = 20 + index * 3, 26 - index
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image_uri = str(tmp_path / f"im{index}.png")
        Image.fromarray(image).save(image_uri)
        gt = np.zeros((height, width), np.uint8)
        gt[2:8, 3:9] = 1 + index % 3
        gt[0, 0] = 255
        seg = gt.copy()
        seg[10:, :] = 255
        sal = (gt > 0).astype(np.uint8) * 255
        paths = {name: str(tmp_path / f"{name}{index}.png") for name in ("gt", "seg", "sal")}
        io.write_png_atomic(paths["gt"], gt, io.voc_palette())
        io.write_png_atomic(paths["seg"], seg, io.voc_palette())
        io.write_png_atomic(paths["sal"], sal)
        records.append(
            Record(
                image_id=f"im{index}",
                image_uri=image_uri,
                labels=(1 + index % 3,),
                mask_uri=paths["gt"],
                seg_label_uri=paths["seg"],
                sal_label_uri=paths["sal"],
            )
        )
    return records


def _dataset(records, mode, **overrides):
    settings = dict(crop_size=16, scale_min=0.8, scale_max=1.2, flip=True, color_jitter=0.2)
    settings.update(overrides)
    return StageDataset(records, mode=mode, num_classes=NUM_CLASSES, seed=3, **settings)


def test_warmup_mode(tmp_path):
    records = _records(tmp_path)
    item = _dataset(records, "warmup")[1]
    assert set(item) == {"image_id", "image", "labels", "valid"}
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["labels"].tolist() == [0.0, 1.0, 0.0]
    assert item["image_id"] == "im1"


def test_train_mode(tmp_path):
    records = _records(tmp_path)
    item = _dataset(records, "train")[0]
    assert set(item) == {"image_id", "image", "labels", "valid", "seg", "sal"}
    assert item["seg"].shape == (16, 16) and item["seg"].dtype == torch.int64
    assert item["sal"].shape == (16, 16) and item["sal"].dtype == torch.float32
    assert item["sal"].min() >= 0.0 and item["sal"].max() <= 1.0
    assert set(item["seg"].unique().tolist()) <= {0, 1, 255}
    # Same geometry on both maps: saliency is high on the pseudo label's foreground, low elsewhere
    # (not exactly 1/0: saliency is resized bilinearly, labels nearest).
    assert (item["seg"] == 1).any()
    assert item["sal"][item["seg"] == 1].mean() > 0.8
    assert item["sal"][item["seg"] == 0].mean() < 0.2


def test_train_mode_needs_pseudo_labels(tmp_path):
    records = [dataclasses.replace(r, seg_label_uri="") for r in _records(tmp_path, 1)]
    with pytest.raises(DataError, match="im0"):
        _dataset(records, "train")[0]


def test_eval_mode_full_image(tmp_path):
    records = _records(tmp_path)
    dataset = _dataset(records, "eval")
    item = dataset[2]
    assert item["image"].shape == (3, 26, 24)
    assert item["gt"].dtype == torch.int64
    np.testing.assert_array_equal(item["gt"].numpy(), io.read_label(records[2].mask_uri))
    np.testing.assert_array_equal(item["rgb"].numpy(), io.read_image(records[2].image_uri))
    # No augmentation: the same item every epoch.
    dataset.set_epoch(5)
    assert torch.equal(dataset[2]["image"], item["image"])
    batch = collate([item])
    assert batch["image"].shape == (1, 3, 26, 24) and batch["image_id"] == ["im2"]
    with pytest.raises(ValueError, match="batch_size=1"):
        collate([dataset[0], dataset[1]])


def test_per_item_determinism_and_epochs(tmp_path):
    records = _records(tmp_path)
    first = _dataset(records, "train")
    second = _dataset(records, "train")
    # Access order does not matter (as with DataLoader workers): item i = f(seed, epoch, i).
    a = [first[i]["image"] for i in (0, 1, 2)]
    b = [second[i]["image"] for i in (2, 1, 0)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    first.set_epoch(1)
    changed = [not torch.equal(first[i]["image"], a[i]) for i in range(3)]
    assert any(changed)


def test_collate_train_batch(tmp_path):
    records = _records(tmp_path)
    dataset = _dataset(records, "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["seg"].shape == (3, 16, 16) and batch["sal"].shape == (3, 16, 16)
    assert batch["labels"].shape == (3, NUM_CLASSES - 1)
    assert batch["valid"].dtype == torch.bool
    assert batch["image_id"] == ["im0", "im1", "im2"]


def test_build_from_config_and_bad_mode(tmp_path):
    records = _records(tmp_path, 1)
    config = DataConfig(crop_size=12, flip=False, color_jitter=0.0)
    dataset = build_stage_dataset(records, "warmup", config, num_classes=NUM_CLASSES, seed=0)
    assert dataset[0]["image"].shape == (3, 12, 12)
    with pytest.raises(ValueError, match="mode"):
        StageDataset(records, mode="test", num_classes=NUM_CLASSES)


def _epoch_crops(dataset, epoch, loader=None):
    """The crops of one epoch by image id: `loader` reused (persistent workers) or a new one."""
    if loader is None:
        loader, sampler = _loader(dataset)
    else:
        sampler = loader.sampler
    # What the training loop does each epoch. The dataset's epoch is set too, as train.py did
    # before: it stays in the main process, so only the sampler can take the epoch to the workers.
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    crops = {}
    for batch in loader:
        crops.update(zip(batch["image_id"], batch["image"], strict=True))
    return crops, loader


def _loader(dataset):
    # The training loader as train.py builds it: two persistent worker processes.
    return build_train_loader(
        dataset, [len(dataset)], batch_size=2, num_workers=2, seed=3, rank=0, world_size=1
    )


def test_worker_processes_draw_new_crops_each_epoch_and_replay_an_epoch(tmp_path):
    dataset = _dataset(_records(tmp_path, 4), "train")
    first, loader = _epoch_crops(dataset, 0)
    second, _ = _epoch_crops(dataset, 1, loader)  # the same persistent workers, next epoch
    assert set(first) == set(second) == {"im0", "im1", "im2", "im3"}
    assert all(not torch.equal(first[key], second[key]) for key in first)
    # A replayed epoch (a restarted Ray Train worker builds a new loader) draws the same crops,
    # and they are the crops of direct indexing: one (seed, epoch, index) rule for both.
    replay, _ = _epoch_crops(dataset, 0)
    assert all(torch.equal(first[key], replay[key]) for key in first)
    dataset.set_epoch(1)
    assert torch.equal(second["im2"], dataset[2]["image"])


def test_an_unreadable_image_is_replaced_in_training_and_left_out_in_eval(tmp_path):
    """A file that broke after the manifest step: training gets the next readable item, with the
    broken one's augmentation and its error under "unreadable"; eval gets the error alone."""
    records = _records(tmp_path, count=4)
    (tmp_path / "im1.png").write_bytes(b"")  # zero bytes
    (tmp_path / "im2.png").write_bytes((tmp_path / "im0.png").read_bytes()[:60])  # truncated
    with pytest.raises(OSError, match=r"im1\.png': the file is empty"):
        _dataset(records, "train")[1]  # the default: stop, naming the file
    train = _dataset(records, "train", skip_unreadable=True)
    assert train[0]["unreadable"] == "" and train[0]["image_id"] == "im0"
    stand_in = train[1]
    assert stand_in["image_id"] == "im3"  # im2 is broken too
    assert "im1.png': the file is empty" in stand_in["unreadable"]
    assert stand_in["image"].shape == train[0]["image"].shape  # batches keep their size
    batch = collate([train[0], train[1]])
    assert batch["unreadable"][0] == "" and "im1.png" in batch["unreadable"][1]
    evaluation = _dataset(records, "eval", skip_unreadable=True)
    assert (
        set(evaluation[2]) == {"image_id", "unreadable"}
        and "im2.png" in evaluation[2]["unreadable"]
    )
    assert evaluation[3]["unreadable"] == "" and "gt" in evaluation[3]
    # Nothing readable within STAND_IN_TRIES: the error names the file and says so.
    for index in (0, 3):
        (tmp_path / f"im{index}.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"im0\.png'.*none of the 8 items after it"):
        train[0]
