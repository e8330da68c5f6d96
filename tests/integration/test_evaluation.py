"""evaluate_codebooks against an independent recount on tiny models.

The reference below gathers activations, codes and logits with ``run_with_cache`` over all
batches at once and recomputes every metric in float64 numpy with plain loops (decode, code
counts), sharing no code with codebook_lens.evaluation.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from codebook_lens import CodebookModel, codes_hook_name
from codebook_lens.evaluation import (
    ALL,
    TABLE_METRICS,
    Evaluation,
    dense_metric_name,
    evaluate_codebooks,
)
from tests.conftest import TINY, make_model

Z, MLP = "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"
THRESHOLDS = (0.01, 0.1, 0.3)


# 100 positions by default, so that the 1% and 10% thresholds fall on whole counts
def _batches(seed: int = 0, shapes=((4, 10), (3, 10), (5, 6))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["d_vocab"], s, generator=g) for s in shapes]


def _cm(model, **mlp_kw) -> CodebookModel:
    """A per-head codebook at hook_z (k=2) and a flat LayerNorm-input one at hook_mlp_out
    (k=3), initialised from data."""
    cm = CodebookModel(model)
    cm.add_codebook(Z, n_codes=30, k=2)
    cm.add_codebook(MLP, **{"n_codes": 40, "k": 3, "input_norm": "layernorm", **mlp_kw})
    cm.init_codebooks(torch.cat([b[:, :6] for b in _batches(seed=5)]))
    return cm


# ---------------------------------------------------------------------------- the reference
def _log_probs(logits: torch.Tensor) -> np.ndarray:
    x = logits[:, :-1].detach().double().numpy()
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ce(lp: np.ndarray, tokens: torch.Tensor) -> np.ndarray:
    return -np.take_along_axis(lp, tokens[:, 1:].numpy()[..., None], -1)[..., 0].ravel()


def _kl(lp_base: np.ndarray, lp: np.ndarray) -> np.ndarray:
    return (np.exp(lp_base) * (lp_base - lp)).sum(-1).ravel()


def _codebook_input(cm, site: str, act: torch.Tensor) -> np.ndarray:
    """The site activation in the codebook's layout, normalised as the codes see it."""
    cb, x = cm.codebook(site), act.detach().double().numpy()
    b, p = x.shape[:2]
    layout = cm.site_layout(site)
    if layout == "split":
        x = x.reshape(b, p, cb.cfg.n_groups, cb.cfg.d_in)
    elif layout == "heads_flat":
        x = x.reshape(b, p, -1)
    if cb.cfg.input_norm == "layernorm":
        mu = x.mean(-1, keepdims=True)
        x = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + cb.cfg.norm_eps)
    return x


def _decode(cb, codes: torch.Tensor) -> np.ndarray:
    """Sum (or mean over k) of the code vectors, one slot at a time."""
    w = cb.codebook.detach().double().numpy()
    g = cb.cfg.n_groups
    flat = codes.reshape(-1, g, codes.shape[-1]).numpy()
    out = np.zeros((flat.shape[0], g, w.shape[-1]))
    for r in range(flat.shape[0]):
        for j in range(g):
            for c in flat[r, j]:
                if c >= 0:
                    out[r, j] += w[j, c] / (cb.cfg.k if cb.cfg.combine == "mean" else 1)
    return out.reshape(*codes.shape[:-1], w.shape[-1])


def _recon(a: np.ndarray, a_hat: np.ndarray) -> dict[str, float]:
    """a, a_hat: [positions, units, d]."""
    ev = 1 - ((a - a_hat) ** 2).sum() / ((a - a.mean(0)) ** 2).sum()
    na, nh = np.linalg.norm(a, axis=-1), np.linalg.norm(a_hat, axis=-1)
    cos = (a * a_hat).sum(-1) / np.maximum(na * nh, 1e-300)
    rel = np.linalg.norm(a - a_hat, axis=-1)[na > 0] / na[na > 0]
    return dict(ev=ev, cos=cos.sum(), rel=rel.sum(), n=a.shape[0] * a.shape[1], rel_n=rel.size)


def _usage(cb, codes: np.ndarray) -> dict:
    """Counts of each code, once per position and group, by plain loops."""
    g, n = cb.cfg.n_groups, cb.cfg.n_codes
    flat = codes.reshape(-1, g, codes.shape[-1])
    counts = np.zeros((g, n))
    for r in range(flat.shape[0]):
        for j in range(g):
            for c in set(flat[r, j].tolist()) - {-1}:
                counts[j, c] += 1
    return dict(counts=counts, rows=flat.shape[0], empty=(flat == -1).sum(), slots=flat.size)


def _pooled(recons: list[dict], usages: list[dict]) -> dict[str, float]:
    n = sum(r["n"] for r in recons)
    out = {
        "explained_variance": sum(r["ev"] * r["n"] for r in recons) / n,
        "cosine": sum(r["cos"] for r in recons) / n,
        "rel_l2": sum(r["rel"] for r in recons) / sum(r["rel_n"] for r in recons),
    }
    return {**out, **_pooled_usage(usages)}


def _pooled_usage(usages: list[dict]) -> dict[str, float]:
    out = {}
    counts = [u["counts"] for u in usages]
    n_codes = sum(c.size for c in counts)
    out["dead_frac"] = sum((c == 0).sum() for c in counts) / n_codes
    for t in THRESHOLDS:
        dense = sum((u["counts"] / u["rows"] > t).sum() for u in usages)
        out[dense_metric_name(t)] = dense / n_codes
    ent = []
    for c in counts:
        for row in c:
            p = row[row > 0] / max(row.sum(), 1)
            ent.append(-(p * np.log(p)).sum())
    out["usage_entropy"] = float(np.mean(ent))
    out["effective_codes"] = math.exp(out["usage_entropy"])
    out["l0"] = sum(u["counts"].sum() for u in usages) / sum(
        u["rows"] * u["counts"].shape[0] for u in usages
    )
    out["empty_slot_rate"] = sum(u["empty"] for u in usages) / sum(u["slots"] for u in usages)
    return out


def _mean_act(base_run, batches, site) -> torch.Tensor:
    acts = [base_run(t)[1][site].double() for t in batches]
    return torch.cat([a.reshape(-1, *a.shape[2:]) for a in acts]).mean(0)


def _replace_with(mean: torch.Tensor | None):
    def hook(act, hook):
        out = np.zeros(act.shape) if mean is None else np.broadcast_to(mean.numpy(), act.shape)
        return torch.tensor(out, dtype=act.dtype)

    return hook


def _reference(cm, batches, base=None) -> dict[str, dict[str, float]]:
    """Every metric, per site and for all, recomputed from run_with_cache."""
    sites = cm.sites

    def base_run(t, hooks=()):
        if base is not None:
            with base.hooks(fwd_hooks=list(hooks)):
                return base.run_with_cache(t)
        with cm.disabled(), cm.hooks(fwd_hooks=list(hooks)):
            return cm.run_with_cache(t)

    means = {s: _mean_act(base_run, batches, s) for s in sites}
    lp_base = [_log_probs(base_run(t)[0]) for t in batches]
    ce_base = np.concatenate([_ce(lp, t) for lp, t in zip(lp_base, batches)]).mean()
    out = {}
    for entry, on in [*((s, [s]) for s in sites), (ALL, sites)]:
        off = [s for s in sites if s not in on]
        ce, kl, ablated = [], [], {"zero": [], "mean": []}
        recons, usages = [], []
        for s in on:
            a, a_hat, codes = [], [], []
            for t in batches:
                # the codebook's input: upstream codebooks as in the condition, its own off
                with cm.disabled(*off, s):
                    x = cm.run_with_cache(t)[1][s]
                with cm.disabled(*off) if off else nullcontext():
                    c = cm.run_with_cache(t)[1][codes_hook_name(s)]
                x = _codebook_input(cm, s, x)
                a.append(x.reshape(t.numel(), -1, x.shape[-1]))  # [positions, units, d]
                a_hat.append(_decode(cm.codebook(s), c).reshape(a[-1].shape))
                codes.append(c.reshape(-1, c.shape[-1]).numpy())
            recons.append(_recon(np.concatenate(a), np.concatenate(a_hat)))
            usages.append(_usage(cm.codebook(s), np.concatenate(codes)))
        for t, lpb in zip(batches, lp_base):
            with cm.disabled(*off) if off else nullcontext():
                lp = _log_probs(cm(t))
            ce.append(_ce(lp, t))
            kl.append(_kl(lpb, lp))
            for kind in ablated:
                hooks = [(s, _replace_with(means[s] if kind == "mean" else None)) for s in on]
                ablated[kind].append(_ce(_log_probs(base_run(t, hooks)[0]), t))
        ce_cb = np.concatenate(ce).mean()
        zero, mean = (np.concatenate(ablated[k]).mean() for k in ("zero", "mean"))
        out[entry] = {
            "ce_base": ce_base,
            "ce_codebook": ce_cb,
            "ce_zero_ablation": zero,
            "ce_mean_ablation": mean,
            "ce_delta": ce_cb - ce_base,
            "loss_recovered_zero": (zero - ce_cb) / (zero - ce_base),
            "loss_recovered_mean": (mean - ce_cb) / (mean - ce_base),
            "kl_to_base": np.concatenate(kl).mean(),
            **_pooled(recons, usages),
        }
    return out


def _assert_matches(ev: Evaluation, ref: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    for entry, metrics in [*ev.sites.items(), (ALL, ev.all)]:
        assert set(metrics) == set(ref[entry]), entry
        for k, v in ref[entry].items():
            np.testing.assert_allclose(metrics[k], v, rtol=rtol, atol=atol, err_msg=f"{entry} {k}")


# ---------------------------------------------------------------------------- tests
def test_every_metric_matches_the_reference(backend):
    cm = _cm(make_model(backend))
    batches = _batches()
    ev = evaluate_codebooks(cm, batches, dense_thresholds=THRESHOLDS)
    assert ev.n_tokens == sum(t.numel() for t in batches)
    _assert_matches(ev, _reference(cm, batches))
    # the metrics are not degenerate on this model (else the comparison proves little)
    for m in [*ev.sites.values(), ev.all]:
        assert 0 < m["dense_frac_10pct"] < 1 and m["kl_to_base"] > 0
        assert m["ce_zero_ablation"] != m["ce_base"] != m["ce_mean_ablation"]


def test_split_site_and_shared_head_codebook_match_the_reference(backend):
    """Grouped [b, p, d] site (units = groups) and one codebook shared by all heads."""
    cm = CodebookModel(make_model(backend))
    cm.add_codebook("blocks.0.hook_resid_pre", n_codes=20, k=2, d_in=16, n_groups=2)
    cm.add_codebook("blocks.1.attn.hook_z", n_codes=25, k=1, d_in=8, n_groups=1, combine="mean")
    cm.init_codebooks(torch.cat(_batches(seed=7, shapes=((6, 8),))))
    batches = _batches(seed=2, shapes=((3, 9), (2, 9)))
    ev = evaluate_codebooks(cm, batches, dense_thresholds=THRESHOLDS)
    _assert_matches(ev, _reference(cm, batches))


def test_ce_base_and_ablations_come_from_base_model(backend):
    """A finetuned model with codebooks evaluated against a separate base with other weights."""
    cm = _cm(make_model(backend))
    base = make_model(backend, seed=3)
    batches = _batches(seed=1)
    ev = evaluate_codebooks(cm, batches, base_model=base, dense_thresholds=THRESHOLDS)
    _assert_matches(ev, _reference(cm, batches, base=base))
    own = evaluate_codebooks(cm, batches, dense_thresholds=THRESHOLDS)
    for key in ("ce_base", "ce_zero_ablation", "ce_mean_ablation", "kl_to_base"):
        assert abs(ev.all[key] - own.all[key]) > 1e-3, key
    # the codebook side does not depend on the base model
    for key in ("ce_codebook", "explained_variance", "dead_frac", "usage_entropy"):
        assert ev.sites[Z][key] == pytest.approx(own.sites[Z][key], rel=1e-6)


def test_base_model_same_as_cm_model_is_cm_disabled(backend):
    cm = _cm(make_model(backend))
    batches = _batches(seed=4)
    a = evaluate_codebooks(cm, batches)
    b = evaluate_codebooks(cm, batches, base_model=cm.model)
    assert a.flat() == pytest.approx(b.flat(), nan_ok=True)


def test_empty_and_repeated_slots_are_counted_as_patched(backend):
    """Codes patched by a hook on hook_codes: -1 slots are empty, a repeated id counts once."""
    cm = _cm(make_model(backend))

    def patch(codes, hook):
        codes = codes.clone()
        codes[:, ::2, 1] = -1  # empty slot at even positions
        codes[:, 1::3, 2] = codes[:, 1::3, 0]  # a repeat at every third position
        return codes

    hp = cm.model.hook_dict[codes_hook_name(MLP)]
    hp.add_hook(patch, dir="fwd", is_permanent=True)
    batches = _batches(seed=6)
    try:
        ev = evaluate_codebooks(cm, batches, dense_thresholds=THRESHOLDS)
        ref = _reference(cm, batches)
    finally:
        hp.remove_hooks(dir="fwd", including_permanent=True)
    _assert_matches(ev, ref)
    n_empty = sum(t.shape[0] * ((t.shape[1] + 1) // 2) for t in batches)
    slots = sum(t.numel() for t in batches) * 3
    assert ev.sites[MLP]["empty_slot_rate"] == pytest.approx(n_empty / slots)
    assert ev.sites[MLP]["l0"] < 3 - n_empty / slots * 3 + 1e-9  # repeats count once
    assert ev.sites[Z]["empty_slot_rate"] == 0 and ev.sites[Z]["l0"] == 2


def test_error_term_keeps_the_model_and_reports_the_codebooks_own_output(backend):
    plain, cm = _cm(make_model(backend)), _cm(make_model(backend))  # same weights
    for cb in cm.codebooks.values():
        cb.cfg.use_error_term = True
    batches = _batches(seed=8)
    ev = evaluate_codebooks(cm, batches)
    ref = evaluate_codebooks(plain, batches)
    for m in [*ev.sites.values(), ev.all]:
        assert m["ce_codebook"] == pytest.approx(m["ce_base"], abs=1e-6)
        assert m["kl_to_base"] == pytest.approx(0, abs=1e-6)
        assert m["loss_recovered_zero"] == pytest.approx(1, abs=1e-4)
        assert m["loss_recovered_mean"] == pytest.approx(1, abs=1e-4)
    for site in cm.sites:  # alone, the codebook sees the same input, so the same codes
        for k in ("explained_variance", "cosine", "rel_l2", "dead_frac", "usage_entropy", "l0"):
            assert ev.sites[site][k] == pytest.approx(ref.sites[site][k], rel=1e-5), (site, k)
        assert ev.sites[site]["explained_variance"] < 1


def test_zero_codebook_is_zero_ablation(backend):
    cm = CodebookModel(make_model(backend))
    cm.add_codebook(Z, n_codes=5, k=2)
    with torch.no_grad():
        cm.codebook(Z).codebook.zero_()
    ev = evaluate_codebooks(cm, _batches(seed=9))
    m = ev.sites[Z]
    assert m["ce_codebook"] == pytest.approx(m["ce_zero_ablation"], abs=1e-6)
    assert m["loss_recovered_zero"] == pytest.approx(0, abs=1e-4)
    assert m["cosine"] == 0 and m["rel_l2"] == pytest.approx(1)
    assert m["explained_variance"] < 0
    assert ev.all == ev.sites[Z]  # one site: "all" is that site


def test_mean_codebook_is_mean_ablation(backend):
    """One code per head equal to the head's mean activation: a_hat = mean, so EV = 0 and the
    codebook is the mean ablation."""
    cm = CodebookModel(make_model(backend))
    cm.add_codebook(Z, n_codes=1, k=1)
    batches = _batches(seed=10)
    with cm.disabled():
        z = torch.cat([cm.run_with_cache(t)[1][Z].reshape(-1, 4, 8) for t in batches])
    with torch.no_grad():
        cm.codebook(Z).codebook.copy_(z.double().mean(0)[:, None].float())
    m = evaluate_codebooks(cm, batches).sites[Z]
    assert m["explained_variance"] == pytest.approx(0, abs=1e-5)
    assert m["ce_codebook"] == pytest.approx(m["ce_mean_ablation"], abs=1e-5)
    assert m["loss_recovered_mean"] == pytest.approx(0, abs=1e-3)
    assert m["dead_frac"] == 0 and m["usage_entropy"] == 0 and m["effective_codes"] == 1
    assert m["dense_frac_10pct"] == 1 and m["l0"] == 1


def test_state_is_restored_and_usage_untouched(backend):
    cm = _cm(make_model(backend))
    batches = _batches(seed=11)
    expected = evaluate_codebooks(cm, batches).flat()
    cm.train()
    cm.model.eval()
    cm.disable(MLP)
    counts = {s: cb.code_counts.clone() for s, cb in cm.codebooks.items()}
    # the flags do not change what is evaluated: every codebook is measured
    assert evaluate_codebooks(cm, batches).flat() == pytest.approx(expected, nan_ok=True)
    assert cm.enabled and cm.codebook(Z).enabled and not cm.codebook(MLP).enabled
    assert cm.codebook(Z).training and not cm.model.training
    for s, cb in cm.codebooks.items():
        assert torch.equal(cb.code_counts, counts[s])
    cm.enabled = False
    bad = [batches[0], torch.full((2, 5), TINY["d_vocab"] + 100)]  # fails inside the model
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        evaluate_codebooks(cm, bad)
    assert not cm.enabled and not cm.codebook(MLP).enabled and cm.codebook(Z).enabled
    assert cm.codebook(Z).training and not cm.model.training


def test_streaming_equals_one_batch(backend):
    """The sums do not depend on how the tokens are split into batches."""
    cm = _cm(make_model(backend))
    tokens = torch.cat(_batches(seed=12, shapes=((9, 8),)))
    whole = evaluate_codebooks(cm, [tokens])
    split = evaluate_codebooks(cm, list(tokens.split([1, 3, 5])))
    assert split.flat() == pytest.approx(whole.flat(), rel=1e-5, abs=1e-6, nan_ok=True)


_BUILT: dict[str, CodebookModel] = {}


def _built(name: str) -> CodebookModel:
    """Models built once for the hypothesis tests (which call the test many times)."""
    if name not in _BUILT:
        if name == "two":
            _BUILT[name] = _cm(make_model("bridge"))
        else:
            cm = CodebookModel(make_model("bridge"))
            cm.add_codebook(MLP, n_codes=6, k=3)
            _BUILT[name] = cm
    return _BUILT[name]


@pytest.mark.bridge
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=9))
def test_streaming_any_split_equals_one_batch(sizes):
    cm = _built("two")
    tokens = torch.cat(_batches(seed=12, shapes=((9, 8),)))
    cuts = [c for c in np.cumsum(sizes).tolist() if c < 9]
    parts = list(torch.tensor_split(tokens, cuts))
    whole = evaluate_codebooks(cm, [tokens])
    split = evaluate_codebooks(cm, parts)
    assert split.flat() == pytest.approx(whole.flat(), rel=1e-5, abs=1e-6, nan_ok=True)


@pytest.mark.bridge
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codes=hnp.arrays(np.int64, (2, 5, 3), elements=st.integers(-1, 5)))
def test_usage_metrics_of_any_codes(codes):
    """Whatever codes the model uses (patched in: empty slots, repeats, all empty, one code
    everywhere), the usage metrics equal a plain recount."""
    cm = _built("one")
    patched = torch.from_numpy(codes)
    hp = cm.model.hook_dict[codes_hook_name(MLP)]
    hp.add_hook(lambda c, hook: patched.clone(), dir="fwd", is_permanent=True)
    try:
        ev = evaluate_codebooks(
            cm, _batches(seed=14, shapes=((2, 5),)), dense_thresholds=THRESHOLDS
        )
    finally:
        hp.remove_hooks(dir="fwd", including_permanent=True)
    ref = _pooled_usage([_usage(cm.codebook(MLP), codes)])
    for k, v in ref.items():
        assert ev.sites[MLP][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


@pytest.mark.bridge
def test_bad_input_errors(user_view):
    cm = _cm(make_model("bridge"))
    good = _batches()
    with pytest.raises(ValueError, match="batches is empty"):
        evaluate_codebooks(cm, [])
    with pytest.raises(ValueError, match="batches is empty"):
        evaluate_codebooks(cm, iter(()))
    with pytest.raises(KeyError, match="Did you mean 'blocks.0.attn.hook_z'"):
        evaluate_codebooks(cm, good, sites=["blocks.0.attn.hook_zz"])
    with pytest.raises(TypeError, match=r"sites=\['blocks"):
        evaluate_codebooks(cm, good, sites=Z)
    with pytest.raises(TypeError, match=r"tokens.split"):
        evaluate_codebooks(cm, good[0])
    with pytest.raises(TypeError, match="integer tensor"):
        evaluate_codebooks(cm, [good[0].float()])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_codebooks(cm, [good[0][:, :1]])
    with pytest.raises(ValueError, match="dense_thresholds"):
        evaluate_codebooks(cm, good, dense_thresholds=(1.0,))
    with pytest.raises(TypeError, match="detach"):
        evaluate_codebooks(cm, good, base_model=cm)
    other = CodebookModel(make_model("bridge"))
    other.add_codebook(Z, n_codes=4, k=1)
    with pytest.raises(ValueError, match="codebooks attached"):
        evaluate_codebooks(cm, good, base_model=other.model)
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate_codebooks(cm, good, base_model=make_model("bridge", d_vocab=13))


@pytest.mark.bridge
def test_sites_subset_is_all():
    cm = _cm(make_model("bridge"))
    batches = _batches(seed=13)
    ev = evaluate_codebooks(cm, batches, sites=[MLP])
    assert list(ev.sites) == [MLP] and ev.all == ev.sites[MLP]
    full = evaluate_codebooks(cm, batches)
    assert ev.sites[MLP] == pytest.approx(full.sites[MLP])


# ---------------------------------------------------------------------------- the result type
_metric = st.floats(allow_nan=True, allow_infinity=False, width=64)
_metrics = st.dictionaries(st.sampled_from([*TABLE_METRICS, "ce_base", "l0"]), _metric)


@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 10**9),
    every=_metrics,
    sites=st.dictionaries(st.sampled_from([Z, MLP, "blocks.0.hook_resid_pre"]), _metrics),
)
def test_evaluation_round_trips_through_json(n, every, sites):
    ev = Evaluation(n_tokens=n, all=every, sites=sites)
    back = Evaluation.from_dict(json.loads(json.dumps(ev.to_dict(), allow_nan=False)))
    assert back.n_tokens == n
    assert back.flat() == pytest.approx(ev.flat(), nan_ok=True)
    assert set(ev.flat()) == {f"{ALL}/{k}" for k in every} | {
        f"{s}/{k}" for s, m in sites.items() for k in m
    }
    rows = ev.rows()
    assert [r[0] for r in rows] == [*sites, ALL]
    assert all(len(r) == len(ev.header()) for r in rows)


def test_from_dict_refuses_other_dicts():
    with pytest.raises(ValueError, match="missing key"):
        Evaluation.from_dict({"all": {}})


def test_dense_metric_names():
    assert [dense_metric_name(t) for t in (0.01, 0.1, 0.005, 0.5)] == [
        "dense_frac_1pct",
        "dense_frac_10pct",
        "dense_frac_0.5pct",
        "dense_frac_50pct",
    ]
