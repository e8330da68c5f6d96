"""Config fields take sane values only: sizes that can be allocated, chunk sizes that cannot hang
or overflow, fractions in [0, 1], JSON in free-form fields; and any random config either builds
and round-trips through JSON (and, small enough, through a saved CodebookModel) or is refused
with ValueError/TypeError, never another exception."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codebook_lens.config import MAX_CODEBOOK_ELEMENTS, CodebookConfig
from codebook_lens.fsm.base_model import BaseTrainConfig
from codebook_lens.fsm.experiment import CodebookPlan, ExperimentConfig
from codebook_lens.lm.demo import LMDemoConfig
from codebook_lens.training import TrainConfig
from codebook_lens.validation import ValidatedConfig, field_types

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


# ------------------------------------------------------------- the demo and experiment configs

DEMO_CONFIGS = [BaseTrainConfig, CodebookPlan, ExperimentConfig, LMDemoConfig]
ALL_CONFIGS = [CodebookConfig, TrainConfig, *DEMO_CONFIGS]


def _numeric_fields(cls: type) -> dict[str, type]:
    """Fields of ``cls`` holding an int or a float (also ``X | None``), with that type."""
    out = {}
    for name, tp in field_types(cls).items():
        args = typing.get_args(tp) or (tp,)
        kinds = [a for a in args if a in (int, float)]
        if kinds:
            out[name] = kinds[0]
    return out


@pytest.mark.parametrize(
    ("cls", "fields", "match"),
    [
        (BaseTrainConfig, {"min_lr_frac": 5.0}, r"min_lr_frac must lie in \[0, 1\], got 5.0"),
        (BaseTrainConfig, {"min_lr_frac": 5}, r"min_lr_frac must lie in \[0, 1\], got 5"),
        (BaseTrainConfig, {"lr": 1e300}, r"lr must lie in \(0, 10\], got 1e\+300"),
        (BaseTrainConfig, {"lr": 0.0}, r"lr must be > 0, got 0.0"),
        (BaseTrainConfig, {"n_ctx": 10**9}, r"n_ctx must lie in \[2, 65536\]"),
        (BaseTrainConfig, {"log_every": 0}, r"log_every must be >= 1, got 0"),
        (BaseTrainConfig, {"eval_seed": 2**63}, r"eval_seed must lie in"),
        (CodebookPlan, {"attn_codes": -5}, r"attn_codes must be >= 1, got -5"),
        (CodebookPlan, {"mlp_codes": 10**12}, r"mlp_codes must lie in \[1, 2147483647\]"),
        (
            CodebookPlan,
            {"mlp_merge_threshold": 7},
            r"mlp_merge_threshold must lie in \[0, 1\), got 7$",
        ),
        (CodebookPlan, {"attn_merge_threshold": -0.1}, r"attn_merge_threshold must be >= 0"),
        (CodebookPlan, {"replace_every": 0}, r"replace_every must be >= 1, got 0"),
        (ExperimentConfig, {"n_states": 0}, r"n_states must be >= 1, got 0"),
        (ExperimentConfig, {"batch_size": -1}, r"batch_size must be >= 1, got -1"),
        (ExperimentConfig, {"recovery_walks": 0}, r"recovery_walks must be >= 1, got 0"),
        (ExperimentConfig, {"n_states": 10**9}, r"n_states must lie in \[1, 65536\]"),
        (LMDemoConfig, {"n_codes": 0}, r"n_codes must be >= 1, got 0"),
        (LMDemoConfig, {"min_precision": 3}, r"min_precision must lie in \[0, 1\], got 3$"),
        (LMDemoConfig, {"d_model": 10**12}, r"d_model must lie in \[1, 65536\], got 10{12}"),
        (LMDemoConfig, {"base_lr": -1}, r"base_lr must be > 0, got -1 "),
        (LMDemoConfig, {"codebook_lr": 11.0}, r"codebook_lr must lie in \(0, 10\]"),
        (LMDemoConfig, {"vocab_size": 100}, r"vocab_size must be >= 258 \(256 bytes"),
        (LMDemoConfig, {"block_len": 1}, r"block_len must be >= 2, got 1"),
        (LMDemoConfig, {"steer_per_head": 0}, r"steer_per_head must be >= 1, got 0"),
    ],
)
def test_demo_configs_refuse_absurd_values_naming_the_field(cls, fields, match):
    with pytest.raises(ValueError, match=match) as info:
        cls(**fields)
    assert str(info.value).startswith(f"{cls.__name__}: {next(iter(fields))} must")
    cfg = cls()
    ((name, value),) = fields.items()
    old = getattr(cfg, name)
    with pytest.raises(ValueError, match=match):
        setattr(cfg, name, value)  # an assignment is checked too and leaves the old value
    assert getattr(cfg, name) == old


@pytest.mark.parametrize(
    ("cls", "fields", "match"),
    [
        (BaseTrainConfig, {"d_model": 30, "n_heads": 4}, "d_model=30 must be divisible by n_he"),
        (BaseTrainConfig, {"d_model": 2**14, "n_layers": 8}, r"the weights would hold \d+ elem"),
        (BaseTrainConfig, {"batch_size": 2**16, "n_ctx": 2**12}, "one layer's activations"),
        (CodebookPlan, {"k": 40, "attn_codes": 32}, "k=40 exceeds attn_codes=32"),
        (CodebookPlan, {"k": 40, "mlp_codes": 32}, "k=40 exceeds mlp_codes=32"),
        (ExperimentConfig, {"n_states": 5}, "n_edges=10 exceeds n_states=5"),
        (LMDemoConfig, {"k": 600}, "k=600 exceeds n_codes=512"),
        (LMDemoConfig, {"d_model": 100, "n_heads": 3}, "d_model=100 must be divisible"),
        (
            LMDemoConfig,
            {"vocab_size": 2**20, "batch_size": 2**10},
            "one layer.s activations of a b",
        ),
        (LMDemoConfig, {"d_model": 2**15, "n_layers": 2}, r"the weights would hold"),
    ],
)
def test_demo_configs_cross_field_limits(cls, fields, match):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: {match}"):
        cls(**fields)


def test_placed_codebooks_only_bound_k():
    assert CodebookPlan(placement="mlp", k=40, attn_codes=32, mlp_codes=64).k == 40
    assert CodebookPlan(placement="attn", k=40, attn_codes=64, mlp_codes=32).k == 40


def test_defaults_and_small_presets_are_valid():
    """The shipped settings pass their own ranges and round-trip through JSON."""
    exp, small = ExperimentConfig(), ExperimentConfig.small()
    built = [BaseTrainConfig(), CodebookPlan(), exp, exp.base, exp.plan, exp.train, small,
             small.base, small.plan, small.train, LMDemoConfig(), LMDemoConfig.small()]  # fmt: skip
    for cfg in built:
        cls = type(cfg)
        back = cls.from_dict(json.loads(json.dumps(cfg.to_dict(), allow_nan=False)))
        assert back == cfg
        for name, rng in cls.RANGES.items():
            value = getattr(cfg, name)
            assert value is None or rng.contains(value), (cls.__name__, name, value, str(rng))
    # the tutorials' and tests' own sizes: the TokFSM test base model, the LM smoke run
    tiny = dict(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=33, walk_states=16)
    BaseTrainConfig(**tiny, batch_size=16, lr=3e-3, log_every=1)
    LMDemoConfig.small(n_train_stories=800, n_eval_stories=150, base_steps=20, codebook_steps=10)


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_every_numeric_field_has_a_range(cls):
    numeric = _numeric_fields(cls)
    assert numeric, cls
    # CodebookConfig.merge_threshold is checked in validate(), as [0, 1): refused all the same
    in_validate = {"merge_threshold"} if cls is CodebookConfig else set()
    missing = sorted(set(numeric) - set(cls.RANGES) - in_validate)
    assert not missing, f"{cls.__name__} has no RANGES entry for {missing}"
    assert set(cls.RANGES) <= set(numeric)  # no entry for a field that is gone
    for name in in_validate:
        for value in (-0.5, 1.0, 1e300):
            with pytest.raises(ValueError, match=rf"^{cls.__name__}: {name} must"):
                cls(**{**_required(cls), name: value})


def _outside(rng, kind):
    """Values just outside each finite bound of ``rng`` for a field of type ``kind``."""
    out = []
    if rng.lo is not None:  # a float step that survives rounding at any magnitude
        step = 1 if kind is int else max(0.5, abs(rng.lo))
        out.append(rng.lo if rng.lo_open else rng.lo - step)
    if rng.hi is not None:
        step = 1 if kind is int else max(0.5, abs(rng.hi))
        out.append(rng.hi if rng.hi_open else rng.hi + step)
    return [kind(v) for v in out]


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_values_just_outside_each_range_are_refused(cls):
    numeric = _numeric_fields(cls)
    for name, rng in cls.RANGES.items():
        for value in _outside(rng, numeric[name]):
            if numeric[name] is int and not -(2**63) <= value < 2**64:
                continue  # refused by the 64-bit rule, tested above
            with pytest.raises(ValueError, match=rf"^{cls.__name__}: {name} must"):
                cls(**{**_required(cls), name: value})


def _in_range(rng, kind):
    lo = -(2**63) if rng.lo is None else rng.lo
    hi = 2**64 - 1 if rng.hi is None else rng.hi
    if kind is int:
        return st.integers(int(lo) + rng.lo_open, int(hi) - rng.hi_open)
    return st.floats(lo, hi, exclude_min=rng.lo_open, exclude_max=rng.hi_open)


@FUZZ
@given(cls=st.sampled_from(DEMO_CONFIGS), data=st.data())
def test_fuzz_in_range_values_build_or_name_a_cross_field_rule(cls, data):
    """Any values inside the ranges either build a config that round-trips, or are refused by
    a cross-field rule (divisibility, k against the code count, n_edges, sizes) with a
    ValueError naming the class; values outside are always refused."""
    numeric = _numeric_fields(cls)
    names = data.draw(st.lists(st.sampled_from(sorted(cls.RANGES)), unique=True, max_size=5))
    fields = {n: data.draw(_in_range(cls.RANGES[n], numeric[n]), label=n) for n in names}
    try:
        cfg = cls(**fields)
    except ValueError as e:
        assert str(e).startswith(f"{cls.__name__}: ")
        assert "(the range is" not in str(e)  # no range message for an in-range value
        assert not any(f"must lie in {cls.RANGES[n]}" in str(e) for n in names)
    else:
        assert cls.from_dict(json.loads(json.dumps(cfg.to_dict(), allow_nan=False))) == cfg
    name = data.draw(st.sampled_from(sorted(cls.RANGES)), label="outside")
    bad = _outside(cls.RANGES[name], numeric[name])
    if bad:
        with pytest.raises(ValueError, match=rf"^{cls.__name__}: {name} must"):
            cls(**{name: data.draw(st.sampled_from(bad))})
