"""A training checkpoint whose data position, step, RNG state, loop state, optimizer layout or
tensors are wrong is refused before anything is restored: model, codebooks, optimizer and RNG
are exactly as they were. And a finite data iterator that runs out says so accurately."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from codebook_lens import CheckpointError, CodebookModel
from codebook_lens.atomic import data_path
from codebook_lens.checkpoint import TRAIN_KIND, checkpoint_path, load_train_state
from codebook_lens.integrity import record_tensors
from codebook_lens.training import TrainConfig, train_codebooks
from tests.conftest import TINY, make_model

pytestmark = pytest.mark.bridge  # make_model() is a bridge on transformer-lens 4.x

SITE = "blocks.0.hook_resid_post"


def _cm(seed: int = 0) -> CodebookModel:
    torch.manual_seed(seed)
    cm = CodebookModel(make_model())
    cm.add_codebook(SITE, n_codes=8, k=2, recent_size=4)
    return cm


def _batches(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["d_vocab"], (2, 8), generator=g) for _ in range(n)]


def _cfg(path, steps: int = 4, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, warmup_steps=1, log_every=10, checkpoint_dir=str(path),
                       progress=False, **kw)  # fmt: skip


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint after 2 of 4 steps (2 micro-batches consumed)."""
    train_codebooks(_cm(), _batches(), _cfg(tmp_path, steps=2))
    return tmp_path


def _edit_json(root, edit) -> None:
    head = checkpoint_path(root) / TRAIN_KIND.head
    meta = json.loads(head.read_text())
    edit(meta)
    head.write_text(json.dumps(meta))


def _edit_tensors(root, edit, keep_record: bool = False) -> None:
    """Change the saved tensors; the record in state.json is rewritten to match (a checkpoint
    consistent in itself but wrong, e.g. from another torch) unless ``keep_record``."""
    f = data_path(checkpoint_path(root), TRAIN_KIND) / "state.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f))
    if not keep_record:
        _edit_json(root, lambda meta: meta.update(tensors=record_tensors(t)))


def _optimizer(cm: CodebookModel) -> torch.optim.Optimizer:
    """The layout train_codebooks builds (codebooks, then the model), with some state."""
    opt = torch.optim.AdamW(
        [{"params": list(cm.codebook_parameters())}, {"params": list(cm.model.parameters())}]
    )
    cm(_batches(1, seed=5)[0], return_type="loss").backward()
    opt.step()
    return opt


def _snapshot(cm: CodebookModel, opt: torch.optim.Optimizer) -> dict:
    return {
        "model": {k: v.clone() for k, v in cm.state_dict().items()},
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
        "recent": {
            s: None if cb.recent is None else cb.recent.clone() for s, cb in cm.codebooks.items()
        },  # fmt: skip
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _refused_without_change(root, match: str, **kw) -> None:
    cm = _cm(seed=1)
    opt = _optimizer(cm)
    before = _snapshot(cm, opt)
    with pytest.raises(CheckpointError, match=match):
        load_train_state(root, cm, opt, steps=4, **kw)
    assert _same(_snapshot(cm, opt), before)


def _set(key, value):
    def edit(meta):
        meta[key] = value

    return edit


def _sizes(t, key, n):
    t[key] = t[key][:n].clone()


ATTACKS = {
    "consumed_far": (lambda r: _edit_json(r, _set("consumed", 999)), r"consumed=999"),
    "consumed_off_by_one": (lambda r: _edit_json(r, _set("consumed", 3)), r"consumed=3"),
    "consumed_short": (lambda r: _edit_json(r, _set("consumed", 1)), r"consumed=1"),
    "history_after_step": (
        lambda r: _edit_json(r, lambda m: m["history"].append({"step": 9, "loss": 1.0})),
        r"history.*step 9.*after the checkpoint's step 2",
    ),
    "n_acc_beyond_consumed": (
        lambda r: _edit_json(r, lambda m: m["scalars"].update(n_acc=5)),
        r"scalars.n_acc.*consumed=2, got 5",
    ),
    "rng_short": (lambda r: _edit_tensors(r, lambda t: _sizes(t, "rng.cpu", 100)), r"rng.cpu"),
    "rng_missing": (lambda r: _edit_tensors(r, lambda t: t.pop("rng.cpu")), r"rng.cpu"),
    "rng_invalid": (
        lambda r: _edit_tensors(
            r, lambda t: t.update({"rng.cpu": torch.zeros(5056, dtype=torch.uint8)})
        ),
        r"rng.cpu is not a valid CPU RNG state",
    ),  # fmt: skip
    "loop_sums_shape": (
        lambda r: _edit_tensors(r, lambda t: t.update({"loop.sums": torch.zeros(4)})),
        "loop.sums",
    ),
    "extra_model_tensor": (
        lambda r: _edit_tensors(r, lambda t: t.update({"model.blocks.0.extra": torch.zeros(2)})),
        "model.blocks.0.extra",
    ),
    "record_removed": (
        lambda r: _edit_json(r, lambda m: m.pop("tensors")),
        "tensor record must be an object",
    ),
    "optimizer_groups": (
        lambda r: _edit_json(r, lambda m: m["optimizer"]["param_groups"].pop()),
        r"optimizer.*2 parameter groups.*1",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_bad_resume_state_is_refused_before_anything_is_restored(ckpt, attack):
    edit, match = ATTACKS[attack]
    edit(ckpt)
    _refused_without_change(ckpt, match, loop_shapes={"sums": (3,)})


def test_tensor_from_another_run_is_refused(ckpt, tmp_path):
    other = tmp_path / "other"
    train_codebooks(_cm(), _batches(seed=3), _cfg(other, steps=2))
    f = data_path(checkpoint_path(other), TRAIN_KIND) / "state.safetensors"
    theirs = load_file(str(f))
    key = f"cb.{SITE}.codebook"
    assert not torch.equal(theirs[key], load_file(str(
        data_path(checkpoint_path(ckpt), TRAIN_KIND) / "state.safetensors"))[key])  # fmt: skip
    _edit_tensors(ckpt, lambda t: t.update({key: theirs[key]}), keep_record=True)
    _refused_without_change(ckpt, rf"{key}.*does not match the SHA-256")


def test_train_codebooks_refuses_a_moved_data_position(ckpt):
    _edit_json(ckpt, _set("consumed", 5))
    cm = _cm(seed=1)
    before = {k: v.clone() for k, v in cm.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"consumed=5.*step 2.*1 micro-batch"):
        train_codebooks(cm, _batches(), _cfg(ckpt))
    assert _same({k: v.clone() for k, v in cm.state_dict().items()}, before)


def test_grad_accum_resume_checks_the_position_per_micro_batch(tmp_path):
    train_codebooks(_cm(), _batches(8), _cfg(tmp_path, steps=2, grad_accum=2))
    meta = json.loads((checkpoint_path(tmp_path) / TRAIN_KIND.head).read_text())
    assert (meta["step"], meta["consumed"]) == (2, 4)
    assert train_codebooks(_cm(), _batches(8), _cfg(tmp_path, grad_accum=2)).resumed_from == 2
    _edit_json(tmp_path, _set("consumed", 6))
    with pytest.raises(CheckpointError, match=r"consumed=6.*2 micro-batches"):
        train_codebooks(_cm(), _batches(8), _cfg(tmp_path, steps=6, grad_accum=2))


# ---------------------------------------------------------------------------------- data


def test_a_finite_iterator_that_runs_out_is_named_accurately():
    cfg = TrainConfig(steps=5, warmup_steps=1, log_every=10, progress=False)
    with pytest.raises(ValueError, match=r"ran out after 3 batches.*step 4 of 5.*re-iterable"):
        train_codebooks(_cm(), iter(_batches(3)), cfg)


def test_an_empty_iterable_still_says_it_yielded_no_batches():
    cfg = TrainConfig(steps=2, warmup_steps=1, log_every=10, progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        train_codebooks(_cm(), [], cfg)


def test_a_re_iterable_finite_dataset_is_cycled():
    cfg = TrainConfig(steps=5, warmup_steps=1, log_every=10, progress=False)
    assert len(train_codebooks(_cm(), _batches(2), cfg).history) == 1


def test_an_iterator_too_short_for_the_resume_position_is_named(ckpt):
    with pytest.raises(ValueError, match=r"ran out after 1 batch while resuming.*position is 2"):
        train_codebooks(_cm(), iter(_batches(1)), _cfg(ckpt))
