# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Interventions: force a state's codes, steer generation
#
# **Time on a CPU:** about 1 minute at full size when tutorial 2 has run before (it caches the
# finetuned model); otherwise add tutorial 2's training, about 9 minutes (base model and
# finetuning measured 536 s in the TokFSM demo). Under 30 seconds with
# `CODEBOOK_LENS_SMALL=1`, the size CI runs, where the model has not learnt the language and the
# numbers only show that the code runs.
#
# Tutorial 2 showed that codes *correlate* with the hidden state of a TokFSM walk. Correlation is
# not use: does the model actually read the state from those codes? If it does, then writing
# the codes of state `s` into a prompt that ends in another state should make the model continue
# as if it were in `s`, predicting `s`'s successors instead of the real state's.
#
# We will
#
# 1. force one state's codes into one prompt and look at the next-state distribution;
# 2. measure intervention success over every state and every group of sites;
# 3. steer sampled generations with the forced codes, and with a single code.

# %%
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from matplotlib.figure import Figure

from codebook_lens import codes_hook_name, viz
from codebook_lens.analysis import set_codes, steer, steering_hooks
from codebook_lens.fsm import (
    FSM,
    eval_set,
    jsd,
    next_state_distribution,
    transition_accuracy,
)
from codebook_lens.fsm.demo import default_cache_dir
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
    cached_codebook_model,
    interventions,
    site_sets,
    state_recovery,
)

SMALL = os.environ.get("CODEBOOK_LENS_SMALL") == "1"
OUT = Path(os.environ.get("CODEBOOK_LENS_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="cbl_tut03_"))
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.perf_counter()
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")  # TL 3.9 notice


cfg = ExperimentConfig.small() if SMALL else ExperimentConfig()
fsm = FSM(cfg.n_states, cfg.n_edges, seed=cfg.fsm_seed)
cm, base = cached_codebook_model(fsm, cfg, default_cache_dir(), progress=not SMALL)
print("size:", "small (CI)" if SMALL else "full", "| sites", cm.sites)

# %% [markdown]
# ## The codes of each state
#
# `state_recovery` (tutorial 2) runs the model over held-out walks and keeps every code in a
# `CodeStore`, with a state label at each state's last digit. The codes a state produces are
# then simply the codes at a position where the walk is in that state: one code per head at
# each attention site and one at each MLP site.

# %%
rec = state_recovery(cm, base, fsm, cfg)
store, labels = rec.store, rec.labels


def codes_of_state(s: int) -> dict[str, torch.Tensor]:
    """Per site, the codes at the first position labelled ``s``: ``[*head, k]``."""
    seq, pos = (labels == s).nonzero()[0].tolist()
    return {site: store.get(site)[seq, pos] for site in cm.sites}


def first_digits(states: torch.Tensor) -> torch.Tensor:
    """``[len(states), base]``: the true distribution of the next state's first digit."""
    fd = fsm.successors[states] // fsm.base ** (fsm.n_digits - 1)  # [n, n_edges]
    ones = torch.ones(fd.shape)
    return torch.zeros(len(states), fsm.base).scatter_add_(1, fd, ones) / fsm.n_edges


def pick_targets(lasts: torch.Tensor, offset: int = 37) -> torch.Tensor:
    """A target state per prompt: not the last state, and with a first digit that only the
    target's successors start with, where there is one (so "the model follows the target" is
    visible)."""
    out = []
    for i, a in enumerate(lasts.tolist()):
        cands = [(a + offset + i + j) % fsm.n_states for j in range(fsm.n_states - 1)]
        cands = [t for t in cands if t != a]
        fd = first_digits(torch.tensor(cands))  # [n_cands, base]
        only_t = ((fd > 0) & (first_digits(torch.tensor([a])) == 0)).any(-1)
        out.append(cands[int(only_t.long().argmax())])  # the first with such a digit, or cands[0]
    return torch.tensor(out)


prompt = eval_set(fsm, 1, cfg.intervention_prompt_states, seed=11)
last = int(fsm.tokens_to_states(prompt[0, 1:])[-1])
target = int(pick_targets(torch.tensor([last]))[0])
forced = codes_of_state(target)
for site, c in forced.items():
    print(f"state {target} at {site}: codes {c.flatten().tolist()}")

# %% [markdown]
# ## Force one state's codes into one prompt
#
# The prompt ends in state `last`. At its last position, at every site, we replace the codes
# with those of `target` using `set_codes`, an ordinary hook on `f"{site}.hook_codes"`.
#
# The next state is two tokens. The forced position predicts its **first digit**, so that is
# the direct test: without the intervention the model should spread its first-digit probability
# like `last`'s successors do; with it, like `target`'s. We also compute the exact next-*state*
# distribution (`next_state_distribution` multiplies the two digit probabilities).

# %%
hooks = [(codes_hook_name(s), set_codes(c[None], positions=-1)) for s, c in forced.items()]


def forced_model(tokens: torch.Tensor) -> torch.Tensor:
    return cm.run_with_hooks(tokens, fwd_hooks=hooks)


forced_model.cfg = cm.cfg  # next_state_distribution reads n_ctx from it
with torch.no_grad():
    d_clean = cm(prompt)[0, -1, : fsm.base].softmax(-1)
    d_forced = forced_model(prompt)[0, -1, : fsm.base].softmax(-1)
    p_clean = next_state_distribution(cm, fsm, prompt)[0]
    p_forced = next_state_distribution(forced_model, fsm, prompt)[0]
true_last, true_target = first_digits(torch.tensor([last, target]))
succ_last, succ_target = fsm.successors[last], fsm.successors[target]
print(f"prompt ends in state {last}; forcing the codes of state {target}")
print(
    f"first digit, JSD to {last}'s true distribution: clean {jsd(d_clean, true_last):.3f}, "
    f"forced {jsd(d_forced, true_last):.3f}; to {target}'s: clean "
    f"{jsd(d_clean, true_target):.3f}, forced {jsd(d_forced, true_target):.3f} (nats)"
)
print(
    f"next state, mass on successors of {last}: clean {p_clean[succ_last].sum():.2f}, "
    f"forced {p_forced[succ_last].sum():.2f}; of {target}: clean "
    f"{p_clean[succ_target].sum():.2f}, forced {p_forced[succ_target].sum():.2f}"
)
assert not torch.allclose(p_clean, p_forced), "forcing codes must change the prediction"


def one_prompt_figure() -> Figure:
    fig = viz.new_figure(11, 3.2)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 3])
    x = torch.arange(fsm.base)
    ax1.bar(x - 0.3, true_last, width=0.2, color="#d9d9d9", label=f"true after {last}")
    ax1.bar(x - 0.1, d_clean, width=0.2, color="#9e9e9e", label="model, clean")
    ax1.bar(x + 0.1, true_target, width=0.2, color="#aec7e8", label=f"true after {target}")
    ax1.bar(x + 0.3, d_forced, width=0.2, color="#1f77b4", label="model, forced")
    ax1.set_xticks(range(fsm.base))
    ax1.set_xlabel("first digit of the next state")
    ax1.set_ylabel("probability")
    ax1.legend(fontsize=7)
    x = torch.arange(fsm.n_states)
    ax2.bar(x - 0.2, p_clean, width=0.4, color="#9e9e9e", label="clean")
    ax2.bar(x + 0.2, p_forced, width=0.4, color="#1f77b4", label=f"codes of {target} forced")
    ax2.scatter(succ_last, [-0.02] * len(succ_last), marker="^", color="#9e9e9e",
                label=f"successors of {last}")  # fmt: skip
    ax2.scatter(succ_target, [-0.04] * len(succ_target), marker="^", color="#1f77b4",
                label=f"successors of {target}")  # fmt: skip
    ax2.set_xlabel("next state")
    ax2.legend(fontsize=7, ncols=2)
    return fig


viz.show(one_prompt_figure(), "one_prompt", OUT)

# %% [markdown]
# At full size the first digit follows the target almost exactly, but the full next state does
# so only in part: most of `last`'s mass is gone, yet much of it lands on states that succeed
# neither. The reason is the circuit, not the codes. The **second** digit is predicted one
# position later, at the first digit's own position, and there layer-0 attention reads the raw
# token embeddings of the prompt, which still spell `last`. Codes at the last position cannot
# change what the embeddings say. (The library's `interventions`, below, therefore also forces
# the codes at the first digit's position.)
#
# ## Every state, every group of sites
#
# Now over many prompts, and per group of sites: each layer's attention heads, each layer's
# MLP, or all sites. An intervention **succeeds** when the model's first-digit distribution is
# closer (in Jensen–Shannon divergence) to the target's true one than to the real last state's.
# Without intervention the rate should be near 0. Which group carries the state tells us where
# the model keeps it.

# %%
n_prompts = 16 if SMALL else 200
prompts = eval_set(fsm, n_prompts, cfg.intervention_prompt_states, seed=12)
p_len = prompts.shape[1]
lasts = fsm.tokens_to_states(prompts[:, 1:])[:, -1]
targets = pick_targets(lasts)
per_state = {s: codes_of_state(s) for s in targets.unique().tolist()}
values = {site: torch.stack([per_state[int(t)][site] for t in targets]) for site in cm.sites}
true_l, true_t = first_digits(lasts), first_digits(targets)


@torch.no_grad()
def first_digit_success(sites: list[str]) -> tuple[float, float]:
    hooks_ = [(codes_hook_name(s), set_codes(values[s], positions=-1)) for s in sites]
    d = cm.run_with_hooks(prompts, fwd_hooks=hooks_)[:, -1, : fsm.base].softmax(-1)
    to_t = jsd(d, true_t)
    return float((to_t < jsd(d, true_l)).float().mean()), float(to_t.mean())


baseline_rate, baseline_jsd = first_digit_success([])
rates = {}
print(f"no intervention: success {baseline_rate:.2f}, JSD to target {baseline_jsd:.3f}")
for name, sites in site_sets(cm).items():
    rates[name], j = first_digit_success(sites)
    print(f"  {name:8s} success {rates[name]:.2f}  JSD to target {j:.3f}")
viz.show(viz.intervention_success_bars(rates, baseline=baseline_rate), "success", OUT)
assert set(rates) == set(site_sets(cm))

# %% [markdown]
# The library's `interventions` runs the paper-style test on the whole next state: it succeeds
# when 8 of the model's 10 most likely next states are successors of the target. Since the
# second digit is predicted at the first digit's position, it forces the codes at both *state
# positions*: the prompt's last position, and the generated first digit, where it writes the
# codes that a *donor* walk ending in the target produces after the same first digit. It also
# reports the last-position-only variant (all sites), which inherits the limit above. In the
# full-size demo run: all sites 0.996, layer-0 heads alone 0.998, layer-1 heads 0.000, the MLPs
# 0.076 and 0.018; last position only 0.000, and 0.000 without intervention.

# %%
itv = interventions(cm, fsm, cfg)
print(f"{itv['n_interventions']} interventions (whole next state)")
print(f"  no intervention success {itv['baseline_success_rate']:.2f}")
for name, r in itv["per_site_set"].items():
    print(f"  {name:8s} success {r['success_rate']:.2f}  JSD {r['jsd']:.3f}")
lp = itv["per_site_set"]["all"]["last_position_only"]
print(f"  all sites, last position only: success {lp['success_rate']:.2f}  JSD {lp['jsd']:.3f}")

# %% [markdown]
# ## Steering generation
#
# Forcing codes works during sampling too. `steer` samples continuations twice with the same
# seed, without and with the hooks, and measures how often a feature appears. We force each
# target's codes at the prompt's last position (a fixed position, so as the sequence grows the
# edit stays on that token). The feature: the first generated token is a digit that only the
# target's successors start with, never the real last state's. We also report how often the
# whole first generated state is a successor of the target.

# %%
steer_hooks = [(codes_hook_name(s), set_codes(v, positions=p_len - 1)) for s, v in values.items()]
n_samples, new_states = 4, 4 if SMALL else 8
only_target = (true_t > 0) & (true_l == 0)  # [n_prompts, base]: digits only the target allows


def target_only_digit(allowed: torch.Tensor):
    """The feature for `steer`: is each row's first generated token one of its allowed digits
    (``allowed``: Bool ``[rows, base]``)?"""

    def feature(gen: torch.Tensor) -> torch.Tensor:
        first = gen[:, 0]
        return (first < fsm.base) & allowed.gather(1, first.clamp(max=fsm.base - 1)[:, None])[:, 0]

    return feature


res = steer(
    cm,
    prompts,
    steer_hooks,
    feature=target_only_digit(only_target.repeat_interleave(n_samples, 0)),
    max_new_tokens=new_states * fsm.n_digits,
    n_samples=n_samples,
    seed=0,
)
print(
    f"first token is a digit only the target allows: baseline {res.baseline_rate:.2f}, "
    f"steered {res.steered_rate:.2f}"
)
gen = res.steered_tokens[:, p_len:]
ok = (gen < fsm.base).all(-1)
first_gen = fsm.tokens_to_states(gen[ok][:, : fsm.n_digits])[:, 0]
rows_t = targets.repeat_interleave(n_samples)[ok]
hit = fsm.is_edge(rows_t, first_gen).float().mean()
print(
    f"whole first state is a successor of the target in {hit:.2f} of steered samples; "
    f"transition accuracy after it "
    f"{transition_accuracy(fsm, fsm.tokens_to_states(gen[ok]), is_tokens=False):.2f}"
)
for i in range(2):
    row = i * n_samples
    ctx = fsm.tokens_to_states(prompts[i, 1:]).tolist()
    g = res.steered_tokens[row, p_len:]
    cont = fsm.tokens_to_states(g).tolist() if bool((g < fsm.base).all()) else g.tolist()
    print(f"  prompt {ctx} + codes of {int(targets[i])} -> {cont}")
assert res.steered_tokens.shape == (n_prompts * n_samples, p_len + new_states * fsm.n_digits)

# %% [markdown]
# ## Steering with a single code
#
# All sites together carry the state. How much does one code carry? `steering_hooks(cm, site,
# code, positions=..., heads=..., slot=0)` forces just one code: here the best code of one
# state from the recovery (by F1), in place of the code its head chose at the prompt's last
# position. We compare it with forcing every site's codes, on the same prompt.

# %%
best = rec.best_code
s1 = int(targets[0])
site1, head1, code1 = best["site"][s1], best["head"][s1], best["code"][s1]
heads1 = [head1] if store.get(site1).dim() == 4 else None  # per-head site or not
one_code = steering_hooks(cm, site1, code1, positions=p_len - 1, heads=heads1, slot=0)
all_codes = [
    (codes_hook_name(s), set_codes(c[None], positions=p_len - 1)) for s, c in per_state[s1].items()
]
n1 = 16 if SMALL else 100
single = {}
for name, hooks_ in {"one code": one_code, "all sites": all_codes}.items():
    r1 = steer(
        cm,
        prompts[:1],
        hooks_,
        feature=target_only_digit(only_target[:1].expand(n1, -1)),
        max_new_tokens=fsm.n_digits,
        n_samples=n1,
        seed=1,
    )
    single[name] = r1.steered_rate
print(
    f"prompt 0, target state {s1}; its best code: {code1} at {site1} head {head1} "
    f"(precision {best['precision'][s1]:.2f}, recall {best['recall'][s1]:.2f})"
)
print(f"  target-only first digit: no intervention {r1.baseline_rate:.2f}", end="")
print("".join(f", {k} {v:.2f}" for k, v in single.items()))

# %% [markdown]
# ## What the numbers should be
#
# Measured at full size: forcing all sites' codes moves the first digit to the target in
# essentially every prompt (success about 1.0, JSD to the target's distribution about 0.02 nats,
# against a baseline of 0); the layer-0 attention codes alone do as well, while the layer-1
# attention codes do nothing, so the state is carried forward by layer 0's heads. The whole
# next state follows only in part, as explained above. The checks below hold a full run to a
# loose version of that.

# %%
if not SMALL:
    assert rates["all"] >= 0.8 and baseline_rate <= 0.2, (rates, baseline_rate)
    assert res.steered_rate > res.baseline_rate + 0.3, (res.steered_rate, res.baseline_rate)
print(f"done in {time.perf_counter() - T0:.0f} s")
