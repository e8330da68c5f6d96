"""Topic codes and topic steering on a codebook language model.

:func:`topic_codes` picks, for one label, the best code of every (site, head) by precision
against per-token labels (the analysis toolkit's attribution); :func:`topic_steering_hooks`
turns them into ``force_codes`` hooks; :func:`sample_texts` generates continuations with or
without such hooks, and a :class:`~codebook_lens.lm.corpus.TopicClassifier` scores them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codebook_lens.analysis import AttributionResult, steering_hooks

__all__ = ["TopicCodes", "topic_codes", "topic_steering_hooks", "sample_texts"]


@dataclass
class TopicCodes:
    """Codes chosen for one label: one per (site, head) that passed the thresholds."""

    label: int
    """The label (topic id)."""

    sites: list[str]
    """Site of each chosen code."""

    heads: Int[Tensor, " n"]
    """Head of each chosen code."""

    codes: Int[Tensor, " n"]
    """Code id of each chosen code."""

    precision: Float[Tensor, " n"]
    """Precision of each chosen code for the label."""

    recall: Float[Tensor, " n"]
    """Recall of each chosen code for the label."""

    count: Int[Tensor, " n"]
    """How often each chosen code fired on the labelled data."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "label": self.label,
            "codes": [
                {
                    "site": s,
                    "head": int(h),
                    "code": int(c),
                    "precision": float(p),
                    "recall": float(r),
                    "count": int(n),
                }
                for s, h, c, p, r, n in zip(
                    self.sites, self.heads, self.codes, self.precision, self.recall, self.count
                )
            ],
        }


def topic_codes(
    results: Mapping[str, AttributionResult],
    label: int,
    min_precision: float = 0.5,
    min_count: int = 10,
    max_codes: int | None = None,
) -> TopicCodes:
    """The most precise code of every (site, head) for ``label``, if precise enough.

    For each site and head the code with the highest precision for ``label`` among codes that
    fired at least ``min_count`` times is kept when its precision is at least
    ``min_precision``. The kept codes are sorted by precision (best first) and cut to
    ``max_codes``. Vectorized over heads and codes.
    """
    rows: list[tuple[float, str, int, int, float, float, int]] = []
    for site, r in results.items():
        if not 0 <= label < r.n_labels:
            raise IndexError(f"label {label} out of range; {site} has {r.n_labels} labels")
        p = r.precision[..., label].clone()  # [head, n_codes]
        p[r.code_counts < min_count] = -1.0
        best_p, best_c = p.max(-1)  # [head]
        heads = torch.arange(p.shape[0])
        keep = best_p >= min_precision
        for h in heads[keep].tolist():  # loop over the few kept heads only
            c = int(best_c[h])
            rows.append(
                (
                    float(best_p[h]),
                    site,
                    h,
                    c,
                    float(r.recall[h, c, label]),
                    float(r.f1[h, c, label]),
                    int(r.code_counts[h, c]),
                )
            )
    rows.sort(key=lambda x: -x[0])
    if max_codes is not None:
        rows = rows[:max_codes]
    return TopicCodes(
        label=label,
        sites=[x[1] for x in rows],
        heads=torch.tensor([x[2] for x in rows], dtype=torch.long),
        codes=torch.tensor([x[3] for x in rows], dtype=torch.long),
        precision=torch.tensor([x[0] for x in rows], dtype=torch.float32),
        recall=torch.tensor([x[4] for x in rows], dtype=torch.float32),
        count=torch.tensor([x[6] for x in rows], dtype=torch.long),
    )


def topic_steering_hooks(cm: Any, chosen: TopicCodes) -> list[tuple[str, Callable[..., Tensor]]]:
    """``fwd_hooks`` forcing every chosen code (appended as an extra slot) at every position."""
    hooks: list[tuple[str, Callable[..., Tensor]]] = []
    for site in dict.fromkeys(chosen.sites):
        sel = torch.tensor([s == site for s in chosen.sites])
        heads, codes = chosen.heads[sel], chosen.codes[sel]
        hooks += steering_hooks(cm, site, codes, heads=heads)
    return hooks


@torch.no_grad()
def sample_texts(
    cm: Any,
    prompt: str,
    n: int,
    max_new_tokens: int,
    fwd_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
    seed: int = 0,
    batch_size: int = 128,
    temperature: float = 1.0,
) -> list[str]:
    """``n`` sampled continuations of ``prompt`` (text after the prompt, cut at the first EOS).

    Samples without the KV cache (TransformerLens 3.9's cache breaks past half of ``n_ctx``,
    and forced codes must apply to the whole sequence); the global RNG is restored afterwards.
    """
    model = cm.model
    tok = model.tokenizer
    prompt_tokens = model.to_tokens(prompt)
    p = prompt_tokens.shape[1]
    n_ctx = model.cfg.n_ctx
    if p + max_new_tokens > n_ctx:
        raise ValueError(
            f"prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) exceeds n_ctx={n_ctx}"
        )
    out: list[str] = []
    device = next(cm.parameters()).device
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        with cm.hooks(fwd_hooks=list(fwd_hooks)):
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                gen = cm.generate(
                    prompt_tokens.expand(b, -1),
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=temperature,
                    use_past_kv_cache=False,
                    stop_at_eos=False,
                    verbose=False,
                )
                new = gen[:, p:]
                eos = tok.eos_token_id
                is_eos = new == eos
                first = torch.where(is_eos.any(1), is_eos.int().argmax(1), new.shape[1])
                for row, end in zip(new.tolist(), first.tolist()):
                    out.append(tok.decode(row[:end]))
    return out
