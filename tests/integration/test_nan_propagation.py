"""NaN is never hidden: a model whose activations turn non-finite gives non-finite logits with
codebooks too, at the same positions, in plain forward passes with and without gradients (the
codes there are empty, and the analysis entry points raise instead)."""

from __future__ import annotations

import pytest
import torch

from codebook_lens import CodebookModel
from tests.conftest import make_model

SITES = {
    "blocks.0.attn.hook_z": dict(n_codes=16, k=2),
    "blocks.0.hook_mlp_out": dict(n_codes=16, k=1, input_norm="layernorm"),
    "blocks.0.hook_resid_post": dict(n_codes=16, k=1, use_error_term=True),
    "blocks.1.hook_resid_post": dict(n_codes=16, k=1),  # everything downstream passes here
}


def _poison(act, hook):  # NaN in one position's embedding: attention carries it on
    act = act.clone()
    act[:, 3, 0] = float("nan")
    return act


@pytest.mark.parametrize("grad", [False, True])
def test_nan_reaches_the_logits_with_codebooks_as_without(backend, tokens, grad):
    model = make_model(backend)
    with torch.no_grad():
        bare = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", _poison)])
    cm = CodebookModel(model)
    for site, fields in SITES.items():
        cm.add_codebook(site, **fields)
    cm.init_codebooks(tokens)
    with torch.set_grad_enabled(grad):
        with cm.hooks(fwd_hooks=[("hook_embed", _poison)]):
            logits = cm(tokens)  # a plain forward: the training path, no check, no host sync
        clean = cm(tokens)
        with pytest.raises(ValueError, match="NaN or inf"):  # analysis entry points raise
            cm.run_with_hooks(tokens, fwd_hooks=[("hook_embed", _poison)])
    want = ~torch.isfinite(bare).all(-1)
    assert bool(want[:, 3:].all())  # the bare model's NaNs (earlier ones too, by its masking)
    assert torch.equal(~torch.isfinite(logits).all(-1), want)
    assert bool(torch.isfinite(clean).all())  # finite inputs stay finite (and exact)
    with cm.disabled(), torch.no_grad():
        assert torch.equal(cm(tokens), model(tokens))


def test_finite_outputs_are_unchanged_by_the_nan_path(backend, tokens):
    cm = CodebookModel(make_model(backend))
    cb = cm.add_codebook("blocks.0.hook_mlp_out", n_codes=16, k=2)
    cm.init_codebooks(tokens)
    x = torch.randn(4, 5, cb.cfg.d_in)
    with torch.no_grad():
        assert torch.equal(cb(x), cb.decode(cb.encode(x)))  # x - x is exactly 0 when finite
