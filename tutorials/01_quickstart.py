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
# # 1. Quickstart: codebooks on a TransformerLens model
#
# **Time on a CPU:** about 2.5 minutes at full size (measured on a loaded 2-core machine);
# under 30 seconds with `CODEBOOK_LENS_SMALL=1`, the size CI runs.
#
# A *codebook* is a bottleneck you insert at one hook point of a transformer. It holds `N`
# learned vectors (the codes). At every position it compares the activation with all of them,
# keeps the `k` most similar (cosine similarity by default) and passes on their sum instead of
# the activation. With `k` much smaller than `N` the activation becomes a short list of
# discrete ids that are either on or off, which is much easier to read, count and edit than a
# dense vector. This is the method of Tamkin, Taufeeque & Goodman, *Codebook Features: Sparse
# and Discrete Interpretability for Neural Networks* (arXiv 2310.17230).
#
# This notebook walks through the whole API on a small model:
#
# 1. attach codebooks at two hook points and initialise them from activations;
# 2. read the codes out of `run_with_cache` and look at them;
# 3. measure how much the bottleneck changes the model, and finetune the codes to shrink that;
# 4. patch one code with an ordinary TransformerLens hook;
# 5. switch the codebooks off, and save and load them.
#
# Everything runs offline on a CPU. The model is built from a config with random weights so that
# nothing is downloaded; with network access you can swap in a pretrained one
# (`TransformerBridge.boot_transformers("EleutherAI/pythia-70m-deduped")` on transformer-lens 4.x,
# `HookedTransformer.from_pretrained("gelu-2l")` on 3.x) and every cell below works the same way.

# %%
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from codebook_lens import CodebookModel, build_model, codes_hook_name, viz
from codebook_lens.analysis import ablate_codes, collect_codes, force_codes
from codebook_lens.training import TrainConfig, train_codebooks

SMALL = os.environ.get("CODEBOOK_LENS_SMALL") == "1"
OUT = Path(os.environ.get("CODEBOOK_LENS_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="cbl_tut01_"))
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.perf_counter()
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")  # TL 3.9 notice


print("size:", "small (CI)" if SMALL else "full", "| outputs in", OUT)

# %% [markdown]
# ## A model
#
# Any TransformerLens model works: a `TransformerBridge` (transformer-lens 4.x) or a
# `HookedTransformer` (3.x). `build_model` builds one from a config with random weights, on
# whichever the installed transformer-lens has (`backend="bridge"` or `"hooked"` to choose),
# and we keep a batch of token sequences to look at.

# %%
if SMALL:
    mcfg = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=32, d_vocab=100)
    n_seq, attn_codes, mlp_codes, mlp_k, train_steps = 64, 64, 128, 2, 20
else:
    mcfg = dict(n_layers=4, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=64, d_vocab=500)
    n_seq, attn_codes, mlp_codes, mlp_k, train_steps = 256, 256, 1024, 4, 100

model = build_model({**mcfg, "act_fn": "gelu", "seed": 0})
print(type(model).__name__)
gen = torch.Generator().manual_seed(0)
tokens = torch.randint(0, mcfg["d_vocab"], (n_seq, mcfg["n_ctx"]), generator=gen)

with torch.no_grad():
    base_logits = model(tokens[:8])  # the model before any codebook: our reference
print(f"{mcfg['n_layers']} layers, d_model={mcfg['d_model']}, tokens {tuple(tokens.shape)}")

# %% [markdown]
# ## Attach codebooks
#
# `CodebookModel` wraps the model without copying it. `add_codebook(site, n_codes=..., k=...)`
# reads the activation's size off the hook point:
#
# - at `blocks.1.attn.hook_z` (the per-head attention outputs, `[batch, pos, head, d_head]`)
#   it makes **one codebook per head**, stored as one `[n_heads, n_codes, d_head]` parameter;
# - at `blocks.0.hook_mlp_out` it quantizes the MLP's `d_model`-wide output. MLP outputs have
#   large norms, so we compare and emit codes in LayerNorm-normalised space
#   (`input_norm="layernorm"`), which keeps finetuning stable.
#
# `init_codebooks` sets the codes to activations sampled from the base model, so the codes
# start where the data is.

# %%
cm = CodebookModel(model)
attn_site, mlp_site = "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"
cm.add_codebook(attn_site, n_codes=attn_codes, k=1)
cm.add_codebook(mlp_site, n_codes=mlp_codes, k=mlp_k, input_norm="layernorm")
cm.init_codebooks(tokens)
for site, cb in cm.codebooks.items():
    print(f"{site:24s} codebook {tuple(cb.codebook.shape)}  k={cb.cfg.k}")

# %% [markdown]
# ## Read the codes
#
# Codes are cached under `f"{site}.hook_codes"` (`codes_hook_name(site)`): integer ids,
# `[batch, pos, head, k]` at per-head sites and `[batch, pos, k]` elsewhere. The site's own
# name (`blocks.1.attn.hook_z`) now holds what the rest of the model receives: the quantized
# activation.

# %%
logits, cache = cm.run_with_cache(tokens[:8])
z_codes = cache[codes_hook_name(attn_site)]
mlp_codes_ = cache[codes_hook_name(mlp_site)]
print("attn codes", tuple(z_codes.shape), z_codes.dtype)
print("mlp codes ", tuple(mlp_codes_.shape))
print("sequence 0, first 6 positions, head 0:", z_codes[0, :6, 0, 0].tolist())
assert z_codes.shape == (8, mcfg["n_ctx"], mcfg["n_heads"], 1)
assert mlp_codes_.shape == (8, mcfg["n_ctx"], mlp_k)
assert z_codes.min() >= 0 and z_codes.max() < attn_codes

# %% [markdown]
# The interactive view below colours each token by the code that fires there (one row per
# head), and its buttons highlight where each of the most frequent codes fires. In a notebook it
# renders inline (it works offline: the circuitsvis JavaScript is inlined); run as a script, it
# is saved as an HTML page.

# %%
toks = [f"t{int(t)}" for t in tokens[0, :24]]
viz.show(viz.which_code_view(toks, z_codes[0, :24]), "which_code_attn", OUT)

# %% [markdown]
# Over a whole dataset, `collect_codes` stores just the ids (small integers, no activations).
# How often is each code used? Codes that never fire are *dead*; a healthy codebook uses most
# of its codes.

# %%
store = collect_codes(cm, tokens)
viz.show(viz.code_usage_histogram({s: store.code_counts(s) for s in cm.sites}), "code_usage", OUT)

# %% [markdown]
# ## How much does the bottleneck change the model?
#
# Replacing an activation with one code is lossy. We compare the next-token distribution with
# and without codebooks: the KL divergence from the base model's prediction, in nats per token
# (0 would mean the codebooks change nothing). `cm.disabled()` runs the base model for
# comparison.


# %%
@torch.no_grad()
def kl_from_base(cm: CodebookModel, toks: torch.Tensor) -> float:
    with cm.disabled():
        ref = cm(toks).log_softmax(-1)
    out = cm(toks).log_softmax(-1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


held_out = torch.randint(0, mcfg["d_vocab"], (32, mcfg["n_ctx"]), generator=gen)
kl0 = kl_from_base(cm, held_out)
print(f"at initialisation: KL {kl0:.4f} nats/token")

# %% [markdown]
# ## Finetune the codes
#
# `train_codebooks` minimises a task loss plus each codebook's explicit reconstruction loss.
# With real text the task loss is next-token cross-entropy (the default). Our tokens are random,
# so we use a task that makes sense for any model: match the base model's own predictions
# (distillation, the KL above), with the base weights frozen so only the codes move. Codes
# trained alone on a frozen model take a high learning rate well (3e-2 here).


# %%
def distill_loss(cm: CodebookModel, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), cm.disabled():
        ref = cm(toks).log_softmax(-1)
    out = cm(toks).log_softmax(-1)  # the codebooks' forward comes last: its aux loss counts
    return (ref.exp() * (ref - out)).sum(-1).mean()


def batches(batch_size: int = 16):
    g = torch.Generator().manual_seed(1)
    while True:
        yield torch.randint(0, mcfg["d_vocab"], (batch_size, mcfg["n_ctx"]), generator=g)


result = train_codebooks(
    cm,
    batches(),
    TrainConfig(
        steps=train_steps,
        lr=3e-2,
        warmup_steps=5,
        freeze_model=True,
        log_every=max(1, train_steps // 10),
        progress=not SMALL,
    ),
    loss_fn=distill_loss,
)
cm.eval()
kl1 = kl_from_base(cm, held_out)
print(f"after {train_steps} steps ({result.seconds:.0f} s): KL {kl1:.4f} nats/token")
viz.show(viz.training_curves(result.history), "training_curves", OUT)
if not SMALL:
    assert kl1 < kl0, "finetuning should bring the codebook model closer to the base model"

# %% [markdown]
# ## Patch a code
#
# Because codes are an ordinary hook point, an intervention is an ordinary hook function. Here
# we overwrite head 0's code at the last position with another code and look at how the
# prediction there changes. Positions before it cannot see it (attention is causal), so their
# logits stay exactly as they were.

# %%
x = tokens[:8]
clean = cm(x)
original = int(z_codes[0, -1, 0, 0])
new_code = (original + 1) % attn_codes


def swap_code(codes, hook):  # codes: [batch, pos, head, k]
    codes[:, -1, 0, 0] = new_code
    return codes


patched = cm.run_with_hooks(x, fwd_hooks=[(codes_hook_name(attn_site), swap_code)])
change = (patched[:, -1] - clean[:, -1]).abs().max()
print(f"head 0, last position: code {original} -> {new_code}; max logit change {change:.3f}")
assert change > 0
torch.testing.assert_close(patched[:, :-1], clean[:, :-1])

# %% [markdown]
# `codebook_lens.analysis` has hook factories for the common edits, with positions, heads and
# slots as arguments: `force_codes` (make a code fire), `ablate_codes` (remove codes; the slot
# becomes `-1` and contributes nothing), `set_codes` and `patch_codes` (copy codes from another
# run; see tutorial 4). `force_codes(new_code, positions=-1, heads=[0], slot=0)` is the same edit
# as `swap_code`:

# %%
same = cm.run_with_hooks(
    x, fwd_hooks=[(codes_hook_name(attn_site), force_codes(new_code, -1, heads=[0], slot=0))]
)
torch.testing.assert_close(same, patched)
ablated = cm.run_with_hooks(x, fwd_hooks=[(codes_hook_name(mlp_site), ablate_codes(positions=-1))])
print(
    f"ablating every MLP code at the last position: max logit change "
    f"{(ablated[:, -1] - clean[:, -1]).abs().max():.3f}"
)

# %% [markdown]
# ## The off switch
#
# With the codebooks disabled, the model is the base model bit for bit (the codebooks are
# permanent hooks that step aside). `cm.disabled(site)` turns off a single site.

# %%
with cm.disabled():
    off = cm(x)
assert torch.equal(off, base_logits), "disabled codebooks must give the base model's logits"
with cm.disabled(mlp_site):
    only_attn = cm(x)
print(
    "disabled == base model: True; only the attention codebook on: max |logit diff| "
    f"{(only_attn - base_logits).abs().max():.3f}"
)

# %% [markdown]
# ## Save and load
#
# `save` writes a directory with `cfg.json` and safetensors (never pickle), atomically.
# `include_model=True` stores the base model too, so `load` needs nothing else.

# %%
path = OUT / "quickstart_codebooks"
cm.save(path, include_model=True)
print(sorted(p.name for p in path.iterdir()))
cm2 = CodebookModel.load(path).eval()
assert cm2.sites == cm.sites
with torch.no_grad():
    assert torch.equal(cm2(x), cm(x)), "a loaded model must compute the same logits"
name = codes_hook_name(attn_site)
assert torch.equal(cm2.run_with_cache(x)[1][name], cm.run_with_cache(x)[1][name])
print(f"loaded: same logits and codes. Total time {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# ## Where next
#
# - **Tutorial 2** trains codebooks on TokFSM, a synthetic language with hidden states, and
#   shows that single codes recover those states far better than single neurons.
# - **Tutorial 3** forces the codes of a state and steers generation with them.
# - **Tutorial 4** finds the codes for a feature, their effect on the logits, and runs a
#   clean → corrupt patching sweep.
