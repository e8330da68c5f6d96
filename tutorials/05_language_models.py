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
# # 5. Codebooks on language models: topic codes and topic steering
#
# **Run time:** about 8 minutes (494 s measured, one thread) on a 2-core CPU at full size; under
# a minute with `CODEBOOK_LENS_SMALL=1` (the size CI runs).
#
# The paper's second half puts codebooks into language models, finds codes for concepts and
# steers generation by forcing a topic's codes ("dragon" stories went from 2.5% to 65%). Here we
# do the same end to end, offline, on a model and a corpus we make ourselves:
#
# 1. a *topic-stories* corpus from a small grammar, with a ground-truth topic for every token;
# 2. a byte-level BPE tokenizer trained locally, which TransformerLens accepts;
# 3. a small transformer (a `TransformerBridge`; a `HookedTransformer` on 3.x) trained on
#    packed blocks of text;
# 4. per-head codebooks at every `attn.hook_z`, finetuned with the generic trainer (the same
#    call runs under `accelerate launch` on several GPUs);
# 5. topic codes found by precision against the labels, and topic steering.
#
# The last section shows the same path on a model from the Hub.

# %%
import os
import time

import torch

from codebook_lens import CodebookModel, codes_hook_name
from codebook_lens.analysis import attribution_by_site, collect_codes
from codebook_lens.data import BlockStream, pack_labelled_blocks, pydoc_texts
from codebook_lens.lm import (
    TOPICS,
    LMDemoConfig,
    TopicClassifier,
    build_lm,
    eval_loss,
    generate_stories,
    sample_texts,
    story_token_labels,
    topic_codes,
    topic_steering_hooks,
    train_bpe_tokenizer,
)
from codebook_lens.training import TrainConfig, make_accelerator, train_codebooks

SMALL = os.environ.get("CODEBOOK_LENS_SMALL") == "1"
cfg = LMDemoConfig.small() if SMALL else LMDemoConfig()
torch.manual_seed(cfg.seed)
t0 = time.perf_counter()

# %% [markdown]
# ## 1. The topic-stories corpus
#
# Every story opens generically; 20% of stories then switch to one of eight topics and stay on
# it. Each sentence carries its topic (-1 = generic), so every token gets a label.

# %%
train_stories = generate_stories(cfg.n_train_stories, seed=cfg.seed)
held_out = generate_stories(cfg.n_eval_stories, seed=cfg.seed + 10_000)
print(TOPICS)
for s in [s for s in held_out if s.topic >= 0][:2] + [s for s in held_out if s.topic < 0][:1]:
    print(f"[{TOPICS[s.topic] if s.topic >= 0 else 'generic'}] {s.text}\n")

# %% [markdown]
# ## 2. A local tokenizer that TransformerLens accepts
#
# `train_bpe_tokenizer` trains a byte-level BPE (every string round-trips) and wraps it as a
# `PreTrainedTokenizerFast` with one special token for BOS/EOS/padding.

# %%
tok = train_bpe_tokenizer([s.text for s in train_stories], vocab_size=cfg.vocab_size)
text = held_out[0].text
ids = tok(text, add_special_tokens=False)["input_ids"]
print(len(text), "characters ->", len(ids), "tokens; round trip:", tok.decode(ids) == text)
print([tok.decode([i]) for i in ids[:16]])

# %% [markdown]
# Labels per token come from the tokenizer's character offsets; documents are packed into
# blocks that start with BOS and are separated by EOS (label -1 there).

# %%
ids, labels = story_token_labels(tok, held_out)
eval_tokens, eval_labels = pack_labelled_blocks(
    ids, labels, cfg.block_len, tok.bos_token_id, tok.eos_token_id
)
print("held-out blocks:", tuple(eval_tokens.shape))
stream = BlockStream(
    [s.text for s in train_stories],
    tok,
    cfg.block_len,
    cfg.batch_size,
    shuffle_buffer=64 * cfg.batch_size,
    seed=cfg.seed,
    repeat=True,
)
print("a training batch:", tuple(next(iter(stream)).shape))

# %% [markdown]
# The same pipeline takes real English: the Python reference documentation ships with every
# Python (`pydoc_data.topics`, ~465 KB).

# %%
docs = pydoc_texts()
doc_tok = train_bpe_tokenizer(docs, vocab_size=1000)
doc_blocks = next(iter(BlockStream(docs, doc_tok, block_len=64, batch_size=4)))
print(len(docs), "documents,", sum(map(len, docs)) // 1000, "KB")
print(repr(doc_tok.decode(doc_blocks[0, 1:40])))

# %% [markdown]
# ## 3. Train a small language model
#
# `train_codebooks` is the one training loop of the library; with `allow_no_codebooks=True` it
# trains the plain model. `make_accelerator()` picks the device and mixed precision (here: the
# CPU in fp32); under `accelerate launch` the same call trains on several processes.

# %%
model = build_lm(tok, cfg)
cm = CodebookModel(model)
acc = make_accelerator()
base = train_codebooks(
    cm,
    stream,
    TrainConfig(
        steps=cfg.base_steps,
        lr=cfg.base_lr,
        warmup_steps=max(1, cfg.base_steps // 20),
        weight_decay=0.01,
        log_every=max(1, cfg.base_steps // 5),
        allow_no_codebooks=True,
    ),
    accelerator=acc,
)
loss_base = eval_loss(cm, eval_tokens)
print([round(r["loss"], 3) for r in base.history], "held-out loss:", round(loss_base, 4))
print(
    model.generate("Once upon a time,", max_new_tokens=30, use_past_kv_cache=False, verbose=False)
)

# %% [markdown]
# ## 4. Codebooks on every attention head
#
# `add_codebook` at `attn.hook_z` reads the head layout off the site: one codebook per head,
# `k` codes active per head and position.

# %%
sites = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
for site in sites:
    cm.add_codebook(site, n_codes=cfg.n_codes, k=cfg.k, seed=cfg.seed)
init_stream = BlockStream([s.text for s in train_stories[:4000]], tok, cfg.block_len, 64)
cm.init_codebooks(next(iter(init_stream)))  # codes start as sampled training activations
with torch.no_grad():  # codes start as activations; the output sums k of them
    for cb in cm.codebooks.values():
        cb.codebook.div_(cb.cfg.k)
loss_attach = eval_loss(cm, eval_tokens)
print("loss right after attaching:", round(loss_attach, 4))

finetune = train_codebooks(
    cm,
    stream,
    TrainConfig(
        steps=cfg.codebook_steps,
        lr=cfg.codebook_lr / 3,
        codebook_lr=cfg.codebook_lr,
        warmup_steps=max(1, cfg.codebook_steps // 20),
        log_every=max(1, cfg.codebook_steps // 5),
    ),
    accelerator=acc,
)
loss_cb = eval_loss(cm, eval_tokens)
print(
    f"held-out loss: base {loss_base:.4f}, with codebooks {loss_cb:.4f} "
    f"({100 * (loss_cb - loss_base) / loss_base:+.1f}%)"
)

# %% [markdown]
# Codes are cached like any activation: `[batch, pos, head, k]` under `f"{site}.hook_codes"`.

# %%
_, cache = cm.run_with_cache(eval_tokens[:1, :12])
codes = cache[codes_hook_name(sites[-1])]
print(codes.shape)
assert codes.shape == (1, 12, cfg.n_heads, cfg.k)
print(codes[0, :4, 0])  # the k codes of head 0 at the first four positions

# %% [markdown]
# ## 5. Topic codes
#
# Collect the codes of the held-out blocks and rank every code of every head by precision
# against the per-token topic labels (label 8 = generic sentence).

# %%
store = collect_codes(cm, eval_tokens, sites)
results = attribution_by_site(store, eval_labels, sites, n_labels=len(TOPICS) + 1)
chosen = {}
for i, topic in enumerate(TOPICS):
    chosen[i] = topic_codes(
        results, i, cfg.steer_slots, cfg.min_precision, cfg.min_count, by=cfg.steer_rank_by
    )
    best = topic_codes(results, i, 1, 0.0, cfg.min_count, max_heads=1)
    print(
        f"{topic:8s} best code: {best.sites[0]} head {int(best.heads[0])} code "
        f"{int(best.codes[0, 0]):4d}  precision {float(best.precision[0, 0]):.3f} "
        f"recall {float(best.recall[0, 0]):.3f};  {len(chosen[i].heads)} heads for steering"
    )
    # the precision by hand: of the labelled tokens where the code fires, the share on topic
    # (codes and labels out of step would give another number)
    head, code = int(best.heads[0]), int(best.codes[0, 0])
    fires = (store.get(best.sites[0])[:, :, head] == code).any(-1) & (eval_labels >= 0)
    by_hand = float((eval_labels[fires] == i).float().mean())
    assert abs(by_hand - float(best.precision[0, 0])) < 1e-6, (topic, by_hand)

# %% [markdown]
# ## 6. Steering
#
# For every head whose best code is precise enough, write its `cfg.steer_slots` (`k // 2 + 1`)
# best codes for the topic, ranked by F1 (`cfg.steer_rank_by`), into its lowest-ranked slots at
# every position (the other slots keep the model's own codes), sample from a generic opening
# sentence, and classify the samples with the grammar's topic words. F1 rather than precision:
# the most precise codes are often rare ones that fire on a few topic tokens, and writing them
# everywhere steers less than codes that fire on most of the topic's tokens. (Appending a single
# code moves a k-code head by about 1/k; that barely steers.)

# %%
prompt = "Once upon a time, there was a little girl named Lily."
clf = TopicClassifier()
baseline = sample_texts(cm, prompt, cfg.n_baseline, cfg.max_new_tokens, seed=1)
base_rates = clf.rates(baseline)
print("unsteered:", baseline[0])
ratios = []
for i, topic in enumerate(TOPICS):
    if chosen[i].n_codes == 0:
        print(f"{topic:8s} no precise code")
        continue
    hooks = topic_steering_hooks(cm, chosen[i])
    texts = sample_texts(cm, prompt, cfg.n_samples, cfg.max_new_tokens, hooks, seed=2 + i)
    about = clf.classify(texts)  # topic id per sample (-1: none)
    rate = float((about == i).float().mean())
    ratios.append(rate / max(float(base_rates[i]), 1 / cfg.n_baseline))
    example = texts[int((about == i).int().argmax())]  # the first on-topic sample, if any
    print(f"{topic:8s} {100 * float(base_rates[i]):5.1f}% -> {100 * rate:5.1f}%   {example[:90]}")
print(f"{sum(r >= 10 for r in ratios)} of {len(TOPICS)} topics steered to >= 10x")

# %% [markdown]
# ## Checks
#
# At full size the README's goals: held-out loss at most 10% above the base model's, and more
# than half of the topics steered to 10x their unsteered rate. At `CODEBOOK_LENS_SMALL=1` the
# model is too small to steer (0 of 8 topics in measured runs), so the checks there are on what
# it does learn, with thresholds set from measured small runs (transformer-lens 4.3 / 3.9) and
# chosen so that a broken pipeline fails them.

# %%
rel = (loss_cb - loss_base) / loss_base
assert rel <= 0.10, rel  # the README's goal; small runs: -2.2% / -1.3%
if SMALL:
    # the base model learnt: held-out loss 2.02 / 2.12, against ln(512) = 6.24 for a uniform
    # guess and 5.2 logged over its first 12 steps; an untrained or broken trainer fails 3.0
    assert loss_base < 3.0, loss_base
    # finetuning the codes lowers the loss (2.07 -> 1.98 / 2.24 -> 2.09); a run whose
    # codebooks do not train does not
    assert loss_cb < loss_attach, (loss_attach, loss_cb)
else:
    assert sum(r >= 10 for r in ratios) > len(TOPICS) / 2, ratios
print(f"total time: {time.perf_counter() - t0:.0f} s")

# %% [markdown]
# ## 7. Your own model
#
# The same calls on a model from the Hub (needs network access, so not run here):
#
# ```python
# import datasets
# from transformer_lens.model_bridge import TransformerBridge
# from codebook_lens.data import hf_texts
#
# model = TransformerBridge.boot_transformers("EleutherAI/pythia-70m-deduped")  # TL 4.x
# # on 3.x: from transformer_lens import HookedTransformer
# #         model = HookedTransformer.from_pretrained("pythia-70m-deduped")
# cm = CodebookModel(model)
# for layer in range(model.cfg.n_layers):
#     cm.add_codebook(f"blocks.{layer}.attn.hook_z", n_codes=10_000, k=8)   # the paper's setup
# ds = datasets.load_dataset("roneneldan/TinyStories", split="train", streaming=True)
# stream = BlockStream(lambda: hf_texts(ds), model.tokenizer, block_len=256, batch_size=64,
#                      shuffle_buffer=20_000, repeat=True)
# cm.init_codebooks(next(iter(stream)))
# train_codebooks(cm, stream, TrainConfig(steps=20_000, lr=1e-4, codebook_lr=1e-3,
#                                         checkpoint_dir="ckpt", checkpoint_every=500),
#                 accelerator=make_accelerator())
# ```
#
# Launch it on eight GPUs with `accelerate launch --multi_gpu --num_processes 8 train.py`; a
# rerun resumes from the last checkpoint. See "Using your own model" in the README for sites,
# hyperparameters and memory estimates.
