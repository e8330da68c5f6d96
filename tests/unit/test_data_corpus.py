"""The topic-stories grammar: determinism, topic rates, per-token labels and the classifier."""

from __future__ import annotations

import pytest
import torch

from codebook_lens.lm.corpus import (
    TOPICS,
    StoryConfig,
    TopicClassifier,
    generate_stories,
    story_token_labels,
)


def test_stories_are_deterministic_with_known_topic_rates():
    a = generate_stories(4000, seed=5)
    assert [s.text for s in a[:50]] == [s.text for s in generate_stories(50, seed=5)]
    assert [s.text for s in generate_stories(20, seed=6)] != [s.text for s in a[:20]]
    topics = torch.tensor([s.topic for s in a])
    assert abs(float((topics >= 0).float().mean()) - 0.2) < 0.03
    per = torch.bincount(topics[topics >= 0], minlength=len(TOPICS)).float() / len(a)
    assert (per > 0.01).all() and (per < 0.04).all()


def test_sentence_topics_follow_the_grammar():
    for s in generate_stories(300, seed=1):
        assert s.text.startswith("Once upon a time")
        assert s.sentence_topics[0] == -1
        assert len(s.sentence_starts) == len(s.sentence_topics)
        assert set(s.sentence_topics) <= {-1, s.topic}
        if s.topic >= 0:  # generic sentences, then the topic for the rest of the story
            first = s.sentence_topics.index(s.topic)
            assert all(t == s.topic for t in s.sentence_topics[first:])
            assert s.text[s.sentence_starts[first] :].startswith(" One day,")


def test_config_is_validated():
    with pytest.raises(ValueError, match="p_topic"):
        StoryConfig(p_topic=1.5)
    with pytest.raises(ValueError, match="lo <= hi"):
        StoryConfig(generic_before=(3, 1))
    assert all(s.topic == -1 for s in generate_stories(50, StoryConfig(p_topic=0.0)))


def test_classifier_recovers_every_story_topic():
    clf = TopicClassifier()
    for t in TOPICS:  # markers are unique to their topic
        others = set().union(*(clf.markers[o] for o in TOPICS if o != t))
        assert clf.markers[t] and not clf.markers[t] & others
    stories = generate_stories(1000, seed=2)
    got = clf.classify([s.text for s in stories])
    assert torch.equal(got, torch.tensor([s.topic for s in stories]))
    assert clf.classify(["The dragon saw a cave."]).tolist() == [0]
    assert clf.classify(["The dragon met a whale."]).tolist() == [-1]  # a tie is no topic
    assert clf.classify([]).shape == (0,)
    rates = clf.rates(["The dragon cave.", "nothing", "ship and ocean"])
    assert rates[0] == pytest.approx(1 / 3) and rates[1] == pytest.approx(1 / 3)


def test_token_labels_follow_sentences():
    """Labels from offsets match the labels of the words each token comes from."""
    stories = [s for s in generate_stories(200, seed=3) if s.topic >= 0][:20]

    class WordTokenizer:  # a fast-tokenizer-like object: one token per word with offsets
        def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
            import re

            ids, offs = [], []
            for t in texts:
                spans = [(m.start(), m.end()) for m in re.finditer(r" ?[^ ]+", t)]
                ids.append([len(t[a:b]) for a, b in spans])
                offs.append(spans)
            return {"input_ids": ids, "offset_mapping": offs}

    ids, labels = story_token_labels(WordTokenizer(), stories)
    generic = len(TOPICS)
    for s, lab in zip(stories, labels):
        words = s.text.split(" ")
        want = []
        for i, (start, t) in enumerate(zip(s.sentence_starts, s.sentence_topics)):
            end = s.sentence_starts[i + 1] if i + 1 < len(s.sentence_starts) else len(s.text)
            n = len(s.text[start:end].split())
            want += [generic if t < 0 else t] * n
        assert lab == want
        assert len(lab) == len(words)
