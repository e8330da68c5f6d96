"""The SAELens architecture "codebook" (transformer-lens 3.x leg, where SAELens installs): spliced
into a ``HookedSAETransformer`` it computes what the CodebookModel computes, chooses the same
codes, survives SAELens's own save / load, and matches a numpy brute force on random inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codebook_lens import CodebookModel, codes_hook_name
from tests.conftest import TINY, needs_hooked

sae_lens = pytest.importorskip("sae_lens", reason="SAELens is installed in the 3.x leg only")
from codebook_lens.saelens import (  # noqa: E402
    CodebookSAE,
    CodebookSAEConfig,
    codebook_from_sae,
    to_sae_lens,
)

pytestmark = needs_hooked
H, DH, D = TINY["n_heads"], TINY["d_head"], TINY["d_model"]

# (site, codebook fields): every layout a codebook can have at a site SAELens can splice into
CASES = {
    "z_per_head": ("blocks.0.attn.hook_z", dict(n_codes=16, k=2)),
    "z_shared": ("blocks.1.attn.hook_z", dict(n_codes=12, k=1, n_groups=1)),
    "z_flat": ("blocks.0.attn.hook_z", dict(n_codes=24, k=2, d_in=H * DH, n_groups=1)),
    "mlp_out_ln": ("blocks.1.hook_mlp_out", dict(n_codes=32, k=1, input_norm="layernorm")),
    "mlp_out_split": ("blocks.0.hook_mlp_out", dict(n_codes=10, k=2, d_in=D // 2, n_groups=2)),
    "resid_affine": (
        "blocks.0.hook_resid_post",
        dict(n_codes=20, k=3, combine="mean", input_norm="affine", similarity="dot"),
    ),
}


def _tokens(seed: int = 1, n: int = 4) -> torch.Tensor:
    return torch.randint(0, TINY["d_vocab"], (n, 12), generator=torch.Generator().manual_seed(seed))


def _model():
    from transformer_lens import HookedTransformerConfig

    return sae_lens.HookedSAETransformer(HookedTransformerConfig(**TINY)).eval()


def _codebook_model(site: str, fields: dict) -> CodebookModel:
    cm = CodebookModel(_model())
    cb = cm.add_codebook(site, **fields)
    cm.init_codebooks(_tokens(seed=2, n=16))
    if "ln_weight" in dict(cb.named_parameters()):  # a learned norm that is not the identity
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            cb.ln_weight.copy_(1 + 0.3 * torch.randn(cb.ln_weight.shape, generator=g))
            cb.ln_bias.copy_(0.2 * torch.randn(cb.ln_bias.shape, generator=g))
    return cm.eval()


def _feature_ids(acts: torch.Tensor, n_codes: int, k: int) -> torch.Tensor:
    """The chosen codes per block as sorted ids ``[..., n_blocks, k]`` from feature acts."""
    per_block = acts.reshape(*acts.shape[:-1], -1, n_codes)
    return (per_block != 0).nonzero()[:, -1].reshape(*per_block.shape[:-1], k)


@pytest.mark.parametrize("case", CASES)
def test_spliced_in_it_computes_what_the_codebook_model_computes(case):
    site, fields = CASES[case]
    cm = _codebook_model(site, fields)
    tokens = _tokens()
    logits, cache = cm.run_with_cache(tokens)
    codes = cache[codes_hook_name(site)]
    sae = to_sae_lens(cm, site)
    model = cm.detach()
    model.add_sae(sae)
    sae_logits, sae_cache = model.run_with_cache(tokens)
    torch.testing.assert_close(sae_logits, logits, atol=2e-5, rtol=0)
    acts = sae_cache[f"{site}.hook_sae_acts_post"]
    cfg = sae.cfg
    assert acts.shape == (*tokens.shape, cfg.n_blocks * cfg.n_codes)
    k = fields["k"]
    ours = codes.reshape(*tokens.shape, -1, k).sort(-1).values  # flat sites: one block
    if case == "z_shared":  # one codebook, its codes chosen head by head
        assert ours.shape[-2] == H and cfg.n_blocks == H
    assert torch.equal(_feature_ids(acts, cfg.n_codes, k), ours)
    value = torch.tensor(1 / k if fields.get("combine") == "mean" else 1.0)
    assert acts.unique().tolist() == [0.0, value.item()]
    torch.testing.assert_close(sae.decode(acts), sae_cache[f"{site}.hook_sae_recons"].view_as(
        sae.decode(acts)))  # fmt: skip


def test_with_the_error_term_an_ablation_moves_both_alike():
    """use_error_term on both: unpatched, the base model's logits; with code 3 of head 1
    ablated (in the SAE: its feature zeroed), the same change in both."""
    site, fields = CASES["z_per_head"]
    cm = _codebook_model(site, {**fields, "use_error_term": True})
    tokens = _tokens()
    with cm.disabled():
        base = cm(tokens)
    n = fields["n_codes"]

    def drop_code(codes, hook):
        codes[..., 1, :] = torch.where(codes[..., 1, :] == 3, -1, codes[..., 1, :])

    ours = cm.run_with_hooks(tokens, fwd_hooks=[(codes_hook_name(site), drop_code)])
    assert (cm.run_with_cache(tokens)[1][codes_hook_name(site)][..., 1, :] == 3).any()
    sae = to_sae_lens(cm, site)
    model = cm.detach()
    model.add_sae(sae, use_error_term=True)
    torch.testing.assert_close(model(tokens), base, atol=2e-5, rtol=0)

    def drop_feature(acts, hook):
        acts[..., 1 * n + 3] = 0

    theirs = model.run_with_hooks(tokens, fwd_hooks=[(f"{site}.hook_sae_acts_post", drop_feature)])
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)


def test_sae_lens_saves_and_reloads_it(tmp_path):
    site, fields = CASES["resid_affine"]
    cm = _codebook_model(site, fields)
    sae = to_sae_lens(cm, site, model_name="tiny")
    sae.save_model(tmp_path / "sae")
    back = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert type(back) is CodebookSAE and back.cfg == sae.cfg
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    x = torch.randn(5, 7, D, generator=torch.Generator().manual_seed(4))
    assert torch.equal(back.encode(x), sae.encode(x))
    assert back.cfg.metadata.model_name == "tiny" and back.cfg.metadata.hook_name == site


def test_loading_needs_codebook_lens_imported(tmp_path):
    site, fields = CASES["mlp_out_ln"]
    to_sae_lens(_codebook_model(site, fields), site).save_model(tmp_path)
    code = (
        "import sys, sae_lens\n"
        "try:\n    sae_lens.SAE.load_from_disk(sys.argv[1])\nexcept KeyError as e:\n"
        "    print('refused', e)\n"
        "import codebook_lens.saelens\n"
        "print(type(sae_lens.SAE.load_from_disk(sys.argv[1])).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["refused 'codebook'", "CodebookSAE"]


def _brute_force(x: np.ndarray, codes: np.ndarray, cfg: CodebookSAEConfig) -> np.ndarray:
    """Feature activations by plain numpy loops: score every code of every block, take the k
    best (ties do not occur with random floats)."""
    rows, out = x.reshape(-1, cfg.n_blocks, cfg.block_size), []
    for row in rows:
        acts = np.zeros((cfg.n_blocks, cfg.n_codes))
        for b in range(cfg.n_blocks):
            v = row[b]
            if cfg.input_norm == "layernorm":
                v = (v - v.mean()) / np.sqrt(v.var() + cfg.norm_eps)
            c = codes[b]
            if cfg.similarity == "cosine":
                s = c @ v / (np.linalg.norm(c, axis=1) * np.linalg.norm(v))
            elif cfg.similarity == "dot":
                s = c @ v
            else:
                s = -np.linalg.norm(c - v, axis=1)
            acts[b, np.argsort(-s)[: cfg.k]] = 1 / cfg.k if cfg.combine == "mean" else 1
        out.append(acts.reshape(-1))
    return np.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("seed", range(6))
def test_encode_matches_a_numpy_brute_force(seed):
    rng = np.random.default_rng(seed)
    blocks, n_codes, d = int(rng.integers(1, 4)), int(rng.integers(2, 30)), int(rng.integers(2, 9))
    cfg = CodebookSAEConfig(
        d_in=blocks * d,
        d_sae=blocks * n_codes,
        n_codes=n_codes,
        n_blocks=blocks,
        k=int(rng.integers(1, min(n_codes, 4) + 1)),
        similarity=["cosine", "dot", "euclidean"][seed % 3],
        combine=["sum", "mean"][seed % 2],
        input_norm=["none", "layernorm"][(seed // 2) % 2],
    )
    sae = CodebookSAE(cfg)
    codes = rng.normal(size=(blocks, n_codes, d)).astype(np.float32)
    with torch.no_grad():
        sae.codebooks().copy_(torch.from_numpy(codes))
    x = rng.normal(size=(3, 5, cfg.d_in)).astype(np.float32)
    acts = sae.encode(torch.from_numpy(x))
    np.testing.assert_array_equal(acts.numpy(), _brute_force(x, codes, cfg).astype(np.float32))
    w = np.zeros((cfg.d_sae, cfg.d_in), np.float32)
    for b in range(blocks):  # the block-diagonal decoder, written out
        w[b * n_codes : (b + 1) * n_codes, b * d : (b + 1) * d] = codes[b]
    np.testing.assert_array_equal(sae.W_dec.detach().numpy(), w)
    np.testing.assert_allclose(sae.decode(acts).detach().numpy(), acts.numpy() @ w, atol=1e-6)


@pytest.mark.parametrize("case", ["z_per_head", "mlp_out_split", "resid_affine"])
def test_codebook_from_sae_inverts_to_sae_lens(case):
    site, fields = CASES[case]
    cm = _codebook_model(site, fields)
    tokens = _tokens()
    before = cm(tokens)
    cb = codebook_from_sae(to_sae_lens(cm, site))
    assert cb.cfg.init == "sae"
    cm.remove_codebook(site)
    cm.add_codebook(site, cb)
    cm.init_codebooks(tokens)  # init="sae": left as they are
    torch.testing.assert_close(cm(tokens), before, atol=2e-5, rtol=0)


def test_codebook_from_a_topk_sae_takes_its_decoder_rows():
    site = "blocks.1.hook_resid_pre"
    cfg = sae_lens.TopKSAEConfig(d_in=D, d_sae=40, k=4)
    cfg.metadata.hook_name = site
    torch.manual_seed(0)
    sae = sae_lens.TopKSAE(cfg)
    cb = codebook_from_sae(sae, k=2)
    assert cb.cfg.n_codes == 40 and cb.cfg.k == 2 and cb.cfg.similarity == "cosine"
    assert torch.equal(cb.codebook[0], sae.W_dec.detach())
    cm = CodebookModel(_model())
    cm.add_codebook(site, cb)
    _, cache = cm.run_with_cache(_tokens())
    with cm.disabled():
        _, base = cm.run_with_cache(_tokens())
    x = base[site].reshape(-1, D)
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(
        sae.W_dec.detach(), dim=-1).T  # fmt: skip
    want = cos.topk(2, dim=-1).indices.sort(-1).values
    got = cache[codes_hook_name(site)].reshape(-1, 2).sort(-1).values
    assert torch.equal(got, want)


def test_refusals():
    cm = _codebook_model("blocks.0.attn.hook_q", dict(n_codes=8, k=1))
    with pytest.raises(ValueError, match="reshapes heads only at attn.hook_z"):
        to_sae_lens(cm, "blocks.0.attn.hook_q")
    site, fields = CASES["mlp_out_ln"]
    sae = to_sae_lens(_codebook_model(site, fields), site)
    with pytest.raises(NotImplementedError, match="changes which codes win"):
        sae.fold_W_dec_norm()
    with pytest.raises(AttributeError, match="no linear encoder W_enc"):
        sae.W_enc  # noqa: B018
    assert not hasattr(sae, "W_enc")
    with pytest.raises(ValueError, match="k <= n_codes"):
        CodebookSAEConfig(d_in=8, d_sae=4, n_codes=4, k=5)
    with pytest.raises(ValueError, match="equal blocks"):
        CodebookSAEConfig(d_in=9, d_sae=8, n_codes=4, n_blocks=2)
    with pytest.raises(TypeError, match="sets \\['n_codes'\\] from the SAE"):
        codebook_from_sae(sae, n_codes=3)


def test_the_docs_page_names_what_it_needs():
    page = (Path(__file__).resolve().parents[2] / "docs" / "sae_ecosystem.md").read_text()
    assert "import codebook_lens.saelens" in page and "load_from_disk" in page
