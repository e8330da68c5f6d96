"""Tokenizer saves (``save_tokenizer``) and browse-data saves (``write_browse_data``): a target
that holds other data is refused and left as it was; ``kill -9`` at random moments of a save
loop leaves the old or the new save loadable and no leftovers.

Run as a script (``python test_save_tokenizer_browse.py KIND PATH``), this module is the worker
that saves in a loop until killed (touching ``PATH.ready`` after its first save).
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from codebook_lens import CheckpointError  # noqa: E402
from codebook_lens.analysis import CodeStore  # noqa: E402
from codebook_lens.atomic import data_path  # noqa: E402
from codebook_lens.browse import load_browse_data, write_browse_data  # noqa: E402
from codebook_lens.browse.layout import BROWSE_KIND  # noqa: E402
from codebook_lens.lm.tokenizer import (  # noqa: E402
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
)
from tests.integration.kill_helpers import assert_one_version, kill_mid_save  # noqa: E402

TEXTS = [
    f"story {i}: the dragon flew over the castle and the sea, {i * 7} times" for i in range(50)
]


def _tokenizer(i: int):
    """A small BPE tokenizer that carries ``i`` in both of its files: the truncation length in
    tokenizer.json and ``model_max_length`` in tokenizer_config.json."""
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    tok.model_max_length = 1000 + i
    tok.backend_tokenizer.enable_truncation(max_length=1000 + i)
    return tok


def _tok_version(path: Path) -> int:
    """``i`` of the tokenizer saved at ``path``; asserts both files come from one save."""
    tok = load_tokenizer(path)
    assert tok.backend_tokenizer.truncation["max_length"] == tok.model_max_length
    assert tok.decode(tok(TEXTS[3], add_special_tokens=False)["input_ids"]) == TEXTS[3]
    return tok.model_max_length - 1000


def _store(i: int) -> CodeStore:
    """A store whose every code, token and label says ``i % 7``, with ``50 + i % 7`` rows."""
    codes = torch.full((50 + i % 7, 16, 1), i % 7)
    return CodeStore.from_codes({"a": codes}, 7, tokens=torch.full((50 + i % 7, 16), i % 7))


def _write_browse(out: Path, i: int) -> None:
    store = _store(i)
    labels = torch.full((store.n_seq, store.seq_len), i % 7)
    write_browse_data(out, store, labels=labels, vocab=[str(v) for v in range(7)], model=None)


def _browse_version(out: Path) -> int:
    """``i % 7`` of the browse data saved under ``out``; asserts it is one whole save."""
    data = load_browse_data(out)
    c = data.store.get("a")
    v = int(c.flatten()[0])
    assert data.store.n_seq == 50 + v and bool((c == v).all())
    assert bool((data.store.tokens == v).all()) and bool((data.labels == v).all())
    return v


# ---------------------------------------------------------------------------- refused targets
@pytest.fixture(scope="module")
def tok():
    return _tokenizer(1)


def test_tokenizer_save_refuses_a_foreign_target_and_leaves_it(tok, tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds notes\.txt, and it is not a saved tokenizer"):
        save_tokenizer(tok, d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    assert (d / "notes.txt").read_text() == "mine"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        save_tokenizer(tok, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(CheckpointError, match="symlink"):
        save_tokenizer(tok, tmp_path / "link")
    # overwrite=True adds the tokenizer there and keeps the foreign file
    save_tokenizer(tok, d, overwrite=True)
    assert (d / "notes.txt").read_text() == "mine" and _tok_version(d) == 1
    # a saved tokenizer is replaced by the next save without overwrite=True
    save_tokenizer(_tokenizer(2), d)
    assert _tok_version(d) == 2


def test_browse_save_refuses_a_foreign_target_and_leaves_it(tmp_path):
    out = tmp_path / "run"
    (out / "browse").mkdir(parents=True)
    (out / "browse" / "data.csv").write_text("a,b")
    with pytest.raises(CheckpointError, match=r"data\.csv"):
        _write_browse(out, 3)
    assert [p.name for p in (out / "browse").iterdir()] == ["data.csv"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "browse").write_text("a file")
    with pytest.raises(CheckpointError, match="is a file"):
        _write_browse(other, 3)
    assert (other / "browse").read_text() == "a file"
    fresh = tmp_path / "fresh"
    _write_browse(fresh, 3)
    _write_browse(fresh, 4)  # its own earlier save is replaced
    assert _browse_version(fresh) == 4
    versions = [e for e in os.listdir(fresh / "browse") if e.startswith("v-")]
    assert len(versions) == 1 and data_path(fresh / "browse", BROWSE_KIND).exists()


# ---------------------------------------------------------------------------- kill -9
def _tok_loop(path: Path, ready: Callable[[], None]) -> None:
    toks = [_tokenizer(i) for i in range(3)]  # trained once; each save carries its i
    for i in range(10**9):
        save_tokenizer(toks[i % 3], path)
        if i == 0:
            ready()


def _browse_loop(path: Path, ready: Callable[[], None]) -> None:
    for i in range(10**9):
        _write_browse(path, i)
        if i == 0:
            ready()


LOOPS = {"tokenizer": _tok_loop, "browse": _browse_loop}
CHECKS = {
    "tokenizer": lambda p: (_tok_version(p), save_tokenizer(_tokenizer(0), p)),
    "browse": lambda p: (_browse_version(p), _write_browse(p, 0)),
}
SAVED = {"tokenizer": lambda p: p, "browse": lambda p: p / "browse"}


@pytest.mark.parametrize("kind", list(LOOPS))
def test_kill_during_save(kind, tmp_path):
    rng = random.Random(kind)
    path = tmp_path / "target"
    for n in range(2):
        ready = Path(f"{path}.ready")
        kill_mid_save([__file__, kind, str(path)], ready, rng, kind, timeout_s=300)
        CHECKS[kind](path)  # the old or the new save loads whole; the next save works
        assert_one_version(SAVED[kind](path), n)


if __name__ == "__main__":
    torch.set_num_threads(1)
    target = Path(sys.argv[2])
    LOOPS[sys.argv[1]](target, lambda: Path(f"{target}.ready").touch())
