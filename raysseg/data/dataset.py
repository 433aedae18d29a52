"""`StageDataset`: a torch Dataset over Records for the three ways a stage reads images.

- "warmup": augmented crop + image labels (stage 0a, classifier only).
- "train":  augmented crop + image labels + the stage's segmentation pseudo label (`seg_label_uri`)
            and saliency pseudo label (`sal_label_uri`, in [0, 1]).
- "eval":   the full image, no augmentation, + the ground-truth mask (`mask_uri`).

Augmentation randomness comes from a numpy Generator seeded with (seed, epoch, index): an item is
the same whichever DataLoader worker decodes it, and a resumed epoch replays exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from raysseg.config import DataConfig
from raysseg.data import io
from raysseg.data.records import DataError, Record, check_label_map, labels_to_multihot
from raysseg.data.transforms import normalize, to_tensor, train_transform

MODES = ("warmup", "train", "eval")


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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (in the main process, before iterating the DataLoader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def item_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = io.read_image(record.image_uri)
        item = {
            "image_id": record.image_id,
            "labels": torch.from_numpy(labels_to_multihot(record.labels, self.num_classes)),
        }
        if self.mode == "eval":
            item.update(self._eval_item(record, image))
        else:
            item.update(self._train_item(record, image, self.item_rng(index)))
        return item

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
    """A StageDataset with the augmentation settings of `config.data`."""
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
    )


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


__all__ = ["MODES", "StageDataset", "build_stage_dataset", "collate"]
