"""The browser's JSON API (no model) against brute force on small random stores."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from codebook_lens.analysis import regex_feature  # noqa: E402
from codebook_lens.browse import create_app, load_browse_data, write_browse_data  # noqa: E402
from codebook_lens.browse.synthetic import random_store  # noqa: E402
from codebook_lens.io import CheckpointError  # noqa: E402

VOCAB = ["a", "b", "ab", " the", "x", "", "\n", "cat", " c", "at"]
SITES = {"blocks.0.attn.hook_z": (3, 7, 2), "blocks.0.hook_mlp_out": (None, 9, 1)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("browse")
    store = random_store(12, 10, SITES, len(VOCAB), seed=3, zipf=0.8)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(-1, 4, (12, 10), generator=g)
    write_browse_data(d, store, labels=labels, label_names=list("PQRS"), vocab=VOCAB, model=None)
    client = TestClient(create_app(load_browse_data(d), regex_budget_s=0.5))
    return client, store, labels, d


def brute_rows(store, feature, ignore=None):
    """{(site, head, code): (tp, count)} by looping over every position."""
    out = {}
    for s in store.sites:
        c = store.codes[s].long()
        S, P, H, _ = c.shape
        for h in range(H):
            for code in range(store.n_codes[s]):
                tp = cnt = 0
                for i in range(S):
                    for p in range(P):
                        if ignore is not None and ignore[i, p]:
                            continue
                        if (c[i, p, h] == code).any():
                            cnt += 1
                            tp += bool(feature[i, p])
                out[(s, h, code)] = (tp, cnt)
    return out


def check_search(client, params, feature, ignore=None, n_feature=None):
    r = client.get("/api/search", params={**params, "limit": 500, "min_count": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    rows = brute_rows(client.app.state.browse.store, feature, ignore)
    assert body["total"] == len(rows)
    assert body["n_feature"] == (int(feature.sum()) if n_feature is None else n_feature)
    f1s = []
    for it in body["items"]:
        tp, cnt = rows[(it["site"], it["head"], it["code"])]
        p = tp / cnt if cnt else 0.0
        rc = tp / max(body["n_feature"], 1)
        assert (it["tp"], it["count"]) == (tp, cnt)
        assert it["precision"] == pytest.approx(p) and it["recall"] == pytest.approx(rc)
        f1s.append(it["f1"])
    assert f1s == sorted(f1s, reverse=True)


def test_token_search_vs_brute_force(setup):
    client, store, _, _ = setup
    check_search(client, {"kind": "token", "q": " the"}, store.tokens.long() == 3)
    check_search(client, {"kind": "token", "q": "#7"}, store.tokens.long() == 7)


@pytest.mark.parametrize("pattern", [r"the", r"a", r"c.?at", r"\n"])
@pytest.mark.parametrize("mode", ["overlap", "start", "end"])
def test_regex_search_matches_analysis_regex_feature(setup, pattern, mode):
    client, store, _, _ = setup
    want = regex_feature(store, pattern, VOCAB, mode=mode)
    got = client.app.state.browse.text.regex_feature(pattern, mode)
    assert torch.equal(got, want)


def _group_feature(tokens, pattern):
    """Brute force: tokens covered by capture group 1, character by character."""
    out = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, row in enumerate(tokens.tolist()):
        owner = [j for j, t in enumerate(row) for _ in VOCAB[t]]
        text = "".join(VOCAB[t] for t in row)
        for m in re.finditer(pattern, text):
            for ch in range(*m.span(1)):
                out[i, owner[ch]] = True
    return out


def test_regex_capture_group_and_ranking(setup):
    client, store, _, _ = setup
    feat = _group_feature(store.tokens.long(), r"a(b+)")
    assert feat.any()
    assert torch.equal(client.app.state.browse.text.regex_feature(r"a(b+)"), feat)
    check_search(client, {"kind": "regex", "q": r"a(b+)"}, feat)


def test_label_search_vs_brute_force(setup):
    client, _, labels, _ = setup
    for q in ("R", "0"):
        lab = 2 if q == "R" else 0
        check_search(
            client, {"kind": "label", "q": q}, labels == lab, ignore=labels < 0,
            n_feature=int((labels == lab).sum()),
        )  # fmt: skip


def test_thresholds_sorting_paging(setup):
    client, _, _, _ = setup
    base = {"kind": "label", "q": "P", "by": "precision", "min_count": 2}
    full = client.get("/api/search", params={**base, "limit": 500}).json()
    assert all(it["count"] >= 2 for it in full["items"])
    pages = [
        client.get("/api/search", params={**base, "limit": 5, "offset": o}).json()["items"]
        for o in range(0, full["total"], 5)
    ]
    assert [it for p in pages for it in p] == full["items"]
    thr = client.get("/api/search", params={**base, "min_precision": 0.5, "limit": 500}).json()
    assert thr["items"] == [it for it in full["items"] if it["precision"] >= 0.5]
    asc = client.get("/api/search", params={**base, "by": "count", "order": "asc"}).json()
    counts = [it["count"] for it in asc["items"]]
    assert counts == sorted(counts)
    site = client.get("/api/search", params={**base, "site": "blocks.0.hook_mlp_out"}).json()
    assert {it["site"] for it in site["items"]} == {"blocks.0.hook_mlp_out"}


def test_code_page_vs_brute_force(setup):
    client, store, labels, _ = setup
    site, head, code = "blocks.0.attn.hook_z", 1, 2
    c = client.get(f"/api/code/{site}/{head}/{code}", params={"n": 200}).json()
    codes = store.codes[site].long()[:, :, head]  # [S, P, K]
    hits = [(i, p, int((codes[i, p] == code).nonzero()[0]))
            for i in range(store.n_seq) for p in range(store.seq_len)
            if (codes[i, p] == code).any()]  # fmt: skip
    assert c["count"] == len(hits)
    assert c["frequency"] == pytest.approx(len(hits) / store.n_tokens)
    want = sorted(hits, key=lambda x: x[2])  # lowest slot first, then dataset order
    assert [(e["seq"], e["pos"], e["slot"]) for e in c["top"]] == want
    assert sorted((e["seq"], e["pos"]) for e in c["random"]) == sorted((i, p) for i, p, _ in hits)
    ex = c["top"][0]
    toks = store.tokens.long()
    assert ex["tokens"][ex["center"]] == VOCAB[int(toks[ex["seq"], ex["pos"]])]
    for j, on in enumerate(ex["fires"]):
        p = ex["pos"] - ex["center"] + j
        if 0 <= p < store.seq_len:
            assert on == bool((codes[ex["seq"], p] == code).any())
    tok_counts = {}
    for i, p, _ in hits:
        tok_counts[int(toks[i, p])] = tok_counts.get(int(toks[i, p]), 0) + 1
    assert {t["id"]: t["count"] for t in c["tokens"]} == tok_counts
    assert sum(c["by_position"]) == len(hits)
    for lab in c["labels"]:
        tp = sum(1 for i, p, _ in hits if labels[i, p] == lab["label"])
        fired = sum(1 for i, p, _ in hits if labels[i, p] >= 0)
        assert lab["tp"] == tp
        assert lab["precision"] == pytest.approx(tp / fired)
        assert lab["recall"] == pytest.approx(tp / int((labels == lab["label"]).sum()))


def test_context_view(setup):
    client, store, labels, _ = setup
    c = client.get("/api/context/5").json()
    assert c["tokens"] == [VOCAB[t] for t in store.tokens[5].tolist()]
    col = [x for x in c["columns"] if x["site"] == "blocks.0.attn.hook_z" and x["head"] == 2][0]
    assert col["codes"] == store.codes["blocks.0.attn.hook_z"][5, :, 2].tolist()
    assert c["labels"][0] == ("PQRS"[labels[5, 0]] if labels[5, 0] >= 0 else None)


def test_overview(setup):
    client, store, _, _ = setup
    o = client.get("/api/overview").json()
    assert o["n_tokens"] == 120 and o["labels"] == list("PQRS")
    s = {x["site"]: x for x in o["sites"]}
    counts = store.code_counts("blocks.0.hook_mlp_out")
    assert s["blocks.0.hook_mlp_out"]["dead_fraction"] == pytest.approx(
        float((counts == 0).float().mean())
    )
    assert sum(s["blocks.0.attn.hook_z"]["histogram"]["counts"]) == 3 * 7
    assert o["model"]["loaded"] is False and "model" in o["model"]["error"]


def test_effects_and_lab_without_a_model(setup):
    client, _, _, _ = setup
    e = client.get("/api/code/blocks.0.hook_mlp_out/0/1/effects").json()
    assert e["logits"]["available"] is False and e["nearest"] == []
    r = client.post("/api/lab", json={"prompt": "1 2"})
    assert r.status_code == 409 and "--model" in r.json()["error"]


BAD = [
    ("/api/code/nope/0/0", 404, "Available sites"),
    ("/api/code/blocks.0.attn.hook_z/3/0", 404, "heads 0..2"),
    ("/api/code/blocks.0.attn.hook_z/0/7", 404, "codes 0..6"),
    ("/api/code/blocks.0.attn.hook_z/0/-1", 404, "codes 0..6"),
    ("/api/code/blocks.0.attn.hook_z/x/0", 422, "head"),
    ("/api/context/12", 404, "sequences 0..11"),
    ("/api/context/-1", 404, "out of range"),
    ("/api/search?kind=regex&q=(", 400, "invalid regex"),
    ("/api/search?kind=regex&q=" + "a" * 400, 422, "q"),
    ("/api/search?kind=token&q=zzz", 400, "no token"),
    ("/api/search?kind=label&q=nolabel", 400, "no label"),
    ("/api/search?kind=label&q=9", 400, "out of range"),
    ("/api/search?kind=what&q=a", 422, "kind"),
    ("/api/search?kind=regex&q=a&by=nope", 400, "by="),
    ("/api/search?kind=regex&q=a&mode=nope", 400, "mode"),
    ("/api/search?kind=regex&q=a&site=nope", 400, "no site"),
    ("/api/search?kind=regex&q=a&min_precision=2", 422, "min_precision"),
    ("/api/search?kind=regex&q=a&limit=0", 422, "limit"),
    ("/static/../../etc/passwd", 404, ""),
    ("/static/..%2F..%2Fbrowse%2Fbrowse.json", 404, ""),
    ("/static/layout.py", 404, "no static file"),
    ("/api/nothing", 404, "no such"),
]


@pytest.mark.parametrize("url,status,msg", BAD)
def test_bad_requests_are_4xx_with_a_message(setup, url, status, msg):
    client, _, _, _ = setup
    r = client.get(url)
    assert r.status_code == status, r.text
    assert msg in r.json()["error"]


def test_catastrophic_regex_hits_the_time_budget(setup):
    client, _, _, _ = setup
    browse = client.app.state.browse
    old = browse.text.texts
    browse.text.texts = ["a" * 28 + "!"] * len(old)  # nested quantifiers backtrack exponentially
    try:
        t = time.perf_counter()
        r = client.get("/api/search", params={"kind": "regex", "q": r"(a|aa)+$"})
        assert time.perf_counter() - t < 5
    finally:
        browse.text.texts = old
    assert r.status_code == 400 and "time budget" in r.json()["error"]


def test_bookmarks_round_trip_atomically(setup):
    client, _, _, d = setup
    r = client.post(
        "/api/bookmarks", json={"site": "blocks.0.hook_mlp_out", "code": 3, "note": "n1"}
    )
    assert r.status_code == 200
    b1 = r.json()
    client.post("/api/bookmarks", json={"site": "blocks.0.attn.hook_z", "head": 2, "code": 1})
    again = client.post(
        "/api/bookmarks", json={"site": "blocks.0.hook_mlp_out", "code": 3, "note": "n2"}
    ).json()
    assert again["id"] == b1["id"] and again["note"] == "n2"
    items = client.get("/api/bookmarks").json()["bookmarks"]
    assert [(b["site"], b["code"], b["note"]) for b in items] == [
        ("blocks.0.hook_mlp_out", 3, "n2"),
        ("blocks.0.attn.hook_z", 1, ""),
    ]
    assert json.loads((d / "bookmarks.json").read_text())["bookmarks"] == items
    assert client.delete(f"/api/bookmarks/{b1['id']}").status_code == 200
    assert client.delete(f"/api/bookmarks/{b1['id']}").status_code == 404
    bad = client.post("/api/bookmarks", json={"site": "blocks.0.hook_mlp_out", "code": 99})
    assert bad.status_code == 404
    long = client.post(
        "/api/bookmarks", json={"site": "blocks.0.hook_mlp_out", "code": 1, "note": "x" * 3000}
    )
    assert long.status_code == 400
    assert not [p for p in d.iterdir() if p.name.startswith(".bookmarks")]  # no temp files


def test_page_and_static_files(setup):
    client, _, _, _ = setup
    r = client.get("/")
    assert r.status_code == 200 and "codebook-lens" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert "http" not in client.get("/static/app.js").text.replace("HTTP ", "")


def test_manifest_paths_must_stay_inside_dir(tmp_path):
    store = random_store(2, 4, SITES, len(VOCAB))
    write_browse_data(tmp_path, store, vocab=VOCAB, model="../elsewhere")
    with pytest.raises(CheckpointError, match="outside"):
        load_browse_data(tmp_path)
    with pytest.raises(CheckpointError, match="--store"):
        load_browse_data(tmp_path / "browse")
