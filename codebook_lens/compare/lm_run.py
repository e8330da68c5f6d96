"""The codes-versus-SAEs experiment on the topic-stories language model: the lm-demo is run once
(its base model, frozen, carries every dictionary; its finetuned per-head codebooks are the
paper-setting row), then every dictionary of :class:`LMCompareConfig` at every site and seed is
trained and measured: reconstruction, each topic's best feature, and topic steering."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from codebook_lens.compare.dictionaries import (
    DictionarySpec,
    as_sae_model,
    save_sae,
    train_dictionary,
)
from codebook_lens.compare.grid import DictionaryGrid, run_grid, write_results
from codebook_lens.compare.lm_task import SteeringSetup, steered_rates, topic_features
from codebook_lens.compare.splice import mean_active_values, splice_metrics
from codebook_lens.lm.corpus import TOPICS, TopicClassifier
from codebook_lens.lm.demo import PROMPT, LMData, LMDemoConfig, lm_data, run_lm_demo
from codebook_lens.lm.steering import sample_texts
from codebook_lens.lm.tokenizer import load_tokenizer
from codebook_lens.model import CodebookModel
from codebook_lens.validation import Range

__all__ = ["LMCompareConfig", "compare_lm", "cached_lm_demo"]


def _demo_config() -> LMDemoConfig:
    return LMDemoConfig(progress=False)


@dataclass
class LMCompareConfig(DictionaryGrid):
    """Settings of the topic-stories comparison."""

    RANGES: ClassVar[dict[str, Range]] = {
        **DictionaryGrid.RANGES,
        "n_samples": Range(1, 10**6),
        "n_baseline": Range(1, 10**6),
    }
    """Bounds of the numeric fields."""

    lm: LMDemoConfig = field(default_factory=_demo_config)
    """The lm-demo's settings: corpus, base model, its finetuned codebooks, steering prompt."""

    width: int = 1024
    """Dictionary width of the matched pair (the demo has 512 codes per head, 4 heads)."""

    k: int = 8
    """Active features of the matched pair (the demo's k per head)."""

    large_k: int = 32
    """The SAE with a larger k."""

    n_samples: int = 50
    """Steered samples per topic and dictionary."""

    n_baseline: int = 800
    """Unsteered samples of the base model (shared by all dictionaries)."""

    @classmethod
    def small(cls) -> LMCompareConfig:
        """A minutes-long version on a tiny topic-stories model, one site (for the tests)."""
        lm = LMDemoConfig.small(
            n_train_stories=800, n_eval_stories=150, base_steps=20, codebook_steps=10,
            n_samples=4, n_baseline=8, max_new_tokens=12, progress=False,
        )  # fmt: skip
        return cls(
            lm=lm, sites=["blocks.0.hook_resid_post"], width=32, k=4, wide_factor=2, large_k=8,
            train_tokens=20_000, n_samples=4, n_baseline=16, seeds=[0],
        )  # fmt: skip


def cached_lm_demo(cfg: LMDemoConfig, cache_dir: Path) -> Path:
    """The lm-demo's output directory for ``cfg`` under ``cache_dir``, run there first unless a
    finished run (its ``metrics.json``) is already there."""
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"lm-demo-{key}"
    if not (path / "metrics.json").exists():
        run_lm_demo(path, config=cfg)
    return path


def _train_tokens(data: LMData, n_tokens: int) -> Tensor:
    """The first ``n_tokens`` (rounded up to whole batches) of the demo's training stream."""
    batches, total = [], 0
    for batch in data.stream:
        batches.append(batch)
        total += batch.numel()
        if total >= n_tokens:
            return torch.cat(batches)
    raise ValueError("the training stream ended early")  # it repeats: unreachable


def _baseline(model, cfg: LMCompareConfig) -> list[float]:
    """Per topic: the base model's unsteered topic rate (the lm-demo's prompt and seed)."""
    cm = CodebookModel(model)
    try:
        n, new_tokens, seed = cfg.n_baseline, cfg.lm.max_new_tokens, cfg.lm.seed + 1
        texts = sample_texts(cm, PROMPT, n, new_tokens, seed=seed)
    finally:
        cm.detach()
    return TopicClassifier().rates(texts).tolist()


def _measure(model, cfg: LMCompareConfig, spec, data, base_rates, out: Path) -> dict[str, Any]:
    train, eval_tokens, eval_labels = data
    t0 = time.perf_counter()
    sae = train_dictionary(model, train, spec)
    trained = time.perf_counter() - t0
    save_sae(sae, out / "saes" / spec.site / spec.dirname)
    slots = min(spec.k, spec.k // 2 + 1)
    feats = topic_features(model, sae, eval_tokens, eval_labels, slots, cfg.lm.min_count)
    means = mean_active_values(model, sae, eval_tokens)
    setup = SteeringSetup(PROMPT, cfg.n_samples, cfg.lm.max_new_tokens, cfg.lm.seed)
    rates = steered_rates(model, sae, feats, means, setup)
    floor = 1.0 / cfg.n_baseline
    ratios = [r / max(b, floor) for r, b in zip(rates, base_rates)]
    return {
        "spec": spec.to_dict(),
        "name": spec.name,
        **splice_metrics(model, sae, list(eval_tokens.split(32))),
        **feats.metrics(),
        "steered_rate": rates,
        "steer_ratio": ratios,
        "topics_steered": sum(r >= 10 for r in ratios),
        "train_seconds": trained,
        "seconds": time.perf_counter() - t0,
    }


def _paper_setting(demo: Path) -> dict[str, Any]:
    """The lm-demo's finetuned codebooks (every head of every layer, model finetuned too)."""
    m = json.loads((demo / "metrics.json").read_text())
    steer = [m["steering"][t] for t in TOPICS]
    precision = [m["topic_codes"][t]["best_precision"] for t in TOPICS]
    return {
        "sites": [f"blocks.{i}.attn.hook_z" for i in range(m["config"]["n_layers"])],
        "topic_precision": precision,
        "mean_topic_precision": sum(precision) / len(precision),
        "steered_rate": [s.get("steered_rate") for s in steer],
        "steer_ratio": [s.get("ratio") for s in steer],
        "topics_steered": m["steering_summary"]["topics_with_10x"],
        "relative_loss_increase": m["loss"]["relative_increase"],
        "evaluation": m["evaluation"],
    }


def compare_lm(cfg: LMCompareConfig, out: Path, cache_dir: Path, log=print) -> dict[str, Any]:
    """Run the comparison (:func:`~codebook_lens.compare.grid.run_grid`: ``out/results.json``
    after every dictionary), the paper-setting row from the lm-demo's own metrics. Returns what
    it wrote."""
    t0 = time.perf_counter()
    demo = cached_lm_demo(cfg.lm, cache_dir)
    tok = load_tokenizer(demo / "tokenizer")
    base = CodebookModel.load(demo / "base_model", backend="hooked").detach()
    model = as_sae_model(base, tokenizer=tok)
    lm = lm_data(cfg.lm, tokenizer=tok)
    data = (_train_tokens(lm, cfg.train_tokens), lm.eval_tokens, lm.eval_labels)
    result: dict[str, Any] = {"config": cfg.to_dict(), "topics": list(TOPICS), "runs": []}
    result |= {"torch_threads": torch.get_num_threads(), "demo_seconds": time.perf_counter() - t0}
    result["paper_setting"] = _paper_setting(demo)
    result["unsteered_rate"] = base_rates = _baseline(model, cfg)

    def measure(spec: DictionarySpec) -> dict[str, Any]:
        return _measure(model, cfg, spec, data, base_rates, out)

    run_grid(cfg, measure, result, out, t0, log)
    write_results(result, out, t0)
    return result
