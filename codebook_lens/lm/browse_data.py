"""What ``lm-demo`` writes so that ``codebook-lens browse`` works on its output: the held-out
store with topic labels, the token texts and where the model and tokenizer are (the browser
imports no experiment; the run directory describes it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from codebook_lens.analysis.store import CodeStore
from codebook_lens.browse.layout import write_browse_data

__all__ = ["write_lm_browse_data"]


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
