"""report.html: one self-contained page, escaped text, no external references, atomic writes."""

from __future__ import annotations

import base64
import json

import circuitsvis as cv
import numpy as np
import pytest
import torch

from codebook_lens.viz.figures import figure_to_data_uri, intervention_success_bars
from codebook_lens.viz.offline import circuitsvis_view, html_view
from codebook_lens.viz.report import (
    CSP,
    build_report,
    external_refs,
    rebuild_report,
    report_html,
    save_report,
    summary_tables,
)

BUNDLE_MARK = "var CircuitsVis="


@pytest.fixture(scope="module")
def fig():
    return intervention_success_bars({"attn": 0.9, "mlp": 0.5})


def _views():
    return {
        "tokens <1>": circuitsvis_view("ColoredTokens", tokens=["a", "b"], values=[0.0, 1.0]),
        "tokens 2": circuitsvis_view("ColoredTokens", tokens=["c"], values=[1.0]),
        "static": html_view("<p>static table</p>"),
    }


def test_page_is_self_contained(fig):
    page = report_html(
        "Report <&>",
        summary={"acc": 0.96123456, "per_site": {"attn": {"acc": 0.9, "n": 3}}},
        figures={"success": fig},
        views=_views(),
        notes="line 1\n<script>alert(1)</script> https://arxiv.org/abs/2310.17230",
    )
    assert external_refs(page) == []
    assert page.count(BUNDLE_MARK) == 1  # bundle once for two circuitsvis views
    assert f'content="{CSP}"' in page
    assert "<h1>Report &lt;&amp;&gt;</h1>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; https://arxiv.org/abs/2310.17230" in page
    assert "<script>alert(1)" not in page
    assert '<h3 id="view-tokens-1">tokens &lt;1&gt;</h3>' in page
    assert figure_to_data_uri(fig) in page
    assert "<td>0.9612</td>" in page
    assert "<p>static table</p>" in page
    for tag in ("http://", "https://"):
        # URLs occur only as inert text (notes) and inside the bundle's strings
        outside_bundle = page.replace(page[page.index(BUNDLE_MARK) : page.index("</script>")], "")
        assert outside_bundle.count(tag) == (1 if tag == "https://" else 0)


def test_no_bundle_without_circuitsvis_views():
    page = report_html("t", summary={"a": 1}, views={"s": html_view("<p>x</p>")})
    assert BUNDLE_MARK not in page
    assert external_refs(page) == []


@pytest.mark.parametrize(
    "bad, what",
    [
        ('<script src="https://unpkg.com/x.js"></script>', "src="),
        ('<link rel="stylesheet" href="//cdn.example.com/a.css">', "href="),
        ('<img src="figure.png">', "figure.png"),
        ('<img srcset="data:image/png;base64,AA 1x, http://x/y.png 2x">', "http://x/y.png"),
        ('<div style="background: url(http://x/a.png)"></div>', "url("),
        ("<style>@import 'https://fonts.example.com/f.css';</style>", "fonts.example.com"),
        ('<meta http-equiv="refresh" content="0; url=http://x">', "refresh"),
    ],
)
def test_external_refs_flags_loads(bad, what):
    refs = external_refs(f"<html><body>{bad}</body></html>")
    assert len(refs) == 1 and what in refs[0]
    with pytest.raises(ValueError, match="outside the page"):
        report_html("t", views={"bad": bad})


def test_external_refs_flags_circuitsvis_cdn_import():
    r = cv.tokens.colored_tokens(["a"], [1.0])
    refs = external_refs(r.cdn_src)
    assert refs == [
        "<script> import 'https://unpkg.com/circuitsvis@" + cv.__version__ + "/dist/cdn/esm.js'"
    ]
    assert external_refs(r.local_src) == []


def test_external_refs_ignores_inert_text():
    page = (
        '<p>see https://arxiv.org/abs/2310.17230 and <a href="#figures">figures</a></p>'
        '<img src="data:image/png;base64,AAAA"><script>var u = "https://reactjs.org/x";</script>'
        '<svg xmlns="http://www.w3.org/2000/svg"></svg>'
    )
    assert external_refs(page) == []


def test_circuitsvis_rendered_html_is_converted(fig):
    r = cv.attention.attention_heads(torch.rand(1, 2, 2), ["a", "b"])
    page = report_html("t", views={"att": r})
    assert "unpkg" not in page and page.count(BUNDLE_MARK) == 1
    assert "CircuitsVis.AttentionHeads" in page
    with pytest.raises(TypeError, match="view 'x' must be"):
        report_html("t", views={"x": 3})


def test_figures_from_paths_and_uris(tmp_path, fig):
    uri = figure_to_data_uri(fig)
    png = tmp_path / "f.png"
    png.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    page = report_html("t", figures={"path": png, "uri": uri})
    assert page.count(uri) == 2
    with pytest.raises(ValueError, match="not a data:image URI or an existing"):
        report_html("t", figures={"bad": "http://x/y.png"})
    with pytest.raises(TypeError):  # "must be a matplotlib Figure" (or the run-time type check)
        report_html("t", figures={"bad": 3})  # type: ignore[dict-item]


def test_summary_tables_shapes():
    tables = dict(
        summary_tables(
            {
                "model": "tokfsm",
                "acc": torch.tensor(0.5),
                "flag": True,
                "missing": None,
                "per_site": {"attn": {"acc": 0.9, "n": 3}, "mlp": {"acc": 0.8, "dead": 0.1}},
                "runs": [{"seed": 0, "acc": 0.9}, {"seed": 1, "acc": float("nan")}],
                "config": {"k": 1, "inner": {"lr": 1e-3}},
                "long": list(range(10)),
            }
        )
    )
    assert list(tables) == ["Overview", "per_site", "runs", "config", "long"]
    ov = tables["Overview"]
    assert "<th>model</th><td>tokfsm</td>" in ov and "<th>acc</th><td>0.5</td>" in ov
    assert "<td>yes</td>" in ov and "<td>—</td>" in ov
    ps = tables["per_site"]
    assert "<th>acc</th><th>n</th><th>dead</th>" in ps  # union of columns
    assert "<th>mlp</th><td>0.8</td><td>—</td><td>0.1</td>" in ps
    assert "<td>nan</td>" in tables["runs"]
    assert "<th>inner / lr</th><td>0.001</td>" in tables["config"]
    assert "<th>long / 9</th><td>9</td>" in tables["long"]
    with pytest.raises(TypeError):  # "must be a mapping" (or the run-time type check)
        summary_tables([1, 2])  # type: ignore[arg-type]


def test_build_report_is_atomic(tmp_path, fig, monkeypatch):
    out = tmp_path / "r" / "report.html"
    p = build_report(out, "t", summary={"a": 1}, figures={"f": fig}, views=_views())
    assert p == out and out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    before = out.read_bytes()
    with pytest.raises(ValueError):
        build_report(out, "t", views={"bad": '<script src="http://x/y.js"></script>'})
    assert out.read_bytes() == before  # a failed build leaves the old page
    assert sorted(x.name for x in out.parent.iterdir()) == ["report.html"]


def test_save_and_rebuild_round_trip(tmp_path, fig):
    d = tmp_path / "demo"
    summary = {"acc": np.float64(0.97), "per_site": {"attn": {"acc": torch.tensor(0.5)}}}
    html_path = save_report(d, "Demo", summary, {"success": fig}, _views(), notes="n")
    first = html_path.read_text(encoding="utf-8")
    m = json.loads((d / "report.json").read_text())
    assert [f["file"] for f in m["figures"]] == ["figures/success.png"]
    assert [v["file"] for v in m["views"]] == [
        "views/tokens-1.json", "views/tokens-2.json", "views/static.json",
    ]  # fmt: skip
    assert m["summary"] == {"acc": 0.97, "per_site": {"attn": {"acc": 0.5}}}
    html_path.unlink()
    assert rebuild_report(d) == d / "report.html"
    assert (d / "report.html").read_text(encoding="utf-8") == first
    with pytest.raises(FileNotFoundError, match="not a report directory"):
        rebuild_report(tmp_path)
    (d / "views" / "static.json").unlink()
    with pytest.raises(FileNotFoundError, match="views/static.json"):
        rebuild_report(d)


def test_report_size_has_one_bundle(fig):
    many = {
        f"v{i}": circuitsvis_view("ColoredTokens", tokens=["a"], values=[1.0]) for i in range(8)
    }
    one = report_html("t", views=dict(list(many.items())[:1]))
    eight = report_html("t", views=many)
    assert len(eight) - len(one) < 5_000  # each extra view costs its props, not 1.3 MB


def test_scanner_and_tables_have_their_own_modules():
    from codebook_lens import viz
    from codebook_lens.viz import ref_scanner as refs_module
    from codebook_lens.viz import tables

    assert external_refs is refs_module.external_refs is viz.external_refs
    assert summary_tables is tables.summary_tables
    assert refs_module.__all__ == ["external_refs"] and tables.__all__ == ["summary_tables"]
