"""`evaluate_run`: the ``evaluate`` step: the SAE field's metrics of a trained run on its
held-out tokens, saved as ``evaluation.json`` (and in the report)."""

from __future__ import annotations

import dataclasses
import json
import os

from codebook_lens.atomic import write_text
from codebook_lens.evaluation import Evaluation, evaluate_codebooks
from codebook_lens.pipeline.load import load_run
from codebook_lens.pipeline.models import load_model
from codebook_lens.pipeline.report import write_run_report
from codebook_lens.pipeline.sources import TokenSource

__all__ = ["evaluate_run"]


def evaluate_run(
    path: str | os.PathLike[str], eval_tokens: int | None = None, progress: bool = True
) -> Evaluation:
    """Evaluate the run at ``path`` against its original base model on its held-out tokens
    (``eval_tokens`` overrides the config's count) and save the result."""
    loaded = load_run(path)
    data = loaded.cfg.data
    if eval_tokens is not None:
        data = dataclasses.replace(data, eval_tokens=eval_tokens)
    held_out = TokenSource(data, loaded.cm.tokenizer).eval_batches()
    # A finetuned model is compared with the original; a frozen one is its own base.
    base = None if loaded.cfg.train.freeze_model else load_model(loaded.cfg.model)
    device = next(loaded.cm.parameters()).device
    if base is not None:
        base.to(device)
    evaluation = evaluate_codebooks(loaded.cm, held_out, base_model=base, progress=progress)
    write_text(loaded.dir.evaluation, json.dumps(evaluation.to_dict(), indent=2) + "\n")
    loaded.dir.mark("evaluate", n_tokens=evaluation.n_tokens)
    if loaded.cfg.report:
        write_run_report(loaded.dir)
    return evaluation
