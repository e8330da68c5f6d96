"""Codes versus SAEs (transformer-lens 3.x leg, with SAELens): the splice metrics against
``evaluate_codebooks`` (an independent implementation), the feature store and the SAE steering
hook against brute forces, and the small TokFSM and topic-stories comparisons end to end, their
numbers recounted from the saved dictionaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from codebook_lens import CodebookModel
from codebook_lens.evaluation import evaluate_codebooks
from tests.conftest import TINY, needs_hooked

sae_lens = pytest.importorskip("sae_lens", reason="SAELens is installed in the 3.x leg only")
from codebook_lens.compare import (  # noqa: E402
    FSMCompareConfig,
    LMCompareConfig,
    as_sae_model,
    feature_store,
    splice_metrics,
)
from codebook_lens.compare.__main__ import main  # noqa: E402
from codebook_lens.fsm.data import eval_set, state_labels  # noqa: E402
from codebook_lens.fsm.machine import FSM  # noqa: E402
from codebook_lens.saelens import to_sae_lens  # noqa: E402

pytestmark = needs_hooked


def _model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return as_sae_model(HookedTransformer(HookedTransformerConfig(**TINY)))


def _tokens(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randint(0, TINY["d_vocab"], (n, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "site,fields",
    [
        ("blocks.0.hook_mlp_out", {}),
        ("blocks.1.attn.hook_z", {"d_in": TINY["n_heads"] * TINY["d_head"], "n_groups": 1}),
    ],
)
def test_splice_metrics_equal_evaluate_codebooks(site, fields):
    model = _model()
    cm = CodebookModel(model)
    cm.add_codebook(site, n_codes=24, k=2, **fields)
    cm.init_codebooks(_tokens(0, 16))
    batches = list(_tokens(1, 12).split(4))
    ev = evaluate_codebooks(cm.eval(), batches)
    sae = to_sae_lens(cm, site)
    cm.detach()
    ours = splice_metrics(model, sae, batches)
    want = ev.sites[site]
    assert ours["explained_variance"] == pytest.approx(want["explained_variance"], abs=1e-5)
    assert ours["loss_recovered"] == pytest.approx(want["loss_recovered_zero"], abs=1e-5)
    assert ours["kl"] == pytest.approx(want["kl_to_base"], abs=1e-6)
    assert ours["l0"] == 2 * (TINY["n_heads"] if "hook_z" in site and not fields else 1)


def test_feature_store_holds_the_active_features():
    model = _model()
    site = "blocks.1.hook_resid_pre"
    cfg = sae_lens.TopKSAEConfig(d_in=TINY["d_model"], d_sae=40, k=3)
    cfg.metadata.hook_name = site
    torch.manual_seed(0)
    sae = sae_lens.TopKSAE(cfg)
    tokens = _tokens(2)
    store = feature_store(model, sae, tokens, batch_size=3)
    _, cache = model.run_with_cache(tokens)
    acts = sae.encode(cache[site]).detach().numpy()
    got = store.get(site).numpy()  # [seq, pos, slots]
    for s in range(tokens.shape[0]):
        for p in range(tokens.shape[1]):
            want = sorted(np.flatnonzero(acts[s, p] > 0).tolist())
            assert sorted(int(i) for i in got[s, p] if i >= 0) == want


def _recount_states(acts: np.ndarray, labels: np.ndarray, n_states: int) -> int:
    """States with a feature of precision and recall >= 0.9, by plain counting."""
    on = acts.reshape(-1, acts.shape[-1]) > 0
    lab = labels.reshape(-1)
    found = 0
    for s in range(n_states):
        is_s = lab == s
        if not is_s.any():
            continue
        joint = on[is_s].sum(0)
        fires = on[lab >= 0].sum(0)
        precision = np.where(fires > 0, joint / np.maximum(fires, 1), 0)
        recall = joint / is_s.sum()
        found += bool(((precision >= 0.9) & (recall >= 0.9)).any())
    return found


def test_small_comparison_end_to_end_recounted(tmp_path):
    assert main(["--small", "--task", "tokfsm", "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache"), "--seeds", "0"]) == 0  # fmt: skip
    out = tmp_path / "out" / "tokfsm"
    result = json.loads((out / "results.json").read_text())
    cfg = FSMCompareConfig.small()
    ecfg = cfg.experiment
    assert len(result["runs"]) == len(cfg.sites) * 4
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(result["runs"]) + 1 and (out / "best_features.png").stat().st_size
    fsm = FSM(ecfg.n_states, ecfg.n_edges, seed=ecfg.fsm_seed)
    recovery = eval_set(fsm, ecfg.recovery_walks, ecfg.recovery_states, seed=ecfg.seed + 3)
    labels = state_labels(fsm, recovery).numpy()
    from codebook_lens.fsm.experiment import get_base_model

    model = as_sae_model(get_base_model(fsm, ecfg, tmp_path / "cache", progress=False)[0])
    for run in result["runs"][::3]:  # every method and site, some of the widths
        spec = run["spec"]
        path = out / "saes" / spec["site"] / f"{run['name'].replace(' ', '-')}-seed0"
        sae = sae_lens.SAE.load_from_disk(path)
        _, cache = model.run_with_cache(recovery)
        acts = sae.encode(cache[spec["site"]]).detach().numpy()
        assert _recount_states(acts, labels, fsm.n_states) == run["states_recovered"]
        assert ((acts > 0).sum(-1).mean()) <= spec["k"] + 1e-9


def test_sae_steering_hook_equals_a_loop():
    from codebook_lens.compare.lm_task import sae_steering_hook
    from codebook_lens.lm.steering import TopicCodes

    cfg = sae_lens.TopKSAEConfig(d_in=6, d_sae=12, k=4)
    sae = sae_lens.TopKSAE(cfg)
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(2, 5, 12, generator=g)
    acts = torch.zeros_like(dense).scatter(-1, dense.topk(4, dim=-1).indices, 1.0) * dense
    means = torch.rand(12, generator=g) + 1
    ones = torch.ones(1, 3)
    codes = torch.tensor([[3, 7, -1]])
    chosen = TopicCodes(0, ["x"], torch.tensor([0]), codes, ones, ones, ones.long())
    got = sae_steering_hook(sae, chosen, means)(acts.clone(), None)
    want = acts.clone()
    for b in range(2):
        for p in range(5):
            order = sorted(range(12), key=lambda i: -float(acts[b, p, i]))[:4]
            for i in order[2:]:  # the 2 weakest of the 4 active give way
                want[b, p, i] = 0.0
            want[b, p, 3], want[b, p, 7] = means[3], means[7]
    assert torch.equal(got, want)


def _recount_topic_precision(acts, labels, n_topics, min_count):
    """Per topic: the best precision of a feature firing >= min_count times on labelled tokens
    and at least once on the topic, by plain counting (0 if none)."""
    on = acts.reshape(-1, acts.shape[-1]) > 0
    lab = labels.reshape(-1)
    fires = on[lab >= 0].sum(0)
    best = []
    for t in range(n_topics):
        joint = on[lab == t].sum(0)
        ok = (fires >= min_count) & (joint > 0)
        best.append(float((joint[ok] / fires[ok]).max()) if ok.any() else 0.0)
    return best


def test_small_lm_comparison_end_to_end_recounted(tmp_path):
    from codebook_lens.compare.lm_run import cached_lm_demo
    from codebook_lens.lm import TOPICS, load_tokenizer
    from codebook_lens.lm.demo import lm_data

    assert main(["--small", "--task", "lm", "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    out = tmp_path / "out" / "lm"
    result = json.loads((out / "results.json").read_text())
    cfg = LMCompareConfig.small()
    assert [r["name"] for r in result["runs"]] == [s.name for s in cfg.specs(cfg.sites[0], 0)]
    assert len((out / "table.md").read_text().splitlines()) == 2 + 4 + 1
    assert len((out / "topics.md").read_text().splitlines()) == 2 + 4 + 1
    assert (out / "topics.png").stat().st_size
    demo = cached_lm_demo(cfg.lm, tmp_path / "cache")  # the cached run: nothing is retrained
    metrics = json.loads((demo / "metrics.json").read_text())
    paper = result["paper_setting"]
    assert paper["topic_precision"] == [metrics["topic_codes"][t]["best_precision"] for t in TOPICS]
    assert paper["topics_steered"] == metrics["steering_summary"]["topics_with_10x"]
    tok = load_tokenizer(demo / "tokenizer")
    data = lm_data(cfg.lm, tokenizer=tok)
    model = as_sae_model(CodebookModel.load(demo / "base_model", backend="hooked").detach())
    base = result["unsteered_rate"]
    for run in result["runs"]:
        spec = run["spec"]
        sae = sae_lens.SAE.load_from_disk(
            out / "saes" / spec["site"] / f"{run['name'].replace(' ', '-')}-seed0"
        )
        _, cache = model.run_with_cache(data.eval_tokens)
        acts = sae.encode(cache[spec["site"]]).detach().numpy()
        want = _recount_topic_precision(
            acts, data.eval_labels.numpy(), len(TOPICS), cfg.lm.min_count
        )
        assert run["topic_precision"] == pytest.approx(want, abs=1e-6)
        assert ((acts > 0).sum(-1).mean()) <= spec["k"] + 1e-9
        ratios = [r / max(b, 1 / cfg.n_baseline) for r, b in zip(run["steered_rate"], base)]
        assert run["steer_ratio"] == pytest.approx(ratios)
        assert run["topics_steered"] == sum(r >= 10 for r in ratios)
        assert all(r * cfg.n_samples == round(r * cfg.n_samples) for r in run["steered_rate"])
