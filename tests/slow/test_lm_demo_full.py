"""The full-size lm-demo meets the README's Results goals (the README measured 139 s on a 2-core
CPU; ``make test-slow`` runs it in CI)."""

from __future__ import annotations

import pytest

from codebook_lens.lm import TOPICS, run_lm_demo


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_lm_demo_meets_its_goals(tmp_path):
    m = run_lm_demo(tmp_path, progress=False)
    loss = m["loss"]
    # README "Results", LM rows: held-out loss increase with codebooks <= 10%
    rel = (loss["codebooks_after_finetuning"] - loss["base"]) / loss["base"]
    assert loss["relative_increase"] == pytest.approx(rel, rel=1e-12)
    assert rel <= 0.10, loss
    # ... and topics steered to >= 10x their unsteered rate: every topic (issue 22; this run,
    # seed 0, measured 8 of 8 with lowest ratios 17.5x on 4.3 and 23.0x on 3.9, and seeds 1-2
    # 8 of 8 as well: docs/results/lm.md)
    steered = sum((st.get("ratio") or 0.0) >= 10 for st in m["steering"].values())
    assert m["steering_summary"]["topics_with_10x"] == steered
    assert steered == len(TOPICS), m["steering"]
