"""Topic codes and topic steering on a codebook language model.

:func:`topic_codes` picks, for one label, the most precise codes of every (site, head) against
per-token labels (from the analysis toolkit's attribution); :func:`topic_steering_hooks` turns
them into ``force_codes`` hooks that write them into a head's lowest-ranked code slots at every
position; :func:`sample_texts` generates continuations with or without such hooks, and a
:class:`~codebook_lens.lm.corpus.TopicClassifier` scores them.

Why several codes per head: with k codes summed per head, appending a single topic code moves a
head's output by about 1/k, which in our measurements left the topic rate unchanged. Writing a
head's most topic-precise codes into half of its slots makes the head's output look like it does
inside a story about the topic, while the slots the model chose itself keep the local context.

Why rank by F1 for steering: a head's most precise codes for a topic are often rare ones (recall
of a few percent: they fire on one word of the topic), and writing them at every position moves
the head less towards "inside a topic story" than codes that fire on most of the topic's tokens
and are still specific to it. On the lm-demo's models, F1-ranked codes in ``k // 2 + 1`` slots
steer every topic of every measured seed to >= 10x its unsteered rate, where the most precise
codes in ``k // 2`` slots missed up to 5 of 8 (``docs/results/lm.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codebook_lens.analysis import AttributionResult, steering_hooks
from codebook_lens.model import CodebookModel

__all__ = ["RankBy", "TopicCodes", "topic_codes", "topic_steering_hooks", "sample_texts"]

RankBy = Literal["precision", "f1"]
"""How :func:`topic_codes` ranks a head's codes for a label."""


@dataclass
class TopicCodes:
    """The codes chosen for one label: for each chosen (site, head), its most precise codes."""

    label: int
    """The label (topic id)."""

    sites: list[str]
    """Site of each chosen head."""

    heads: Int[Tensor, " n"]
    """Head index of each chosen head."""

    codes: Int[Tensor, "n per_head"]
    """The head's best-ranked codes for the label, best first (-1: no code qualified)."""

    precision: Float[Tensor, "n per_head"]
    """Precision of each code for the label (-1 where the code is -1)."""

    recall: Float[Tensor, "n per_head"]
    """Recall of each code for the label."""

    count: Int[Tensor, "n per_head"]
    """How often each code fired on the labelled data."""

    @property
    def n_codes(self) -> int:
        """Number of codes chosen (over all heads)."""
        return int((self.codes >= 0).sum())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: one entry per chosen head."""
        return {
            "label": self.label,
            "heads": [
                {
                    "site": s,
                    "head": int(h),
                    "codes": [int(c) for c in cs if c >= 0],
                    "precision": [round(float(p), 4) for p, c in zip(ps, cs) if c >= 0],
                    "recall": [round(float(r), 4) for r, c in zip(rs, cs) if c >= 0],
                    "count": [int(n) for n, c in zip(ns, cs) if c >= 0],
                }
                for s, h, cs, ps, rs, ns in zip(
                    self.sites, self.heads, self.codes, self.precision, self.recall, self.count
                )
            ],
        }


def topic_codes(
    results: Mapping[str, AttributionResult],
    label: int,
    per_head: int = 1,
    min_precision: float = 0.5,
    min_count: int = 10,
    max_heads: int | None = None,
    by: RankBy = "precision",
) -> TopicCodes:
    """The ``per_head`` best codes for ``label`` of every (site, head) whose best code is precise.

    Codes are ranked by ``by``: ``"precision"`` (the default) or ``"f1"``, the harmonic mean of
    precision and recall, which passes over codes that are precise only because they are rare.
    Codes firing fewer than ``min_count`` times, or never with ``label``, are not ranked (a
    head with fewer than ``per_head`` such codes gets -1 in the remaining places). A head is
    chosen when its best-ranked code for ``label`` has precision >= ``min_precision``; heads
    are sorted by that code's score (best first) and cut to ``max_heads``. Vectorized over heads
    and codes. ``topic_codes(results, t, 1, 0.0, max_heads=1)`` is the single most precise code
    for ``t``.
    """
    if per_head < 1:
        raise ValueError(f"per_head={per_head}; choose at least 1")
    if by not in ("precision", "f1"):
        raise ValueError(f"by={by!r}; choose 'precision' or 'f1'")
    width = min((per_head, *(r.precision.shape[1] for r in results.values())))
    rows: list[tuple[float, str, int, Tensor, Tensor, Tensor, Tensor]] = []
    for site, r in results.items():
        if not 0 <= label < r.n_labels:
            raise IndexError(f"label {label} out of range; {site} has {r.n_labels} labels")
        score = getattr(r, by)[..., label].clone()  # [head, n_codes]
        score[(r.code_counts < min_count) | (r.joint[..., label] == 0)] = -1.0
        top_s, top_c = score.topk(width, dim=-1)  # [head, width]
        valid = top_s >= 0
        codes = torch.where(valid, top_c, torch.full_like(top_c, -1))
        h_ix = torch.arange(score.shape[0])[:, None]
        prec = torch.where(valid, r.precision[h_ix, top_c, label], torch.full((), -1.0))
        rec = torch.where(valid, r.recall[h_ix, top_c, label], torch.zeros(()))
        cnt = torch.where(valid, r.code_counts[h_ix, top_c], torch.zeros((), dtype=torch.long))
        chosen = valid[:, 0] & (prec[:, 0] >= min_precision)
        for h in chosen.nonzero().flatten().tolist():  # loop over the chosen heads only
            rows.append((float(top_s[h, 0]), site, h, codes[h], prec[h], rec[h], cnt[h]))
    rows.sort(key=lambda x: -x[0])
    if max_heads is not None:
        rows = rows[:max_heads]

    def stack(i: int, dtype: torch.dtype) -> Tensor:
        if not rows:
            return torch.empty(0, width, dtype=dtype)
        return torch.stack([x[i] for x in rows]).to(dtype)

    return TopicCodes(
        label=label,
        sites=[x[1] for x in rows],
        heads=torch.tensor([x[2] for x in rows], dtype=torch.long),
        codes=stack(3, torch.long),
        precision=stack(4, torch.float32),
        recall=stack(5, torch.float32),
        count=stack(6, torch.long),
    )


def topic_steering_hooks(
    cm: CodebookModel, chosen: TopicCodes
) -> list[tuple[str, Callable[..., Tensor]]]:
    """``fwd_hooks`` writing each chosen head's codes into its lowest-ranked slots, everywhere.

    The j-th most precise code of a head replaces the head's slot ``k - 1 - j`` at every
    position (prompt and generated tokens alike); the slots before them keep the codes the model
    chose. A head's codes must not outnumber its k slots. At a site whose codes have no head
    axis (one codebook over the whole vector) the chosen "head" is that codebook, head 0.
    """
    hooks: list[tuple[str, Callable[..., Tensor]]] = []
    for site in dict.fromkeys(chosen.sites):
        k = cm.codebooks[site].cfg.k
        sel = torch.tensor([s == site for s in chosen.sites])
        heads, codes = chosen.heads[sel], chosen.codes[sel]
        if codes.shape[1] > k:
            raise ValueError(
                f"{codes.shape[1]} codes per head but {site} has only k={k} slots; choose "
                f"per_head <= {k}"
            )
        headless = cm.site_layout(site) in ("flat", "heads_flat")  # codes [batch, pos, k]
        for j in range(codes.shape[1]):
            has = codes[:, j] >= 0  # -1: the head keeps its own code in that slot
            if has.any():
                at = None if headless else heads[has]
                hooks += steering_hooks(cm, site, codes[has, j], heads=at, slot=k - 1 - j)
    return hooks


@torch.no_grad()
def sample_texts(
    cm: CodebookModel,
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
    if tok is None:
        raise ValueError("the model has no tokenizer; pass one: model.set_tokenizer(tokenizer)")
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
                is_eos = new == tok.eos_token_id
                first = torch.where(is_eos.any(1), is_eos.int().argmax(1), new.shape[1])
                out += [tok.decode(row[:end]) for row, end in zip(new.tolist(), first.tolist())]
    return out
