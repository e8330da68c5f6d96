"""Generic finetuning loop for a :class:`CodebookModel`: task loss + explicit codebook losses.

Works with any model and any stream of token batches. The reconstruction (and commitment) loss
is a visible, logged term added to the task loss; each codebook is maintained on its schedule
(:meth:`Codebook.maintain`: dead codes re-seeded, near-duplicates merged); metrics are
read back to the host only at logging steps.

The same loop runs on one CPU, one GPU, or several processes through Hugging Face Accelerate
(pass ``accelerator=``; launch with ``accelerate launch``): gradient accumulation, mixed
precision (the accelerator's ``mixed_precision``), atomic checkpoints with exact resume, a JSONL
metrics file and optional wandb logging. Under several processes every process holds the whole
model; gradients are averaged across processes once per optimizer step (a bucketed all-reduce,
numerically what DDP does), so ``loss_fn`` keeps receiving the :class:`CodebookModel` itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, NoReturn

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from codebook_lens.atomic import CheckpointError, write_text
from codebook_lens.checkpoint import (
    TrainState,
    check_checkpoint_dir,
    load_train_state,
    restore_rng,
    save_train_state,
)
from codebook_lens.data import shard_batch
from codebook_lens.model import CodebookModel
from codebook_lens.quantizer import Codebook
from codebook_lens.validation import Range, ValidatedConfig

__all__ = [
    "Schedule",
    "TrainConfig",
    "TrainResult",
    "train_codebooks",
    "lm_loss",
    "make_accelerator",
    "exit_processes",
]


_MAX_STEPS = 10**9  # a billion steps: far beyond any run, far below any overflow

Schedule = Literal["cosine", "constant"]
"""The learning-rate schedules of :class:`TrainConfig`."""


@dataclass
class TrainConfig(ValidatedConfig):
    """Settings of :func:`train_codebooks`; field types and ranges are checked on construction
    and on every later assignment."""

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

    schedule: Schedule = "cosine"
    """Learning-rate schedule after warm-up: ``"cosine"`` decay to ``min_lr_frac * lr`` (the
    default) or ``"constant"``."""

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
    """Show a tqdm progress bar (on the main process only)."""

    grad_accum: int = 1
    """Micro-batches per optimizer step; their gradients are averaged, so ``grad_accum``
    micro-batches of ``b`` rows match one batch of ``grad_accum * b`` rows."""

    split_batches: bool = True
    """Under several processes, treat every batch from ``data`` as the global batch and give
    each process its ``1/num_processes`` of the rows (:func:`~codebook_lens.data.shard_batch`):
    the same script then sees the same data on 1 or N processes. Set False when ``data``
    already yields each process's own batches (e.g. a sharded ``BlockStream``)."""

    checkpoint_dir: str | None = None
    """Directory for checkpoints (``<dir>/checkpoint``, replaced atomically); None disables."""

    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end, when ``checkpoint_dir`` is set). An
    interrupted run loses at most this many steps."""

    resume: bool = True
    """Continue from the checkpoint in ``checkpoint_dir`` if there is one (exactly: model,
    codebooks, optimizer, RNG, data position and history are restored)."""

    metrics_path: str | None = None
    """Append each logged row as one JSON line to this file (main process only)."""

    wandb_project: str | None = None
    """Log rows to this Weights & Biases project (needs ``wandb`` installed; off when None)."""

    allow_no_codebooks: bool = False
    """Allow a model without codebooks (plain language-model training through the same loop)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "steps": Range(1, _MAX_STEPS),
        "lr": Range(0, 10, lo_open=True),
        "codebook_lr": Range(0, 10, lo_open=True),
        "weight_decay": Range(0, 10),
        "warmup_steps": Range(0, _MAX_STEPS),
        "min_lr_frac": Range(0, 1),
        "grad_clip": Range(0, 1e6),
        "log_every": Range(1, _MAX_STEPS),
        "eval_every": Range(0, _MAX_STEPS),
        "grad_accum": Range(1, 2**16),
        "checkpoint_every": Range(0, _MAX_STEPS),
    }
    """Bounds of the numeric fields: learning rates in (0, 10], fractions in [0, 1], step
    counts up to a billion, ``grad_accum`` up to 65536."""

    def __post_init__(self) -> None:
        import os  # path-like directories are kept as str (the config is saved as JSON)

        for name in ("checkpoint_dir", "metrics_path"):
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        super().__post_init__()

    def validate(self) -> None:
        """Cross-field and path checks (types, ``Literal`` choices and the :attr:`RANGES` are
        checked against the annotations before this runs)."""
        for name in ("checkpoint_dir", "metrics_path", "wandb_project"):
            value = getattr(self, name)
            if value == "" or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"TrainConfig: {name} must not be empty; pass a name, or None")
            if isinstance(value, str) and "\0" in value:
                raise ValueError(f"TrainConfig: {name} holds a NUL character: {value!r}")


@dataclass
class TrainResult:
    """What :func:`train_codebooks` measured."""

    history: list[dict[str, float]] = field(default_factory=list)
    """One dict per logging step: step, loss, task_loss, recon (mean over codebooks),
    dead_frac (codes unused since the previous log), lr, and any ``eval_fn`` metrics."""

    evals: list[dict[str, float]] = field(default_factory=list)
    """``eval_fn`` results, each with its step."""

    seconds: float = 0.0
    """Wall time of the loop (summed over resumed runs)."""

    resumed_from: int = 0
    """Step the run resumed from (0 for a fresh run)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def lm_loss(cm: CodebookModel, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy of ``tokens`` [batch, pos] under the codebook model."""
    return cm(tokens, return_type="loss")


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool(
        (mps is not None and mps.is_available()) or (xpu is not None and xpu.is_available())
    )


def make_accelerator(cpu: bool | None = None, mixed_precision: str = "auto", **kwargs: Any) -> Any:
    """An ``accelerate.Accelerator`` with mixed precision where the device supports it.

    ``cpu=None`` uses the CPU exactly when the machine has no GPU (so that several processes on
    a CPU-only machine form a gloo group instead of silently running apart).
    ``mixed_precision="auto"`` picks ``"bf16"`` on a CUDA device that supports it, ``"fp16"``
    on an older CUDA device and ``"no"`` elsewhere (CPU autocast is slower than fp32 on most
    CPUs); ``"no"``, ``"fp16"`` and ``"bf16"`` are passed through. Other keyword arguments go
    to ``Accelerator``.

    Launch several processes with ``accelerate launch --multi_gpu --num_processes N script.py``
    (also on a CPU-only machine: accelerate's ``--cpu`` flag starts one process unless MPI is
    set up).
    """
    from accelerate import Accelerator

    if cpu is None:
        cpu = not _has_accelerator_device()
    if mixed_precision == "auto":
        mixed_precision = "no"
        if not cpu and torch.cuda.is_available():
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mixed_precision not in ("no", "fp16", "bf16", "fp8"):
        raise ValueError(
            f"mixed_precision={mixed_precision!r}; choose 'auto', 'no', 'fp16' or 'bf16'"
        )
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, **kwargs)


def exit_processes(accelerator: Any, code: int = 0) -> NoReturn:
    """End this process of a multi-process run: wait for the others, destroy the process group,
    flush the output and exit with ``code`` without interpreter teardown.

    Gloo keeps C++ threads that the interpreter's teardown can destroy while still joinable,
    aborting a finished process ("terminate called without an active exception", SIGABRT),
    even after ``destroy_process_group``; ``os._exit`` skips that teardown, as
    ``multiprocessing`` does in its children.
    """
    import torch.distributed as dist

    accelerator.wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _optimizer(cm: CodebookModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = []
    cb_params = list(cm.codebook_parameters())
    if cb_params:
        groups.append({"params": cb_params, "lr": cfg.codebook_lr or cfg.lr, "weight_decay": 0.0})
    if not cfg.freeze_model:
        groups.append(
            {"params": list(cm.model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        )
    if not groups:
        raise ValueError("train_codebooks: nothing to train (no codebooks and freeze_model=True)")
    for p in cm.model.parameters():
        p.requires_grad_(not cfg.freeze_model)
    return torch.optim.AdamW(groups)


class _Dist:
    """The few collective operations the loop needs; no-ops on one process."""

    def __init__(self, accelerator: Any):
        self.acc = accelerator
        self.n = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.main = accelerator.is_main_process if accelerator is not None else True

    def mean(self, t: Tensor) -> Tensor:
        return self.acc.reduce(t, reduction="mean") if self.n > 1 else t

    def sum(self, t: Tensor) -> Tensor:
        return self.acc.reduce(t, reduction="sum") if self.n > 1 else t

    def broadcast_(self, t: Tensor) -> None:
        if self.n > 1:
            from accelerate.utils import broadcast

            t.copy_(broadcast(t.contiguous(), from_process=0))

    def average_grads(self, params: list[torch.nn.Parameter], bucket_bytes: int = 2**25) -> None:
        """All-reduce (mean) every gradient in buckets of about ``bucket_bytes``."""
        if self.n == 1:
            return
        for p in params:  # every process must hold a gradient for every parameter
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)  # type: ignore[union-attr]
        for grads in by_dtype.values():
            bucket: list[Tensor] = []
            size = 0
            for g in [*grads, None]:
                if g is not None:
                    bucket.append(g)
                    size += g.numel() * g.element_size()
                if bucket and (g is None or size >= bucket_bytes):
                    flat = self.mean(torch.cat([b.reshape(-1) for b in bucket]))
                    for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                        b.copy_(part.view_as(b))
                    bucket, size = [], 0


def _open_wandb(cfg: TrainConfig, dist: _Dist) -> Any:
    if not cfg.wandb_project or not dist.main:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "TrainConfig.wandb_project is set but wandb is not installed; pip install wandb, "
            "or log to a file with metrics_path="
        ) from e
    return wandb.init(project=cfg.wandb_project, config=asdict(cfg))


@dataclass
class _Setup:
    """What one call of :func:`train_codebooks` fixes before its first step."""

    cm: CodebookModel
    cfg: TrainConfig
    loss_fn: Callable[[CodebookModel, Tensor], Tensor]
    eval_fn: Callable[[CodebookModel], dict[str, float]] | None
    acc: Any  # an accelerate.Accelerator (an optional dependency) or None
    dist: _Dist
    device: torch.device
    cbs: dict[str, Codebook]
    opt: torch.optim.Optimizer
    step_opt: Any  # opt, wrapped by the accelerator when there is one
    base_lrs: list[float]
    params: list[torch.nn.Parameter]
    n_micro: int  # micro-batches per optimizer step
    acc_div: int  # the accelerator's gradient_accumulation_steps (1 without one)
    ckpt_cfg: dict[str, Any]  # the config a checkpoint must match to be resumed


@dataclass
class _Loop:
    """What the loop carries from step to step; a checkpoint saves it (``batches`` as the count
    ``consumed``)."""

    batches: Iterator[Tensor]
    consumed: int  # batches drawn from the data so far
    sums: Tensor  # [3] sums of loss, task loss and recon since the last log
    n_acc: int  # micro-batches in ``sums``
    log_counts: dict[str, Tensor]  # each codebook's code_counts at the last log
    result: TrainResult
    last_saved: int | None  # step of the last checkpoint written
    start: float = 0.0  # perf_counter origin, earlier runs' time included


def train_codebooks(
    cm: CodebookModel,
    data: Iterable[Tensor],
    cfg: TrainConfig | None = None,
    loss_fn: Callable[[CodebookModel, Tensor], Tensor] = lm_loss,
    eval_fn: Callable[[CodebookModel], dict[str, float]] | None = None,
    accelerator: Any = None,
) -> TrainResult:
    """Finetune ``cm`` on batches from ``data`` with ``loss_fn`` + the codebooks' aux loss.

    ``data`` yields token batches (it is cycled if it runs out); one optimizer step takes
    ``cfg.grad_accum`` of them. ``eval_fn(cm)`` returns a dict of metrics; it runs every
    ``cfg.eval_every`` steps and at the end, in eval mode, on every process.

    ``accelerator`` (an ``accelerate.Accelerator``, e.g. from :func:`make_accelerator`) moves the
    model to its device, runs the forward under its mixed-precision autocast, scales fp16
    losses, and averages gradients over its processes. Without it the loop runs on the model's
    device in plain PyTorch. With ``cfg.checkpoint_dir`` the run checkpoints every
    ``cfg.checkpoint_every`` steps and at the end, and a later call with the same setup resumes
    from the last checkpoint, ending in the same state as an uninterrupted run.
    """
    cfg = cfg or TrainConfig()
    s = _prepare(cm, cfg, loss_fn, eval_fn, accelerator)
    state, loop = _start_loop(s, _resume(s), data)
    if cfg.metrics_path and s.dist.main:
        rows = "".join(json.dumps(r) + "\n" for r in loop.result.history)
        write_text(cfg.metrics_path, rows)  # drops rows logged after the checkpoint
    wb = _open_wandb(cfg, s.dist)
    _skip(loop, state.consumed)  # resume: the data position after the checkpoint
    restore_rng(state)  # after the skip, so data drawing from the global RNG resumes exactly
    loop.start = time.perf_counter() - state.seconds
    bar = tqdm(
        range(state.step, cfg.steps),
        initial=state.step,
        total=cfg.steps,
        disable=not (cfg.progress and s.dist.main),
        desc="train codebooks" if s.cbs else "train model",
        leave=False,
    )
    cm.train()
    for step in bar:
        _train_step(s, loop, step)
        _maybe_maintain(s, step + 1)
        ev = _maybe_evaluate(s, loop, step + 1)
        _maybe_log(s, loop, step + 1, ev, wb, bar)
        _maybe_checkpoint(s, loop, step + 1)
    bar.close()
    cm.eval()
    if cfg.freeze_model:
        for p in cm.model.parameters():
            p.requires_grad_(True)
    if wb is not None:
        wb.finish()
    loop.result.seconds = time.perf_counter() - loop.start
    return loop.result


def _prepare(
    cm: CodebookModel,
    cfg: TrainConfig,
    loss_fn: Callable[[CodebookModel, Tensor], Tensor],
    eval_fn: Callable[[CodebookModel], dict[str, float]] | None,
    acc: Any,
) -> _Setup:
    """Check the setup, place the model and build the optimizer."""
    if cfg.checkpoint_dir:
        check_checkpoint_dir(cfg.checkpoint_dir)  # a file there fails now, not after training
    if not cm.codebooks and not cfg.allow_no_codebooks:
        raise ValueError(
            "train_codebooks: the model has no codebooks; add_codebook(...) first (or set "
            "TrainConfig(allow_no_codebooks=True) to train the plain model)"
        )
    dist = _Dist(acc)
    if acc is not None:
        cm.to(acc.device)
    device = next(cm.parameters()).device
    opt = _optimizer(cm, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]
    step_opt = acc.prepare_optimizer(opt, device_placement=False) if acc is not None else opt
    n_micro = cfg.grad_accum
    acc_div = acc.gradient_accumulation_steps if acc is not None else 1
    if acc_div > 1 and n_micro not in (1, acc_div):
        raise ValueError(
            f"grad_accum={n_micro} conflicts with the accelerator's "
            f"gradient_accumulation_steps={acc_div}; set one of them"
        )
    return _Setup(
        cm, cfg, loss_fn, eval_fn, acc, dist, device, cm.codebooks, opt, step_opt, base_lrs,
        params, max(n_micro, acc_div), acc_div,
        {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
    )  # fmt: skip


def _resume(s: _Setup) -> TrainState | None:
    """The checkpoint's state when resuming from one (model, codebooks and optimizer are
    loaded), else None."""
    cfg = s.cfg
    if not (cfg.checkpoint_dir and cfg.resume):
        return None
    loop_shapes = {
        "sums": (3,),
        **{f"log_counts.{site}": tuple(cb.code_counts.shape) for site, cb in s.cbs.items()},
    }
    return load_train_state(
        cfg.checkpoint_dir, s.cm, s.opt, set_rng=False, steps=cfg.steps, config=s.ckpt_cfg,
        micro_batches=s.n_micro, loop_shapes=loop_shapes,
    )  # fmt: skip


def _start_loop(
    s: _Setup, loaded: TrainState | None, data: Iterable[Tensor]
) -> tuple[TrainState, _Loop]:
    """The state to start from (``loaded``, or a fresh one that restarts the codebooks' usage
    windows) and the loop's accumulators and result as that state left them."""
    if loaded is None:
        state = TrainState()
        for cb in s.cbs.values():
            cb.restart_window()
        log_counts = {site: cb.code_counts.clone() for site, cb in s.cbs.items()}
        sums = torch.zeros(3, device=s.device, dtype=_metric_dtype(s.device))
        n_acc = 0
    else:
        state = loaded
        log_counts, sums, n_acc = _loop_state(state, s.cbs, s.device)
        if not s.dist.main:  # process 0 saved the totals (_settle); the others restart at zero
            sums.zero_()
            for site, cb in s.cbs.items():
                cb.restart_window()
                cb.set_usage(code_counts=log_counts[site])
    result = TrainResult(resumed_from=0 if loaded is None else state.step)
    result.history, result.evals = list(state.history), list(state.evals)
    last_saved = state.step if result.resumed_from else None
    return state, _Loop(_cycle(data), state.consumed, sums, n_acc, log_counts, result, last_saved)


def _train_step(s: _Setup, loop: _Loop, step: int) -> None:
    """One optimizer step (0-based ``step``): ``n_micro`` micro-batches, gradients averaged over
    processes and clipped."""
    f = _lr_factor(step, s.cfg)
    for g, lr in zip(s.opt.param_groups, s.base_lrs):
        g["lr"] = lr * f
    s.opt.zero_grad(set_to_none=True)
    try:
        for _micro in range(s.n_micro):
            _micro_step(s, loop)
    except _RanOut as e:
        raise ValueError(
            f"train_codebooks: the data ran out after {_batches(e.n)}, at step {step + 1} of "
            f"{s.cfg.steps} ({s.n_micro} per step); an iterator is read only once, so pass a "
            "re-iterable (a list, a DataLoader), which is cycled, or an iterator long enough, "
            "or lower steps"
        ) from None
    s.dist.average_grads(s.params)
    if s.cfg.grad_clip > 0:
        if s.acc is not None:
            s.acc.clip_grad_norm_(s.params, s.cfg.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(s.params, s.cfg.grad_clip)
    s.step_opt.step()


def _micro_step(s: _Setup, loop: _Loop) -> None:
    """Forward and backward of one micro-batch; its losses are added to ``loop.sums``."""
    tokens = next(loop.batches)
    loop.consumed += 1
    if s.cfg.split_batches:
        tokens = shard_batch(tokens, s.dist.rank, s.dist.n)
    tokens = tokens.to(s.device)
    with s.acc.autocast() if s.acc is not None else contextlib.nullcontext():
        task = s.loss_fn(s.cm, tokens)
        aux = s.cm.aux_loss()
    loss = task + aux
    scaled = loss / s.n_micro if s.n_micro > 1 else loss
    if s.acc is not None:
        s.acc.backward(scaled * s.acc_div if s.acc_div > 1 else scaled)
    else:
        scaled.backward()
    cbs = s.cbs
    recon = (
        sum(cb.last_losses["recon"] for cb in cbs.values()) / len(cbs)
        if cbs
        else loss.new_zeros(())
    )
    loop.sums = loop.sums + torch.stack([loss, task, recon]).detach().to(loop.sums)
    loop.n_acc += 1


def _maybe_maintain(s: _Setup, done: int) -> None:
    """Maintenance of each codebook due after ``done`` steps, on global usage counts; the
    optimizer forgets the moments of the codes it changed, and process 0's codes win."""
    for cb in s.cbs.values():
        if cb.maintenance_due(done):
            if s.dist.n > 1:
                cb.set_usage(window_counts=s.dist.sum(cb.window_counts))
            _reset_moments(s.opt, cb.codebook, cb.maintain())
            with torch.no_grad():
                s.dist.broadcast_(cb.codebook.data)


def _maybe_evaluate(s: _Setup, loop: _Loop, done: int) -> dict[str, float]:
    """``eval_fn``'s metrics when an evaluation is due after ``done`` steps (else ``{}``)."""
    cfg = s.cfg
    due = done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)
    if s.eval_fn is None or not due:
        return {}
    s.cm.eval()
    with torch.no_grad():
        ev = dict(s.eval_fn(s.cm))
    s.cm.train()
    loop.result.evals.append({"step": done, **ev})
    return ev


def _maybe_log(s: _Setup, loop: _Loop, done: int, ev: dict[str, float], wb: Any, bar: tqdm) -> None:
    """At a logging step, one history row (with ``ev``) to the result, the metrics file, wandb
    and the progress bar; the accumulators restart. A non-finite loss raises."""
    if done % s.cfg.log_every != 0 and done != s.cfg.steps:
        return
    row = _log_row(done, s.opt, loop.sums, loop.n_acc, s.cbs, loop.log_counts, s.dist)
    row.update(ev)
    loop.log_counts = {site: cb.code_counts.clone() for site, cb in s.cbs.items()}
    loop.sums, loop.n_acc = torch.zeros_like(loop.sums), 0
    if not math.isfinite(row["loss"]):
        raise FloatingPointError(
            f"training diverged at step {done} (loss {row['loss']}); lower the "
            "learning rate or use input_norm='layernorm' for large-norm sites"
        )
    loop.result.history.append(row)
    if s.dist.main:
        if s.cfg.metrics_path:
            with open(s.cfg.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if wb is not None:
            wb.log(row, step=done)
    bar.set_postfix(
        {k: f"{row[k]:.3g}" for k in ("loss", "recon", "dead_frac") if k in row}
        | {k: f"{v:.3f}" for k, v in ev.items()}
    )


def _maybe_checkpoint(s: _Setup, loop: _Loop, done: int) -> None:
    """Save the run after ``done`` steps when a checkpoint is due (process 0 writes)."""
    cfg = s.cfg
    due = done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
    if not cfg.checkpoint_dir or not due:
        return
    _settle(s, loop)
    snap = TrainState(
        step=done,
        consumed=loop.consumed,
        history=loop.result.history,
        evals=loop.result.evals,
        seconds=time.perf_counter() - loop.start,
        tensors={"sums": loop.sums, **{f"log_counts.{k}": c for k, c in loop.log_counts.items()}},
        scalars={"n_acc": loop.n_acc, "n_micro": s.n_micro},
    )
    if s.dist.main:
        save_train_state(
            cfg.checkpoint_dir, s.cm, s.opt, snap, s.ckpt_cfg,
            include_model=not cfg.freeze_model, last_good_step=loop.last_saved,
        )  # fmt: skip
    loop.last_saved = done
    if s.acc is not None:
        s.acc.wait_for_everyone()


def _settle(s: _Setup, loop: _Loop) -> None:
    """Under several processes, move the per-process accumulators (loss sums, code usage since
    the last log, usage windows since the last maintenance) into process 0 before a checkpoint:
    global totals there, zero elsewhere. Later logs and maintenance sum over processes, so they
    see the same totals; process 0 saves them, and a run resumed from the checkpoint, whose
    other processes restart at zero, continues bit for bit as this one does."""
    if s.dist.n == 1:
        return
    main = s.dist.main
    total = s.dist.sum(loop.sums)
    loop.sums = total if main else torch.zeros_like(total)
    for site, cb in s.cbs.items():
        since_log = s.dist.sum(cb.code_counts - loop.log_counts[site])
        window = s.dist.sum(cb.window_counts)
        cb.set_usage(
            code_counts=loop.log_counts[site] + since_log if main else loop.log_counts[site],
            window_counts=window if main else torch.zeros_like(window),
        )


def _log_row(
    done: int,
    opt: torch.optim.Optimizer,
    sums: Tensor,
    n_acc: int,
    cbs: dict[str, Codebook],
    log_counts: dict[str, Tensor],
    dist: _Dist,
) -> dict[str, float]:
    """One history row; under several processes, losses are averaged and usage is summed over
    processes (the code counters then hold the global counts on every process)."""
    means = dist.mean(sums / max(n_acc, 1))
    row: dict[str, float] = {"step": done, "lr": opt.param_groups[0]["lr"]}
    row.update(zip(("loss", "task_loss", "recon"), means.tolist()))
    if cbs:
        dead = []
        for s, cb in cbs.items():
            delta = dist.sum(cb.code_counts - log_counts[s])
            if dist.n > 1:
                cb.set_usage(code_counts=log_counts[s] + delta)
            dead.append((delta == 0).float().mean())
        row["dead_frac"] = float(torch.stack(dead).mean())
    return row


def _loop_state(
    state: TrainState, cbs: dict[str, Codebook], device: torch.device
) -> tuple[dict[str, Tensor], Tensor, int]:
    """The loop's accumulators from a loaded checkpoint, checked (CheckpointError if not)."""
    want = {
        "sums": (3,),
        **{f"log_counts.{s}": tuple(cb.code_counts.shape) for s, cb in cbs.items()},
    }
    for key, shape in want.items():
        t = state.tensors.get(key)
        if t is None or tuple(t.shape) != shape:
            raise CheckpointError(
                f"the training checkpoint's loop tensor {key!r} is "
                f"{'missing' if t is None else f'of shape {tuple(t.shape)}'} (expected {shape}); "
                "it is corrupt or from another setup: use a fresh checkpoint_dir"
            )
    n_acc = state.scalars.get("n_acc")
    if type(n_acc) is not int or n_acc < 0:
        raise CheckpointError(f"the training checkpoint's n_acc={n_acc!r} is not a count")
    log_counts = {s: state.tensors[f"log_counts.{s}"].to(device) for s in cbs}
    return log_counts, state.tensors["sums"].to(device, _metric_dtype(device)), n_acc


def _metric_dtype(device: torch.device) -> torch.dtype:
    """Loss sums accumulate in float64 (exact enough to compare runs), float32 where the device
    has no float64 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def _reset_moments(opt: torch.optim.Optimizer, param: Tensor, rows: Tensor) -> None:
    """Zero the optimizer's running moments of the codes in ``rows`` ([G, N] mask): a re-seeded
    or parked code must not keep moving on its old momentum (a parked one would drift off zero)."""
    if not bool(rows.any()):
        return
    for buf in opt.state.get(param, {}).values():
        if isinstance(buf, Tensor) and buf.shape == param.shape:
            buf.masked_fill_(rows[..., None], 0.0)


class _RanOut(Exception):
    """The data stopped yielding after ``n`` batches (an exhausted iterator)."""

    def __init__(self, n: int):
        super().__init__(n)
        self.n = n


def _batches(n: int) -> str:
    return f"{n} batch" if n == 1 else f"{n} batches"


def _cycle(data: Iterable[Tensor]) -> Iterator[Tensor]:
    """``data`` over and over; raises :class:`_RanOut` when a pass yields nothing after
    earlier passes did (an iterator), ``ValueError`` when the first pass does."""
    n = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            n += 1
            yield batch
        if empty and n:
            raise _RanOut(n)
        if empty:
            raise ValueError("train_codebooks: the data iterable yielded no batches")


def _skip(loop: _Loop, consumed: int) -> None:
    """Draw the ``consumed`` batches that the checkpointed run already trained on."""
    try:
        for _ in range(consumed):
            next(loop.batches)
    except _RanOut as e:
        raise ValueError(
            f"train_codebooks: the data ran out after {_batches(e.n)} while resuming: the "
            f"checkpoint's data position is {consumed}; pass the data of the interrupted run "
            "(a re-iterable such as a list or DataLoader, or an iterator long enough)"
        ) from None
