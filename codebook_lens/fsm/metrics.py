"""TokFSM metrics: transition accuracy of sampled continuations and next-state distributions.

Models are any callable ``model(tokens) -> logits [batch, pos, d_vocab]``: a
``HookedTransformer``, a module that wraps one, or a plain function. Sampling never uses a KV
cache (``HookedTransformer.generate`` with the cache breaks past ``n_ctx / 2`` on
transformer-lens 3.9); each new token costs one full forward over the sequence so far.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from codebook_lens.digit_units import (
    Model,
    append_digit_prefixes,
    check_context,
    infer_n_ctx,
    model_device,
    model_logits,
    next_unit_distribution,
)
from codebook_lens.fsm.data import eval_set
from codebook_lens.fsm.machine import FSM

__all__ = [
    "append_digit_prefixes",
    "evaluate_next_state_jsd",
    "evaluate_transition_accuracy",
    "infer_n_ctx",
    "jsd",
    "next_state_distribution",
    "sample_continuations",
    "transition_accuracy",
    "true_next_state_distribution",
]


# ---------------------------------------------------------------------------- helpers
def _as_states(
    fsm: FSM, seq: Int[Tensor, "*batch pos"], is_tokens: bool | None
) -> Int[Tensor, "*batch step"]:
    seq = torch.as_tensor(seq, dtype=torch.long)
    if is_tokens is None:
        is_tokens = bool(
            seq.shape[-1] > 0 and (seq[..., 0] == fsm.bos).all() and seq.max() <= fsm.bos
        )
    if not is_tokens:
        return seq
    if seq.shape[-1] < 1 or not bool((seq[..., 0] == fsm.bos).all()):
        raise ValueError(f"token sequences must start with BOS ({fsm.bos})")
    body = seq[..., 1:]
    n_whole = body.shape[-1] // fsm.n_digits
    return fsm.tokens_to_states(body[..., : n_whole * fsm.n_digits])


# ---------------------------------------------------------------------------- transition accuracy
def transition_accuracy(
    fsm: FSM,
    states_or_tokens: Int[Tensor, "*batch pos"],
    is_tokens: bool | None = None,
) -> float:
    """Fraction of consecutive state pairs ``(s_t, s_{t+1})`` that are edges of ``fsm``.

    Args:
        fsm: The machine.
        states_or_tokens: Either state ids ``[..., n_steps]`` or token sequences
            ``[..., pos]`` that start with BOS (a trailing incomplete state is ignored).
        is_tokens: Whether the input is tokens. ``None`` infers it: tokens iff every sequence
            starts with BOS and no value exceeds BOS (pass it explicitly for tiny inputs, where
            a walk of small state ids could look like tokens).

    Returns:
        The accuracy in ``[0, 1]``; ``nan`` if there is no pair.
    """
    states = _as_states(fsm, states_or_tokens, is_tokens)
    if states.shape[-1] < 2:
        return math.nan
    ok = fsm.is_edge(states[..., :-1], states[..., 1:])
    return float(ok.float().mean())


# ---------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_continuations(
    model: Model,
    prompts: Int[Tensor, "batch prompt_pos"],
    n_new_states: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    *,
    base: int | None = None,
    n_digits: int = 2,
    n_ctx: int | None = None,
) -> Int[Tensor, "batch pos"]:
    """Sample ``n_new_states`` states after each prompt, one token at a time, without KV cache.

    Each step calls ``model(tokens)`` on the whole sequence so far (all prompts at once) and
    samples the next token from the last position's logits restricted to the digit tokens
    ``0 .. base-1`` (BOS and any other token are masked out).

    Args:
        model: Callable returning logits ``[batch, pos, d_vocab]``.
        prompts: Token prompts ``[batch, prompt_pos]`` (usually BOS followed by whole states).
        n_new_states: States to sample; ``n_new_states * n_digits`` tokens are generated.
        generator: Random generator for the sampling (on any device; probabilities are moved
            to its device). ``None`` uses torch's global generator.
        temperature: Softmax temperature; ``0`` samples greedily (argmax).
        base: Number of digit tokens; default ``d_vocab - 1`` of the logits.
        n_digits: Digit tokens per state (2 for the standard 100-state TokFSM).
        n_ctx: Context length to check against; default read from the model (see
            :func:`infer_n_ctx`).

    Returns:
        ``LongTensor [batch, prompt_pos + n_new_states * n_digits]``: prompts plus continuation.

    Raises:
        ValueError: if the total length exceeds the model's ``n_ctx``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    n_new = n_new_states * n_digits
    check_context(model, prompts.shape[-1] + n_new, n_ctx, "sample_continuations")
    device = model_device(model)
    tokens = prompts.to(device) if device is not None else prompts
    for _ in range(n_new):
        logits = model_logits(model, tokens)[:, -1, :].float()
        nb = logits.shape[-1] - 1 if base is None else base
        logits = logits[:, :nb]
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            if generator is not None and generator.device != probs.device:
                nxt = torch.multinomial(probs.to(generator.device), 1, generator=generator)
                nxt = nxt.to(tokens.device)
            else:
                nxt = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, nxt.to(tokens.dtype)], dim=-1)
    return tokens


# ---------------------------------------------------------------------------- distributions
def next_state_distribution(
    model: Model,
    fsm: FSM,
    prompts: Int[Tensor, "batch prompt_pos"],
    *,
    n_ctx: int | None = None,
) -> Float[Tensor, "batch n_states"]:
    """The model's exact distribution over the next state after each prompt:
    :func:`~codebook_lens.digit_units.next_unit_distribution` with the machine's ``base``,
    ``n_digits`` and ``n_states``.

    Args:
        model: Callable returning logits ``[batch, pos, d_vocab]``.
        fsm: The machine (gives ``base``, ``n_digits``, ``n_states``).
        prompts: BOS followed by whole states: ``[batch, 1 + k * n_digits]``.
        n_ctx: Context length to check against; default read from the model.

    Returns:
        ``[batch, n_states]``, rows summing to 1 (float32, on the model's device).
    """
    return next_unit_distribution(
        model, prompts, fsm.base, fsm.n_digits, fsm.n_states, n_ctx=n_ctx,
        what="next_state_distribution",
    )  # fmt: skip


def true_next_state_distribution(
    fsm: FSM, last_states: Int[Tensor, "*batch"]
) -> Float[Tensor, "*batch n_states"]:
    """The FSM's next-state distribution from each of ``last_states`` (uniform on successors)."""
    last_states = torch.as_tensor(last_states, dtype=torch.long)
    return fsm.transition_matrix().to(last_states.device)[last_states]


def jsd(
    p: Float[Tensor, "*batch n"], q: Float[Tensor, "*batch n"], dim: int = -1
) -> Float[Tensor, "*batch"]:
    """Jensen–Shannon divergence in nats (natural log), so ``0 <= jsd <= ln 2``.

    ``JSD(p, q) = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2`` and ``0 log 0 = 0``;
    reduces over ``dim``. Inputs are taken as given (normalise them first).
    """
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


# ---------------------------------------------------------------------------- convenience
def evaluate_transition_accuracy(
    model: Model,
    fsm: FSM,
    n_prompts: int = 256,
    prompt_states: int = 8,
    n_new_states: int = 24,
    seed: int = 0,
    temperature: float = 1.0,
) -> tuple[float, Int[Tensor, "batch pos"]]:
    """Sample continuations after held-out prompts and score their transitions.

    Prompts are ``n_prompts`` random walks of ``prompt_states`` states (:func:`eval_set` with
    ``seed``). The score covers every transition out of the last prompt state and between the
    generated states (``n_new_states`` pairs per prompt), not the prompts' own transitions.

    Returns:
        ``(accuracy, tokens)`` where ``tokens`` is ``[n_prompts, 1 + (prompt_states +
        n_new_states) * n_digits]``: prompts followed by the sampled continuations.
    """
    prompts = eval_set(fsm, n_prompts, prompt_states, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = sample_continuations(
        model,
        prompts,
        n_new_states,
        gen,
        temperature=temperature,
        base=fsm.base,
        n_digits=fsm.n_digits,
    )
    states = fsm.tokens_to_states(tokens[:, 1:].cpu())
    acc = transition_accuracy(fsm, states[:, prompt_states - 1 :], is_tokens=False)
    return acc, tokens


def evaluate_next_state_jsd(
    model: Model,
    fsm: FSM,
    n_prompts: int = 128,
    prompt_states: int = 8,
    seed: int = 0,
) -> float:
    """Mean JSD (nats) between the model's and the FSM's next-state distribution on held-out
    prompts (:func:`eval_set` walks of ``prompt_states`` states)."""
    prompts = eval_set(fsm, n_prompts, prompt_states, seed=seed)
    p_model = next_state_distribution(model, fsm, prompts).cpu()
    last = fsm.tokens_to_states(prompts[:, 1:])[:, -1]
    return float(jsd(p_model, true_next_state_distribution(fsm, last)).mean())
