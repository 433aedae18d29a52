"""Stand-ins shared by the tests: AuxSegNet's outputs and interface at toy size, a fixed data set.

A plain module (no tests, no fixtures; those live in conftest.py): test modules import from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FakeOutputs:
    """Same fields as raysseg.model.network.AuxSegOutputs."""

    cls_logits: torch.Tensor
    cam: torch.Tensor
    seg: torch.Tensor | None = None
    sal: torch.Tensor | None = None
    seg_refined: torch.Tensor | None = None
    sal_refined: torch.Tensor | None = None
    affinity: torch.Tensor | None = None


class FakeSegNet(nn.Module):
    """AuxSegNet's interface at toy size: stride-2 features, 1x1 heads, a 1x1 'refinement'."""

    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes - 1, 1, bias=False)
        self.seg_head = nn.Conv2d(width, num_classes, 1)
        self.sal_head = nn.Conv2d(width, 1, 1)
        self.refine = nn.Conv2d(num_classes, num_classes, 1)

    def forward(self, images: torch.Tensor, heads: str = "all") -> FakeOutputs:
        features = self.backbone(images)
        cam = self.classifier(features)
        cls_logits = cam.mean(dim=(2, 3))
        if heads == "cls":
            return FakeOutputs(cls_logits=cls_logits, cam=cam)
        seg = self.seg_head(features)
        sal = self.sal_head(features)
        return FakeOutputs(
            cls_logits=cls_logits,
            cam=cam,
            seg=seg,
            sal=sal,
            seg_refined=seg + self.refine(seg),
            sal_refined=sal * 0.5 + 0.1,
        )

    def head_parameters(self) -> list[nn.Parameter]:
        heads = (self.classifier, self.seg_head, self.sal_head, self.refine)
        return [p for head in heads for p in head.parameters()]

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        return [
            {"params": list(self.backbone.parameters()), "lr": lr},
            {"params": self.head_parameters(), "lr": lr * head_lr_mult},
        ]

    def model_args(self) -> dict:
        return {"num_classes": self.num_classes, "width": self.width}


class OracleSegNet(nn.Module):
    """Predicts the class id written into channel 0 of the image (a model forced to be perfect)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor, heads: str = "all") -> FakeOutputs:
        class_map = images[:, 0].round().long().clamp(0, self.num_classes - 1)  # (B, H, W)
        logits = 10.0 * nn.functional.one_hot(class_map, self.num_classes).permute(0, 3, 1, 2)
        batch = images.shape[0]
        return FakeOutputs(
            cls_logits=torch.zeros(batch, self.num_classes - 1),
            cam=torch.zeros(batch, self.num_classes - 1, *images.shape[-2:]),
            seg=logits.float(),
            seg_refined=logits.float() + self.dummy,
        )


def tiny_batches(
    num_batches: int = 2, batch_size: int = 2, size: int = 16, num_classes: int = 3, seed: int = 0
) -> list[dict]:
    """A fixed data set: left half background, right half one class whose colour tells it."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(num_batches):
        images, segs, labels = [], [], []
        for _ in range(batch_size):
            fg = int(torch.randint(1, num_classes, (1,), generator=generator))
            seg = torch.zeros(size, size, dtype=torch.int64)
            seg[:, size // 2 :] = fg
            image = 0.1 * torch.randn(3, size, size, generator=generator)
            image[fg % 3, :, size // 2 :] += 1.0  # the foreground colour tells the class
            image[:, :, : size // 2] -= 0.5
            label = torch.zeros(num_classes - 1)
            label[fg - 1] = 1.0
            images.append(image)
            segs.append(seg)
            labels.append(label)
        seg_batch = torch.stack(segs)
        seg_batch[:, 0, 0] = 255  # an ignored pixel in every map
        batches.append(
            {
                "image": torch.stack(images),
                "labels": torch.stack(labels),
                "seg": seg_batch,
                "sal": (torch.stack(segs) > 0).float(),
                "gt": seg_batch.clone(),
                "image_id": [f"img_{b}_{i}" for i in range(batch_size)],
            }
        )
    return batches
