"""A CodebookModel next to SAELens on transformer-lens 3.x: a codebook and an SAE at different
hook points of one ``HookedSAETransformer``, both active, read from one cache."""

from __future__ import annotations

import pytest
import torch

from codebook_lens import CodebookModel, codes_hook_name
from tests.conftest import TINY, needs_hooked

sae_lens = pytest.importorskip("sae_lens", reason="SAELens is installed in the 3.x leg only")

SAE_SITE, CB_SITE = "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"


def _model_and_sae():
    from transformer_lens import HookedTransformerConfig

    model = sae_lens.HookedSAETransformer(HookedTransformerConfig(**TINY)).eval()
    cfg = sae_lens.StandardSAEConfig(d_in=TINY["d_model"], d_sae=64)
    cfg.metadata.hook_name = SAE_SITE
    torch.manual_seed(0)
    sae = sae_lens.StandardSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return model, sae


@needs_hooked
def test_codebook_and_sae_together():
    model, sae = _model_and_sae()
    tokens = torch.randint(0, TINY["d_vocab"], (3, 10), generator=torch.Generator().manual_seed(1))
    base = model(tokens).clone()
    cm = CodebookModel(model)
    cm.add_codebook(CB_SITE, n_codes=16, k=1)
    cm.init_codebooks(tokens)
    cb_only = cm(tokens).clone()
    model.add_sae(sae)
    both, cache = cm.run_with_cache(tokens)
    codes = cache[codes_hook_name(CB_SITE)]
    acts = cache[f"{SAE_SITE}.hook_sae_acts_post"]
    assert codes.shape == (3, 10, 4, 1) and acts.shape == (3, 10, 64)
    assert (acts > 0).any()
    # the SAE reads the residual stream that the quantized heads wrote
    resid = cache[f"{SAE_SITE}.hook_sae_input"]
    torch.testing.assert_close(acts, sae.encode(resid))
    assert not torch.allclose(both, cb_only) and not torch.allclose(both, base)
    with cm.disabled():  # the SAE alone
        sae_only = cm(tokens)
    assert not torch.allclose(sae_only, base) and not torch.allclose(sae_only, both)
    model.reset_saes()  # the codebook alone again, bit for bit
    assert torch.equal(cm(tokens), cb_only)
    model.add_sae(sae)
    cm.detach()  # removing the codebook leaves the SAE working
    torch.testing.assert_close(model(tokens), sae_only)
    model.reset_saes()
    assert torch.equal(model(tokens), base)
