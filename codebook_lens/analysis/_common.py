"""Helpers shared by the analysis modules: position/head selections and label encoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []

PositionSpec = int | slice | Sequence[int] | Tensor | None
HeadSpec = int | Sequence[int] | Tensor | None


def encode_labels(labels: Tensor, n_labels: int | None) -> tuple[Tensor, int]:
    """Map user labels to ``[-1, n_labels]`` (long): -1 = ignore, ``n_labels`` = background.

    Boolean labels become one label (True -> 0, False -> background); integer labels keep their
    ids, with -1 meaning "ignore this position".
    """
    if labels.dtype == torch.bool:
        if n_labels not in (None, 1):
            raise ValueError(f"boolean labels define exactly one label; got n_labels={n_labels}")
        return torch.where(labels, 0, 1).long(), 1
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(
            f"labels must be a bool or integer tensor, got dtype {labels.dtype}; use -1 for "
            "positions to ignore"
        )
    lab = labels.long()
    lo = int(lab.min()) if lab.numel() else 0
    hi = int(lab.max()) if lab.numel() else -1
    if lo < -1:
        raise ValueError(f"integer labels must be >= -1 (-1 = ignore); got min {lo}")
    if n_labels is None:
        n_labels = max(hi + 1, 1)
    elif hi >= n_labels:
        raise ValueError(f"label {hi} >= n_labels={n_labels}; pass n_labels={hi + 1} or more")
    return lab, n_labels


def position_mask(positions: PositionSpec, n_pos: int, batch: int, device: Any) -> Tensor:
    """A Bool mask ``[batch or 1, n_pos]`` of the selected positions (negative = from the end)."""
    if positions is None:
        return torch.ones(1, n_pos, dtype=torch.bool, device=device)
    if isinstance(positions, slice):
        mask = torch.zeros(n_pos, dtype=torch.bool, device=device)
        mask[positions] = True
        return mask[None]
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape[-1] != n_pos or positions.dim() not in (1, 2):
            raise ValueError(
                f"a boolean position mask must have shape [pos] or [batch, pos] with pos={n_pos}, "
                f"got {tuple(positions.shape)}"
            )
        if positions.dim() == 2 and positions.shape[0] not in (1, batch):
            raise ValueError(
                f"position mask has batch {positions.shape[0]} but the codes have batch {batch}"
            )
        return positions.to(device).reshape(-1, n_pos)
    idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1).to(device)
    if idx.numel() and (int(idx.max()) >= n_pos or int(idx.min()) < -n_pos):
        raise IndexError(
            f"position(s) {idx.tolist()} out of range for a sequence of {n_pos} tokens; use "
            "positions in [-pos, pos) (negative counts from the end, -1 = last token, which "
            "also works during generation)"
        )
    mask = torch.zeros(n_pos, dtype=torch.bool, device=device)
    mask[idx % n_pos] = True
    return mask[None]


def head_index(heads: HeadSpec, n_heads: int, device: Any) -> Tensor:
    """Long tensor of selected head indices (all heads for None)."""
    if heads is None:
        return torch.arange(n_heads, device=device)
    idx = torch.as_tensor(heads, dtype=torch.long).reshape(-1).to(device)
    if idx.numel() and (int(idx.max()) >= n_heads or int(idx.min()) < -n_heads):
        raise IndexError(f"head(s) {idx.tolist()} out of range for {n_heads} heads")
    return idx % n_heads


def head_mask(heads: HeadSpec, n_heads: int, device: Any) -> Tensor:
    """Bool ``[n_heads]`` of the selected heads."""
    mask = torch.zeros(n_heads, dtype=torch.bool, device=device)
    mask[head_index(heads, n_heads, device)] = True
    return mask
