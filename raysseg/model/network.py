"""AuxSegNet: shared backbone, classification / saliency / segmentation heads, affinities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from raysseg.config import ModelConfig
from raysseg.model.affinity import (
    AffinityState,
    CrossTaskAffinity,
    TaskAffinity,
    affinity_products,
    chunk_rows_for_budget,
    from_rows,
    to_rows,
)
from raysseg.model.backbone import Backbone
from raysseg.model.builder import build_backbone
from raysseg.model.heads import TASK_CHANNELS, ClassificationHead, PredictionHead, TaskFeatureHead

HEADS = ("all", "cls")


@dataclass
class AuxSegOutputs:
    """Named outputs of one forward pass; dense maps at feature resolution (h, w) = (H, W) / os."""

    cls_logits: Tensor  # (B, C-1)
    cam: Tensor  # (B, C-1, h, w) raw class activation maps (no ReLU, no normalisation)
    seg: Tensor | None = None  # (B, C, h, w) P_seg logits
    sal: Tensor | None = None  # (B, 1, h, w) P_sal logits
    seg_refined: Tensor | None = None  # (B, C, h, w) A_CT . P_seg
    sal_refined: Tensor | None = None  # (B, 1, h, w) A_CT . P_sal
    affinity: AffinityState | None = None  # to apply A_CT to other maps via AuxSegNet.propagate


class AuxSegNet(nn.Module):
    """Multi-task network of AuxSegNet (METHOD.md, Network 1-6).

    `affinity_memory_mb` bounds the N x N tensors formed at once when gradients are off (inference,
    label updates at full resolution); with gradients on, the affinities are formed whole.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        affinity_temperature: float = 1.0,
        affinity_memory_mb: float = 256,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"AuxSegNet: num_classes (incl. background) must be >= 2, got {num_classes}"
            )
        if affinity_memory_mb <= 0:
            raise ValueError(f"AuxSegNet: affinity_memory_mb must be > 0, got {affinity_memory_mb}")
        self.num_classes = num_classes
        self.affinity_temperature = affinity_temperature
        self.affinity_memory_mb = affinity_memory_mb
        self.backbone = backbone
        self.classifier = ClassificationHead(backbone.out_channels, num_classes - 1)
        self.seg_features = TaskFeatureHead(backbone.out_channels)
        self.sal_features = TaskFeatureHead(backbone.out_channels)
        self.seg_affinity = TaskAffinity(TASK_CHANNELS, temperature=affinity_temperature)
        self.sal_affinity = TaskAffinity(TASK_CHANNELS, temperature=affinity_temperature)
        self.cross_task_affinity = CrossTaskAffinity()
        self.seg_predictor = PredictionHead(num_classes)
        self.sal_predictor = PredictionHead(1)

    def forward(
        self, images: Tensor, heads: str = "all", chunk_rows: int | None = None
    ) -> AuxSegOutputs:
        """images (B, 3, H, W) normalised; heads="cls": backbone + classification (warm-up, CAMs).

        chunk_rows forces the affinity chunk size (tests); None picks it from the memory budget.
        """
        if heads not in HEADS:
            raise ValueError(f"AuxSegNet.forward: heads must be one of {HEADS}, got {heads!r}")
        features = self.backbone(images)  # (B, F, h, w)
        cls_logits, cam = self.classifier(features)
        if heads == "cls":
            return AuxSegOutputs(cls_logits=cls_logits, cam=cam)
        height, width = features.shape[2:]
        x_seg = self.seg_features(features)  # (B, 128, h, w)
        x_sal = self.sal_features(features)
        state = AffinityState(
            *self.seg_affinity.project(x_seg), *self.sal_affinity.project(x_sal), height, width
        )
        attended = affinity_products(
            state,
            self.cross_task_affinity,
            chunk_rows=self._chunk_rows(state, chunk_rows),
            seg_values=self.seg_affinity.values(x_seg),
            sal_values=self.sal_affinity.values(x_sal),
        )
        seg = self.seg_predictor(self.seg_affinity.enhance(x_seg, attended.seg))  # (B, C, h, w)
        sal = self.sal_predictor(self.sal_affinity.enhance(x_sal, attended.sal))  # (B, 1, h, w)
        refined = self.propagate(state, torch.cat((seg, sal), dim=1), chunk_rows=chunk_rows)
        seg_refined, sal_refined = refined.split((self.num_classes, 1), dim=1)
        return AuxSegOutputs(
            cls_logits=cls_logits,
            cam=cam,
            seg=seg,
            sal=sal,
            seg_refined=seg_refined,
            sal_refined=sal_refined,
            affinity=state,
        )

    def propagate(
        self, state: AffinityState, values: Tensor, chunk_rows: int | None = None
    ) -> Tensor:
        """A_CT . values, values (B, K, h, w) at the state's feature resolution -> (B, K, h, w)."""
        expected = (state.batch_size, state.height, state.width)
        if values.dim() != 4 or (values.shape[0], *values.shape[2:]) != expected:
            raise ValueError(
                f"AuxSegNet.propagate: values of shape {tuple(values.shape)} do not match the "
                f"affinity (B, K, h, w) = ({expected[0]}, K, {expected[1]}, {expected[2]})"
            )
        products = affinity_products(
            state,
            self.cross_task_affinity,
            chunk_rows=self._chunk_rows(state, chunk_rows),
            cross_values=to_rows(values),
        )
        return from_rows(products.cross, state.height, state.width)

    def _chunk_rows(self, state: AffinityState, chunk_rows: int | None) -> int:
        """Forced size, else whole matrices under autograd, else rows that fit the memory budget."""
        if chunk_rows is not None:
            return chunk_rows
        if torch.is_grad_enabled():
            return state.num_positions
        return chunk_rows_for_budget(
            state.num_positions,
            state.batch_size,
            memory_bytes=self.affinity_memory_mb * 2**20,
            element_size=max(state.seg_query.element_size(), 4),  # softmax runs in fp32 under AMP
        )

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict[str, Any]]:
        """Backbone at `lr`, every head at `lr * head_lr_mult`; frozen parameters left out.

        Each group carries "lr_mult" and "initial_lr", so a poly scheduler sets lr = initial_lr * f.
        """
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        backbone_params = [p for _, p in trainable if id(p) in backbone_ids]
        head_params = [p for _, p in trainable if id(p) not in backbone_ids]
        groups = [
            ("backbone", backbone_params, 1.0),
            ("heads", head_params, head_lr_mult),
        ]
        return [
            {
                "name": name,
                "params": params,
                "lr": lr * mult,
                "initial_lr": lr * mult,
                "lr_mult": mult,
            }
            for name, params, mult in groups
            if params
        ]

    def model_args(self) -> dict[str, Any]:
        """Plain JSON-able arguments for `build_model_from_args` (weights come separately)."""
        backbone_args = getattr(self.backbone, "build_args", None)
        if not backbone_args:
            raise ValueError(
                "AuxSegNet.model_args: the backbone was not made by build_backbone, so it cannot "
                "be described by arguments"
            )
        return {
            "backbone": backbone_args["name"],
            "output_stride": int(backbone_args["output_stride"]),
            "small_width": int(backbone_args["small_width"]),
            "num_classes": int(self.num_classes),
            "affinity_temperature": float(self.affinity_temperature),
            "affinity_memory_mb": self.affinity_memory_mb,
        }


def build_model(model_config: ModelConfig) -> AuxSegNet:
    """AuxSegNet from the `model` config section; `pretrained` as in `builder.load_pretrained`."""
    backbone = build_backbone(
        model_config.backbone,
        output_stride=model_config.output_stride,
        pretrained=model_config.pretrained,
        small_width=model_config.small_width,
    )
    return AuxSegNet(
        backbone,
        num_classes=model_config.num_classes,
        affinity_temperature=model_config.affinity_temperature,
        affinity_memory_mb=model_config.affinity_memory_mb,
    )


MODEL_ARG_KEYS = (
    "backbone",
    "output_stride",
    "small_width",
    "num_classes",
    "affinity_temperature",
    "affinity_memory_mb",
)


def build_model_from_args(args: dict[str, Any]) -> AuxSegNet:
    """Rebuild the model that `AuxSegNet.model_args()` describes (random weights; load after)."""
    unknown = sorted(set(args) - set(MODEL_ARG_KEYS))
    missing = sorted(set(MODEL_ARG_KEYS) - set(args))
    if unknown or missing:
        raise ValueError(f"model args: unknown keys {unknown}, missing keys {missing}")
    # pretrained=None: the caller loads the checkpoint's weights, so nothing is read or warned here.
    backbone = build_backbone(
        args["backbone"],
        output_stride=args["output_stride"],
        pretrained=None,
        small_width=args["small_width"],
    )
    return AuxSegNet(
        backbone,
        num_classes=args["num_classes"],
        affinity_temperature=args["affinity_temperature"],
        affinity_memory_mb=args["affinity_memory_mb"],
    )


__all__ = ["MODEL_ARG_KEYS", "AuxSegNet", "AuxSegOutputs", "build_model", "build_model_from_args"]
