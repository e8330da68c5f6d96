"""Views of codes: props carry the right values; mismatched inputs fail with clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from codebook_lens.viz.codes import (
    attention_with_codes_view,
    code_color,
    code_fires,
    code_tokens_view,
    codes_grid_view,
    contexts_from_windows,
    top_contexts_view,
    which_code_view,
)
from codebook_lens.viz.offline import CircuitsVisPart, HtmlPart, View

TOKENS = ["<s>", "1", "2", "1", "3"]
# [pos=5, head=2, k=2]; -1 is an empty slot
PER_HEAD = torch.tensor(
    [
        [[7, 1], [2, 3]],
        [[7, 7], [7, 3]],
        [[4, 1], [5, -1]],
        [[1, 2], [7, 0]],
        [[9, 9], [9, 9]],
    ]
)


def _cv(view: View) -> list[tuple[str, dict]]:
    return [
        (p.component, json.loads(p.props_json))
        for p in view.parts
        if isinstance(p, CircuitsVisPart)
    ]


def _html(view: View) -> str:
    return "".join(p.html for p in view.parts if isinstance(p, HtmlPart))


def test_code_fires_counts_heads_once_per_head():
    assert code_fires(PER_HEAD, 7).tolist() == [1, 2, 0, 1, 0]  # (7,7) at one head counts once
    assert code_fires(PER_HEAD, 7, head=1).tolist() == [0, 1, 0, 1, 0]
    assert code_fires(PER_HEAD, 7, head=-2).tolist() == [1, 1, 0, 0, 0]
    assert code_fires(PER_HEAD[:, 0], 1).tolist() == [1, 0, 1, 1, 0]  # [pos, k] site
    with pytest.raises(IndexError, match="head 2 out of range.*2 head"):
        code_fires(PER_HEAD, 7, head=2)


def test_code_tokens_view_single_code():
    v = code_tokens_view(TOKENS, PER_HEAD, 7)
    ((comp, props),) = _cv(v)
    assert comp == "ColoredTokens"
    assert props["tokens"] == TOKENS
    assert props["values"] == [1.0, 2.0, 0.0, 1.0, 0.0]
    assert props["minValue"] == 0.0 and props["maxValue"] == 2.0  # two heads
    assert "code 7: 3 of 5 tokens" in _html(v)
    ((_, props),) = _cv(code_tokens_view(TOKENS, PER_HEAD, 7, head=1))
    assert props["values"] == [0.0, 1.0, 0.0, 1.0, 0.0] and props["maxValue"] == 1.0


def test_code_tokens_view_several_codes_is_multi():
    ((comp, props),) = _cv(code_tokens_view(TOKENS, PER_HEAD[:, 0], [7, 1]))
    assert comp == "ColoredTokensMulti"
    assert props["labels"] == ["code 7", "code 1"]
    assert props["values"] == [[1, 1], [1, 0], [0, 1], [0, 1], [0, 0]]


@pytest.mark.parametrize(
    "tokens, codes, match",
    [
        (TOKENS[:4], PER_HEAD, "tokens_str has 4 tokens but codes has 5 positions"),
        (TOKENS, PER_HEAD[None], "codes\\[0\\]"),
        (TOKENS, PER_HEAD[:, 0, 0], r"\[pos, k\] or \[pos, head, k\]"),
    ],
)
def test_length_and_shape_errors_name_both_sizes(tokens, codes, match):
    # TypeError: the run-time shape check (jaxtyping, on in the test run) may see it first
    errors = (ValueError, TypeError) if codes.ndim < 2 else ValueError
    for fn in (
        lambda: code_tokens_view(tokens, codes, 1),
        lambda: which_code_view(tokens, codes),
        lambda: codes_grid_view(tokens, codes),
    ):
        with pytest.raises(errors, match=match if errors is ValueError else None):
            fn()


def test_tokens_must_be_strings():
    with pytest.raises(TypeError, match="list of token strings"):
        code_tokens_view("<s>1213", PER_HEAD, 1)


def test_which_code_view_grid_and_most_frequent_buttons():
    v = which_code_view(TOKENS, PER_HEAD, max_codes=3)
    ((comp, props),) = _cv(v)
    assert comp == "ColoredTokensMulti"
    # counts: 7 x5 (incl. duplicate slot), 9 x4, 1 x3, 3 x2, 2 x2, ...
    assert props["labels"] == ["code 7", "code 9", "code 1"]
    assert [row[0] for row in props["values"]] == [1, 2, 0, 1, 0]
    grid = _html(v)
    assert grid.count("<tr>") == 1 + 2 * 2  # header + head x slot rows
    assert f'background:{code_color(5)}" title="pos 2 &#x27;2&#x27;, H1: code 5">5</td>' in grid
    assert "rarer codes not shown" in grid
    with pytest.raises(ValueError, match="no code fires"):
        which_code_view(TOKENS, torch.full((5, 1), -1))


def test_grid_escapes_tokens_and_blanks_empty_slots():
    html = _html(codes_grid_view(["<b>", "&"], torch.tensor([[3], [-1]])))
    assert "<code>&lt;b&gt;</code>" in html and "<code>&amp;</code>" in html
    assert f'background:{code_color(-1)}"' in html and 'code -1"></td>' in html
    with pytest.raises(ValueError, match="head_labels has 1 names but codes has 2"):
        codes_grid_view(TOKENS, PER_HEAD, head_labels=["a"])


def test_code_color_distinguishes_neighbours():
    assert len({code_color(i) for i in range(50)}) == 50
    assert code_color(-1) == "hsl(0, 0%, 93%)"


def test_top_contexts_view_props_and_validation():
    ctx = [[["a", "b"], ["c"]], [["d", "e", "f"]]]
    vals = [[[0.0, 1.0], [1.0]], [[0.0, 1.0, 0.0]]]
    ((comp, props),) = _cv(top_contexts_view(ctx, vals, ["code 1", "code 2"], site="s"))
    assert comp == "TopkSamples"
    assert props["tokens"] == [ctx] and props["activations"] == [vals]
    assert props["firstDimensionLabels"] == ["code 1", "code 2"]
    assert props["zerothDimensionLabels"] == ["s"]
    with pytest.raises(ValueError, match="example 0: 2 tokens but 1 values"):
        top_contexts_view([[["a", "b"]]], [[[1.0]]], ["c"])
    with pytest.raises(ValueError, match="one entry per code"):
        top_contexts_view(ctx, vals, ["only one"])
    with pytest.raises(ValueError, match="no examples"):
        top_contexts_view([[]], [[]], ["c"])


def test_contexts_from_windows():
    vocab = ["a", "b", "c"]
    ctx = torch.tensor([[-1, 0, 1], [2, 2, 0]])
    toks, vals = contexts_from_windows(ctx, before=1, vocab=vocab)
    assert toks == [["a", "b"], ["c", "c", "a"]]
    assert vals == [[1.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="outside the vocab"):
        contexts_from_windows(torch.tensor([[5]]), 0, vocab)
    with pytest.raises(ValueError, match="outside windows"):
        contexts_from_windows(ctx, 3, vocab)


def test_attention_with_codes_view():
    pattern = torch.softmax(torch.randn(2, 5, 5), -1)
    v = attention_with_codes_view(pattern, PER_HEAD, TOKENS)
    ((comp, props),) = _cv(v)
    assert comp == "AttentionHeads"
    torch.testing.assert_close(torch.tensor(props["attention"]), pattern)
    assert props["attentionHeadNames"] == ["H0", "H1"] and props["maskUpperTri"] is True
    assert _html(v).count("<tr>") == 5
    with pytest.raises(ValueError, match="pattern has 3 heads but codes has 2"):
        attention_with_codes_view(torch.rand(3, 5, 5), PER_HEAD, TOKENS)
    with pytest.raises(ValueError, match=r"q = k = len\(tokens_str\) = 4; got shape \(2, 5, 5\)"):
        attention_with_codes_view(pattern, PER_HEAD[:4], TOKENS[:4])
    with pytest.raises((ValueError, TypeError)):  # "per-head" (or the run-time shape check)
        attention_with_codes_view(pattern, PER_HEAD[:, 0], TOKENS)
