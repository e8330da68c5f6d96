"""Data-driven codebook initialisation: codes sampled from, or clustered on, activations of the
codebook's site. Maintenance during training is in :mod:`codebook_lens.maintenance`."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from codebook_lens.quantizer import Codebook
from codebook_lens.topk import topk_codes

__all__ = ["init_from_activations", "kmeans"]


def _as_groups(cb: Codebook, acts: Tensor) -> Tensor:
    """Activations as ``[M, n_groups, d]`` in the space the codes live in."""
    acts = cb.normalize_input(acts.to(cb.codebook.dtype))
    return cb.flatten_input(acts)


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
    similarity: Literal["cosine", "dot", "euclidean"] = "euclidean",
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
    cb: Codebook,
    acts: Float[Tensor, "... d_in"],
    method: Literal["random", "sample", "kmeans", "sae"] | None = None,
) -> None:
    """Set ``cb``'s codes from activations of its site (``method`` defaults to ``cfg.init``).

    ``"sample"`` copies random activations; ``"kmeans"`` runs k-means on them; ``"random"``
    and ``"sae"`` leave the codes as they are. Activations are taken in the codes' space (after
    ``input_norm``).
    """
    method = method or cb.cfg.init
    if method in ("random", "sae"):
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
