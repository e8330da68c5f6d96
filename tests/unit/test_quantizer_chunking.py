"""Chunked top-k scoring equals the unchunked computation (full score matrix + topk)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import codebook_lens.topk as kernel
from codebook_lens import Codebook, CodebookConfig, topk_codes


def _full_scores(x: torch.Tensor, codebook: torch.Tensor, similarity: str) -> torch.Tensor:
    """The whole [tokens, groups, codes] score matrix in float64 (the unchunked computation)."""
    x, c = x.double(), codebook.double()
    if similarity == "cosine":
        return torch.einsum("tgd,gnd->tgn", F.normalize(x, dim=-1), F.normalize(c, dim=-1))
    if similarity == "dot":
        return torch.einsum("tgd,gnd->tgn", x, c)
    return -torch.cdist(x.transpose(0, 1), c).transpose(0, 1)


def _assert_same_topk(ids: torch.Tensor, scores: torch.Tensor, k: int) -> None:
    """Same ids as ``scores.topk(k)``, except that within near-ties (closer than float32 rounding
    of the GEMM) any of the tied codes may come first; their scores must still agree."""
    ref_v, ref_i = scores.topk(min(k + 1, scores.shape[-1]), dim=-1)
    got_v = scores.gather(-1, ids)
    torch.testing.assert_close(got_v, ref_v[..., :k], rtol=0, atol=1e-5)
    gaps = (ref_v[..., :-1] - ref_v[..., 1:]).amin(-1) if k < ref_v.shape[-1] else None
    clear = gaps > 1e-5 if gaps is not None else torch.ones(ids.shape[:-1], dtype=torch.bool)
    assert clear.float().mean() > 0.9  # the check below must cover most rows
    assert torch.equal(ids[clear], ref_i[..., :k][clear])


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink tiles and blocks so that small inputs take every path."""
    for name, value in [
        ("_TILE_BYTES", 4 * 600),
        ("_TILE_BYTES_K", 4 * 600),
        ("_ROWS", 4),
        ("_MIN_ROWS_K", 4),
        ("_POOL", 4),
        ("_BLOCK", 8),
    ]:
        monkeypatch.setattr(kernel, name, value)


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("per_group", [None, 50, 12])
def test_chunked_equals_full_scores(small_tiles, similarity, k, groups, per_group):
    # 203 codes = 25 blocks of 8 + 3. The cache tile gives token tiles x code chunks of whole
    # blocks (two-stage top-k) and a partial tail; the budgets force code chunks narrower than
    # two blocks (plain top-k), then narrower than k (running merge of partial top-k's).
    g = torch.Generator().manual_seed(k * 7 + groups)
    x = torch.randn(40, groups, 5, generator=g)
    scale = 1 + torch.rand(groups, 203, 1, generator=g)  # varied norms: similarities disagree
    codebook = torch.randn(groups, 203, 5, generator=g) * scale
    chunk_mb = 256.0 if per_group is None else groups * per_group * 4 / 2**20
    ids = topk_codes(x, codebook, k, similarity, chunk_mb)
    assert ids.shape == (40, groups, k) and ids.dtype == torch.long
    _assert_same_topk(ids, _full_scores(x, codebook, similarity), k)


@pytest.mark.parametrize("k", [1, 8])
def test_default_geometry_matches_full_scores(k):
    # real constants: whole codebook per tile, then (smaller budgets) code chunks of whole blocks
    # with a partial last chunk, several token tiles
    g = torch.Generator().manual_seed(k)
    x = torch.randn(300, 2, 16, generator=g)
    codebook = torch.randn(2, 5000, 16, generator=g)
    full = _full_scores(x, codebook, "cosine")
    for chunk_mb in (256.0, 2.0, 0.5, 0.05):
        _assert_same_topk(topk_codes(x, codebook, k, "cosine", chunk_mb), full, k)


@pytest.mark.parametrize("n_codes", [149, 150])
def test_short_last_chunk(small_tiles, n_codes):
    # blocked chunks of 144 codes, then a last chunk of fewer codes than k blocks hold
    g = torch.Generator().manual_seed(n_codes)
    x, codebook = torch.randn(9, 1, 4, generator=g), torch.randn(1, n_codes, 4, generator=g)
    for k in (1, 3):
        ids = topk_codes(x, codebook, k, "dot", 4 * 600 / 2**20)
        _assert_same_topk(ids, _full_scores(x, codebook, "dot"), k)


def test_float32_full_matrix_agrees_exactly():
    # the literal unchunked computation in the same dtype: bmm of everything, then topk
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(200, 1, 32, generator=g), torch.randn(1, 1000, 32, generator=g)
    scores = torch.bmm(x.transpose(0, 1), F.normalize(codebook, dim=-1).transpose(1, 2))
    ref = scores.topk(4, dim=-1).indices.transpose(0, 1)
    assert torch.equal(topk_codes(x, codebook, 4, "cosine", 0.01), ref)


def test_ties_pick_the_first_code_for_k1(small_tiles):
    codebook = torch.zeros(1, 50, 3)
    codebook[0, [13, 40], 0] = 1.0  # two identical best codes in different chunks
    x = torch.tensor([[[1.0, 0.0, 0.0]]])
    for chunk_mb in (256.0, 4 * 20 / 2**20):
        assert topk_codes(x, codebook, 1, "dot", chunk_mb).item() == 13


def test_tile_never_exceeds_budget():
    cases = [(65536, 16, 10_000, 1.0), (10, 1, 10**6, 0.5), (5, 2, 7, 1e-6), (9, 1, 9, 256.0)]
    for n_tok, groups, codes, mb in cases:
        for k in (1, 8):
            if k > codes:
                continue
            per_group = kernel._budget(mb, 2**40, groups, 4)
            assert per_group * groups * 4 <= max(mb * 2**20, groups * 4)
            rows, width = kernel._geometry_top1(n_tok, codes, per_group)
            assert rows * width <= per_group and 1 <= rows <= n_tok and 1 <= width <= codes
            rows, width, padded, _ = kernel._geometry_topk(n_tok, codes, k, per_group)
            assert rows * padded <= per_group or rows * padded == 1
            assert 1 <= rows <= n_tok and 1 <= width <= min(codes, padded)


def test_empty_input():
    assert topk_codes(torch.randn(0, 2, 4), torch.randn(2, 300, 4), 3).shape == (0, 2, 3)


@pytest.mark.parametrize("combine", ["sum", "mean"])
@pytest.mark.parametrize("k", [1, 3])
def test_forward_fast_paths_match_general_path(combine, k):
    # eval/no-grad returns decode(encode(x)) without straight-through arithmetic; training keeps
    # the same value and the identity gradient
    cb = Codebook(CodebookConfig(d_in=8, n_codes=300, k=k, n_groups=2, combine=combine))
    x = torch.randn(4, 9, 2, 8, generator=torch.Generator().manual_seed(1))
    ref = cb.decode(cb.encode(x))
    with torch.no_grad():
        assert torch.equal(cb.eval()(x), ref)
    xr = x.clone().requires_grad_(True)
    out = cb.train()(xr)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(x))
