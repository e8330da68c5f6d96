"""Attribution metrics, features, examples and token tables against brute-force Python."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.analysis import (
    CodeStore,
    attribution_by_site,
    best_codes_per_label,
    code_token_table,
    feature_attribution,
    label_attribution,
    rank_codes,
    recovered_labels,
    regex_feature,
    token_feature,
    top_examples,
)

SITE = "blocks.0.attn.hook_z"


def random_store(seed, n_seq=6, pos=8, heads=3, k=2, n_codes=7, d_vocab=9, empty=0.15):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, n_codes, (n_seq, pos, heads, k), generator=g)
    c[torch.rand(c.shape, generator=g) < empty] = -1
    if k > 1:  # some repeated ids in one position: they must count once
        c[0, 0, 0, :] = c[0, 0, 0, 0]
    toks = torch.randint(0, d_vocab, (n_seq, pos), generator=g)
    return CodeStore.from_codes({SITE: c}, n_codes, toks, d_vocab=d_vocab), g


def brute_attribution(codes, labels, n_codes, n_labels, bool_feature=False):
    """Plain loops: precision/recall/F1 [head, code, label]."""
    S, P, H, K = codes.shape
    joint = np.zeros((H, n_codes, n_labels))
    fires = np.zeros((H, n_codes))
    lab_count = np.zeros(n_labels)
    for i in range(S):
        for j in range(P):
            lab = labels[i, j]
            if bool_feature:
                lab = 0 if lab else -2  # -2: a counted negative
            if lab == -1:
                continue
            if lab >= 0:
                lab_count[lab] += 1
            for h in range(H):
                for c in set(codes[i, j, h].tolist()) - {-1}:
                    fires[h, c] += 1
                    if lab >= 0:
                        joint[h, c, lab] += 1
    prec = np.where(fires[..., None] > 0, joint / np.maximum(fires[..., None], 1), 0)
    rec = np.where(lab_count > 0, joint / np.maximum(lab_count, 1), 0)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0)
    return prec, rec, f1, joint, fires, lab_count


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 3),
    heads=st.integers(1, 3),
    n_labels=st.integers(1, 5),
)
def test_label_attribution_matches_brute_force(seed, k, heads, n_labels):
    store, g = random_store(seed, heads=heads, k=k)
    labels = torch.randint(-1, n_labels, (store.n_seq, store.seq_len), generator=g)
    res = label_attribution(store, labels, SITE, n_labels=n_labels)
    p, r, f, joint, fires, lc = brute_attribution(
        store.get(SITE).reshape(store.n_seq, store.seq_len, heads, k).numpy(),
        labels.numpy(),
        7,
        n_labels,
    )
    assert np.array_equal(res.joint.numpy(), joint)
    assert np.array_equal(res.code_counts.numpy(), fires)
    assert np.array_equal(res.label_counts.numpy(), lc)
    for got, want in ((res.precision, p), (res.recall, r), (res.f1, f)):
        assert np.abs(got.numpy() - want).max() < 1e-6
    assert res.n_positions == int((labels >= 0).sum())


def test_bool_feature_attribution_and_ranking():
    store, g = random_store(1)
    feat = torch.rand(store.n_seq, store.seq_len, generator=g) < 0.4
    res = feature_attribution(store, feat, SITE)
    p, r, f, *_ = brute_attribution(store.get(SITE).numpy(), feat.numpy(), 7, 1, True)
    assert np.abs(res.precision.numpy() - p).max() < 1e-6
    assert np.abs(res.recall.numpy() - r).max() < 1e-6
    assert res.n_positions == store.n_tokens
    ranked = rank_codes(res, by="f1", top=5)
    flat = f[..., 0].flatten()
    want = np.sort(flat)[::-1][:5]
    assert np.allclose(ranked.f1.numpy(), want, atol=1e-6)
    for h, c, v in zip(ranked.head, ranked.code, ranked.f1):
        assert abs(f[h, c, 0] - float(v)) < 1e-6
    with pytest.raises(TypeError, match="feature"):
        feature_attribution(store, feat.long(), SITE)


def test_best_codes_and_recovery_across_sites():
    g = torch.Generator().manual_seed(0)
    n_seq, pos, n_lab = 20, 10, 4
    labels = torch.randint(-1, n_lab, (n_seq, pos), generator=g)
    # site A: head 1 code 2 is a perfect detector of label 0; site B: code 5 detects label 3
    a = torch.randint(3, 8, (n_seq, pos, 2, 1), generator=g)
    a[..., 1, 0] = torch.where(labels == 0, 2, a[..., 1, 0])
    b = torch.randint(0, 5, (n_seq, pos, 1), generator=g)
    b[..., 0] = torch.where(labels == 3, 5, b[..., 0])
    store = CodeStore.from_codes({"A": a, "B": b}, {"A": 8, "B": 6})
    results = attribution_by_site(store, labels)
    best = best_codes_per_label(results)
    assert best.site[0] == "A" and int(best.head[0]) == 1 and int(best.code[0]) == 2
    assert best.site[3] == "B" and int(best.head[3]) == 0 and int(best.code[3]) == 5
    assert float(best.precision[0]) == 1.0 and float(best.recall[0]) == 1.0
    # brute force: the best F1 over all sites, heads and codes
    for lab in range(n_lab):
        allf = torch.cat([r.f1[..., lab].flatten() for r in results.values()])
        assert abs(float(best.f1[lab]) - float(allf.max())) < 1e-7
    rec = recovered_labels(results, 0.9, 0.9)
    assert rec.tolist() == [True, False, False, True]
    # brute-force recovery count at a looser threshold
    want = []
    for lab in range(n_lab):
        want.append(
            any(
                bool(((r.precision[..., lab] >= 0.2) & (r.recall[..., lab] >= 0.2)).any())
                for r in results.values()
            )
        )
    assert recovered_labels(results, 0.2, 0.2).tolist() == want


def test_labels_shape_error():
    store, _ = random_store(0)
    with pytest.raises(ValueError, match="one label per stored position"):
        label_attribution(store, torch.zeros(3, 3, dtype=torch.long), SITE)
    with pytest.raises(KeyError, match="Available sites"):
        label_attribution(store, torch.zeros(6, 8, dtype=torch.long), "nope")


def test_token_and_regex_features_vs_brute_force():
    vocab = ["a", "b", "cd", " ", "ab", "", "x", "yy", "."]
    store, _ = random_store(2)
    toks = store.tokens.long()
    f = token_feature(store, [1, 4])
    assert torch.equal(f, (toks == 1) | (toks == 4))
    for pattern in (r"ab", r"b+c", r"[xy]+", r"d a"):
        for mode in ("overlap", "start", "end"):
            got = regex_feature(store, pattern, vocab, mode=mode)
            want = torch.zeros_like(got)
            for i, row in enumerate(toks.tolist()):
                text = "".join(vocab[t] for t in row)
                starts = np.cumsum([0] + [len(vocab[t]) for t in row])
                for m in re.finditer(pattern, text):
                    chars = range(m.start(), m.end())
                    if mode == "start":
                        chars = [m.start()]
                    elif mode == "end":
                        chars = [m.end() - 1]
                    for j in range(len(row)):
                        if any(starts[j] <= ch < starts[j + 1] for ch in chars):
                            want[i, j] = True
            assert torch.equal(got, want), (pattern, mode)
    with pytest.raises(ValueError, match="no tokenizer"):
        regex_feature(store, "a", object())

    class Tok:  # a tokenizer-like object, and a model holding it
        def decode(self, ids):
            return "".join(vocab[i] for i in ids)

    class Model:
        tokenizer = Tok()

    want = regex_feature(store, r"b+c", vocab)
    assert torch.equal(regex_feature(store, r"b+c", Tok()), want)
    assert torch.equal(regex_feature(store, r"b+c", Model()), want)


def test_top_examples_vs_brute_force():
    store, _ = random_store(4, k=2)
    codes = store.get(SITE)
    toks = store.tokens.long()
    ex = top_examples(store, SITE, code=3, n=1000, before=2, after=1)
    want = []
    for i, j, h in np.ndindex(*codes.shape[:3]):
        slots = [s for s in range(2) if int(codes[i, j, h, s]) == 3]
        if slots:
            want.append((slots[0], i, j, h))
    want.sort(key=lambda t: t[0])  # stable: dataset order within a slot
    got = list(zip(ex.slot.tolist(), ex.seq.tolist(), ex.pos.tolist(), ex.head.tolist()))
    assert got == want and ex.n_total == len(want)
    for row, (_, i, j, _) in zip(ex.context.tolist(), want):
        ctx = [int(toks[i, q]) if 0 <= q < store.seq_len else -1 for q in range(j - 2, j + 2)]
        assert row == ctx
    vocab = [chr(ord("a") + i) for i in range(9)]
    line = ex.format(vocab)[0]
    assert "[[" + vocab[int(toks[want[0][1], want[0][2]])] + "]]" in line
    only_h = top_examples(store, SITE, code=3, head=1, n=1000)
    assert set(only_h.head.tolist()) <= {1}


@pytest.mark.parametrize("offset", [0, -1, 2])
def test_code_token_table_vs_brute_force(offset):
    store, _ = random_store(6, n_seq=10, k=2)
    tab = code_token_table(store, SITE, top=3, offset=offset)
    codes, toks = store.get(SITE).numpy(), store.tokens.long().numpy()
    S, P, H, _ = codes.shape
    for h in range(H):
        for c in range(7):
            cnt: dict[int, int] = {}
            for i in range(S):
                for j in range(P):
                    if c in codes[i, j, h].tolist() and 0 <= j + offset < P:
                        t = int(toks[i, j + offset])
                        cnt[t] = cnt.get(t, 0) + 1
            ranked = sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            got = [
                (t, n)
                for t, n in zip(tab.tokens[h, c].tolist(), tab.counts[h, c].tolist())
                if t >= 0
            ]
            assert got == ranked
            assert int(tab.totals[h, c]) == sum(cnt.values())
