"""Top examples of every code of a site at once: the first firings of each (head, code) found in
one pass over a code store, and the context window of each firing with the positions where the
same code fires.

:func:`~codebook_lens.analysis.examples.top_examples` answers for one code and scans the store
each time; an export asks for every code, so here one pass ranks the firings of all codes
together (a sort of one integer key per firing), with the same order: lowest slot first (slot 0
is the most similar code), then dataset order, a code repeated in several slots of one position
counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from codebook_lens.analysis.store import CodeStore, dedupe_slots

__all__ = ["SiteHits", "site_hits", "hit_windows"]

_CHUNK_SLOTS = 1 << 22  # code slots read per batch of windows (32 MiB once widened to int64)


@dataclass
class SiteHits:
    """The first firings of every code of one site, grouped by feature (``head * n_codes +
    code``, ascending), each group in rank order."""

    site: str
    """The site."""

    n_codes: int
    """Codes per head (group) of the site's codebook."""

    feature: Int[Tensor, " n"]
    """Feature id ``head * n_codes + code`` of each firing (ascending)."""

    seq: Int[Tensor, " n"]
    """Sequence of the firing in the store."""

    pos: Int[Tensor, " n"]
    """Position of the firing token."""

    slot: Int[Tensor, " n"]
    """Slot of the code at that position (0 = the most similar code)."""

    rank: Int[Tensor, " n"]
    """Rank of the firing within its feature (0 = top)."""

    @property
    def head(self) -> Int[Tensor, " n"]:
        """Head (group) of each firing."""
        return self.feature // self.n_codes

    @property
    def code(self) -> Int[Tensor, " n"]:
        """Code id of each firing."""
        return self.feature % self.n_codes


def _first_per_group(key: Tensor, group_size: int, n: int) -> Tensor:
    """The first ``n`` keys of every group ``key // group_size`` of the sorted ``key``."""
    if key.numel() == 0:
        return key
    _, counts = torch.unique_consecutive(key // group_size, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(key.numel()) - torch.repeat_interleave(starts, counts)
    return key[rank < n]


def site_hits(store: CodeStore, site: str, n: int) -> SiteHits:
    """The first ``n`` firings of every (head, code) of ``site`` in ``store``, ordered by slot,
    then dataset order (the order of ``top_examples(..., order="slot")`` per head), in one pass
    chunk by chunk. Memory: one chunk plus ``n`` firings per feature."""
    store.check_site(site)
    if n < 0:
        raise ValueError(f"n={n}; pass a number of examples >= 0")
    H, K, N, P = store.n_heads(site), store.k(site), store.n_codes[site], store.seq_len
    T = max(store.n_tokens, 1)
    if H * N * K * T >= 2**62:
        raise ValueError(f"{site}: {H} x {N} codes x {K} slots x {T} tokens overflow a 64-bit key")
    # one key per firing, ordered as (feature, slot, dataset position)
    best = torch.zeros(0, dtype=torch.long)
    for start, c in store.chunks(site):
        c = dedupe_slots(c.long())
        s, p, h, k = (c >= 0).nonzero(as_tuple=True)
        key = ((h * N + c[s, p, h, k]) * K + k) * T + (s + start) * P + p
        best = _first_per_group(torch.cat([best, key]).sort().values, K * T, n)
    feature, rest = best // (K * T), best % (K * T)
    slot, where = rest // T, rest % T
    _, counts = torch.unique_consecutive(feature, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(best.numel()) - torch.repeat_interleave(starts, counts)
    return SiteHits(site, N, feature, where // P, where % P, slot, rank)


def hit_windows(
    store: CodeStore,
    site: str,
    seq: Int[Tensor, " n"],
    pos: Int[Tensor, " n"],
    head: Int[Tensor, " n"],
    code: Int[Tensor, " n"],
    before: int,
    after: int,
) -> tuple[Int[Tensor, "n window"], Bool[Tensor, "n window"]]:
    """For each firing ``(seq, pos)`` of ``code`` at ``head``: the tokens of positions ``pos -
    before .. pos + after`` (-1 beyond the sequence) and where in that window the same code
    fires at the same head (in any slot). Reads the firing sequences in batches."""
    store.check_tokens()
    P, H, K = store.seq_len, store.n_heads(site), store.k(site)
    offs = torch.arange(-before, after + 1)
    n, W = seq.numel(), offs.numel()
    tokens = torch.full((n, W), -1, dtype=torch.long)
    fired = torch.zeros((n, W), dtype=torch.bool)
    step = max(1, _CHUNK_SLOTS // max(P * H * K, 1))
    for a in range(0, n, step):
        b = min(n, a + step)
        cols = pos[a:b, None] + offs
        inside = (cols >= 0) & (cols < P)
        cols = cols.clamp(0, P - 1)
        rows = torch.arange(b - a)
        codes = store.code_rows(site, seq[a:b])[rows, :, head[a:b]]  # [B, P, K]
        fires = (codes == code[a:b, None, None].to(codes.dtype)).any(-1)
        toks = store.token_rows(seq[a:b]).long()
        tokens[a:b] = toks.gather(1, cols).masked_fill(~inside, -1)
        fired[a:b] = fires.gather(1, cols) & inside
    return tokens, fired
