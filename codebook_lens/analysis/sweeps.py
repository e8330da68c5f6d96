"""Patching sweeps in the style of ``transformer_lens.patching``: one intervention per
(site, position[, head]), returning the metric change of each as a tensor.

Interventions are batched: the input is repeated once per unit (position or position x head) in
a chunk, and one hook edits copy ``u`` at unit ``u`` only, so a sweep costs
``units x batch / max_batch`` forward passes instead of one pass per unit. The result equals
a loop of single patches (validated in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from codebook_lens.model import CodebookModel, codes_hook_name

__all__ = ["SweepResult", "ablation_sweep", "patch_sweep"]

Metric = Callable[[Tensor], Tensor | float]


@dataclass
class SweepResult:
    """Metric changes of single interventions over sites x positions x heads."""

    effects: Float[Tensor, "site pos head"]
    """``metric(patched) - baseline``; the head axis has size 1 without ``per_head`` and NaN
    where a site has fewer heads than the widest one."""

    sites: list[str]
    """Sites, in the order of the first axis."""

    positions: Int[Tensor, " pos"]
    """Positions swept (the second axis)."""

    baseline: float
    """The metric of the run without intervention (the corrupt run for :func:`patch_sweep`)."""

    per_head: bool
    """Whether each head was intervened on separately."""


def _capture_codes(cm: CodebookModel, tokens: Tensor, sites: Sequence[str]) -> tuple[Tensor, dict]:
    got: dict[str, Tensor] = {}

    def grab(site: str):
        def hook(x: Tensor, hook: Any) -> None:
            got[site] = x.detach().clone()

        return hook

    logits = cm.run_with_hooks(tokens, fwd_hooks=[(codes_hook_name(s), grab(s)) for s in sites])
    return logits, got


def _unit_hook(
    site: str,
    up: Tensor,
    uh: Tensor,
    b: int,
    per_head: bool,
    edit: Callable[[str, Tensor, Tensor], Tensor],
) -> Callable[[Tensor, Any], Tensor]:
    """Hook editing copy ``u`` (rows ``u*b .. u*b+b-1``) at position ``up[u]`` (head ``uh[u]``)."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        rows = torch.arange(up.numel() * b, device=x.device)
        unit = rows // b
        pos = up.to(x.device)[unit]
        mask = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        if x.dim() == 4 and per_head:
            mask[rows, pos, uh.to(x.device)[unit]] = True
        else:
            mask[rows, pos] = True  # every head at the position
        return edit(site, x, mask)

    return hook


def _run_sweep(
    cm: CodebookModel,
    tokens: Tensor,
    metric: Metric,
    sites: Sequence[str] | None,
    per_head: bool,
    positions: Sequence[int] | None,
    max_batch: int,
    shapes: dict[str, torch.Size],
    edit: Callable[[str, Tensor, Tensor], Tensor],
    baseline: float,
    progress: bool,
) -> SweepResult:
    b, p = tokens.shape
    pos = torch.arange(p) if positions is None else torch.as_tensor(positions).reshape(-1) % p
    n_heads = {s: (shapes[s][2] if per_head and len(shapes[s]) == 4 else 1) for s in sites}
    h_max = max(n_heads.values())
    effects = torch.full((len(sites), pos.numel(), h_max), float("nan"))
    per_chunk = max(1, max_batch // b)
    total = sum(pos.numel() * n_heads[s] for s in sites)
    bar = tqdm(total=total, desc="sweep", disable=not progress)
    for si, site in enumerate(sites):  # loop over sites; units of a site are batched
        h = n_heads[site]
        unit_pos = pos.repeat_interleave(h)
        unit_head = torch.arange(h).repeat(pos.numel())
        n_units = unit_pos.numel()
        for u0 in range(0, n_units, per_chunk):
            up = unit_pos[u0 : u0 + per_chunk]
            uh = unit_head[u0 : u0 + per_chunk]
            nu = up.numel()

            hook = _unit_hook(site, up, uh, b, per_head, edit)
            logits = cm.run_with_hooks(
                tokens.repeat(nu, 1), fwd_hooks=[(codes_hook_name(site), hook)]
            )
            vals = torch.tensor(
                [float(metric(lg)) for lg in logits.split(b)]  # metric sees one copy
            )
            unit = u0 + torch.arange(nu)
            effects[si, unit // h, unit % h] = vals - baseline
            bar.update(nu)
    bar.close()
    return SweepResult(effects, list(sites), pos, baseline, per_head)


def _sites(cm: CodebookModel, sites: Sequence[str] | None) -> list[str]:
    sites = list(cm.sites if sites is None else sites)
    for s in sites:
        cm.codebook(s)
    if not sites:
        raise ValueError("no sites to sweep; attach a codebook first")
    return sites


@torch.no_grad()
def ablation_sweep(
    cm: CodebookModel,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    sites: Sequence[str] | None = None,
    per_head: bool = True,
    codes: int | Sequence[int] | Tensor | None = None,
    positions: Sequence[int] | None = None,
    max_batch: int = 64,
    progress: bool = False,
) -> SweepResult:
    """Ablate the codes at each (site, position[, head]) in turn; return metric changes.

    Args:
        cm: A CodebookModel.
        tokens: Input ``[batch, pos]``; each intervention applies to every batch row.
        metric: ``logits [batch, pos, vocab] -> scalar`` (as in ``transformer_lens.patching``).
        sites: Sites to sweep (default: all).
        per_head: One intervention per head at per-head sites (else all heads at once).
        codes: Remove only these ids (default: every code at the unit).
        positions: Positions to sweep (default: all).
        max_batch: Sequences per forward pass (copies x batch).
        progress: Show a progress bar.
    """
    sites = _sites(cm, sites)
    clean_logits, clean = _capture_codes(cm, tokens, sites)
    baseline = float(metric(clean_logits))
    ids = None if codes is None else torch.as_tensor(codes, dtype=torch.long).reshape(-1)

    def edit(site: str, x: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1)
        if ids is not None:
            m = m & torch.isin(x, ids.to(x.device))
        return x.masked_fill(m, -1)

    shapes = {s: c.shape for s, c in clean.items()}
    return _run_sweep(
        cm, tokens, metric, sites, per_head, positions, max_batch, shapes, edit, baseline, progress
    )


@torch.no_grad()
def patch_sweep(
    cm: CodebookModel,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    sites: Sequence[str] | None = None,
    per_head: bool = True,
    positions: Sequence[int] | None = None,
    max_batch: int = 64,
    progress: bool = False,
) -> SweepResult:
    """Patch clean codes into the corrupt run at each (site, position[, head]) in turn.

    Returns ``metric(patched corrupt run) - metric(corrupt run)`` per unit; arguments as in
    :func:`ablation_sweep`. Clean and corrupt tokens must have the same shape.
    """
    if clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError(
            f"clean {tuple(clean_tokens.shape)} and corrupt {tuple(corrupt_tokens.shape)} tokens "
            "must have the same shape (pad them to a common length)"
        )
    sites = _sites(cm, sites)
    _, clean = _capture_codes(cm, clean_tokens, sites)
    corrupt_logits, corrupt = _capture_codes(cm, corrupt_tokens, sites)
    baseline = float(metric(corrupt_logits))

    def edit(site: str, x: Tensor, mask: Tensor) -> Tensor:
        src = clean[site].to(x.device, x.dtype)
        src = src.repeat(x.shape[0] // src.shape[0], *([1] * (src.dim() - 1)))
        return torch.where(mask.unsqueeze(-1), src, x)

    shapes = {s: c.shape for s, c in corrupt.items()}
    return _run_sweep(
        cm,
        corrupt_tokens,
        metric,
        sites,
        per_head,
        positions,
        max_batch,
        shapes,
        edit,
        baseline,
        progress,
    )
