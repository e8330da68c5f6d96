"""``input_norm="affine"``: a learned LayerNorm per group in front of the codebook (the reference's
choice), trained with the codebook's parameters and kept in checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codebook_lens import CheckpointError, Codebook, CodebookConfig


def _cb(**kw) -> Codebook:
    cb = Codebook(CodebookConfig(**{"d_in": 6, "n_codes": 9, "k": 2, "seed": 1, **kw}))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        cb.ln_weight.copy_(1 + 0.5 * torch.randn(cb.ln_weight.shape, generator=g))
        cb.ln_bias.copy_(0.5 * torch.randn(cb.ln_bias.shape, generator=g))
    return cb


@pytest.mark.parametrize("n_groups", [1, 3])
def test_affine_norm_is_a_layernorm_per_group(n_groups):
    cb = _cb(input_norm="affine", n_groups=n_groups)
    assert cb.ln_weight.shape == cb.ln_bias.shape == (n_groups, 6)
    shape = (2, 5, n_groups, 6) if n_groups > 1 else (2, 5, 6)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 4 + 1
    for g in range(n_groups):
        xg = x[..., g, :] if n_groups > 1 else x
        ref = torch.nn.LayerNorm(6, eps=1e-5)
        with torch.no_grad():
            ref.weight.copy_(cb.ln_weight[g])
            ref.bias.copy_(cb.ln_bias[g])
        got = cb.normalize_input(x)
        got = got[..., g, :] if n_groups > 1 else got
        torch.testing.assert_close(got, ref(xg), rtol=0, atol=1e-6)


def test_affine_with_identity_parameters_equals_layernorm():
    x = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(5)) * 10
    plain = Codebook(CodebookConfig(d_in=6, n_codes=9, input_norm="layernorm", seed=1))
    affine = Codebook(CodebookConfig(d_in=6, n_codes=9, input_norm="affine", seed=1))
    assert torch.equal(plain.codebook, affine.codebook)
    assert torch.equal(plain(x), affine(x))
    assert torch.equal(plain.encode(x), affine.encode(x))


def test_other_norms_have_no_norm_parameters():
    for norm in ("none", "layernorm"):
        cb = Codebook(CodebookConfig(d_in=6, n_codes=9, input_norm=norm))
        assert [n for n, _ in cb.named_parameters()] == ["codebook"]
        assert not {"ln_weight", "ln_bias"} & set(cb.state_dict())


def test_norm_parameters_train_with_the_codebook():
    cb = _cb(input_norm="affine", similarity="euclidean")
    cb.train()
    x = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(6), requires_grad=True)
    (cb(x) * torch.arange(6.0)).sum().backward()
    assert cb.ln_weight.grad is not None and cb.ln_weight.grad.abs().sum() > 0
    assert cb.ln_bias.grad is not None and cb.ln_bias.grad.abs().sum() > 0
    # straight-through: the input gets the gradient of the normalised input
    xn = F.layer_norm(x, (6,)) * cb.ln_weight[0] + cb.ln_bias[0]
    (expect,) = torch.autograd.grad((xn * torch.arange(6.0)).sum(), x)
    torch.testing.assert_close(x.grad, expect)
    assert {n for n, _ in cb.named_parameters()} == {"codebook", "ln_weight", "ln_bias"}


def test_norm_state_load_checks_names_and_shapes():
    cb = _cb(input_norm="affine", n_groups=2)
    other = _cb(input_norm="affine", n_groups=2)
    with torch.no_grad():
        other.ln_bias.add_(1.0)
    cb.load_state_dict(Codebook.checked_state(other.state_dict(), cb.cfg, "other"), strict=False)
    assert torch.equal(cb.ln_bias, other.ln_bias)
    with pytest.raises(CheckpointError, match="has no tensor 'ln_bias'"):
        Codebook.checked_state({"codebook": cb.codebook, "ln_weight": cb.ln_weight}, cb.cfg, "x")
    with pytest.raises(
        CheckpointError, match=r"ln_weight has shape \(6,\), but its config says \(2, 6\)"
    ):
        Codebook.checked_state(
            {"codebook": cb.codebook, "ln_weight": torch.ones(6), "ln_bias": torch.zeros(2, 6)},
            cb.cfg,
            "x",
        )


def test_config_validation():
    with pytest.raises(ValueError, match="input_norm='batchnorm'.*affine"):
        CodebookConfig(d_in=4, n_codes=4, input_norm="batchnorm")
    with pytest.raises(ValueError, match="norm_eps must be > 0"):
        CodebookConfig(d_in=4, n_codes=4, input_norm="affine", norm_eps=0.0)
    cfg = CodebookConfig(d_in=4, n_codes=4, input_norm="affine", norm_eps=1e-6)
    assert CodebookConfig.from_dict(cfg.to_dict()) == cfg
