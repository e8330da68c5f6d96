"""Code-feature attribution: each code's precision, recall and F1 as a detector of a feature.

For every head (or group) ``h``, code ``c`` and label ``l``, with positions whose label is -1
left out:

* ``precision[h, c, l]`` = #(c fires and label == l) / #(c fires)
* ``recall[h, c, l]``    = #(c fires and label == l) / #(label == l)
* ``f1`` = 2 P R / (P + R)

All from one joint count matrix ``[head, n_codes, n_labels + 1]`` built with ``bincount``
(streamed over the store's chunks, so memory is bounded and a store on disk may be larger than
memory). A code counts once per position even if it fills
several slots. Ratios with a zero denominator are 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from codebook_lens.analysis._common import encode_labels
from codebook_lens.analysis.store import CodeStore, dedupe_slots

__all__ = [
    "AttributionResult",
    "RankedCodes",
    "BestCodes",
    "joint_counts",
    "label_attribution",
    "feature_attribution",
    "attribution_by_site",
    "rank_codes",
    "best_codes_per_label",
    "recovered_labels",
]

Metric = Literal["f1", "precision", "recall"]


def joint_counts(
    codes: Int[Tensor, "n head k"],
    labels: Int[Tensor, " n"],
    n_codes: int,
    n_classes: int,
    chunk: int = 1 << 18,
) -> Int[Tensor, "head n_codes n_classes"]:
    """Count, per head, code and class, the positions where the code fires with that label.

    ``labels`` lie in ``[-1, n_classes)`` (-1 = skip); code -1 is an empty slot. Streams over
    ``chunk`` positions at a time.
    """
    if codes.shape[0] != labels.shape[0]:
        raise ValueError(f"{codes.shape[0]} positions of codes but {labels.shape[0]} labels")
    h = codes.shape[1]
    size = h * n_codes * n_classes
    out = torch.zeros(size, dtype=torch.long)
    offs = (torch.arange(h) * n_codes).view(1, h, 1)
    for c, lab in zip(codes.split(chunk), labels.split(chunk)):
        c = dedupe_slots(c.long())
        lab = lab.long().view(-1, 1, 1)
        keep = (c >= 0) & (lab >= 0)
        idx = ((c + offs) * n_classes + lab)[keep]
        out += torch.bincount(idx, minlength=size)
    return out.view(h, n_codes, n_classes)


@dataclass
class AttributionResult:
    """Precision, recall and F1 of every code at one site as a detector of every label."""

    site: str
    """The site the codes come from."""

    precision: Float[Tensor, "head n_codes n_labels"]
    """#(code fires with label) / #(code fires), over non-ignored positions."""

    recall: Float[Tensor, "head n_codes n_labels"]
    """#(code fires with label) / #(label)."""

    f1: Float[Tensor, "head n_codes n_labels"]
    """Harmonic mean of precision and recall."""

    joint: Int[Tensor, "head n_codes n_labels"]
    """#(code fires with label): the true positives."""

    code_counts: Int[Tensor, "head n_codes"]
    """#(code fires) over non-ignored positions."""

    label_counts: Int[Tensor, " n_labels"]
    """#(positions with each label)."""

    n_positions: int
    """Non-ignored positions counted."""

    @property
    def n_labels(self) -> int:
        """Number of labels (1 for a boolean feature)."""
        return self.label_counts.shape[0]

    def metric(self, by: Metric) -> Float[Tensor, "head n_codes n_labels"]:
        """The tensor named ``by``."""
        if by not in ("f1", "precision", "recall"):
            raise ValueError(f"by={by!r}; choose 'f1', 'precision' or 'recall'")
        return getattr(self, by)


def _ratios(joint: Tensor, code_tot: Tensor, label_tot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    j = joint.double()
    p = j / code_tot.double().unsqueeze(-1).clamp_min(1)
    r = j / label_tot.double().clamp_min(1)
    f = torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-300), torch.zeros_like(p))
    return p.float(), r.float(), f.float()


def label_attribution(
    store: CodeStore,
    labels: Int[Tensor, "seq pos"] | Bool[Tensor, "seq pos"],
    site: str,
    n_labels: int | None = None,
) -> AttributionResult:
    """Precision/recall/F1 ``[head, n_codes, n_labels]`` of every code at ``site`` for labels.

    Args:
        store: Codes over a dataset.
        labels: One label per position, ``[n_seq, pos]`` as in the store: integers in
            ``[0, n_labels)`` with -1 = ignore (TokFSM states), or a Bool feature (True = the
            feature; then ``n_labels`` is 1 and False positions are negatives).
        site: Which stored site.
        n_labels: Number of labels (default: ``max(labels) + 1``).
    """
    store.check_site(site)
    labels = torch.as_tensor(labels)
    want = (store.n_seq, store.seq_len)
    if tuple(labels.shape) != want:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the store holds [n_seq, pos] = "
            f"{list(want)}; give one label per stored position (-1 to ignore)"
        )
    lab, n_lab = encode_labels(labels.cpu(), n_labels)
    h, n_codes = store.n_heads(site), store.n_codes[site]
    joint_all = torch.zeros(h, n_codes, n_lab + 1, dtype=torch.long)
    for start, c in store.chunks(site):  # shard by shard: stores larger than memory
        flat = c.reshape(-1, c.shape[2], c.shape[3])
        lab_c = lab[start : start + c.shape[0]].reshape(-1)
        joint_all += joint_counts(flat, lab_c, n_codes, n_lab + 1)
    code_tot = joint_all.sum(-1)
    label_tot = torch.bincount(lab[lab >= 0], minlength=n_lab + 1)
    joint = joint_all[..., :n_lab]
    p, r, f = _ratios(joint, code_tot, label_tot[:n_lab])
    return AttributionResult(
        site=site,
        precision=p,
        recall=r,
        f1=f,
        joint=joint,
        code_counts=code_tot,
        label_counts=label_tot[:n_lab],
        n_positions=int(label_tot.sum()),
    )


def feature_attribution(
    store: CodeStore, feature: Bool[Tensor, "seq pos"], site: str
) -> AttributionResult:
    """:func:`label_attribution` for one boolean feature (``n_labels`` = 1)."""
    feature = torch.as_tensor(feature)
    if feature.dtype != torch.bool:
        raise TypeError(
            f"a feature is a Bool tensor, got {feature.dtype}; use label_attribution for "
            "integer labels"
        )
    return label_attribution(store, feature, site)


def attribution_by_site(
    store: CodeStore,
    labels: Int[Tensor, "seq pos"] | Bool[Tensor, "seq pos"],
    sites: Sequence[str] | None = None,
    n_labels: int | None = None,
) -> dict[str, AttributionResult]:
    """:func:`label_attribution` at every site (default: all stored sites)."""
    if n_labels is None and torch.as_tensor(labels).dtype != torch.bool:
        n_labels = max(int(torch.as_tensor(labels).max()) + 1, 1)
    return {
        s: label_attribution(store, labels, s, n_labels)
        for s in (store.sites if sites is None else sites)
    }


@dataclass
class RankedCodes:
    """The best codes of one site for one label, best first."""

    site: str
    """The site."""

    head: Int[Tensor, " n"]
    """Head (group) of each code."""

    code: Int[Tensor, " n"]
    """Code id."""

    precision: Float[Tensor, " n"]
    """Precision of each code for the label."""

    recall: Float[Tensor, " n"]
    """Recall of each code for the label."""

    f1: Float[Tensor, " n"]
    """F1 of each code for the label."""

    count: Int[Tensor, " n"]
    """How often each code fires (non-ignored positions)."""


def rank_codes(
    result: AttributionResult,
    label: int = 0,
    by: Metric = "f1",
    top: int = 10,
    min_count: int = 1,
) -> RankedCodes:
    """The ``top`` codes (over all heads) for ``label``, ranked by ``by``; codes firing fewer
    than ``min_count`` times are skipped."""
    if not 0 <= label < result.n_labels:
        raise IndexError(f"label {label} out of range; the result has {result.n_labels} labels")
    score = result.metric(by)[..., label].flatten().clone()
    score[result.code_counts.flatten() < min_count] = -1.0
    n_codes = result.code_counts.shape[1]
    top = min(top, int((score >= 0).sum()))
    _, idx = score.topk(top)
    h, c = idx // n_codes, idx % n_codes
    return RankedCodes(
        site=result.site,
        head=h,
        code=c,
        precision=result.precision[h, c, label],
        recall=result.recall[h, c, label],
        f1=result.f1[h, c, label],
        count=result.code_counts[h, c],
    )


@dataclass
class BestCodes:
    """For each label, the single best code (over sites, heads and codes)."""

    site: list[str]
    """Site of the best code of each label."""

    head: Int[Tensor, " n_labels"]
    """Its head (group)."""

    code: Int[Tensor, " n_labels"]
    """Its id."""

    precision: Float[Tensor, " n_labels"]
    """Its precision for the label."""

    recall: Float[Tensor, " n_labels"]
    """Its recall for the label (use as ``target_recall`` of the neuron baseline)."""

    f1: Float[Tensor, " n_labels"]
    """Its F1 for the label."""


def _as_results(
    results: AttributionResult | Mapping[str, AttributionResult],
) -> list[AttributionResult]:
    rs = [results] if isinstance(results, AttributionResult) else list(results.values())
    if not rs:
        raise ValueError("no attribution results given")
    if len({r.n_labels for r in rs}) != 1:
        raise ValueError("results disagree on n_labels; compute them with the same n_labels")
    return rs


def best_codes_per_label(
    results: AttributionResult | Mapping[str, AttributionResult],
    by: Metric = "f1",
    min_count: int = 1,
) -> BestCodes:
    """The best code of each label by ``by``, over all sites, heads and codes (ties: the first
    site, head, code). Codes firing fewer than ``min_count`` times are skipped."""
    rs = _as_results(results)
    lab = torch.arange(rs[0].n_labels)
    per: dict[str, list[Tensor]] = {k: [] for k in ("v", "head", "code", "p", "r", "f")}
    for r in rs:  # loop over sites; vectorized over heads, codes and labels
        s = r.metric(by).clone()
        s[r.code_counts < min_count] = -1.0
        v, i = s.flatten(0, 1).max(0)  # [L]
        per["v"].append(v)
        per["head"].append(i // r.code_counts.shape[1])
        per["code"].append(i % r.code_counts.shape[1])
        per["p"].append(r.precision.flatten(0, 1)[i, lab])
        per["r"].append(r.recall.flatten(0, 1)[i, lab])
        per["f"].append(r.f1.flatten(0, 1)[i, lab])
    which = torch.stack(per["v"]).argmax(0)  # [L]: the first site with the max

    def pick(key: str) -> Tensor:
        return torch.stack(per[key])[which, lab]

    return BestCodes(
        site=[rs[int(w)].site for w in which],
        head=pick("head"),
        code=pick("code"),
        precision=pick("p"),
        recall=pick("r"),
        f1=pick("f"),
    )


def recovered_labels(
    results: AttributionResult | Mapping[str, AttributionResult],
    min_precision: float = 0.9,
    min_recall: float = 0.9,
) -> Bool[Tensor, " n_labels"]:
    """Labels for which some code (at any site/head) has precision >= ``min_precision`` and
    recall >= ``min_recall`` (TokFSM "state recovery": ``recovered_labels(...).sum()``)."""
    rs = _as_results(results)
    ok = torch.zeros(rs[0].n_labels, dtype=torch.bool)
    for r in rs:  # exact integer comparisons: joint >= p * fires and joint >= r * label count
        j = r.joint.double()
        hit = (j >= min_precision * r.code_counts.double().unsqueeze(-1)) & (
            j >= min_recall * r.label_counts.double()
        )
        hit &= r.joint > 0
        ok |= hit.flatten(0, 1).any(0)
    return ok
