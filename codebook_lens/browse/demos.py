"""What the demos call (one line each) so that ``codebook-lens browse DIR`` works on their
output: the TokFSM demo's recovery store with state labels, and ``lm-demo``'s held-out store
with topic labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from codebook_lens.analysis.store import CodeStore
from codebook_lens.browse.layout import write_browse_data

__all__ = ["write_fsm_browse_data", "write_lm_browse_data"]


def write_fsm_browse_data(
    out_dir: str | os.PathLike[str], store: CodeStore, labels: Tensor, fsm: Any
) -> Path:
    """TokFSM: ``store`` and state ``labels`` over the recovery walks; the model in
    ``out_dir/model`` and the machine in ``out_dir/fsm.json`` (as ``run_demo`` writes them)."""
    vocab = [str(d) for d in range(fsm.base)] + ["<bos>"]
    names = [f"{s:0{fsm.n_digits}d}" for s in range(fsm.n_states)]
    return write_browse_data(
        out_dir, store, labels=labels, label_names=names, vocab=vocab, kind="fsm",
        model="model", fsm="fsm.json",
    )  # fmt: skip


def write_lm_browse_data(
    out_dir: str | os.PathLike[str],
    store: CodeStore,
    labels: Tensor,
    tokenizer: Any,
    topics: Sequence[str],
) -> Path:
    """``lm-demo``: held-out ``store`` with topic ``labels`` (``len(topics)`` = generic); the
    model in ``out_dir/codebook_model`` and the tokenizer in ``out_dir/tokenizer``."""
    d_vocab = int(store.d_vocab or len(tokenizer))
    vocab = [tokenizer.decode([i]) for i in range(d_vocab)]
    return write_browse_data(
        out_dir, store, labels=labels, label_names=[*topics, "generic"], vocab=vocab,
        kind="lm", model="codebook_model", tokenizer="tokenizer",
    )  # fmt: skip
