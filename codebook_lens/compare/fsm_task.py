"""Codes against SAEs on TokFSM, where every position's hidden state is known: states recovered,
best-feature precision and intervention success for one dictionary at one site."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer
from torch import Tensor

from codebook_lens.analysis import (
    AttributionResult,
    best_codes_per_label,
    label_attribution,
    recovered_labels,
)
from codebook_lens.compare.splice import feature_store
from codebook_lens.fsm.data import (
    eval_set,
    sample_walks_ending_in,
    state_labels,
    walks_to_tokens,
)
from codebook_lens.fsm.experiment import ExperimentConfig, intervention_success
from codebook_lens.fsm.machine import FSM
from codebook_lens.fsm.metrics import append_digit_prefixes, next_state_distribution

__all__ = [
    "StateFeatures",
    "force_state_success",
    "recovery_tokens",
    "state_features",
]


@dataclass
class StateFeatures:
    """A dictionary's features as detectors of the FSM state (at each state's last digit)."""

    states_recovered: int
    """States with a feature of precision and recall >= 0.9."""
    states_present: int
    """States that occur in the recovery walks."""
    mean_best_precision: float
    """Mean over present states of the precision of the state's best feature (by F1)."""
    mean_best_recall: float
    """Mean over present states of that feature's recall."""
    best_precision: list[float]
    """Per state: the best feature's precision (NaN where the state is absent)."""
    best_recall: list[float]
    """Per state: the best feature's recall."""
    result: AttributionResult
    """Precision and recall of every feature for every state."""

    def metrics(self) -> dict[str, Any]:
        """The JSON part (everything but ``result``)."""
        return {k: v for k, v in self.__dict__.items() if k != "result"}


def recovery_tokens(fsm: FSM, cfg: ExperimentConfig) -> Int[Tensor, "walk pos"]:
    """The demo's state-recovery walks (the same seed as :func:`state_recovery`)."""
    return eval_set(fsm, cfg.recovery_walks, cfg.recovery_states, seed=cfg.seed + 3)


@torch.no_grad()
def state_features(
    model: HookedSAETransformer, sae: SAE, fsm: FSM, tokens: Int[Tensor, "walk pos"]
) -> StateFeatures:
    """Label attribution of ``sae``'s active features against the FSM states of ``tokens``."""
    labels = state_labels(fsm, tokens)
    site = sae.cfg.metadata.hook_name
    res = label_attribution(feature_store(model, sae, tokens), labels, site, n_labels=fsm.n_states)
    best = best_codes_per_label(res, by="f1")
    present = res.label_counts > 0
    nan = torch.full_like(best.precision, math.nan)
    return StateFeatures(
        states_recovered=int(recovered_labels(res).sum()),
        states_present=int(present.sum()),
        mean_best_precision=float(best.precision[present].mean()),
        mean_best_recall=float(best.recall[present].mean()),
        best_precision=torch.where(present, best.precision, nan).tolist(),
        best_recall=torch.where(present, best.recall, nan).tolist(),
        result=res,
    )


@torch.no_grad()
def _acts(model: HookedSAETransformer, sae: SAE, tokens: Tensor, start: int) -> Tensor:
    """``sae``'s feature activations on ``tokens`` at positions ``start:``."""
    site, parts = sae.cfg.metadata.hook_name, []
    for chunk in tokens.split(512):
        _, cache = model.run_with_cache(chunk, names_filter=site)
        parts.append(sae.encode(cache[site].to(sae.dtype))[:, start:])
    return torch.cat(parts)


def _prompts(fsm: FSM, cfg: ExperimentConfig) -> tuple[Tensor, Tensor]:
    """The demo's intervention prompts and their target states (never the prompt's own)."""
    n_per = cfg.intervention_prompts
    prompts = eval_set(fsm, fsm.n_states * n_per, cfg.intervention_prompt_states, cfg.seed + 4)
    targets = torch.arange(fsm.n_states).repeat_interleave(n_per)
    last = fsm.tokens_to_states(prompts[:, 1:])[:, -1]
    return prompts, torch.where(targets == last, (targets + 1) % fsm.n_states, targets)


@torch.no_grad()
def force_state_success(
    model: HookedSAETransformer,
    sae: SAE,
    fsm: FSM,
    cfg: ExperimentConfig,
    means: Float[Tensor, " d_sae"],
) -> float:
    """Share of the demo's intervention prompts whose next state follows a forced target state.

    The prompts, targets, donors and success criterion are those of
    :func:`~codebook_lens.fsm.experiment.interventions`: at the state positions (the prompt's
    last position and the next state's first digit) the dictionary's features are replaced by
    the features active there in a donor walk ending in the target state, each at its mean
    active value (a codebook's codes are always 1, or 1/k: this is the demo's code forcing).
    """
    prompts, targets = _prompts(fsm, cfg)
    pos = prompts.shape[1] - 1
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    steps = cfg.intervention_prompt_states
    donors = walks_to_tokens(fsm, sample_walks_ending_in(fsm, targets, steps, gen))
    forced = []  # per digit j: [prompts * base**j, 1 + j, d_sae], the rows the j-th pass runs
    for j in range(fsm.n_digits):
        runs = append_digit_prefixes(donors, fsm.base, j)
        forced.append((_acts(model, sae, runs, pos) > 0) * means.to(sae.dtype))
    name = f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"

    def force(acts: Tensor, hook: Any) -> Tensor:
        rows = forced[min(acts.shape[1] - pos - 1, len(forced) - 1)]
        rows = rows.repeat_interleave(acts.shape[0] // rows.shape[0], 0).to(acts)
        acts[:, pos : pos + rows.shape[1]] = rows
        return acts

    def run(tokens: Tensor) -> Tensor:
        return model.run_with_hooks(tokens, fwd_hooks=[(name, force)])

    run.cfg = model.cfg  # type: ignore[attr-defined]
    model.add_sae(sae)
    try:
        p = next_state_distribution(run, fsm, prompts)
    finally:
        model.reset_saes()
    need = math.ceil(0.8 * fsm.n_edges)
    return float(intervention_success(p, targets, fsm, fsm.n_edges, need).float().mean())
