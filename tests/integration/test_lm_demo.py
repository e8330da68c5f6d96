"""A tiny end-to-end lm-demo run: every stage runs and writes its outputs."""

from __future__ import annotations

import json

import pytest

from codebook_lens import CodebookModel
from codebook_lens.lm import TOPICS, LMDemoConfig, load_tokenizer, run_lm_demo


def test_lm_demo_smoke(tmp_path):
    cfg = LMDemoConfig.small(
        n_train_stories=800,
        n_eval_stories=60,
        base_steps=20,
        cb_steps=10,
        n_samples=4,
        n_baseline=8,
        max_new_tokens=12,
        min_precision=0.0,
        max_steer_codes=2,
        progress=False,
    )
    m = run_lm_demo(tmp_path, config=cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "codebook_model",
        "metrics.json",
        "report.md",
        "tokenizer",
    ]
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(m))
    loss = m["loss"]
    assert 0 < loss["base"] < 10 and 0 < loss["codebooks_after_finetuning"] < 10
    assert set(m["steering"]) == set(TOPICS) == set(m["topic_codes"])
    for st in m["steering"].values():
        assert 0.0 <= st["steered_rate"] <= 1.0 and st["n_codes"] >= 1
    report = (tmp_path / "report.md").read_text()
    assert "Relative increase" in report and "| dragon |" in report
    # the saved artefacts load back: tokenizer and codebook model (with its base model)
    tok = load_tokenizer(tmp_path / "tokenizer")
    cm = CodebookModel.load(tmp_path / "codebook_model")
    assert cm.cfg.d_vocab == len(tok)
    assert len(cm.sites) == cfg.n_layers
    with pytest.raises(TypeError):
        run_lm_demo(tmp_path, small=True, no_such_field=1)
