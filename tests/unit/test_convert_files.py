"""Reading reference checkpoint files and mapping their configs, without a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from codebook_lens import CheckpointError
from codebook_lens.convert import converted_sites, read_reference_checkpoint
from codebook_lens.convert.placements import base_state_dict

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "codebook_features"


def _copy(tmp_path: Path, name: str = "gpt2_ip_k1") -> Path:
    dst = tmp_path / name
    shutil.copytree(ROOT / name / "checkpoint", dst)
    return dst


def test_safetensors_and_sharded_checkpoints_read_the_same(tmp_path):
    ref = read_reference_checkpoint(ROOT / "gpt2_ip_k1" / "checkpoint")
    one = _copy(tmp_path / "a")
    (one / "pytorch_model.bin").unlink()
    save_file({k: v.clone() for k, v in ref.state_dict.items()}, str(one / "model.safetensors"))
    sharded = _copy(tmp_path / "b")
    (sharded / "pytorch_model.bin").unlink()
    keys = sorted(ref.state_dict)
    shards = {"w-1.safetensors": keys[::2], "w-2.safetensors": keys[1::2]}
    for file, ks in shards.items():
        save_file({k: ref.state_dict[k].clone() for k in ks}, str(sharded / file))
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for d in (one, sharded):
        got = read_reference_checkpoint(d)
        assert got.state_dict.keys() == ref.state_dict.keys()
        assert all(torch.equal(got.state_dict[k], v) for k, v in ref.state_dict.items())


def test_file_errors(tmp_path):
    d = _copy(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_reference_checkpoint(d)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        read_reference_checkpoint(d)
    torch.save([torch.zeros(1)], d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict of named tensors"):
        read_reference_checkpoint(d)
    (d / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_reference_checkpoint(d)
    with pytest.raises(CheckpointError, match="is a file"):
        read_reference_checkpoint(d / "config.json")


def test_sites_and_base_keys_of_a_fixture():
    ref = read_reference_checkpoint(ROOT / "neox_other_k2" / "checkpoint")
    sites = converted_sites(ref.config, ref.state_dict, n_layers=2, n_heads=4)
    got = {s.site: (tuple(s.codebook.shape), s.cfg.k, s.cfg.similarity) for s in sites}
    assert got == {
        f"blocks.{L}.{hook}": (shape, 2, "euclidean")
        for L in (0, 1)
        for hook, shape in (
            ("attn.hook_z", (1, 12, 16)),
            ("mlp.hook_post", (4, 12, 16)),
            ("hook_resid_post", (2, 12, 8)),
        )
    }
    base = base_state_dict(ref.state_dict)
    assert "gpt_neox.layers.0.attention.dense.weight" in base
    assert not any("codebook" in k or "module_layer" in k for k in base)


def test_config_errors():
    ref = read_reference_checkpoint(ROOT / "gpt2_ip_k1" / "checkpoint")
    cases = [
        ({"layers_to_snap": [5]}, "outside the base model's 2 layers"),
        ({"k_codebook": [1]}, "k_codebook has 1 entries; codebook_at has 2"),
        ({"similarity_metric": "cosine"}, "similarity_metric='cosine'"),
        ({"num_codebooks": [5, 1]}, "no tensor .*codebook.4"),
        ({"num_codebooks": [2, 1]}, "attn_preproj with num_codebooks=2 is not supported"),
        ({"layers_to_snap": [0]}, "codebook tensors that its config does not explain"),
        ({"num_codes": [13, 12]}, "num_codes=13 in config.json, 12 in the tensors"),
        ({"codebook_at": ["transformer_block", "mlp"]}, r"\['mlp'\] listed after"),
    ]
    for change, match in cases:
        with pytest.raises(CheckpointError, match=match):
            converted_sites({**ref.config, **change}, ref.state_dict, n_layers=2, n_heads=4)
