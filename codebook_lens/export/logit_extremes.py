"""The tokens each code of a site promotes and suppresses most: the top and bottom of its direct
logit attribution over the whole vocabulary, for every code at once, in bounded memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codebook_lens.analysis.logits import apply_final_ln, code_residual_vectors
from codebook_lens.model import CodebookModel

__all__ = ["LogitExtremes", "logit_extremes"]


@dataclass
class LogitExtremes:
    """Top and bottom logit effects of every code of one site, per head (group)."""

    top_ids: Int[Tensor, "head n_codes n"]
    """Token ids with the largest effect, largest first."""

    top_values: Float[Tensor, "head n_codes n"]
    """Their effects."""

    bottom_ids: Int[Tensor, "head n_codes n"]
    """Token ids with the smallest (most negative) effect, smallest first."""

    bottom_values: Float[Tensor, "head n_codes n"]
    """Their effects."""


@torch.no_grad()
def logit_extremes(
    cm: CodebookModel, site: str, n: int = 10, max_mb: float = 64.0
) -> LogitExtremes:
    """The ``n`` largest and ``n`` smallest direct logit attributions of every code at
    ``site``: what :func:`~codebook_lens.analysis.code_logit_attribution` gives over the whole
    vocabulary (final norm scale frozen at 1, ``1/k`` included with ``combine="mean"``), with
    the codes' residual vectors computed once and the ``[codes, vocab]`` products made
    ``max_mb`` MiB at a time. Raises ``ValueError`` where the site has no direct path to the
    logits (see ``code_residual_vectors``)."""
    vec = code_residual_vectors(cm, site)  # [H, N, d_model]
    H, N, d = vec.shape
    W_U = cm.W_U.detach()
    n = min(n, W_U.shape[1])
    rows = apply_final_ln(cm, vec.reshape(H * N, d), 1.0)
    step = max(1, int(max_mb * 2**20) // (4 * W_U.shape[1]))
    out = [torch.empty(H * N, n, dtype=t) for t in (torch.long, torch.float32) * 2]
    for a in range(0, H * N, step):
        logits = (rows[a : a + step] @ W_U).float()
        top = logits.topk(n, dim=-1)
        bottom = logits.topk(n, dim=-1, largest=False)
        for dst, src in zip(out, (top.indices, top.values, bottom.indices, bottom.values)):
            dst[a : a + step] = src.cpu()
    return LogitExtremes(*(t.view(H, N, n) for t in out))
