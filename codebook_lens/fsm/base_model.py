"""Train the TokFSM base model: a small transformer on random-walk token sequences."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from codebook_lens.backends import backend_of, build_model
from codebook_lens.config import MAX_CODEBOOK_ELEMENTS
from codebook_lens.fsm.data import TokFSMStream, eval_set
from codebook_lens.fsm.machine import FSM
from codebook_lens.fsm.metrics import evaluate_transition_accuracy
from codebook_lens.model import CodebookModel
from codebook_lens.training import TrainConfig, TrainResult, train_codebooks
from codebook_lens.validation import Range, ValidatedConfig

__all__ = [
    "BaseTrainConfig",
    "History",
    "base_model_config",
    "loss_floor",
    "sinusoidal_positions",
    "train_base_model",
]

_MAX_STEPS = 10**9
"""The most optimizer steps (or steps between events) a config accepts."""

_SEED = Range(-(2**62), 2**62)
"""Seeds: 64-bit, with room for the per-stream offsets added to them."""

History = dict[str, list[int | float]]
"""Training history: metric name -> values (see :func:`train_base_model`)."""


@dataclass
class BaseTrainConfig(ValidatedConfig):
    """Architecture and training of the TokFSM base model (the defaults are the tuned ones).

    The defaults train on full 64-state walks (129 tokens), so the model is valid over its
    whole context: a model works only at positions it was trained on. Tuning notes and
    measured figures: ``docs/results/tokfsm.md``.

    Ranges (:attr:`RANGES`, checked on construction and on every assignment): sizes are
    bounded so the model can be allocated (its weights, and one layer's activations of a batch,
    are at most 2**32 elements each; ``d_model`` divisible by ``n_heads``), learning rates lie
    in ``(0, 10]``, ``min_lr_frac`` in ``[0, 1]``, step counts up to a billion.
    """

    RANGES: ClassVar[dict[str, Range]] = {
        "n_layers": Range(1, 1024),
        "d_model": Range(1, 2**16),
        "n_heads": Range(1, 2**16),  # <= d_model: it divides it
        "d_mlp": Range(1, 2**20),
        "n_ctx": Range(2, 2**16),  # BOS and one digit at least
        "steps": Range(1, _MAX_STEPS),
        "batch_size": Range(1, 2**20),
        "walk_states": Range(1, 2**16),
        "lr": Range(0, 10, lo_open=True),
        "weight_decay": Range(0, 10),
        "warmup_steps": Range(0, _MAX_STEPS),
        "min_lr_frac": Range(0, 1),
        "grad_clip": Range(0, 1e6),
        "seed": _SEED,
        "eval_every": Range(0, _MAX_STEPS),
        "log_every": Range(1, _MAX_STEPS),
        "eval_prompts": Range(1, 2**20),
        "eval_prompt_states": Range(1, 2**16),
        "eval_new_states": Range(1, 2**16),
        "eval_seed": _SEED,
    }
    """Bounds of the numeric fields (as :attr:`TrainConfig.RANGES
    <codebook_lens.training.TrainConfig.RANGES>` for the shared ones)."""

    n_layers: int = 2
    """Transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per block (``d_head = d_model // n_heads``)."""
    d_mlp: int = 512
    """MLP hidden width."""
    n_ctx: int = 129
    """Context length in tokens; 129 holds BOS plus a 64-state walk."""
    steps: int = 1500
    """Optimizer steps."""
    batch_size: int = 16
    """Walks per batch (16 x 129 tokens)."""
    walk_states: int = 64
    """States per training walk (as :attr:`ExperimentConfig.walk_states
    <codebook_lens.fsm.experiment.ExperimentConfig.walk_states>` for finetuning);
    ``1 + walk_states * n_digits`` must be ``<= n_ctx``."""
    lr: float = 5e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warmup steps before the cosine decay."""
    min_lr_frac: float = 0.1
    """Final learning rate as a fraction of ``lr`` at the end of the cosine decay (as
    :attr:`TrainConfig.min_lr_frac <codebook_lens.training.TrainConfig.min_lr_frac>`)."""
    grad_clip: float = 1.0
    """Max global gradient norm (``0`` disables clipping)."""
    pos_init: Literal["sinusoidal", "random"] = "sinusoidal"
    """Initial positional embeddings: ``"sinusoidal"`` (the default; periods from 2 to
    ``2 * n_ctx``, rescaled to the random init's norm; the period-2 component marks the digit's
    place in its state, which shortens the early loss plateau while the attention learns to
    read the previous state's digits) or ``"random"`` (TransformerLens's init)."""
    seed: int = 0
    """Seed of the model initialisation and of the training stream."""
    eval_every: int = 0
    """Evaluate transition accuracy every this many steps (``0``: only at the end)."""
    log_every: int = 50
    """Steps between loss read-outs in the history (the loop's only host syncs)."""
    eval_prompts: int = 128
    """Prompts per transition-accuracy evaluation."""
    eval_prompt_states: int = 8
    """States per evaluation prompt."""
    eval_new_states: int = 24
    """States sampled after each evaluation prompt."""
    eval_seed: int = 12345
    """Seed of the held-out evaluation prompts and sampling (differs from ``seed``)."""

    def validate(self) -> None:
        """``d_model`` divisible by ``n_heads`` and sizes that can be allocated (the
        :attr:`RANGES` are checked before this runs)."""
        if self.d_model % self.n_heads:
            raise ValueError(
                f"BaseTrainConfig: d_model={self.d_model} must be divisible by "
                f"n_heads={self.n_heads}"
            )
        weights = self.n_layers * (4 * self.d_model**2 + 2 * self.d_model * self.d_mlp)
        acts = self.batch_size * self.n_ctx * max(self.d_mlp, self.n_heads * self.n_ctx)
        for what, n in (("the weights", weights), ("one layer's activations of a batch", acts)):
            if n > MAX_CODEBOOK_ELEMENTS:
                raise ValueError(
                    f"BaseTrainConfig: {what} would hold {n} elements, over the limit of 2**32 "
                    f"= {MAX_CODEBOOK_ELEMENTS} (16 GiB of float32); make n_layers, d_model, "
                    "d_mlp, n_ctx or batch_size smaller"
                )


def base_model_config(
    fsm: FSM,
    n_layers: int = BaseTrainConfig.n_layers,
    d_model: int = BaseTrainConfig.d_model,
    n_heads: int = BaseTrainConfig.n_heads,
    d_mlp: int = BaseTrainConfig.d_mlp,
    n_ctx: int = BaseTrainConfig.n_ctx,
    seed: int = 0,
) -> dict[str, Any]:
    """TransformerLens config (a dict, for either backend) of a TokFSM base model: GELU MLPs,
    LayerNorm, learned positional embeddings, ``d_vocab = fsm.d_vocab``."""
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    return dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp,
        n_ctx=n_ctx,
        d_vocab=fsm.d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
    )


def loss_floor(fsm: FSM, n_steps: int) -> float:
    """Lowest achievable mean next-token loss (nats) on walks of ``n_steps`` states.

    The sequence's entropy, ``ln(n_states) + (n_steps - 1) ln(n_edges)``, spread over its
    ``n_steps * n_digits`` predicted tokens.
    """
    total = math.log(fsm.n_states) + (n_steps - 1) * math.log(fsm.n_edges)
    return total / (n_steps * fsm.n_digits)


def sinusoidal_positions(n_ctx: int, d_model: int) -> Float[Tensor, "n_ctx d_model"]:
    """Sinusoidal position table with periods ``2 .. 2 * n_ctx`` (geometric), cos then sin.

    The first frequency has period 2, so ``(-1)**pos`` is one of its columns; rows have RMS 1.
    """
    half = d_model // 2
    exponent = torch.arange(half, dtype=torch.float64) / max(1, half - 1)
    periods = 2.0 * float(n_ctx) ** exponent
    angles = 2 * math.pi * torch.arange(n_ctx, dtype=torch.float64).unsqueeze(1) / periods
    table = torch.cat([angles.cos(), angles.sin()], dim=1)
    if table.shape[1] < d_model:  # odd d_model
        table = torch.cat([table, torch.zeros(n_ctx, 1, dtype=torch.float64)], dim=1)
    table = table / table.pow(2).mean(1, keepdim=True).sqrt()
    return table.float()


def train_base_model(
    fsm: FSM,
    cfg: dict[str, Any] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    walk_states: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    progress: bool = True,
    eval_every: int | None = None,
    *,
    train_cfg: BaseTrainConfig | None = None,
    backend: str = "auto",
) -> tuple[nn.Module, History]:
    """Train a TokFSM base model with the next-token loss, through
    :func:`~codebook_lens.training.train_codebooks` (the package's one training loop).

    Every position predicts the next token (BOS predicts the first digit, and so on). AdamW,
    linear warm-up then cosine decay to ``min_lr_frac * lr``, global-norm gradient clipping.
    Arguments left as ``None`` come from ``train_cfg`` (default :class:`BaseTrainConfig`).

    Args:
        fsm: The machine generating the data.
        cfg: Model config (a TransformerLens config dict); default :func:`base_model_config`
            from ``train_cfg``'s architecture.
        steps: ``train_cfg.steps`` when given.
        batch_size: ``train_cfg.batch_size`` when given.
        walk_states: ``train_cfg.walk_states`` when given.
        lr: ``train_cfg.lr`` when given.
        seed: ``train_cfg.seed`` when given.
        eval_every: ``train_cfg.eval_every`` when given.
        progress: Show a tqdm bar with the loss.
        train_cfg: Training hyper-parameters.
        backend: ``"auto"``, ``"hooked"`` or ``"bridge"`` (see :mod:`codebook_lens.backends`).

    Returns:
        ``(model, history)``; ``model`` is in eval mode. ``history`` has lists ``step``,
        ``loss``, ``lr`` (every ``log_every`` steps, mean loss since the last row) and
        ``eval_step``, ``transition_accuracy`` (sampled continuations of held-out prompts, see
        :func:`evaluate_transition_accuracy`), ``eval_loss`` (held-out walks), ``time_s`` (wall
        seconds since the start), recorded at evaluations and always at the last step; plus
        ``loss_floor`` (one value: the best achievable loss, :func:`loss_floor`).
    """
    overrides = dict(
        steps=steps, batch_size=batch_size, walk_states=walk_states, lr=lr, seed=seed,
        eval_every=eval_every,
    )  # fmt: skip
    tc = dataclasses.replace(
        train_cfg or BaseTrainConfig(), **{k: v for k, v in overrides.items() if v is not None}
    )
    model = _initial_model(fsm, cfg, tc, backend)
    device = next(model.parameters()).device
    stream = TokFSMStream(fsm, tc.batch_size, tc.walk_states, seed=tc.seed, device=device)
    held_out = eval_set(fsm, tc.eval_prompts, tc.walk_states, seed=tc.eval_seed).to(device)
    t0 = time.perf_counter()

    def eval_fn(cm: CodebookModel) -> dict[str, float]:
        return {**_evaluate(cm, fsm, tc, held_out), "time_s": time.perf_counter() - t0}

    result = train_codebooks(
        CodebookModel(model), stream, _loop_config(tc, progress), eval_fn=eval_fn
    )
    return model.eval(), _history(result, loss_floor(fsm, tc.walk_states))


def _initial_model(
    fsm: FSM, cfg: dict[str, Any] | None, tc: BaseTrainConfig, backend: str
) -> nn.Module:
    """The untrained model: ``cfg`` (default from ``tc``'s architecture), checked against the
    walk lengths, with sinusoidal positions when ``tc.pos_init`` asks for them."""
    if cfg is None:
        cfg = base_model_config(
            fsm, tc.n_layers, tc.d_model, tc.n_heads, tc.d_mlp, tc.n_ctx, seed=tc.seed
        )
    _check_lengths(fsm, cfg, tc)
    model = build_model(cfg, backend)
    if (
        tc.pos_init == "sinusoidal"
        and cfg.get("positional_embedding_type", "standard") == "standard"
    ):
        _init_positions(model)
    return model


def _loop_config(tc: BaseTrainConfig, progress: bool) -> TrainConfig:
    """The :class:`TrainConfig` of base-model training: ``tc``'s optimizer and schedule."""
    return TrainConfig(
        steps=tc.steps,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        warmup_steps=tc.warmup_steps,
        min_lr_frac=tc.min_lr_frac,
        grad_clip=tc.grad_clip,
        log_every=tc.log_every,
        eval_every=tc.eval_every,
        progress=progress,
        allow_no_codebooks=True,
    )


def _check_lengths(fsm: FSM, cfg: dict[str, Any], tc: BaseTrainConfig) -> None:
    if cfg["d_vocab"] != fsm.d_vocab:
        raise ValueError(f"cfg d_vocab={cfg['d_vocab']} but the FSM has d_vocab={fsm.d_vocab}")
    seq_len = 1 + tc.walk_states * fsm.n_digits
    if seq_len > cfg["n_ctx"]:
        raise ValueError(
            f"walks of {tc.walk_states} states are {seq_len} tokens, more than "
            f"n_ctx={cfg['n_ctx']}; lower walk_states or raise n_ctx"
        )
    eval_len = 1 + (tc.eval_prompt_states + tc.eval_new_states) * fsm.n_digits
    if eval_len > cfg["n_ctx"]:
        raise ValueError(
            f"evaluation needs {eval_len} tokens, more than n_ctx={cfg['n_ctx']}; lower "
            "eval_prompt_states / eval_new_states"
        )


@torch.no_grad()
def _init_positions(model: nn.Module) -> None:
    """Overwrite the learned positional embeddings with the sinusoidal table at their RMS."""
    pe = model.pos_embed
    w_pos = pe.W_pos if backend_of(model) == "hooked" else pe.weight
    rms = w_pos.pow(2).mean().sqrt()
    w_pos.copy_(sinusoidal_positions(w_pos.shape[0], w_pos.shape[1]).to(w_pos) * rms)


def _history(result: TrainResult, floor: float) -> History:
    rows, evals = result.history, result.evals
    return {
        "step": [r["step"] for r in rows],
        "loss": [r["loss"] for r in rows],
        "lr": [r["lr"] for r in rows],
        "eval_step": [e["step"] for e in evals],
        "transition_accuracy": [e["transition_accuracy"] for e in evals],
        "eval_loss": [e["eval_loss"] for e in evals],
        "time_s": [e["time_s"] for e in evals],
        "loss_floor": [floor],
    }


@torch.no_grad()
def _evaluate(
    model: nn.Module, fsm: FSM, tc: BaseTrainConfig, held_out: torch.Tensor
) -> dict[str, float]:
    eval_loss = float(model(held_out, return_type="loss"))
    acc, _ = evaluate_transition_accuracy(
        model,
        fsm,
        n_prompts=tc.eval_prompts,
        prompt_states=tc.eval_prompt_states,
        n_new_states=tc.eval_new_states,
        seed=tc.eval_seed,
    )
    return {"transition_accuracy": acc, "eval_loss": eval_loss}
