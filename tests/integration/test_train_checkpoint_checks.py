"""Training never checkpoints what it cannot resume, and refuses a bad checkpoint clearly."""

from __future__ import annotations

import json

import pytest
import torch

from codebook_lens import CheckpointError, CodebookModel
from codebook_lens.atomic import data_path
from codebook_lens.checkpoint import TRAIN_KIND, checkpoint_path
from codebook_lens.training import TrainConfig, train_codebooks
from tests.conftest import TINY, make_model

SITE = "blocks.0.hook_resid_post"


def _cm():
    torch.manual_seed(0)
    cm = CodebookModel(make_model())
    cm.add_codebook(SITE, n_codes=8, k=2)
    return cm


def _batches(n=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, TINY["d_vocab"], (2, 8), generator=g) for _ in range(n)]


def _cfg(path, steps=4, **kw):
    return TrainConfig(steps=steps, warmup_steps=1, log_every=10, checkpoint_every=2,
                       checkpoint_dir=str(path), progress=False, **kw)  # fmt: skip


def test_a_nan_step_is_never_checkpointed(tmp_path):
    cm = _cm()
    calls = {"n": 0}

    def loss(cm, tokens):  # step 3 of 6 poisons the weights; the loss is never logged
        calls["n"] += 1
        out = cm(tokens, return_type="loss")
        return out * float("nan") if calls["n"] == 3 else out

    want = r"after step 2 and by step 4: .* holds NaN or inf.*Lower the learning"
    with pytest.raises(FloatingPointError, match=want):
        train_codebooks(cm, _batches(8), _cfg(tmp_path, steps=6), loss_fn=loss)
    meta = json.loads((checkpoint_path(tmp_path) / "state.json").read_text())
    assert meta["step"] == 2  # the last good checkpoint is kept
    assert train_codebooks(_cm(), _batches(8), _cfg(tmp_path, steps=6)).resumed_from == 2


def _saved(tmp_path):
    train_codebooks(_cm(), _batches(), _cfg(tmp_path, steps=2))
    return checkpoint_path(tmp_path) / "state.json"


@pytest.mark.parametrize("step,match", [(7, "beyond this run's steps=4"), (-1, "integer >= 0")])
def test_step_out_of_range_is_refused(tmp_path, step, match):
    head = _saved(tmp_path)
    meta = json.loads(head.read_text())
    meta["step"] = step
    head.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=match):
        train_codebooks(_cm(), _batches(), _cfg(tmp_path))


def test_missing_state_json_is_not_a_silent_restart(tmp_path):
    _saved(tmp_path).unlink()
    with pytest.raises(CheckpointError, match="has no state.json"):
        train_codebooks(_cm(), _batches(), _cfg(tmp_path))


def test_non_finite_checkpoint_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    f = data_path(checkpoint_path(tmp_path), TRAIN_KIND) / "state.safetensors"
    t = load_file(str(f))
    key = next(k for k in t if k.startswith("opt.") and k.endswith("exp_avg"))
    t[key] = torch.full_like(t[key], float("inf"))
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=rf"{key} holds NaN or inf"):
        train_codebooks(_cm(), _batches(), _cfg(tmp_path))


def test_a_structural_config_change_is_named(tmp_path):
    _saved(tmp_path)
    with pytest.raises(CheckpointError, match="grad_accum=1, this run has grad_accum=2"):
        train_codebooks(_cm(), _batches(8), _cfg(tmp_path, grad_accum=2))


def test_a_checkpoint_dir_that_is_a_file_fails_before_training(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    calls = []

    def loss(cm, tokens):
        calls.append(1)
        return cm(tokens, return_type="loss")

    with pytest.raises(CheckpointError, match="is a file"):
        train_codebooks(_cm(), _batches(), _cfg(f), loss_fn=loss)
    assert calls == [] and f.read_text() == "x"
