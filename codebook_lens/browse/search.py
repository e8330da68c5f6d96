"""Code search: every code at every site ranked as a detector of a feature or a label.

Counts come from :mod:`codebook_lens.analysis` (``CodeStore.code_counts``, which a store on
disk reads from the counts stored with it, and ``label_attribution``); a boolean feature's true
positives are a ``bincount`` over the codes at the feature's positions, chunk by chunk over the
store (so a store on disk may be larger than memory). Ranking, thresholds and paging are
vectorized over all (site, head, code) rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from codebook_lens.analysis import AttributionResult, label_attribution
from codebook_lens.analysis.store import CodeStore, dedupe_slots
from codebook_lens.analysis.store_index import CodeIndex
from codebook_lens.browse.errors import bad_request

__all__ = ["SearchIndex", "Ranking", "SORT_KEYS"]

SORT_KEYS = ("f1", "precision", "recall", "count", "tp")


@dataclass
class Ranking:
    """Per (site, head, code) rows: true positives, firings and the feature's size."""

    site: Tensor  # [R] site index
    head: Tensor  # [R]
    code: Tensor  # [R]
    tp: Tensor  # [R] positions where the code fires and the feature holds
    count: Tensor  # [R] positions where the code fires
    n_feature: int  # positions where the feature holds

    def metrics(self) -> dict[str, Tensor]:
        """Precision, recall, F1 (0 where undefined), count and tp."""
        tp = self.tp.double()
        p = tp / self.count.double().clamp_min(1)
        r = tp / max(self.n_feature, 1)
        f = torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-300), torch.zeros_like(p))
        return {"precision": p, "recall": r, "f1": f, "count": self.count, "tp": self.tp}


class SearchIndex:
    """Precomputed code counts (and label attributions) of a store, and ranked queries."""

    def __init__(self, store: CodeStore, labels: Tensor | None = None, n_labels: int = 0):
        self.store = store
        self.sites = store.sites
        self.counts = {s: store.code_counts(s) for s in self.sites}  # [H, N]
        self.labels: dict[str, AttributionResult] = {}
        if labels is not None and n_labels > 0:
            self.labels = {s: label_attribution(store, labels, s, n_labels) for s in self.sites}
        rows = [self._rows(i, s) for i, s in enumerate(self.sites)]
        self.row_site = torch.cat([r[0] for r in rows])
        self.row_head = torch.cat([r[1] for r in rows])
        self.row_code = torch.cat([r[2] for r in rows])
        self.row_count = torch.cat([self.counts[s].flatten() for s in self.sites])
        # per-code position indexes, built at start-up (or read from beside a disk store)
        self.code_indexes = {s: CodeIndex.for_store(store, s) for s in self.sites}

    def code_index(self, site: str) -> CodeIndex:
        """The site's per-code position index (code pages read their examples from it)."""
        return self.code_indexes[site]

    def _rows(self, i: int, site: str) -> tuple[Tensor, Tensor, Tensor]:
        h, n = self.counts[site].shape
        head = torch.arange(h).repeat_interleave(n)
        return torch.full((h * n,), i), head, torch.arange(n).repeat(h)

    def feature_ranking(self, feature: Bool[Tensor, "seq pos"]) -> Ranking:
        """True positives of every code for a boolean feature (every position counts).

        Reads only the codes at the feature's positions (found once with ``nonzero``), so a
        rare feature costs its own size, not a pass over the store (pages of a disk store
        holding no feature position are never read)."""
        feature = torch.as_tensor(feature, dtype=torch.bool)
        where = feature.reshape(-1).nonzero().flatten()  # flat positions, sorted
        p = feature.shape[1]
        tps = []
        for s in self.sites:  # loop over sites and chunks; vectorized over the rest
            h, n = self.counts[s].shape
            tp = torch.zeros(h * n, dtype=torch.long)
            offs = (torch.arange(h) * n).view(1, h, 1)
            for start, c in self.store.chunks(s):
                lo, hi = torch.searchsorted(
                    where, torch.tensor([start * p, (start + c.shape[0]) * p])
                ).tolist()
                if lo == hi:
                    continue
                rows = c.reshape(-1, c.shape[2], c.shape[3])[where[lo:hi] - start * p]
                sel = dedupe_slots(rows.long())
                tp += torch.bincount((sel + offs)[sel >= 0], minlength=h * n)
            tps.append(tp)
        return Ranking(
            self.row_site, self.row_head, self.row_code, torch.cat(tps), self.row_count,
            int(where.numel()),
        )  # fmt: skip

    def label_ranking(self, label: int) -> Ranking:
        """True positives of every code for one label (positions labelled -1 are left out)."""
        if not self.labels:
            raise bad_request("this store has no labels; search by regex or token instead")
        n_labels = next(iter(self.labels.values())).n_labels
        if not 0 <= label < n_labels:
            raise bad_request(f"label {label} out of range; labels are 0..{n_labels - 1}")
        res = [self.labels[s] for s in self.sites]
        tp = torch.cat([r.joint[..., label].flatten() for r in res])
        count = torch.cat([r.code_counts.flatten() for r in res])
        n_feature = int(res[0].label_counts[label])
        return Ranking(self.row_site, self.row_head, self.row_code, tp, count, n_feature)

    def rank(
        self,
        ranking: Ranking,
        by: str = "f1",
        descending: bool = True,
        min_precision: float = 0.0,
        min_recall: float = 0.0,
        min_count: int = 1,
        site: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> dict[str, Any]:
        """Filter, sort (ties: site, head, code order) and page the rows of ``ranking``."""
        if by not in SORT_KEYS:
            raise bad_request(f"by={by!r}; choose one of {', '.join(SORT_KEYS)}")
        m = ranking.metrics()
        keep = (m["count"] >= min_count) & (m["precision"] >= min_precision)
        keep &= m["recall"] >= min_recall
        if site is not None:
            if site not in self.sites:
                raise bad_request(f"no site {site!r}; sites are {self.sites}")
            keep &= ranking.site == self.sites.index(site)
        idx = keep.nonzero().flatten()
        key = m[by][idx].double()
        order = torch.argsort(key, descending=descending, stable=True)
        page = idx[order[offset : offset + limit]]
        items = [
            {
                "site": self.sites[int(ranking.site[i])],
                "head": int(ranking.head[i]),
                "code": int(ranking.code[i]),
                "precision": float(m["precision"][i]),
                "recall": float(m["recall"][i]),
                "f1": float(m["f1"][i]),
                "count": int(m["count"][i]),
                "tp": int(m["tp"][i]),
            }
            for i in page.tolist()
        ]
        return {
            "total": int(idx.numel()),
            "offset": offset,
            "limit": limit,
            "n_feature": ranking.n_feature,
            "items": items,
        }
