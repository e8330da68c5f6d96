"""CodeStore: compact dtypes, counts and positions against brute force, safetensors round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.analysis import CodeStore, dedupe_slots, smallest_int_dtype
from codebook_lens.analysis.store import STORE_KIND, count_codes
from codebook_lens.atomic import data_path
from codebook_lens.io import CheckpointError


def random_codes(seed: int, shape: tuple[int, ...], n_codes: int, empty: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, n_codes, shape, generator=g)
    c[torch.rand(shape, generator=g) < empty] = -1
    return c


def make_store(seed: int = 0) -> CodeStore:
    g = torch.Generator().manual_seed(seed)
    codes = {
        "blocks.0.attn.hook_z": random_codes(seed, (7, 9, 3, 2), 20),
        "blocks.0.hook_mlp_out": random_codes(seed + 1, (7, 9, 1), 300),
    }
    tokens = torch.randint(0, 50, (7, 9), generator=g)
    return CodeStore.from_codes(
        codes, {"blocks.0.attn.hook_z": 20, "blocks.0.hook_mlp_out": 300}, tokens, d_vocab=50
    )


def test_smallest_int_dtype():
    assert smallest_int_dtype(127) == torch.int8
    assert smallest_int_dtype(128) == torch.int16
    assert smallest_int_dtype(32767) == torch.int16
    assert smallest_int_dtype(32768) == torch.int32
    assert smallest_int_dtype(2**31) == torch.int64


def test_layout_dtypes_and_get():
    s = make_store()
    assert s.codes["blocks.0.attn.hook_z"].dtype == torch.int8
    assert s.codes["blocks.0.hook_mlp_out"].dtype == torch.int16
    assert s.tokens is not None and s.tokens.dtype == torch.int8
    assert s.n_heads("blocks.0.attn.hook_z") == 3 and s.n_heads("blocks.0.hook_mlp_out") == 1
    assert s.get("blocks.0.hook_mlp_out").shape == (7, 9, 1)
    assert s.get("blocks.0.attn.hook_z").shape == (7, 9, 3, 2)
    assert torch.equal(s.get("blocks.0.attn.hook_z"), random_codes(0, (7, 9, 3, 2), 20))
    assert s.nbytes == 7 * 9 * 3 * 2 * 1 + 7 * 9 * 1 * 2 + 7 * 9 * 1
    with pytest.raises(KeyError, match="Did you mean"):
        s.get("blocks.0.attn.hook_q")


def test_code_counts_and_positions_vs_brute_force():
    s = make_store(3)
    site = "blocks.0.attn.hook_z"
    c = s.get(site).numpy()
    counts = s.code_counts(site)
    brute = np.zeros((3, 20), dtype=np.int64)
    for i, j, h in np.ndindex(*c.shape[:3]):
        for code in set(c[i, j, h].tolist()) - {-1}:
            brute[h, code] += 1
    assert np.array_equal(counts.numpy(), brute)
    for code in (0, 5, 19):
        for head in (None, 1):
            pos = s.positions(site, code, head).tolist()
            heads = range(3) if head is None else [head]
            want = [
                [i, j]
                for i in range(7)
                for j in range(9)
                if any(code in c[i, j, h].tolist() for h in heads)
            ]
            assert pos == want
    with pytest.raises(IndexError, match="out of range"):
        s.positions(site, 20)


def test_dedupe_slots_keeps_first_slot():
    c = torch.tensor([[3, 3, 1], [2, -1, 2], [-1, -1, 4]])
    assert dedupe_slots(c).tolist() == [[3, -1, 1], [2, -1, -1], [-1, -1, 4]]


def test_save_load_round_trip(tmp_path):
    s = make_store(5)
    s.meta["note"] = "x"
    s.save(tmp_path / "store", shard_mb=0.0005)  # ~500 bytes: several shards
    header = json.loads((tmp_path / "store" / "store.json").read_text())
    assert header["n_shards"] > 1
    t = CodeStore.load(tmp_path / "store")
    assert t.sites == s.sites and t.meta == {"note": "x"} and t.d_vocab == 50
    for site in s.sites:
        assert torch.equal(t.codes[site], s.codes[site])
        assert t.codes[site].dtype == s.codes[site].dtype
    assert torch.equal(t.tokens, s.tokens)
    # overwrite in place is atomic and leaves no temp dirs behind
    s.save(tmp_path / "store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="store.json"):
        CodeStore.load(tmp_path)
    s = make_store()
    s.save(tmp_path / "st")
    (data_path(tmp_path / "st", STORE_KIND) / "shard-00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="shard-00000.safetensors is truncated"):
        CodeStore.load(tmp_path / "st")


def test_from_codes_validates():
    with pytest.raises(ValueError, match="n_codes"):
        CodeStore.from_codes({"a": torch.full((2, 3, 1), 9)}, 5)
    with pytest.raises(ValueError, match="same"):
        CodeStore.from_codes(
            {
                "a": torch.zeros(2, 3, 1, dtype=torch.long),
                "b": torch.zeros(2, 4, 1, dtype=torch.long),
            },
            5,
        )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(0, 30),
    heads=st.integers(1, 3),
    k=st.integers(1, 20),
    n_codes=st.integers(1, 6),
)
def test_dedupe_and_count_codes_vs_brute_force(seed, n, heads, k, n_codes):
    """Few codes and many slots: repeats are common; k > 16 takes the sort path."""
    c = random_codes(seed, (n, 2, heads, k), n_codes, empty=0.3)
    brute_d = c.clone()
    brute = np.zeros((heads, n_codes), dtype=np.int64)
    for i, j, h in np.ndindex(n, 2, heads):
        seen = set()
        for s in range(k):
            v = int(c[i, j, h, s])
            if v in seen:
                brute_d[i, j, h, s] = -1
            elif v >= 0:
                brute[h, v] += 1
            seen.add(v)
    assert torch.equal(dedupe_slots(c), brute_d)
    assert np.array_equal(count_codes(c.to(torch.int8), n_codes).numpy(), brute)
