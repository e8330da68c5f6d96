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
# # 4. Attribution and circuits: which codes, what they do, where the information flows
#
# **Time on a CPU:** about 1 minute at full size when tutorial 2 has run before (it caches the
# finetuned model); otherwise add tutorial 2's training, about 9 minutes (base model and
# finetuning measured 536 s in the TokFSM demo). Under 30 seconds with
# `CODEBOOK_LENS_SMALL=1`, the size CI runs, where the model has not learnt the language and the
# numbers only show that the code runs.
#
# A circuit analysis with codes has three steps, and this notebook does each on the TokFSM
# model of tutorial 2:
#
# 1. **Find the codes for a feature.** Here the feature is "the walk is in state `s`"; the codes
#    are ranked by precision, recall and F1, and we read their top contexts.
# 2. **Their effect on the logits.** Direct logit attribution (DLA) of a code: push its vector
#    through the rest of the residual stream's path to the unembedding. After state `s`, the next
#    token is the first digit of one of `s`'s successors, so a code for `s` should promote exactly
#    those digits. Attribution patching then estimates, from one backward pass, what removing each
#    active code would do, and we check it against real ablations.
# 3. **A clean → corrupt patching sweep.** Two prompts differ only in their last state. Copying
#    the clean run's codes into the corrupt run one site, head and position at a time shows where
#    the information about the last state lives and how it moves to the prediction.

# %%
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from codebook_lens import codes_hook_name, viz
from codebook_lens.analysis import (
    ablation_sweep,
    code_attribution_patching,
    code_logit_attribution,
    code_token_table,
    collect_codes,
    feature_attribution,
    patch_codes,
    patch_sweep,
    rank_codes,
    top_examples,
)
from codebook_lens.fsm import FSM, eval_set, state_labels
from codebook_lens.fsm.demo import default_cache_dir
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
    cached_codebook_model,
)

SMALL = os.environ.get("CODEBOOK_LENS_SMALL") == "1"
OUT = Path(os.environ.get("CODEBOOK_LENS_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="cbl_tut04_"))
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.perf_counter()
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")  # TL 3.9 notice


cfg = ExperimentConfig.small() if SMALL else ExperimentConfig()
fsm = FSM(cfg.n_states, cfg.n_edges, seed=cfg.fsm_seed)
cm, base = cached_codebook_model(fsm, cfg, default_cache_dir(), progress=not SMALL)
vocab = [str(d) for d in range(fsm.base)] + ["BOS"]
digits = list(range(fsm.base))
print("size:", "small (CI)" if SMALL else "full", "| sites", cm.sites)

# %% [markdown]
# ## 1. Find the codes for a feature
#
# `collect_codes` runs the model over held-out walks and keeps only the code ids. A feature is a
# Bool tensor over the same positions; `feature_attribution` gives every code's precision,
# recall and F1 for it at one site, and `rank_codes` sorts them. (For text models,
# `token_feature` and `regex_feature` build features from tokens or a regular expression over
# the decoded text.)

# %%
walks = eval_set(fsm, cfg.recovery_walks, cfg.recovery_states, seed=cfg.seed + 3)
store = collect_codes(cm, walks)
labels = state_labels(fsm, walks)  # the state at each state's last digit, -1 elsewhere
state = int(labels[labels >= 0].bincount().argmax())  # the most frequent state
feature = labels == state
print(f"feature: 'the walk is in state {state}' ({int(feature.sum())} positions)")
ranked = {s: rank_codes(feature_attribution(store, feature, s), top=3) for s in cm.sites}
print(f"{'site':24s} head code  precision recall  F1    fires")
for site, r in ranked.items():
    for h, c, p, rc, f, n in zip(r.head, r.code, r.precision, r.recall, r.f1, r.count):
        print(f"{site:24s} {int(h):4d} {int(c):4d}  {p:9.2f} {rc:6.2f} {f:5.2f} {int(n):6d}")
site, r = max(ranked.items(), key=lambda kv: float(kv[1].f1[0]))
head, code = int(r.head[0]), int(r.code[0])
print(f"best: code {code} at {site}, head {head} (F1 {float(r.f1[0]):.2f})")

# %% [markdown]
# Where does the best code fire? The view shows its top contexts (the firing token marked);
# in a well-trained model they all end in the digits of `state`. `code_token_table` lists the
# tokens each code fires on most, here the token itself and the one before it.

# %%
ex = top_examples(store, site, code, head=head, n=8, before=6, after=1)
contexts, values = viz.contexts_from_windows(ex.context, ex.before, vocab)
viz.show(
    viz.top_contexts_view([contexts], [values], [f"code {code} (H{head})"], site), "top_ctx", OUT
)
for offset in (0, -1):
    tab = code_token_table(store, site, top=3, offset=offset)
    toks = [vocab[t] if t >= 0 else "-" for t in tab.tokens[head, code].tolist()]
    print(
        f"offset {offset:+d}: most frequent tokens {toks}, counts "
        f"{tab.counts[head, code].tolist()} of {int(tab.totals[head, code])}"
    )
assert ex.n_total == int(store.fires(site, code, head).sum())

# %% [markdown]
# ## 2. Logit effects
#
# **Direct logit attribution.** `code_logit_attribution(cm, site, tokens=digits, scale=...)`
# maps each code's vector to the residual stream (through `W_O` at `attn.hook_z`), through the
# final LayerNorm with its scale frozen at a real position's value, and through `W_U`. It is the
# code's *direct* effect; paths through later layers are not counted. We compare the code's
# effect on each digit with the true distribution of the next state's first digit after
# `state`.

# %%
_, cache = cm.run_with_cache(walks[:64])
scale = cache["ln_final.hook_scale"][:64][feature[:64]].mean()  # where the feature holds
dla = code_logit_attribution(cm, site, tokens=digits, scale=scale, codes=[code])[head, 0]
first_digit = (
    torch.bincount(
        fsm.successors[state] // fsm.base ** (fsm.n_digits - 1), minlength=fsm.base
    ).float()
    / fsm.n_edges
)
dla_c = dla - dla.mean()
r_dla = float(np.corrcoef(dla_c.numpy(), first_digit.numpy())[0, 1])
print(f"DLA of code {code} on digits 0-9: {[round(float(x), 2) for x in dla_c]}")
print(f"true first-digit distribution:  {first_digit.tolist()}")
print(f"correlation {r_dla:.2f}")

where = f"{site} H{head}" if store.get(site).dim() == 4 else site
fig = viz.new_figure(6, 4)
ax, ax2 = fig.subplots(2, 1, sharex=True)
ax.bar(range(fsm.base), dla_c.numpy(), color="#1f77b4")
ax.axhline(0, color="grey", lw=0.5)
ax.set_ylabel("direct logit effect\n(centred)")
ax.set_title(f"code {code} at {where}", fontsize=9)
ax2.bar(range(fsm.base), first_digit.numpy(), color="#ff7f0e")
ax2.set_ylabel(f"P(next first digit)\nafter state {state}")
ax2.set_xticks(range(fsm.base))
ax2.set_xlabel("digit token")
viz.show(fig, "dla", OUT)

# %% [markdown]
# **Attribution patching.** For a metric of the output, one forward and one backward pass give,
# for every active code, `effect = -grad · code_vector`: a linear estimate of how much the
# metric would change if that code were removed. The metric here is how much probability the
# model puts on first digits of the real successors of each prompt's last state. We sum the
# estimates per (site, head) at the last position and compare them with real ablations of the
# same units from `ablation_sweep` (one forward pass per unit, batched).
#
# The estimate is a linearisation, and removing the only code of a head (`k=1`) is not a small
# change: it zeroes that head's output. Every unit here also has codebooks downstream, whose
# codes may switch. So expect a rough ranking at best, not the real sizes: in full-size runs the
# estimates correlated with the real ablations only loosely (r = 0.4 in one, 0.06 in the latest)
# and were much smaller. Use attribution patching to pick candidates cheaply, and
# `ablation_sweep` to measure them.

# %%
n_prompts = 16 if SMALL else 64
prompts = eval_set(fsm, n_prompts, cfg.intervention_prompt_states, seed=21)
lasts = fsm.tokens_to_states(prompts[:, 1:])[:, -1]


def first_digit_dist(states: torch.Tensor) -> torch.Tensor:
    """``[batch, base]``: the true distribution of the next state's first digit."""
    fd = fsm.successors[states] // fsm.base ** (fsm.n_digits - 1)  # [batch, n_edges]
    return torch.zeros(len(states), fsm.base).scatter_add_(1, fd, torch.ones_like(fd.float()))


target_dist = first_digit_dist(lasts) / fsm.n_edges


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Mean log-probability mass on the true successors' first digits (last position)."""
    p = logits[:, -1, : fsm.base].softmax(-1)
    return ((p * (target_dist > 0)).sum(-1) + 1e-9).log().mean()


attr = code_attribution_patching(cm, prompts, metric)
est, real, names = [], [], []
sweep = ablation_sweep(cm, prompts, metric, positions=[-1])
for si, s in enumerate(sweep.sites):
    e = attr[s].effect[:, -1]  # [batch, *head, k]
    e = e.sum(-1).sum(0) if e.dim() == 3 else e.sum(-1).sum(0, keepdim=True)  # metric is a mean
    for h in range(e.shape[0]):
        est.append(float(e[h]))
        real.append(float(sweep.effects[si, 0, h]))
        kind = "attn" if "attn" in s else "mlp"
        names.append(f"L{s.split('.')[1]} {kind}" + (f" H{h}" if e.shape[0] > 1 else ""))
r_ap = float(np.corrcoef(est, real)[0, 1]) if np.std(est) > 0 and np.std(real) > 0 else 0.0
print(f"metric {attr[cm.sites[0]].metric:.3f}; estimate vs real ablation: r = {r_ap:.2f}")
for n_, e_, r_ in sorted(zip(names, est, real), key=lambda t: t[2])[:4]:
    print(f"  {n_:12s} estimated {e_:+.3f}  real {r_:+.3f}")

fig = viz.new_figure(4.5, 4)
ax = fig.subplots()
ax.scatter(real, est)
for n_, x_, y_ in zip(names, real, est):
    ax.annotate(n_, (x_, y_), fontsize=7)
lo, hi = min(real + est), max(real + est)
ax.plot([lo, hi], [lo, hi], color="grey", lw=0.5)
ax.set_xlabel("real ablation effect")
ax.set_ylabel("attribution-patching estimate")
ax.set_title(f"ablating each unit at the last position (r = {r_ap:.2f})", fontsize=9)
viz.show(fig, "attribution_vs_ablation", OUT)

# %% [markdown]
# ## 3. Clean → corrupt patching sweep
#
# The clean prompts are walks; each corrupt prompt is the same walk with its last state replaced
# by another state that can also follow the one before it, so both prompts are valid walks
# that differ only in their last two tokens. The metric scores how much the first-digit
# prediction looks like the clean last state's successors rather than the corrupt one's:
#
# `metric = mean over prompts of  sum_d (P_clean(d) - P_corrupt(d)) * log p_model(d)`.
#
# `patch_sweep` copies the clean codes into the corrupt run at one (site, position, head) at a
# time and reports `metric(patched) - metric(corrupt)`. Dividing by `metric(clean) -
# metric(corrupt)` gives the fraction of the gap each unit restores.

# %%
clean = prompts
prev = fsm.tokens_to_states(clean[:, 1:])[:, -2]
corrupt_last = torch.tensor(
    [next(int(s) for s in fsm.successors[p] if int(s) != int(c)) for p, c in zip(prev, lasts)]
)
corrupt = clean.clone()
corrupt[:, -fsm.n_digits :] = fsm.states_to_tokens(corrupt_last[:, None])
assert bool(fsm.is_edge(prev, corrupt_last).all()) and not torch.equal(clean, corrupt)
weights = (first_digit_dist(lasts) - first_digit_dist(corrupt_last)) / fsm.n_edges


def diff_metric(logits: torch.Tensor) -> torch.Tensor:
    return (weights * logits[:, -1, : fsm.base].log_softmax(-1)).sum(-1).mean()


with torch.no_grad():
    m_clean, m_corrupt = float(diff_metric(cm(clean))), float(diff_metric(cm(corrupt)))
print(f"metric clean {m_clean:.3f}, corrupt {m_corrupt:.3f}")
n_pos = min(6, clean.shape[1])
positions = list(range(clean.shape[1] - n_pos, clean.shape[1]))
res = patch_sweep(cm, clean, corrupt, diff_metric, positions=positions)
gap = m_clean - m_corrupt
frac = res.effects / gap if abs(gap) > 1e-6 else res.effects  # [site, pos, head]
assert res.effects.shape[:2] == (len(cm.sites), n_pos)
assert torch.isclose(torch.tensor(res.baseline), torch.tensor(m_corrupt), atol=1e-4)

# %% [markdown]
# One row per site and head, one column per position (the last two are the changed state's
# digits). Earlier positions hold identical codes in both runs, so patching them does nothing:
# a free sanity check. In the full-size run the whole effect sits at the **last** position:
# the layer-0 heads and the layer-0 MLP restore most of the gap, the layer-1 MLP some, the
# layer-1 heads nothing. The first digit's position matters nowhere, even though its token
# differs in most prompts: the last position's layer-0 heads read that digit straight from the
# token embedding, which no codebook carries, and assemble the state from it. (This is why
# tutorial 3's forced codes move the next state's first digit but not fully its second.)

# %%
rows, row_names = [], []
for si, s in enumerate(res.sites):
    n_h = int((~torch.isnan(frac[si, 0])).sum())
    kind = "attn" if "attn" in s else "mlp"
    for h in range(n_h):
        rows.append(frac[si, :, h])
        row_names.append(f"L{s.split('.')[1]} {kind}" + (f" H{h}" if n_h > 1 else ""))
grid = torch.stack(rows).numpy()
fig = viz.new_figure(6, 0.35 * len(rows) + 1.5)
ax = fig.subplots()
lim = max(float(np.nanmax(np.abs(grid))), 1e-6)
im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
ax.set_yticks(range(len(rows)), row_names, fontsize=8)
tok0 = [vocab[t] for t in clean[0, positions].tolist()]
tok1 = [vocab[t] for t in corrupt[0, positions].tolist()]
ax.set_xticks(range(n_pos), [f"{p}\n{a}/{b}" for p, a, b in zip(positions, tok0, tok1)])
ax.set_xlabel("position (clean/corrupt token of prompt 0)")
fig.colorbar(im, ax=ax, label="fraction of the gap restored")
ax.set_title("patching clean codes into the corrupt run", fontsize=9)
viz.show(fig, "patch_sweep", OUT)
same = frac[:, : n_pos - fsm.n_digits]
assert torch.allclose(same[~torch.isnan(same)], torch.zeros(()), atol=1e-5)

# %% [markdown]
# Patching every site's codes at the swept positions at once is the upper bound of what the
# codes carry (the corrupt token embeddings stay). And layer 0's attention pattern next to its
# codes shows where each head looks from each position (hover a head to see its pattern):

# %%
_, clean_cache = cm.run_with_cache(clean)
patch_all = [
    (codes_hook_name(s), patch_codes(clean_cache[codes_hook_name(s)], positions=positions))
    for s in cm.sites
]
with torch.no_grad():
    m_all = float(diff_metric(cm.run_with_hooks(corrupt, fwd_hooks=patch_all)))
print(
    f"all sites at the last {n_pos} positions: metric {m_all:.3f} "
    f"({(m_all - m_corrupt) / gap if abs(gap) > 1e-6 else float('nan'):.0%} of the gap)"
)
attn_site = [s for s in cm.sites if "attn" in s][0]  # layer 0, where the state is assembled
layer = attn_site.split(".")[1]
toks = [vocab[t] for t in clean[0].tolist()]
viz.show(
    viz.attention_with_codes_view(
        clean_cache[f"blocks.{layer}.attn.hook_pattern"][0],
        clean_cache[codes_hook_name(attn_site)][0],
        toks,
    ),
    "attention_with_codes",
    OUT,
)

# %% [markdown]
# ## What the numbers should be
#
# Measured at full size: the best code for the most frequent state fires only for it, and at
# every occurrence (layer-0 MLP, precision 1.00, recall 1.00); its direct logit effect
# correlates with the successors' first-digit distribution (r = 0.54); attribution patching
# ranks units only loosely (r = 0.06 in the latest run, 0.4 in an earlier one);
# the clean → corrupt gap closes completely when every site's codes at the last positions are
# patched, and the sweep puts all of it on the last position. The checks below hold a full run
# to a loose version of that.

# %%
if not SMALL:
    assert float(r.precision[0]) >= 0.9, float(r.precision[0])
    assert r_dla > 0.3, r_dla
    assert m_clean > m_corrupt
    assert (m_all - m_corrupt) / gap >= 0.8, (m_all, m_corrupt, gap)
print(f"done in {time.perf_counter() - T0:.0f} s")
