"""The full-size lm-demo meets its goals (about 10 minutes on a 2-core CPU)."""

from __future__ import annotations

import pytest

from codebook_lens.lm import TOPICS, run_lm_demo


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_lm_demo_meets_its_goals(tmp_path):
    m = run_lm_demo(tmp_path, progress=False)
    assert m["loss"]["relative_increase"] <= 0.10, m["loss"]
    s = m["steering_summary"]
    assert s["topics_with_10x"] > len(TOPICS) / 2, m["steering"]
    best = [t["best_precision"] for t in m["topic_codes"].values()]
    assert min(best) >= 0.5, m["topic_codes"]
