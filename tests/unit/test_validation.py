"""Config type/range validation (on construction and on assignment) and Codebook-level checks:
grouped decode ids, non-finite activations, codes returned by hooks, tensors loaded in."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codebook_lens.config import CodebookConfig
from codebook_lens.errors import CheckpointError
from codebook_lens.fsm.base_model import BaseTrainConfig
from codebook_lens.fsm.experiment import CodebookPlan, ExperimentConfig
from codebook_lens.lm.demo import LMDemoConfig
from codebook_lens.quantizer import Codebook
from codebook_lens.training import TrainConfig
from codebook_lens.validation import field_types

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


pytestmark = pytest.mark.usefixtures("user_view")  # the errors users see


# ---------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("fields", "exc", "match"),
    [
        ({"n_codes": "10"}, TypeError, "n_codes must be int, got '10'"),
        ({"recent_size": 1.5}, TypeError, "recent_size must be int"),
        ({"seed": "a"}, TypeError, "seed must be int"),
        ({"chunk_mb": math.inf}, ValueError, "chunk_mb must be a finite number"),
        ({"chunk_mb": math.nan}, ValueError, "chunk_mb must be a finite number"),
        ({"use_error_term": "yes"}, TypeError, "use_error_term must be bool.*True or False"),
        ({"use_error_term": 1}, TypeError, "use_error_term must be bool"),
        ({"k": True}, TypeError, "k must be int.*bool is not accepted"),
        ({"recon_coef": False}, TypeError, "recon_coef must be float"),
        ({"similarity": 3}, TypeError, "similarity must be str"),
        ({"extra": [1]}, TypeError, "extra must be dict"),
        ({"extra": {1: 2}}, TypeError, "extra must be dict"),
        ({"k": 5}, ValueError, "k=5 exceeds n_codes=4"),
        ({"recent_size": -1}, ValueError, "recent_size must be >= 0"),
        ({"seed": 2**64}, ValueError, "seed must lie in"),
    ],
)
def test_codebook_config_rejects_bad_fields(fields, exc, match):
    base = {"d_in": 3, "n_codes": 4, **fields}
    with pytest.raises(exc, match=match) as info:
        CodebookConfig(**base)
    assert str(info.value).startswith("CodebookConfig: ")


def test_valid_configs_are_unchanged():
    cfg = CodebookConfig(d_in=3, n_codes=4, recon_coef=1, chunk_mb=1, seed=-1)
    assert cfg.recon_coef == 1 and cfg.chunk_mb == 1 and cfg.seed == -1
    assert CodebookConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(k=2).k == 2


def test_assignment_is_validated_and_rolled_back():
    cfg = CodebookConfig(d_in=3, n_codes=4, k=2)
    with pytest.raises(ValueError, match=r"k=1000000 exceeds n_codes=4"):
        cfg.k = 10**6
    assert cfg.k == 2
    with pytest.raises(TypeError, match="n_codes must be int"):
        cfg.n_codes = "10"
    assert cfg.n_codes == 4
    with pytest.raises(ValueError, match="k=2 exceeds n_codes=1"):
        cfg.n_codes = 1  # a cross-field rule, checked again
    assert cfg.n_codes == 4
    cfg.k = 3
    assert cfg.k == 3
    cfg.note = "not a field"  # plain attributes stay free
    assert cfg.note == "not a field"


def test_train_config_types_ranges_and_paths(tmp_path):
    with pytest.raises(TypeError, match="TrainConfig: steps must be int, got '10'"):
        TrainConfig(steps="10")
    with pytest.raises(TypeError, match="progress must be bool"):
        TrainConfig(progress=1)
    with pytest.raises(ValueError, match="grad_clip must be a finite number"):
        TrainConfig(grad_clip=math.inf)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-1)
    cfg = TrainConfig(checkpoint_dir=tmp_path / "ck", metrics_path=Path("m.jsonl"))
    assert cfg.checkpoint_dir == str(tmp_path / "ck") and cfg.metrics_path == "m.jsonl"
    with pytest.raises(ValueError, match="steps must be >= 1"):
        cfg.steps = 0
    assert cfg.steps == 1000
    assert TrainConfig(codebook_lr=None, lr=1).lr == 1


@pytest.mark.parametrize(
    ("cls", "fields", "match"),
    [
        (BaseTrainConfig, {"steps": 1.0}, "BaseTrainConfig: steps must be int"),
        (CodebookPlan, {"k": "1"}, "CodebookPlan: k must be int"),
        (ExperimentConfig, {"train": {"steps": 1}}, "ExperimentConfig: train must be TrainConfig"),
        (ExperimentConfig, {"backend": None}, "ExperimentConfig: backend must be str"),
        (LMDemoConfig, {"progress": "no"}, "LMDemoConfig: progress must be bool"),
        (LMDemoConfig, {"steer_per_head": 1.5}, "LMDemoConfig: steer_per_head must be int"),
    ],
)
def test_other_configs_check_types(cls, fields, match):
    with pytest.raises(TypeError, match=match):
        cls(**fields)
    cfg = cls()
    name, value = next(iter(fields.items()))
    with pytest.raises(TypeError, match=match):
        setattr(cfg, name, value)


def test_experiment_config_assignments_used_by_the_cli_still_work():
    cfg = ExperimentConfig.small()
    cfg.seed, cfg.backend = 3, "bridge"
    cfg.train = dataclasses.replace(cfg.train, steps=5)
    assert (cfg.seed, cfg.backend, cfg.train.steps) == (3, "bridge", 5)


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["cosine", "sum", "none", "layernorm", "sample", "kmeans", "constant"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), st.integers(), max_size=2),
)


def _fuzz_config(cls, base, name, value):
    try:
        cfg = cls(**{**base, name: value})
    except (TypeError, ValueError) as e:
        assert str(e).startswith(f"{cls.__name__}: ") or cls is TrainConfig, e
        return
    got = getattr(cfg, name)
    assert got == value or (isinstance(value, Path) and got == str(value))
    if field_types(cls)[name] is int:
        assert isinstance(got, int) and not isinstance(got, bool)


@FUZZ
@given(st.sampled_from([f.name for f in dataclasses.fields(CodebookConfig)]), ANY_VALUE)
def test_fuzz_codebook_config_fields(name, value):
    """Any value for any field either builds a valid config or raises TypeError/ValueError."""
    _fuzz_config(CodebookConfig, {"d_in": 4, "n_codes": 8}, name, value)
    cfg = CodebookConfig(d_in=4, n_codes=8)
    before = cfg.to_dict()
    try:
        setattr(cfg, name, value)
    except (TypeError, ValueError):
        assert cfg.to_dict() == before  # a rejected assignment changes nothing


@FUZZ
@given(st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]), ANY_VALUE)
def test_fuzz_train_config_fields(name, value):
    _fuzz_config(TrainConfig, {}, name, value)


# ---------------------------------------------------------------------------------- Codebook


def _cb(**kw) -> Codebook:
    return Codebook(CodebookConfig(**{"d_in": 4, "n_codes": 3, **kw}))


def test_grouped_decode_checks_ids_per_group():
    cb = _cb(n_groups=2)
    ok = torch.tensor([[[2], [0]], [[-1], [1]]])  # [batch=2, group=2, slot=1]
    out = cb.decode(ok)
    assert torch.equal(out[0, 0], cb.codebook[0, 2].detach())
    assert torch.equal(out[0, 1], cb.codebook[1, 0].detach())
    assert torch.equal(out[1, 0], torch.zeros(4))
    with pytest.raises(ValueError, match=r"code ids must lie in \[-1, 3\).*max 3"):
        cb.decode(torch.tensor([[[3], [0]]]))  # would have been group 1's code 0
    with pytest.raises(ValueError, match=r"min -2"):
        cb.decode(torch.tensor([[[-2], [0]]]))  # only -1 is empty
    with pytest.raises(TypeError, match="integer tensor"):
        cb.decode(torch.zeros(1, 2, 1))


def test_encode_marks_non_finite_rows_empty_or_raises():
    cb = _cb(n_groups=2, k=2)
    x = torch.randn(5, 2, 4)
    clean = cb.encode(x)
    x[1, 0, 2] = math.nan
    x[3, 1, 0] = math.inf
    codes = cb.encode(x)
    assert torch.equal(codes[1, 0], torch.tensor([-1, -1]))
    assert torch.equal(codes[3, 1], torch.tensor([-1, -1]))
    keep = torch.ones(5, 2, dtype=torch.bool)
    keep[1, 0] = keep[3, 1] = False
    assert torch.equal(codes[keep], clean[keep])
    with pytest.raises(ValueError, match=r"codebook: 2 of 10 activation vectors contain NaN"):
        cb.encode(x, check_finite=True)
    cb.check_finite = True
    with pytest.raises(ValueError, match="NaN or inf"):
        cb(x)
    assert torch.equal(cb.encode(x, check_finite=False), codes)


def test_layernorm_input_with_inf_is_not_finite():
    cb = _cb(input_norm="layernorm")
    x = torch.randn(3, 4)
    x[0, 0] = math.inf
    assert cb.encode(x)[0].tolist() == [-1]


def test_codebook_state_check_rejects_bad_tensors_and_nothing_is_copied():
    cb = _cb(n_groups=2, input_norm="affine")
    before = {k: v.detach().clone() for k, v in cb.state_dict().items()}
    good, ln = torch.randn(2, 3, 4), {"ln_weight": torch.ones(2, 4), "ln_bias": torch.zeros(2, 4)}
    bad_cases = [
        ({"codebook": good, "code_counts": torch.zeros(3, 2)}, r"code_counts has shape \(3, 2\)"),
        ({"codebook": good.clone().index_fill_(0, torch.tensor([1]), math.nan)}, "NaN or inf"),
        ({"codebook": torch.ones(2, 3, 4, dtype=torch.long)}, "expected a float tensor"),
        ({"codebook": good, "code_counts": -torch.ones(2, 3)}, "negative counts"),
        (
            {"codebook": good, **ln, "ln_weight": torch.full((2, 4), math.inf)},
            "ln_weight holds NaN",
        ),
        ({"bogus": good}, "has no tensor 'codebook'"),
    ]
    for tensors, match in bad_cases:
        with pytest.raises(CheckpointError, match=match):
            cb.load_state_dict(Codebook.checked_state({**ln, **tensors}, cb.cfg, "test"))
        for k, v in cb.state_dict().items():
            assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="Unexpected key.*bogus"):  # torch's own check
        cb.load_state_dict({**before, "bogus": good})
    counts = torch.arange(6).view(2, 3)  # integer counts are fine
    state = Codebook.checked_state({"codebook": good, "code_counts": counts, **ln}, cb.cfg, "test")
    cb.load_state_dict(state, strict=False)
    assert torch.equal(cb.codebook.detach(), good)
    assert torch.equal(cb.code_counts, counts.float())


def test_check_codes_against_the_given_codes():
    cb = _cb(n_groups=2)
    given_codes = torch.zeros(3, 5, 2, 1, dtype=torch.long)
    cb.check_codes(given_codes.clone(), like=given_codes)
    cb.check_codes(torch.zeros(3, 5, 2, 4, dtype=torch.int32), like=given_codes)  # more slots
    for bad in (given_codes[:1], given_codes[:, :1], given_codes.flatten(), given_codes[..., 0]):
        with pytest.raises(ValueError, match=r"expected \(3, 5, 2, 1\)"):
            cb.check_codes(bad, like=given_codes)


@FUZZ
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=5),
    st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8, torch.float32, torch.bool]),
    st.integers(-3, 4),
)
def test_fuzz_check_codes(shape, dtype, fill):
    """Any tensor is either accepted (integer, the given shape up to slots, ids in range) or
    refused with TypeError/ValueError."""
    cb = _cb(n_groups=2)
    like = torch.zeros(2, 3, 2, 1, dtype=torch.long)
    codes = torch.full(shape, fill).to(dtype) if dtype != torch.uint8 or fill >= 0 else None
    if codes is None:
        return
    try:
        cb.check_codes(codes, like=like)
    except (TypeError, ValueError):
        return
    assert not dtype.is_floating_point and dtype != torch.bool
    assert tuple(shape[:-1]) == (2, 3, 2) and -1 <= fill < 3
