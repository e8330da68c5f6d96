"""`export_dashboard`: feature dashboards of a run's codes, one self-contained HTML page per site
(docs/dashboards.md), in the spirit of sae-dashboard's feature-centric pages.

::

    OUT/
      index.html              links to the pages
      dashboard.json          what was exported (the format marker; --overwrite checks it)
      <site>.html             e.g. blocks.3.attn.hook_z.html: every exported code of the site

Each page holds its data as JSON and its CSS and JavaScript inline, under a
Content-Security-Policy that refuses every network load, so it opens from a file on an offline
machine. For each exported code it shows the top activating contexts (the firing tokens
highlighted), the histogram of log10 firing density over every code of its site and head with
this code marked, and the tokens its direct logit attribution promotes and suppresses most.
The examples and the logits come from the same one-pass helpers as the Neuronpedia export
(:func:`~codebook_lens.export.examples.site_hits`, ``hit_windows``,
:func:`~codebook_lens.export.logit_extremes.logit_extremes`). Features are numbered ``head *
n_codes + code``, as there and in the SAELens ``"codebook"`` architecture.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from codebook_lens.analysis.features import token_strings
from codebook_lens.analysis.store import CodeStore
from codebook_lens.atomic import write_file
from codebook_lens.export.dashboard_page import dashboard_html, index_html
from codebook_lens.export.examples import hit_windows, site_hits
from codebook_lens.export.logit_extremes import logit_extremes
from codebook_lens.model import CodebookModel
from codebook_lens.validation import Range, ValidatedConfig

__all__ = [
    "DASHBOARD_FORMAT",
    "DashboardConfig",
    "DashboardExport",
    "dashboard_data",
    "density_histogram",
    "export_dashboard",
    "page_name",
    "select_codes",
]

DASHBOARD_FORMAT = "codebook_lens.dashboard"
"""The format marker of ``OUT/dashboard.json`` and of every page's embedded data."""


@dataclass
class DashboardConfig(ValidatedConfig):
    """Which codes a dashboard shows and how much of each."""

    codes: int | None = 50
    """Codes per site and head: the most used ones that fire at least once (None: every code,
    dead ones included)."""

    n_examples: int = 20
    """Top activating contexts per code (lowest slot first, then dataset order)."""

    context_before: int = 16
    """Tokens before the firing token in each context."""

    context_after: int = 4
    """Tokens after the firing token in each context."""

    n_logits: int = 10
    """Top and bottom direct-logit tokens per code."""

    n_bins: int = 40
    """Bars of the log10 density histogram."""

    RANGES: ClassVar[dict[str, Range]] = {
        "codes": Range(1, 2**31),
        "n_examples": Range(0, 10_000),
        "context_before": Range(0, 4096),
        "context_after": Range(0, 4096),
        "n_logits": Range(0, 1000),
        "n_bins": Range(1, 1000),
    }


@dataclass
class DashboardExport:
    """What :func:`export_dashboard` wrote."""

    out: Path
    """The output directory."""

    pages: dict[str, Path]
    """Site -> its page."""

    n_features: dict[str, int]
    """Site -> codes shown on its page."""

    @property
    def index(self) -> Path:
        """The page linking every site's page."""
        return self.out / "index.html"


def page_name(site: str) -> str:
    """The file name of a site's page (``blocks.3.attn.hook_z.html``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", site) + ".html"


def select_codes(counts: Int[Tensor, "head n_codes"], n: int | None) -> Int[Tensor, " n"]:
    """Feature ids ``head * n_codes + code`` of the ``n`` most used codes of every head that
    fire at least once (``n=None``: every code), head by head, most used first (ties: lower
    code first)."""
    H, N = counts.shape
    order = torch.sort(counts, dim=1, descending=True, stable=True).indices  # [H, N]
    feats = order + torch.arange(H).unsqueeze(1) * N
    keep = torch.ones_like(order, dtype=torch.bool)
    if n is not None:
        keep = (torch.arange(N) < n).unsqueeze(0) & (counts.gather(1, order) > 0)
    return feats[keep]


def density_histogram(
    counts: Int[Tensor, "head n_codes"], n_tokens: int, n_bins: int
) -> tuple[Float[Tensor, " edges"], Int[Tensor, "head bins"]]:
    """The histogram of log10 firing density (``count / n_tokens``) of the codes that fire, per
    head: ``n_bins`` equal bins from ``floor(log10(1 / n_tokens))`` (the rarest possible
    density) to 0, each bin ``[lo, hi)`` but the last, which includes 0 (as ``numpy.histogram``
    counts). Returns the ``n_bins + 1`` edges (float64) and the counts."""
    if n_tokens < 1:
        raise ValueError("the store holds no tokens; collect codes first")
    H = counts.shape[0]
    lo = float(torch.floor(torch.log10(torch.tensor(1.0 / n_tokens, dtype=torch.float64))))
    edges = torch.linspace(lo, 0.0, n_bins + 1, dtype=torch.float64)
    live = counts > 0
    logd = torch.log10(counts[live].double() / n_tokens)
    bins = torch.bucketize(logd, edges[1:-1], right=True)  # [e_i, e_i+1): numpy's rule
    head = torch.arange(H).unsqueeze(1).expand_as(counts)[live]
    hist = torch.bincount(head * n_bins + bins, minlength=H * n_bins).view(H, n_bins)
    return edges, hist


def _examples(
    store: CodeStore, site: str, feats: Tensor, cfg: DashboardConfig
) -> dict[int, list[dict[str, Any]]]:
    """The top contexts of the features ``feats``: per feature, each context's token ids (cut
    at the sequence's ends), where the code fires in it, and where the firing token is."""
    hits = site_hits(store, site, cfg.n_examples)
    sel = torch.isin(hits.feature, feats)
    f, seq, pos, slot = (t[sel] for t in (hits.feature, hits.seq, hits.pos, hits.slot))
    head, code = f // hits.n_codes, f % hits.n_codes
    before, after = cfg.context_before, cfg.context_after
    toks, fired = hit_windows(store, site, seq, pos, head, code, before, after)
    out: dict[int, list[dict[str, Any]]] = {}
    rows = zip(*(t.tolist() for t in (f, seq, pos, slot, toks, fired)))
    for fi, s, p, sl, trow, frow in rows:
        first = max(0, before - p)  # window columns before the sequence's start are -1
        tokens = [t for t in trow[first:] if t >= 0]
        on = [i for i, v in enumerate(frow[first : first + len(tokens)]) if v]
        at = min(p, before)
        ex = {"seq": s, "pos": p, "start": p - at, "slot": sl, "at": at, "tokens": tokens}
        out.setdefault(fi, []).append({**ex, "on": on})
    return out


def _logits(
    cm: CodebookModel, site: str, feats: Tensor, n_codes: int, n: int
) -> tuple[list[list[list[Any]]], list[list[list[Any]]]] | None:
    """Per feature, its top and bottom ``[token id, effect]`` pairs; None where the site has no
    direct path to the logits."""
    try:
        ext = logit_extremes(cm, site, n)
    except ValueError:
        return None
    head, code = feats // n_codes, feats % n_codes
    parts = (ext.top_ids, ext.top_values, ext.bottom_ids, ext.bottom_values)
    ti, tv, bi, bv = (t[head, code].tolist() for t in parts)
    if not all(torch.isfinite(t[head, code]).all() for t in (ext.top_values, ext.bottom_values)):
        raise ValueError(f"{site}: the logit attribution of its codes is not finite (NaN/inf?)")
    top = [[list(p) for p in zip(i, v)] for i, v in zip(ti, tv)]
    bottom = [[list(p) for p in zip(i, v)] for i, v in zip(bi, bv)]
    return top, bottom


def _site_facts(cm: CodebookModel, store: CodeStore, site: str) -> dict[str, Any]:
    """The codebook's settings, checked against what the store holds."""
    c = cm.codebook(site).cfg  # a KeyError naming close matches
    store.check_site(site)
    if store.n_codes[site] != c.n_codes or store.k(site) != c.k:
        raise ValueError(
            f"{site}: the store holds {store.n_codes[site]} codes, k={store.k(site)}, the model's "
            f"codebook {c.n_codes} codes, k={c.k}; use a store collected with this model"
        )
    value = 1.0 / c.k if c.combine == "mean" else 1.0
    return {
        "site": site, "n_heads": store.n_heads(site), "n_codes": c.n_codes, "k": c.k,
        "combine": c.combine, "similarity": c.similarity, "input_norm": c.input_norm,
        "value": value,
    }  # fmt: skip


def dashboard_data(
    cm: CodebookModel,
    store: CodeStore,
    site: str,
    cfg: DashboardConfig | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """The data of one site's page (JSON-ready): the codebook's facts, the density histogram
    of every head, and per exported code its count, density, top contexts and logit extremes;
    ``vocab`` maps the token ids used to their text."""
    cfg = cfg or DashboardConfig()
    store.check_tokens()
    facts = _site_facts(cm, store, site)
    counts = store.code_counts(site)
    N, T = facts["n_codes"], store.n_tokens
    edges, hist = density_histogram(counts, T, cfg.n_bins)
    feats = select_codes(counts, cfg.codes)
    examples = _examples(store, site, feats, cfg)
    logits = _logits(cm, site, feats, N, cfg.n_logits)
    flat = counts.reshape(-1)[feats].tolist()
    codes = []
    for i, (f, n) in enumerate(zip(feats.tolist(), flat)):
        row = {"feature": f, "head": f // N, "code": f % N, "count": n, "density": n / T}
        row["examples"] = examples.get(f, [])
        row["top"], row["bottom"] = (logits[0][i], logits[1][i]) if logits else ([], [])
        codes.append(row)
    ids = {t for c in codes for e in c["examples"] for t in e["tokens"]}
    ids |= {p[0] for c in codes for p in c["top"] + c["bottom"]}
    ids_sorted = sorted(ids)
    vocab = dict(zip(map(str, ids_sorted), token_strings(cm.tokenizer, ids_sorted)))
    name = model_name or str(getattr(cm.cfg, "model_name", None) or "model")
    if Path(name).is_absolute():  # a local directory: its name, not this machine's path
        name = Path(name).name
    return {
        "format": DASHBOARD_FORMAT, "version": 1, "model": name, **facts,
        "n_tokens": T, "n_seq": store.n_seq, "seq_len": store.seq_len,
        "before": cfg.context_before, "after": cfg.context_after, "has_logits": bool(logits),
        "hist": {"edges": edges.tolist(), "counts": hist.tolist(),
                 "dead": (counts == 0).sum(1).tolist()},
        "codes": codes, "vocab": vocab,
    }  # fmt: skip


def _check_targets(out: Path, names: Sequence[str], overwrite: bool) -> None:
    """Refuse to replace files of ``out`` unless ``overwrite`` and they are an earlier export."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another --out")
    taken = [n for n in names if (out / n).exists()]
    if not taken:
        return
    try:
        doc = json.loads((out / "dashboard.json").read_text(encoding="utf-8"))
        ours = isinstance(doc, dict) and doc.get("format") == DASHBOARD_FORMAT
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"{out} holds {taken[0]}, not from a dashboard export; choose a new --out")
    if not overwrite:
        raise ValueError(f"{out} holds an earlier dashboard ({taken[0]}); pass --overwrite")


def export_dashboard(
    cm: CodebookModel,
    store: CodeStore,
    out: str | os.PathLike[str],
    cfg: DashboardConfig | None = None,
    *,
    sites: Sequence[str] | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DashboardExport:
    """Write a dashboard page per site of ``cm`` whose codes ``store`` holds (collected with
    ``cm``, with tokens; default every stored codebook site) into directory ``out``, with
    ``index.html`` and ``dashboard.json`` (see the module docstring). Every file is written
    atomically; files of an earlier dashboard export are replaced only with ``overwrite``."""
    cfg = cfg or DashboardConfig()
    store.check_tokens()
    sites = list(sites) if sites else [s for s in store.sites if s in cm.codebooks]
    if not sites:
        raise ValueError(f"no stored site has a codebook (stored: {store.sites}); pass --site")
    for site in sites:
        _site_facts(cm, store, site)  # every site is checked before anything is written
    out = Path(out)
    names = {s: page_name(s) for s in sites}
    _check_targets(out, [*names.values(), "index.html", "dashboard.json"], overwrite)
    pages, n_feats = {}, {}
    for site in tqdm(sites, desc="dashboard", unit="site", disable=not progress):
        data = dashboard_data(cm, store, site, cfg, model_name)
        pages[site] = write_file(out / names[site], dashboard_html(data))
        n_feats[site] = len(data["codes"])
        model = data["model"]
    write_file(out / "index.html", index_html(model, [(s, names[s], n_feats[s]) for s in sites]))
    manifest = {
        "format": DASHBOARD_FORMAT, "version": 1, "model": model, "config": cfg.to_dict(),
        "pages": [{"site": s, "file": names[s], "features": n_feats[s]} for s in sites],
    }  # fmt: skip
    write_file(out / "dashboard.json", json.dumps(manifest, indent=2) + "\n")
    return DashboardExport(out, pages, n_feats)
