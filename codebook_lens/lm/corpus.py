"""The "topic stories" corpus: short children's stories from a small grammar with known topics.

Every story opens with a generic sentence. A fraction ``p_topic`` of stories then switch to one
of eight topics (dragons, the sea, a castle, cooking, space, the forest, a farm, music) after a
few generic sentences and stay on it; the others stay generic. Each sentence carries its topic,
so every token has a ground-truth label, and :class:`TopicClassifier` (built from the grammar's
topic-unique words) says what a generated text is about. With the default ``p_topic=0.2`` each
topic starts 2.5% of stories, the paper's base rate for "dragon" stories in TinyStories.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from codebook_lens.lm.grammar import (
    GENERIC,
    NAMES,
    OPENER,
    SWITCH,
    TOPIC_LEXICON,
    TOPICAL_TEMPLATES,
)

__all__ = [
    "TOPICS",
    "StoryConfig",
    "Story",
    "generate_stories",
    "story_token_labels",
    "TopicClassifier",
]

TOPICS: tuple[str, ...] = tuple(TOPIC_LEXICON)
"""Topic names; a topic's id is its index here."""

_NAME_LIST = sorted(NAMES)


@dataclass
class StoryConfig:
    """How stories are sampled from the grammar."""

    p_topic: float = 0.2
    """Probability that a story switches to a topic (uniform over the topics)."""

    generic_before: tuple[int, int] = (0, 2)
    """Inclusive range of generic sentences between the opener and the topic switch."""

    topical_sentences: tuple[int, int] = (3, 5)
    """Inclusive range of topical sentences after the switch (the switch included)."""

    generic_sentences: tuple[int, int] = (4, 6)
    """Inclusive range of sentences after the opener in a generic story."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_topic <= 1.0:
            raise ValueError(f"StoryConfig: p_topic must lie in [0, 1], got {self.p_topic}")
        for name in ("generic_before", "topical_sentences", "generic_sentences"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"StoryConfig: {name}=({lo}, {hi}) must satisfy 0 <= lo <= hi")
        if self.topical_sentences[0] < 1:
            raise ValueError("StoryConfig: topical_sentences must start at >= 1 (the switch)")


@dataclass
class Story:
    """One story with its per-sentence topics."""

    text: str
    """The story: its sentences joined by single spaces."""

    topic: int
    """The story's topic id (index into :data:`TOPICS`), or -1 for a generic story."""

    sentence_starts: list[int]
    """Character offset where each sentence's region begins (the space before it, or 0)."""

    sentence_topics: list[int]
    """Topic id of each sentence, -1 for a generic sentence."""


def _character(rng: random.Random) -> dict[str, str]:
    name, friend = rng.sample(_NAME_LIST, 2)
    pron = NAMES[name]
    she = pron == "she"
    return {
        "name": name,
        "Name": name,
        "friend": friend,
        "Friend": friend,
        "pron": pron,
        "Pron": pron.capitalize(),
        "poss": "her" if she else "his",
        "obj": "her" if she else "him",
        "kid": "girl" if she else "boy",
    }


def _generic_sentence(rng: random.Random, who: dict[str, str]) -> str:
    action = rng.choice(GENERIC["actions"]).format(**who)
    adj = rng.choice(GENERIC["adjs"])
    return rng.choice(GENERIC["templates"]).format(action=action, adj=adj, **who)


def _topical_sentence(rng: random.Random, who: dict[str, str], lex: dict[str, Any]) -> str:
    n1, n2 = rng.sample(lex["nouns"], 2)
    a1, a2 = rng.sample(lex["adjs"], 2)
    return rng.choice(TOPICAL_TEMPLATES).format(
        noun=n1,
        noun2=n2,
        tadj=a1,
        tadj2=a2,
        taction=rng.choice(lex["actions"]),
        event=rng.choice(lex["events"]),
        **who,
    )


def _story(rng: random.Random, cfg: StoryConfig) -> Story:
    who = _character(rng)
    opener = OPENER.format(adj=rng.choice(GENERIC["adjs"]), **who)
    sentences = [opener]
    topics = [-1]
    topic = rng.randrange(len(TOPICS)) if rng.random() < cfg.p_topic else -1
    if topic < 0:
        n = rng.randint(*cfg.generic_sentences)
        sentences += [_generic_sentence(rng, who) for _ in range(n)]
        topics += [-1] * n
    else:
        lex = TOPIC_LEXICON[TOPICS[topic]]
        g = rng.randint(*cfg.generic_before)
        sentences += [_generic_sentence(rng, who) for _ in range(g)]
        sentences.append(SWITCH.format(action=rng.choice(lex["actions"]), **who))
        n = rng.randint(*cfg.topical_sentences) - 1
        sentences += [_topical_sentence(rng, who, lex) for _ in range(n)]
        topics += [-1] * g + [topic] * (n + 1)
    starts, end = [0], len(sentences[0])
    for s in sentences[1:]:  # the region of a later sentence begins at the space before it
        starts.append(end)
        end += 1 + len(s)
    return Story(" ".join(sentences), topic, starts, topics)


def generate_stories(n: int, cfg: StoryConfig | None = None, seed: int = 0) -> list[Story]:
    """``n`` stories sampled from the grammar (deterministic given ``seed``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cfg = cfg or StoryConfig()
    rng = random.Random(seed)
    return [_story(rng, cfg) for _ in range(n)]


def story_token_labels(
    tokenizer: Any, stories: Sequence[Story]
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each story (no special tokens) and each token's label.

    Labels are topic ids for tokens of topical sentences and ``len(TOPICS)`` (the "generic"
    class) for tokens of generic sentences, found from the tokenizer's character offsets, so
    they hold for any fast Hugging Face tokenizer.
    """
    if not stories:
        return [], []
    enc = tokenizer(
        [s.text for s in stories], add_special_tokens=False, return_offsets_mapping=True
    )
    generic = len(TOPICS)
    all_ids, all_labels = [], []
    for s, ids, offs in zip(stories, enc["input_ids"], enc["offset_mapping"]):
        start = torch.tensor([o[0] for o in offs], dtype=torch.long)
        bounds = torch.tensor(s.sentence_starts, dtype=torch.long)
        sent = torch.searchsorted(bounds, start, right=True) - 1
        topics = torch.tensor(s.sentence_topics, dtype=torch.long)
        lab = topics[sent.clamp_min(0)]
        all_ids.append(list(ids))
        all_labels.append(torch.where(lab < 0, generic, lab).tolist())
    return all_ids, all_labels


_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


class TopicClassifier:
    """Says which topic a text is about, from the grammar's topic-unique words.

    A word is a marker of topic ``t`` if it occurs in ``t``'s lexicon and nowhere else in the
    grammar (other topics, generic sentences, names). A text is about ``t`` when it holds at
    least ``min_hits`` occurrences of ``t``'s markers and more than of any other topic's;
    otherwise it is about no topic (-1).
    """

    def __init__(self, min_hits: int = 2):
        if min_hits < 1:
            raise ValueError(f"min_hits must be >= 1, got {min_hits}")
        self.min_hits = min_hits
        shared: set[str] = set()
        for v in GENERIC.values():
            for phrase in v:
                shared |= _words(phrase)
        for phrase in (OPENER, SWITCH, *TOPICAL_TEMPLATES, *NAMES):
            shared |= _words(phrase)
        per_topic = {
            t: set().union(*(_words(p) for v in lex.values() for p in v))
            for t, lex in TOPIC_LEXICON.items()
        }
        counts: dict[str, int] = {}
        for ws in per_topic.values():
            for w in ws:
                counts[w] = counts.get(w, 0) + 1
        self.markers: dict[str, frozenset[str]] = {
            t: frozenset(w for w in ws if counts[w] == 1 and w not in shared)
            for t, ws in per_topic.items()
        }
        self._index = {w: i for i, t in enumerate(TOPICS) for w in self.markers[t]}

    def counts(self, texts: Sequence[str]) -> Int[Tensor, "n n_topics"]:
        """Occurrences of each topic's marker words in each text."""
        rows, cols = [], []
        for r, text in enumerate(texts):
            hits = [self._index[w] for w in _WORD.findall(text.lower()) if w in self._index]
            rows += [r] * len(hits)
            cols += hits
        out = torch.zeros(len(texts) * len(TOPICS), dtype=torch.long)
        if rows:
            flat = torch.tensor(rows) * len(TOPICS) + torch.tensor(cols)
            out += torch.bincount(flat, minlength=out.numel())
        return out.view(len(texts), len(TOPICS))

    def classify(self, texts: Sequence[str]) -> Int[Tensor, " n"]:
        """Topic id of each text, or -1 when it is about no topic."""
        c = self.counts(texts)
        if c.shape[0] == 0:
            return torch.empty(0, dtype=torch.long)
        top2 = c.topk(2, dim=-1)
        best = top2.indices[:, 0]
        ok = (top2.values[:, 0] >= self.min_hits) & (top2.values[:, 0] > top2.values[:, 1])
        return torch.where(ok, best, torch.full_like(best, -1))

    def rates(self, texts: Sequence[str]) -> Tensor:
        """Fraction of texts about each topic, ``[n_topics]`` (float)."""
        lab = self.classify(texts)
        if lab.numel() == 0:
            return torch.zeros(len(TOPICS))
        hit = lab[lab >= 0]
        return torch.bincount(hit, minlength=len(TOPICS)).float() / lab.numel()
