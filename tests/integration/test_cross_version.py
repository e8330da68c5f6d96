"""Checkpoints across the transformer-lens 3 -> 4 break.

``tests/fixtures/cross_version`` holds tiny native models with codebooks, saved with
``include_model=True`` on transformer-lens 3.9 (as a ``HookedTransformer`` and as a native
bridge) and on 4.3 (native bridge) by ``make.py`` there, each with the logits and codes it gave
when saved. Every leg loads every checkpoint on every backend it has; the logits must agree to
float32 precision.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codebook_lens import BackendError, CheckpointError, CodebookModel, codes_hook_name
from codebook_lens.atomic import data_path
from codebook_lens.backends import has_hooked_transformer, hooked_to_native, native_to_hooked
from codebook_lens.io import MODEL_KIND

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cross_version"
SAVED = ["tl3_hooked", "tl3_bridge", "tl4_bridge"]
TARGETS = ["bridge", "hooked"] if has_hooked_transformer() else ["bridge"]


def _tokens() -> torch.Tensor:
    return torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("saved", SAVED)
def test_checkpoint_loads_on_every_backend(saved, target):
    path = FIXTURES / saved
    expected = load_file(str(path / "expected.safetensors"))
    cm = CodebookModel.load(path, backend=target)
    assert cm.backend == target
    logits, cache = cm.run_with_cache(_tokens())
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    for site in cm.sites:
        assert torch.equal(cache[codes_hook_name(site)], expected[site])


def test_weight_layouts_round_trip():
    cfg = json.loads((FIXTURES / "tl3_hooked" / "cfg.json").read_text())["model"]["config"]
    sd = load_file(str(data_path(FIXTURES / "tl3_hooked", MODEL_KIND) / "model.safetensors"))
    native = hooked_to_native(sd, cfg)
    assert native["blocks.0.attn.q.weight"].shape == (32, 32)
    # head h of W_Q [head, d_model, d_head] is rows h*d_head:(h+1)*d_head of q.weight
    torch.testing.assert_close(native["blocks.0.attn.q.weight"][8:16], sd["blocks.0.attn.W_Q"][1].T)
    back = native_to_hooked(native, cfg)
    for key, value in back.items():
        assert torch.equal(value, sd[key]), key


def test_unmappable_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ck"
    shutil.copytree(FIXTURES / "tl3_hooked", path)
    meta = json.loads((path / "cfg.json").read_text())
    meta["model"]["config"]["parallel_attn_mlp"] = True
    (path / "cfg.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="parallel_attn_mlp"):
        CodebookModel.load(path, backend="bridge")


def test_hooked_backend_on_tl4_names_the_fix():
    if has_hooked_transformer():
        pytest.skip("transformer-lens 3.x has HookedTransformer")
    with pytest.raises(BackendError, match="transformer-lens<4"):
        CodebookModel.load(FIXTURES / "tl3_hooked", backend="hooked")


def test_config_far_larger_than_its_weights_is_refused_before_building(tmp_path):
    path = tmp_path / "ck"
    shutil.copytree(FIXTURES / "tl4_bridge", path)
    meta = json.loads((path / "cfg.json").read_text())
    meta["model"]["config"]["n_layers"] = 10**6  # would allocate ~10^11 parameters
    (path / "cfg.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not belong to these weights"):
        CodebookModel.load(path)
