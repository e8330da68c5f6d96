"""The code page and the token view: one code's firings and effects; one context's codes.

Examples come from :func:`codebook_lens.analysis.top_examples`, the logit effect from
:func:`codebook_lens.analysis.code_logit_attribution`, label precision/recall from the
search index's :class:`~codebook_lens.analysis.AttributionResult`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from codebook_lens.analysis import CodeExamples, top_examples
from codebook_lens.analysis.store import CodeStore
from codebook_lens.browse.errors import not_found
from codebook_lens.browse.search import SearchIndex

__all__ = ["check_code", "examples_json", "code_stats", "nearest_codes", "context_view"]


def check_code(store: CodeStore, site: str, head: int, code: int) -> None:
    """A 404 naming the valid range unless (site, head, code) exists in the store."""
    try:
        store.check_code(site, code)
    except (KeyError, IndexError) as e:
        raise not_found(str(e.args[0])) from e
    h = store.n_heads(site)
    if not 0 <= head < h:
        raise not_found(f"head {head} out of range; {site} has heads 0..{h - 1}")


def examples_json(
    store: CodeStore, ex: CodeExamples, fires: Tensor, vocab: list[str]
) -> list[dict[str, Any]]:
    """Examples as token texts with the firing token's column and where the code fires."""
    before = ex.before
    width = ex.context.shape[1]
    padded = F.pad(fires, (before, width - before - 1), value=False)
    offs = torch.arange(width)
    hot = padded[ex.seq[:, None], ex.pos[:, None] + offs]
    out = []
    for i in range(ex.seq.shape[0]):
        row = ex.context[i].tolist()
        out.append(
            {
                "seq": int(ex.seq[i]),
                "pos": int(ex.pos[i]),
                "slot": int(ex.slot[i]),
                "center": before,
                "tokens": [vocab[t] if t >= 0 else None for t in row],
                "fires": hot[i].tolist(),
            }
        )
    return out


def code_stats(
    store: CodeStore,
    index: SearchIndex,
    site: str,
    head: int,
    code: int,
    vocab: list[str],
    label_names: list[str],
    n_examples: int = 20,
    before: int = 12,
    after: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything on a code page except what needs the model (logit effect, nearest codes).

    Read from the site's :class:`~codebook_lens.analysis.store_index.CodeIndex` (built once),
    so a page costs the rows of its examples, not a pass over the store: ``top`` and
    ``by_position`` are exact (``top`` equals ``top_examples(order="slot")``; more examples than
    the index keeps fall back to a scan); ``random`` is a seeded draw from the index's uniform
    sample; ``tokens`` are counted over that sample (``tokens_sampled`` firings; all of them,
    hence exact, when the code fires at most ``index.m`` times)."""
    check_code(store, site, head, code)
    ci = index.code_index(site)
    count = int(index.counts[site][head, code])
    if n_examples > ci.m:
        return _scanned_stats(store, index, site, head, code, vocab, label_names,
                              n_examples, before, after, seed)  # fmt: skip
    first, fslot = _valid(ci.first[head, code], ci.first_slot[head, code])
    samp, sslot = _valid(ci.sample[head, code], ci.sample_slot[head, code])
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(samp.numel(), generator=g)[:n_examples]
    window = (before, after)
    p = store.seq_len
    toks = store.token_rows(samp // p).long()[torch.arange(samp.numel()), samp % p]
    tc = torch.bincount(toks, minlength=len(vocab))
    return {
        **_head(store, site, head, code, count),
        "by_position": ci.by_position[head, code].tolist()
        if ci.by_position is not None
        else store.fires(site, code, head).sum(0).tolist(),
        "top": _rows_json(store, site, head, code, first[:n_examples], fslot, window, vocab),
        "random": _rows_json(store, site, head, code, samp[pick], sslot[pick], window, vocab),
        "tokens": _top_tokens(tc, vocab),
        "tokens_sampled": int(samp.numel()),
        "labels": _labels(index, site, head, code, label_names),
    }


def _valid(pos: Tensor, slot: Tensor) -> tuple[Tensor, Tensor]:
    keep = pos >= 0
    return pos[keep], slot[keep].long()


def _head(store: CodeStore, site: str, head: int, code: int, count: int) -> dict[str, Any]:
    return {
        "site": site,
        "head": head,
        "code": code,
        "n_heads": store.n_heads(site),
        "n_codes": store.n_codes[site],
        "count": count,
        "frequency": count / max(store.n_tokens, 1),
        "n_tokens": store.n_tokens,
    }


def _top_tokens(tc: Tensor, vocab: list[str], top: int = 15) -> list[dict[str, Any]]:
    tcount, tid = tc.topk(min(top, tc.numel()))
    keep = tcount > 0
    return [
        {"id": int(i), "text": vocab[int(i)], "count": int(c)}
        for i, c in zip(tid[keep].tolist(), tcount[keep].tolist())
    ]


def _rows_json(
    store: CodeStore,
    site: str,
    head: int,
    code: int,
    flat: Tensor,
    slot: Tensor,
    window: tuple[int, int],
    vocab: list[str],
) -> list[dict[str, Any]]:
    """Examples at flat positions ``flat``, as :func:`examples_json` writes them, reading only
    their sequences' tokens and codes."""
    before, after = window
    p = store.seq_len
    seq, pos = flat // p, flat % p
    rows = store.token_rows(seq).long()
    hot = (store.code_rows(site, seq)[:, :, head] == code).any(-1)  # [n, P]
    cols = pos[:, None] + torch.arange(before + after + 1)
    ar = torch.arange(seq.numel())[:, None]
    ctx = F.pad(rows, (before, after), value=-1)[ar, cols]
    fires = F.pad(hot, (before, after), value=False)[ar, cols]
    return [
        {
            "seq": int(seq[i]),
            "pos": int(pos[i]),
            "slot": int(slot[i]),
            "center": before,
            "tokens": [vocab[t] if t >= 0 else None for t in ctx[i].tolist()],
            "fires": fires[i].tolist(),
        }
        for i in range(seq.numel())
    ]


def _scanned_stats(
    store: CodeStore,
    index: SearchIndex,
    site: str,
    head: int,
    code: int,
    vocab: list[str],
    label_names: list[str],
    n_examples: int,
    before: int,
    after: int,
    seed: int,
) -> dict[str, Any]:
    """The code page by passes over the store (exact token counts; more examples than the
    index keeps)."""
    fires = store.fires(site, code, head)  # [S, P]
    count = int(index.counts[site][head, code])
    top = top_examples(store, site, code, head, n_examples, before, after, order="slot")
    rnd = top_examples(store, site, code, head, n_examples, before, after, "random", seed)
    tc = torch.zeros(len(vocab), dtype=torch.long)
    for start, t in store.token_chunks():  # chunk by chunk: the store may exceed memory
        tc += torch.bincount(t[fires[start : start + t.shape[0]]].long(), minlength=len(vocab))
    return {
        **_head(store, site, head, code, count),
        "by_position": fires.sum(0).tolist(),
        "top": examples_json(store, top, fires, vocab),
        "random": examples_json(store, rnd, fires, vocab),
        "tokens": _top_tokens(tc, vocab),
        "tokens_sampled": count,
        "labels": _labels(index, site, head, code, label_names),
    }


def _labels(
    index: SearchIndex, site: str, head: int, code: int, names: list[str], top: int = 10
) -> list[dict[str, Any]]:
    res = index.labels.get(site)
    if res is None:
        return []
    p, r, f = res.precision[head, code], res.recall[head, code], res.f1[head, code]
    order = torch.argsort(f.double(), descending=True, stable=True)[:top]
    return [
        {
            "label": int(i),
            "name": names[int(i)] if int(i) < len(names) else str(int(i)),
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "tp": int(res.joint[head, code, i]),
        }
        for i in order.tolist()
        if float(res.joint[head, code, i]) > 0
    ]


def nearest_codes(
    book: Tensor, index: SearchIndex, site: str, head: int, code: int, top: int = 10
) -> list[dict[str, Any]]:
    """The ``top`` codes of the same codebook (group) most cosine-similar to ``code``."""
    g = head if book.shape[0] > 1 else 0
    vecs = F.normalize(book[g].float(), dim=-1)
    sim = vecs @ vecs[code]
    sim[code] = -2.0
    val, idx = sim.topk(min(top, sim.numel() - 1))
    counts = index.counts[site][head]
    return [
        {"code": int(i), "cosine": float(v), "count": int(counts[i])}
        for v, i in zip(val.tolist(), idx.tolist())
    ]


def context_view(
    store: CodeStore,
    seq: int,
    vocab: list[str],
    labels: Tensor | None,
    label_names: list[str],
) -> dict[str, Any]:
    """For one stored sequence: its tokens and, per site and head, the codes at each position."""
    if not 0 <= seq < store.n_seq:
        raise not_found(
            f"sequence {seq} out of range; the store has sequences 0..{store.n_seq - 1}"
        )
    toks = store.token_rows(torch.tensor([seq]))[0].tolist()
    columns = []
    for s in store.sites:
        c = store.code_rows(s, torch.tensor([seq]))[0].long()  # [P, H, K], one sequence read
        for h in range(c.shape[1]):
            columns.append({"site": s, "head": h, "codes": c[:, h].tolist()})
    lab = labels[seq].tolist() if labels is not None else None
    return {
        "seq": seq,
        "tokens": [vocab[t] for t in toks],
        "token_ids": toks,
        "labels": [label_names[v] if 0 <= v < len(label_names) else None for v in lab]
        if lab is not None
        else None,
        "columns": columns,
    }
