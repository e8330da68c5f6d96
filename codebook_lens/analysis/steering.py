"""Steering: generate with codes forced (or any code hooks) and measure how often a feature
appears, against the same generation without them (the paper's topic steering)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from codebook_lens.analysis._common import HeadSpec, PositionSpec
from codebook_lens.analysis.patching import force_codes
from codebook_lens.model import CodebookModel, codes_hook_name

__all__ = ["SteeringResult", "steer", "steering_hooks"]

Feature = Sequence[int] | Tensor | Callable[[Tensor], Tensor]


@dataclass
class SteeringResult:
    """Generations with and without the steering hooks, and how often the feature appears."""

    baseline_tokens: Int[Tensor, "batch total"]
    """Prompt + generation without the hooks."""

    steered_tokens: Int[Tensor, "batch total"]
    """Prompt + generation with the hooks (same sampling seed)."""

    baseline_hits: Bool[Tensor, "batch ..."]
    """The feature on the baseline's generated tokens (per token or per sample)."""

    steered_hits: Bool[Tensor, "batch ..."]
    """The feature on the steered generated tokens."""

    baseline_rate: float
    """Mean of ``baseline_hits``."""

    steered_rate: float
    """Mean of ``steered_hits``."""

    prompt_len: int
    """Tokens of prompt at the start of each row."""


def steering_hooks(
    cm: CodebookModel,
    site: str,
    code: int | Sequence[int] | Tensor,
    positions: PositionSpec = None,
    heads: HeadSpec = None,
    slot: int | Literal["append", "only"] = "append",
) -> list[tuple[str, Callable[..., Tensor]]]:
    """``fwd_hooks`` that force ``code`` at ``site`` (see :func:`force_codes`); every position by
    default, which also covers new tokens during generation."""
    cb = cm.codebook(site)
    ids = torch.as_tensor(code).reshape(-1)
    if ids.numel() and (int(ids.max()) >= cb.cfg.n_codes or int(ids.min()) < 0):
        raise IndexError(f"code ids must lie in [0, {cb.cfg.n_codes}) at {site}")
    return [(codes_hook_name(site), force_codes(code, positions, heads, slot))]


def _hits(feature: Feature, gen: Tensor) -> Tensor:
    if callable(feature) and not isinstance(feature, Tensor):
        h = torch.as_tensor(feature(gen))
        if h.dtype != torch.bool or h.shape[0] != gen.shape[0]:
            raise ValueError(
                "a feature function must map generated tokens [batch, new] to a Bool tensor "
                f"[batch, ...]; got {h.dtype} {tuple(h.shape)}"
            )
        return h
    ids = torch.as_tensor(feature, dtype=torch.long).reshape(-1).to(gen.device)
    return torch.isin(gen, ids)


@torch.no_grad()
def steer(
    cm: CodebookModel,
    prompt: Int[Tensor, "batch pos"],
    fwd_hooks: Sequence[tuple[str, Callable[..., Any]]],
    feature: Feature,
    max_new_tokens: int = 20,
    n_samples: int = 1,
    seed: int = 0,
    do_sample: bool = True,
    use_past_kv_cache: bool = False,
    **generate_kwargs: Any,
) -> SteeringResult:
    """Generate from ``prompt`` with and without ``fwd_hooks`` and compare a feature's rate.

    Args:
        cm: A CodebookModel.
        prompt: Prompt tokens ``[batch, pos]``; each row is sampled ``n_samples`` times.
        fwd_hooks: Hooks active while steering, e.g. :func:`steering_hooks` output.
        feature: Token ids (a generated token counts when it is one of them), or a function of
            the generated tokens ``[batch, new]`` returning Bool ``[batch, new]`` or ``[batch]``.
        max_new_tokens: Tokens to generate.
        n_samples: Samples per prompt row.
        seed: Both runs sample with this seed (the global RNG is restored afterwards).
        do_sample: Sample (True) or decode greedily.
        use_past_kv_cache: Passed to ``generate``; off by default (TL 3.9's cache breaks past
            half of ``n_ctx``, and absolute positions in hooks need the whole sequence).
        **generate_kwargs: More ``generate`` arguments (``temperature``, ``top_k``, ...).
    """
    prompt = torch.as_tensor(prompt)
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be [batch, pos], got {tuple(prompt.shape)}")
    n_ctx = getattr(cm.cfg, "n_ctx", None)
    if n_ctx is not None and prompt.shape[1] + max_new_tokens > n_ctx:
        raise ValueError(
            f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds n_ctx="
            f"{n_ctx}; shorten one of them"
        )
    device = next(cm.parameters()).device
    prompt = prompt.repeat_interleave(n_samples, 0).to(device)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        use_past_kv_cache=use_past_kv_cache,
        stop_at_eos=False,
        verbose=False,
        **generate_kwargs,
    )

    def run(hooks: Sequence[tuple[str, Callable[..., Any]]]) -> Tensor:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            with cm.hooks(fwd_hooks=list(hooks)):
                return cm.generate(prompt, **kwargs)

    base = run([])
    steered = run(fwd_hooks)
    p = prompt.shape[1]
    bh, sh = _hits(feature, base[:, p:]), _hits(feature, steered[:, p:])
    return SteeringResult(
        baseline_tokens=base,
        steered_tokens=steered,
        baseline_hits=bh,
        steered_hits=sh,
        baseline_rate=float(bh.float().mean()),
        steered_rate=float(sh.float().mean()),
        prompt_len=p,
    )
