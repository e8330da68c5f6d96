"""The generic finetuning loop on a tiny model and a learnable token stream."""

from __future__ import annotations

import pytest
import torch

from codebook_lens import CodebookModel
from codebook_lens.training import TrainConfig, train_codebooks
from tests.conftest import make_model


def _stream(seed=0, batch=16, length=12):
    """Sequences counting up mod 10: a next-token task a tiny model learns fast."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, 10, (batch, 1), generator=g)
        yield (start + torch.arange(length)) % 10


def test_training_lowers_loss_and_logs_explicit_terms():
    cm = CodebookModel(make_model())
    cm.add_codebook("blocks.0.attn.hook_z", n_codes=32, k=1)
    cm.add_codebook("blocks.1.hook_mlp_out", n_codes=32, k=1, input_norm="layernorm")
    cm.init_codebooks(next(_stream(1)))
    res = train_codebooks(
        cm,
        _stream(),
        TrainConfig(steps=60, lr=3e-3, log_every=20, progress=False),
        eval_fn=lambda m: {"one": 1.0},
    )
    h = res.history
    assert [r["step"] for r in h] == [20, 40, 60]
    assert h[-1]["task_loss"] < 0.5 * h[0]["task_loss"]
    assert all(r["recon"] > 0 for r in h)
    assert res.evals == [{"step": 60, "one": 1.0}]
    assert not cm.training


def test_freeze_model_trains_only_codebooks():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = CodebookModel(model)
    cb = cm.add_codebook("blocks.0.hook_mlp_out", n_codes=16, k=1)
    w0 = cb.codebook.detach().clone()
    train_codebooks(cm, _stream(), TrainConfig(steps=10, freeze_model=True, progress=False))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(cb.codebook.detach(), w0)
    assert all(p.requires_grad for p in model.parameters())


def test_dead_codes_are_reseeded_from_recent_activations():
    cm = CodebookModel(make_model())
    cb = cm.add_codebook(
        "blocks.0.hook_resid_post",
        n_codes=64,
        k=1,
        similarity="euclidean",
        dead_code_threshold=1,
        replace_every=5,
    )
    with torch.no_grad():  # code 0 at the origin, the rest far away: only code 0 is used
        cb.codebook.copy_(torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0)) * 100)
        cb.codebook[0, 0] = 0
    cm.train()
    cm(next(_stream()))
    dead = cb.window_counts == 0
    assert int(dead.sum()) == 63
    w0 = cb.codebook.detach().clone()
    n = cb.reseed_dead_codes().sum()
    assert int(n) == int(dead.sum())
    changed = (cb.codebook.detach() != w0).any(-1)
    assert torch.equal(changed, dead)
    recent = cb.recent.reshape(-1, 32)
    new = cb.codebook.detach()[dead]
    # every re-seeded code is one of the recent activations
    assert (new[:, None, :] == recent[None]).all(-1).any(1).all()


def test_divergence_is_reported():
    cm = CodebookModel(make_model())
    cm.add_codebook("blocks.0.hook_mlp_out", n_codes=8, k=1)

    def nan_loss(m, t):
        return m(t, return_type="loss") * float("nan")

    with pytest.raises(FloatingPointError, match="diverged at step"):
        train_codebooks(
            cm, _stream(), TrainConfig(steps=3, log_every=1, progress=False), loss_fn=nan_loss
        )


def test_merged_codes_are_parked_at_zero_and_stay_there():
    cm = CodebookModel(make_model())
    cb = cm.add_codebook(
        "blocks.0.hook_resid_post", n_codes=64, k=1, merge_threshold=0.8, replace_every=5
    )
    cm.init_codebooks(next(_stream(3)))  # sampled activations: many near-duplicates
    zero_at_6: list[torch.Tensor] = []

    def snapshot(m):
        if not zero_at_6:
            zero_at_6.append((cb.codebook.detach() == 0).all(-1).clone())
        return {}

    train_codebooks(
        cm, _stream(), TrainConfig(steps=12, eval_every=6, progress=False), eval_fn=snapshot
    )
    parked = zero_at_6[0]
    assert int(parked.sum()) > 0
    # their optimizer moments were reset: parked codes do not drift off zero
    assert (cb.codebook.detach()[parked] == 0).all()


def test_unknown_schedule_names_the_choices():
    with pytest.raises(
        ValueError, match=r"schedule='linear'; choose one of \('cosine', 'constant'\)"
    ):
        TrainConfig(schedule="linear")
    cfg = TrainConfig()
    with pytest.raises(ValueError, match="schedule='cosin'; choose one of .*Did you mean 'cosine'"):
        cfg.schedule = "cosin"
    assert cfg.schedule == "cosine"
