"""What a dictionary costs and keeps, measured the same way for every SAELens SAE (codebooks
enter as the ``"codebook"`` architecture): spliced into the base model at its site, on held-out
tokens. Explained variance of the site, loss recovered against zero ablation, KL to the base
model; and the active features of every position as a code store, for label attribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer
from torch import Tensor

from codebook_lens.analysis import CodeStore

__all__ = ["splice_metrics", "feature_store", "mean_active_values"]


def _site(sae: SAE) -> str:
    return sae.cfg.metadata.hook_name


def _ce(logits: Tensor, tokens: Tensor) -> float:
    """Summed next-token cross-entropy."""
    pred, target = logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()
    return float(F.cross_entropy(pred, target, reduction="sum"))


@torch.no_grad()
def splice_metrics(
    model: HookedSAETransformer, sae: SAE, batches: list[Int[Tensor, "_batch pos"]]
) -> dict[str, float]:
    """``explained_variance`` (``1 - SSE / SST`` of the site's activation vectors, SST about
    their mean over all positions), ``loss_recovered`` (``(CE_zero - CE_spliced) / (CE_zero -
    CE_base)``, zero ablation of the site), ``ce_base``, ``ce_spliced``, ``kl`` (mean
    KL(base || spliced) per predicted token) and ``l0`` (mean active features per position)."""
    site = _site(sae)
    s = dict.fromkeys(("sse", "sum_sq", "n", "n_pred", "ce_b", "ce_s", "ce_z", "kl", "l0"), 0.0)
    total = torch.zeros(0, dtype=torch.float64)
    for tokens in batches:
        logits, cache = model.run_with_cache(tokens, names_filter=site)
        x = cache[site]
        feats = sae.encode(x.to(sae.dtype))
        flat = x.double().flatten(0, 1).flatten(1)
        x_hat = sae.decode(feats).double().reshape(flat.shape)
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(site, lambda a, hook: sae(a))])
        zero = model.run_with_hooks(tokens, fwd_hooks=[(site, lambda a, hook: torch.zeros_like(a))])
        logp, logq = logits[:, :-1].log_softmax(-1), spliced[:, :-1].log_softmax(-1)
        total = flat.sum(0) if total.numel() == 0 else total + flat.sum(0)
        s["sse"] += float(((flat - x_hat) ** 2).sum())
        s["sum_sq"] += float((flat**2).sum())
        s["n"] += flat.shape[0]
        s["n_pred"] += tokens[:, 1:].numel()
        s["ce_b"], s["ce_s"] = s["ce_b"] + _ce(logits, tokens), s["ce_s"] + _ce(spliced, tokens)
        s["ce_z"] += _ce(zero, tokens)
        s["kl"] += float((logp.exp() * (logp - logq)).sum())
        s["l0"] += float((feats != 0).sum())
    sst = s["sum_sq"] - float((total**2).sum()) / s["n"]
    gap = s["ce_z"] - s["ce_b"]
    return {
        "explained_variance": 1 - s["sse"] / sst,
        "loss_recovered": (s["ce_z"] - s["ce_s"]) / gap if gap else float("nan"),
        "ce_base": s["ce_b"] / s["n_pred"],
        "ce_spliced": s["ce_s"] / s["n_pred"],
        "kl": s["kl"] / s["n_pred"],
        "l0": s["l0"] / s["n"],
    }


@torch.no_grad()
def feature_store(
    model: HookedSAETransformer,
    sae: SAE,
    tokens: Int[Tensor, "seq pos"],
    batch_size: int = 256,
) -> CodeStore:
    """The ids of the active features (activation > 0) at every position as a code store at the
    SAE's site (``[seq, pos, 1, max active]``, -1 = empty slot), so that label attribution reads
    an SAE exactly as it reads codes."""
    site, parts = _site(sae), []
    for chunk in tokens.split(batch_size):  # only the active ids are kept: [n, pos, d_sae] is big
        _, cache = model.run_with_cache(chunk, names_filter=site)
        acts = sae.encode(cache[site].to(sae.dtype))
        vals, ids = acts.topk(max(int((acts > 0).sum(-1).max()), 1), dim=-1)
        parts.append(torch.where(vals > 0, ids, -1))
    width = max(part.shape[-1] for part in parts)
    ids = torch.cat([F.pad(part, (0, width - part.shape[-1]), value=-1) for part in parts])
    return CodeStore.from_codes({site: ids}, sae.cfg.d_sae, tokens=tokens)


@torch.no_grad()
def mean_active_values(
    model: HookedSAETransformer, sae: SAE, tokens: Int[Tensor, "walk pos"]
) -> Float[Tensor, " d_sae"]:
    """Each feature's mean activation over the positions where it is active (0 if never)."""
    site, total, count = sae.cfg.metadata.hook_name, 0.0, 0.0
    for chunk in tokens.split(256):
        _, cache = model.run_with_cache(chunk, names_filter=site)
        acts = sae.encode(cache[site].to(sae.dtype)).flatten(0, -2).double()
        total, count = total + acts.sum(0), count + (acts > 0).sum(0)
    return (total / torch.as_tensor(count).clamp_min(1)).float()
