"""CodebookModel on real tiny HookedTransformer and TransformerBridge models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codebook_lens import CodebookConfig, CodebookModel
from tests.conftest import attach_codebooks, make_model
from tests.unit.bruteforce import bf_decode, bf_quantize, bf_select

SITES = {
    "blocks.0.hook_resid_pre": dict(n_codes=40, k=3),
    "blocks.0.attn.hook_z": dict(n_codes=30, k=2),
    "blocks.1.hook_mlp_out": dict(n_codes=40, k=1, similarity="dot"),
    "blocks.1.mlp.hook_post": dict(n_codes=50, k=2, similarity="euclidean", combine="mean"),
}


def _bf_hook(cb):
    w = cb.codebook.detach().double().numpy()

    def hook(act, hook):
        shape = act.shape
        g = cb.cfg.n_groups
        flat = act.detach().double().numpy().reshape(-1, g, cb.cfg.d_in)
        out = bf_quantize(flat, w, cb.cfg)
        return torch.from_numpy(out).to(act.dtype).reshape(shape)

    return hook


def test_code_shapes_and_logits_match_bruteforce(model, tokens):
    cm = attach_codebooks(model, SITES, tokens)
    logits, cache = cm.run_with_cache(tokens)
    b, p = tokens.shape
    assert cache["blocks.0.hook_resid_pre.hook_codes"].shape == (b, p, 3)
    assert cache["blocks.0.attn.hook_z.hook_codes"].shape == (b, p, 4, 2)
    assert cache["blocks.1.hook_mlp_out.hook_codes"].shape == (b, p, 1)
    assert cache["blocks.1.mlp.hook_post.hook_codes"].shape == (b, p, 2)
    assert cache["blocks.0.attn.hook_z.hook_codes"].dtype == torch.int64
    # the site name means what downstream uses: the quantized value
    z = cache["blocks.0.attn.hook_z"]
    cb = cm.codebooks["blocks.0.attn.hook_z"]
    torch.testing.assert_close(z, cb.decode(cache["blocks.0.attn.hook_z.hook_codes"]))
    with cm.disabled():
        ref = cm.run_with_hooks(
            tokens, fwd_hooks=[(s, _bf_hook(cb)) for s, cb in cm.codebooks.items()]
        )
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_disable_and_remove_restore_base_logits_exactly(model, tokens):
    base = model(tokens).clone()
    cm = attach_codebooks(model, SITES, tokens)
    assert not torch.equal(cm(tokens), base)
    with cm.disabled():
        assert torch.equal(cm(tokens), base)
    assert not torch.equal(cm(tokens), base)
    with cm.disabled("blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"):
        partial = cm(tokens)
    assert not torch.equal(partial, base)
    cm.disable()
    assert torch.equal(cm(tokens), base)
    cm.enable()
    for site in list(cm.sites):
        cm.remove_codebook(site)
    assert torch.equal(model(tokens), base)
    assert not any(n.endswith("hook_codes") for n in model.hook_dict)
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())


def test_patching_codes_equals_replacing_activation(model, tokens):
    cm = CodebookModel(model)
    site = "blocks.1.hook_mlp_out"
    cb = cm.add_codebook(site, n_codes=20, k=2)
    cm.init_codebooks(tokens)
    c, pos = 7, 4

    def set_code(codes, hook):
        codes = codes.clone()
        codes[:, pos, 0] = c
        codes[:, pos, 1:] = -1
        return codes

    patched = cm.run_with_hooks(tokens, fwd_hooks=[(f"{site}.hook_codes", set_code)])
    vec = cb.codebook.detach()[0, c]

    def by_hand(act, hook):
        act = act.clone()
        act[:, pos] = vec
        return act

    ref = cm.run_with_hooks(tokens, fwd_hooks=[(site, by_hand)])
    torch.testing.assert_close(patched, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(patched, cm(tokens))


def test_per_head_patch_only_changes_that_head(model, tokens):
    site = "blocks.0.attn.hook_z"
    cm = attach_codebooks(model, {site: dict(n_codes=25, k=1)}, tokens)

    def force_head2(codes, hook):
        codes = codes.clone()
        codes[:, :, 2] = 3
        return codes

    _, clean = cm.run_with_cache(tokens, names_filter=lambda n: n.startswith(site))
    with cm.hooks(fwd_hooks=[(f"{site}.hook_codes", force_head2)]):
        _, cache = cm.run_with_cache(tokens, names_filter=lambda n: n.startswith(site))
    z0, z1 = clean[site], cache[site]
    assert torch.equal(z0[:, :, [0, 1, 3]], z1[:, :, [0, 1, 3]])
    cb = cm.codebooks[site]
    torch.testing.assert_close(z1[:, :, 2], cb.codebook.detach()[2, 3].expand_as(z1[:, :, 2]))


def test_no_hooks_leak_on_exception(model, tokens):
    cm = attach_codebooks(model, SITES, tokens)
    counts = {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items()}

    def boom(codes, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with cm.hooks(fwd_hooks=[("blocks.1.hook_mlp_out.hook_codes", boom)]):
            cm(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        cm.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out.hook_codes", boom)])
    with pytest.raises(RuntimeError):
        with cm.disabled():
            raise RuntimeError("inside")
    assert cm.enabled
    assert {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items()} == counts


def test_codebooks_survive_reset_hooks(model, tokens):
    cm = attach_codebooks(model, SITES, tokens)
    out = cm(tokens)
    model.reset_hooks(including_permanent=True)
    torch.testing.assert_close(cm(tokens), out)


def test_shared_and_flat_head_layouts(model, tokens):
    cm = CodebookModel(model)
    shared = cm.add_codebook("blocks.0.attn.hook_z", CodebookConfig(d_in=8, n_codes=10, k=1))
    cm.add_codebook("blocks.1.attn.hook_z", CodebookConfig(d_in=32, n_codes=10, k=2))
    cm.add_codebook("blocks.0.hook_resid_post", CodebookConfig(d_in=8, n_groups=4, n_codes=10))
    cm.init_codebooks(tokens)
    logits, cache = cm.run_with_cache(tokens)
    codes = {s: cache[f"{s}.hook_codes"] for s in cm.sites}
    assert codes["blocks.0.attn.hook_z"].shape == (3, 10, 4, 1)
    assert codes["blocks.1.attn.hook_z"].shape == (3, 10, 2)
    assert codes["blocks.0.hook_resid_post"].shape == (3, 10, 4, 1)
    assert [cm.site_layout(s) for s in cm.sites] == ["heads", "heads_flat", "split"]
    # one shared codebook: a single [1, n_codes, d_head] table, and every head's output is the
    # vector of its code in that same table
    assert tuple(shared.codebook.shape) == (1, 10, 8)
    z, c = cache["blocks.0.attn.hook_z"], codes["blocks.0.attn.hook_z"][..., 0]
    torch.testing.assert_close(z, shared.codebook[0].detach()[c], rtol=0, atol=0)
    assert len(torch.unique(c)) > 1  # not one code everywhere
    # the codes are the brute-force nearest codes: each head against the shared table, the
    # concatenated heads against one table, each of the 4 residual groups against its own
    seen: dict[str, np.ndarray] = {}

    def bf(site, cb):
        def hook(act, hook):
            g = cb.cfg.n_groups
            flat = act.detach().double().numpy().reshape(-1, g, cb.cfg.d_in)
            ids = bf_select(flat, cb.codebook.detach().double().numpy(), cb.cfg.k, "cosine")
            seen[site] = ids
            out = bf_decode(ids, cb.codebook.detach().double().numpy(), "sum", cb.cfg.k)
            return torch.from_numpy(out).to(act.dtype).reshape(act.shape)

        return hook

    with cm.disabled():
        ref = cm.run_with_hooks(
            tokens, fwd_hooks=[(s, bf(s, cb)) for s, cb in cm.codebooks.items()]
        )
    for site, got in codes.items():
        np.testing.assert_array_equal(got.reshape(seen[site].shape).numpy(), seen[site], site)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_bad_inputs_give_clear_errors(model):
    cm = CodebookModel(model)
    with pytest.raises(KeyError, match=r"Did you mean .*blocks\.0\.hook_mlp_out"):
        cm.add_codebook("blocks.0.hook_mlp_outt", n_codes=4)
    with pytest.raises(ValueError, match="activations of size 32.*d_in=31"):
        cm.add_codebook("blocks.0.hook_mlp_out", CodebookConfig(d_in=31, n_codes=4))
    with pytest.raises(ValueError, match="per-head site with 4 heads of size 8"):
        cm.add_codebook("blocks.0.attn.hook_z", CodebookConfig(d_in=7, n_codes=4))
    with pytest.raises(ValueError, match="k=9 exceeds n_codes=4"):
        cm.add_codebook("blocks.0.hook_mlp_out", n_codes=4, k=9)
    with pytest.raises(ValueError, match="cannot be quantized|not an activation"):
        cm.add_codebook("blocks.0.attn.hook_pattern", n_codes=4)
    cm.add_codebook("blocks.0.hook_mlp_out", n_codes=4)
    with pytest.raises(ValueError, match="already has a codebook"):
        cm.add_codebook("blocks.0.hook_mlp_out", n_codes=4)
    with pytest.raises(KeyError, match="no codebook at"):
        cm.remove_codebook("blocks.1.hook_mlp_out")
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        CodebookModel(torch.nn.Linear(2, 2))


def test_generate_runs_with_codebooks(model, tokens):
    cm = attach_codebooks(model, SITES, tokens)
    torch.manual_seed(0)
    out = cm.generate(
        tokens[:1, :4],
        max_new_tokens=3,
        do_sample=False,
        verbose=False,
        stop_at_eos=False,
        use_past_kv_cache=False,
    )
    assert out.shape == (1, 7)
    # greedy continuation equals argmax of the codebook model's own logits
    nxt = cm(tokens[:1, :4])[0, -1].argmax()
    assert out[0, 4] == nxt


def test_training_gradients_reach_codebooks_and_model(model, tokens):
    cm = attach_codebooks(model, SITES, tokens)
    cm.train()
    loss = cm(tokens, return_type="loss") + cm.aux_loss()
    loss.backward()
    for site, cb in cm.codebooks.items():
        assert cb.codebook.grad is not None and cb.codebook.grad.abs().sum() > 0, site
        assert cb.code_counts.sum() > 0
    emb = next(p for n, p in model.named_parameters() if "embed" in n)
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert np.isfinite(loss.item())


def test_in_place_patch_is_honoured(model, tokens):
    site = "blocks.1.hook_mlp_out"
    cm = attach_codebooks(model, {site: dict(n_codes=20, k=1)}, tokens)

    def in_place(codes, hook):
        codes[:, 2, 0] = 5
        return codes

    def in_place_no_return(codes, hook):
        codes[:, 2, 0] = 5

    clean = cm(tokens)
    a = cm.run_with_hooks(tokens, fwd_hooks=[(f"{site}.hook_codes", in_place)])
    b = cm.run_with_hooks(tokens, fwd_hooks=[(f"{site}.hook_codes", in_place_no_return)])
    assert not torch.allclose(a, clean)
    torch.testing.assert_close(a, b)
    _, cache = cm.run_with_cache(tokens)  # a caching hook alone changes nothing
    torch.testing.assert_close(cm(tokens), clean)


def test_site_layout_comes_from_the_activation_shape(backend):
    """A per-head site outside the usual names (rotated queries; the bridge's input of W_O) is
    laid out per head, as its activation shape says: a name-suffix rule would call it a flat,
    split site."""
    cm = CodebookModel(make_model(backend, positional_embedding_type="rotary", rotary_dim=8))
    site = "blocks.0.attn.hook_rot_q" if backend == "hooked" else "blocks.0.attn.o.hook_in"
    cb = cm.add_codebook(site, n_codes=8, k=2)
    assert (cb.cfg.d_in, cb.cfg.n_groups) == (8, 4)
    assert cm.site_layout(site) == "heads"
    _, cache = cm.run_with_cache(torch.zeros(2, 5, dtype=torch.long))
    assert cache[f"{site}.hook_codes"].shape == (2, 5, 4, 2)
    cm.remove_codebook(site)
    cm.add_codebook(site, n_codes=8, d_in=32, n_groups=1)
    assert cm.site_layout(site) == "heads_flat"
    cm.add_codebook("blocks.0.hook_mlp_out", n_codes=8, d_in=8, n_groups=4)
    assert cm.site_layout("blocks.0.hook_mlp_out") == "split"
    with pytest.raises(KeyError, match=r"Did you mean 'blocks\.0\.hook_mlp_out'"):
        cm.site_layout("blocks.0.hook_mlp_ou")


def test_a_site_that_never_fires_is_refused_by_name():
    cm = CodebookModel(make_model("bridge", positional_embedding_type="rotary", rotary_dim=8))
    with pytest.raises(ValueError, match="hook_rot_q' did not fire on a forward pass"):
        cm.add_codebook("blocks.0.attn.hook_rot_q", n_codes=8)
