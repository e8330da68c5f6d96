"""The arithmetic of codebook maintenance: seeds for dead codes, and near-duplicate codes to park.

Pure functions of tensors; :class:`~codebook_lens.quantizer.Codebook` applies them to its own
state (:meth:`~codebook_lens.quantizer.Codebook.reseed_dead_codes`,
:meth:`~codebook_lens.quantizer.Codebook.merge_duplicate_codes`,
:meth:`~codebook_lens.quantizer.Codebook.maintain`), and
:func:`~codebook_lens.training.train_codebooks` runs them on each codebook's schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["reseeded", "duplicates"]


@torch.no_grad()
def reseeded(
    codebook: Float[Tensor, "n_groups n_codes d"],
    dead: Bool[Tensor, "n_groups n_codes"],
    recent: Float[Tensor, "rows n_groups d"],
) -> Float[Tensor, "n_groups n_codes d"]:
    """``codebook`` with every ``dead`` code replaced by a random row of ``recent`` (of the
    same group, drawn from the global RNG of ``recent``'s device); ``recent`` must have rows."""
    n_groups, n_codes, d = codebook.shape
    idx = torch.randint(recent.shape[0], (n_groups, n_codes), device=recent.device)
    seeds = recent.transpose(0, 1).gather(1, idx[..., None].expand(-1, -1, d))
    return torch.where(dead[..., None], seeds.to(codebook.dtype), codebook)


@torch.no_grad()
def duplicates(
    codebook: Float[Tensor, "n_groups n_codes d"],
    used: Float[Tensor, "n_groups n_codes"],
    threshold: float,
    chunk_mb: float = 64.0,
) -> Bool[Tensor, "n_groups n_codes"]:
    """The used codes (``used > 0``) that have a more-used near-duplicate: a code of the same
    group with more uses (on a tie, the lower id) whose cosine similarity is above
    ``threshold`` (``<= 0``: none). Similarities are computed in tiles of about ``chunk_mb``."""
    n_groups, n_codes, _ = codebook.shape
    parked = torch.zeros_like(used, dtype=torch.bool)
    if threshold <= 0:
        return parked
    unit = F.normalize(codebook.detach().float(), dim=-1)
    ids = torch.arange(n_codes, device=used.device)
    rows = max(1, int(chunk_mb * 2**20) // (4 * n_groups * n_codes))
    for r0 in range(0, n_codes, rows):  # [G, rows, N] similarity tiles
        r = slice(r0, r0 + rows)
        sim = unit[:, r] @ unit.transpose(1, 2)
        u_i, u_j = used[:, r, None], used[:, None, :]
        dominates = (u_j > u_i) | ((u_j == u_i) & (ids[None, None, :] < ids[None, r, None]))
        near = (sim > threshold) & dominates & (u_j > 0)
        parked[:, r] = near.any(-1) & (used[:, r] > 0)
    return parked
