"""Merging near-duplicate codes against a pairwise brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens import Codebook, CodebookConfig
from tests.unit.bruteforce import bf_merge


def _codebook(seed: int, n_groups: int, n_codes: int, d: int, n_dups: int) -> Codebook:
    """Random codes with ``n_dups`` planted near-copies per group, and random usage (zeros and
    ties included)."""
    g = torch.Generator().manual_seed(seed)
    cb = Codebook(CodebookConfig(d_in=d, n_codes=n_codes, n_groups=n_groups))
    w = torch.randn(n_groups, n_codes, d, generator=g)
    src = torch.randint(n_codes, (n_groups, n_dups), generator=g)
    dst = torch.randint(n_codes, (n_groups, n_dups), generator=g)
    for h in range(n_groups):
        noise = 0.3 * torch.randn(n_dups, d, generator=g)
        w[h, dst[h]] = w[h, src[h]] * (0.5 + torch.rand(n_dups, 1, generator=g)) + noise
    with torch.no_grad():
        cb.codebook.copy_(w)
    cb.set_usage(window_counts=torch.randint(0, 4, (n_groups, n_codes), generator=g).float())
    return cb


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_groups=st.integers(1, 3),
    n_codes=st.integers(2, 40),
    threshold=st.sampled_from([0.3, 0.8, 0.95]),
)
def test_parked_codes_match_brute_force(seed, n_groups, n_codes, threshold):
    cb = _codebook(seed, n_groups, n_codes, d=6, n_dups=n_codes // 2)
    w0 = cb.codebook.detach().clone()
    want = bf_merge(w0.numpy(), cb.window_counts.numpy(), threshold)
    # a tiny budget forces one code row per similarity tile
    got = cb.merge_duplicate_codes(threshold, chunk_mb=1e-6)
    np.testing.assert_array_equal(got.numpy(), want)
    w = cb.codebook.detach()
    assert torch.equal(w[got], torch.zeros_like(w[got]))
    assert torch.equal(w[~got], w0[~got])


def test_merging_moves_positions_to_the_survivor_and_defaults_to_the_config():
    cfg = CodebookConfig(d_in=4, n_codes=3, merge_threshold=0.9)
    cb = Codebook(cfg)
    with torch.no_grad():
        cb.codebook.copy_(torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0.1, 0, 0]]]))
    x = torch.tensor([[1.0, 0.2, 0, 0], [1.0, -0.1, 0, 0], [0, 1.0, 0, 0]])
    cb.train()
    cb(x)
    assert cb.encode(x)[:, 0].tolist() == [2, 0, 1]
    parked = cb.merge_duplicate_codes()  # code 0 and 2 are used once each: id 0 wins the tie
    assert parked.tolist() == [[False, False, True]]
    assert cb.encode(x)[:, 0].tolist() == [0, 0, 1]
    assert not cb.merge_duplicate_codes(threshold=0.0).any()


def test_merge_threshold_is_validated():
    with pytest.raises(ValueError, match="merge_threshold must be in"):
        CodebookConfig(d_in=4, n_codes=8, merge_threshold=1.0)


def test_maintenance_schedule_and_reseed_mask():
    cb = Codebook(CodebookConfig(d_in=3, n_codes=4, dead_code_threshold=1, replace_every=5))
    assert [s for s in range(1, 16) if cb.maintenance_due(s)] == [5, 10, 15]
    assert not Codebook(CodebookConfig(d_in=3, n_codes=4, replace_every=5)).maintenance_due(5)
    cb.train()
    cb(torch.randn(10, 3, generator=torch.Generator().manual_seed(0)))
    unused = cb.window_counts == 0
    mask = cb.reseed_dead_codes()
    assert torch.equal(mask, unused) and not cb.window_counts.any()
