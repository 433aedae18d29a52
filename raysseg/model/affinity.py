"""Task affinity, cross-task affinity, and the one row-chunked routine that applies them.

With N = h*w feature positions, A_seg, A_sal and A_CT are N x N. At a 321 training crop (41 x 41,
N = 1681) they are computed whole, with autograd. At full resolution without gradients (label
updates: 640 x 480 -> 80 x 60, N = 4800, about 92 MB per fp32 matrix) `affinity_products` works on
blocks of rows sized from a byte budget instead. That is exact, because
- A_t = row_softmax(theta . phi^T) normalises each row on its own,
- A_t . V, A_CT . V are row-wise products,
- Omega comes from a 3x3 conv over the stacked [A_seg, A_sal] N x N "image": rows [s, e) of Omega
  need rows [s-1, e+1) of A_seg / A_sal (a one-row halo); zero padding only at the true border rows
  -1 and N, and always left and right (columns are never split).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Hidden width of the Omega network's 3x3 conv over the 2-channel N x N map. Every hidden channel is
# one more N x N tensor (11 MB per image at a 321 crop, 92 MB at 640 x 480), so it is kept small:
# 8 channels give the gate 8 local detectors of how the two affinities agree, at little memory.
OMEGA_HIDDEN_CHANNELS = 8

# N-wide float rows alive at the peak of one chunk, per row of the chunk; turns the byte budget into
# rows. Counting tensors gives 6 + OMEGA_HIDDEN_CHANNELS (the stacked pair, its padded copy, the
# hidden map, the Omega logits and weights), but a CPU (oneDNN) conv3x3 adds its own buffers:
# measured peak RSS with 8 hidden channels was about 41 rows (tests/test_model.py checks it).
NXN_ROWS_PER_CHUNK_ROW = 48


@dataclass
class AffinityState:
    """Everything needed to rebuild A_seg, A_sal and A_CT (with the model's Omega network).

    Holds the (B, N, d) projections rather than N x N matrices, so it stays small and A_CT can be
    applied to any (B, K, h, w) map later (CAM propagation in the label update).
    """

    seg_query: Tensor  # (B, N, d) theta_seg(X_seg), already divided by the temperature
    seg_key: Tensor  # (B, N, d) phi_seg(X_seg)
    sal_query: Tensor  # (B, N, d)
    sal_key: Tensor  # (B, N, d)
    height: int
    width: int

    @property
    def num_positions(self) -> int:
        return self.height * self.width

    @property
    def batch_size(self) -> int:
        return self.seg_query.shape[0]

    def detach(self) -> AffinityState:
        return AffinityState(
            self.seg_query.detach(),
            self.seg_key.detach(),
            self.sal_query.detach(),
            self.sal_key.detach(),
            self.height,
            self.width,
        )


@dataclass
class AffinityProducts:
    """Row-wise products (B, N, K); None where no values were given."""

    seg: Tensor | None  # A_seg . seg_values
    sal: Tensor | None  # A_sal . sal_values
    cross: Tensor | None  # A_CT . cross_values


def to_rows(maps: Tensor) -> Tensor:
    """(B, K, h, w) -> (B, N, K), one row per position."""
    return maps.flatten(2).transpose(1, 2)


def from_rows(rows: Tensor, height: int, width: int) -> Tensor:
    """(B, N, K) -> (B, K, h, w)."""
    return rows.transpose(1, 2).reshape(rows.shape[0], rows.shape[2], height, width)


class TaskAffinity(nn.Module):
    """A_t = row_softmax(theta(X) . phi(X)^T / temperature); X' = X + W(A_t . g(X)).

    No 1/sqrt(d) scaling (as in the reference); the temperature (default 1) takes its place.
    """

    def __init__(self, channels: int = 128, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"TaskAffinity: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.theta = nn.Conv2d(channels, channels, kernel_size=1)
        self.phi = nn.Conv2d(channels, channels, kernel_size=1)
        self.g = nn.Conv2d(channels, channels, kernel_size=1)
        self.output = nn.Conv2d(channels, channels, kernel_size=1)  # W_t

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """X (B, d, h, w) -> query (B, N, d) scaled by 1/temperature, key (B, N, d)."""
        return to_rows(self.theta(x)) / self.temperature, to_rows(self.phi(x))

    def values(self, x: Tensor) -> Tensor:
        return to_rows(self.g(x))  # (B, N, d)

    def enhance(self, x: Tensor, attended: Tensor) -> Tensor:
        """X' = X + W(A_t . g(X)), with attended = A_t . g(X) as (B, N, d)."""
        return x + self.output(from_rows(attended, x.shape[2], x.shape[3]))

    def forward(self, x: Tensor) -> Tensor:
        """The whole A_t (B, N, N), for inspection and tests (the model goes through the chunks)."""
        query, key = self.project(x)
        return task_affinity_rows(query, key, 0, query.shape[1])


def task_affinity_rows(query: Tensor, key: Tensor, start: int, stop: int) -> Tensor:
    """Rows [start, stop) of row_softmax(query . key^T): (B, stop - start, N), in float32.

    The logits are unscaled dot products of 128-d features and can exceed the fp16 range, so they
    are formed in float32 even under autocast.
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        logits = query[:, start:stop].float() @ key.float().transpose(1, 2)
        return torch.softmax(logits, dim=-1)


class CrossTaskAffinity(nn.Module):
    """Omega = channel softmax(conv1x1(ReLU(conv3x3([A_seg, A_sal])))); A_CT = sum_k Omega_k A_k."""

    def __init__(self, hidden_channels: int = OMEGA_HIDDEN_CHANNELS) -> None:
        super().__init__()
        # No vertical padding: the caller adds a halo row (a zero row at the border) on each side.
        self.conv3x3 = nn.Conv2d(2, hidden_channels, kernel_size=3, padding=(0, 1))
        self.relu = nn.ReLU(inplace=True)
        self.conv1x1 = nn.Conv2d(hidden_channels, 2, kernel_size=1)

    def forward(self, padded_pair: Tensor) -> Tensor:
        """Rows s-1..e of [A_seg, A_sal] (B, 2, R+2, N) -> rows s..e-1 of A_CT (B, R, N)."""
        omega = torch.softmax(self.conv1x1(self.relu(self.conv3x3(padded_pair))), dim=1)
        center = padded_pair[:, :, 1:-1]  # (B, 2, R, N)
        return omega[:, 0] * center[:, 0] + omega[:, 1] * center[:, 1]

    def full(self, seg_affinity: Tensor, sal_affinity: Tensor) -> Tensor:
        """The whole A_CT (B, N, N) from whole A_seg, A_sal; for inspection and tests."""
        pair = torch.stack((seg_affinity, sal_affinity), dim=1)
        return self(F.pad(pair, (0, 0, 1, 1)))


def chunk_rows_for_budget(
    num_positions: int, batch_size: int, memory_bytes: float, element_size: int = 4
) -> int:
    """Rows per chunk so that one chunk's N-wide tensors (halo included) fit in `memory_bytes`.

    Never below 1 row (a single row is the smallest exact chunk) nor above N.
    """
    bytes_per_row = batch_size * num_positions * element_size * NXN_ROWS_PER_CHUNK_ROW
    rows = int(memory_bytes // bytes_per_row) - 2  # minus the halo rows above and below
    return min(max(rows, 1), num_positions)


def chunk_peak_bytes(
    chunk_rows: int, num_positions: int, batch_size: int, element_size: int = 4
) -> int:
    """Upper estimate of the N-wide bytes alive while a chunk of `chunk_rows` rows is processed."""
    return (chunk_rows + 2) * batch_size * num_positions * element_size * NXN_ROWS_PER_CHUNK_ROW


def affinity_products(
    state: AffinityState,
    cross_task: CrossTaskAffinity,
    chunk_rows: int,
    seg_values: Tensor | None = None,
    sal_values: Tensor | None = None,
    cross_values: Tensor | None = None,
) -> AffinityProducts:
    """A_seg . seg_values, A_sal . sal_values, A_CT . cross_values, `chunk_rows` rows at a time.

    Values are (B, N, K). The only place in raysseg that forms affinity rows: X' enhancement,
    refined predictions and CAM propagation all come through here.
    """
    n = state.num_positions
    if chunk_rows < 1:
        raise ValueError(f"affinity_products: chunk_rows must be >= 1, got {chunk_rows}")
    for name, values in (("seg", seg_values), ("sal", sal_values), ("cross", cross_values)):
        if values is not None and (values.shape[0] != state.batch_size or values.shape[1] != n):
            raise ValueError(
                f"affinity_products: {name}_values has shape {tuple(values.shape)}, expected "
                f"({state.batch_size}, {n}, K)"
            )
    halo = 1 if cross_values is not None else 0
    seg_parts: list[Tensor] = []
    sal_parts: list[Tensor] = []
    cross_parts: list[Tensor] = []
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        first, last = max(start - halo, 0), min(stop + halo, n)
        pair = torch.stack(
            (
                task_affinity_rows(state.seg_query, state.seg_key, first, last),
                task_affinity_rows(state.sal_query, state.sal_key, first, last),
            ),
            dim=1,
        )  # (B, 2, last - first, N)
        if halo:
            # Zero rows only where the halo falls outside the matrix (rows -1 and N).
            pair = F.pad(pair, (0, 0, halo - (start - first), halo - (last - stop)))
        center = pair[:, :, halo : pair.shape[2] - halo]  # rows [start, stop)
        if seg_values is not None:
            seg_parts.append(center[:, 0] @ seg_values.to(center.dtype))
        if sal_values is not None:
            sal_parts.append(center[:, 1] @ sal_values.to(center.dtype))
        if cross_values is not None:
            cross_rows = cross_task(pair)  # (B, R, N)
            cross_parts.append(cross_rows @ cross_values.to(cross_rows.dtype))
            del cross_rows
        del pair, center  # free this chunk before the next one is formed
    return AffinityProducts(
        seg=torch.cat(seg_parts, dim=1) if seg_parts else None,
        sal=torch.cat(sal_parts, dim=1) if sal_parts else None,
        cross=torch.cat(cross_parts, dim=1) if cross_parts else None,
    )


__all__ = [
    "NXN_ROWS_PER_CHUNK_ROW",
    "OMEGA_HIDDEN_CHANNELS",
    "AffinityProducts",
    "AffinityState",
    "CrossTaskAffinity",
    "TaskAffinity",
    "affinity_products",
    "chunk_peak_bytes",
    "chunk_rows_for_budget",
    "from_rows",
    "task_affinity_rows",
    "to_rows",
]
