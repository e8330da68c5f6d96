"""Slow, independent references of the TokFSM analysis (state recovery and interventions).

They share nothing with ``codebook_lens.fsm.experiment`` but the prompts and donor walks (drawn
with the same public samplers and seeds, then checked here): codes come from
``run_with_cache``, forcing is a plain codes hook per site, next-state probabilities are
enumerated one prompt at a time with Python loops over digit prefixes, and the counts are numpy
loops over sites, heads, codes and states.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from codebook_lens import CodebookModel, codes_hook_name
from codebook_lens.fsm import FSM
from codebook_lens.fsm.data import eval_set, sample_walks_ending_in, walks_to_tokens
from codebook_lens.fsm.experiment import ExperimentConfig

__all__ = [
    "reference_recovery",
    "reference_intervention_probs",
    "reference_rates",
    "assert_interventions_match",
]


def _state_of(fsm: FSM, digits: list[int]) -> int:
    return int("".join(str(d) for d in digits), fsm.base)


def _digits_of(fsm: FSM, state: int) -> tuple[int, ...]:
    return tuple(
        (state // fsm.base ** (fsm.n_digits - 1 - j)) % fsm.base for j in range(fsm.n_digits)
    )


# ---------------------------------------------------------------------------- recovery
def reference_recovery(cm: CodebookModel, fsm: FSM, cfg: ExperimentConfig) -> dict[str, Any]:
    """``states_recovered`` (some code with precision and recall >= 0.9), its count per site,
    ``states_present`` and the mean precision and recall of each present state's best code by F1
    (ties: the first site, head, code), and each state's ``best_precision`` and ``best_recall``,
    counted position by position."""
    tokens = eval_set(fsm, cfg.recovery_walks, cfg.recovery_states, seed=cfg.seed + 3)
    labels = np.full(tokens.shape, -1)
    for i in range(cfg.recovery_states):  # the state sits at its last digit
        last = 1 + (i + 1) * fsm.n_digits - 1
        for w in range(tokens.shape[0]):
            start = last - fsm.n_digits + 1
            labels[w, last] = _state_of(fsm, tokens[w, start : last + 1].tolist())
    with torch.no_grad():
        _, cache = cm.run_with_cache(tokens)
    n = fsm.n_states
    present = np.array([(labels == s).sum() for s in range(n)])
    recovered: dict[str, set[int]] = {}
    best = [(-1.0, 0.0, 0.0)] * n  # (f1, precision, recall) per state
    for site in cm.sites:
        codes = cache[codes_hook_name(site)].numpy()
        codes = codes if codes.ndim == 4 else codes[:, :, None]  # [walk, pos, head, k]
        recovered[site] = set()
        for h in range(codes.shape[2]):
            for c in range(cm.codebooks[site].cfg.n_codes):
                fires = (codes[:, :, h] == c).any(-1) & (labels >= 0)
                n_fires = fires.sum()
                for s in range(n):
                    joint = (fires & (labels == s)).sum()
                    p = joint / max(n_fires, 1)
                    r = joint / max(present[s], 1)
                    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
                    if joint > 0 and joint >= 0.9 * n_fires and joint >= 0.9 * present[s]:
                        recovered[site].add(s)
                    if f > best[s][0]:
                        best[s] = (f, p, r)
    here = [s for s in range(n) if present[s] > 0]
    return {
        "states_recovered": len(set().union(*recovered.values())),
        "states_recovered_per_site": {s: len(v) for s, v in recovered.items()},
        "states_present": len(here),
        "mean_best_code_precision": float(np.mean([best[s][1] for s in here])),
        "mean_best_code_recall": float(np.mean([best[s][2] for s in here])),
        "best_precision": [b[1] for b in best],
        "best_recall": [b[2] for b in best],
    }


# ---------------------------------------------------------------------------- interventions
def _forcing(forced: dict[str, torch.Tensor], pos: int) -> list[tuple[str, Any]]:
    """Hooks writing ``forced[site]`` (``[rows, width, ...]``) at positions ``pos:pos+width``."""

    def hook_for(codes_in: torch.Tensor):
        def hook(codes: torch.Tensor, hook: Any) -> torch.Tensor:
            out = codes.clone()
            out[:, pos : pos + codes_in.shape[1]] = codes_in
            return out

        return hook

    return [(codes_hook_name(s), hook_for(c)) for s, c in forced.items()]


def _next_state_probs(
    cm: CodebookModel, fsm: FSM, prompt: list[int], forced: list[dict] | None, pos: int
) -> np.ndarray:
    """P(next state) after ``prompt``: the product of the digit probabilities (softmax over
    the digit tokens) over every prefix, renormalised over the valid states. ``forced[j]``
    holds the codes forced in the runs with ``j`` digits appended (one row per prefix, in
    ``itertools.product`` order)."""
    logp: dict[tuple[int, ...], float] = {(): 0.0}
    for j in range(fsm.n_digits):
        prefixes = list(itertools.product(range(fsm.base), repeat=j))
        runs = torch.tensor([prompt + list(p) for p in prefixes])
        hooks = _forcing(forced[j], pos) if forced else []
        with torch.no_grad():
            logits = cm.run_with_hooks(runs, fwd_hooks=hooks)[:, -1, : fsm.base].double()
        lp = logits.log_softmax(-1).numpy()
        for r, p in enumerate(prefixes):
            for d in range(fsm.base):
                logp[p + (d,)] = logp[p] + lp[r, d]
    scores = np.array([logp[_digits_of(fsm, s)] for s in range(fsm.n_states)])
    e = np.exp(scores - scores.max())
    return e / e.sum()


def _donor_runs(cm: CodebookModel, fsm: FSM, donor: list[int], pos: int) -> list[dict]:
    """Per ``j``: the donor's own codes at ``pos : pos + 1 + j`` in its runs extended by every
    ``j``-digit prefix."""
    out = []
    for j in range(fsm.n_digits):
        runs = torch.tensor([donor + list(p) for p in itertools.product(range(fsm.base), repeat=j)])
        with torch.no_grad():
            _, cache = cm.run_with_cache(runs)
        out.append({s: cache[codes_hook_name(s)][:, pos : pos + 1 + j] for s in cm.sites})
    return out


def _score(p: np.ndarray, target: int, fsm: FSM, top: int, need: int) -> tuple[bool, float]:
    """(at least ``need`` of the ``top`` likeliest states are successors of ``target``, the JSD
    in nats between ``p`` and the uniform distribution over those successors)."""
    succ = set(fsm.successors[target].tolist())
    hit = sum(int(s) in succ for s in np.argsort(-p, kind="stable")[:top]) >= need
    q = np.array([1.0 / len(succ) if s in succ else 0.0 for s in range(fsm.n_states)])
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        return sum(a[i] * math.log(a[i] / m[i]) for i in range(len(a)) if a[i] > 0)

    return hit, max(0.0, (kl(p) + kl(q)) / 2)


def _site_sets(cm: CodebookModel) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    for site in cm.sites:
        layer = site.split(".")[1]
        sets[f"L{layer} {'attn' if '.attn.' in site else 'mlp'}"] = [site]
    return {**sets, "all": list(cm.sites)}


def reference_intervention_probs(
    cm: CodebookModel, fsm: FSM, cfg: ExperimentConfig
) -> tuple[list[int], dict[str, list[np.ndarray]]]:
    """The target of each intervention prompt and, per variant, the next-state distribution
    after each prompt: ``baseline`` (no forcing), each site set with the donor's codes forced
    at the state positions, and ``last_position_only`` (all sites, the last prompt position)."""
    n_per = cfg.intervention_prompts
    prompts = eval_set(fsm, fsm.n_states * n_per, cfg.intervention_prompt_states, cfg.seed + 4)
    targets = []
    for i, row in enumerate(prompts.tolist()):
        t, last = i // n_per, _state_of(fsm, row[-fsm.n_digits :])
        targets.append((t + 1) % fsm.n_states if t == last else t)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    walks = sample_walks_ending_in(fsm, torch.tensor(targets), cfg.intervention_prompt_states, gen)
    donors = walks_to_tokens(fsm, walks).tolist()
    pos = prompts.shape[1] - 1
    sets = _site_sets(cm)
    probs: dict[str, list[np.ndarray]] = {"baseline": [], "last_position_only": []}
    probs |= {name: [] for name in sets}
    for prompt, donor, t in zip(prompts.tolist(), donors, targets):
        assert _state_of(fsm, donor[-fsm.n_digits :]) == t  # the donor ends in the target
        runs = _donor_runs(cm, fsm, donor, pos)
        probs["baseline"].append(_next_state_probs(cm, fsm, prompt, None, pos))
        for name, sites in sets.items():
            forced = [{s: run[s] for s in sites} for run in runs]
            probs[name].append(_next_state_probs(cm, fsm, prompt, forced, pos))
        first = runs[0]
        last_only = [
            {s: c.expand(fsm.base**j, *c.shape[1:]) for s, c in first.items()}
            for j in range(fsm.n_digits)
        ]
        probs["last_position_only"].append(_next_state_probs(cm, fsm, prompt, last_only, pos))
    return targets, probs


def reference_rates(
    fsm: FSM,
    targets: list[int],
    probs: dict[str, list[np.ndarray]],
    top: int | None = None,
    need: int | None = None,
) -> dict[str, dict[str, float]]:
    """Per variant of :func:`reference_intervention_probs`: the success rate (default ``top``:
    ``n_edges``, ``need``: 80% of it, rounded up) and the mean JSD."""
    top = fsm.n_edges if top is None else top
    need = math.ceil(0.8 * fsm.n_edges) if need is None else need
    out = {}
    for name, ps in probs.items():
        scored = [_score(p, t, fsm, top, need) for p, t in zip(ps, targets)]
        out[name] = {
            "success_rate": float(np.mean([hit for hit, _ in scored])),
            "jsd": float(np.mean([d for _, d in scored])),
        }
    return out


def assert_interventions_match(itv: dict[str, Any], ref: dict[str, dict[str, float]]) -> None:
    """``interventions(...)``'s report equals :func:`reference_rates`: success rates to float32
    rounding of a mean (far below one prompt in a few hundred), JSDs to float32 rounding."""
    per = itv["per_site_set"]
    assert set(per) | {"baseline", "last_position_only"} == set(ref)
    got = {name: per[name] for name in per}
    got["last_position_only"] = per["all"]["last_position_only"]
    got["baseline"] = {"success_rate": itv["baseline_success_rate"], "jsd": itv["baseline_jsd"]}
    for name, want in ref.items():
        assert abs(got[name]["success_rate"] - want["success_rate"]) < 1e-6, (name, got, want)
        assert abs(got[name]["jsd"] - want["jsd"]) < 1e-5, (name, got[name], want)
    assert itv["success_rate"] == per["all"]["success_rate"]
    assert (
        itv["last_position_only_success_rate"] == per["all"]["last_position_only"]["success_rate"]
    )
