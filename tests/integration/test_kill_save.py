"""``kill -9`` at random moments of a save: the old or the new checkpoint loads, and the next
save leaves no leftovers. Kinds: CodebookModel.save(include_model=True), CodeStore.save, and a
training run checkpointing every step."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from codebook_lens import CodebookModel
from codebook_lens.analysis import CodeStore
from codebook_lens.checkpoint import checkpoint_path, load_train_state
from codebook_lens.training import TrainConfig, train_codebooks
from tests.conftest import TINY, make_model
from tests.integration.kill_helpers import assert_one_version, kill_mid_save

WORKER = Path(__file__).with_name("kill_save_worker.py")
SITE = "blocks.0.hook_resid_post"


def _cm() -> CodebookModel:
    torch.manual_seed(0)
    cm = CodebookModel(make_model())
    cm.add_codebook(SITE, n_codes=8, k=2)
    return cm


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, TINY["d_vocab"], (2, 8), generator=g) for _ in range(n)]


def _train_cfg(path: Path, steps: int, resume: bool = True) -> TrainConfig:
    return TrainConfig(
        steps=steps, lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=1,
        checkpoint_dir=str(path), progress=False, resume=resume,
    )  # fmt: skip


def _model_loop(path: Path, ready: Callable[[], None]) -> None:
    cm = _cm()
    for i in range(10**9):
        cm.codebooks[SITE].codebook.data.fill_(float(i))  # each save: one constant value
        cm.save(path, include_model=True)
        if i == 0:
            ready()


def _model_check(path: Path) -> None:
    cm = CodebookModel.load(path)
    w = cm.codebooks[SITE].codebook
    assert bool((w == w.flatten()[0]).all())  # a whole save, not a mix of two
    cm.save(path, include_model=True)


def _store_loop(path: Path, ready: Callable[[], None]) -> None:
    for i in range(10**9):
        codes = torch.full((50 + i % 7, 16, 1), i % 7)
        CodeStore.from_codes({"a": codes}, 7).save(path, shard_mb=0.0005)  # many shards
        if i == 0:
            ready()


def _store_check(path: Path) -> None:
    s = CodeStore.load(path)
    c = s.get("a")
    assert s.n_seq == 50 + int(c.flatten()[0]) % 7 and bool((c == c.flatten()[0]).all())
    s.save(path)


def _train_loop(path: Path, ready: Callable[[], None]) -> None:
    cm = _cm()
    train_codebooks(cm, _batches(4), _train_cfg(path, 1, resume=False))  # over the last one
    ready()
    train_codebooks(cm, _batches(4), _train_cfg(path, 10**6))


def _train_check(path: Path) -> None:
    cm = _cm()
    from codebook_lens.training import _optimizer  # noqa: PLC0415  (test only)

    state = load_train_state(path, cm, _optimizer(cm, _train_cfg(path, 1)), set_rng=False)
    assert state is not None and state.step >= 1 and len(state.history) == state.step
    res = train_codebooks(_cm(), _batches(4), _train_cfg(path, state.step + 1))
    assert res.resumed_from == state.step


@dataclass
class Kind:
    loop: Callable[[Path, Callable[[], None]], None]
    check: Callable[[Path], None]
    ckpt: Callable[[Path], Path]


KINDS = {
    "model": Kind(_model_loop, _model_check, lambda p: p),
    "store": Kind(_store_loop, _store_check, lambda p: p),
    "train": Kind(_train_loop, _train_check, checkpoint_path),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_kill_during_save(kind, tmp_path):
    rng = random.Random(kind)
    path = tmp_path / "ck"
    kills = 2
    for n in range(kills):
        ready = Path(f"{path}.ready")
        kill_mid_save([str(WORKER), kind, str(path)], ready, rng, kind, timeout_s=120)
        KINDS[kind].check(path)  # the old or the new checkpoint loads; the next save works
        assert_one_version(KINDS[kind].ckpt(path), n)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ck.ready"]
