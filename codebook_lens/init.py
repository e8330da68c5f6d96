"""Data-driven codebook initialisation and codebook maintenance during training: dead-code
replacement and merging of near-duplicate codes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from codebook_lens.quantizer import Codebook, topk_codes

__all__ = ["init_from_activations", "kmeans", "merge_duplicate_codes", "replace_dead_codes"]


def _as_groups(cb: Codebook, acts: Tensor) -> Tensor:
    """Activations as ``[M, n_groups, d]`` in the space the codes live in."""
    acts = cb.normalize_input(acts.to(cb.codebook.dtype))
    return cb._flatten(acts)


def _sample_rows(acts: Tensor, n: int, g: torch.Generator) -> Tensor:
    """``[G, n, d]``: n rows per group drawn from ``acts`` [M, G, d] (with replacement if M < n)."""
    m, n_groups, _ = acts.shape
    if m >= n:
        idx = torch.rand(n_groups, m, generator=g).argsort(dim=1)[:, :n]
    else:
        idx = torch.randint(m, (n_groups, n), generator=g)
    idx = idx.to(acts.device)
    return acts.transpose(0, 1).gather(1, idx[..., None].expand(-1, -1, acts.shape[-1]))


def kmeans(
    acts: Float[Tensor, "m n_groups d"],
    n_codes: int,
    iters: int = 10,
    similarity: str = "euclidean",
    seed: int = 0,
) -> Float[Tensor, "n_groups n_codes d"]:
    """Batched Lloyd's k-means per group (assignment by ``similarity``); empty clusters keep
    their previous centre. Starts from sampled rows."""
    g = torch.Generator().manual_seed(seed)
    centres = _sample_rows(acts, n_codes, g).clone()
    m, n_groups, d = acts.shape
    offs = torch.arange(n_groups, device=acts.device).view(1, -1) * n_codes
    for _ in range(iters):
        assign = topk_codes(acts, centres, 1, similarity)[..., 0]  # [M, G]
        flat = (assign + offs).reshape(-1)
        sums = torch.zeros(n_groups * n_codes, d, dtype=acts.dtype, device=acts.device)
        sums.index_add_(0, flat, acts.reshape(-1, d))
        counts = torch.bincount(flat, minlength=n_groups * n_codes).to(acts.dtype)
        new = sums / counts.clamp_min(1)[:, None]
        keep = (counts == 0)[:, None]
        centres = torch.where(keep, centres.reshape(-1, d), new).reshape(n_groups, n_codes, d)
    return centres


@torch.no_grad()
def init_from_activations(
    cb: Codebook, acts: Float[Tensor, "... d_in"], method: str | None = None
) -> None:
    """Set ``cb``'s codes from activations of its site (``method`` defaults to ``cfg.init``).

    ``"sample"`` copies random activations; ``"kmeans"`` runs k-means on them; ``"random"``
    leaves the codes as constructed. Activations are taken in the codes' space (after
    ``input_norm``).
    """
    method = method or cb.cfg.init
    if method == "random":
        return
    flat = _as_groups(cb, acts)
    if flat.shape[0] == 0:
        raise ValueError("init_from_activations got no activations; pass at least one token")
    g = torch.Generator().manual_seed(cb.cfg.seed)
    if method == "sample":
        new = _sample_rows(flat, cb.cfg.n_codes, g)
        if flat.shape[0] < cb.cfg.n_codes:  # duplicates: jitter so codes can separate
            noise = torch.randn(new.shape, generator=g).to(new) * 1e-3 * new.norm(dim=-1).mean()
            new = new + noise
    elif method == "kmeans":
        sim = "cosine" if cb.cfg.similarity == "cosine" else "euclidean"
        new = kmeans(flat, cb.cfg.n_codes, cb.cfg.kmeans_iters, sim, cb.cfg.seed)
    else:
        raise ValueError(f"unknown init method {method!r}; choose 'random', 'sample' or 'kmeans'")
    cb.codebook.copy_(new)


@torch.no_grad()
def replace_dead_codes(cb: Codebook, threshold: float | None = None) -> Tensor:
    """Re-seed codes used fewer than ``threshold`` times since the last call (default
    ``cfg.dead_code_threshold``) from recent training activations; returns how many were
    replaced (a 0-d tensor) and restarts the usage window."""
    return _replace_dead(cb, threshold).sum()


@torch.no_grad()
def _replace_dead(cb: Codebook, threshold: float | None = None) -> Tensor:
    """:func:`replace_dead_codes`, returning the ``[n_groups, n_codes]`` mask of re-seeded codes."""
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
