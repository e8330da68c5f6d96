"""tensor_files: one safetensors reader/writer for every checkpoint kind."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.errors import CheckpointError
from codebook_lens.tensor_files import check_tensor, read_tensors, untie, write_tensors


def test_untie_clones_only_tensors_that_share_storage():
    w = torch.randn(4, 3)
    t = {"embed": w, "unembed": w, "view": w[1:], "own": torch.randn(2), "e1": torch.empty(0)}
    t["e2"] = torch.empty(0)
    out = untie(t)
    ptr = {k: v.untyped_storage().data_ptr() for k, v in out.items() if v.numel()}
    assert ptr["embed"] == w.untyped_storage().data_ptr()  # the first keeps its storage
    assert len({ptr["embed"], ptr["unembed"], ptr["view"], ptr["own"]}) == 4
    assert out["e1"].numel() == out["e2"].numel() == 0  # empty tensors share nothing: not cloned
    for k in t:
        assert torch.equal(out[k], t[k].contiguous())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_write_then_read_round_trips_tied_tensors(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(7, generator=g)
    tensors = {f"t{i}": base[:n] if i % 2 else torch.randn(n, generator=g) for i, n in
               enumerate(sizes)}  # fmt: skip
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        write_tensors(tensors, Path(d) / "x.safetensors", "test")
        back = read_tensors(Path(d) / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_read_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r"x\.safetensors is missing.*; start over"):
        read_tensors(tmp_path / "x.safetensors", "start over")
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        read_tensors(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    ("t", "kind", "shape", "match"),
    [
        (torch.zeros(2, dtype=torch.long), "float", (2,), "expected a float tensor"),
        (torch.zeros(2), "float", (3,), r"has shape \(2,\), but its config says \(3,\)"),
        (torch.tensor([0.0, float("nan")]), "float", (2,), "NaN or inf"),
        (torch.tensor([1, -1]), "count", (2,), "negative counts"),
        (torch.zeros(2, dtype=torch.bool), "int", (2,), "expected a int tensor"),
    ],
)
def test_check_tensor_refuses(t, kind, shape, match, tmp_path):
    with pytest.raises(CheckpointError, match=match):
        check_tensor(t, "x", tmp_path, shape, kind)


def test_check_tensor_accepts(tmp_path):
    t = torch.tensor([1.0, 2.0])
    assert check_tensor(t, "x", tmp_path, (2,), "count") is t
    assert check_tensor(t.long(), "x", tmp_path, None, "int").dtype == torch.long
