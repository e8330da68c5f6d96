"""`train_run`: the ``train`` step of a run: boot the model, attach codebooks at the configured
sites, train them with checkpoints (exact resume), save the model, evaluate, write the report."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codebook_lens.atomic import write_text
from codebook_lens.evaluation import Evaluation, evaluate_codebooks
from codebook_lens.model import CodebookModel
from codebook_lens.pipeline.config import RunConfig
from codebook_lens.pipeline.models import load_model
from codebook_lens.pipeline.report import write_run_report
from codebook_lens.pipeline.rundir import RunDir
from codebook_lens.pipeline.sites import attach_site_groups
from codebook_lens.pipeline.sources import TokenSource, check_context
from codebook_lens.training import TrainResult, train_codebooks

__all__ = ["TrainedRun", "train_run", "build_codebook_model"]


@dataclass
class TrainedRun:
    """What :func:`train_run` produced (everything is also on disk in :attr:`dir`)."""

    dir: RunDir
    """The run directory."""

    cm: CodebookModel
    """The trained codebook model (as saved in ``dir.model_dir``)."""

    result: TrainResult
    """Training history and timing."""

    evaluation: Evaluation
    """The final evaluation on held-out tokens (as saved in ``dir.evaluation``)."""

    sites: list[str]
    """The sites that got codebooks, in order."""


def build_codebook_model(cfg: RunConfig) -> tuple[CodebookModel, list[str]]:
    """Boot the base model of ``cfg`` and attach a codebook at every configured site."""
    model = load_model(cfg.model)
    check_context(cfg.data, model)
    torch.manual_seed(cfg.seed)
    cm = CodebookModel(model)
    sites = attach_site_groups(cm, cfg.sites)
    return cm, sites


def _init_codebooks(cm: CodebookModel, batches: Any, n: int) -> None:
    """Initialise every codebook from the activations of the first ``n`` training batches."""
    it = iter(batches)
    tokens = torch.cat([next(it) for _ in range(n)])
    cm.init_codebooks(tokens.to(next(cm.parameters()).device))


def _eval_fn(cm_base: nn.Module | None, held_out: list[Tensor]) -> Any:
    def run_eval(cm: CodebookModel) -> dict[str, float]:
        return evaluate_codebooks(cm, held_out, base_model=cm_base).flat()

    return run_eval


def train_run(cfg: RunConfig, resume: bool = False, accelerator: Any = None) -> TrainedRun:
    """Train the codebooks of ``cfg`` into the run directory ``cfg.out``.

    A new or empty directory becomes a run; ``resume=True`` continues an interrupted run there
    from its last checkpoint (to the same result as an uninterrupted run). ``accelerator`` (from
    :func:`~codebook_lens.training.make_accelerator`) trains on its device and processes; each
    process reads the same global batches and trains on its share of rows."""
    run = RunDir(Path(cfg.out))
    main = accelerator is None or accelerator.is_main_process
    run.check(cfg.to_dict(), resume)  # before the slow part: fail fast, write nothing
    # Everything that can refuse the config runs before the directory becomes a run, so a
    # fixed config can be run again in the same place.
    cm, sites = build_codebook_model(cfg)
    source = TokenSource(cfg.data, cm.tokenizer)
    held_out = source.eval_batches()
    train_batches = source.train_batches()
    if main:
        run.prepare(cfg.to_dict(), resume)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    # Finetuning changes the model, so the metrics compare with a second, untouched copy.
    base = None if cfg.train.freeze_model else load_model(cfg.model)
    _init_codebooks(cm, train_batches, cfg.init_batches)
    train_cfg = dataclasses.replace(
        cfg.train, checkpoint_dir=str(run.train_dir), metrics_path=str(run.metrics), resume=True
    )
    result = train_codebooks(
        cm,
        source.train_batches(),
        train_cfg,
        eval_fn=_eval_fn(base, held_out) if train_cfg.eval_every else None,
        accelerator=accelerator,
    )
    evaluation = evaluate_codebooks(cm, held_out, base_model=base)
    if main:
        cm.save(run.model_dir, include_model=True)
        write_text(run.evaluation, json.dumps(evaluation.to_dict(), indent=2) + "\n")
        run.mark("train", steps=cfg.train.steps, seconds=result.seconds, sites=sites)
        run.mark("evaluate", n_tokens=evaluation.n_tokens)
        if cfg.report:
            write_run_report(run)
    return TrainedRun(run, cm, result, evaluation, sites)
