"""`load_run`: a finished run directory as its config and trained model, for the later steps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from codebook_lens.model import CodebookModel
from codebook_lens.pipeline.config import RunConfig
from codebook_lens.pipeline.models import load_tokenizer, resolve_device
from codebook_lens.pipeline.rundir import RunDir

__all__ = ["LoadedRun", "load_run"]


@dataclass
class LoadedRun:
    """A run directory with its config and trained CodebookModel."""

    dir: RunDir
    """The run directory."""

    cfg: RunConfig
    """The run's saved config (``out`` is the directory it was opened from)."""

    cm: CodebookModel
    """The trained model from ``model/``."""


def load_run(path: str | os.PathLike[str], device: str | None = None) -> LoadedRun:
    """Open the run at ``path`` (trained: it has ``model/``) on ``device`` (default: the
    run's ``model.device``, where ``"auto"`` is CUDA, then MPS, then the CPU)."""
    run = RunDir(Path(path))
    cfg = RunConfig.from_dict({**run.config_dict(), "out": str(run.path)})
    if "train" not in run.status() or not run.model_dir.is_dir():
        raise ValueError(
            f"{run.path} has not finished training (no model/); run `codebook-lens train "
            f"--resume --out {run.path}` first"
        )
    cm = CodebookModel.load(run.model_dir)
    if getattr(cm.model, "tokenizer", None) is None:
        # A HookedTransformer is saved as a native model, without the Hugging Face tokenizer.
        cm.model.set_tokenizer(load_tokenizer(cfg.model))
    target = resolve_device(device or cfg.model.device)
    if next(cm.parameters()).device != target:
        cm.to(target)
    return LoadedRun(run, cfg, cm.eval())
