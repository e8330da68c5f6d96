"""Generic finetuning loop for a :class:`CodebookModel`: task loss + explicit codebook losses.

Works with any model and any stream of token batches. The reconstruction (and commitment) loss
is a visible, logged term added to the task loss; dead codes are re-seeded on each codebook's
schedule; metrics are read back to the host only at logging steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from codebook_lens.init import replace_dead_codes
from codebook_lens.model import CodebookModel

__all__ = ["TrainConfig", "TrainResult", "train_codebooks", "lm_loss"]


@dataclass
class TrainConfig:
    """Settings of :func:`train_codebooks`."""

    steps: int = 1000
    """Optimizer steps."""

    lr: float = 1e-3
    """Peak learning rate of the base model's parameters."""

    codebook_lr: float | None = None
    """Peak learning rate of the codebooks (defaults to ``lr``)."""

    weight_decay: float = 0.0
    """AdamW weight decay of the base model (codebooks get none)."""

    warmup_steps: int = 50
    """Linear warm-up steps."""

    schedule: str = "cosine"
    """``"cosine"`` decay to ``min_lr_frac * lr`` after warm-up, or ``"constant"``."""

    min_lr_frac: float = 0.1
    """Final learning rate as a fraction of the peak, for the cosine schedule."""

    freeze_model: bool = False
    """Train the codebooks only, keeping the base model's weights fixed."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    log_every: int = 50
    """Steps between metric read-outs (the only host syncs of the loop)."""

    eval_every: int = 0
    """Steps between calls of ``eval_fn`` (0: only at the end, if given)."""

    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"TrainConfig: steps must be >= 1, got {self.steps}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(
                f"TrainConfig: schedule={self.schedule!r}; choose 'cosine' or 'constant'"
            )
        if self.lr <= 0 or (self.codebook_lr is not None and self.codebook_lr <= 0):
            raise ValueError("TrainConfig: learning rates must be > 0")


@dataclass
class TrainResult:
    """What :func:`train_codebooks` measured."""

    history: list[dict[str, float]] = field(default_factory=list)
    """One dict per logging step: step, loss, task_loss, recon (mean over codebooks),
    dead_frac (codes unused since the previous log), lr, and any ``eval_fn`` metrics."""

    evals: list[dict[str, float]] = field(default_factory=list)
    """``eval_fn`` results, each with its step."""

    seconds: float = 0.0
    """Wall time of the loop."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def lm_loss(cm: CodebookModel, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``tokens`` [batch, pos] under the codebook model."""
    return cm(tokens, return_type="loss")


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _optimizer(cm: CodebookModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [
        {
            "params": list(cm.codebook_parameters()),
            "lr": cfg.codebook_lr or cfg.lr,
            "weight_decay": 0.0,
        }
    ]
    if not cfg.freeze_model:
        groups.append(
            {"params": list(cm.model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        )
    for p in cm.model.parameters():
        p.requires_grad_(not cfg.freeze_model)
    return torch.optim.AdamW(groups)


def train_codebooks(
    cm: CodebookModel,
    data: Iterable[Tensor],
    cfg: TrainConfig | None = None,
    loss_fn: Callable[[CodebookModel, Tensor], Tensor] = lm_loss,
    eval_fn: Callable[[CodebookModel], dict[str, float]] | None = None,
) -> TrainResult:
    """Finetune ``cm`` on batches from ``data`` with ``loss_fn`` + the codebooks' aux loss.

    ``data`` yields token batches (it is cycled if it runs out). ``eval_fn(cm)`` returns a dict
    of metrics; it runs every ``cfg.eval_every`` steps and at the end, in eval mode.
    """
    cfg = cfg or TrainConfig()
    if not cm.codebooks:
        raise ValueError("train_codebooks: the model has no codebooks; add_codebook(...) first")
    opt = _optimizer(cm, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    result = TrainResult()
    batches = _cycle(data)
    cbs = cm.codebooks
    for cb in cbs.values():
        cb.window_counts.zero_()
    log_counts = {s: cb.code_counts.clone() for s, cb in cbs.items()}
    acc = {k: torch.zeros(()) for k in ("loss", "task_loss", "recon")}
    n_acc = 0
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc="train codebooks", leave=False)
    cm.train()
    for step in bar:
        f = _lr_factor(step, cfg)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        tokens = next(batches)
        task = loss_fn(cm, tokens)
        aux = cm.aux_loss()
        loss = task + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        recon = sum(cb.last_losses["recon"] for cb in cbs.values()) / len(cbs)
        for k, v in (("loss", loss), ("task_loss", task), ("recon", recon)):
            acc[k] = acc[k] + v.detach().to(acc[k].device)
        n_acc += 1
        for cb in cbs.values():
            if cb.cfg.dead_code_threshold > 0 and (step + 1) % cb.cfg.replace_every == 0:
                replace_dead_codes(cb)
        last = step + 1 == cfg.steps
        ev: dict[str, float] = {}
        if eval_fn is not None and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            cm.eval()
            with torch.no_grad():
                ev = dict(eval_fn(cm))
            cm.train()
            result.evals.append({"step": step + 1, **ev})
        if (step + 1) % cfg.log_every == 0 or last:
            row: dict[str, float] = {"step": step + 1, "lr": opt.param_groups[0]["lr"]}
            row.update({k: float(v) / n_acc for k, v in acc.items()})
            dead = [(cb.code_counts - log_counts[s] == 0).float().mean() for s, cb in cbs.items()]
            row["dead_frac"] = float(torch.stack(dead).mean())
            row.update(ev)
            log_counts = {s: cb.code_counts.clone() for s, cb in cbs.items()}
            acc = {k: torch.zeros(()) for k in acc}
            n_acc = 0
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(
                    f"training diverged at step {step + 1} (loss {row['loss']}); lower the "
                    "learning rate or use input_norm='layernorm' for large-norm sites"
                )
            result.history.append(row)
            bar.set_postfix(
                {k: f"{row[k]:.3g}" for k in ("loss", "recon", "dead_frac")}
                | {k: f"{v:.3f}" for k, v in ev.items()}
            )
    cm.eval()
    if cfg.freeze_model:
        for p in cm.model.parameters():
            p.requires_grad_(True)
    result.seconds = time.perf_counter() - start
    return result


def _cycle(data: Iterable[Tensor]) -> Iterator[Tensor]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_codebooks: the data iterable yielded no batches")
