"""Bad input on a CodebookModel, both backends: codes hooks that return the wrong thing, NaN/inf
activations, a second CodebookModel on one model, wrong argument types. Every case raises an
error naming the problem (or, for NaN on the training path, gives empty codes), never a silent
broadcast."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codebook_lens import CodebookModel
from codebook_lens.analysis import collect_codes
from tests.conftest import make_model

SITE = "blocks.0.hook_resid_post"
CODES = f"{SITE}.hook_codes"
Z = "blocks.0.attn.hook_z"


pytestmark = pytest.mark.usefixtures("user_view")  # the errors users see


@pytest.fixture
def cm(backend):
    cm = CodebookModel(make_model(backend))
    cm.add_codebook(SITE, n_codes=16, k=2)
    cm.add_codebook(Z, n_codes=8)
    return cm.eval()


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("batch slice", lambda c: c[:1]),
        ("pos slice", lambda c: c[:, :1]),
        ("flattened", lambda c: c.flatten()),
        ("slots dropped as an axis", lambda c: c[..., 0]),
        ("extra axis", lambda c: c[None]),
    ],
)
def test_codes_hook_with_wrong_shape_raises(cm, tokens, name, edit):
    with pytest.raises(ValueError, match=rf"codebook at {SITE}: codes returned by the hook"):
        cm.run_with_hooks(tokens, fwd_hooks=[(CODES, lambda c, hook: edit(c))])


def test_codes_hook_dtype_and_range(cm, tokens):
    with pytest.raises(TypeError, match=rf"codebook at {SITE}: codes must be an integer tensor"):
        cm.run_with_hooks(tokens, fwd_hooks=[(CODES, lambda c, hook: c.float())])
    with pytest.raises(ValueError, match=r"code ids must lie in \[-1, 16\)"):
        cm.run_with_hooks(tokens, fwd_hooks=[(CODES, lambda c, hook: c + 16)])
    with pytest.raises(ValueError, match=r"code ids must lie in \[-1, 8\).*min -2"):
        cm.run_with_hooks(tokens, fwd_hooks=[(f"{Z}.hook_codes", lambda c, hook: c - 2)])


def test_valid_codes_hooks_still_work(cm, tokens):
    clean = cm(tokens)
    same = cm.run_with_hooks(tokens, fwd_hooks=[(CODES, lambda c, hook: None)])
    assert torch.equal(same, clean)
    in_place = cm.run_with_hooks(tokens, fwd_hooks=[(CODES, lambda c, hook: c.int())])
    assert torch.equal(in_place, clean)
    extra = cm.run_with_hooks(
        tokens, fwd_hooks=[(CODES, lambda c, hook: torch.cat([c, torch.full_like(c, -1)], -1))]
    )
    assert torch.equal(extra, clean)  # appended empty slots change nothing
    emptied = cm.run_with_hooks(tokens, fwd_hooks=[(CODES, lambda c, hook: torch.full_like(c, -1))])
    assert not torch.allclose(emptied, clean)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(["keep", "slice_b", "slice_p", "flatten", "unsqueeze", "more_slots"]),
    st.sampled_from([torch.int64, torch.int32, torch.int16, torch.float32, torch.bool]),
    st.integers(-3, 17),
)
def test_fuzz_codes_hook_returns(cm, tokens, shape_op, dtype, fill):
    """Whatever a codes hook returns, the run either succeeds with exactly what a correct patch
    gives, or raises TypeError/ValueError."""
    ops = {
        "keep": lambda c: c,
        "slice_b": lambda c: c[:1],
        "slice_p": lambda c: c[:, :1],
        "flatten": lambda c: c.flatten(),
        "unsqueeze": lambda c: c[None],
        "more_slots": lambda c: torch.cat([c, c], -1),
    }

    def hook(c, hook):
        return ops[shape_op](torch.full_like(c, fill)).to(dtype)

    try:
        out = cm.run_with_hooks(tokens, fwd_hooks=[(CODES, hook)])
    except (TypeError, ValueError):
        return
    assert shape_op in ("keep", "more_slots") and dtype not in (torch.float32, torch.bool)
    assert -1 <= fill < 16
    slots = 4 if shape_op == "more_slots" else 2
    want = cm.run_with_hooks(
        tokens, fwd_hooks=[(CODES, lambda c, hook: torch.full((*c.shape[:-1], slots), fill))]
    )
    assert torch.equal(out, want)


def _nan_at(site: str, pos: int = 3):
    def hook(act, hook):
        act = act.clone()
        act[:, pos] = math.nan
        return act

    return (site, hook)


def test_nan_activations_raise_in_analysis_paths(cm, tokens):
    poison = _nan_at("blocks.0.hook_resid_mid")  # before SITE
    with pytest.raises(ValueError, match=rf"codebook at {SITE}: .* contain NaN or inf"):
        cm.run_with_hooks(tokens, fwd_hooks=[poison])
    with pytest.raises(ValueError, match="NaN or inf"):
        with cm.hooks(fwd_hooks=[poison]):
            collect_codes(cm, tokens, progress=False)
    with cm.hooks(fwd_hooks=[poison]), pytest.raises(ValueError, match="NaN or inf"):
        cm.run_with_cache(tokens)


def test_nan_activations_on_the_training_path_give_empty_codes(cm, tokens):
    got = {}
    poison = _nan_at("blocks.0.hook_resid_mid")
    grab = (CODES, lambda c, hook: got.__setitem__("codes", c.clone()))
    with cm.hooks(fwd_hooks=[poison, grab]):
        cm(tokens)  # forward: no host sync, no error
    codes = got["codes"]
    assert (codes[:, 3] == -1).all()
    assert (codes[:, :3] >= 0).all() and (codes[:, 4:] >= 0).all()
    cm.check_finite = False  # analysis paths can opt out too
    cm.run_with_hooks(tokens, fwd_hooks=[poison, grab])
    assert torch.equal(got["codes"], codes)
    cm.check_finite = True  # and the forward path can opt in
    with cm.hooks(fwd_hooks=[poison]), pytest.raises(ValueError, match="NaN or inf"):
        cm(tokens)


def test_second_codebook_model_is_refused(backend, tokens):
    model = make_model(backend)
    first = CodebookModel(model)
    first.add_codebook(SITE, n_codes=16)
    with pytest.raises(ValueError, match="already has codebooks attached by another"):
        CodebookModel(model)
    with pytest.raises(TypeError, match="got a CodebookModel"):
        CodebookModel(first)
    empty = CodebookModel(make_model(backend))
    other = CodebookModel(empty.model)  # neither has codebooks yet
    empty.add_codebook(SITE, n_codes=16)
    with pytest.raises(ValueError, match=f"{SITE} already has a codebook attached by another"):
        other.add_codebook(SITE, n_codes=16)
    first.detach()
    again = CodebookModel(model)  # after detach the model is free
    again.add_codebook(SITE, n_codes=16)
    _, cache = again.run_with_cache(tokens)
    assert cache[CODES].shape == (*tokens.shape, 1)


def test_argument_types(backend, tokens):
    cm = CodebookModel(make_model(backend))
    with pytest.raises(TypeError, match=r"site must be a hook name \(str\).*got 5"):
        cm.add_codebook(5)
    with pytest.raises(TypeError, match="cfg_or_codebook must be a CodebookConfig.*got 5"):
        cm.add_codebook(SITE, 5)
    with pytest.raises(TypeError, match="CodebookConfig: n_codes must be int"):
        cm.add_codebook(SITE, n_codes="16")
    cm.add_codebook(SITE, n_codes=16)
    for bad in (tokens.float(), tokens.bool()):
        with pytest.raises(TypeError, match="input must be token ids.*tokens.long"):
            cm(bad)
        with pytest.raises(TypeError, match="input must be token ids"):
            cm.run_with_cache(bad)
        with pytest.raises(TypeError, match="input must be token ids"):
            cm.init_codebooks(bad)
    with pytest.raises(TypeError, match="input must be token ids.*got 5"):
        cm(5)
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor \[batch, pos\]"):
        cm.init_codebooks(tokens[0])
    assert cm(tokens.int()).shape == (*tokens.shape, 11)  # int32 tokens are fine
