"""The run directory: created only where nothing is lost, resumed only with the same config."""

from __future__ import annotations

import json

import pytest

from codebook_lens.errors import CheckpointError
from codebook_lens.pipeline.rundir import RUN_FORMAT, RunDir, library_versions

CFG = {"out": "x", "model": {"name": "m"}, "train": {"steps": 10, "lr": 0.001, "progress": True}}


def test_new_directory_becomes_a_run_with_config_versions_and_status(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.prepare(CFG, resume=False) is False
    doc = json.loads(run.run_file.read_text())
    assert doc["format"] == RUN_FORMAT and doc["config"] == CFG and doc["status"] == {}
    assert doc["versions"]["torch"] == library_versions()["torch"] != "-"
    run.mark("train", steps=10)
    assert run.status() == {"train": {"steps": 10}} and run.config_dict() == CFG
    assert run.is_run()


def test_existing_run_needs_resume_and_the_same_config(tmp_path):
    run = RunDir(tmp_path)
    run.prepare(CFG, resume=False)
    with pytest.raises(ValueError, match="pass --resume"):
        run.prepare(CFG, resume=False)
    assert run.prepare(CFG, resume=True) is True
    longer = {**CFG, "train": {**CFG["train"], "steps": 20, "progress": False}}
    assert run.prepare(longer, resume=True) is True  # more steps / no bar: allowed
    other = {**CFG, "train": {**CFG["train"], "lr": 0.01}}
    with pytest.raises(ValueError, match=r"train\.lr: 0\.001 -> 0\.01"):
        run.prepare(other, resume=True)


def test_a_directory_with_other_data_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no run"):
        RunDir(tmp_path).prepare(CFG, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        RunDir(f).prepare(CFG, resume=False)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other", "version": 1, "config": {}}', "format marker"),
        (json.dumps({"format": RUN_FORMAT, "version": 99, "config": {}}), "unsupported run"),
    ],
)
def test_corrupt_run_files_are_refused(tmp_path, text, match):
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        RunDir(tmp_path).read()
    assert not RunDir(tmp_path).is_run()


def test_train_tokens_decide_the_steps_unless_steps_disagree():
    from codebook_lens.pipeline import RunConfig

    d = {
        "model": {"name": "m"},
        "data": {"path": "d.jsonl", "train_tokens": 10_000, "context_len": 32, "batch_size": 4},
        "sites": [{"pattern": "blocks.*.attn.hook_z"}],
        "train": {"grad_accum": 2},
    }
    assert RunConfig.from_dict(d).train.steps == 40  # ceil(10000 / (2 * 4 * 32))
    with pytest.raises(ValueError, match="train_tokens=10000 is 40 steps.*train.steps=7"):
        RunConfig.from_dict({**d, "train": {"grad_accum": 2, "steps": 7}})
    assert RunConfig.from_dict({**d, "train": {"grad_accum": 2, "steps": 40}}).train.steps == 40


def test_a_train_table_changes_only_the_fields_it_names():
    from codebook_lens.pipeline import RunConfig

    base = {"model": {"name": "m"}, "data": {"path": "d.jsonl"}, "sites": [{"pattern": "x"}]}
    default = RunConfig.from_dict(base).train
    assert default.freeze_model and default.codebook_lr == 1e-3  # the run's defaults
    cfg = RunConfig.from_dict({**base, "train": {"steps": 7}}).train
    assert cfg.steps == 7 and cfg.freeze_model and cfg.lr == default.lr  # not TrainConfig's
