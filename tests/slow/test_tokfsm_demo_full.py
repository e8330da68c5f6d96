"""The full-size TokFSM demo meets the goals of its issue (about 12 minutes on a 2-core CPU).

The base model is trained from scratch (an empty cache), so the time covers the whole demo.
"""

from __future__ import annotations

import json

import pytest

from codebook_lens.fsm.demo import run_demo


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_tokfsm_demo_meets_its_goals(tmp_path):
    m = run_demo(tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, log=lambda s: 0)
    assert m["base"]["transition_accuracy"] >= 0.96, m["base"]
    assert m["codebook"]["transition_accuracy"] >= 0.95, m["codebook"]
    assert m["recovery"]["states_recovered"] >= 90, m["recovery"]["states_recovered_per_site"]
    assert m["intervention"]["success_rate"] >= 0.9, m["intervention"]["per_site_set"]
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["recovery"]["states_recovered"] == m["recovery"]["states_recovered"]
