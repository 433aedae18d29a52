"""Heads of AuxSegNet: classification (+ CAM), task feature heads, and dense prediction heads."""

from __future__ import annotations

from torch import Tensor, nn

TASK_CHANNELS = 128  # width of the seg / sal task features X_t (METHOD.md, Network 3)


class ClassificationHead(nn.Module):
    """Dropout 0.5 on F, global average pooling, 1x1 conv without bias -> C-1 logits.

    The CAM uses the same 1x1 weights on F without dropout. Dropout is channel-wise (Dropout2d), as
    in the PSA family of networks this backbone comes from: it drops whole maps before pooling.
    """

    def __init__(self, in_channels: int, num_foreground: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(p=dropout)
        self.classifier = nn.Conv2d(in_channels, num_foreground, kernel_size=1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, F, h, w) -> logits (B, C-1), raw CAM (B, C-1, h, w)."""
        pooled = self.dropout(features).mean(dim=(2, 3), keepdim=True)  # (B, F, 1, 1)
        logits = self.classifier(pooled).flatten(1)
        cam = self.classifier(features)
        return logits, cam


class TaskFeatureHead(nn.Module):
    """conv3x3 dilation 6 (F -> 128) + ReLU, conv3x3 dilation 12 (128 -> 128) + ReLU: X_t."""

    def __init__(self, in_channels: int, channels: int = TASK_CHANNELS) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=6, dilation=6),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=12, dilation=12),
            nn.ReLU(inplace=True),
        )
        _init_relu_convs(self.layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)  # (B, 128, h, w)


class PredictionHead(nn.Module):
    """P_t = conv1x1(ReLU(conv3x3 dilation 18 (X_t'))): C logits (seg) or 1 logit (sal)."""

    def __init__(self, out_channels: int, channels: int = TASK_CHANNELS) -> None:
        super().__init__()
        self.hidden = nn.Conv2d(channels, channels, kernel_size=3, padding=18, dilation=18)
        self.relu = nn.ReLU(inplace=True)
        self.output = nn.Conv2d(channels, out_channels, kernel_size=1)
        _init_relu_convs(self.hidden)
        # Small initial logits: the first predictions are near-uniform instead of confidently wrong.
        nn.init.normal_(self.output.weight, std=0.01)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.relu(self.hidden(x)))  # (B, K, h, w)


def _init_relu_convs(module: nn.Module) -> None:
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)


__all__ = ["TASK_CHANNELS", "ClassificationHead", "PredictionHead", "TaskFeatureHead"]
