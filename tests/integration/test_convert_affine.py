"""``input_norm="affine"`` on a model: data init, training of the LayerNorm, save and load."""

from __future__ import annotations

import torch

from codebook_lens import CodebookModel
from tests.conftest import make_model


def test_affine_codebooks_init_train_save_and_load(backend, tokens, tmp_path):
    cm = CodebookModel(make_model(backend))
    site = "blocks.1.hook_mlp_out"
    cb = cm.add_codebook(site, n_codes=8, k=2, input_norm="affine", combine="mean")
    head = cm.add_codebook("blocks.0.attn.hook_z", n_codes=6, k=1, input_norm="affine")
    assert head.ln_weight.shape == (4, 8)
    cm.init_codebooks(tokens)
    params = list(cm.codebook_parameters())
    assert any(p is cb.ln_weight for p in params) and any(p is head.ln_bias for p in params)
    opt = torch.optim.SGD(params, lr=0.1)
    cm.train()
    loss = cm(tokens, return_type="loss") + cm.aux_loss()
    loss.backward()
    opt.step()
    cm.eval()
    assert not torch.equal(cb.ln_weight, torch.ones_like(cb.ln_weight))
    with torch.no_grad():
        before = cm(tokens)
    cm.save(tmp_path / "cb")
    again = CodebookModel.load(tmp_path / "cb", model=cm.detach())
    assert torch.equal(again.codebooks[site].ln_weight, cb.ln_weight)
    assert torch.equal(again.codebooks["blocks.0.attn.hook_z"].ln_bias, head.ln_bias)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), before, rtol=0, atol=0)
