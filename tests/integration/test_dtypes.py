"""bf16 / fp16 models with codebooks on both backends: forward, run_with_cache, a training step
and save/load keep the model's dtype (the codebook parameters stay float32 and are cast at use,
or follow ``cm.to(dtype)``)."""

from __future__ import annotations

import pytest
import torch

from codebook_lens import CodebookModel
from codebook_lens.training import TrainConfig, train_codebooks
from tests.conftest import attach_codebooks, make_model

LOW = [torch.bfloat16, torch.float16]
SITES = {
    "blocks.0.hook_resid_post": dict(n_codes=16, k=2),
    "blocks.0.attn.hook_z": dict(n_codes=8, input_norm="affine"),
    "blocks.1.hook_mlp_out": dict(n_codes=8, input_norm="layernorm", use_error_term=True),
}


def _cm(backend: str, dtype: torch.dtype) -> CodebookModel:
    return attach_codebooks(make_model(backend).to(dtype), SITES)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_forward_and_cache_keep_the_model_dtype(backend, tokens, dtype):
    cm = _cm(backend, dtype).eval()
    logits = cm(tokens)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    _, cache = cm.run_with_cache(tokens)
    for name in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"):
        assert cache[name].dtype == dtype, name  # the residual stream is not promoted
    for site, kw in SITES.items():
        codes = cache[f"{site}.hook_codes"]
        assert not codes.dtype.is_floating_point
        assert ((codes >= 0) & (codes < kw["n_codes"])).all()
    for cb in cm.codebooks.values():
        assert cb.codebook.dtype == torch.float32  # parameters stay float32 (cast at use)
    with cm.disabled():
        base = cm(tokens)
    assert base.dtype == dtype and torch.equal(base, cm.detach()(tokens))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_codes_match_float32_mostly(backend, tokens, dtype):
    """Same weights in float32 and low precision: codes agree at most positions (near ties may
    flip); float16 is scored in float32, so it agrees at least as well as bfloat16 does."""
    cm32 = _cm(backend, torch.float32).eval()
    cm_low = _cm(backend, dtype).eval()
    cm_low.model.load_state_dict({k: v.to(dtype) for k, v in cm32.model.state_dict().items()})
    site = "blocks.0.hook_resid_post.hook_codes"
    c32 = cm32.run_with_cache(tokens)[1][site][..., 0]
    clow = cm_low.run_with_cache(tokens)[1][site][..., 0]
    assert (c32 == clow).float().mean() >= 0.8


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_training_step_and_save_load(backend, tokens, dtype, tmp_path):
    cm = _cm(backend, dtype)
    before = {s: cb.codebook.detach().clone() for s, cb in cm.codebooks.items()}
    # Adam on float16 weights divides by an eps that float16 rounds to 0 (plain PyTorch, with or
    # without codebooks): float16 models train their float32 codebooks only.
    freeze = dtype == torch.float16
    cfg = TrainConfig(
        steps=3, lr=1e-2, warmup_steps=0, log_every=1, progress=False, freeze_model=freeze
    )
    res = train_codebooks(cm, [tokens] * 3, cfg)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    for s, cb in cm.codebooks.items():
        assert cb.codebook.dtype == torch.float32
        assert not torch.equal(cb.codebook.detach(), before[s]), s
    assert next(cm.model.parameters()).dtype == dtype
    cm.eval()
    logits, cache = cm.run_with_cache(tokens)
    cm.save(tmp_path / "ck")
    model2 = make_model(backend).to(dtype)
    model2.load_state_dict(cm.model.state_dict())
    loaded = CodebookModel.load(tmp_path / "ck", model2).eval()
    logits2, cache2 = loaded.run_with_cache(tokens)
    assert logits2.dtype == dtype and torch.equal(logits2, logits)
    for site in SITES:
        assert torch.equal(cache2[f"{site}.hook_codes"], cache[f"{site}.hook_codes"])


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_codebooks_cast_with_the_model(backend, tokens, dtype):
    """``cm.to(dtype)`` casts the codebook parameters too; everything then runs in ``dtype``."""
    cm = _cm(backend, torch.float32).to(dtype).eval()
    for cb in cm.codebooks.values():
        assert cb.codebook.dtype == dtype
    logits, cache = cm.run_with_cache(tokens)
    assert logits.dtype == dtype and cache["blocks.1.hook_resid_pre"].dtype == dtype
    cm.train()
    loss = cm(tokens, return_type="loss") + cm.aux_loss()
    loss.backward()
    for cb in cm.codebooks.values():
        assert cb.codebook.grad is not None and cb.codebook.grad.dtype == dtype
        assert torch.isfinite(cb.codebook.grad).all()


def test_init_codebooks_in_bfloat16(backend, tokens):
    cm = _cm(backend, torch.bfloat16)
    cm.init_codebooks(tokens)
    for cb in cm.codebooks.values():
        assert cb.codebook.dtype == torch.float32 and torch.isfinite(cb.codebook).all()
    assert cm(tokens).dtype == torch.bfloat16
