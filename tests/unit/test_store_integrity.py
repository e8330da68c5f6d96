"""Attacks on a code store on disk: every wrong file is refused with a CheckpointError naming
the file and the fix, never loaded as different codes. Missing, extra, truncated, swapped and
foreign shards, edited manifests (has_tokens, keys, shard records, any field), an incomplete
store opened as complete, flipped bytes, and the counts file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codebook_lens.analysis import CodeStore
from codebook_lens.errors import CheckpointError

FIX = "restore|collect the store again|Move them away|Rename them back"
SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def make(seed: int = 0, tokens: bool = True, n_seq: int = 12) -> CodeStore:
    g = torch.Generator().manual_seed(seed)
    codes = {"a": torch.randint(-1, 9, (n_seq, 5, 3, 2), generator=g)}
    toks = torch.randint(0, 20, (n_seq, 5), generator=g) if tokens else None
    return CodeStore.from_codes(codes, 9, toks, d_vocab=20 if tokens else None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stores")
    make(0).save(root / "store", shard_seqs=4)  # 3 shards of 4 sequences
    make(1).save(root / "other", shard_seqs=4)  # same layout, another store id
    make(0, tokens=False).save(root / "notok", shard_seqs=4)
    return root


@pytest.fixture
def store(saved, tmp_path) -> Path:
    shutil.copytree(saved / "store", tmp_path / "s")
    return tmp_path / "s"


def data(path: Path) -> Path:
    return path / json.loads((path / "store.json").read_text())["data_dir"]


def shard(path: Path, i: int) -> Path:
    return data(path) / f"shard-{i:05d}.safetensors"


def edit(path: Path, **fields) -> None:
    head = path / "store.json"
    m = json.loads(head.read_text())
    m.update(fields)
    head.write_text(json.dumps(m))


def refused(path: Path, match: str, how=CodeStore.open) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as e:
        how(path)
    return e.value


def test_intact_store_opens_verifies_and_loads(store):
    s = CodeStore.open(store, verify=True)
    assert s.n_shards == 3 and torch.equal(s.get("a"), make(0).get("a"))
    s.verify()
    assert torch.equal(CodeStore.load(store).tokens, make(0).tokens)


def test_missing_shard(store):
    shard(store, 1).unlink()
    e = refused(store, r"shard-00001.safetensors is missing")
    assert "restore" in str(e)


def test_extra_shard(store):
    shutil.copy(shard(store, 0), data(store) / "shard-00007.safetensors")
    refused(store, r"shard-00007.safetensors.*does not list.*Move them away")


@SETTINGS
@given(frac=st.floats(0.0, 0.999))
def test_truncated_shard(saved, tmp_path_factory, frac):
    path = tmp_path_factory.mktemp("t") / "s"
    shutil.copytree(saved / "store", path)
    f = shard(path, 2)
    raw = f.read_bytes()
    f.write_bytes(raw[: int(len(raw) * frac)])
    refused(path, r"shard-00002.safetensors (is truncated|has \d+ bytes)")


def test_swapped_shards(store):
    a, b = shard(store, 0), shard(store, 1)
    tmp = a.with_suffix(".x")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    refused(store, r"shard-00000.safetensors holds shard '1' of this store, not shard 0.*swapped")


def test_swapped_shards_of_different_sizes(store):
    a, b = shard(store, 0), shard(store, 2)
    tmp = a.with_suffix(".x")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    refused(store, r"holds shard '2' of this store, not shard 0")


def test_foreign_shard(saved, store):
    shutil.copy(shard(saved / "other", 1), shard(store, 1))
    e = refused(store, r"shard-00001.safetensors belongs to another code store")
    assert "store id" in str(e) and "restore" in str(e).lower()


def test_has_tokens_false_edit_is_refused(store):
    edit(store, has_tokens=False)  # a plain edit contradicts the rest of the manifest
    refused(store, "token_dtype")
    edit(store, token_dtype=None)
    refused(store, "'keys'.*has_tokens=False")
    m = json.loads((store / "store.json").read_text())
    edit(store, keys=[k for k in m["keys"] if k != "tokens"])  # a thorough edit: shards object
    refused(store, r"shard-00000.safetensors holds keys.*has_tokens=False: was it edited")
    refused(store, "has_tokens=False", CodeStore.load)


def test_has_tokens_true_edit_is_refused(saved, tmp_path):
    path = tmp_path / "s"
    shutil.copytree(saved / "notok", path)
    m = json.loads((path / "store.json").read_text())
    edit(path, has_tokens=True, token_dtype="int8", keys=sorted(m["keys"] + ["tokens"]))
    refused(path, r"missing \['tokens'\].*has_tokens=True")


def test_incomplete_store_needs_allow_partial(store):
    m = json.loads((store / "store.json").read_text())
    edit(store, complete=False, counts=None)
    e = refused(store, "incomplete code store")
    for hint in ("collect_codes(cm, data, out=", "allow_partial=True", "same settings"):
        assert hint in str(e)
    refused(store, "incomplete", CodeStore.load)
    part = CodeStore.open(store, allow_partial=True)
    assert part.n_seq == m["n_seq"] and torch.equal(part.get("a"), make(0).get("a"))
    # an interrupted collection may have written shards it did not list yet: ignored
    shutil.copy(shard(store, 0), data(store) / "shard-00003.safetensors")
    assert CodeStore.open(store, allow_partial=True).n_shards == 3


@SETTINGS
@given(where=st.floats(0.0, 0.9999), bit=st.integers(0, 7))
def test_flipped_bit_is_caught_by_verify_and_load(saved, tmp_path_factory, where, bit):
    path = tmp_path_factory.mktemp("f") / "s"
    shutil.copytree(saved / "store", path)
    f = shard(path, 1)
    raw = bytearray(f.read_bytes())
    raw[int(len(raw) * where)] ^= 1 << bit
    f.write_bytes(bytes(raw))
    refused(path, "shard-00001.safetensors", lambda p: CodeStore.open(p, verify=True))
    refused(path, "shard-00001.safetensors", CodeStore.load)


def test_counts_file_is_checked(store):
    counts = data(store) / "counts.safetensors"
    raw = bytearray(counts.read_bytes())
    raw[-1] ^= 1
    counts.write_bytes(bytes(raw))
    CodeStore.open(store)  # same size and header: found by hashing
    refused(store, "counts.safetensors: its content differs", CodeStore.load)
    counts.unlink()
    refused(store, "counts.safetensors is missing")


def test_shard_record_edits(store):
    m = json.loads((store / "store.json").read_text())
    for field, value, match in [
        ("bytes", m["shards"][0]["bytes"] + 1, "has .* bytes, store.json records"),
        ("sha256", "0" * 64, "content differs from the SHA-256"),
        ("n_seq", 3, "shards\\[0\\] is short but not last|n_seq"),
    ]:
        shards = json.loads(json.dumps(m["shards"]))
        shards[0][field] = value
        edit(store, shards=shards)
        refused(store, match, CodeStore.load)
        edit(store, shards=m["shards"])
    edit(store, store_id="f" * 32)
    refused(store, "belongs to another code store")


def _paths(obj, prefix=()):
    if len(prefix) >= 4:
        return
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
    st.text(max_size=5), st.just("int64"), st.just("0" * 64),
    st.lists(st.integers(-1, 9), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


@SETTINGS
@given(data=st.data())
def test_fuzz_manifest(saved, tmp_path_factory, data):
    """Any edited value or deleted key: a CheckpointError, or the same codes and tokens."""
    path = tmp_path_factory.mktemp("z") / "s"
    shutil.copytree(saved / "store", path)
    m = json.loads((path / "store.json").read_text())
    where = data.draw(st.sampled_from([p for p in _paths(m) if p[0] != "data_dir"]))
    node = m
    for k in where[:-1]:
        node = node[k]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[where[-1]]
    else:
        node[where[-1]] = data.draw(JUNK)
    (path / "store.json").write_text(json.dumps(m))
    want = make(0)
    for how in (CodeStore.load, lambda p: CodeStore.open(p, allow_partial=True)):
        try:
            s = how(path)
        except CheckpointError:
            continue
        assert torch.equal(s.get("a"), want.get("a")) and torch.equal(s.tokens, want.tokens)


def test_shard_replaced_after_open_is_refused_not_misread(saved, store):
    s = CodeStore.open(store)
    before = s.get("a")
    f = shard(store, 1)
    tmp = f.with_suffix(".new")
    shutil.copy(shard(saved / "other", 1), tmp)  # same size, other codes
    tmp.replace(f)
    with pytest.raises(CheckpointError, match="shard-00001.safetensors changed or vanished"):
        s.get("a")
    f.unlink()
    with pytest.raises(CheckpointError, match="open the store again"):
        list(s.chunks("a"))
    assert torch.equal(before, make(0).get("a"))
