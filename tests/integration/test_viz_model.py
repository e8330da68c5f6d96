"""Views and a report built from a real CodebookModel's cache (tiny random model)."""

from __future__ import annotations

import json

import torch

from codebook_lens import CodebookModel
from codebook_lens.viz import (
    View,
    attention_with_codes_view,
    code_tokens_view,
    code_usage_histogram,
    external_refs,
    report_html,
    which_code_view,
)
from codebook_lens.viz.offline import CircuitsVisPart
from tests.conftest import make_model

Z = "blocks.0.attn.hook_z"
MLP = "blocks.1.hook_mlp_out"


def _props(view: View) -> list[dict]:
    return [json.loads(p.props_json) for p in view.parts if isinstance(p, CircuitsVisPart)]


def test_views_from_run_with_cache(tokens):
    cm = CodebookModel(make_model())
    cm.add_codebook(Z, n_codes=16, k=1)
    cm.add_codebook(MLP, n_codes=16, k=2)
    cm.init_codebooks(tokens)
    _, cache = cm.run_with_cache(tokens)
    toks = [f"t{t}" for t in tokens[0].tolist()]
    z_codes = cache[f"{Z}.hook_codes"][0]  # [pos, head, k]
    mlp_codes = cache[f"{MLP}.hook_codes"][0]  # [pos, k]
    pattern = cache["blocks.0.attn.hook_pattern"][0]  # [head, q, k]

    code = int(mlp_codes[0, 0])
    (props,) = _props(code_tokens_view(toks, mlp_codes, code))
    assert props["tokens"] == toks
    assert props["values"] == (mlp_codes == code).any(-1).float().tolist()

    (props,) = _props(which_code_view(toks, z_codes))
    labels = [int(s.split()[1]) for s in props["labels"]]
    assert set(labels) <= set(z_codes.unique().tolist())

    (props,) = _props(attention_with_codes_view(pattern, z_codes, toks))
    torch.testing.assert_close(torch.tensor(props["attention"]), pattern)

    page = report_html(
        "tiny model",
        summary={"sites": cm.sites},
        figures={
            "usage": code_usage_histogram({s: cb.code_counts for s, cb in cm.codebooks.items()})
        },
        views={"which code": which_code_view(toks, z_codes)},
    )
    assert external_refs(page) == []
