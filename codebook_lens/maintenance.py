"""Codebook maintenance during training: re-seeding dead codes and parking near-duplicates.

:func:`~codebook_lens.training.train_codebooks` runs :func:`maintain_codebook` on each
codebook's schedule (:func:`maintenance_due`); both steps can also be called by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from codebook_lens.quantizer import Codebook

__all__ = [
    "maintain_codebook",
    "maintenance_due",
    "merge_duplicate_codes",
    "reseed_dead_codes",
    "replace_dead_codes",
]


@torch.no_grad()
def replace_dead_codes(cb: Codebook, threshold: float | None = None) -> Int[Tensor, ""]:
    """Re-seed codes used fewer than ``threshold`` times since the last call (default
    ``cfg.dead_code_threshold``) from recent training activations; returns how many were
    replaced (a 0-d tensor) and restarts the usage window."""
    return reseed_dead_codes(cb, threshold).sum()


@torch.no_grad()
def reseed_dead_codes(
    cb: Codebook, threshold: float | None = None
) -> Bool[Tensor, "n_groups n_codes"]:
    """:func:`replace_dead_codes`, returning the mask of re-seeded codes instead of their count
    (all False when ``threshold <= 0`` or no training forward has run yet)."""
    threshold = cb.cfg.dead_code_threshold if threshold is None else threshold
    dead = cb.window_counts < threshold  # [G, N]
    cb.window_counts.zero_()
    if cb.recent is None or threshold <= 0:
        return torch.zeros_like(dead)
    recent = cb.recent  # [R, G, d]
    n_groups, n_codes, d = cb.codebook.shape
    idx = torch.randint(recent.shape[0], (n_groups, n_codes), device=recent.device)
    seeds = recent.transpose(0, 1).gather(1, idx[..., None].expand(-1, -1, d))
    cb.codebook.copy_(torch.where(dead[..., None], seeds.to(cb.codebook.dtype), cb.codebook))
    return dead


@torch.no_grad()
def merge_duplicate_codes(
    cb: Codebook, threshold: float | None = None, chunk_mb: float = 64.0
) -> Bool[Tensor, "n_groups n_codes"]:
    """Park every used code that has a more-used near-duplicate; return the parked codes.

    Among the codes used since the last maintenance (``cb.window_counts > 0``), code ``i`` is
    parked when a code ``j`` of the same group with more uses (on a tie, the lower id) has
    cosine similarity above ``threshold`` (default ``cfg.merge_threshold``; ``<= 0`` parks
    nothing). A parked code becomes the zero vector, which scores 0 under every similarity, so
    the positions that chose it move to their next-best code (in practice the near-duplicate)
    and it stays unused while some code scores above 0. It is re-seeded later only if dead-code
    replacement is on. The usage window is left for the caller to restart.

    Why: with many more codes than the site has distinct states, a cluster stretched along a
    nuisance direction (position, say) is split between several codes, each a perfect-precision
    but low-recall detector; merging them gives one code per feature.
    """
    threshold = cb.cfg.merge_threshold if threshold is None else threshold
    used = cb.window_counts  # [G, N]
    n_groups, n_codes, _ = cb.codebook.shape
    parked = torch.zeros_like(used, dtype=torch.bool)
    if threshold <= 0:
        return parked
    unit = F.normalize(cb.codebook.detach().float(), dim=-1)
    ids = torch.arange(n_codes, device=used.device)
    rows = max(1, int(chunk_mb * 2**20) // (4 * n_groups * n_codes))
    for r0 in range(0, n_codes, rows):  # [G, rows, N] similarity tiles
        r = slice(r0, r0 + rows)
        sim = unit[:, r] @ unit.transpose(1, 2)
        u_i, u_j = used[:, r, None], used[:, None, :]
        dominates = (u_j > u_i) | ((u_j == u_i) & (ids[None, None, :] < ids[None, r, None]))
        near = (sim > threshold) & dominates & (u_j > 0)
        parked[:, r] = near.any(-1) & (used[:, r] > 0)
    cb.codebook.masked_fill_(parked[..., None], 0.0)
    return parked


def maintenance_due(cb: Codebook, step: int) -> bool:
    """Whether ``cb``'s maintenance runs after optimizer step ``step`` (counted from 1): some
    maintenance is on (``dead_code_threshold > 0`` or ``merge_threshold > 0``) and ``step`` is a
    multiple of ``cfg.replace_every``."""
    c = cb.cfg
    return (c.dead_code_threshold > 0 or c.merge_threshold > 0) and step % c.replace_every == 0


@torch.no_grad()
def maintain_codebook(cb: Codebook) -> Bool[Tensor, "n_groups n_codes"]:
    """One maintenance pass: :func:`merge_duplicate_codes`, then :func:`reseed_dead_codes` (which
    restarts the usage window); returns the mask of codes that were parked or re-seeded, whose
    optimizer moments the caller should reset."""
    return merge_duplicate_codes(cb) | reseed_dead_codes(cb)
