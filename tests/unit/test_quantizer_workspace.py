"""A reused score-tile Workspace changes nothing: codes equal fresh calls and the full scores."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens import Codebook, CodebookConfig, topk_codes
from codebook_lens.topk import Workspace
from tests.unit.test_quantizer_chunking import _assert_same_topk, _full_scores

CPU = torch.device("cpu")


def _poison(ws: Workspace) -> None:
    """Fill whatever the workspace holds with NaN (what a previous call could have left)."""
    if ws.nbytes:
        with ws.tile(ws.nbytes // 4, torch.float32, CPU) as t:
            t.fill_(float("nan"))


@settings(max_examples=25, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.integers(0, 60),  # tokens
            st.integers(1, 3),  # groups
            st.integers(2, 9),  # d
            st.integers(1, 3000),  # codes
            st.sampled_from([1, 2, 8]),  # k
            st.sampled_from(["cosine", "dot", "euclidean"]),
            st.sampled_from([256.0, 0.05, 0.002]),  # chunk_mb: whole codebook, chunks, tiny
        ),
        min_size=2,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
def test_reused_workspace_equals_fresh_calls(calls, seed):
    # one workspace through calls of varied shapes, k, similarities and tile budgets, poisoned
    # between calls: every result equals a call without a workspace (same tiles, fresh memory)
    ws = Workspace()
    g = torch.Generator().manual_seed(seed)
    for n_tok, groups, d, n_codes, k, similarity, chunk_mb in calls:
        k = min(k, n_codes)
        x = torch.randn(n_tok, groups, d, generator=g)
        codebook = torch.randn(groups, n_codes, d, generator=g)
        _poison(ws)
        got = topk_codes(x, codebook, k, similarity, chunk_mb, workspace=ws)
        assert torch.equal(got, topk_codes(x, codebook, k, similarity, chunk_mb))


@pytest.mark.parametrize("k", [1, 8])
def test_reused_workspace_matches_full_scores(k):
    # the default geometry (two-stage top-k over whole blocks, -inf pad columns) after the tile
    # was used by a wider call and poisoned
    ws = Workspace()
    g = torch.Generator().manual_seed(k)
    wide = torch.randn(2, 6000, 16, generator=g)
    topk_codes(torch.randn(300, 2, 16, generator=g), wide, k, workspace=ws)
    held = ws.nbytes
    x, codebook = torch.randn(300, 2, 16, generator=g), torch.randn(2, 5000, 16, generator=g)
    for chunk_mb in (256.0, 2.0, 0.5):
        _poison(ws)
        ids = topk_codes(x, codebook, k, "cosine", chunk_mb, workspace=ws)
        _assert_same_topk(ids, _full_scores(x, codebook, "cosine"), k)
    assert ws.nbytes == held  # smaller tiles reuse the memory, nothing grows


def test_workspace_holds_the_largest_tile_and_clears():
    ws = Workspace()
    assert ws.nbytes == 0
    x, codebook = torch.randn(100, 1, 8), torch.randn(1, 4000, 8)
    topk_codes(x, codebook, 8, chunk_mb=0.5, workspace=ws)
    assert 0 < ws.nbytes <= 0.5 * 2**20  # never more than chunk_mb
    topk_codes(x, codebook, 8, chunk_mb=1.0, workspace=ws)
    big = ws.nbytes
    assert 0.5 * 2**20 < big <= 2**20
    topk_codes(x, codebook, 8, chunk_mb=0.5, workspace=ws)
    assert ws.nbytes == big
    ws.clear()
    assert ws.nbytes == 0


def test_overlapping_use_gets_its_own_tile():
    # while the workspace is held (another thread inside topk_codes), a call does not wait and
    # does not write into the held tile
    ws = Workspace()
    x, codebook = torch.randn(50, 2, 8), torch.randn(2, 3000, 8)
    expected = topk_codes(x, codebook, 8, workspace=ws)
    assert ws.nbytes > 0
    with ws.tile(ws.nbytes // 4, torch.float32, CPU) as held:
        held.fill_(7.0)
        done: list[torch.Tensor] = []
        t = threading.Thread(target=lambda: done.append(topk_codes(x, codebook, 8, workspace=ws)))
        t.start()
        t.join(timeout=60)
        assert done and torch.equal(done[0], expected)
        assert bool((held == 7.0).all())


def test_nothing_is_kept_off_the_cpu():
    ws = Workspace()
    with ws.tile(1000, torch.float32, torch.device("meta")) as t:
        assert t.device.type == "meta" and t.numel() == 1000
    assert ws.nbytes == 0


def test_codebook_copies_start_with_an_empty_workspace():
    cb = Codebook(CodebookConfig(d_in=8, n_codes=600, k=3, n_groups=2))
    x = torch.randn(4, 9, 2, 8, generator=torch.Generator().manual_seed(0))
    codes = cb.encode(x)
    assert cb.workspace.nbytes > 0
    twin = copy.deepcopy(cb)
    assert twin.workspace is not cb.workspace and twin.workspace.nbytes == 0
    assert torch.equal(twin.encode(x), codes)
    assert "workspace" not in cb.state_dict()
