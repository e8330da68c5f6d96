"""Code-editing hook factories on raw code tensors, against explicit loops."""

from __future__ import annotations

import inspect

import pytest
import torch

from codebook_lens.analysis import ablate_codes, force_codes, patch_codes, set_codes


def codes(seed=0, shape=(2, 5, 3, 2), n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, shape, generator=g)


def test_ablate_by_id_position_head_slot():
    x = codes()
    out = ablate_codes(codes=[1, 4], positions=[0, -1], heads=[2], slots=[1])(x.clone(), None)
    want = x.clone()
    for b in range(2):
        for p in (0, 4):
            if want[b, p, 2, 1] in (1, 4):
                want[b, p, 2, 1] = -1
    assert torch.equal(out, want)
    # everything at one position (flat layout)
    y = codes(shape=(2, 5, 3))
    out = ablate_codes(positions=slice(1, 3))(y, None)
    assert (out[:, 1:3] == -1).all() and torch.equal(out[:, [0, 3, 4]], y[:, [0, 3, 4]])
    # boolean [batch, pos] mask
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[1, 2] = True
    out = ablate_codes(positions=m)(x, None)
    assert (out[1, 2] == -1).all() and (out != -1).sum() == x.numel() - 6


def test_force_codes_modes():
    x = codes()
    app = force_codes(5, positions=-1, heads=[0, 2])(x, None)
    assert app.shape == (2, 5, 3, 3) and torch.equal(app[..., :2], x)
    want = torch.full((2, 5, 3), -1)
    want[:, -1, [0, 2]] = 5
    assert torch.equal(app[..., 2], want)
    only = force_codes(5, positions=[1], slot="only")(x, None)
    assert (only[:, 1, :, 0] == 5).all() and (only[:, 1, :, 1] == -1).all()
    assert torch.equal(only[:, [0, 2, 3, 4]], x[:, [0, 2, 3, 4]])
    s1 = force_codes(3, slot=1, heads=1)(x, None)
    assert (s1[:, :, 1, 1] == 3).all() and torch.equal(s1[:, :, 1, 0], x[:, :, 1, 0])
    # one code per selected head
    per = force_codes([4, 0], heads=[2, 0], slot=0)(x, None)
    assert (per[..., 2, 0] == 4).all() and (per[..., 0, 0] == 0).all()
    assert torch.equal(per[..., 1, :], x[..., 1, :])
    with pytest.raises(ValueError, match="one per head"):
        force_codes([1, 2], heads=[0])(x, None)
    with pytest.raises(IndexError, match="append"):
        force_codes(1, slot=2)(x, None)


def test_positions_follow_growing_sequences():
    hook = force_codes(2, positions=-1, slot="only")
    for n in (3, 4, 5):
        out = hook(torch.zeros(1, n, 1, dtype=torch.long), None)
        assert out[0, :, 0].tolist() == [0] * (n - 1) + [2]
    with pytest.raises(IndexError, match="out of range"):
        force_codes(2, positions=[7])(torch.zeros(1, 5, 1, dtype=torch.long), None)


def test_patch_codes():
    clean, corrupt = codes(1), codes(2, shape=(2, 5, 3, 1))
    out = patch_codes(clean, positions=[2], heads=[1])(corrupt, None)
    assert out.shape == (2, 5, 3, 2)  # slot counts differ: padded
    want = torch.cat([corrupt, torch.full_like(corrupt, -1)], -1)
    want[:, 2, 1] = clean[:, 2, 1]
    assert torch.equal(out, want)
    # generation: the run is longer than the source; only positions the source has
    longer = codes(3, shape=(2, 7, 3, 2))
    out = patch_codes(clean, positions=[0, 1])(longer, None)
    assert torch.equal(out[:, :2], clean[:, :2]) and torch.equal(out[:, 2:], longer[:, 2:])
    with pytest.raises(IndexError, match="source"):
        patch_codes(clean)(longer, None)
    with pytest.raises(ValueError, match="same site"):
        patch_codes(clean)(codes(shape=(2, 5, 2)), None)


def test_heads_on_flat_site_is_an_error():
    raw = inspect.unwrap(ablate_codes)
    with pytest.raises(ValueError, match="no head axis"):
        raw(heads=[0])(codes(shape=(2, 5, 2)), None)


def test_set_codes_per_row():
    x = codes(4, shape=(4, 5, 3, 2))
    vals = torch.tensor([[[1], [2], [3]], [[4], [5], [0]]])  # [batch 2, head 3, slots 1]
    out = set_codes(vals, positions=-1, heads=[0, 2])(x, None)
    want = x.clone()
    for b in range(4):  # run batch 4 = each values row repeated twice
        for h in (0, 2):
            want[b, -1, h] = torch.tensor([int(vals[b // 2, h, 0]), -1])
    assert torch.equal(out, want)
    wide = set_codes(torch.tensor([[1, 2, 3]]), positions=[0])(codes(shape=(2, 5, 2)), None)
    assert wide.shape == (2, 5, 3) and (wide[:, 0] == torch.tensor([1, 2, 3])).all()
    assert (wide[:, 1:, 2] == -1).all()
    with pytest.raises(ValueError, match="multiple"):
        set_codes(torch.zeros(3, 3, 1, dtype=torch.long))(x, None)
