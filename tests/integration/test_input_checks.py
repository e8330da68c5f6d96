"""Inputs are checked where they enter: activations must be real floating point (a TypeError
naming the site and dtype, not torch's error), and a codes hook may remove every slot (the
site then receives nothing from its codebook: zeros, as a zero ablation)."""

from __future__ import annotations

import pytest
import torch

from codebook_lens import Codebook, CodebookConfig, CodebookModel
from tests.conftest import make_model

BAD = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", BAD)
def test_non_float_activations_are_a_type_error_naming_the_dtype(dtype, user_view):
    cb = Codebook(CodebookConfig(d_in=8, n_codes=16, k=2))
    x = torch.ones(3, 8, dtype=dtype)
    for call in (cb, cb.encode):
        with pytest.raises(TypeError, match=rf"floating-point tensor.*got {dtype}"):
            call(x)


@pytest.mark.parametrize("site", ["blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"])
def test_a_hook_removing_every_slot_zeroes_the_site(backend, tokens, site):
    model = make_model(backend)
    with torch.no_grad():
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(site, lambda a, hook: a * 0)])
    cm = CodebookModel(model)
    cm.add_codebook(site, n_codes=16, k=2)
    cm.init_codebooks(tokens)
    with torch.no_grad():
        out = cm.run_with_hooks(
            tokens, fwd_hooks=[(f"{site}.hook_codes", lambda c, hook: c[..., :0])]
        )
    torch.testing.assert_close(out, zeroed, rtol=0, atol=1e-6)
    assert not torch.allclose(out, cm(tokens))  # the patch did change something
