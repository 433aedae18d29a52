"""`StageDataset`: a torch Dataset over Records for the three ways a stage reads images.

- "warmup": augmented crop + image labels (stage 0a, classifier only).
- "train":  augmented crop + image labels + the stage's segmentation pseudo label (`seg_label_uri`)
            and saliency pseudo label (`sal_label_uri`, in [0, 1]).
- "eval":   the full image, no augmentation, + the ground-truth mask (`mask_uri`).

Augmentation randomness comes from a numpy Generator seeded with (seed, epoch, index): an item is
the same whichever DataLoader worker decodes it, and a resumed epoch replays exactly. Training
loaders (`build_train_loader`) index the dataset with (epoch, index) pairs from an `EpochSampler`:
the sampler runs in the main process, so the epoch reaches the worker processes with each index,
also when they are persistent and their copy of the dataset never sees `set_epoch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from raysseg.config import DataConfig
from raysseg.data import io
from raysseg.data.records import DataError, Record, check_label_map, labels_to_multihot
from raysseg.data.transforms import normalize, to_tensor, train_transform

MODES = ("warmup", "train", "eval")
# How far a training item that cannot be read looks for a stand-in (the next items of the manifest).
STAND_IN_TRIES = 8


class StageDataset(torch.utils.data.Dataset):
    """Items are dicts of tensors (see the module docstring for which keys each mode returns).

    "image" float32 (3, H, W) normalised; "labels" float32 (C-1,) multi-hot; "seg" int64 (H, W)
    (255 = ignore); "sal" float32 (H, W) in [0, 1]; "valid" bool (H, W) (False on crop padding);
    "gt" int64 (H, W); "rgb" uint8 (H, W, 3) (eval only, for CRF post-processing); "image_id" str.
    """

    def __init__(
        self,
        records: Sequence[Record],
        mode: str,
        num_classes: int,
        crop_size: int = 321,
        scale_min: float = 0.7,
        scale_max: float = 1.3,
        flip: bool = True,
        color_jitter: float = 0.3,
        seed: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"StageDataset mode must be one of {MODES}, got {mode!r}")
        self.records = records
        self.mode = mode
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.scale_min = scale_min
        self.scale_max = scale_max
        self.flip = flip
        self.color_jitter = color_jitter
        self.seed = seed
        self.skip_unreadable = skip_unreadable
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain integer indices. DataLoader workers hold their own copy of the
        dataset, so loaders pass the epoch in the index instead (`EpochSampler`)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def item_rng(self, epoch: int, index: int) -> np.random.Generator:
        """The one rule for an item's augmentation: a function of (seed, epoch, index) only."""
        return np.random.default_rng([self.seed, epoch, index])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """`dataset[index]` (at `self.epoch`) or `dataset[epoch, index]` (what loaders pass).

        With `skip_unreadable`, an item whose files fail to decode does not stop the loader: its
        "unreadable" key carries the error (every item has the key, "" when sound). Eval returns
        only the id and the error; training returns a stand-in, the next readable item of the
        manifest with the failed item's augmentation, so every batch keeps its size (ranks of a
        DDP stage must run the same number of steps).
        """
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        try:
            return self._item(index, self.item_rng(epoch, index))
        except (OSError, DataError) as error:
            if not self.skip_unreadable:
                raise
            return self._stand_in(epoch, index, str(error))

    def _item(self, index: int, rng: np.random.Generator) -> dict:
        record = self.records[index]
        image = io.read_image(record.image_uri)
        item = {
            "image_id": record.image_id,
            "labels": torch.from_numpy(labels_to_multihot(record.labels, self.num_classes)),
        }
        if self.mode == "eval":
            item.update(self._eval_item(record, image))
        else:
            item.update(self._train_item(record, image, rng))
        if self.skip_unreadable:
            item["unreadable"] = ""
        return item

    def _stand_in(self, epoch: int, index: int, message: str) -> dict:
        if self.mode == "eval":
            return {"image_id": self.records[index].image_id, "unreadable": message}
        for offset in range(1, STAND_IN_TRIES + 1):
            try:
                item = self._item((index + offset) % len(self), self.item_rng(epoch, index))
            except (OSError, DataError):
                continue
            item["unreadable"] = message
            return item
        raise DataError(
            f"{message}; and none of the {STAND_IN_TRIES} items after it in the manifest can be "
            "read either"
        )

    def _eval_item(self, record: Record, image: np.ndarray) -> dict:
        if not record.mask_uri:
            raise DataError(f"eval needs a ground-truth mask: image '{record.image_id}' has none")
        gt = check_label_map(
            io.read_label(record.mask_uri),
            self.num_classes,
            record.mask_uri,
            image.shape,
            record.image_uri,
        )
        return {"image": normalize(image), "gt": to_tensor(gt), "rgb": torch.from_numpy(image)}

    def _train_item(self, record: Record, image: np.ndarray, rng: np.random.Generator) -> dict:
        seg = sal = None
        if self.mode == "train":
            if not record.seg_label_uri or not record.sal_label_uri:
                raise DataError(
                    f"train mode needs pseudo labels: image '{record.image_id}' has "
                    f"seg_label_uri={record.seg_label_uri!r}, "
                    f"sal_label_uri={record.sal_label_uri!r}"
                )
            seg = check_label_map(
                io.read_label(record.seg_label_uri),
                self.num_classes,
                record.seg_label_uri,
                image.shape,
                record.image_uri,
            )
            sal = io.read_saliency(record.sal_label_uri)
            if sal.shape != image.shape[:2]:
                raise DataError(
                    f"saliency label '{record.sal_label_uri}' is (H, W) = {sal.shape}, but its "
                    f"image '{record.image_uri}' is {image.shape[:2]}"
                )
        crop = train_transform(
            image,
            seg,
            sal,
            rng,
            crop_size=self.crop_size,
            scale_min=self.scale_min,
            scale_max=self.scale_max,
            flip=self.flip,
            color_jitter=self.color_jitter,
        )
        item = {"image": normalize(crop["image"]), "valid": torch.from_numpy(crop["valid"])}
        if seg is not None:
            item["seg"] = to_tensor(crop["seg"])
            item["sal"] = torch.from_numpy(crop["sal"])
        return item


def build_stage_dataset(
    records: Sequence[Record], mode: str, data: DataConfig, num_classes: int, seed: int
) -> StageDataset:
    """A StageDataset with the augmentation settings of `config.data`, as a stage reads it: an
    image that no longer decodes (changed after the manifest step checked it) is skipped and
    counted, not a crash of the stage (`skip_unreadable`)."""
    return StageDataset(
        records,
        mode=mode,
        num_classes=num_classes,
        crop_size=data.crop_size,
        scale_min=data.scale_min,
        scale_max=data.scale_max,
        flip=data.flip,
        color_jitter=data.color_jitter,
        seed=seed,
        skip_unreadable=True,
    )


class BlockShuffleSampler(torch.utils.data.Sampler[int]):
    """A DistributedSampler for datasets read a row group at a time (`ManifestRows`).

    Each epoch visits the groups in a shuffled order and the rows of each group in a shuffled order;
    rank r takes every world_size-th index of that sequence, so all ranks yield the same count (DDP
    needs equal steps) and every group is read once per epoch per reader. Memory is one group's
    permutation: no index array of the whole dataset (millions of rows) is ever built. Shuffling is
    local to a group, which is fine for manifests in source order (ids, not classes).
    """

    def __init__(
        self,
        group_sizes: Sequence[int],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.group_sizes = np.asarray(group_sizes, dtype=np.int64)
        self.group_starts = np.concatenate([[0], np.cumsum(self.group_sizes)])
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        total = int(self.group_starts[-1])
        # Like DistributedSampler: drop the tail, or wrap around to pad, so every rank is equal.
        self.per_rank = total // world_size if drop_last else -(-total // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def _global_order(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = np.arange(len(self.group_sizes))
        if self.shuffle:
            groups = rng.permutation(groups)
        while True:  # wraps around for padding (only ever a partial second pass)
            for group in groups:
                rows = np.arange(self.group_sizes[group])
                if self.shuffle:
                    rows = rng.permutation(rows)
                yield from (rows + self.group_starts[group]).tolist()

    def __iter__(self):
        if self.per_rank == 0:
            return
        taken = 0
        for position, index in enumerate(self._global_order()):
            if position % self.world_size == self.rank:
                yield index
                taken += 1
                if taken == self.per_rank:
                    return


class EpochSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Yields (epoch, index) for each index of `sampler`: the epoch travels with the index.

    DataLoader workers decode from their own copy of the dataset, made when they start (pickled
    under spawn, copied on write under fork) and kept for the whole run with persistent workers;
    `set_epoch` on the main process's dataset never reaches it. The sampler runs in the main
    process and its indices are sent to the workers for every batch, so they always see the epoch.
    """

    def __init__(self, sampler: BlockShuffleSampler) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)


def build_train_loader(
    dataset: StageDataset,
    group_sizes: Sequence[int],
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, EpochSampler]:
    """The training DataLoader of one rank and its sampler (call `sampler.set_epoch` each epoch).

    Every epoch draws new crops in the workers, and a replayed epoch draws the same ones.
    """
    # Equal steps on every rank (DDP): drop the tail once there is at least one batch per rank.
    drop_last = len(dataset) >= world_size * batch_size
    sampler = EpochSampler(
        BlockShuffleSampler(
            group_sizes,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=True,
            drop_last=drop_last,
        )
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        # Workers start once per stage, not per epoch: the epoch reaches them through the sampler.
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


def collate(items: list[dict]) -> dict:
    """Stack tensors key by key; strings become lists. Eval images differ in size: batch size 1."""
    batch: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"collate: '{key}' has different shapes {sorted(shapes)} in one batch "
                    f"(full-size eval images need batch_size=1)"
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


__all__ = [
    "MODES",
    "STAND_IN_TRIES",
    "BlockShuffleSampler",
    "EpochSampler",
    "StageDataset",
    "build_stage_dataset",
    "build_train_loader",
    "collate",
]
