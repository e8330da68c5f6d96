"""Config fields take sane values only: sizes that can be allocated, chunk sizes that cannot hang
or overflow, fractions in [0, 1], JSON in free-form fields; and any random config either builds
and round-trips through JSON (and, small enough, through a saved CodebookModel) or is refused
with ValueError/TypeError, never another exception."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codebook_lens.config import MAX_CODEBOOK_ELEMENTS, CodebookConfig
from codebook_lens.fsm.base_model import BaseTrainConfig
from codebook_lens.fsm.experiment import CodebookPlan, ExperimentConfig
from codebook_lens.lm.demo import LMDemoConfig
from codebook_lens.training import TrainConfig
from codebook_lens.validation import ValidatedConfig

pytestmark = pytest.mark.usefixtures("user_view")  # the errors users see


def _cb(**kw):
    return CodebookConfig(**{"d_in": 4, "n_codes": 8, **kw})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"n_codes": 10**12}, r"n_codes must lie in \[1, 2147483647\], got 1000000000000"),
        (
            {"n_codes": 10**9, "d_in": 1000},
            r"n_groups \* n_codes \* d_in = 1 \* 1000000000 \* 1000",
        ),
        ({"d_in": 10**12}, r"d_in must lie in \[1, 1048576\], got 1000000000000"),
        ({"n_groups": 4096, "n_codes": 2**20, "d_in": 64}, r"= 274877906944 .*2\*\*32"),
        ({"recent_size": 2**21, "d_in": 4096}, r"recent_size \* n_groups \* d_in = 2097152 \*"),
        ({"k": 2**17, "n_codes": 2**18}, r"k must lie in \[1, 65536\]"),
        (
            {"chunk_mb": 1e-12},
            r"chunk_mb must be >= 0.015625, got 1e-12 \(the range is \[0.015625, 65536\]\)",
        ),
        ({"chunk_mb": 1e308}, r"chunk_mb must lie in \[0.015625, 65536\]"),
        ({"chunk_mb": 0.02, "n_groups": 64}, r"chunk_mb=0.02 .*n_groups=64 .*at least 0.0625"),
        ({"norm_eps": 2.0}, r"norm_eps must lie in \(0, 1\]"),
        ({"recon_coef": 1e300}, r"recon_coef must lie in \[0, 1000000"),
        ({"kmeans_iters": 10**9}, r"kmeans_iters must lie in \[1, 1000000\]"),
        ({"seed": 2**70}, "seed must lie in"),
    ],
)
def test_codebook_config_sizes_and_ranges(fields, match):
    with pytest.raises(ValueError, match=match):
        _cb(**fields)


def test_codebook_size_limit_is_documented_and_reachable():
    assert MAX_CODEBOOK_ELEMENTS == 2**32
    assert "2**32" in CodebookConfig.__doc__
    ok = _cb(d_in=2**12, n_codes=2**20)  # exactly at the limit: a config only, nothing allocated
    assert ok.n_codes * ok.d_in == MAX_CODEBOOK_ELEMENTS
    with pytest.raises(ValueError, match="n_groups"):
        ok.n_groups = 2  # an assignment is checked the same way and leaves the old value
    assert ok.n_groups == 1


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"min_lr_frac": 5.0}, r"min_lr_frac must lie in \[0, 1\], got 5.0"),
        ({"lr": 1e300}, r"lr must lie in \(0, 10\]"),
        ({"codebook_lr": 50.0}, r"codebook_lr must lie in \(0, 10\]"),
        ({"weight_decay": 1e9}, r"weight_decay must lie in \[0, 10\]"),
        ({"steps": 10**15}, r"steps must lie in \[1, 1000000000\]"),
        ({"grad_accum": 10**6}, r"grad_accum must lie in \[1, 65536\]"),
        ({"warmup_steps": 10**12}, r"warmup_steps must lie in \[0, 1000000000\]"),
        ({"grad_clip": 1e300}, r"grad_clip must lie in \[0, 1000000"),
        ({"checkpoint_dir": ""}, "checkpoint_dir must not be empty"),
        ({"metrics_path": "a\0b"}, "metrics_path holds a NUL character"),
    ],
)
def test_train_config_ranges(fields, match):
    with pytest.raises(ValueError, match=match) as info:
        TrainConfig(**fields)
    assert str(info.value).startswith("TrainConfig: ")


@pytest.mark.parametrize(
    ("value", "exc"),
    [(torch.zeros(2), TypeError), ({"a": torch.ones(())}, TypeError), ([1, object()], TypeError),
     ({"a": {1: 2}}, TypeError), (math.nan, ValueError), ({"x": [math.inf]}, ValueError)],
)  # fmt: skip
def test_free_form_fields_take_json_values_only(value, exc):
    extra = value if isinstance(value, dict) else {"v": value}
    with pytest.raises(exc, match=r"CodebookConfig: extra\[.*JSON"):
        _cb(extra=extra)
    cfg = _cb(extra={"ok": [1, 2.5, "x", None, True, {"n": {}}]})
    with pytest.raises(exc, match=r"CodebookConfig: extra\["):
        cfg.extra = extra  # refused at assignment too, naming the field; the old value stays
    assert cfg.extra == {"ok": [1, 2.5, "x", None, True, {"n": {}}]}
    json.dumps(cfg.to_dict(), allow_nan=False)


def test_ints_beyond_64_bits_are_refused_in_every_config():
    for cls, name in [(LMDemoConfig, "n_train_stories"), (BaseTrainConfig, "steps"),
                      (CodebookPlan, "attn_codes"), (ExperimentConfig, "n_states")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"{cls.__name__}: {name} must lie in"):
            cls(**{name: 2**64})


# ---------------------------------------------------------------------------------- fuzzing

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0), st.text(max_size=4),
    st.sampled_from(["cosine", "dot", "sum", "mean", "none", "layernorm", "affine", "random",
                     "kmeans", "constant", "auto", "bridge"]),
    st.lists(st.integers(), max_size=3), st.just(torch.zeros(1)),
    st.dictionaries(st.text(max_size=3), st.one_of(st.integers(), st.floats(), st.just(
        torch.ones(1))), max_size=2),
)  # fmt: skip
CONFIGS = [CodebookConfig, TrainConfig, LMDemoConfig, BaseTrainConfig, CodebookPlan,
           ExperimentConfig]  # fmt: skip
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))


def _required(cls: type) -> dict:
    return {"d_in": 4, "n_codes": 8} if cls is CodebookConfig else {}


def _leaf_fields(cls: type) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(cls)
        if not (isinstance(f.type, type) and issubclass(f.type, ValidatedConfig))
        and f.name not in ("base", "plan", "train")
    ]


@FUZZ
@given(cls=st.sampled_from(CONFIGS), data=st.data())
def test_fuzz_configs_build_and_round_trip_or_refuse(cls, data):
    names = _leaf_fields(cls)
    fields = data.draw(st.dictionaries(st.sampled_from(names), JUNK, max_size=4))
    try:
        cfg = cls(**{**_required(cls), **fields})
    except (TypeError, ValueError):
        return
    text = json.dumps(cfg.to_dict(), allow_nan=False)  # a valid config is JSON, never a crash
    assert cls.from_dict(json.loads(text)) == cfg


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.text(max_size=3), st.just(torch.zeros(1)), st.just(b"x"), st.just((1, 2))),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
        st.one_of(st.text(max_size=2), st.integers(0, 3)), inner, max_size=3)),
    max_leaves=8,
)  # fmt: skip


@FUZZ
@given(value=JSONISH)
def test_fuzz_free_form_values_are_json_or_refused(value):
    try:
        cfg = _cb(extra={"v": value})
    except (TypeError, ValueError) as e:
        assert str(e).startswith("CodebookConfig: extra")
        return
    back = CodebookConfig.from_dict(json.loads(json.dumps(cfg.to_dict(), allow_nan=False)))
    assert back == cfg


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_small_codebooks_build_save_and_load(tmp_path_factory, data):
    """Valid small configs build a real codebook that saves and loads with its config intact."""
    from codebook_lens import CodebookModel
    from tests.conftest import make_model

    fields = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "n_codes": st.integers(1, 40), "k": st.integers(-1, 6),
                "chunk_mb": st.floats(1e-4, 1e3), "norm_eps": st.floats(1e-9, 2.0),
                "recent_size": st.integers(0, 64), "input_norm": st.sampled_from(
                    ["none", "layernorm", "affine"]), "extra": st.dictionaries(
                    st.text(max_size=3), st.one_of(st.integers(-5, 5), st.text(max_size=3))),
            },
        )
    )  # fmt: skip
    try:
        cfg = CodebookConfig(d_in=32, **{"n_codes": 8, **fields})
    except (TypeError, ValueError):
        return
    cm = CodebookModel(make_model())
    cm.add_codebook("blocks.0.hook_resid_post", cfg)
    path = tmp_path_factory.mktemp("cb") / "m"
    cm.save(path)
    back = CodebookModel.load(path, make_model())
    assert back.codebooks["blocks.0.hook_resid_post"].cfg == cfg
