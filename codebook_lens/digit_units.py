"""Prompts made of fixed-width digit units: BOS, then units of ``n_digits`` digit tokens
``0 .. base-1`` (a TokFSM state is one unit). :class:`DigitPrompts` is how an experiment
describes such a vocabulary in its run directory (the browser reads it from there), and
:func:`next_unit_distribution` is a model's exact distribution over the next unit.

Models are any callable ``model(tokens) -> logits [batch, pos, d_vocab]``: a
``HookedTransformer``, a module that wraps one, or a plain function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "DigitPrompts",
    "Model",
    "append_digit_prefixes",
    "check_context",
    "infer_n_ctx",
    "model_device",
    "model_logits",
    "next_unit_distribution",
]

Model = Callable[..., Any]
"""A callable returning logits ``[batch, pos, d_vocab]`` for tokens ``[batch, pos]``."""


@dataclass(frozen=True)
class DigitPrompts:
    """A digit-unit vocabulary as an experiment describes it in its run directory (JSON via
    :meth:`to_dict`): digits ``0 .. base-1``, ``n_digits`` per unit, units ``0 .. n_units-1``,
    the BOS token and each unit's valid successors (TokFSM: the machine's edges)."""

    base: int
    """Digit tokens ``0 .. base-1``."""
    n_digits: int
    """Digits per unit."""
    n_units: int
    """Valid units ``0 .. n_units-1``."""
    bos: int
    """The BOS token id."""
    successors: list[list[int]] = field(default_factory=list)
    """Per unit, the units that may follow it (empty: not known)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what :meth:`from_dict` reads)."""
        return {
            "base": self.base, "n_digits": self.n_digits, "n_units": self.n_units,
            "bos": self.bos, "successors": self.successors,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any, where: str) -> DigitPrompts:
        """Read :meth:`to_dict` output (untrusted JSON); ``ValueError`` naming ``where`` and
        the field otherwise."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: the digit prompt format must be an object, got {d!r}")
        for key in ("base", "n_digits", "n_units", "bos"):
            v = d.get(key)
            if type(v) is not int or not 0 <= v <= 2**20 or (key != "bos" and v < 1):
                raise ValueError(f"{where}: {key} must be an integer in [1, 2**20], got {v!r}")
        succ = d.get("successors", [])
        n = d["n_units"]
        if not isinstance(succ, list) or not all(
            isinstance(r, list) and all(type(u) is int and 0 <= u < n for u in r) for r in succ
        ):
            raise ValueError(f"{where}: successors must be lists of units in [0, {n})")
        return cls(d["base"], d["n_digits"], n, d["bos"], succ)

    def tokenize(self, prompt: str) -> list[int]:
        """BOS and the digits of ``prompt`` (spaces allowed); ``ValueError`` for other text."""
        digits = [c for c in prompt if not c.isspace()]
        if not digits or any(not c.isdigit() or int(c) >= self.base for c in digits):
            raise ValueError(
                f"a TokFSM prompt is digits 0-{self.base - 1} (spaces allowed), e.g. "
                "'12 07 33'; BOS is added"
            )
        return [self.bos] + [int(c) for c in digits]

    def last_unit(self, tokens: list[int]) -> int | None:
        """The last whole unit of BOS-led ``tokens`` (None: no unit yet)."""
        body = tokens[1:]
        if len(body) < self.n_digits:
            return None
        whole = body[: len(body) // self.n_digits * self.n_digits]
        unit = 0
        for digit in whole[-self.n_digits :]:
            unit = unit * self.base + digit
        return unit


def infer_n_ctx(model: Model) -> int | None:
    """The context length of ``model``, or ``None`` when it cannot be found.

    Looks at ``model.cfg.n_ctx`` and then at every submodule's ``cfg.n_ctx`` (so a module that
    wraps a ``HookedTransformer`` works).
    """
    cfg = getattr(model, "cfg", None)
    if cfg is not None and isinstance(getattr(cfg, "n_ctx", None), int):
        return cfg.n_ctx
    if isinstance(model, torch.nn.Module):
        for sub in model.modules():
            cfg = getattr(sub, "cfg", None)
            if cfg is not None and isinstance(getattr(cfg, "n_ctx", None), int):
                return cfg.n_ctx
    return None


def model_device(model: Model) -> torch.device | None:
    """Device of the model's first parameter, if it has any."""
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    return None


def model_logits(
    model: Model, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos vocab"]:
    """Call ``model(tokens)`` and return its logits (accepts objects with ``.logits`` too)."""
    out = model(tokens)
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"model(tokens) must return logits [batch, pos, d_vocab], got {type(out).__name__}"
    )


def check_context(model: Model, total: int, n_ctx: int | None, what: str) -> None:
    """``ValueError`` if ``what`` needs ``total`` tokens but the model's ``n_ctx`` (given, or
    :func:`infer_n_ctx`) is smaller."""
    n_ctx = infer_n_ctx(model) if n_ctx is None else n_ctx
    if n_ctx is not None and total > n_ctx:
        raise ValueError(
            f"{what} needs {total} tokens but the model's n_ctx is {n_ctx}; use shorter prompts, "
            "fewer new states, or a model with a larger n_ctx"
        )


@torch.no_grad()
def append_digit_prefixes(
    prompts: Int[Tensor, "batch pos"], base: int, j: int
) -> Int[Tensor, "batch_times_prefixes pos_plus_j"]:
    """Every prompt followed by every ``j``-digit prefix: ``[batch * base**j, pos + j]``.

    Row ``i * base**j + p`` is prompt ``i`` followed by ``p`` written with ``j`` digits in base
    ``base`` (prefixes in lexicographic order), the order :func:`next_unit_distribution` uses.
    """
    b, length = prompts.shape
    n_pre = base**j
    place = base ** torch.arange(j - 1, -1, -1, device=prompts.device)
    prefixes = (torch.arange(n_pre, device=prompts.device).unsqueeze(-1) // place) % base
    return torch.cat(
        [prompts.unsqueeze(1).expand(b, n_pre, length), prefixes.expand(b, n_pre, j)], dim=-1
    ).reshape(b * n_pre, length + j)


def next_unit_distribution(
    model: Model,
    prompts: Int[Tensor, "batch prompt_pos"],
    base: int,
    n_digits: int,
    n_units: int,
    *,
    n_ctx: int | None = None,
    what: str = "next_unit_distribution",
) -> Float[Tensor, "batch n_units"]:
    """The model's exact distribution over the next unit (state) after each prompt.

    ``P(s) = prod_j P(digit_j | prompt, digit_<j)`` with each digit distribution restricted to
    the digit tokens, enumerated in ``n_digits`` batched forwards (the ``j``-th over
    ``batch * base**j`` sequences), then renormalised over the valid units ``[0, n_units)``.

    Args:
        model: Callable returning logits ``[batch, pos, d_vocab]``.
        prompts: BOS followed by whole units: ``[batch, 1 + k * n_digits]``.
        base, n_digits, n_units: The digit vocabulary: digits ``0 .. base-1``, ``n_digits`` per
            unit, valid units ``0 .. n_units-1``.
        n_ctx: Context length to check against; default read from the model.
        what: The caller's name, for the context-length error.

    Returns:
        ``[batch, n_units]``, rows summing to 1 (float32, on the model's device).
    """
    prompts = torch.as_tensor(prompts, dtype=torch.long)
    b, length = prompts.shape
    if (length - 1) % n_digits != 0:
        raise ValueError(
            f"prompts must be BOS followed by whole states (length 1 + k*{n_digits}), "
            f"got length {length}"
        )
    check_context(model, length + n_digits - 1, n_ctx, what)
    device = model_device(model)
    if device is not None:
        prompts = prompts.to(device)
    logp = torch.zeros(b, 1, device=prompts.device)  # log P(prefix) for the base**j prefixes
    for j in range(n_digits):
        n_pre = base**j
        logits = model_logits(model, append_digit_prefixes(prompts, base, j))[:, -1, :base].float()
        lp = torch.log_softmax(logits, dim=-1).view(b, n_pre, base)
        # a prefix whose every digit logit is -inf (only possible after a zero-probability
        # prefix) gives NaN: it has probability 0
        lp = lp.nan_to_num(nan=-math.inf)
        logp = (logp.unsqueeze(-1) + lp).reshape(b, n_pre * base)
    return torch.softmax(logp[:, :n_units], dim=-1)
