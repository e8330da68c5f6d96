"""report.html in a real headless browser (Chromium): it renders, offline, with nothing failing.

Needs a Chromium on PATH (Debian/Ubuntu: ``apt-get install -y chromium``); skipped without one.
Set ``CODEBOOK_LENS_SCREENSHOT_DIR`` to keep the screenshots (e.g. as CI artifacts).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from codebook_lens.viz import (
    attention_with_codes_view,
    build_report,
    check_page,
    code_tokens_view,
    find_chromium,
    intervention_success_bars,
    state_code_precision_heatmap,
    top_contexts_view,
    which_code_view,
)

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium on PATH: install it (apt-get install -y chromium) to run the browser check",
)

G = torch.Generator().manual_seed(0)
TOKENS = ["<s>"] + [str(t) for t in torch.randint(0, 10, (15,), generator=G).tolist()]
CODES = torch.randint(0, 12, (16, 4, 1), generator=G)
PATTERN = torch.softmax(
    torch.randn(4, 16, 16, generator=G).tril() - 1e4 * torch.ones(16, 16).triu(1), -1
)


def _keep(path, name):
    d = os.environ.get("CODEBOOK_LENS_SCREENSHOT_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
        shutil.copy(path, os.path.join(d, name))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    views = {
        "code 3": code_tokens_view(TOKENS, CODES, 3),
        "which code": which_code_view(TOKENS, CODES),
        "top contexts": top_contexts_view(
            [[TOKENS[:5], TOKENS[4:9]]], [[[0, 0, 0, 0, 1.0], [1.0, 0, 0, 0, 0]]], ["code 3 (H0)"]
        ),
        "attention + codes": attention_with_codes_view(PATTERN, CODES, TOKENS),
    }
    figures = {
        "precision": state_code_precision_heatmap(torch.rand(10, 12, generator=G)),
        "success": intervention_success_bars({"attn": 0.9, "mlp": 0.4}),
    }
    return build_report(d / "report.html", "browser check", {"acc": 0.97}, figures, views)


def test_report_renders_offline_with_nothing_failing(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    r = check_page(report, screenshot=shot)
    _keep(shot, "report.png")
    assert r.problems == []
    assert r.views_total == 4 and r.views_rendered == 4
    assert r.external_requests == [] and r.failed == []
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape[1] == 1280 and img.shape[0] > 1500  # the whole page, not one screen
    assert img.std() > 20  # not blank
    assert (img < 128).mean() > 0.01  # real content: text, figures, heatmaps


def test_check_detects_a_failed_cdn_load(report, tmp_path):
    """The check fails on pages that need the network: circuitsvis's own (CDN) HTML, and our
    report with a CDN script slipped in past build_report (the page's CSP refuses it)."""
    import circuitsvis as cv

    cdn = tmp_path / "cdn.html"
    cdn.write_text(
        "<!DOCTYPE html><html><body>"
        + cv.tokens.colored_tokens(["a"], [1.0]).cdn_src
        + "</body></html>"
    )
    r = check_page(cdn)
    assert any("unpkg.com" in f and "net::ERR_" in f for f in r.failed), r.failed
    assert not r.ok

    page = report.read_text(encoding="utf-8").replace(
        "</head>", '<script src="https://unpkg.com/circuitsvis/dist/cdn/iife.js"></script></head>'
    )
    bad = tmp_path / "bad.html"
    bad.write_text(page, encoding="utf-8")
    r = check_page(bad)
    assert not r.ok
    assert any("unpkg.com" in p for p in r.problems), r.problems
