"""Config dataclasses as the command line: every field documented and a flag, dict round trips
(nested), unknown keys refused and friendly Literal errors."""

from __future__ import annotations

import argparse
import json
import typing

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from codebook_lens.cli import SHORT_FLAGS, build_parser
from codebook_lens.cli_args import CONFIG_FIELDS, config_from_args
from codebook_lens.config import CodebookConfig
from codebook_lens.fsm.base_model import BaseTrainConfig
from codebook_lens.fsm.experiment import CodebookPlan, ExperimentConfig, StateRecovery
from codebook_lens.lm.demo import LMDemoConfig
from codebook_lens.training import TrainConfig
from codebook_lens.validation import ValidatedConfig, field_docs, field_types, literal_choices

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


pytestmark = pytest.mark.usefixtures("user_view")  # the errors users see


def _config_classes() -> list[type]:
    found, todo = [], list(ValidatedConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted({c for c in found if c.__module__.startswith("codebook_lens")}, key=str)


def test_every_config_field_has_a_docstring():
    classes = _config_classes()
    assert {CodebookConfig, TrainConfig, BaseTrainConfig, CodebookPlan, ExperimentConfig} <= set(
        classes
    )
    missing = [
        f"{cls.__name__}.{name}"
        for cls in classes
        for name, doc in field_docs(cls).items()
        if not doc.strip()
    ]
    assert not missing, f"fields without a docstring: {missing}"


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(
    "command", [("demo",), ("fsm", "train-base"), ("fsm", "train-codebooks"), ("lm-demo",)]
)
def test_every_config_flag_has_the_field_docstring_as_help(command):
    sp = _subparser(build_parser(), *command)
    paths = sp.get_default(CONFIG_FIELDS)
    assert len(paths) > 10
    by_dest = {a.dest: a for a in sp._actions}
    for path in paths:
        help_ = by_dest[path].help
        assert help_ and not help_.startswith(" (default"), (command, path, help_)
    text = sp.format_help()
    assert "--seed N" in text and "Seed of" in text
    if command[0] != "lm-demo":
        assert "--plan.placement {attn,mlp,attn+mlp}, --placement" in text
        assert "Optimizer steps." in text  # train.steps / base.steps


def test_flags_build_the_config():
    args = build_parser().parse_args(
        ["demo", "--out", "x", "--small", "--steps", "7", "--placement", "mlp",
         "--merge-threshold", "0.5", "--seed", "3", "--backend", "bridge", "--train.lr", "0.01",
         "--base.min-lr-frac", "0.2", "--train.codebook-lr", "none", "--no-train.resume"]
    )  # fmt: skip
    cfg = config_from_args(ExperimentConfig.small(), args)
    small = ExperimentConfig.small()
    assert (cfg.train.steps, cfg.train.lr, cfg.train.codebook_lr, cfg.train.resume) == (
        7, 0.01, None, False
    )  # fmt: skip
    assert (cfg.plan.placement, cfg.plan.mlp_merge_threshold) == ("mlp", 0.5)
    assert (cfg.seed, cfg.backend, cfg.base.min_lr_frac) == (3, "bridge", 0.2)
    assert cfg.base.steps == small.base.steps and cfg.plan.attn_codes == small.plan.attn_codes
    none_given = build_parser().parse_args(["demo", "--out", "x"])
    assert config_from_args(ExperimentConfig(), none_given) == ExperimentConfig()
    assert set(SHORT_FLAGS) <= set(none_given.config_fields)
    lm = build_parser().parse_args(["lm-demo", "--out", "x", "--steer-per-head", "2", "--k", "4"])
    got = config_from_args(LMDemoConfig.small(), lm)
    assert (got.steer_per_head, got.k) == (2, 4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--out", "x", "--placement", "head"])
    with pytest.raises(SystemExit):  # the FSM and base model come from --base
        build_parser().parse_args(["fsm", "train-codebooks", "--base", "b", "--out", "o",
                                   "--n-states", "5"])  # fmt: skip


def test_unknown_keys_are_refused_with_the_class_the_key_and_the_valid_names():
    want = r"^ExperimentConfig: unknown field 'n_state'\. Did you mean 'n_states'\? Valid"
    with pytest.raises(ValueError, match=want + r" fields are \[.*'n_states'"):
        ExperimentConfig.from_dict({"n_state": 3})
    with pytest.raises(ValueError, match=r"^TrainConfig: unknown field 'stpes'\. Did you mean "):
        ExperimentConfig.from_dict({"train": {"stpes": 3}})
    with pytest.raises(ValueError, match=r"unknown fields 'a', 'b'\. Valid fields"):
        CodebookPlan.from_dict({"a": 1, "b": 2})
    with pytest.raises(ValueError, match="unknown field"):
        CodebookConfig.from_dict({"d_in": 3, "n_codes": 4, "bogus": 1})


def test_a_saved_codebook_config_with_an_unknown_key_is_a_checkpoint_error(tmp_path):
    from codebook_lens import CodebookModel
    from codebook_lens.io import CheckpointError
    from tests.conftest import make_model

    cm = CodebookModel(make_model())
    cm.add_codebook("blocks.0.hook_resid_post", n_codes=4)
    cm.save(tmp_path / "m")
    cfg_file = tmp_path / "m" / "cfg.json"
    meta = json.loads(cfg_file.read_text())
    meta["sites"][0]["config"]["bogus"] = 1
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown field 'bogus'"):
        CodebookModel.load(tmp_path / "m", model=make_model())


def test_literal_fields_give_the_choices_and_a_close_match():
    with pytest.raises(ValueError, match=r"^CodebookPlan: placement='atn'; choose one of "
                       r"\('attn', 'mlp', 'attn\+mlp'\)\. Did you mean 'attn'\?$"):  # fmt: skip
        CodebookPlan(placement="atn")
    with pytest.raises(ValueError, match=r"BaseTrainConfig: pos_init='sin'; choose one of"):
        BaseTrainConfig(pos_init="sin")
    with pytest.raises(TypeError, match=r"CodebookConfig: init must be str \(one of"):
        CodebookConfig(d_in=2, n_codes=2, init=3)
    cfg = LMDemoConfig()
    with pytest.raises(ValueError, match="backend='hoked'.*Did you mean 'hooked'"):
        cfg.backend = "hoked"
    assert cfg.backend == "auto"


def _value(tp):
    """A strategy of values of annotation ``tp`` (small ranges; validate() may still refuse)."""
    choices = literal_choices(tp)
    if choices:
        return st.sampled_from(choices)
    args = typing.get_args(tp)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return st.one_of(st.none(), _value(inner))
    return {
        bool: st.booleans(),
        int: st.integers(1, 64),
        float: st.floats(0.01, 0.99),
        str: st.text("abc/", min_size=1, max_size=4),
    }.get(tp, st.nothing())


def _config(cls, **fixed):
    fields = {n: tp for n, tp in field_types(cls).items() if n not in fixed}
    scalars = {n: _value(tp) for n, tp in fields.items() if _value(tp) is not st.nothing()}
    return st.fixed_dictionaries({}, optional=scalars).map(lambda d: {**fixed, **d})


@FUZZ
@given(_config(ExperimentConfig), _config(BaseTrainConfig), _config(CodebookPlan),
       _config(TrainConfig), _config(CodebookConfig, d_in=4, n_codes=64))  # fmt: skip
def test_fuzz_nested_round_trip(top, base, plan, train, codebook):
    try:
        cfg = ExperimentConfig(
            **top,
            base=BaseTrainConfig(**base),
            plan=CodebookPlan(**plan),
            train=TrainConfig(**train),
        )
        cb = CodebookConfig(**codebook)
    except ValueError:
        assume(False)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert ExperimentConfig.from_dict(saved) == cfg
    assert CodebookConfig.from_dict(json.loads(json.dumps(cb.to_dict()))) == cb
    lm = LMDemoConfig.small()
    assert LMDemoConfig.from_dict(lm.to_dict()) == lm


def test_state_recovery_result_metrics():
    labels = torch.full((2, 3), -1)
    rec = StateRecovery(
        states_recovered=1, states_present=2, mean_best_code_precision=0.5,
        mean_best_code_recall=0.5, mean_best_neuron_precision=0.25, mean_best_neuron_recall=0.5,
        states_recovered_per_site={"a": 1}, best_code={"site": ["a"]}, best_neuron_precision=[0.25],
        results={}, store=None, labels=labels,
    )  # fmt: skip
    m = rec.metrics()
    assert list(m)[:2] == ["states_recovered", "states_present"] and "store" not in m
    assert json.loads(json.dumps(m)) == m and rec.to_dict() == m
