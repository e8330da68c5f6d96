"""Offline circuitsvis views: the local bundle is inlined (once), never the CDN."""

from __future__ import annotations

import json
import urllib.request
from html.parser import HTMLParser

import circuitsvis as cv
import pytest
import torch

from codebook_lens.viz.offline import (
    CircuitsVisPart,
    View,
    bundle_js,
    circuitsvis_view,
    from_circuitsvis,
    html_view,
    script_json,
    write_atomic,
)
from codebook_lens.viz.report import external_refs

BUNDLE_MARK = "var CircuitsVis="


def test_bundle_is_the_local_file_made_safe_for_script():
    js = bundle_js()
    assert js.startswith('"use strict";var CircuitsVis=')
    assert len(js) > 1_000_000
    assert "</script" not in js.lower()
    assert "<\\/script>" in js  # React's innerHTML="<script></script>" kept as the same string
    assert "sourceMappingURL" not in js


def test_script_json_escapes_html_and_converts_tensors():
    s = script_json(
        {"tokens": ["</script><b>", "a&b", "\u2028"], "v": torch.tensor([1, 2]), "n": None}
    )
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"tokens": ["</script><b>", "a&b", "\u2028"], "v": [1, 2]}
    with pytest.raises(ValueError, match="non-finite"):
        script_json({"v": torch.tensor([1.0, float("nan")])})


def test_standalone_page_inlines_bundle_once_and_no_cdn():
    tokens = ["Hello", " </script>", " wörld"]
    view = circuitsvis_view("ColoredTokens", tokens=tokens, values=[0.0, 1.0, 0.5])
    view = view + circuitsvis_view("ColoredTokens", tokens=["x"], values=[1.0])
    page = view.to_html(title="t <1>")
    assert page.count(BUNDLE_MARK) == 1
    assert "unpkg" not in page and "cdn.js" not in page
    assert external_refs(page) == []
    assert "<title>t &lt;1&gt;</title>" in page
    # the token strings are in the props (JSON-escaped for <script>)
    props = json.loads(view.parts[0].props_json)
    assert props["tokens"] == tokens
    assert view.parts[0].props_json in page
    assert '"Hello"' in page and "w\u00f6rld" in page


class _Divs(HTMLParser):
    """Tracks nesting of the circuitsvis containers."""

    def __init__(self):
        super().__init__()
        self.stack, self.nested, self.ids = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            a = dict(attrs)
            if "cl-cv" in (a.get("class") or ""):
                if any(self.stack):
                    self.nested.append(a["id"])
                self.ids.append(a["id"])
            self.stack.append("cl-cv" in (a.get("class") or ""))

    def handle_endtag(self, tag):
        if tag == "div":
            self.stack.pop()


def test_containers_are_closed_divs_not_nested():
    # circuitsvis writes <div id=.../>, which HTML parses as an open tag: two views nest and
    # the first render wipes the second. Ours are closed.
    v = circuitsvis_view("ColoredTokens", tokens=["a"], values=[1.0])
    page = (v + v + v).to_html()
    p = _Divs()
    p.feed(page)
    assert len(p.ids) == 3 and len(set(p.ids)) == 3
    assert p.nested == []


def test_fragment_ids_unique_or_prefixed():
    v = circuitsvis_view("ColoredTokens", tokens=["a"], values=[1.0])
    assert v.fragment() != v.fragment()
    f = v.fragment(id_prefix="abc")
    assert '<div id="abc-0" class="cl-cv"></div>' in f
    assert 'CircuitsVis.render("abc-0", CircuitsVis.ColoredTokens, ' in f
    assert BUNDLE_MARK not in f


def test_notebook_html_needs_no_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the view probed the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    v = circuitsvis_view("ColoredTokens", tokens=["a", "b"], values=[0.0, 1.0])
    out = v._repr_html_()
    assert out.count(BUNDLE_MARK) == 1
    assert 'type="module"' in out and "unpkg" not in out
    assert html_view("<p>x</p>")._repr_html_() == '<div class="cl-view"><p>x</p></div>'


def test_from_circuitsvis_reads_back_component_and_props():
    att = torch.rand(2, 3, 3)
    r = cv.attention.attention_heads(att, ["a", "b", "</script>"])
    v = from_circuitsvis(r)
    (part,) = v.parts
    assert isinstance(part, CircuitsVisPart) and part.component == "AttentionHeads"
    props = json.loads(part.props_json)
    assert props["tokens"] == ["a", "b", "</script>"]
    torch.testing.assert_close(torch.tensor(props["attention"]), att)
    assert "unpkg" not in v.to_html()
    r2 = cv.tokens.colored_tokens_multi(["a", "b"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert from_circuitsvis(r2).parts[0].component == "ColoredTokensMulti"
    with pytest.raises(ValueError, match="RenderedHTML"):
        from_circuitsvis("<div></div>")


def test_view_dict_round_trip_and_validation():
    v = html_view("<p>cap</p>") + circuitsvis_view("ColoredTokens", tokens=["a"], values=[1.0])
    d = json.loads(json.dumps(v.to_dict()))
    assert View.from_dict(d) == v
    assert v.needs_bundle and not html_view("x").needs_bundle
    with pytest.raises(ValueError, match="codebook_lens view"):
        View.from_dict({"parts": []})
    with pytest.raises(ValueError, match="component"):
        circuitsvis_view("alert(1);x")


def test_write_atomic_leaves_no_temp_files(tmp_path):
    p = write_atomic(tmp_path / "sub" / "a.html", "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert [x.name for x in p.parent.iterdir()] == ["a.html"]
