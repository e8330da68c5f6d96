"""The browser in real headless Chromium against a running server: every view renders, the
search -> code page -> token view -> lab path works by clicking, and no request leaves
localhost. Screenshots of each view go to ``$CL_ARTIFACTS`` (default: the test's tmp dir)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from codebook_lens.viz.browser import find_chromium  # noqa: E402
from tests.integration.browse_helpers import LiveServer, Page, tiny_dir  # noqa: E402

pytestmark = [pytest.mark.bridge, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def page_and_server(tmp_path_factory):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on PATH (apt-get install -y chromium, or set $CHROMIUM)")
    from codebook_lens.browse import create_app, load_browse_data

    d = tiny_dir(tmp_path_factory.mktemp("browse") / "demo_out")
    with LiveServer(create_app(load_browse_data(d))) as server:
        page = Page(exe)
        try:
            yield page, server, d
        finally:
            page.close()


def _artifacts(tmp_path_factory) -> Path:
    env = os.environ.get("CL_ARTIFACTS")
    return Path(env) if env else tmp_path_factory.mktemp("screens")


def test_views_and_click_path(page_and_server, tmp_path_factory):
    page, server, d = page_and_server
    shots = _artifacts(tmp_path_factory)

    page.goto(server.url + "#/overview")
    page.ready("overview")
    text = page.text()
    assert "blocks.0.attn.hook_z" in text and "blocks.1.hook_mlp_out" in text
    assert "40 sequences" in text and "2 layers" in text
    page.screenshot(shots / "browse_overview.png")

    # Search: a token search by typing into the form and clicking Search
    page.goto(server.url + "#/search")
    page.ready("search")
    page.js("document.querySelector('select[name=kind]').value = 'label'")
    page.js("document.getElementById('search-q').value = 'digit3'")
    page.js("document.querySelector('select[name=by]').value = 'precision'")
    page.click("#search-go")
    page.wait("document.querySelectorAll('table.results tbody tr').length > 0")
    page.ready("search")
    assert "codes match" in page.text()
    page.screenshot(shots / "browse_search.png")

    # -> code page of the first result
    first = page.js("document.querySelector('table.results a.codelink').textContent")
    page.click("table.results a.codelink")
    page.ready("code")
    page.wait("!!document.querySelector('#effects table')")
    text = page.text()
    site, head, code = first.split(" ")[0], first.split(" ")[1][1:], first.split("#")[1]
    assert f"{site} · head {head} · code {code}" in text
    assert "Top contexts" in text and "Tokens it fires on" in text and "digit3" in text
    assert "Direct logit effect: top" in text and "Nearest codes" in text
    assert page.js("document.querySelectorAll('.ctx .tok.center').length") > 0
    page.js("document.getElementById('bm-note').value = 'fires on 3'")
    page.click("#bm-add")
    page.wait("document.getElementById('bm-add').textContent.includes('✓')")
    page.screenshot(shots / "browse_code.png")

    # -> token view of its first context
    page.click("a.ctxlink")
    page.ready("context")
    assert "Token view · sequence" in page.text()
    assert page.js("document.querySelectorAll('table.codes tr.sel').length") == 1
    assert page.js("document.querySelectorAll('table.codes a.codelink').length") > 40
    page.screenshot(shots / "browse_tokens.png")

    # -> lab: force a code at the last position, run, compare patched with unpatched
    page.goto(server.url + "#/lab")
    page.ready("lab")
    page.js("document.getElementById('lab-prompt').value = '10 1 2 3 4 5'")
    page.click("#lab-add")
    page.js("document.querySelector('#lab-ivs [name=code]').value = '7'")
    page.js("document.querySelector('#lab-ivs [name=site]').value = 'blocks.1.hook_mlp_out'")
    page.click("#lab-run")
    page.wait("document.querySelectorAll('#lab-codes td.changed').length > 0")
    text = page.text()
    assert "Unpatched" in text and "Patched" in text and "next-token distribution" in text
    assert "Δ vs unpatched" in text
    changed = page.js(
        "Array.from(document.querySelectorAll('#lab-codes td.changed')).map(e => e.innerText)"
    )
    assert changed == ["7"] or all("7" in c for c in changed)
    page.screenshot(shots / "browse_lab.png")

    page.goto(server.url + "#/bookmarks")
    page.ready("bookmarks")
    assert "fires on 3" in page.text()
    page.screenshot(shots / "browse_bookmarks.png")

    # a bad search shows the server's message, not a broken page
    page.goto(server.url + "#/search?kind=regex&q=%28")
    page.ready("search")
    assert "invalid regex" in page.js("document.getElementById('error').textContent")

    assert not page.exceptions, page.exceptions
    local = ("http://127.0.0.1:", "about:", "data:")
    assert page.requests and all(u.startswith(local) for u in page.requests), page.requests
    assert all(u.startswith(server.url) for u in page.requests if u.startswith("http")), (
        page.requests
    )
    assert (d / "bookmarks.json").exists()
