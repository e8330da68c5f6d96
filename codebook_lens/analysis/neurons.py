"""The neuron baseline (Tamkin et al. 2023): at the recall a code reaches, the best precision any
single neuron reaches with a threshold.

A neuron "detects" label ``l`` at threshold ``t`` when its activation is ``>= t`` (or ``<= t``
for the negative direction). For each neuron the activations are sorted once; ranks of each label's
positions along the sorted order (cumulative counts, from a second stable sort by label) give the
true positives of every candidate threshold at once, hence precision and recall. Thresholds
fall only between distinct values (ties are taken together).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from codebook_lens.analysis._common import encode_labels
from codebook_lens.suggest import did_you_mean

__all__ = ["NeuronBaselineResult", "neuron_baseline", "collect_activations"]


@dataclass
class NeuronBaselineResult:
    """Per label, the best single neuron at (at least) the target recall."""

    precision: Float[Tensor, " n_labels"]
    """Best precision any neuron reaches with recall >= the target (0 if none can)."""

    recall: Float[Tensor, " n_labels"]
    """The recall that best neuron actually reaches at its threshold."""

    neuron: Int[Tensor, " n_labels"]
    """Index of the best neuron (-1 if the label never occurs)."""

    threshold: Float[Tensor, " n_labels"]
    """Its threshold: the neuron detects the label when ``sign * act >= sign * threshold``."""

    sign: Int[Tensor, " n_labels"]
    """+1 (high activations) or -1 (low activations, only with ``both_signs=True``)."""

    target_recall: Float[Tensor, " n_labels"]
    """The recall that was asked for."""

    precision_per_neuron: Float[Tensor, "n_neurons n_labels"]
    """Every neuron's best precision at the target recall (best sign)."""


def _best_for_chunk(
    acts: Tensor, lab: Tensor, n_lab: int, needed: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Best precision ``[c, L]`` of each neuron of a chunk, its true positives and threshold.

    Only cuts just after a positive of label ``l`` can be optimal for ``l`` (adding negatives
    lowers precision), and a cut must end a run of tied values. So each position is a candidate
    for its own label only: at the last ``l``-position ``i`` of its tie group, true positives are
    ``rank of i among l-positions + 1`` and predictions ``end of i's tie group + 1``. Two sorts
    and scatter-max give every (neuron, label) optimum in O(N) memory per neuron.
    """
    n, c = acts.shape
    L1 = n_lab + 1
    ar = torch.arange(n)  # work in [c, N] layout: sorts along the contiguous axis
    rows = torch.arange(c).unsqueeze(1)
    vals, order = acts.T.contiguous().sort(dim=-1, descending=True)  # [c, N]
    lab_s = lab[order]  # label of each sorted position
    is_last = torch.ones_like(vals, dtype=torch.bool)
    is_last[:, :-1] = vals[:, :-1] != vals[:, 1:]  # thresholds fall between distinct values
    gid = torch.zeros_like(order)
    gid[:, 1:] = is_last[:, :-1].long().cumsum(-1)  # tie-group id of each sorted position
    end_idx = torch.where(is_last, ar, n).flip(-1).cummin(-1).values.flip(-1)  # group's end
    # group sorted positions by label (stable: increasing position within a label)
    lab2, order2 = lab_s.sort(dim=-1, stable=True)  # order2[:, r] = sorted position of r-th
    counts = torch.zeros(c * L1, dtype=torch.long)
    counts.scatter_add_(0, (rows * L1 + lab_s).flatten(), torch.ones(n * c, dtype=torch.long))
    counts = counts.view(c, L1)
    start = counts.cumsum(1) - counts
    tp = ar - start.gather(1, lab2) + 1  # true positives at that position's cut
    g2 = gid.gather(1, order2)
    last_in_group = torch.ones_like(is_last)
    last_in_group[:, :-1] = (lab2[:, 1:] != lab2[:, :-1]) | (g2[:, 1:] != g2[:, :-1])
    e = end_idx.gather(1, order2)  # cut index (end of the tie group)
    need = torch.cat([needed.long(), needed.new_full((1,), n + 1).long()])  # background: never
    ok = last_in_group & (tp >= need[lab2])
    prec = torch.where(ok, tp / (e + 1).double(), torch.full((), -1.0, dtype=torch.float64))
    flat = (rows * L1 + lab2).flatten()
    best = torch.full((c * L1,), -1.0, dtype=torch.float64)
    best.scatter_reduce_(0, flat, prec.flatten(), reduce="amax")
    # among the optimal cuts, the first (smallest) one
    cand = ok & (prec == best[flat].view(c, n))
    t_best = torch.full((c * L1,), n, dtype=torch.long)
    t_best.scatter_reduce_(0, flat, torch.where(cand, e, n).flatten(), reduce="amin")
    win = cand & (e == t_best[flat].view(c, n))
    tp_best = torch.zeros(c * L1, dtype=torch.long)
    tp_best.scatter_reduce_(0, flat, torch.where(win, tp, 0).flatten(), reduce="amax")
    t_best = t_best.view(c, L1)[:, :n_lab].clamp_max(n - 1)
    thr = vals.gather(1, t_best)
    return best.view(c, L1)[:, :n_lab], tp_best.view(c, L1)[:, :n_lab].to(torch.int32), thr


def neuron_baseline(
    acts: Float[Tensor, "*n n_neurons"],
    labels: Int[Tensor, "*n"] | Bool[Tensor, "*n"],
    target_recall: float | Sequence[float] | Float[Tensor, " n_labels"],
    n_labels: int | None = None,
    both_signs: bool = False,
    chunk_mb: float = 256.0,
) -> NeuronBaselineResult:
    """For each label, the best precision a single neuron reaches at recall >= ``target_recall``.

    Args:
        acts: Neuron activations, one row per position (any leading shape matching ``labels``).
        labels: Per position: integer labels with -1 = ignore, or a Bool feature (one label).
        target_recall: One recall for all labels, or one per label (e.g. the recall of each
            label's best code, ``best_codes_per_label(...).recall``).
        n_labels: Number of labels (default ``max(labels) + 1``).
        both_signs: Also try each neuron's negative direction (low activation = detection).
        chunk_mb: Memory budget for one chunk of neurons (work arrays of
            ``positions x chunk``; independent of the number of labels).

    A target of 0 still asks for one true positive. Thresholds are the activations themselves,
    so precision is exact, ties included.
    """
    acts, lab, n_lab = _rows(acts, labels, n_labels)
    n, n_neur = acts.shape
    label_tot = torch.bincount(lab, minlength=n_lab + 1)[:n_lab]
    tr, needed = _needed_true_positives(target_recall, label_tot)
    per_neuron = max(1, n * 160)  # about twenty [N] int64 / float64 work arrays
    chunk = max(1, min(n_neur, int(chunk_mb * 2**20) // per_neuron))
    signs = (1, -1) if both_signs else (1,)
    best_p = torch.full((n_neur, n_lab), -1.0, dtype=torch.float64)
    best_tp = torch.zeros((n_neur, n_lab), dtype=torch.int32)
    best_thr = torch.zeros((n_neur, n_lab))
    best_sign = torch.ones((n_neur, n_lab), dtype=torch.long)
    if n > 0:
        for sign in signs:
            for c0 in range(0, n_neur, chunk):  # loop over memory-bounded chunks of neurons
                p, tp, thr = _best_for_chunk(sign * acts[:, c0 : c0 + chunk], lab, n_lab, needed)
                sl = slice(c0, c0 + chunk)
                better = p > best_p[sl]
                best_p[sl] = torch.where(better, p, best_p[sl])
                best_tp[sl] = torch.where(better, tp, best_tp[sl])
                best_thr[sl] = torch.where(better, sign * thr, best_thr[sl])
                best_sign[sl] = torch.where(better, sign, best_sign[sl])
    prec, neuron = best_p.max(0)  # [L]
    lab_idx = torch.arange(n_lab)
    absent = (label_tot == 0) | (prec < 0)
    return NeuronBaselineResult(
        precision=prec.clamp_min(0).float(),
        recall=(best_tp[neuron, lab_idx] / label_tot.clamp_min(1)).float(),
        neuron=torch.where(absent, -1, neuron),
        threshold=best_thr[neuron, lab_idx],
        sign=best_sign[neuron, lab_idx],
        target_recall=tr.float(),
        precision_per_neuron=best_p.clamp_min(0).float(),
    )


def _rows(
    acts: Tensor, labels: Tensor, n_labels: int | None
) -> tuple[Float[Tensor, "n n_neurons"], Int[Tensor, " n"], int]:
    """Activations and encoded labels one row per labelled position (ignored ones dropped)."""
    acts = torch.as_tensor(acts)
    labels = torch.as_tensor(labels)
    if acts.shape[:-1] != labels.shape:
        raise ValueError(
            f"acts {tuple(acts.shape)} must be labels' shape {tuple(labels.shape)} plus a "
            "neuron axis"
        )
    acts = acts.reshape(-1, acts.shape[-1]).float().cpu()
    lab, n_lab = encode_labels(labels.reshape(-1).cpu(), n_labels)
    keep = lab >= 0
    acts, lab = acts[keep], lab[keep]
    if not torch.isfinite(acts).all():
        raise ValueError("activations contain NaN/inf")
    return acts, lab, n_lab


def _needed_true_positives(
    target_recall: float | Sequence[float] | Tensor, label_tot: Int[Tensor, " n_labels"]
) -> tuple[Float[Tensor, " n_labels"], Int[Tensor, " n_labels"]]:
    """Per label: the target recall and the least true positives that meet it (at least 1)."""
    n_lab = label_tot.shape[0]
    tr = torch.as_tensor(target_recall, dtype=torch.float64).reshape(-1)
    if tr.numel() == 1:
        tr = tr.expand(n_lab)
    if tr.numel() != n_lab:
        raise ValueError(f"target_recall has {tr.numel()} values for {n_lab} labels")
    if ((tr < 0) | (tr > 1)).any():
        raise ValueError("target_recall must lie in [0, 1]")
    # the slack absorbs float32 rounding of a recall such as a code's tp / count (a real
    # shortfall is a whole count, never below 0.49)
    cnt = label_tot.double()
    slack = (cnt * 1e-6).clamp(max=0.49) + 1e-9
    return tr, torch.ceil(tr * cnt - slack).clamp_min(1).to(torch.int32)


@torch.no_grad()
def collect_activations(
    model: Any,
    tokens: Int[Tensor, "seq pos"],
    hook_name: str,
    batch_size: int = 32,
    disable_codebooks: bool = False,
    progress: bool = False,
) -> Float[Tensor, "seq pos *neurons"]:
    """Activations at ``hook_name`` over ``tokens`` (e.g. ``blocks.0.mlp.hook_post`` for the
    neuron baseline), kept on the CPU. Memory grows with activations: use it on the positions
    you need. With ``disable_codebooks`` a CodebookModel runs its base model."""
    names = getattr(model, "hook_dict", {})
    if hook_name not in names:
        hint = did_you_mean(hook_name, names)
        raise KeyError(f"unknown hook point {hook_name!r}.{hint} See model.hook_dict for all names")
    out: list[Tensor] = []

    def grab(act: Tensor, hook: Any) -> None:
        out.append(act.detach().float().cpu())

    device = next(model.parameters()).device
    ctx: Any = model.disabled() if disable_codebooks else nullcontext()
    with ctx:
        batches = tokens.split(batch_size)
        for b in tqdm(batches, desc="activations", disable=not progress):
            model.run_with_hooks(b.to(device), return_type=None, fwd_hooks=[(hook_name, grab)])
    return torch.cat(out)
