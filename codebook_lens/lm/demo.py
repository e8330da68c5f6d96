"""``codebook-lens lm-demo``: codebooks on a language model, topic codes, and topic steering.

The whole path of the paper's language-model half, offline and on a CPU:

1. generate the topic-stories corpus (:mod:`codebook_lens.lm.corpus`) and train a byte-level
   BPE tokenizer on it;
2. train a small transformer (``HookedTransformer`` or ``TransformerBridge``) on packed
   128-token blocks (:class:`BlockStream`) with the generic trainer;
3. attach one codebook per attention head at every layer's ``attn.hook_z`` (k codes active per
   head), initialise it from activations and finetune; compare held-out loss before and after;
4. collect codes on held-out stories and rank them by precision against the per-token topic
   labels (:mod:`codebook_lens.analysis`);
5. steer: force each topic's codes during sampling and measure how often the samples are about
   that topic (:class:`TopicClassifier`) against unsteered samples.

:func:`run_lm_demo` writes ``metrics.json``, ``report.md``, the tokenizer and the codebook model
to ``out_dir`` and returns the metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor, nn

from codebook_lens.analysis import AttributionResult, attribution_by_site, collect_codes
from codebook_lens.atomic import write_text
from codebook_lens.backends import Backend, build_model
from codebook_lens.config import MAX_CODEBOOK_ELEMENTS
from codebook_lens.data import BlockStream, pack_labelled_blocks
from codebook_lens.evaluation import evaluate_codebooks
from codebook_lens.lm.browse_data import write_lm_browse_data
from codebook_lens.lm.corpus import (
    TOPICS,
    StoryConfig,
    TopicClassifier,
    generate_stories,
    story_token_labels,
)
from codebook_lens.lm.report import render_report
from codebook_lens.lm.steering import (
    RankBy,
    TopicCodes,
    sample_texts,
    topic_codes,
    topic_steering_hooks,
)
from codebook_lens.lm.tokenizer import save_tokenizer, train_bpe_tokenizer
from codebook_lens.model import CodebookModel
from codebook_lens.training import TrainConfig, TrainResult, train_codebooks
from codebook_lens.validation import Range, ValidatedConfig

__all__ = [
    "LMDemoConfig",
    "LMData",
    "lm_data",
    "train_base_lm",
    "run_lm_demo",
    "eval_loss",
    "build_lm",
]

_MAX_STEPS = 10**9
"""The most optimizer steps a config accepts."""

PROMPT = "Once upon a time, there was a little girl named Lily."
"""The steering prompt: the generic opener of a story."""


@dataclass
class LMDemoConfig(ValidatedConfig):
    """Sizes and hyperparameters of the LM demo (defaults: the full run; :meth:`small` for a
    smoke run). Measured results: ``docs/results/lm.md``.

    Ranges (:attr:`RANGES`, checked on construction and on every assignment): sizes are
    bounded so the model can be allocated (its weights, and one layer's activations or logits of
    a batch, are at most 2**32 elements each; ``d_model`` divisible by ``n_heads``), learning
    rates lie in ``(0, 10]``, ``min_precision`` in ``[0, 1]``, ``1 <= k <= n_codes``."""

    RANGES: ClassVar[dict[str, Range]] = {
        "n_train_stories": Range(1, 10**7),
        "n_eval_stories": Range(1, 10**7),
        "vocab_size": Range(258, 2**20, what=">= 258 (256 bytes, the special token, a merge)"),
        "block_len": Range(2, 2**16),  # a next-token loss needs two tokens
        "n_layers": Range(1, 1024),
        "d_model": Range(1, 2**16),
        "n_heads": Range(1, 2**16),
        "d_mlp": Range(1, 2**20),
        "batch_size": Range(1, 2**20),
        "base_steps": Range(1, _MAX_STEPS),
        "base_lr": Range(0, 10, lo_open=True),
        "n_codes": Range(1, 2**31 - 1),
        "k": Range(1, 2**16),  # <= n_codes: validate()
        "codebook_steps": Range(1, _MAX_STEPS),
        "codebook_lr": Range(0, 10, lo_open=True),
        "min_count": Range(0, 2**53),
        "min_precision": Range(0, 1),
        "steer_per_head": Range(1, 2**16),  # <= k: validate()
        "n_samples": Range(1, 10**6),
        "n_baseline": Range(1, 10**6),
        "max_new_tokens": Range(1, 2**16),
        "seed": Range(-(2**62), 2**62),  # room for the per-stream offsets added to it
    }
    """Bounds of the numeric fields (``None`` in ``steer_per_head`` passes)."""

    n_train_stories: int = 40000
    """Training stories (about 45 tokens each)."""
    n_eval_stories: int = 1500
    """Held-out stories for losses and code attribution."""
    vocab_size: int = 1024
    """BPE vocabulary size (including the 256 bytes and the special token)."""
    block_len: int = 128
    """Tokens per training block (and the model's ``n_ctx``)."""
    n_layers: int = 2
    """Transformer blocks."""
    d_model: int = 96
    """Residual width."""
    n_heads: int = 4
    """Attention heads per block (``d_head = d_model / n_heads``)."""
    d_mlp: int = 384
    """MLP width."""
    batch_size: int = 32
    """Blocks per optimizer step."""
    base_steps: int = 500
    """Optimizer steps of base-model training."""
    base_lr: float = 3e-3
    """Peak learning rate of base-model training."""
    n_codes: int = 512
    """Codes per head."""
    k: int = 8
    """Codes active per head and position (the paper's k=8 for attention heads)."""
    codebook_steps: int = 200
    """Optimizer steps of codebook finetuning (model and codebooks together)."""
    codebook_lr: float = 1e-3
    """Peak learning rate of the codebooks (the model gets ``codebook_lr / 3``; as
    :attr:`TrainConfig.codebook_lr <codebook_lens.training.TrainConfig.codebook_lr>`)."""
    min_count: int = 20
    """Codes firing fewer times than this on the held-out set are not ranked."""
    min_precision: float = 0.0
    """A head takes part in steering a topic when its best code for the topic is at least this
    precise (0: every head)."""
    steer_per_head: int | None = None
    """Code slots per steering head overwritten with the head's best codes for the topic
    (default ``k // 2 + 1``; see :func:`~codebook_lens.lm.topic_steering_hooks`)."""
    steer_rank_by: RankBy = "f1"
    """How each head's steering codes are ranked: ``"f1"`` (precision and recall together; the
    default) or ``"precision"`` (see :func:`~codebook_lens.lm.topic_codes`)."""
    n_samples: int = 100
    """Steered samples per topic."""
    n_baseline: int = 800
    """Unsteered samples (shared by all topics)."""
    max_new_tokens: int = 48
    """Tokens generated per sample."""
    seed: int = 0
    """Seed of corpus, model initialisation, batches and sampling."""
    progress: bool = True
    """Show progress bars."""
    backend: Backend = "auto"
    """TransformerLens backend: ``"auto"`` (the default), ``"hooked"`` or ``"bridge"``."""

    def validate(self) -> None:
        """Cross-field rules and sizes that can be allocated (the :attr:`RANGES` are checked
        before this runs)."""
        if self.steer_per_head is not None and not 1 <= self.steer_per_head <= self.k:
            raise ValueError(
                f"LMDemoConfig: steer_per_head={self.steer_per_head} must lie in [1, k={self.k}] "
                "(or be None for k // 2 + 1)"
            )
        if self.k > self.n_codes:
            raise ValueError(
                f"LMDemoConfig: k={self.k} exceeds n_codes={self.n_codes}; choose k <= n_codes"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LMDemoConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        d, n_ctx = self.d_model, self.block_len
        weights = self.n_layers * (4 * d * d + 2 * d * self.d_mlp) + 2 * self.vocab_size * d
        acts = self.batch_size * n_ctx * max(self.d_mlp, self.n_heads * n_ctx, self.vocab_size)
        for what, n in (("the weights", weights), ("one layer's activations of a batch", acts)):
            if n > MAX_CODEBOOK_ELEMENTS:
                raise ValueError(
                    f"LMDemoConfig: {what} would hold {n} elements, over the limit of 2**32 = "
                    f"{MAX_CODEBOOK_ELEMENTS} (16 GiB of float32); make n_layers, d_model, "
                    "d_mlp, vocab_size, block_len or batch_size smaller"
                )

    @property
    def steer_slots(self) -> int:
        """Code slots overwritten per steering head: ``steer_per_head``, or ``k // 2 + 1``
        (5 of k=8: measured in ``docs/results/lm.md``), at most ``k``."""
        if self.steer_per_head is not None:
            return self.steer_per_head
        return min(self.k, self.k // 2 + 1)

    @classmethod
    def small(cls, **overrides: Any) -> LMDemoConfig:
        """A tiny configuration for smoke tests and ``--small``; ``overrides`` change fields."""
        base = dict(
            n_train_stories=3000,
            n_eval_stories=200,
            vocab_size=512,
            block_len=96,
            n_layers=1,
            d_model=64,
            n_heads=4,
            d_mlp=128,
            batch_size=16,
            base_steps=60,
            n_codes=64,
            k=4,
            codebook_steps=30,
            min_count=5,
            n_samples=8,
            n_baseline=16,
            max_new_tokens=24,
        )
        return cls(**{**base, **overrides})


def build_lm(tokenizer: Any, cfg: LMDemoConfig) -> nn.Module:
    """A randomly initialised TransformerLens model for ``tokenizer`` (seeded by ``cfg.seed``)
    on ``cfg.backend``."""
    model_cfg = dict(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
        d_mlp=cfg.d_mlp,
        n_ctx=cfg.block_len,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        seed=cfg.seed,
    )
    return build_model(model_cfg, cfg.backend, tokenizer=tokenizer)


@torch.no_grad()
def eval_loss(cm: CodebookModel, tokens: Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss of ``cm`` over ``tokens`` [n, pos] (eval mode)."""
    was = cm.training
    cm.eval()
    total, n = 0.0, 0
    for chunk in tokens.split(batch_size):
        loss = cm(chunk, return_type="loss")
        total += float(loss) * chunk.shape[0]
        n += chunk.shape[0]
    cm.train(was)
    return total / max(n, 1)


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    """Flat headline figures (what the CLI prints as a table)."""
    out: dict[str, Any] = {
        "loss_base": m["loss"]["base"],
        "loss_with_codebooks": m["loss"]["codebooks_after_finetuning"],
        "relative_loss_increase": m["loss"]["relative_increase"],
    }
    for topic, st in m["steering"].items():
        prec = m["topic_codes"][topic]["best_precision"]
        rate = st.get("steered_rate")
        out[f"{topic}: best code precision"] = prec
        out[f"{topic}: topic rate unsteered -> steered"] = (
            "n/a"
            if rate is None
            else f"{100 * st['unsteered_rate']:.1f}% -> {100 * rate:.1f}% ({st['ratio']:.1f}x)"
        )
    s = m["steering_summary"]
    out["topics steered >= 10x"] = f"{s['topics_with_10x']} of {s['n_topics']}"
    out["wall_time_s"] = m["wall_time_s"]
    return out


def _first(t: Tensor) -> float:
    return float(t[0, 0]) if t.numel() else 0.0


def _stage(timings: dict[str, float], name: str, t0: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - t0, 2)
    return now


@dataclass
class LMData:
    """The LM demo's data for one config: the training corpus and stream, and the labelled
    held-out blocks (the same for every run with the same ``seed``, sizes and tokenizer)."""

    texts: list[str]
    """The training stories' texts."""
    tokenizer: Any
    """The byte-level BPE tokenizer (trained on ``texts`` unless one was given)."""
    stream: BlockStream
    """Shuffled packed training blocks of ``block_len`` tokens, repeating."""
    eval_tokens: Int[Tensor, "block pos"]
    """Held-out stories packed into blocks."""
    eval_labels: Int[Tensor, "block pos"]
    """Topic id of every held-out token (``len(TOPICS)`` where a token has no topic)."""


def lm_data(cfg: LMDemoConfig, tokenizer: Any = None) -> LMData:
    """The corpus of ``cfg`` (seeded by ``cfg.seed``), a tokenizer trained on it unless
    ``tokenizer`` is given, the training stream and the labelled held-out blocks."""
    train = generate_stories(cfg.n_train_stories, StoryConfig(), seed=cfg.seed)
    held = generate_stories(cfg.n_eval_stories, StoryConfig(), seed=cfg.seed + 10_000)
    texts = [s.text for s in train]
    tok = tokenizer or train_bpe_tokenizer(texts, vocab_size=cfg.vocab_size)
    ids, labels = story_token_labels(tok, held)
    eval_tokens, eval_labels = pack_labelled_blocks(
        ids, labels, cfg.block_len, tok.bos_token_id, tok.eos_token_id
    )
    stream = BlockStream(
        texts, tok, cfg.block_len, cfg.batch_size, shuffle_buffer=64 * cfg.batch_size,
        seed=cfg.seed, repeat=True,
    )  # fmt: skip
    return LMData(texts, tok, stream, eval_tokens, eval_labels)


def train_base_lm(data: LMData, cfg: LMDemoConfig) -> tuple[CodebookModel, TrainResult]:
    """A fresh model of ``cfg`` trained with the next-token loss on ``data.stream`` (the demo's
    base model; codebooks are attached to it afterwards)."""
    cm = CodebookModel(build_lm(data.tokenizer, cfg))
    hist = train_codebooks(
        cm,
        data.stream,
        TrainConfig(
            steps=cfg.base_steps,
            lr=cfg.base_lr,
            warmup_steps=max(1, cfg.base_steps // 20),
            weight_decay=0.01,
            log_every=max(1, cfg.base_steps // 10),
            progress=cfg.progress,
            allow_no_codebooks=True,
        ),
    )
    return cm, hist


@dataclass
class _LMRun:
    """What the steps of :func:`run_lm_demo` produce, for the metrics."""

    data: LMData
    cm: CodebookModel | None = None
    sites: list[str] = field(default_factory=list)
    loss: dict[str, float] = field(default_factory=dict)
    base_hist: TrainResult | None = None
    cb_hist: TrainResult | None = None
    chosen: dict[int, TopicCodes] = field(default_factory=dict)
    best: dict[int, TopicCodes] = field(default_factory=dict)
    steering: dict[str, Any] = field(default_factory=dict)
    base_texts: list[str] = field(default_factory=list)
    base_model: nn.Module | None = None


def run_lm_demo(
    out_dir: Path | str,
    small: bool = False,
    config: LMDemoConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the LM demo end to end and write its results to ``out_dir``; returns the metrics.

    ``small=True`` uses :meth:`LMDemoConfig.small`; ``config`` replaces the defaults entirely;
    keyword ``overrides`` change single fields (e.g. ``base_steps=400``). Writes
    ``metrics.json``, ``report.md``, ``evaluation.json``, ``tokenizer/``, ``base_model/`` (the
    trained model before codebooks) and ``codebook_model/``.
    """
    cfg = config or (LMDemoConfig.small() if small else LMDemoConfig())
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = t = time.perf_counter()
    torch.manual_seed(cfg.seed)
    run = _LMRun(lm_data(cfg))
    save_tokenizer(run.data.tokenizer, out / "tokenizer")
    t = _stage(timings, "corpus_and_tokenizer", t)
    _base_step(run, cfg, out)
    t = _stage(timings, "base_training", t)
    _codebook_step(run, cfg, out)
    t = _stage(timings, "codebook_finetuning", t)
    _topic_step(run, cfg, out)
    t = _stage(timings, "topic_codes", t)
    _steering_step(run, cfg)
    t = _stage(timings, "steering", t)
    metrics = _metrics(run, cfg, timings)
    evaluation = evaluate_codebooks(
        run.cm, list(run.data.eval_tokens.split(cfg.batch_size)), base_model=run.base_model
    ).to_dict()  # held-out stories; after steering, so no measured step changes
    write_text(out / "evaluation.json", json.dumps(evaluation, indent=2))
    metrics["evaluation"] = evaluation["all"]
    metrics["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    metrics["summary"] = _summary(metrics)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    write_text(out / "report.md", render_report(metrics))
    return metrics


def _base_step(run: _LMRun, cfg: LMDemoConfig, out: Path) -> None:
    """2. The base model, trained with the next-token loss, and saved (``base_model/``) for
    comparisons on the same model (``python -m codebook_lens.compare``)."""
    run.cm, run.base_hist = train_base_lm(run.data, cfg)
    run.loss["base"] = eval_loss(run.cm, run.data.eval_tokens)
    with warnings.catch_warnings():  # the base, kept for the evaluation after finetuning
        warnings.simplefilter("ignore")
        run.base_model = copy.deepcopy(run.cm.model)
    CodebookModel(run.base_model).save(out / "base_model", include_model=True)


def _codebook_step(run: _LMRun, cfg: LMDemoConfig, out: Path) -> None:
    """3. Codebooks on every attention head: attached, initialised, finetuned, saved."""
    cm = run.cm
    assert cm is not None
    run.sites = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    for site in run.sites:
        cm.add_codebook(site, n_codes=cfg.n_codes, k=cfg.k, seed=cfg.seed)
    head = BlockStream(run.data.texts[:4000], run.data.tokenizer, cfg.block_len, 64)
    init_tokens = next(iter(head))
    cm.init_codebooks(init_tokens)
    with torch.no_grad():  # codes start as activations and the output sums k of them
        for cb in cm.codebooks.values():
            cb.codebook.div_(cb.cfg.k)
    run.loss["codebooks_at_attach"] = eval_loss(cm, run.data.eval_tokens)
    run.cb_hist = train_codebooks(
        cm,
        run.data.stream,
        TrainConfig(
            steps=cfg.codebook_steps,
            lr=cfg.codebook_lr / 3,
            codebook_lr=cfg.codebook_lr,
            warmup_steps=max(1, cfg.codebook_steps // 20),
            log_every=max(1, cfg.codebook_steps // 10),
            progress=cfg.progress,
        ),
    )
    run.loss["codebooks_after_finetuning"] = eval_loss(cm, run.data.eval_tokens)
    cm.save(out / "codebook_model", include_model=True)


def _topic_step(run: _LMRun, cfg: LMDemoConfig, out: Path) -> None:
    """4. Codes on held-out stories, ranked per topic: steering codes and best codes."""
    assert run.cm is not None
    eval_tokens, eval_labels = run.data.eval_tokens, run.data.eval_labels
    store = collect_codes(run.cm, eval_tokens, run.sites, progress=False)
    n_labels = len(TOPICS) + 1
    results: dict[str, AttributionResult] = attribution_by_site(
        store, eval_labels, run.sites, n_labels=n_labels
    )
    write_lm_browse_data(out, store, eval_labels, run.data.tokenizer, TOPICS)  # for `browse`
    run.chosen = {
        i: topic_codes(
            results, i, cfg.steer_slots, cfg.min_precision, cfg.min_count, by=cfg.steer_rank_by
        )
        for i in range(len(TOPICS))
    }
    run.best = {i: topic_codes(results, i, 1, 0.0, cfg.min_count, max_heads=1) for i in run.chosen}


def _steering_step(run: _LMRun, cfg: LMDemoConfig) -> None:
    """5. Unsteered samples, then samples with each topic's codes forced, classified by topic."""
    cm = run.cm
    assert cm is not None
    clf = TopicClassifier()
    run.base_texts = sample_texts(cm, PROMPT, cfg.n_baseline, cfg.max_new_tokens, seed=cfg.seed + 1)
    base_rates = clf.rates(run.base_texts)
    for i, topic in enumerate(TOPICS):
        codes = run.chosen[i]
        if codes.n_codes == 0:
            run.steering[topic] = {"n_heads": 0, "n_codes": 0, "steered_rate": None}
            continue
        texts_i = sample_texts(
            cm,
            PROMPT,
            cfg.n_samples,
            cfg.max_new_tokens,
            topic_steering_hooks(cm, codes),
            seed=cfg.seed + 2 + i,
        )
        about = clf.classify(texts_i)
        rate = float((about == i).float().mean())
        on_topic = (about == i).nonzero().flatten().tolist()
        floor = max(float(base_rates[i]), 1.0 / cfg.n_baseline)
        run.steering[topic] = {
            "n_heads": len(codes.heads),
            "n_codes": codes.n_codes,
            "steered_rate": rate,
            "unsteered_rate": float(base_rates[i]),
            "ratio": rate / floor,
            "example": texts_i[on_topic[0] if on_topic else 0],
            "example_on_topic": bool(on_topic),
        }


def _metrics(run: _LMRun, cfg: LMDemoConfig, timings: dict[str, float]) -> dict[str, Any]:
    """The metrics of a finished run (``metrics.json`` before the wall time and summary)."""
    assert run.base_hist is not None and run.cb_hist is not None
    ratios = [v["ratio"] for v in run.steering.values() if v.get("ratio") is not None]
    loss_base, loss_after = run.loss["base"], run.loss["codebooks_after_finetuning"]
    rel = (loss_after - loss_base) / loss_base
    return {
        "config": dataclasses.asdict(cfg),
        "loss": {
            **run.loss,
            "relative_increase": rel,
            "goal_max_relative_increase": 0.10,
            "goal_met": rel <= 0.10,
        },
        "topic_codes": {
            topic: {
                "best_precision": _first(run.best[i].precision),
                "best_recall": _first(run.best[i].recall),
                "best_code": run.best[i].to_dict()["heads"][:1],
                "steering_codes": run.chosen[i].to_dict()["heads"],
            }
            for i, topic in enumerate(TOPICS)
        },
        "steering": run.steering,
        "steering_summary": {
            "topics_with_10x": sum(r >= 10 for r in ratios),
            "n_topics": len(TOPICS),
            "goal_met": sum(r >= 10 for r in ratios) > len(TOPICS) / 2,
            "baseline_examples": run.base_texts[:3],
        },
        "training": {
            "base_final": run.base_hist.history[-1],
            "codebook_final": run.cb_hist.history[-1],
        },
        "timings_s": timings,
    }
