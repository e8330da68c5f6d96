"""`codebook-lens export dashboard` on a real run (the tiny Hugging Face GPT-2 of the Neuronpedia
export test, trained and collected by the pipeline): the data embedded in each page against the
code store and the analysis recomputed here (numpy, plain loops, `top_examples`,
`code_logit_attribution`), and the page itself in real headless Chromium: a code selected by
clicking shows its contexts, histogram and logit tables, and the page requests nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from codebook_lens.analysis import CodeStore, code_logit_attribution, top_examples
from codebook_lens.cli import main
from codebook_lens.export.dashboard_page import DATA_ID, embed_json
from codebook_lens.pipeline.load import load_run
from codebook_lens.viz.browser import check_page, find_chromium
from codebook_lens.viz.report import CSP
from tests.integration.browse_helpers import Page
from tests.integration.test_export_neuronpedia import SITES, code_arrays, trained_run

pytestmark = [pytest.mark.bridge, pytest.mark.timeout(600)]

N_CODES, N_EXAMPLES, BEFORE, AFTER, N_LOGITS, N_BINS = 6, 5, 4, 2, 7, 12
PAGES = {site: f"{site}.html" for site in SITES}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained and collected run and its dashboards, written through the command line."""
    root = tmp_path_factory.mktemp("dashboard")
    run_dir = trained_run(root)
    out = root / "dash"
    flags = ["--codes", str(N_CODES), "--n-examples", str(N_EXAMPLES), "--n-bins", str(N_BINS)]
    flags += ["--context-before", str(BEFORE), "--context-after", str(AFTER)]
    flags += ["--n-logits", str(N_LOGITS), "--no-progress"]
    assert main(["export", "dashboard", run_dir, "--out", str(out), *flags]) == 0
    return load_run(run_dir, device="cpu"), CodeStore.load(Path(run_dir) / "store"), out


def page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    m = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', text, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_files_and_manifest(run):
    _, _, out = run
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*PAGES.values(), "index.html", "dashboard.json"]
    )
    manifest = json.loads((out / "dashboard.json").read_text())
    assert manifest["format"] == "codebook_lens.dashboard" and manifest["model"] == "gpt2"
    assert [p["site"] for p in manifest["pages"]] == list(SITES)
    index = (out / "index.html").read_text()
    assert all(f'href="{name}"' in index for name in PAGES.values())
    for name in PAGES.values():
        text = (out / name).read_text()
        assert f'content="{CSP.replace(chr(39), "&#x27;")}"' in text  # the offline CSP
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text


def test_embedded_data_matches_the_store_and_analysis(run):
    loaded, store, out = run
    cm, T = loaded.cm, store.n_tokens
    decode = cm.tokenizer.decode
    for site, opts in SITES.items():
        d = page_data(out / PAGES[site])
        codes, n_codes = code_arrays(store, site), opts["n_codes"]
        H = codes.shape[2]
        assert (d["site"], d["n_heads"], d["n_codes"], d["k"], d["n_tokens"]) == (
            site, H, n_codes, opts["k"], T
        )  # fmt: skip
        assert d["value"] == pytest.approx(1 / opts["k"] if opts.get("combine") else 1.0)
        count = np.array(
            [[int(np.any(codes[:, :, h] == c, axis=-1).sum()) for c in range(n_codes)]
             for h in range(H)]
        )  # fmt: skip
        # which codes: per head the N_CODES most used that fire, most used first, ties by code
        want = []
        for h in range(H):
            live = sorted((c for c in range(n_codes) if count[h, c]), key=lambda c: -count[h, c])
            want += [h * n_codes + c for c in live[:N_CODES]]
        assert [c["feature"] for c in d["codes"]] == want
        check_histogram(d, count, T)
        logits = code_logit_attribution(cm, site).numpy()  # [H, n_codes, vocab]
        for c in d["codes"]:
            h, k = c["head"], c["code"]
            assert c["feature"] == h * n_codes + k and c["count"] == count[h, k]
            assert c["density"] == pytest.approx(count[h, k] / T, rel=1e-12)
            effect = logits[h, k]
            for key, order in (("top", np.argsort(-effect)), ("bottom", np.argsort(effect))):
                ids = [p[0] for p in c[key]]
                assert ids == order[:N_LOGITS].tolist(), (site, c["feature"], key)
                np.testing.assert_allclose([p[1] for p in c[key]], effect[ids], rtol=1e-5)
            check_examples(store, codes, site, c)
        used = {t for c in d["codes"] for e in c["examples"] for t in e["tokens"]}
        used |= {p[0] for c in d["codes"] for p in c["top"] + c["bottom"]}
        assert d["vocab"] == {str(t): decode([t]) for t in sorted(used)}


def check_histogram(d: dict, count: np.ndarray, T: int) -> None:
    edges = np.array(d["hist"]["edges"])
    assert len(edges) == N_BINS + 1 and edges[-1] == 0
    assert edges[0] == np.floor(np.log10(1 / T)) and np.allclose(np.diff(edges), -edges[0] / N_BINS)
    for h in range(count.shape[0]):
        live = count[h][count[h] > 0]
        assert d["hist"]["dead"][h] == int((count[h] == 0).sum())
        hist, _ = np.histogram(np.log10(live / T), bins=edges)
        assert d["hist"]["counts"][h] == hist.tolist()


def check_examples(store: CodeStore, codes: np.ndarray, site: str, c: dict) -> None:
    """The contexts are top_examples' (same order), each token and firing recounted."""
    h, k = c["head"], c["code"]
    ex = top_examples(store, site, k, head=h, n=N_EXAMPLES, before=BEFORE, after=AFTER)
    assert [(e["seq"], e["pos"]) for e in c["examples"]] == list(
        zip(ex.seq.tolist(), ex.pos.tolist())
    )
    for e, ctx in zip(c["examples"], ex.context.tolist()):
        assert e["tokens"] == [t for t in ctx if t >= 0]
        assert e["start"] == max(0, e["pos"] - BEFORE) and e["at"] == e["pos"] - e["start"]
        window = range(e["start"], e["start"] + len(e["tokens"]))
        assert window.stop == min(store.seq_len, e["pos"] + AFTER + 1)
        assert e["on"] == [i for i, p in enumerate(window) if np.any(codes[e["seq"], p, h] == k)]
        assert codes[e["seq"], e["pos"], h, e["slot"]] == k


def test_all_codes_and_refusals(run, tmp_path):
    loaded, store, out = run
    run_dir, site = str(loaded.dir.path), "blocks.1.hook_mlp_out"
    all_out = tmp_path / "all"
    args = ["export", "dashboard", run_dir, "--out", str(all_out), "--site", site]
    assert main([*args, "--codes", "all", "--n-examples", "1", "--no-progress"]) == 0
    d = page_data(all_out / PAGES[site])
    assert sorted(c["feature"] for c in d["codes"]) == list(range(SITES[site]["n_codes"]))
    with pytest.raises(SystemExit) as e:  # an earlier dashboard is kept without --overwrite
        main([*args, "--no-progress"])
    assert "--overwrite" in str(e.value.code) and "\n" not in str(e.value.code)
    assert main([*args, "--no-progress", "--overwrite"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["export", "dashboard", run_dir, "--out", str(tmp_path / "x"), "--site",
              "blocks.0.hook_zz"])  # fmt: skip
    assert "blocks.0.attn.hook_z" in str(e.value.code)  # the close match is named
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # argparse: --codes takes a positive number or 'all'
        main(["export", "dashboard", run_dir, "--out", str(tmp_path / "y"), "--codes", "0"])


def test_embedded_json_cannot_close_its_script():
    data = {"vocab": {"1": "</script><script>alert(1)</script>", "2": "<!--", "3": "a&b\u2028"}}
    text = embed_json(data)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == data


def shown(s: str) -> str:
    """A token as the page writes it: newlines, tabs and other control characters visible
    (Unicode's control pictures)."""
    s = s.replace("\n", "\u21b5").replace("\t", "\u21e5")
    return re.sub(
        r"[\x00-\x1f\x7f]", lambda m: chr(0x2421 if m[0] == "\x7f" else 0x2400 + ord(m[0])), s
    )


@pytest.fixture(scope="module")
def chromium():
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on PATH (apt-get install -y chromium, or set $CHROMIUM)")
    return exe


def test_page_in_chromium(run, chromium):
    _, _, out = run
    site = "blocks.1.attn.hook_z"
    path = out / PAGES[site]
    d = page_data(path)
    c = max(d["codes"][1:], key=lambda c: (len(c["examples"]), c["feature"]))  # not the default
    url = path.resolve().as_uri()
    page = Page(chromium)
    try:
        page.goto(url)
        page.wait(
            f"location.href === {json.dumps(url)} && document.body !== null"
            " && document.body.dataset.ready === '1'"
        )
        assert page.js("document.querySelectorAll('#list li').length") == len(d["codes"])
        page.click(f'#list li[data-feature="{c["feature"]}"]')
        page.wait(f"document.body.dataset.feature === '{c['feature']}'")
        check_rendered(page, d, c)
        # the search box: "h<head> c<code>" leaves that one code in the list
        page.js(f"const q = document.getElementById('q'); q.value = 'h{c['head']} c{c['code']}';"
                "q.dispatchEvent(new Event('input'))")  # fmt: skip
        visible = "Array.from(document.querySelectorAll('#list li')).filter(l => !l.hidden)"
        assert page.js(f"{visible}.map(l => +l.dataset.feature)") == [c["feature"]]
        assert page.exceptions == []
        assert set(page.requests) <= {url}, page.requests  # nothing but the file itself
    finally:
        page.close()
    check = check_page(path, offline=True, settle_s=0.3)  # console errors, CSP refusals, network
    assert check.ok, check.problems
    assert check.external_requests == [] and check.failed == []


def check_rendered(page: Page, d: dict, c: dict) -> None:
    title = page.js("document.getElementById('title').textContent")
    assert f"Feature {c['feature']}" in title and f"head {c['head']} · code {c['code']}" in title
    # top activations: every context's tokens, the firing ones highlighted
    texts = page.js(
        "Array.from(document.querySelectorAll('#examples .ex')).map(e =>"
        " Array.from(e.querySelectorAll('.t')).map(t => t.textContent))"
    )
    assert texts == [[shown(d["vocab"][str(t)]) for t in e["tokens"]] for e in c["examples"]]
    on = page.js(
        "Array.from(document.querySelectorAll('#examples .ex')).map(e =>"
        " Array.from(e.querySelectorAll('.t')).flatMap((t, i) => t.classList.contains('on') ?"
        " [i] : []))"
    )
    assert on == [e["on"] for e in c["examples"]]
    # the histogram: one bar per bin with its count, the code's bin highlighted, a marker
    bars = page.js(
        "Array.from(document.querySelectorAll('#hist svg rect.bar')).map(r =>"
        " [+r.dataset.count, r.classList.contains('cur'), +r.getAttribute('height')])"
    )
    assert [b[0] for b in bars] == d["hist"]["counts"][c["head"]] and len(bars) == N_BINS
    edges, logd = d["hist"]["edges"], np.log10(c["density"])
    want_bin = min(int(np.searchsorted(edges, logd, side="right")) - 1, N_BINS - 1)
    assert [i for i, b in enumerate(bars) if b[1]] == [want_bin]
    assert all((b[2] > 0) == (b[0] > 0) for b in bars)
    marker = page.js("document.querySelector('#hist svg line.marker').dataset.log10")
    assert float(marker) == pytest.approx(logd)
    # logit tables: the promoted and suppressed tokens and their values, in order
    for kind, key in (("pos", "top"), ("neg", "bottom")):
        rows = page.js(
            f"Array.from(document.querySelectorAll('table.{kind} tbody tr')).map(r =>"
            " [r.querySelector('.tok').textContent, +r.querySelector('.val').textContent])"
        )
        assert [r[0] for r in rows] == [shown(d["vocab"][str(p[0])]) for p in c[key]]
        np.testing.assert_allclose([r[1] for r in rows], [p[1] for p in c[key]], rtol=6e-3)
