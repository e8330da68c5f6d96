"""Codebook against the brute-force numpy reference, plus gradients, usage and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens import Codebook, CodebookConfig
from tests.unit.bruteforce import bf_decode, bf_quantize, bf_select


def _cb(**kw) -> Codebook:
    cfg = CodebookConfig(**{"d_in": 6, "n_codes": 17, "seed": 3, **kw})
    cb = Codebook(cfg)
    with torch.no_grad():  # codes of varied norms so dot/euclid/cosine disagree
        cb.codebook.mul_(
            torch.rand(cfg.n_groups, cfg.n_codes, 1, generator=torch.Generator().manual_seed(0)) * 3
        )
    return cb


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("combine", ["sum", "mean"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("n_groups", [1, 4])
def test_forward_matches_bruteforce(similarity, combine, k, n_groups):
    cb = _cb(similarity=similarity, combine=combine, k=k, n_groups=n_groups)
    g = torch.Generator().manual_seed(k * 10 + n_groups)
    shape = (2, 5, n_groups, 6) if n_groups > 1 else (2, 5, 6)
    x = torch.randn(*shape, generator=g) * 2
    codes = cb.encode(x)
    assert codes.dtype == torch.int64
    assert codes.shape == (*shape[:-1], k)
    flat = x.reshape(-1, n_groups, 6).numpy()
    w = cb.codebook.detach().numpy()
    np.testing.assert_array_equal(
        codes.reshape(-1, n_groups, k).numpy(), bf_select(flat, w, k, similarity)
    )
    out = cb(x).detach().reshape(-1, n_groups, 6).numpy()
    np.testing.assert_allclose(out, bf_quantize(flat, w, cb.cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
def test_layernorm_input_matches_bruteforce(similarity):
    cb = _cb(similarity=similarity, input_norm="layernorm", k=2)
    x = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(5)) * 10 + 3
    out = cb(x).detach().reshape(-1, 1, 6).numpy()
    ref = bf_quantize(x.reshape(-1, 1, 6).numpy(), cb.codebook.detach().numpy(), cb.cfg)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_decode_empty_slots(combine):
    cb = _cb(combine=combine, k=3, n_groups=2)
    ids = torch.tensor([[[0, -1, 5], [-1, -1, -1]], [[2, 2, -1], [16, 3, 1]]])
    out = cb.decode(ids).detach().numpy()
    ref = bf_decode(ids.numpy(), cb.codebook.detach().numpy(), combine, 3)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert np.all(out[0, 1] == 0)  # all-empty slots contribute nothing


def test_slot_zero_is_most_similar():
    cb = _cb(k=5)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    codes = cb.encode(x)
    cn = torch.nn.functional.normalize(cb.codebook.detach()[0], dim=-1)
    s = torch.nn.functional.normalize(x, dim=-1) @ cn.T
    chosen = s.gather(1, codes)
    assert torch.all(chosen[:, :-1] >= chosen[:, 1:])
    assert torch.allclose(chosen[:, 0], s.max(1).values)


def test_straight_through_gradient():
    cb = _cb(k=2, n_groups=2)
    x = torch.randn(3, 4, 2, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = cb(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, grad_out)  # identity to the input
    assert cb.codebook.grad is not None
    used = torch.zeros(2, 17, dtype=torch.bool)
    codes = cb.encode(x.detach())
    for g in range(2):
        used[g, codes[..., g, :].unique()] = True
    assert (cb.codebook.grad.abs().sum(-1) > 0).eq(used).all()  # exactly the chosen codes


def test_reconstruction_loss_is_explicit_and_trains_codes():
    cb = _cb(k=1, recon_coef=1.0)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    cb(x)
    expected = (cb.decode(cb.encode(x)) - x).pow(2).mean()
    torch.testing.assert_close(cb.last_losses["recon"], expected)
    cb.aux_loss().backward()
    assert cb.codebook.grad.abs().sum() > 0


def test_usage_counted_only_in_training():
    cb = _cb(k=2, n_groups=3)
    x = torch.randn(10, 3, 6, generator=torch.Generator().manual_seed(0))
    cb.eval()
    cb(x)
    assert cb.code_counts.sum() == 0
    cb.train()
    cb(x)
    codes = cb.encode(x)
    ref = torch.zeros(3, 17)
    for g in range(3):
        ref[g] += torch.bincount(codes[:, g].reshape(-1), minlength=17)
    torch.testing.assert_close(cb.code_counts, ref)
    assert cb.code_counts.sum() == 10 * 3 * 2


def test_error_term_keeps_value_but_passes_interventions():
    cb = _cb(k=1, use_error_term=True)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cb(x), x)

    def force(codes, hook):
        return torch.zeros_like(codes)

    cb.hook_codes.add_hook(force)
    clean = cb.decode(cb.encode(x))
    expected = x + (cb.decode(torch.zeros(5, 1, dtype=torch.long)) - clean)
    torch.testing.assert_close(cb(x), expected)
    cb.hook_codes.remove_hooks()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    n_codes=st.integers(1, 30),
    k=st.integers(1, 5),
    groups=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_encode_decode_invariants(n, n_codes, k, groups, seed):
    k = min(k, n_codes)
    cb = Codebook(CodebookConfig(d_in=4, n_codes=n_codes, k=k, n_groups=groups, seed=seed))
    x = torch.randn(n, groups, 4, generator=torch.Generator().manual_seed(seed))
    x = x if groups > 1 else x[:, 0]
    codes = cb.encode(x)
    assert codes.min() >= 0 and codes.max() < n_codes
    # k distinct codes per position and group
    srt = codes.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()
    # under cosine a code's own vector is its unique best match
    vec = cb.decode(codes[..., :1])
    assert torch.equal(cb.encode(vec)[..., 0], codes[..., 0])
    torch.testing.assert_close(cb.decode(codes), cb.decode(codes.flip(-1)))


def test_config_errors_are_actionable():
    with pytest.raises(ValueError, match="k=5 exceeds n_codes=4"):
        CodebookConfig(d_in=3, n_codes=4, k=5)
    with pytest.raises(ValueError, match="similarity='manhattan'; choose one of"):
        CodebookConfig(d_in=3, n_codes=4, similarity="manhattan")
    with pytest.raises(ValueError, match="d_in must be a positive int"):
        CodebookConfig(d_in=0, n_codes=4)
    with pytest.raises(ValueError, match="unknown field"):
        CodebookConfig.from_dict({"d_in": 3, "n_codes": 4, "bogus": 1})
    cb = _cb()
    with pytest.raises(ValueError, match="last dimension d_in=6"):
        cb.encode(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"code ids must lie in \[-1, 17\)"):
        cb.check_codes(torch.tensor([[17]]))


def test_flatten_input_gives_rows_per_group():
    grouped = Codebook(CodebookConfig(d_in=4, n_codes=8, n_groups=2))
    assert grouped.flatten_input(torch.randn(3, 5, 2, 4)).shape == (15, 2, 4)
    with pytest.raises(ValueError, match=r"grouped Codebook expects \[..., n_groups=2, 4\]"):
        grouped.flatten_input(torch.randn(3, 4))
    plain = Codebook(CodebookConfig(d_in=4, n_codes=8))
    assert plain.flatten_input(torch.randn(3, 5, 4)).shape == (15, 1, 4)
    with pytest.raises(ValueError, match="last dimension d_in=4"):
        plain.flatten_input(torch.randn(3, 5))
