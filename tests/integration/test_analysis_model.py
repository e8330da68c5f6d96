"""Analysis on tiny real models: the code store, DLA, attribution patching, sweeps, steering."""

from __future__ import annotations

import inspect

import pytest
import torch

from codebook_lens import CodebookModel, codes_hook_name
from codebook_lens.analysis import (
    CodeStore,
    ablate_codes,
    ablation_sweep,
    code_attribution_patching,
    code_logit_attribution,
    collect_codes,
    force_codes,
    patch_codes,
    patch_sweep,
    steer,
    steering_hooks,
)
from tests.conftest import TINY, make_model

Z0, Z1 = "blocks.0.attn.hook_z", "blocks.1.attn.hook_z"
M0, M1 = "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"


def toks(n: int, pos: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, TINY["d_vocab"], (n, pos), generator=torch.Generator().manual_seed(seed)
    )


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.fixture(scope="module")
def cm():
    m = CodebookModel(make_model())
    m.add_codebook(Z0, n_codes=20, k=2, init="random")
    m.add_codebook(M1, n_codes=30, k=1, init="random")
    return m


# ---------------------------------------------------------------- store
def test_collect_codes_matches_cache_and_iterables(cm):
    data = toks(37, 9)
    store = collect_codes(cm, data, batch_size=8, progress=False)
    _, cache = cm.run_with_cache(data)
    for s in cm.sites:
        assert torch.equal(store.get(s), cache[codes_hook_name(s)])
    assert torch.equal(store.require_tokens(), data)

    def batches():  # a generator of dict batches, never materialised as one tensor
        for b in data.split(5):
            yield {"input_ids": b}

    store2 = collect_codes(cm, batches(), progress=False)
    for s in cm.sites:
        assert torch.equal(store2.codes[s], store.codes[s])
    with pytest.raises(ValueError, match="same sequence length"):
        collect_codes(cm, [data[:2], data[:2, :5]], progress=False)


def test_store_memory_bound(cm, tmp_path):
    """Memory is tokens x sites x heads x k small ints, never activations."""
    data = toks(96, 12, seed=1)  # 12 batches of 8
    store = collect_codes(cm, data, batch_size=8, progress=False)
    n_tok = 96 * 12
    want = n_tok * (4 * 2 * 1 + 1 * 1 * 1) + n_tok * 1  # int8 codes, int8 tokens
    assert store.nbytes == want
    act_bytes = n_tok * (4 * 8 + 32) * 4  # the two sites' float activations
    assert store.nbytes * 20 < act_bytes
    store.save(tmp_path / "s")
    back = CodeStore.load(tmp_path / "s")
    assert back.nbytes == want and all(torch.equal(back.codes[s], store.codes[s]) for s in cm.sites)


# ---------------------------------------------------------------- DLA
@pytest.mark.parametrize(
    "backend,site,kw",
    [
        ("auto", Z1, {}),
        ("auto", M1, {}),
        ("auto", "blocks.1.mlp.hook_post", {"combine": "mean", "k": 2}),
        ("auto", M1, {"n_groups": 2, "d_in": 16}),
        ("auto", Z1, {"n_groups": 1, "d_in": 32}),  # heads_flat: one codebook over all heads
        ("auto", "blocks.1.mlp.hook_post", {"n_groups": 2, "d_in": 32}),  # split through W_out
        pytest.param("bridge", Z1, {}, marks=pytest.mark.bridge),
    ],
)
def test_dla_equals_frozen_scale_forward(backend, site, kw):
    """Appending a code at a last-layer site changes the logits by exactly its DLA when the
    final LayerNorm scale (and, for attention sites, the last MLP) is frozen: the direct path."""
    m = CodebookModel(make_model(backend))
    if "n_groups" in kw:
        from codebook_lens import CodebookConfig

        m.add_codebook(site, CodebookConfig(n_codes=6, init="random", **kw))
    else:
        m.add_codebook(site, n_codes=6, init="random", **kw)
    with torch.no_grad():  # a non-trivial final LayerNorm weight (it is all ones at init)
        for name, p in m.ln_final.named_parameters():
            if name.endswith(("w", "weight")):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    x = toks(2, 7, seed=3)
    _, cache = m.run_with_cache(x)
    scale = cache["ln_final.hook_scale"]
    frozen = {"ln_final.hook_scale": scale}
    if "attn" in site:
        frozen[M1] = cache[M1]
    freeze = [(name, lambda a, hook, v=v: v) for name, v in frozen.items()]
    base = m.run_with_hooks(x, fwd_hooks=freeze)
    per_head = m.site_layout(site) in ("heads", "split")  # codes with a head/group axis
    head = 1 if per_head else None
    hook = force_codes(4, positions=[3], heads=None if head is None else [head])
    out = m.run_with_hooks(x, fwd_hooks=[*freeze, (codes_hook_name(site), hook)])
    dla = code_logit_attribution(m, site, scale=scale[1, 3], codes=[4])
    got = (out - base)[1, 3]
    want = dla[head or 0, 0]
    assert (got - want).abs().max() < 1e-5 * max(1.0, float(want.abs().max()))
    assert float(want.abs().max()) > 1e-3
    assert (out - base)[:, [0, 1, 2, 4, 5, 6]].abs().max() < 1e-5
    sub = code_logit_attribution(m, site, tokens=[2, 5], scale=scale[1, 3], codes=[4])
    assert torch.allclose(sub[..., 0, :], dla[..., 0, [2, 5]])


# ---------------------------------------------------------------- attribution patching
def _real_ablation(m, x, metric, ap):
    """Real metric change of ablating each active code (x has batch 1). The single ablations
    run side by side: row u of a batch of copies removes only code u (the same forward passes
    as one ablate_codes run per code, batched; batching is checked by the sweep tests)."""
    with torch.no_grad():
        base = float(metric(m(x)))
    est, real = [], []
    for site, a in ap.items():
        c = a.codes if a.codes.dim() == 4 else a.codes.unsqueeze(2)  # [1, P, H, K]
        rows = (c[0] >= 0).nonzero()  # [U, 3]: (pos, head, slot)
        u = rows.shape[0]
        per_head = a.codes.dim() == 4

        def hook(codes, hook, rows=rows, per_head=per_head):
            cc = (codes if per_head else codes.unsqueeze(2)).clone()
            cc[torch.arange(rows.shape[0]), rows[:, 0], rows[:, 1], rows[:, 2]] = -1
            return cc if per_head else cc.squeeze(2)

        with torch.no_grad():
            out = m.run_with_hooks(x.repeat(u, 1), fwd_hooks=[(codes_hook_name(site), hook)])
            real += [float(metric(o)) - base for o in out.split(1)]
        est += (
            a.effect[0][tuple(rows.T)].tolist()
            if a.codes.dim() == 4
            else (a.effect[0][rows[:, 0], rows[:, 2]].tolist())
        )
    return torch.tensor(est), torch.tensor(real)


def test_batched_real_ablation_equals_ablate_codes():
    """The batched helper above agrees with single ablate_codes runs."""
    m = CodebookModel(make_model())
    m.add_codebook(Z0, n_codes=10, k=2, init="random")
    x = toks(1, 4, seed=2)
    ap = code_attribution_patching(m, x, logprob3)
    _, real = _real_ablation(m, x, logprob3, ap)
    base = float(logprob3(m(x)).detach())
    for i, (p, h, sl) in enumerate((ap[Z0].codes[0] >= 0).nonzero().tolist()[:3]):
        hook = ablate_codes(positions=[p], heads=[h], slots=[sl])
        out = m.run_with_hooks(x, fwd_hooks=[(codes_hook_name(Z0), hook)])
        assert abs(float(logprob3(out).detach()) - base - float(real[i])) < 1e-5


def logprob3(logits):
    return logits[:, -1].log_softmax(-1)[:, 3].sum()


def test_attribution_patching_matches_ablation_last_layer():
    """No codebook downstream: the gradient estimate tracks real ablation closely."""
    m = CodebookModel(make_model())
    m.add_codebook(Z1, n_codes=20, k=1, init="sample")
    m.init_codebooks(toks(40, 12))
    x = toks(1, 12, seed=5)
    ap = code_attribution_patching(m, x, logprob3)
    est, real = _real_ablation(m, x, logprob3, ap)
    assert est.numel() == 48
    assert pearson(est, real) > 0.95  # measured 0.998
    assert float(ap[Z1].metric) == pytest.approx(float(logprob3(m(x))), abs=1e-5)


def test_attribution_patching_matches_ablation_all_sites_error_term():
    """Three sites (k=2 per head, k=1 flat, k=1 per head) with the error term, so codes
    downstream do not switch discretely: the estimate agrees with real ablation."""
    m = CodebookModel(make_model())
    m.add_codebook(Z0, n_codes=20, k=2, init="sample", use_error_term=True)
    m.add_codebook(M0, n_codes=20, k=1, init="sample", use_error_term=True)
    m.add_codebook(Z1, n_codes=20, k=1, init="sample", use_error_term=True)
    m.init_codebooks(toks(40, 12))
    x = toks(1, 12, seed=0)
    ap = code_attribution_patching(m, x, logprob3)
    est, real = _real_ablation(m, x, logprob3, ap)
    assert est.numel() == 12 * 4 * 2 + 12 + 12 * 4
    assert pearson(est, real) > 0.85  # measured 0.933


def _ap_correlations(m, x) -> dict[str, float]:
    """Pearson r between attribution-patching estimates and real ablations (other sites'
    codes held at their clean values), for both gradient paths."""
    _, cache = m.run_with_cache(x)
    hold = {s: (codes_hook_name(s), patch_codes(cache[codes_hook_name(s)])) for s in m.sites}
    r = {}
    for through in ("frozen", "straight_through"):
        ap = code_attribution_patching(m, x, logprob3, through=through)
        est, real = [], []
        for site in m.sites:
            with m.hooks(fwd_hooks=[h for s, h in hold.items() if s != site]):
                e, rr = _real_ablation(m, x, logprob3, {site: ap[site]})
            est.append(e)
            real.append(rr)
        r[through] = pearson(torch.cat(est), torch.cat(real))
    return r


def test_attribution_patching_frozen_is_ablation_with_other_codes_held():
    """Without the error term, a downstream codebook is piecewise constant: the default
    estimate (through="frozen") is the linearization of ablating a code while every other
    site's codes are held at their clean values."""
    m = CodebookModel(make_model())
    m.add_codebook(Z0, n_codes=20, k=2, init="random")
    m.add_codebook(M0, n_codes=20, k=1, init="random")
    m.add_codebook(Z1, n_codes=20, k=1, init="random")
    rs = [_ap_correlations(m, toks(1, 12, seed=seed)) for seed in range(4)]
    # measured frozen / straight-through r per prompt: hooked 0.98/0.64, 0.93/0.43, 0.94/0.65,
    # 0.96/0.54; bridge (other random weights) 0.91/0.82, 0.85/0.57, 0.87/0.75, 0.98/0.93
    assert all(r["frozen"] > r["straight_through"] for r in rs)
    assert sum(r["frozen"] for r in rs) / len(rs) > 0.9
    with pytest.raises(ValueError, match="frozen"):
        inspect.unwrap(code_attribution_patching)(m, toks(1, 12), logprob3, through="nope")


# ---------------------------------------------------------------- sweeps
def metric_fn(logits):
    return logits[:, -1, 2].mean() - logits[:, -1, 7].mean()


def test_ablation_sweep_equals_single_patches(cm):
    x = toks(2, 4, seed=7)
    base = float(metric_fn(cm(x)))
    for per_head in (True, False):
        sw = ablation_sweep(cm, x, metric_fn, per_head=per_head, max_batch=6)
        assert sw.effects.shape == (2, 4, 4 if per_head else 1) and sw.baseline == base
        for si, site in enumerate(sw.sites):
            heads = range(4) if (per_head and site == Z0) else [None]
            for p in range(4) if per_head else [0, 3]:
                for h in heads:
                    kw = {} if h is None else {"heads": [h]}
                    hook = ablate_codes(positions=[p], **kw)
                    out = cm.run_with_hooks(x, fwd_hooks=[(codes_hook_name(site), hook)])
                    want = float(metric_fn(out)) - base
                    assert abs(float(sw.effects[si, p, h or 0]) - want) < 1e-5
        if per_head:
            assert torch.isnan(sw.effects[1, :, 1:]).all()  # the flat site has one "head"
    # only some positions, only some code ids
    sw = ablation_sweep(cm, x, metric_fn, sites=[Z0], positions=[-1, 2], codes=[3, 4])
    assert sw.positions.tolist() == [3, 2]
    out = cm.run_with_hooks(
        x, fwd_hooks=[(codes_hook_name(Z0), ablate_codes(codes=[3, 4], positions=[2], heads=1))]
    )
    assert abs(float(sw.effects[0, 1, 1]) - (float(metric_fn(out)) - base)) < 1e-5


def test_patch_sweep_equals_single_patches(cm):
    clean, corrupt = toks(2, 4, seed=8), toks(2, 4, seed=9)
    _, cache = cm.run_with_cache(clean)
    base = float(metric_fn(cm(corrupt)))
    sw = patch_sweep(cm, clean, corrupt, metric_fn, max_batch=10)
    for si, site in enumerate(sw.sites):
        src = cache[codes_hook_name(site)]
        for p in range(4):
            for h in range(4) if site == Z0 else [None]:
                kw = {} if h is None else {"heads": [h]}
                hook = patch_codes(src, positions=[p], **kw)
                out = cm.run_with_hooks(corrupt, fwd_hooks=[(codes_hook_name(site), hook)])
                assert abs(float(sw.effects[si, p, h or 0]) - (float(metric_fn(out)) - base)) < 1e-5
    # patching every code of every site: the codes downstream are the clean ones
    hooks = [(codes_hook_name(s), patch_codes(cache[codes_hook_name(s)])) for s in cm.sites]
    with cm.hooks(fwd_hooks=hooks):
        _, pc = cm.run_with_cache(corrupt)
    assert torch.equal(pc[M1], cache[M1])  # the quantized output is the clean one


# ---------------------------------------------------------------- steering & generation
def steer_model(backend: str = "auto"):
    """A codebook at the last residual stream whose code 3 points hard at token 7."""
    m = CodebookModel(make_model(backend, n_ctx=32))
    cb = m.add_codebook(
        "blocks.1.hook_resid_post", n_codes=8, k=1, init="random", use_error_term=True
    )
    with torch.no_grad():
        w_u = m.W_U[:, 7] - m.W_U.mean(1)
        cb.codebook[0, 3] = 50 * w_u / w_u.norm()
    return m


def test_steering_forces_feature():
    m = steer_model()
    prompt = toks(3, 4, seed=11)
    hooks = steering_hooks(m, "blocks.1.hook_resid_post", 3)
    kw = dict(max_new_tokens=6, n_samples=2, seed=0, temperature=0.2)
    res = steer(m, prompt, hooks, feature=[7], **kw)
    assert res.steered_tokens.shape == (6, 10) and res.prompt_len == 4
    assert res.steered_rate == 1.0 and res.baseline_rate < 0.5
    assert torch.equal(res.steered_tokens[:, :4], prompt.repeat_interleave(2, 0))
    # same seed, no hooks: the baseline is reproducible and the global RNG is untouched
    torch.manual_seed(123)
    r0 = torch.rand(1)
    torch.manual_seed(123)
    res2 = steer(m, prompt, hooks, feature=[7], **kw)
    assert torch.equal(res2.baseline_tokens, res.baseline_tokens)
    assert torch.equal(torch.rand(1), r0)
    # with the KV cache (TL 3.9: its tokens differ from a no-cache run even unhooked), forcing
    # at every position still covers each new token
    res3 = steer(m, prompt, hooks, feature=[7], use_past_kv_cache=True, **kw)
    assert res3.steered_rate == 1.0


def test_greedy_steering_equals_manual_loop():
    """Forcing a code at the last position only: generate() matches a step-by-step loop that
    applies the same hook to each growing sequence."""
    m = steer_model()
    m.codebooks["blocks.1.hook_resid_post"].codebook.data[0, 3] *= 0.08  # a nudge, not a wall
    prompt = toks(2, 3, seed=12)
    hook = force_codes(3, positions=-1)
    hooks = [(codes_hook_name("blocks.1.hook_resid_post"), hook)]
    res = steer(m, prompt, hooks, feature=lambda g: g == 7, max_new_tokens=5, do_sample=False)
    seq = prompt.clone()
    for _ in range(5):
        logits = m.run_with_hooks(seq, fwd_hooks=hooks)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(res.steered_tokens, seq)
    assert res.steered_hits.shape == (2, 5)
    plain = prompt.clone()
    for _ in range(5):
        plain = torch.cat([plain, m(plain)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(res.baseline_tokens, plain)
    assert not torch.equal(seq, plain)


@pytest.mark.bridge
def test_bridge_store_and_steering():
    m = steer_model("bridge")
    data = toks(6, 8)
    store = collect_codes(m, data, batch_size=4, progress=False)
    _, cache = m.run_with_cache(data)
    site = "blocks.1.hook_resid_post"
    assert torch.equal(store.get(site), cache[codes_hook_name(site)])
    res = steer(m, data[:2, :3], steering_hooks(m, site, 3), [7], max_new_tokens=4)
    assert res.steered_rate == 1.0
