"""`collect_run`: the ``collect`` step: the codes of every site over many tokens, written to the
run's code store on disk as they are collected (bounded memory, resumable, several processes)."""

from __future__ import annotations

import math
import os
from typing import Any

from codebook_lens.analysis import CodeStore, collect_codes
from codebook_lens.pipeline.load import load_run
from codebook_lens.pipeline.sources import TokenSource

__all__ = ["collect_run"]


def collect_run(
    path: str | os.PathLike[str],
    tokens: int | None = None,
    resume: bool = True,
    accelerator: Any = None,
    progress: bool = True,
) -> CodeStore:
    """Collect the codes of ``tokens`` tokens (default: the config's ``collect_tokens``) into
    ``RUN/store``; an interrupted collection continues after its last complete shard."""
    loaded = load_run(path, device=None if accelerator is None else str(accelerator.device))
    n_tokens = tokens if tokens is not None else loaded.cfg.collect_tokens
    data = loaded.cfg.data
    source = TokenSource(data, loaded.cm.tokenizer)
    store = collect_codes(
        loaded.cm,
        source.collect_batches(n_tokens, batch_size=loaded.cfg.collect_batch_size),
        batch_size=loaded.cfg.collect_batch_size,
        out=loaded.dir.store,
        max_seqs=math.ceil(n_tokens / data.context_len),
        resume=resume,
        data_id={"source": "training side, document order", **data.to_dict()},
        accelerator=accelerator,
        progress=progress,
    )
    if accelerator is None or accelerator.is_main_process:
        loaded.dir.mark("collect", n_tokens=store.n_tokens, sites=store.sites)
    return store
