"""The TokFSM experiment pipeline at a tiny size, the intervention plumbing, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from codebook_lens import CodebookModel, codes_hook_name
from codebook_lens.fsm import FSM
from codebook_lens.fsm.data import eval_set
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
    _forced_model,
    attach_codebooks,
    interventions,
    site_sets,
)
from codebook_lens.fsm.metrics import append_digit_prefixes, next_state_distribution
from tests.conftest import make_model
from tests.integration.fsm_reference import (
    assert_interventions_match,
    reference_intervention_probs,
    reference_rates,
)


def _tiny_cm():
    fsm = FSM(20, 4, seed=0)
    model = make_model(n_ctx=33, d_vocab=fsm.d_vocab)
    cfg = ExperimentConfig.small()
    cm = attach_codebooks(model, cfg.plan, seed=0)
    cm.init_codebooks(eval_set(fsm, 16, 8, seed=1))
    return fsm, cm


def test_site_sets_cover_each_layer_and_all():
    _, cm = _tiny_cm()
    sets = site_sets(cm)
    assert sets["all"] == cm.sites
    assert sets["L0 attn"] == ["blocks.0.attn.hook_z"]
    assert sets["L1 mlp"] == ["blocks.1.hook_mlp_out"]
    assert len(sets) == 2 * 2 + 1


def test_forcing_own_codes_changes_nothing_and_rows_are_independent():
    fsm, cm = _tiny_cm()
    prompts = eval_set(fsm, 6, 4, seed=3)
    pos = prompts.shape[1] - 1
    _, cache = cm.run_with_cache(prompts)
    own = {s: [cache[codes_hook_name(s)][:, pos : pos + 1]] for s in cm.sites}
    clean = next_state_distribution(cm, fsm, prompts)
    same = next_state_distribution(_forced_model(cm, own, pos), fsm, prompts)
    torch.testing.assert_close(same, clean)
    # rows permuted: each prompt gets another prompt's codes; compare with one-at-a-time runs
    perm = torch.tensor([1, 2, 3, 4, 5, 0])
    forced = {s: [c[0][perm]] for s, c in own.items()}
    batched = next_state_distribution(_forced_model(cm, forced, pos), fsm, prompts)
    for i in range(6):
        one = {s: [c[0][i : i + 1]] for s, c in forced.items()}
        single = next_state_distribution(_forced_model(cm, one, pos), fsm, prompts[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(batched, clean)


def test_forcing_a_donors_codes_at_both_state_positions_equals_the_donors_run():
    # with every site forced at the last position and at the appended digit, the second digit's
    # distribution is the donor's own: the residual there is the token plus forced code outputs
    fsm, cm = _tiny_cm()
    prompts, donors = eval_set(fsm, 5, 4, seed=3), eval_set(fsm, 5, 4, seed=4)
    pos = prompts.shape[1] - 1
    runs = [append_digit_prefixes(donors, fsm.base, j) for j in range(fsm.n_digits)]
    forced = {s: [] for s in cm.sites}
    for run in runs:
        _, cache = cm.run_with_cache(run)
        for s in cm.sites:
            forced[s].append(cache[codes_hook_name(s)][:, pos:])
    p = next_state_distribution(_forced_model(cm, forced, pos), fsm, prompts)
    p_donor = next_state_distribution(cm, fsm, donors)
    # P(b | a) matches exactly; P(a) differs only through the prompt's own last token
    two = append_digit_prefixes(prompts, fsm.base, 1)
    with torch.no_grad():
        lp = _forced_model(cm, forced, pos)(two)[:, -1, : fsm.base].log_softmax(-1)
        lp_donor = cm(runs[1])[:, -1, : fsm.base].log_softmax(-1)
    torch.testing.assert_close(lp, lp_donor, rtol=1e-4, atol=1e-5)
    assert p.shape == p_donor.shape == (5, fsm.n_states)


def test_append_digit_prefixes_matches_a_loop():
    prompts = torch.tensor([[10, 1, 2], [10, 3, 4]])
    got = append_digit_prefixes(prompts, 3, 2)
    want = [row + [a, b] for row in prompts.tolist() for a in range(3) for b in range(3)]
    assert got.tolist() == want
    assert append_digit_prefixes(prompts, 3, 0).tolist() == prompts.tolist()


def test_interventions_equal_a_loop_reference():
    """Every reported rate and JSD (each site set, the last-position-only variant, the baseline)
    equals a one-prompt-at-a-time recount with plain codes hooks (tests/integration/
    fsm_reference.py), at the default success rule and at looser ones that make rates nonzero."""
    fsm, cm = _tiny_cm()
    cfg = ExperimentConfig.small()
    cfg.intervention_prompts = 1  # one prompt per target state: 20 loops of the reference
    targets, probs = reference_intervention_probs(cm, fsm, cfg)
    seen = set()
    for top, need in ((None, None), (4, 1), (2, 1)):
        itv = interventions(cm, fsm, cfg, top=top, need=need)
        assert itv["n_interventions"] == fsm.n_states * cfg.intervention_prompts
        for name, r in itv["per_site_set"].items():
            assert ("last_position_only" in r) == (name == "all")
            assert r["sites"] == site_sets(cm)[name]
        ref = reference_rates(fsm, targets, probs, top, need)
        assert_interventions_match(itv, ref)
        seen |= {v["success_rate"] for v in ref.values()}
    assert len(seen) > 2  # the comparison covers distinct nonzero rates, not only 0 == 0


def test_small_demo_end_to_end(tmp_path):
    from codebook_lens.fsm.demo import run_demo

    out = tmp_path / "demo"
    metrics = run_demo(out, ExperimentConfig.small(), cache_dir=tmp_path / "cache",
                       progress=False, log=lambda m: None)  # fmt: skip
    for name in ("fsm.json", "samples.json", "metrics.json", "report.html", "model/cfg.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["base"]["transition_accuracy"] == metrics["base"]["transition_accuracy"]
    for key in ("states_recovered", "mean_best_code_precision", "mean_best_neuron_precision"):
        assert key in saved["recovery"]
    assert set(saved["intervention"]["per_site_set"]) == {"L0 attn", "L0 mlp", "all"}
    assert 0.0 <= saved["intervention"]["success_rate"] <= 1.0
    t = saved["timings"]
    assert t["total_s"] > 0 and t["process_cpu_s"] > 0
    assert t["total_s"] >= t["base_model_s"] + t["finetune_s"] + t["interventions_s"]
    assert 0.0 <= t["cpu_steal_fraction"] <= 1.0  # Linux: read from /proc/stat
    fsm = FSM.load(out / "fsm.json")
    samples = json.loads((out / "samples.json").read_text())
    # the saved samples reproduce the reported accuracy
    from codebook_lens.fsm.metrics import transition_accuracy

    cfg = ExperimentConfig.small()
    toks = torch.tensor(samples["codebook"])
    states = fsm.tokens_to_states(toks[:, 1:])[:, cfg.eval_prompt_states - 1 :]
    acc = transition_accuracy(fsm, states, is_tokens=False)
    assert acc == pytest.approx(saved["codebook"]["transition_accuracy"])
    # the saved model reloads without its base model and computes the same codes
    cm = CodebookModel.load(out / "model")
    assert cm.sites == saved["codebook"]["sites"]
    # a second run reuses the cached base model
    again = run_demo(tmp_path / "demo2", ExperimentConfig.small(), cache_dir=tmp_path / "cache",
                     progress=False, log=lambda m: None)  # fmt: skip
    assert again["base"]["cached"] is True
    assert again["base"]["transition_accuracy"] == metrics["base"]["transition_accuracy"]


def test_cli_demo_small_runs_as_a_process(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "codebook_lens.cli", "demo", "--out", str(out), "--small",
         "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--merge-threshold", "0.5"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "codebook transition accuracy" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["plan"]["mlp_merge_threshold"] == 0.5
    saved = json.loads((out / "model" / "cfg.json").read_text())["sites"]
    merge = {e["site"]: e["config"]["merge_threshold"] for e in saved}
    assert merge == {s: (0.5 if "mlp" in s else 0.0) for s in merge} and len(merge) == 2
    assert (out / "report.html").exists()
    rebuilt = subprocess.run(
        [sys.executable, "-m", "codebook_lens.cli", "report", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    bad = subprocess.run(
        [sys.executable, "-m", "codebook_lens.cli", "demo"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--out" in bad.stderr
