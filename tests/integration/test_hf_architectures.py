"""Codebooks on real Hugging Face architectures (GPT-2, GPT-NeoX, Llama) booted with
``TransformerBridge.boot_transformers``, and on their ``HookedTransformer`` counterparts.

The HF models are tiny, built by ``transformers`` from a config with random weights and saved
with ``save_pretrained`` to a temporary directory, so nothing is downloaded.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from codebook_lens import CodebookModel, boot_hf, build_model, codes_hook_name
from tests.conftest import attach_codebooks, needs_hooked

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 40


def _tokenizer():
    """A character-level tokenizer built offline (saved beside the model)."""
    vocab = {chr(33 + i): i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>", bos_token="<unk>"
    )


def _hf_config(arch: str):
    common = dict(vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    if arch == "gpt2":
        return transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4, **common)
    if arch == "neox":  # rotary on a quarter of each head, parallel attention + MLP
        return transformers.GPTNeoXConfig(
            max_position_embeddings=32, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, rotary_pct=0.25,
            use_parallel_residual=True, **common,
        )  # fmt: skip
    return transformers.LlamaConfig(  # RMSNorm, gated MLP, grouped-query attention
        max_position_embeddings=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, **common,
    )  # fmt: skip


_CLASSES = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama"])
def hf_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    cls = getattr(transformers, _CLASSES[request.param])
    cls(_hf_config(request.param)).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return request.param, d


def _boot(d, compat: bool = False):
    # No skip on a boot error: GPT-2, GPT-NeoX and Llama are architectures the README lists as
    # supported on both transformer-lens generations, so a failure here is a failure.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = boot_hf(d)
        if compat:
            model.enable_compatibility_mode()
    return model


SITES = {
    "blocks.0.attn.hook_z": dict(n_codes=24, k=2),
    "blocks.1.hook_mlp_out": dict(n_codes=24, k=1, input_norm="layernorm"),
    "blocks.0.hook_resid_post": dict(n_codes=24, k=3),
    "blocks.1.attn.hook_k": dict(n_codes=16, k=1),
}


def _tokens(n: int = 3, pos: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (n, pos), generator=torch.Generator().manual_seed(0))


def _force_code(site: str, code: int):
    def hook(codes, hook):
        out = codes.clone()
        out[..., 0] = code
        return out

    return codes_hook_name(site), hook


@pytest.mark.parametrize("compat", [False, True], ids=["raw", "compat"])
def test_codebooks_on_hf_bridge(hf_dir, compat, tmp_path):
    arch, d = hf_dir
    model = _boot(d, compat)
    tokens = _tokens()
    base = model(tokens).clone()
    cm = attach_codebooks(model, SITES, tokens)
    logits, cache = cm.run_with_cache(tokens)
    n_kv = 2 if arch == "llama" else 4
    assert cache[codes_hook_name("blocks.0.attn.hook_z")].shape == (3, 12, 4, 2)
    assert cache[codes_hook_name("blocks.1.attn.hook_k")].shape == (3, 12, n_kv, 1)
    assert cache[codes_hook_name("blocks.0.hook_resid_post")].shape == (3, 12, 3)
    z, codes = cache["blocks.0.attn.hook_z"], cache[codes_hook_name("blocks.0.attn.hook_z")]
    torch.testing.assert_close(z, cm.codebooks["blocks.0.attn.hook_z"].decode(codes))
    assert not torch.allclose(logits, base, atol=1e-3)  # the bottleneck changes the model
    with cm.disabled():
        assert torch.equal(cm(tokens), base)
    patched = cm.run_with_hooks(tokens, fwd_hooks=[_force_code("blocks.0.hook_resid_post", 5)])
    assert not torch.allclose(patched, logits, atol=1e-4)

    cm.save(tmp_path / "ck", include_model=True)
    again = CodebookModel.load(tmp_path / "ck")
    assert getattr(again.model, "compatibility_mode", False) == compat
    assert torch.equal(again(tokens), logits)
    with again.disabled():
        assert torch.equal(again(tokens), base)

    # without the KV cache: with it, attention sums in another order, and with four codebooks
    # in a row a near-tie code choice can flip (measured on GPT-2 here), so tokens may differ
    out = cm.generate(
        tokens[:1, :4], max_new_tokens=5, do_sample=False, verbose=False, use_past_kv_cache=False,
        stop_at_eos=False,
    )  # fmt: skip
    assert out.shape == (1, 9) and torch.equal(out[:, :4], tokens[:1, :4])
    greedy = tokens[:1, :4]
    for _ in range(5):
        greedy = torch.cat([greedy, cm(greedy)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, greedy)  # generation runs with the codebooks active


HOOKED_VARIANTS = {
    "rotary": dict(positional_embedding_type="rotary", rotary_dim=4),
    "parallel": dict(parallel_attn_mlp=True),
    "gated_rms_gqa": dict(
        gated_mlp=True, normalization_type="RMS", act_fn="silu", n_key_value_heads=2
    ),
    "attn_result": dict(use_attn_result=True),
}


@needs_hooked
@pytest.mark.parametrize("variant", list(HOOKED_VARIANTS))
def test_codebooks_on_hooked_counterparts(variant, tmp_path):
    cfg = dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=VOCAB,
        act_fn="gelu", normalization_type="LN", seed=0,
    ) | HOOKED_VARIANTS[variant]  # fmt: skip
    model = build_model(cfg, "hooked")
    tokens = _tokens()
    base = model(tokens).clone()
    cm = attach_codebooks(model, SITES, tokens)
    if variant == "attn_result":
        cm.add_codebook("blocks.1.attn.hook_result", n_codes=16, k=1)
    logits, cache = cm.run_with_cache(tokens)
    n_kv = 2 if variant == "gated_rms_gqa" else 4
    assert cache[codes_hook_name("blocks.1.attn.hook_k")].shape == (3, 12, n_kv, 1)
    assert not torch.allclose(logits, base, atol=1e-3)
    with cm.disabled():
        assert torch.equal(cm(tokens), base)
    patched = cm.run_with_hooks(tokens, fwd_hooks=[_force_code("blocks.0.hook_resid_post", 5)])
    assert not torch.allclose(patched, logits, atol=1e-4)
    cm.save(tmp_path / "ck", include_model=True)
    again = CodebookModel.load(tmp_path / "ck", backend="hooked")
    assert torch.equal(again(tokens), logits)
