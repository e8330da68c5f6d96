"""`export_neuronpedia`: a model's codebooks and their code store as the files Neuronpedia's bulk
import reads (docs/neuronpedia.md).

::

    OUT/
      export.json                     what was exported (codebook_lens's; Neuronpedia ignores it)
      <model id>/<source id>/         one Neuronpedia source per site, e.g. 3-codebook-mlp-out
        release.jsonl model.jsonl sourceset.jsonl source.jsonl
        features/batch-<i>.jsonl.gz       one row per code: density, top/bottom logits, ...
        activations/batch-<i>.jsonl.gz    its top examples: token strings and values

A source id is ``<layer>-<source set>``, the source set ``<prefix>-<hook>`` (``codebook-attn-z``,
``codebook-mlp-out``), as Neuronpedia names them (``3-res-jb``). Feature ``head * n_codes + code``
is code ``code`` of head (group) ``head``, the numbering of the SAELens ``"codebook"``
architecture. A code is on or off: its activation is the value that architecture's ``encode``
gives, 1 per chosen code (``1/k`` with ``combine="mean"``), where it fires and 0 elsewhere.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from tqdm.auto import tqdm

from codebook_lens.analysis.features import token_strings
from codebook_lens.analysis.store import CodeStore
from codebook_lens.atomic import write_file
from codebook_lens.export.examples import SiteHits, hit_windows, site_hits
from codebook_lens.export.logit_extremes import LogitExtremes, logit_extremes
from codebook_lens.export.neuronpedia_records import (
    DEFAULT_CREATOR_ID,
    activation_record,
    feature_record,
    layer_string,
    model_id_for,
    model_record,
    release_record,
    site_kind,
    source_record,
    source_set_record,
)
from codebook_lens.model import CodebookModel
from codebook_lens.validation import Range, ValidatedConfig

__all__ = [
    "EXPORT_FORMAT",
    "ExportedSource",
    "NeuronpediaConfig",
    "NeuronpediaExport",
    "export_neuronpedia",
]

EXPORT_FORMAT = "codebook_lens.neuronpedia"
"""The format marker of ``OUT/export.json``."""


@dataclass
class NeuronpediaConfig(ValidatedConfig):
    """What a Neuronpedia export holds and how it names it."""

    model_id: str | None = None
    """Neuronpedia model id (lowercase letters, digits, - and _). Default: the last part of the
    model's Hub name or directory."""

    set_prefix: str = "codebook"
    """Start of every source set name; a site's set is ``<prefix>-<hook>`` (codebook-attn-z)."""

    release: str | None = None
    """Release name (unique on the Neuronpedia instance). Default: ``<model id>-<prefix>``."""

    creator_name: str = "codebook_lens"
    """Creator shown on the release and source sets."""

    creator_id: str = DEFAULT_CREATOR_ID
    """Neuronpedia user id owning the rows (default: the user its database seed creates)."""

    visibility: Literal["PUBLIC", "UNLISTED", "PRIVATE"] = "PUBLIC"
    """Visibility of the model, release, source sets and sources."""

    n_examples: int = 20
    """Top activating contexts per code (lowest slot first, then dataset order)."""

    context_before: int = 16
    """Tokens before the firing token in each context."""

    context_after: int = 4
    """Tokens after the firing token in each context."""

    n_logits: int = 10
    """Top and bottom logits (direct logit attribution) per code."""

    min_count: int = 1
    """Export codes that fire at least this often in the store (0: every code)."""

    features_per_batch: int = 1024
    """Features per batch file (their activations go in the batch file of the same number)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "n_examples": Range(0, 10_000),
        "context_before": Range(0, 4096),
        "context_after": Range(0, 4096),
        "n_logits": Range(0, 1000),
        "min_count": Range(0, 2**62),
        "features_per_batch": Range(1, 2**20),
    }

    def validate(self) -> None:
        """Names Neuronpedia accepts: ids of letters, digits and dashes (no ``__``)."""
        for name in ("model_id", "set_prefix", "release"):
            value = getattr(self, name)
            if value is not None and (
                not value or value != value.lower() or "__" in value or not _is_slug(value)
            ):
                raise ValueError(
                    f"NeuronpediaConfig: {name}={value!r}; use lowercase letters, digits, - and "
                    "_ (no '__', which Neuronpedia reads as a separator)"
                )


def _is_slug(text: str) -> bool:
    return all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in text)


@dataclass
class ExportedSource:
    """One site written as a Neuronpedia source."""

    site: str
    """The codebook's site."""

    source_id: str
    """Neuronpedia source id (``<layer>-<source set>``)."""

    set_name: str
    """Neuronpedia source set name."""

    n_features: int
    """Features (codes) written."""

    n_activations: int
    """Activation records written."""

    has_logits: bool
    """Whether top/bottom logits were written (False where the site has no direct path)."""


@dataclass
class NeuronpediaExport:
    """What :func:`export_neuronpedia` wrote."""

    out: Path
    """The export directory."""

    model_id: str
    """Neuronpedia model id; the sources are in ``out / model_id``."""

    sources: list[ExportedSource]
    """One per exported site."""

    def source_dir(self, source_id: str) -> Path:
        """The directory of one source (what Neuronpedia's import reads)."""
        return self.out / self.model_id / source_id


@dataclass
class _Site:
    """One site to export and the names it gets."""

    site: str
    source_id: str
    set_name: str
    value: float  # a chosen code's activation (1, or 1/k with combine="mean")
    notes: str


@dataclass
class _Meta:
    """What every source of one export shares."""

    cfg: NeuronpediaConfig
    model_id: str
    model_name: str
    release: str
    dataset: str | None
    created_at: str

    def common(self) -> dict[str, Any]:
        c = self.cfg
        return {"creatorId": c.creator_id, "createdAt": self.created_at, "visibility": c.visibility}


def _plan_site(cm: CodebookModel, store: CodeStore, site: str, cfg: NeuronpediaConfig) -> _Site:
    """Check that ``store`` holds ``cm``'s codes at ``site`` and name its source."""
    cb = cm.codebook(site)  # a KeyError naming close matches
    store.check_site(site)
    c = cb.cfg
    if store.n_codes[site] != c.n_codes or store.k(site) != c.k:
        raise ValueError(
            f"{site}: the store holds {store.n_codes[site]} codes, k={store.k(site)}, the model's "
            f"codebook {c.n_codes} codes, k={c.k}; export a store collected with this model"
        )
    set_name = f"{cfg.set_prefix}-{site_kind(site)}"
    value = 1.0 / c.k if c.combine == "mean" else 1.0
    heads = store.n_heads(site)
    notes = (
        f"codebook_lens codebook at {site}: {heads} head(s)/group(s) x {c.n_codes} codes, "
        f"k={c.k}, similarity={c.similarity}, combine={c.combine}, input_norm={c.input_norm}. "
        f"Feature index = head * {c.n_codes} + code. A code is on or off: activation {value:g} "
        "where it is chosen, 0 elsewhere (the SAELens 'codebook' architecture's encode). "
        "Logits: direct logit attribution of the code's output (final norm scale 1)."
    )
    return _Site(site, f"{layer_string(site)}-{set_name}", set_name, value, notes)


def _plan(
    cm: CodebookModel, store: CodeStore, sites: Sequence[str] | None, cfg: NeuronpediaConfig
) -> list[_Site]:
    """The sites to export (default: every stored site with a layer) and their sources."""
    if sites is None:
        sites = [s for s in store.sites if s in cm.codebooks and _has_layer(s)]
        if not sites:
            raise ValueError(
                f"no stored site is a codebook site inside a block (stored: {store.sites}); "
                "pass sites= (--site)"
            )
    plan = [_plan_site(cm, store, s, cfg) for s in sites]
    ids = [p.source_id for p in plan]
    if len(set(ids)) != len(ids):
        raise ValueError(f"sites {list(sites)} give repeated Neuronpedia source ids {ids}")
    return plan


def _has_layer(site: str) -> bool:
    try:
        layer_string(site)
    except ValueError:
        return False
    return True


def _jsonl(rows: Sequence[dict[str, Any]], gz: bool) -> bytes:
    """Rows as JSON lines (UTF-8; NaN/inf refused), gzipped with a fixed mtime if ``gz``."""
    text = "".join(
        json.dumps(r, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
        for r in rows
    )
    data = text.encode("utf-8")
    return gzip.compress(data, compresslevel=5, mtime=0) if gz else data


def _write_metadata(d: Path, s: _Site, store: CodeStore, cm: CodebookModel, m: _Meta) -> None:
    """``release.jsonl``, ``model.jsonl``, ``sourceset.jsonl`` and ``source.jsonl`` of a source."""
    c, common = m.cfg, m.common()
    title = f"Codebook features of {m.model_name} (codebook_lens)"
    hook = s.site.split(".", 2)[-1] if s.site.startswith("blocks.") else s.site
    rows = {
        "release": release_record(
            m.release, title, c.creator_name, c.creator_id, m.created_at, c.visibility
        ),
        "model": model_record(
            m.model_id, m.model_name, cm.cfg, c.creator_id, m.created_at, c.visibility
        ),
        "sourceset": source_set_record(
            m.model_id, s.set_name, f"Codebook - {hook}", m.release, c.creator_name, common
        ),
        "source": source_record(
            m.model_id,
            s.source_id,
            s.set_name,
            (store.n_seq, store.seq_len),
            m.dataset,
            s.notes,
            common,
        ),  # fmt: skip
    }
    for name, row in rows.items():
        write_file(d / f"{name}.jsonl", _jsonl([row], gz=False))


def _strings(cm: CodebookModel, *ids: torch.Tensor) -> dict[int, str]:
    """Token id -> its text, for the ids (>= 0) in ``ids``."""
    both = torch.cat([t.reshape(-1) for t in ids]) if ids else torch.zeros(0, dtype=torch.long)
    u = both[both >= 0].unique().tolist()
    return dict(zip(u, token_strings(cm.tokenizer, u)))


def _activation_rows(
    store: CodeStore, cm: CodebookModel, s: _Site, m: _Meta, hits: SiteHits, batch: torch.Tensor
) -> list[dict[str, Any]]:
    """The activation records of the features in ``batch``: each firing's context window."""
    c, n_codes = m.cfg, hits.n_codes
    sel = torch.isin(hits.feature, batch)
    f, seq, pos, slot, rank = (
        t[sel] for t in (hits.feature, hits.seq, hits.pos, hits.slot, hits.rank)
    )
    head, code = f // n_codes, f % n_codes
    toks, fired = hit_windows(
        store, s.site, seq, pos, head, code, c.context_before, c.context_after
    )
    table = _strings(cm, toks)
    fired_at = torch.clamp(pos, max=c.context_before)  # the firing's index in the clipped window
    where = {"modelId": m.model_id, "layer": s.source_id}
    rows = []
    per_row = (f, seq, pos, slot, rank, head, fired_at, toks, fired)
    cols = zip(*(t.tolist() for t in per_row))
    for fi, sq, p, sl, rk, h, at, trow, frow in cols:
        tokens = [table[t] for t in trow if t >= 0]
        values = [s.value if on else 0.0 for t, on in zip(trow, frow) if t >= 0]
        extra = {"seq": sq, "pos": p, "start": p - at, "head": h, "slot": sl}
        rows.append(
            activation_record(
                where, fi, rk, tokens, values, at, sq, extra, c.creator_id, m.created_at
            )
        )
    return rows


def _feature_rows(
    cm: CodebookModel, s: _Site, m: _Meta, batch: torch.Tensor, counts: torch.Tensor,
    n_tokens: int, ext: LogitExtremes | None, with_examples: torch.Tensor, n_codes: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """The feature records of ``batch`` (feature ids): density, logits, the codebook facts."""
    head, code = batch // n_codes, batch % n_codes
    lists = [torch.zeros(batch.numel(), 0, dtype=torch.long)] * 4  # no logits at this site
    if ext is not None:
        parts = (ext.top_ids, ext.top_values, ext.bottom_ids, ext.bottom_values)
        lists = [t[head, code] for t in parts]
    table = _strings(cm, lists[0], lists[2])
    where = {"modelId": m.model_id, "layer": s.source_id, "sourceSetName": s.set_name}
    common = {"creatorId": m.cfg.creator_id, "createdAt": m.created_at}
    rows = []
    cols = zip(*(t.tolist() for t in (batch, head, code, counts[batch], with_examples, *lists)))
    for fi, h, cd, count, has, top_i, top_v, bot_i, bot_v in cols:
        logits = {
            "neg_str": [table[t] for t in bot_i],
            "neg_values": bot_v,
            "pos_str": [table[t] for t in top_i],
            "pos_values": top_v,
        }
        hist = ([float(count)], [s.value]) if count else ([], [])
        extra = {"site": s.site, "head": h, "code": cd, "count": count}
        max_act = s.value if has else 0.0
        rows.append(
            feature_record(where, fi, count / n_tokens, max_act, logits, hist, extra, common)
        )
    return rows


def _write_source(
    d: Path, s: _Site, store: CodeStore, cm: CodebookModel, m: _Meta, progress: bool
) -> ExportedSource:
    """One source directory: metadata, then features and activations batch by batch."""
    c = m.cfg
    _write_metadata(d, s, store, cm, m)
    counts = store.code_counts(s.site).reshape(-1)
    feats = (counts >= c.min_count).nonzero().squeeze(1)
    try:
        ext = logit_extremes(cm, s.site, c.n_logits)
    except ValueError:  # no direct path from this site to the logits: no logits to show
        ext = None
    if ext is not None and not all(
        torch.isfinite(t).all() for t in (ext.top_values, ext.bottom_values)
    ):
        raise ValueError(
            f"{s.site}: the logit attribution of its codes is not finite (NaN/inf weights?)"
        )
    hits = site_hits(store, s.site, c.n_examples)
    n_act = 0
    starts = range(0, feats.numel(), c.features_per_batch)
    for i, a in enumerate(tqdm(starts, desc=s.source_id, unit="batch", disable=not progress)):
        batch = feats[a : a + c.features_per_batch]
        acts = _activation_rows(store, cm, s, m, hits, batch)
        has = torch.isin(batch, hits.feature)
        rows = _feature_rows(cm, s, m, batch, counts, store.n_tokens, ext, has, hits.n_codes)
        write_file(d / "features" / f"batch-{i}.jsonl.gz", _jsonl(rows, gz=True))
        if acts:  # the import parses the first line of every file: write no empty ones
            write_file(d / "activations" / f"batch-{i}.jsonl.gz", _jsonl(acts, gz=True))
        n_act += len(acts)
    return ExportedSource(s.site, s.source_id, s.set_name, feats.numel(), n_act, ext is not None)


def _is_export(path: Path) -> bool:
    try:
        doc = json.loads((path / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == EXPORT_FORMAT


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` whose contents an export would destroy."""
    if out.resolve() == Path.cwd().resolve() or out.resolve() == Path(out.anchor).resolve():
        raise ValueError(f"refusing to export into {out}; give a new directory (--out)")
    if not out.exists() or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        return
    if not out.is_dir() or out.is_symlink() or not _is_export(out):
        raise ValueError(
            f"{out} exists and is not an empty directory or an earlier Neuronpedia export; "
            "choose a new --out"
        )
    if not overwrite:
        raise ValueError(f"{out} holds an earlier export; pass --overwrite to replace it")


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished export ``tmp`` at ``out`` (replacing an empty directory or an earlier
    export: it is moved aside first and deleted after)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(out, old)
    os.replace(tmp, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_neuronpedia(
    cm: CodebookModel,
    store: CodeStore,
    out: str | os.PathLike[str],
    cfg: NeuronpediaConfig | None = None,
    *,
    sites: Sequence[str] | None = None,
    model_name: str | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> NeuronpediaExport:
    """Write the codebooks of ``cm`` and their codes in ``store`` (collected with ``cm``, with
    tokens) as a Neuronpedia export in directory ``out`` (see the module docstring).

    ``sites`` (default: every stored codebook site inside a block) become one source each;
    ``model_name`` (a Hub name or directory; default the model's ``cfg.model_name``) names the
    model, ``dataset`` the text the store was collected from. The export is built beside
    ``out`` and moved into place when complete; ``out`` must be new, empty, or (with
    ``overwrite=True``) an earlier export."""
    cfg = cfg or NeuronpediaConfig()
    store.check_tokens()
    out = Path(out)
    _check_target(out, overwrite)
    plan = _plan(cm, store, sites, cfg)
    name = model_name or str(getattr(cm.cfg, "model_name", None) or "model")
    model_id = cfg.model_id or model_id_for(name)
    if Path(name).is_absolute():  # a local directory: show the id, not this machine's path
        name = model_id
    release = cfg.release or f"{model_id}-{cfg.set_prefix}"
    created = datetime.now(timezone.utc).isoformat()
    meta = _Meta(cfg, model_id, name, release, dataset, created)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        done = [
            _write_source(tmp / model_id / s.source_id, s, store, cm, meta, progress) for s in plan
        ]
        manifest = {
            "format": EXPORT_FORMAT,
            "version": 1,
            "model_id": model_id,
            "model_name": name,
            "release": release,
            "created_at": created,
            "feature_index": "head * n_codes + code",
            "config": cfg.to_dict(),
            "sources": [vars(e) for e in done],
        }
        write_file(tmp / "export.json", json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return NeuronpediaExport(out, model_id, done)
