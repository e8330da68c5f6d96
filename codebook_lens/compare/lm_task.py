"""Codes against SAEs on the topic-stories language model, where every token has a topic label:
each topic's best feature (precision against the per-token labels) and topic steering (a topic's
features forced while sampling, the samples scored by the corpus's topic classifier).

Steering is the lm-demo's, for one dictionary at one site: at every position the dictionary's
``slots`` weakest active features are replaced by the topic's ``slots`` best features by F1. A
codebook's slots are ranked by similarity and its codes forced through the codebook itself
(:func:`~codebook_lens.lm.topic_steering_hooks`, the demo's code); an SAE's by activation, and
its features are set to their mean active value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer
from torch import Tensor

from codebook_lens.analysis import label_attribution
from codebook_lens.compare.splice import feature_store
from codebook_lens.lm.corpus import TOPICS, TopicClassifier
from codebook_lens.lm.steering import TopicCodes, sample_texts, topic_codes, topic_steering_hooks
from codebook_lens.model import CodebookModel
from codebook_lens.saelens import CodebookSAE, codebook_from_sae

__all__ = [
    "TopicFeatures",
    "SteeringSetup",
    "topic_features",
    "sae_steering_hook",
    "steered_rates",
]


@dataclass
class TopicFeatures:
    """A dictionary's features as topic detectors on labelled held-out tokens."""

    best_precision: list[float]
    """Per topic: the precision of its most precise feature (among features firing at least
    ``min_count`` times; the lm-demo's "best code precision")."""
    best_recall: list[float]
    """Per topic: that feature's recall."""
    steering: dict[int, TopicCodes]
    """Per topic: its steering features, the ``slots`` best by F1 (as the lm-demo ranks)."""

    def metrics(self) -> dict[str, Any]:
        """The JSON part: per-topic precision and recall, and their mean over topics."""
        return {
            "topic_precision": self.best_precision,
            "topic_recall": self.best_recall,
            "mean_topic_precision": sum(self.best_precision) / len(self.best_precision),
        }


@torch.no_grad()
def topic_features(
    model: HookedSAETransformer,
    sae: SAE,
    tokens: Int[Tensor, "block pos"],
    labels: Int[Tensor, "block pos"],
    slots: int,
    min_count: int,
) -> TopicFeatures:
    """Label attribution of ``sae``'s active features against the topic ``labels``
    (``len(TOPICS)`` = no topic), ranked per topic as the lm-demo ranks codes."""
    site = sae.cfg.metadata.hook_name
    store = feature_store(model, sae, tokens)
    results = {site: label_attribution(store, labels, site, n_labels=len(TOPICS) + 1)}
    best = [topic_codes(results, t, 1, 0.0, min_count, max_heads=1) for t in range(len(TOPICS))]
    return TopicFeatures(
        best_precision=[float(b.precision[0, 0]) if b.n_codes else 0.0 for b in best],
        best_recall=[float(b.recall[0, 0]) if b.n_codes else 0.0 for b in best],
        steering={
            t: topic_codes(results, t, slots, 0.0, min_count, by="f1") for t in range(len(TOPICS))
        },
    )


@dataclass
class SteeringSetup:
    """How steered samples are drawn (the lm-demo's prompt, lengths and seeds)."""

    prompt: str
    """The prompt every sample continues."""
    n_samples: int
    """Samples per topic."""
    max_new_tokens: int
    """Tokens generated per sample."""
    seed: int
    """Topic ``t`` samples with seed ``seed + 2 + t`` (the lm-demo's seeds)."""


def sae_steering_hook(
    sae: SAE, chosen: TopicCodes, means: Float[Tensor, " d_sae"]
) -> Callable[..., Tensor]:
    """A ``hook_sae_acts_post`` hook for a TopK ``sae``: at every position the ``n`` weakest of
    the k strongest features are zeroed and ``chosen``'s ``n`` features (its first head's) set
    to their ``means``."""
    feats = chosen.codes[0][chosen.codes[0] >= 0]
    k, values = int(sae.cfg.k), means[feats]

    def force(acts: Tensor, hook: Any) -> Tensor:
        weakest = acts.topk(k, dim=-1).indices[..., k - len(feats) :]
        acts = acts.scatter(-1, weakest, 0.0)
        acts[..., feats] = values.to(acts)
        return acts

    return force


@torch.no_grad()
def steered_rates(
    model: HookedSAETransformer,
    sae: SAE,
    features: TopicFeatures,
    means: Float[Tensor, " d_sae"],
    setup: SteeringSetup,
) -> list[float]:
    """Per topic: the share of samples the topic classifier assigns to the topic while the
    topic's features are forced (``sae`` spliced into ``model`` at its site; 0 for a topic with
    no feature)."""
    site, clf, rates = sae.cfg.metadata.hook_name, TopicClassifier(), []
    cm = CodebookModel(model)
    is_codebook = isinstance(sae, CodebookSAE)
    if is_codebook:
        cm.add_codebook(site, codebook_from_sae(sae))
    else:
        model.add_sae(sae)
    try:
        for t, chosen in features.steering.items():
            if chosen.n_codes == 0:
                rates.append(0.0)
                continue
            if is_codebook:
                hooks = topic_steering_hooks(cm, chosen)
            else:
                hooks = [(f"{site}.hook_sae_acts_post", sae_steering_hook(sae, chosen, means))]
            texts = sample_texts(cm, setup.prompt, setup.n_samples, setup.max_new_tokens, hooks,
                                 seed=setup.seed + 2 + t)  # fmt: skip
            rates.append(float((clf.classify(texts) == t).float().mean()))
    finally:
        cm.detach()
        model.reset_saes()
    return rates
