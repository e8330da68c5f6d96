"""Attribution patching for codes: a gradient estimate of every active code's effect.

Removing code ``c`` from slot ``s`` at (position, head) changes the site's output by ``-v_c``
(its code vector, divided by k under ``combine="mean"``). To first order the metric changes by
``-grad . v_c``, where ``grad`` is the gradient of the metric with respect to the site's output.
One forward and one backward pass give the estimate for every active code at every site at
once (compare: one forward pass per code for real ablation with
:func:`~codebook_lens.analysis.patching.ablate_codes`).

Codebooks downstream of a change are piecewise constant: a small change keeps their codes, a
large one may switch them, which no gradient sees. By default (``through="frozen"``) the
gradient does not pass through them, so the estimate linearizes "ablate this code, holding every
other site's codes"; ``"straight_through"`` passes it as training does. Sites with the error
term pass changes exactly, and there both agree with real ablation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codebook_lens.model import CodebookModel, codes_hook_name
from codebook_lens.quantizer import Codebook

__all__ = ["CodeAttribution", "code_attribution_patching"]


@dataclass
class CodeAttribution:
    """Estimated metric change of removing each active code at one site."""

    site: str
    """The site."""

    codes: Int[Tensor, "batch pos *head k"]
    """The active codes of the run (the site's layout)."""

    effect: Float[Tensor, "batch pos *head k"]
    """``-grad . vector`` of each code: the linear estimate of ``metric(ablated) - metric``;
    0 at empty slots."""

    grad: Float[Tensor, "batch pos *head d_in"]
    """Gradient of the metric with respect to the site's output (in the codebook's layout)."""

    metric: float
    """The metric of the unpatched run."""


def code_attribution_patching(
    cm: CodebookModel,
    tokens: Int[Tensor, "batch pos"],
    metric: Callable[[Tensor], Tensor],
    sites: Sequence[str] | None = None,
    through: Literal["frozen", "straight_through"] = "frozen",
) -> dict[str, CodeAttribution]:
    """Estimate, for every active code at ``sites``, the metric change of ablating it.

    Args:
        cm: A CodebookModel.
        tokens: Input ``[batch, pos]``.
        metric: ``logits -> scalar tensor``, differentiable (sum or mean per-example values so
            each example's gradient is its own).
        sites: Sites (default: all); ``through`` applies to these sites.
        through: How the gradient passes a quantized site downstream of a change.
            ``"frozen"`` (default): as the discrete model does locally, not at all (its output
            depends on its input only through the chosen codes, which a small change keeps).
            ``"straight_through"``: as in training, as if the quantizer were the identity.
            Sites with ``use_error_term=True`` are the identity either way.

    Returns:
        Site -> :class:`CodeAttribution`.
    """
    sites = list(cm.sites if sites is None else sites)
    cbs = {s: cm.codebook(s) for s in sites}
    if through not in ("frozen", "straight_through"):
        raise ValueError(f"through={through!r}; choose 'frozen' or 'straight_through'")
    deltas: dict[str, Tensor] = {}
    codes: dict[str, Tensor] = {}

    def grab_codes(site: str):
        def hook(x: Tensor, hook: Any) -> None:
            codes[site] = x.detach().clone()

        return hook

    def add_delta(site: str):
        frozen = through == "frozen" and not cbs[site].cfg.use_error_term

        def hook(act: Tensor, hook: Any) -> Tensor:
            d = torch.zeros_like(act, requires_grad=True)
            deltas[site] = d
            return (act.detach() if frozen else act) + d

        return hook

    fwd = [(codes_hook_name(s), grab_codes(s)) for s in sites] + [(s, add_delta(s)) for s in sites]
    with torch.enable_grad():
        logits = cm.run_with_hooks(tokens, fwd_hooks=fwd)
        m = metric(logits)
        if not isinstance(m, Tensor) or m.numel() != 1:
            raise ValueError("metric must return a scalar tensor (sum or mean over the batch)")
        if not m.requires_grad:
            raise ValueError("metric(logits) does not depend on the logits differentiably")
        grads = torch.autograd.grad(m, [deltas[s] for s in sites], allow_unused=True)
    out = {}
    for s, g in zip(sites, grads):
        c = codes[s]
        g = (torch.zeros_like(deltas[s]) if g is None else g).reshape(
            *c.shape[:-1], cbs[s].cfg.d_in
        )  # the codebook's own layout
        eff = _ablation_effects(cbs[s], c, g, s)
        out[s] = CodeAttribution(s, c, eff.detach(), g.detach(), float(m.detach()))
    return out


def _ablation_effects(cb: Codebook, c: Tensor, g: Tensor, site: str) -> Tensor:
    """First-order metric change of removing each chosen code: ``-grad . code vector``
    (``/ k`` under ``combine="mean"``), 0 at empty slots; ``c`` [..., k], ``g`` [..., d_in]."""
    book = cb.codebook.detach()  # [G, N, d]
    if c.dim() == 4 and cb.cfg.n_groups == c.shape[2]:
        gid = torch.arange(c.shape[2], device=c.device).view(1, 1, -1, 1).expand_as(c)
    elif c.dim() == 4 or cb.cfg.n_groups == 1:
        gid = torch.zeros_like(c)
    else:
        raise RuntimeError(f"unexpected codes shape {tuple(c.shape)} at {site}")
    vec = book[gid, c.clamp_min(0)]  # [..., k, d]
    eff = -(g.unsqueeze(-2) * vec).sum(-1)
    if cb.cfg.combine == "mean":
        eff = eff / cb.cfg.k
    return eff.masked_fill(c < 0, 0.0)
