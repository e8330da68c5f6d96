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
# finetuned model); otherwise add tutorial 2's training, about 10 minutes (estimated from the
# TokFSM demo on this 2-core machine). Under 30 seconds with `CODEBOOK_LENS_SMALL=1`, the size CI
# runs, where the model has not learnt the language and the numbers only show that the code runs.
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
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from codebook_lens import CodebookModel, codes_hook_name, viz
from codebook_lens.analysis import set_codes, steer, steering_hooks
from codebook_lens.fsm import FSM, eval_set, next_state_distribution, transition_accuracy
from codebook_lens.fsm.demo import default_cache_dir
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
    attach_codebooks,
    clone_model,
    finetune_codebooks,
    get_base_model,
    init_codebooks,
    interventions,
    site_sets,
    state_recovery,
)

SMALL = os.environ.get("CODEBOOK_LENS_SMALL") == "1"
OUT = Path(os.environ.get("CODEBOOK_LENS_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="cbl_tut03_"))
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.perf_counter()
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")  # TL 3.9 notice


def in_notebook() -> bool:
    """True inside Jupyter/IPython (figures and views are displayed), False as a script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def show(obj, name: str) -> None:
    """Display a matplotlib figure or a codebook_lens view; as a script, save it under OUT."""
    if in_notebook():
        from IPython.display import Image, display

        if hasattr(obj, "savefig"):  # a Figure built without pyplot: show it as a PNG
            path = OUT / f"{name}.png"
            obj.savefig(path, dpi=100)
            display(Image(filename=str(path)))
        else:
            display(obj)
        return
    path = OUT / (f"{name}.png" if hasattr(obj, "savefig") else f"{name}.html")
    obj.savefig(path, dpi=100) if hasattr(obj, "savefig") else obj.save(path)
    print(f"[saved {path}]")


def tokfsm_codebooks(fsm: FSM, cfg: ExperimentConfig, cache: Path):
    """The finetuned TokFSM codebook model of tutorial 2 (loaded from its cache, or trained
    exactly as there) and the base model."""
    base, _ = get_base_model(fsm, cfg, cache, progress=not SMALL)
    key = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"tutorial-tokfsm-codebooks-{key}"
    if (path / "cfg.json").exists():
        print("loading the finetuned codebooks from", path)
        return CodebookModel.load(path).eval(), base
    print("no cached codebooks (run tutorial 2 to cache them): finetuning now")
    cm = attach_codebooks(clone_model(base), cfg.plan, seed=cfg.seed)
    init_codebooks(cm, fsm, cfg)
    finetune_codebooks(cm, fsm, cfg)
    cm.save(path, include_model=True)
    return cm.eval(), base


cfg = ExperimentConfig.small() if SMALL else ExperimentConfig()
fsm = FSM(cfg.n_states, cfg.n_edges, seed=cfg.fsm_seed)
cm, base = tokfsm_codebooks(fsm, cfg, default_cache_dir())
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
store, labels = rec["_store"], rec["_labels"]


def codes_of_state(s: int) -> dict[str, torch.Tensor]:
    """Per site, the codes at the first position labelled ``s``: ``[*head, k]``."""
    seq, pos = (labels == s).nonzero()[0].tolist()
    return {site: store.get(site)[seq, pos] for site in cm.sites}


prompt = eval_set(fsm, 1, cfg.intervention_prompt_states, seed=11)
last = int(fsm.tokens_to_states(prompt[0, 1:])[-1])
target = next(s for s in range(fsm.n_states) if s != last and s not in fsm.successors[last])
forced = codes_of_state(target)
for site, c in forced.items():
    print(f"state {target} at {site}: codes {c.flatten().tolist()}")

# %% [markdown]
# ## Force one state's codes into one prompt
#
# The prompt ends in state `last`. At its last position, at every site, we replace the codes
# with those of `target` using `set_codes`, an ordinary hook on `f"{site}.hook_codes"`, and
# compute the model's exact next-state distribution (`next_state_distribution` multiplies the
# digit probabilities). Without the intervention the mass should sit on `last`'s successors;
# with it, on `target`'s.

# %%
hooks = [(codes_hook_name(s), set_codes(c[None], positions=-1)) for s, c in forced.items()]


def forced_model(tokens: torch.Tensor) -> torch.Tensor:
    return cm.run_with_hooks(tokens, fwd_hooks=hooks)


forced_model.cfg = cm.cfg  # next_state_distribution reads n_ctx from it
p_clean = next_state_distribution(cm, fsm, prompt)[0]
p_forced = next_state_distribution(forced_model, fsm, prompt)[0]
succ_last, succ_target = fsm.successors[last], fsm.successors[target]
print(f"prompt ends in state {last}; forcing the codes of state {target}")
print(
    f"mass on successors of {last}:   clean {p_clean[succ_last].sum():.2f}, "
    f"forced {p_forced[succ_last].sum():.2f}"
)
print(
    f"mass on successors of {target}: clean {p_clean[succ_target].sum():.2f}, "
    f"forced {p_forced[succ_target].sum():.2f}"
)
assert not torch.allclose(p_clean, p_forced), "forcing codes must change the prediction"


def next_state_figure(p_clean, p_forced, succ_a, succ_b, a, b) -> Figure:
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = torch.arange(p_clean.numel())
    ax.bar(x - 0.2, p_clean, width=0.4, color="#9e9e9e", label="clean")
    ax.bar(x + 0.2, p_forced, width=0.4, color="#1f77b4", label=f"codes of {b} forced")
    ax.scatter(
        succ_a, [-0.02] * len(succ_a), marker="^", color="#9e9e9e", label=f"successors of {a}"
    )
    ax.scatter(
        succ_b, [-0.04] * len(succ_b), marker="^", color="#1f77b4", label=f"successors of {b}"
    )
    ax.set_xlabel("next state")
    ax.set_ylabel("probability")
    ax.legend(fontsize=8, ncols=2)
    return fig


show(next_state_figure(p_clean, p_forced, succ_last, succ_target, last, target), "one_prompt")

# %% [markdown]
# ## Every state, every group of sites
#
# `interventions` repeats this for every target state over several prompts, forcing the codes
# of one layer's attention, one layer's MLP, or all sites. An intervention **succeeds** when at
# least 80% of the model's top-`n_edges` next states are successors of the target (8 of the
# top 10 at full size). Without intervention the rate is near zero, since prompts end in other
# states. It also reports the Jensen–Shannon divergence between the forced prediction and the
# target's true next-state distribution.

# %%
itv = interventions(cm, fsm, cfg, rec)
print(
    f"{itv['n_interventions']} interventions; baseline success {itv['baseline_success_rate']:.2f}"
)
for name, r in itv["per_site_set"].items():
    print(f"  {name:8s} success {r['success_rate']:.2f}  JSD {r['jsd']:.3f}")
rates = {k: v["success_rate"] for k, v in itv["per_site_set"].items()}
show(viz.intervention_success_bars(rates, baseline=itv["baseline_success_rate"]), "success")
assert set(itv["per_site_set"]) == set(site_sets(cm))

# %% [markdown]
# ## Steering generation
#
# Forcing codes works during sampling too. `steer` samples continuations twice with the same
# seed, without and with the hooks, and measures how often a feature appears. We force each
# target's codes at the prompt's last position (a fixed position, so as the sequence grows during
# generation the edit stays on that token) and ask: is the first generated state a successor
# of the target? We also check that the rest of the continuation stays a valid walk: the model
# carries on from its new state.

# %%
n_prompts = 8 if SMALL else 50
prompts = eval_set(fsm, n_prompts, cfg.intervention_prompt_states, seed=12)
p_len = prompts.shape[1]
lasts = fsm.tokens_to_states(prompts[:, 1:])[:, -1]
targets = (lasts + 1 + torch.arange(n_prompts) % (fsm.n_states - 1)) % fsm.n_states
per_state = {s: codes_of_state(s) for s in targets.unique().tolist()}
values = {site: torch.stack([per_state[int(t)][site] for t in targets]) for site in cm.sites}
steer_hooks = [(codes_hook_name(s), set_codes(v, positions=p_len - 1)) for s, v in values.items()]
n_samples, new_states = 4, 4 if SMALL else 8


def first_state(gen: torch.Tensor) -> torch.Tensor:
    """The first generated state of each row (-1 if it is not written in digits)."""
    d = gen[:, : fsm.n_digits]
    place = fsm.base ** torch.arange(fsm.n_digits - 1, -1, -1)
    return torch.where((d < fsm.base).all(-1), (d * place).sum(-1), -1)


def lands_on_successor_of(row_targets: torch.Tensor):
    """The feature for `steer`: is each row's first generated state a successor of its target?"""
    return lambda gen: fsm.is_edge(row_targets, first_state(gen))


res = steer(
    cm,
    prompts,
    steer_hooks,
    feature=lands_on_successor_of(targets.repeat_interleave(n_samples)),
    max_new_tokens=new_states * fsm.n_digits,
    n_samples=n_samples,
    seed=0,
)
print(
    f"first state is a successor of the target: baseline {res.baseline_rate:.2f}, "
    f"steered {res.steered_rate:.2f}"
)
valid = (res.steered_tokens[:, p_len:] < fsm.base).all(-1)
rest = res.steered_tokens[valid, p_len:]
print(
    f"transition accuracy within the steered continuations: "
    f"{transition_accuracy(fsm, fsm.tokens_to_states(rest), is_tokens=False):.2f}"
)
for i in range(2):
    row = i * n_samples
    ctx = fsm.tokens_to_states(prompts[i, 1:]).tolist()
    gen = res.steered_tokens[row, p_len:]
    cont = fsm.tokens_to_states(gen).tolist() if bool((gen < fsm.base).all()) else gen.tolist()
    print(f"  prompt {ctx} + codes of {int(targets[i])} -> {cont}")
assert res.steered_tokens.shape == (n_prompts * n_samples, p_len + new_states * fsm.n_digits)

# %% [markdown]
# ## Steering with a single code
#
# All sites together carry the state. How much does one code carry? `steering_hooks(cm, site,
# code, positions=..., heads=..., slot=0)` forces just one code: here the best code of one
# state from the recovery (by F1), in place of the code its head chose at the prompt's last
# position. Compare its success with that of forcing every site's codes.

# %%
best = rec["best_code"]
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
        feature=lands_on_successor_of(torch.full((n1,), s1)),
        max_new_tokens=fsm.n_digits,
        n_samples=n1,
        seed=1,
    )
    single[name] = r1.steered_rate
print(
    f"prompt 0, target state {s1}; its best code: {code1} at {site1} head {head1} "
    f"(precision {best['precision'][s1]:.2f}, recall {best['recall'][s1]:.2f})"
)
print(f"  successor-of-target rate: no intervention {r1.baseline_rate:.2f}", end="")
print("".join(f", {k} {v:.2f}" for k, v in single.items()))

# %% [markdown]
# ## What the numbers should be
#
# At full size the demo measures intervention success of about 0.9 or more with all sites
# forced, against a baseline near 0, and steered first states that are successors of the
# target in most samples. The assertions below hold the full run to a loose version of that.

# %%
if not SMALL:
    assert itv["success_rate"] > itv["baseline_success_rate"] + 0.5, itv["success_rate"]
    assert res.steered_rate > res.baseline_rate + 0.5, (res.steered_rate, res.baseline_rate)
print(f"done in {time.perf_counter() - T0:.0f} s")
