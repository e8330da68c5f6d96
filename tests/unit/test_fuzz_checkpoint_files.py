"""Fuzzing cfg.json, store.json and state.json: every mutation gives CheckpointError or loads
correctly, never another exception."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codebook_lens import CheckpointError, CodebookModel
from codebook_lens.analysis import CodeStore
from codebook_lens.checkpoint import checkpoint_path, load_train_state
from codebook_lens.training import TrainConfig, _optimizer, train_codebooks
from tests.conftest import TINY, make_model

SITE = "blocks.0.hook_resid_post"
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
    st.text(max_size=5), st.just("2"), st.lists(st.integers(-1, 9), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _paths(obj, prefix=()):
    """Every (path to a value) in a JSON object, up to depth 3."""
    if len(prefix) >= 3:
        return
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


def _mutate(meta, path, value, delete):
    meta = json.loads(json.dumps(meta))
    node = meta
    for k in path[:-1]:
        node = node[k]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return meta


def _fuzz(data, head: Path, load):
    meta = json.loads(head.read_text())
    paths = [p for p in _paths(meta) if p != ("data_dir",)]
    path = data.draw(st.sampled_from(paths))
    mutated = _mutate(meta, path, data.draw(JUNK), data.draw(st.booleans()))
    head.write_text(json.dumps(mutated))
    try:
        load()
    except CheckpointError:
        pass
    finally:
        head.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    cm = CodebookModel(make_model())
    cm.add_codebook(SITE, n_codes=8, k=2)
    cm.add_codebook("blocks.1.attn.hook_z", n_codes=6, k=1, input_norm="affine")
    cm.save(root / "model", include_model=True)
    codes = torch.randint(-1, 7, (3, 5, 4, 2), generator=torch.Generator().manual_seed(0))
    CodeStore.from_codes({"a": codes}, 7, tokens=torch.zeros(3, 5, dtype=torch.long)).save(
        root / "store", shard_mb=0.0001
    )
    return root


@SETTINGS
@given(data=st.data())
def test_fuzz_cfg_json(saved, data):
    _fuzz(data, saved / "model" / "cfg.json", lambda: CodebookModel.load(saved / "model"))


@SETTINGS
@given(data=st.data())
def test_fuzz_store_json(saved, data):
    def load():
        s = CodeStore.load(saved / "store")
        assert s.get("a").shape == (3, 5, 4, 2)  # loads correctly, never silently reshaped

    _fuzz(data, saved / "store" / "store.json", load)


def _cfg(path, steps=2):
    return TrainConfig(steps=steps, warmup_steps=1, log_every=1, checkpoint_dir=str(path),
                       progress=False)  # fmt: skip


def _cm():
    torch.manual_seed(0)
    cm = CodebookModel(make_model())
    cm.add_codebook(SITE, n_codes=8, k=2)
    return cm


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, TINY["d_vocab"], (2, 8), generator=g) for _ in range(2)]
    train_codebooks(_cm(), batches, _cfg(root))
    return root


@SETTINGS
@given(data=st.data())
def test_fuzz_state_json(trained, data):
    def load():
        cm = _cm()
        load_train_state(trained, cm, _optimizer(cm, _cfg(trained)), set_rng=False, steps=2)

    _fuzz(data, checkpoint_path(trained) / "state.json", load)


def test_per_head_false_with_head_axis_is_refused(saved, tmp_path):
    shutil.copytree(saved / "store", tmp_path / "s")
    head = tmp_path / "s" / "store.json"
    meta = json.loads(head.read_text())
    meta["per_head"]["a"] = False
    head.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="per_head=false"):
        CodeStore.load(tmp_path / "s")


@pytest.mark.parametrize(
    "field,value,match",
    [("sites", None, "'sites' must be a list"), ("sites", {}, "'sites' must be a list"),
     ("format_version", "2", "format_version must be an integer"),
     ("format_version", True, "format_version must be an integer"),
     ("format_version", 3, "Upgrade codebook_lens")],
)  # fmt: skip
def test_malformed_cfg_json_names_the_field(saved, tmp_path, field, value, match):
    shutil.copytree(saved / "model", tmp_path / "m")
    head = tmp_path / "m" / "cfg.json"
    meta = json.loads(head.read_text())
    meta[field] = value
    head.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=match):
        CodebookModel.load(tmp_path / "m")
