"""Looking at one code: where it fires, with context, and which tokens it fires on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from codebook_lens.analysis.features import token_strings
from codebook_lens.analysis.store import CodeStore, dedupe_slots

__all__ = ["CodeExamples", "top_examples", "CodeTokenTable", "code_token_table"]


@dataclass
class CodeExamples:
    """Positions where one code fires, each with a window of surrounding tokens."""

    site: str
    """The site."""

    code: int
    """The code id."""

    seq: Int[Tensor, " n"]
    """Sequence index of each example."""

    pos: Int[Tensor, " n"]
    """Position of the firing token."""

    head: Int[Tensor, " n"]
    """Head (group) the code fires at."""

    slot: Int[Tensor, " n"]
    """Slot (rank among the k chosen codes; 0 = most similar)."""

    context: Int[Tensor, "n window"]
    """Tokens ``pos - before .. pos + after``; -1 beyond the sequence."""

    before: int
    """Context tokens before the firing one (its column in ``context``)."""

    n_total: int
    """How many (position, head) pairs the code fires at in the whole store."""

    def format(self, vocab: Any, mark: tuple[str, str] = ("[[", "]]")) -> list[str]:
        """One line of text per example, the firing token wrapped in ``mark``."""
        ids = sorted({int(t) for t in self.context.unique().tolist() if t >= 0})
        table = dict(zip(ids, token_strings(vocab, ids)))
        lines = []
        for row in self.context.tolist():
            parts = [
                (mark[0] + table[t] + mark[1]) if j == self.before else table[t]
                for j, t in enumerate(row)
                if t >= 0
            ]
            lines.append("".join(parts))
        return lines


def top_examples(
    store: CodeStore,
    site: str,
    code: int,
    head: int | None = None,
    n: int = 10,
    before: int = 8,
    after: int = 2,
    order: Literal["slot", "random"] = "slot",
    seed: int = 0,
) -> CodeExamples:
    """Up to ``n`` examples of ``code`` firing at ``site`` (at ``head``, or any head), with
    ``before``/``after`` tokens of context.

    Codes are on or off, so "top" means: lowest slot first (slot 0 is the most similar code),
    then dataset order; ``order="random"`` samples uniformly instead (seeded).
    """
    store.check_code(site, code)
    tokens = store.require_tokens()
    c = store.codes[site]
    if head is not None:
        h = c.shape[2]
        if not -h <= head < h:
            raise IndexError(f"head {head} out of range; {site} has {h} head(s)")
        head = head % h
    hit = c == code  # [S, P, H, K], compact: no int64 copy of the store
    if head is not None:
        keep = torch.zeros(c.shape[2], dtype=torch.bool)
        keep[head] = True
        hit &= keep.view(1, 1, -1, 1)
    idx = hit.nonzero()  # rows (seq, pos, head, slot), lexicographic = dataset order
    if idx.shape[0] > 1:  # a code repeated in several slots counts once (its lowest slot)
        same = (idx[1:, :3] == idx[:-1, :3]).all(1)
        idx = idx[torch.cat([torch.ones(1, dtype=torch.bool), ~same])]
    n_total = idx.shape[0]
    if order == "slot":
        idx = idx[torch.sort(idx[:, 3], stable=True).indices]
    elif order == "random":
        g = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(idx.shape[0], generator=g)]
    else:
        raise ValueError(f"order={order!r}; choose 'slot' or 'random'")
    idx = idx[:n]
    padded = F.pad(tokens, (before, after), value=-1)  # [S, P + before + after]
    offs = torch.arange(before + after + 1)
    ctx = padded[idx[:, 0, None], idx[:, 1, None] + offs]
    return CodeExamples(
        site=site,
        code=int(code),
        seq=idx[:, 0],
        pos=idx[:, 1],
        head=idx[:, 2],
        slot=idx[:, 3],
        context=ctx,
        before=before,
        n_total=n_total,
    )


@dataclass
class CodeTokenTable:
    """For each head and code, its most frequent tokens (at a fixed offset from where it fires)."""

    site: str
    """The site."""

    offset: int
    """Token offset from the firing position (0 = the token itself, -1 = the previous one)."""

    tokens: Int[Tensor, "head n_codes top"]
    """Most frequent token ids, most frequent first; -1 pads codes with fewer distinct tokens."""

    counts: Int[Tensor, "head n_codes top"]
    """How often each of those tokens co-occurs with the code (0 for padding)."""

    totals: Int[Tensor, "head n_codes"]
    """Positions counted per code (all tokens)."""


def code_token_table(store: CodeStore, site: str, top: int = 10, offset: int = 0) -> CodeTokenTable:
    """The ``top`` most frequent tokens of every code at ``site`` (a code -> token frequency
    table), counting the token at ``pos + offset`` wherever the code fires.

    Vectorized: (code, token) pairs are counted with ``unique`` over one sorted key, then ranked
    within each code; memory is O(tokens x heads x k), never ``n_codes x d_vocab``.
    """
    store.check_site(site)
    tokens = store.require_tokens()
    c = dedupe_slots(store.codes[site].long())  # [S, P, H, K]
    S, P, H, K = c.shape
    n_codes = store.n_codes[site]
    if not -P < offset < P:
        raise IndexError(f"offset {offset} out of range for sequences of {P} tokens")
    shifted = torch.full_like(tokens, -1)
    if offset >= 0:
        shifted[:, : P - offset] = tokens[:, offset:]
    else:
        shifted[:, -offset:] = tokens[:, :offset]
    d_vocab = int(store.d_vocab or int(tokens.max()) + 1)
    tok = shifted.view(S, P, 1, 1).expand_as(c)
    hidx = torch.arange(H).view(1, 1, H, 1).expand_as(c)
    keep = (c >= 0) & (tok >= 0)
    group = (hidx * n_codes + c)[keep]  # [M]
    key = group * d_vocab + tok[keep]
    uk, cnt = torch.unique(key, return_counts=True)  # sorted by (group, token)
    ug, ut = uk // d_vocab, uk % d_vocab
    totals = torch.bincount(group, minlength=H * n_codes)
    # rank within each group by count (desc), ties by token id (asc)
    order = torch.argsort(cnt, descending=True, stable=True)
    order = order[torch.argsort(ug[order], stable=True)]
    ug, ut, cnt = ug[order], ut[order], cnt[order]
    n_per = torch.bincount(ug, minlength=H * n_codes)
    first = torch.cumsum(n_per, 0) - n_per
    rank = torch.arange(ug.shape[0]) - first[ug]
    sel = rank < top
    out_t = torch.full((H * n_codes, top), -1, dtype=torch.long)
    out_c = torch.zeros((H * n_codes, top), dtype=torch.long)
    out_t[ug[sel], rank[sel]] = ut[sel]
    out_c[ug[sel], rank[sel]] = cnt[sel]
    return CodeTokenTable(
        site=site,
        offset=offset,
        tokens=out_t.view(H, n_codes, top),
        counts=out_c.view(H, n_codes, top),
        totals=totals.view(H, n_codes),
    )
