"""Save/load round trips through real safetensors files, and refusal of bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from codebook_lens import CheckpointError, CodebookModel
from codebook_lens.atomic import data_path
from codebook_lens.io import MODEL_KIND
from tests.conftest import make_model


def _cm(model, tokens) -> CodebookModel:
    cm = CodebookModel(model)
    cm.add_codebook("blocks.0.attn.hook_z", n_codes=12, k=2)
    cm.add_codebook("blocks.1.hook_mlp_out", n_codes=9, k=1, input_norm="layernorm")
    cm.init_codebooks(tokens)
    cm.train()
    cm(tokens)  # populate usage counts
    cm.eval()
    return cm


def test_round_trip_with_given_model(model, tokens, tmp_path, backend):
    cm = _cm(model, tokens)
    out = cm(tokens)
    cm.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "cfg.json").read_text())
    assert meta["format"] == "codebook_lens" and meta["backend"] == backend
    assert [s["site"] for s in meta["sites"]] == cm.sites
    assert not (data_path(tmp_path / "ck", MODEL_KIND) / "model.safetensors").exists()
    cm2 = CodebookModel.load(tmp_path / "ck", make_model(backend))
    assert torch.equal(cm2(tokens), out)
    for site, cb in cm.codebooks.items():
        assert torch.equal(cm2.codebooks[site].code_counts, cb.code_counts)
        assert cm2.codebooks[site].cfg == cb.cfg


def test_round_trip_include_model(model, tokens, tmp_path):
    with torch.no_grad():  # make the weights differ from a fresh seeded init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cm = _cm(model, tokens)
    out = cm(tokens)
    cm.save(tmp_path / "ck", include_model=True)
    cm2 = CodebookModel.load(tmp_path / "ck")
    assert cm2.backend == cm.backend
    assert torch.equal(cm2(tokens), out)
    with cm2.disabled(), cm.disabled():
        assert torch.equal(cm2(tokens), cm(tokens))


def test_save_is_atomic_and_overwrites(model, tokens, tmp_path):
    cm = _cm(model, tokens)
    cm.save(tmp_path / "ck")
    cm.codebooks["blocks.1.hook_mlp_out"].codebook.data.add_(1.0)
    cm.save(tmp_path / "ck")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ck"]
    assert leftovers == []
    cm2 = CodebookModel.load(tmp_path / "ck", make_model(cm.backend))
    torch.testing.assert_close(
        cm2.codebooks["blocks.1.hook_mlp_out"].codebook,
        cm.codebooks["blocks.1.hook_mlp_out"].codebook,
    )


def test_failed_save_leaves_old_checkpoint(model, tokens, tmp_path, monkeypatch):
    cm = _cm(model, tokens)
    cm.save(tmp_path / "ck")
    before = (data_path(tmp_path / "ck", MODEL_KIND) / "codebooks.safetensors").read_bytes()
    import codebook_lens.tensor_files as tensor_files

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tensor_files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        cm.save(tmp_path / "ck")
    assert (data_path(tmp_path / "ck", MODEL_KIND) / "codebooks.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    versions = [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("v-")]
    assert len(versions) == 1


def test_bad_checkpoints_are_refused(model, tokens, tmp_path):
    cm = _cm(model, tokens)
    with pytest.raises(CheckpointError, match="not a directory"):
        CodebookModel.load(tmp_path / "nope", model)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "cfg.json").write_text(json.dumps({"architecture": "gpt2"}))
    with pytest.raises(CheckpointError, match="not a CodebookModel checkpoint"):
        CodebookModel.load(tmp_path / "foreign", model)
    (tmp_path / "foreign" / "cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CodebookModel.load(tmp_path / "foreign", model)

    cm.save(tmp_path / "ck")
    fresh = make_model(cm.backend)
    with pytest.raises(CheckpointError, match="saved without the base model"):
        CodebookModel.load(tmp_path / "ck")
    # truncated tensor file
    f = data_path(tmp_path / "ck", MODEL_KIND) / "codebooks.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        CodebookModel.load(tmp_path / "ck", fresh)
    # a tensor whose shape disagrees with its config
    f.write_bytes(good)
    t = load_file(str(f))
    t["blocks.1.hook_mlp_out.codebook"] = torch.zeros(1, 5, 32)
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"has shape \(1, 5, 32\)"):
        CodebookModel.load(tmp_path / "ck", fresh)
    # a model the codebooks do not fit
    f.write_bytes(good)
    other = make_model(cm.backend, d_model=48, d_head=12, d_mlp=96)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        CodebookModel.load(tmp_path / "ck", other)
