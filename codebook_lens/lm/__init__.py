"""Language models: a local BPE tokenizer, the topic-stories corpus, topic codes and steering,
and the ``lm-demo`` pipeline (:func:`run_lm_demo`).

Nothing here downloads anything: the tokenizer is trained locally and the corpus is generated
from a grammar, so the whole path runs offline. The same functions work on a model loaded with
``HookedTransformer.from_pretrained`` and its own tokenizer.
"""

from codebook_lens.lm.corpus import (
    TOPICS,
    Story,
    StoryConfig,
    TopicClassifier,
    generate_stories,
    story_token_labels,
)
from codebook_lens.lm.demo import LMDemoConfig, build_lm, eval_loss, run_lm_demo
from codebook_lens.lm.steering import TopicCodes, sample_texts, topic_codes, topic_steering_hooks
from codebook_lens.lm.tokenizer import (
    SPECIAL_TOKEN,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
    wrap_tokenizer,
)

__all__ = [
    "TOPICS",
    "Story",
    "StoryConfig",
    "TopicClassifier",
    "generate_stories",
    "story_token_labels",
    "LMDemoConfig",
    "run_lm_demo",
    "build_lm",
    "eval_loss",
    "TopicCodes",
    "topic_codes",
    "topic_steering_hooks",
    "sample_texts",
    "SPECIAL_TOKEN",
    "train_bpe_tokenizer",
    "wrap_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
]
