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


def _hits(c: Tensor, code: int, head: int | None, start: int) -> Tensor:
    """Rows ``(seq, pos, head, slot)`` where ``code`` fires in chunk ``c`` (sequences from
    ``start``), in dataset order; a code repeated in several slots counts once (lowest slot)."""
    if head is not None:
        c = c[:, :, head : head + 1]
    idx = (c == code).nonzero()  # lexicographic = dataset order; compact compare, no int64 copy
    if idx.shape[0] > 1:
        same = (idx[1:, :3] == idx[:-1, :3]).all(1)
        idx = idx[torch.cat([torch.ones(1, dtype=torch.bool), ~same])]
    idx[:, 0] += start
    if head is not None:
        idx[:, 2] = head
    return idx


def _first_by_slot(store: CodeStore, site: str, code: int, head: int | None, n: int):
    """The first ``n`` hits ordered by slot, then dataset order, and the number of hits. Stops
    early once ``n`` slot-0 hits are found when the store knows its counts (nothing later can
    come before them)."""
    known = None
    if store.has_counts:
        counts = store.code_counts(site)[:, code]
        known = int(counts.sum() if head is None else counts[head])
    best, total = torch.zeros(0, 4, dtype=torch.long), 0
    for start, c in store.chunks(site):
        idx = _hits(c, code, head, start)
        total += idx.shape[0]
        both = torch.cat([best, idx])  # earlier hits first: a stable sort keeps dataset order
        best = both[torch.sort(both[:, 3], stable=True).indices][:n]
        if known is not None and best.shape[0] == n and (n == 0 or int(best[-1, 3]) == 0):
            return best, known
    return best, total


def _random_hits(store: CodeStore, site: str, code: int, head: int | None, n: int, seed: int):
    """``n`` hits drawn as ``randperm(n_hits)[:n]`` over the hits in dataset order."""
    n_total = 0
    for start, c in store.chunks(site):
        n_total += _hits(c, code, head, start).shape[0]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_total, generator=g)[:n]
    ranks, order = pick.sort()
    found, seen = [], 0
    for start, c in store.chunks(site):
        if seen > (int(ranks[-1]) if ranks.numel() else -1):
            break
        idx = _hits(c, code, head, start)
        lo, hi = torch.searchsorted(ranks, torch.tensor([seen, seen + idx.shape[0]])).tolist()
        found.append(idx[ranks[lo:hi] - seen])
        seen += idx.shape[0]
    rows = torch.cat(found) if found else torch.zeros(0, 4, dtype=torch.long)
    out = torch.empty_like(rows)
    out[order] = rows  # back to the order of the permutation
    return out, n_total


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
    then dataset order; ``order="random"`` samples uniformly instead (seeded). Runs chunk by
    chunk over the store and reads the tokens of the chosen sequences only.
    """
    store.check_code(site, code)
    store.check_tokens()
    h = store.n_heads(site)
    if head is not None:
        if not -h <= head < h:
            raise IndexError(f"head {head} out of range; {site} has {h} head(s)")
        head = head % h
    if order == "slot":
        idx, n_total = _first_by_slot(store, site, code, head, n)
    elif order == "random":
        idx, n_total = _random_hits(store, site, code, head, n, seed)
    else:
        raise ValueError(f"order={order!r}; choose 'slot' or 'random'")
    rows = store.token_rows(idx[:, 0]).long()  # [n, P]
    padded = F.pad(rows, (before, after), value=-1)
    offs = torch.arange(before + after + 1)
    ctx = padded[torch.arange(idx.shape[0])[:, None], idx[:, 1, None] + offs]
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


def _pair_counts(
    c: Tensor, tokens: Tensor, n_codes: int, d_vocab: int, offset: int
) -> tuple[Tensor, Tensor, Tensor]:
    """For one chunk: the sorted unique (group, token) keys, their counts, and the positions
    counted per group (``bincount``)."""
    c = dedupe_slots(c.long())  # [S, P, H, K]
    S, P, H, _K = c.shape
    shifted = torch.full_like(tokens, -1)
    if offset >= 0:
        shifted[:, : P - offset] = tokens[:, offset:]
    else:
        shifted[:, -offset:] = tokens[:, :offset]
    tok = shifted.view(S, P, 1, 1).expand_as(c)
    hidx = torch.arange(H).view(1, 1, H, 1).expand_as(c)
    keep = (c >= 0) & (tok >= 0)
    group = (hidx * n_codes + c)[keep]
    keys, cnt = torch.unique(group * d_vocab + tok[keep], return_counts=True)
    return keys, cnt, torch.bincount(group, minlength=H * n_codes)


def _merge(keys: Tensor, cnt: Tensor, more: Tensor, more_cnt: Tensor) -> tuple[Tensor, Tensor]:
    """Two sorted key/count lists summed into one (memory: distinct pairs, not positions)."""
    k, inv = torch.unique(torch.cat([keys, more]), return_inverse=True)
    out = torch.zeros(k.shape[0], dtype=torch.long).index_add_(0, inv, torch.cat([cnt, more_cnt]))
    return k, out


def code_token_table(store: CodeStore, site: str, top: int = 10, offset: int = 0) -> CodeTokenTable:
    """The ``top`` most frequent tokens of every code at ``site`` (a code -> token frequency
    table), counting the token at ``pos + offset`` wherever the code fires.

    Vectorized: (code, token) pairs are counted with ``unique`` over one sorted key per chunk of
    the store and the chunks' counts merged, then ranked within each code; memory is one chunk
    plus the distinct (code, token) pairs, never ``n_codes x d_vocab``.
    """
    store.check_site(site)
    store.check_tokens()
    P, H, n_codes = store.seq_len, store.n_heads(site), store.n_codes[site]
    if not -P < offset < P:
        raise IndexError(f"offset {offset} out of range for sequences of {P} tokens")
    d_vocab = store.d_vocab or 1 + max(int(t.max()) for _, t in store.token_chunks() if t.numel())
    keys = torch.zeros(0, dtype=torch.long)
    cnt, totals = keys.clone(), torch.zeros(H * n_codes, dtype=torch.long)
    step = store.chunk_seqs(site)
    for (_, c), (_, t) in zip(store.chunks(site, step), store.token_chunks(step)):
        k, n, tot = _pair_counts(c, t.long(), n_codes, int(d_vocab), offset)
        keys, cnt = _merge(keys, cnt, k, n)
        totals += tot
    ug, ut = keys // d_vocab, keys % d_vocab
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
