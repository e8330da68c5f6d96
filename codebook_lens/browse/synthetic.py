"""Synthetic browse directories for tests and benchmarks: random codes, a tiny random model.

:func:`random_store` draws codes without running a model (large stores in seconds);
:func:`tiny_model` builds a small native TransformerBridge / HookedTransformer with codebooks;
:func:`make_browse_dir` saves both as a DIR that ``codebook-lens browse`` serves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from codebook_lens.analysis.store import CodeStore, smallest_int_dtype
from codebook_lens.browse.layout import write_browse_data
from codebook_lens.model import CodebookModel

__all__ = ["random_store", "tiny_model", "make_browse_dir", "model_sites"]


def model_sites(n_layers: int, n_heads: int, n_codes: int, k: int = 1) -> dict[str, tuple]:
    """``{site: (n_heads or None, n_codes, k)}``: ``attn.hook_z`` and ``hook_mlp_out`` of every
    layer (the TokFSM placement)."""
    out: dict[str, tuple] = {}
    for layer in range(n_layers):
        out[f"blocks.{layer}.attn.hook_z"] = (n_heads, n_codes, k)
        out[f"blocks.{layer}.hook_mlp_out"] = (None, n_codes, k)
    return out


def random_store(
    n_seq: int,
    seq_len: int,
    sites: Mapping[str, tuple[int | None, int, int]],
    d_vocab: int,
    seed: int = 0,
    zipf: float = 1.1,
) -> CodeStore:
    """A store of random codes (Zipf-like usage, so some codes are dead) and random tokens."""
    g = torch.Generator().manual_seed(seed)
    codes, n_codes, per_head = {}, {}, {}
    for s, (heads, n, k) in sites.items():
        w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** zipf
        draw = torch.multinomial(w, n_seq * seq_len * (heads or 1) * k, True, generator=g)
        codes[s] = draw.view(n_seq, seq_len, heads or 1, k).to(smallest_int_dtype(n - 1))
        n_codes[s], per_head[s] = n, heads is not None
    tokens = torch.randint(0, d_vocab, (n_seq, seq_len), generator=g)
    tokens = tokens.to(smallest_int_dtype(d_vocab - 1))
    return CodeStore(codes, n_codes, per_head, tokens, d_vocab)


def tiny_model(
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_vocab: int = 11,
    n_ctx: int = 64,
    n_codes: int = 16,
    k: int = 1,
    seed: int = 0,
) -> CodebookModel:
    """A random native TransformerBridge with codebooks at :func:`model_sites`."""
    from codebook_lens.backends import build_model

    cfg = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, n_ctx=n_ctx, d_vocab=d_vocab, act_fn="gelu",
        normalization_type="LN", seed=seed,
    )  # fmt: skip
    model = build_model(cfg, "bridge")
    torch.manual_seed(seed)
    cm = CodebookModel(model.eval())
    for s in model_sites(n_layers, n_heads, n_codes, k):
        cm.add_codebook(s, n_codes=n_codes, k=k)
    return cm.eval()


def make_browse_dir(
    path: str | os.PathLike[str],
    store: CodeStore,
    cm: CodebookModel | None = None,
    labels: torch.Tensor | None = None,
    label_names: list[str] | None = None,
    vocab: list[str] | None = None,
    kind: str = "generic",
) -> Path:
    """Save ``cm`` (if given) to ``path/model`` and the browse data; return ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if cm is not None:
        cm.save(path / "model", include_model=True)
    write_browse_data(
        path, store, labels=labels, label_names=label_names, vocab=vocab, kind=kind,
        model="model" if cm is not None else None,
    )  # fmt: skip
    return path
